r"""The batched Gram/right-multiply engine shared by the refactoring methods (``THEORY.md`` F3, F10).

RefLoRA, RefLoRA-S and the balanced projection all work on the ``r x r`` Grams
``X = A^T A`` and ``Y = B^T B`` of every LoRA layer and then right-multiply ``m x r`` /
``n x r`` factors or gradients by per-layer ``r x r`` matrices. Everything that depends on
the layers is planned once, when the transform is built:

- :class:`PairGroup`: the layers sharing (rank, dtype, device)
  (:func:`~reflora_analysis.pairs.group_pairs`); their Grams live in one ``(2, L, r, r)``
  buffer, so every ``r x r`` factorization of the group is one batched call;
- :class:`FactorClass`: inside a group, the factors of one side (A or B) with one storage
  shape. A class is either *stacked* (its factors or gradients are copied into one
  ``(k, p, q)`` workspace and multiplied with one ``bmm``: a fixed number of kernel calls
  per class, whatever the number of layers) or *looped* (one ``mm`` per layer into a
  workspace: no copy, the better choice for large factors on a CPU, where each product is
  arithmetic-bound and the per-call cost is negligible).

Everything here reads and writes the *storage* of the pairs (PEFT keeps ``B^T``: a factor
stored rank-first, ``(r, k)``, has the Gram ``s s^T`` and the product ``(F R)^T = R^T s``);
the pure kernels of each method work on paper-orientation tensors instead. No function here
reads a tensor value on the host, so the engine never synchronises with an accelerator
(:func:`geometric_mean_and_inverse_batched` is the batched, sync-free form of
:func:`~reflora_analysis.theory.geometric_mean_and_inverse`; on a CPU, where a host read
synchronises nothing, it reads the F10 mask instead of paying for a second pass).

:func:`singular_grams` and :func:`singular_tol` are the F10 test "is this Gram (near)
singular?" shared by the methods, so that all of them warn about the same layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import theory
from ..pairs import LoraPair, group_pairs

__all__ = ["FactorClass", "PairGroup", "make_groups", "gram_trace", "singular_grams",
           "singular_tol", "geometric_mean_and_inverse_batched"]

STRATEGIES = ("auto", "loop", "stack")

#: "auto" on a CPU stacks the factors of a class when each has fewer elements than this:
#: below it a layer's GEMM costs about as much as its dispatch (measured in
#: benchmarks/refactor_overhead.py: stacking LLaMA-7B factors, 4096 x r and up, is slower).
STACK_MAX_NUMEL = 1 << 16


class FactorClass:
    """The factors of one side and one storage shape inside a :class:`PairGroup`.

    ``positions``: the layers' indices in the group; ``left``: stored rank-first
    (``(r, k)``, PEFT's ``B^T``); ``stack``: batched through a workspace (see the module
    docstring). Results are identical either way.
    """

    def __init__(self, side: str, positions: list[int], params: list, left: bool,
                 stack: bool, n_layers: int):
        self.side, self.positions, self.params, self.left = side, positions, params, left
        self.stack = stack and len(params) > 1
        self.shape = tuple(params[0].shape)
        device = params[0].device
        self.index = torch.tensor(positions, dtype=torch.long, device=device)
        self.full = positions == list(range(n_layers))  # writes straight into the group's rows

    @property
    def numel(self) -> int:
        return len(self.params) * self.shape[0] * self.shape[1]

    def bind(self, work: "Workspace") -> None:
        """Fix this class's views of the group's workspace (stacked input, products and
        their per-layer slices), so that a step creates no views of its own."""
        k = len(self.params)
        self._in = work.scratch[0][:self.numel].view(k, *self.shape)
        self._out = work.scratch[1][:self.numel].view(k, *self.shape)
        self._out_list = list(self._out.unbind(0))
        r = work.rank
        self._gram = work.small(0, k, r)
        self._right = work.small(1, k, r)

    def gram(self, out: Tensor, work: "Workspace") -> None:
        """The Gram of every factor (paper ``F^T F``) into ``out[positions]``, ``out`` (L, r, r)."""
        if not self.stack:
            for pos, p in zip(self.positions, self.params):
                s = work.upcast(p)
                torch.mm(s, s.mT, out=out[pos]) if self.left else torch.mm(s.mT, s, out=out[pos])
            return
        s = torch.stack(self.params, out=self._in)
        target = out if self.full else self._gram
        torch.bmm(s, s.mT, out=target) if self.left else torch.bmm(s.mT, s, out=target)
        if not self.full:
            out.index_copy_(0, self.index, target)

    def right_multiply(self, tensors: list[Tensor], R: Tensor, work: "Workspace",
                       sums: list | None, rebind: list | None) -> None:
        """Paper-view ``F <- F R[l]`` for ``tensors`` (the class's factors or their gradients,
        in storage layout), in place; with ``rebind`` (a list of parameters) the products are
        bound to ``param.grad`` instead. ``sums`` collects a finiteness witness per product."""
        if not self.stack:
            for pos, t, param in zip(self.positions, tensors, rebind or [None] * len(tensors)):
                work.multiply_one(t, R[pos], self.left, sums, param)
            return
        s = torch.stack(tensors, out=self._in)
        Rk = R if self.full else torch.index_select(R, 0, self.index, out=self._right)
        if rebind is not None:  # a fresh product per step, bound as the new gradients
            out = torch.bmm(Rk.mT, s) if self.left else torch.bmm(s, Rk)
        else:
            out = self._out
            torch.bmm(Rk.mT, s, out=out) if self.left else torch.bmm(s, Rk, out=out)
        if sums is not None:
            sums.append(out.sum())
        if rebind is not None:
            for param, new in zip(rebind, out.unbind(0)):
                param.grad = new if new.dtype == param.dtype else new.to(param.dtype)
        else:
            torch._foreach_copy_(tensors, self._out_list)


class Workspace:
    """Scratch memory of a group, allocated once and shared by its classes (which run one
    after the other): two flat buffers of the largest stacked class (factors in, products
    out) and small ``(k, r, r)`` buffers; never grows with the steps."""

    def __init__(self, classes: list[FactorClass], rank: int, dtype, device):
        self.dtype, self.device, self.rank = dtype, device, rank
        stacked = [c.numel for c in classes if c.stack] or [0]
        looped = [c.shape[0] * c.shape[1] for c in classes if not c.stack] or [0]
        size = max(max(stacked), max(looped))
        self.scratch = [torch.empty(size, dtype=dtype, device=device) for _ in range(2)]
        k = max((len(c.params) for c in classes), default=1)
        self._small = torch.empty(2, k * rank * rank, dtype=dtype, device=device)

    def small(self, slot: int, k: int, r: int) -> Tensor:
        return self._small[slot][:k * r * r].view(k, r, r)

    def upcast(self, t: Tensor) -> Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def multiply_one(self, t: Tensor, R: Tensor, left: bool, sums: list | None, param) -> None:
        """One looped product ``R^T t`` (``left``) or ``t R``, written back into ``t`` (or
        bound to ``param.grad`` when ``param`` is given and ``t`` is not a view)."""
        x = self.upcast(t)
        rebind = param is not None and t._base is None
        if not rebind and x is t and t.is_contiguous():
            out = self.scratch[1][:t.numel()].view(t.shape)
            torch.mm(R.mT, x, out=out) if left else torch.mm(x, R, out=out)
        else:
            out = R.mT @ x if left else x @ R
        if sums is not None:
            sums.append(out.sum())
        if rebind:
            param.grad = out if out.dtype == t.dtype else out.to(t.dtype)
        else:
            t.copy_(out)


class PairGroup:
    """Pairs sharing (rank, dtype, device): their Grams and right-multiplies, batched.

    ``strategy``: "stack" batches every class of two or more factors, "loop" none, "auto"
    all on accelerators and, on a CPU, the classes of factors under
    :data:`STACK_MAX_NUMEL` elements. The plan (classes, index tensors, buffers) is made
    here, once; a step issues a fixed number of calls per class plus one per layer of the
    looped classes only.
    """

    def __init__(self, pairs: list[LoraPair], strategy: str):
        self.pairs = pairs
        first = pairs[0].a
        self.rank = pairs[0].rank
        self.dtype = first.dtype
        self.device = first.device
        self.compute_dtype = torch.promote_types(self.dtype, torch.float32)
        self.strategy = strategy
        #: the r x r maths reads no value on the host (see geometric_mean_and_inverse_batched)
        self.sync_free = self.device.type != "cpu"
        self._a_params = [p.a for p in pairs]
        self._b_params = [p.b for p in pairs]
        self.classes = self._plan(strategy)
        self._grams: Tensor | None = None
        self._work: Workspace | None = None

    # Grams and workspace are allocated at first use: RefLoRA-S needs neither (only norms),
    # so its memory stays a few index tensors instead of two stacks of the largest class
    @property
    def grams(self) -> Tensor:
        """``(2, L, r, r)`` buffer of the Grams, in the compute dtype."""
        if self._grams is None:
            L, r = len(self.pairs), self.rank
            self._grams = torch.empty(2, L, r, r, dtype=self.compute_dtype, device=self.device)
        return self._grams

    @property
    def work(self) -> Workspace:
        """The group's scratch (:class:`Workspace`), with every stacked class bound to it."""
        if self._work is None:
            self._work = Workspace(self.classes, self.rank, self.compute_dtype, self.device)
            for c in self.classes:
                if c.stack:
                    c.bind(self._work)
        return self._work

    def _plan(self, strategy: str) -> list[FactorClass]:
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.pairs):
            members.setdefault(("A", tuple(p.a.shape), False), []).append(i)
            members.setdefault(("B", tuple(p.b.shape), p.b_transposed), []).append(i)
        classes = []
        for (side, shape, left), idx in members.items():
            stack = strategy == "stack" or (strategy == "auto" and (
                self.device.type != "cpu" or shape[0] * shape[1] < STACK_MAX_NUMEL))
            params = [self.pairs[i].a if side == "A" else self.pairs[i].b for i in idx]
            classes.append(FactorClass(side, idx, params, left, stack, len(self.pairs)))
        return classes

    @torch.no_grad()  # the engine reads and writes parameters in place: never recorded
    def factor_norms(self) -> tuple[Tensor, Tensor]:
        """``||A_l||_F`` and ``||B_l||_F`` for every layer, ``(L,)`` each, float64."""
        # stored tensors: same Frobenius norms as the paper views, contiguous reductions
        norm_A = torch.stack(torch._foreach_norm(self._a_params))
        norm_B = torch.stack(torch._foreach_norm(self._b_params))
        return norm_A.to(torch.float64), norm_B.to(torch.float64)

    @torch.no_grad()
    def compute_grams(self) -> tuple[Tensor, Tensor]:
        """``X_l = A_l^T A_l`` and ``Y_l = B_l^T B_l`` for every layer, ``(L, r, r)`` each
        (views of the group's buffer, overwritten at the next call)."""
        for c in self.classes:
            c.gram(self.grams[0] if c.side == "A" else self.grams[1], self.work)
        return self.grams[0], self.grams[1]

    @torch.no_grad()
    def right_multiply_grads(self, right_A: Tensor, right_B: Tensor, write_back: str = "copy",
                             sums: list | None = None) -> None:
        """``grad_A <- grad_A right_A[l]`` and ``grad_B <- grad_B right_B[l]`` for every layer.

        ``right_*``: ``(L, r, r)`` in the compute dtype. ``write_back="copy"`` writes the
        products into the existing ``.grad`` tensors (in the parameter dtype); ``"rebind"``
        sets ``param.grad`` to the new product instead (gradients that are views, e.g. DDP
        bucket views, are still copied into). Missing gradients are skipped. When ``sums``
        is a list, the sum of every product is appended (a cheap finiteness witness: NaN/Inf
        in a gradient makes its product's sum non-finite).
        """
        for c in self.classes:
            R = right_A if c.side == "A" else right_B
            grads = [p.grad for p in c.params]
            if any(g is None for g in grads):
                self._multiply_present(c, grads, R, write_back, sums)
                continue
            rebind = None
            if write_back == "rebind" and not any(g._base is not None for g in grads):
                rebind = c.params
            c.right_multiply(grads, R, self.work, sums, rebind)

    def _multiply_present(self, c: FactorClass, grads, R: Tensor, write_back: str,
                          sums: list | None) -> None:
        """The rare step where some layers of a class have no gradient: looped, per layer."""
        for pos, g, param in zip(c.positions, grads, c.params):
            if g is not None:
                target = param if write_back == "rebind" else None
                self.work.multiply_one(g, R[pos], c.left, sums, target)

    @torch.no_grad()
    def right_multiply_factors(self, right_A: Tensor, right_B: Tensor) -> None:
        """``A <- A right_A[l]``, ``B <- B right_B[l]`` (weights, in place, parameter dtype)."""
        for c in self.classes:
            c.right_multiply(c.params, right_A if c.side == "A" else right_B, self.work, None, None)


