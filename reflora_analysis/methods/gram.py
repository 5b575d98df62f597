r"""The Gram/preconditioner helper shared by the refactoring methods (``THEORY.md`` F3, F10).

RefLoRA, RefLoRA-S and the balanced projection all work on the ``r x r`` Grams
``X = A^T A`` and ``Y = B^T B`` of every LoRA layer and then right-multiply ``m x r`` /
``n x r`` factors or gradients by per-layer ``r x r`` matrices. :class:`PairGroup` does both
for the layers that share (rank, dtype, device), found with
:func:`~reflora_analysis.pairs.group_pairs`: the Grams of a group are written into one
``(L, r, r)`` buffer, so that every ``r x r`` factorization of the group is one batched call
(:func:`~reflora_analysis.theory.geometric_mean_and_inverse`: ``S*`` and ``S*^{-1}`` from one
Cholesky + ``eigh``). Everything here reads and writes the *storage* of the pairs (PEFT keeps
``B^T``); the pure kernels of each method work on paper-orientation tensors instead.

:func:`singular_grams` and :func:`singular_tol` are the F10 test "is this Gram (near)
singular?" shared by the methods, so that all of them warn about the same layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import theory
from ..pairs import LoraPair, group_pairs

__all__ = ["PairGroup", "make_groups", "gram_trace", "singular_grams", "singular_tol"]

STRATEGIES = ("auto", "loop", "stack")


class PairGroup:
    """Pairs sharing (rank, dtype, device): buffers for their Grams and right-multiplies.

    ``strategy="loop"`` writes each layer's Gram with one ``mm(out=...)`` into the group's
    ``(L, r, r)`` buffer and right-multiplies each gradient through a reused workspace, then
    ``copy_`` (no per-step allocation for float32 parameters). ``strategy="stack"`` stacks
    same-shape factors and uses one ``bmm`` per shape (fewer kernel launches: the better
    choice on a GPU, where per-layer launches dominate; on a CPU the stacking copies cost
    more than they save).
    """

    def __init__(self, pairs: list[LoraPair], strategy: str):
        self.pairs = pairs
        first = pairs[0].a
        self.rank = pairs[0].rank
        self.dtype = first.dtype
        self.device = first.device
        self.compute_dtype = torch.promote_types(self.dtype, torch.float32)
        self.strategy = strategy
        L, r = len(pairs), self.rank
        self.grams = torch.empty(2, L, r, r, dtype=self.compute_dtype, device=self.device)
        self._workspace: dict[tuple, Tensor] = {}
        # same-shape index lists for the stack strategy: factor views by paper shape
        self._shape_index: dict[tuple, list[int]] = {}
        for i, p in enumerate(pairs):
            self._shape_index.setdefault(("A", *p.A.shape), []).append(i)
            self._shape_index.setdefault(("B", *p.B.shape), []).append(i)
        self._index_tensors = {
            key: torch.tensor(idx, dtype=torch.long, device=self.device)
            for key, idx in self._shape_index.items()
        }

    def factor_norms(self) -> tuple[Tensor, Tensor]:
        """``||A_l||_F`` and ``||B_l||_F`` for every layer, ``(L,)`` each, float64."""
        # stored tensors: same Frobenius norms as the paper views, contiguous reductions
        norm_A = torch.stack(torch._foreach_norm([p.a for p in self.pairs])).to(torch.float64)
        norm_B = torch.stack(torch._foreach_norm([p.b for p in self.pairs])).to(torch.float64)
        return norm_A, norm_B

    def _upcast(self, t: Tensor) -> Tensor:
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def _buffer(self, shape, tag: str) -> Tensor:
        key = (tag, *shape)
        buf = self._workspace.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=self.compute_dtype, device=self.device)
            self._workspace[key] = buf
        return buf

    def compute_grams(self) -> tuple[Tensor, Tensor]:
        """``X_l = A_l^T A_l`` and ``Y_l = B_l^T B_l`` for every layer, ``(L, r, r)`` each."""
        X, Y = self.grams[0], self.grams[1]
        if self.strategy == "stack":
            for (side, *_), idx in self._shape_index.items():
                views = [self._upcast(self.pairs[i].A if side == "A" else self.pairs[i].B)
                         for i in idx]
                F = torch.stack(views)
                target = X if side == "A" else Y
                target.index_copy_(0, self._index_tensors[(side, *_)], F.mT @ F)
            return X, Y
        for i, p in enumerate(self.pairs):
            A, B = self._upcast(p.A), self._upcast(p.B)
            torch.mm(A.mT, A, out=X[i])
            torch.mm(B.mT, B, out=Y[i])
        return X, Y

    def right_multiply_grads(self, right_A: Tensor, right_B: Tensor, write_back: str = "copy",
                             sums: list | None = None) -> None:
        """``grad_A <- grad_A right_A[l]`` and ``grad_B <- grad_B right_B[l]`` for every layer.

        ``right_*``: ``(L, r, r)`` in the compute dtype. ``write_back="copy"`` writes the
        products into the existing ``.grad`` tensors with ``copy_`` (in the parameter dtype);
        ``"rebind"`` sets ``param.grad`` to the new product instead (no copy pass; gradients
        that are views, e.g. DDP bucket views, are still copied into). When ``sums`` is a
        list, the sum of every product is appended (a cheap finiteness witness: NaN/Inf in a
        gradient makes its product's sum non-finite).
        """
        if self.strategy == "stack":
            self._right_multiply_grads_stacked(right_A, right_B, sums)
            return
        for i, p in enumerate(self.pairs):
            self._right_multiply_one(p.a, right_A[i], False, write_back, sums)
            self._right_multiply_one(p.b, right_B[i], p.b_transposed, write_back, sums)

    def _right_multiply_grads_stacked(self, right_A, right_B, sums) -> None:
        for (side, *shape), idx in self._shape_index.items():
            grads = [self.pairs[i].grad_A if side == "A" else self.pairs[i].grad_B for i in idx]
            keep = [j for j, g in enumerate(grads) if g is not None]
            if not keep:
                continue
            grads = [grads[j] for j in keep]
            index = self._index_tensors[(side, *shape)]
            if len(keep) != len(idx):
                index = index[keep]
            R = (right_A if side == "A" else right_B).index_select(0, index)
            out = torch.stack([self._upcast(g) for g in grads]) @ R
            if sums is not None:
                sums.append(out.sum())
            torch._foreach_copy_(grads, list(out.unbind(0)))

    def _right_multiply_one(self, param, R: Tensor, left: bool, write_back: str,
                            sums: list | None) -> None:
        """Paper-view ``grad R`` for one factor; ``left``: storage is the transpose, so the
        product is ``R^T grad_stored`` on the storage itself (contiguous write back)."""
        grad = param.grad
        if grad is None:
            return
        x = self._upcast(grad)
        rebind = write_back == "rebind" and grad._base is None
        if not rebind and x is grad and grad.is_contiguous():
            out = self._buffer(grad.shape, "grad")
            torch.mm(R.mT, x, out=out) if left else torch.mm(x, R, out=out)
        else:
            out = R.mT @ x if left else x @ R
        if sums is not None:
            sums.append(out.sum())
        if rebind:
            param.grad = out if out.dtype == grad.dtype else out.to(grad.dtype)
        else:
            grad.copy_(out)

    def right_multiply_factors(self, right_A: Tensor, right_B: Tensor) -> None:
        """``A <- A right_A[l]``, ``B <- B right_B[l]`` (weights, in place, parameter dtype)."""
        for i, p in enumerate(self.pairs):
            A = p.a.data
            A.copy_(self._upcast(A) @ right_A[i])
            b = p.b.data
            if p.b_transposed:  # stored B^T: (B R)^T = R^T B^T
                b.copy_(right_B[i].mT @ self._upcast(b))
            else:
                b.copy_(self._upcast(b) @ right_B[i])


def _trace(X: Tensor) -> Tensor:
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def make_groups(pairs: list[LoraPair], strategy: str = "auto") -> list[PairGroup]:
    """One :class:`PairGroup` per (rank, dtype, device) of ``pairs``.

    ``strategy="auto"`` is "stack" on accelerators and "loop" on CPU (see :class:`PairGroup`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return [PairGroup(g, ("stack" if g[0].a.device.type != "cpu" else "loop")
                      if strategy == "auto" else strategy)
            for g in group_pairs(pairs).values()]


def gram_trace(X: Tensor) -> Tensor:
    """``tr X`` of each ``(..., r, r)`` Gram, shape ``(...)``."""
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def singular_tol(damping: float, rank: int, compute_dtype: torch.dtype) -> float:
    """Relative eigenvalue floor under which a Gram counts as singular (F10): the damping, or
    the round-off of Grams accumulated in ``compute_dtype``, whichever is larger."""
    return max(damping, 10 * rank * torch.finfo(compute_dtype).eps)


def singular_grams(X: Tensor, Y: Tensor, rel_tol: float) -> Tensor:
    """Per layer: ``X`` or ``Y`` zero, not positive definite, or with
    ``min diag(chol)^2 <= rel_tol * max diag(chol)^2`` (the cheap condition proxy a Cholesky
    gives). ``X, Y``: ``(L, r, r)``; returns ``(L,)`` bool, computed without a host read.

    The balanced projection projects only layers whose Grams are both regular (RefLoRA reads
    the F10 mask of :func:`~reflora_analysis.theory.geometric_mean_and_inverse` instead).
    """
    bad = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for G in (X, Y):
        L, info = torch.linalg.cholesky_ex(theory.symmetrize(G))
        diag = L.diagonal(dim1=-2, dim2=-1).abs().square()
        bad |= (info != 0) | (diag.amin(-1) <= rel_tol * diag.amax(-1)) | (diag.amax(-1) <= 0)
        bad |= ~torch.isfinite(diag).all(-1)
    return bad