def make_groups(pairs: list[LoraPair], strategy: str = "auto") -> list[PairGroup]:
    """One :class:`PairGroup` per (rank, dtype, device) of ``pairs`` (see its ``strategy``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return [PairGroup(g, strategy) for g in group_pairs(pairs).values()]


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
    the F10 mask of :func:`geometric_mean_and_inverse_batched` instead).
    """
    bad = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for G in (X, Y):
        L, info = torch.linalg.cholesky_ex(theory.symmetrize(G))
        diag = L.diagonal(dim1=-2, dim2=-1).abs().square()
        bad |= (info != 0) | (diag.amin(-1) <= rel_tol * diag.amax(-1)) | (diag.amax(-1) <= 0)
        bad |= ~torch.isfinite(diag).all(-1)
    return bad


def _factor(G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``X = L L^T`` and the eigenpairs of ``C = L^T Y L`` for ``G = (X, Y)`` (2, L, r, r)."""
    L, info = torch.linalg.cholesky_ex(G[0])
    evals, evecs = torch.linalg.eigh(theory.symmetrize(L.mT @ G[1] @ L))
    return L, info, evals, evecs


def geometric_mean_and_inverse_batched(X: Tensor, Y: Tensor, damping: float,
                                       singular_rtol: float, *, sync_free: bool = True
                                       ) -> tuple[Tensor, Tensor, Tensor]:
    r"""``S = X^{-1} # Y``, ``S^{-1}`` and the F10 mask of a batch of Grams (F3, F10).

    The maths of :func:`~reflora_analysis.theory.geometric_mean_and_inverse` (``X = L L^T``,
    ``L^T Y L = E diag(lam) E^T``, ``q = lam^{1/4}``, ``S = M M^T`` with
    ``M = L^{-T} E diag(q)``, ``S^{-1} = N N^T`` with ``N = L E diag(q)^{-1}``; the F10
    extra damping ``sqrt(eps) (tr X + tr Y) / (2r)`` where the test on ``L`` and the
    eigenvalues of ``C`` says "singular"), with the same values, in one of two forms:

    - ``sync_free=True`` (accelerators): branch-free. A first pass computes the F10 mask
      from ``eigvalsh`` alone (~0.4x an ``eigh``), the extra damping is added on the device
      times the mask (zero elsewhere, so those Grams are unchanged bit for bit) and one
      Cholesky + ``eigh`` gives the results: no host read.
    - ``sync_free=False`` (CPU, where reading a value costs no synchronisation): one
      Cholesky + ``eigh``, one host read of the mask, and a second factorization only on
      steps where some Gram is singular (theory's own order), which saves the ``eigvalsh``.

    Unlike theory (which raises, after a host read) non-finite Grams are not checked: they
    are flagged in the mask and give non-finite results (the gradient guard names them).

    ``X, Y``: ``(L, r, r)`` float64. Returns ``S, S_inv`` ``(L, r, r)`` and ``singular``
    ``(L,)`` bool.
    """
    r = X.shape[-1]
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    G = theory.symmetrize(torch.stack((X, Y)))  # both Grams in one (2, L, r, r) tensor
    trace = gram_trace(G)
    if damping > 0:  # theory.relative_damping, on both Grams at once
        G = G + (damping * (trace[0] + trace[1]) / (2 * r))[:, None, None] * eye
        trace = gram_trace(G)
    if sync_free:
        L1, info = torch.linalg.cholesky_ex(G[0])
        evals = torch.linalg.eigvalsh(theory.symmetrize(L1.mT @ G[1] @ L1))
    else:
        L, info, evals, evecs = _factor(G)
    bad = theory._numerically_singular(L1 if sync_free else L, info, evals, singular_rtol)
    if sync_free or bool(bad.any()):
        scale = 1.0 * (trace[0] + trace[1]) / (2 * r)
        eps = torch.finfo(X.dtype).eps ** 0.5
        floor = torch.where(scale > 0, scale, torch.ones_like(scale)) * eps
        L, _, evals, evecs = _factor(G + (floor * bad)[:, None, None] * eye)
    q = evals.clamp_min(torch.finfo(evals.dtype).tiny).pow(0.25).unsqueeze(-2)
    M = torch.linalg.solve_triangular(L.mT, evecs * q, upper=True)  # L^{-T} E lam^{1/4}
    N = (L @ evecs) / q  # L E lam^{-1/4}
    return theory.symmetrize(M @ M.mT), theory.symmetrize(N @ N.mT), bad
