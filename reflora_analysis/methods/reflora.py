r"""RefLoRA: the optimally refactored step, as a pre-step transform (``THEORY.md`` F1, F3, F6).

Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of
Large Models", NeurIPS 2025 (arXiv 2505.18877).

One gradient step on the refactored pair ``(A P, B P^{-T})``, mapped back, is the
preconditioned step (F1, ``S = P P^T``)

    A+ = A - eta grad_A S^{-1},      B+ = B - eta grad_B S,

and the optimal refactoring is ``S* = (A^T A)^{-1} # (B^T B)``, the matrix geometric mean (F3).
With SGD the weight update then depends on ``M = A B^T`` alone (exact GL(r) invariance, F6).

- :func:`reflora_precondition`: the pure kernel, ``(grad_A S*^{-1}, grad_B S*)`` for one pair
  or a batch of pairs (paper orientation; no hooks, no optimizer);
- :func:`reflora_preconditioners`: ``S*``, ``S*^{-1}`` and the F10 mask from the Grams (the
  ``r x r`` step shared by the kernel and the transform);
- :class:`RefLoRATransform`: the same maths as a step pre-hook on any optimizer, batched over
  the layers of a model (:class:`~.gram.PairGroup`);
- :func:`reference_preconditioners` / :func:`reference_pre_step`: the reference code's
  per-layer algorithm (two eigendecompositions per layer), the baseline of tests and
  benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import theory
from ..pairs import find_lora_pairs
from .gram import PairGroup, geometric_mean_and_inverse_batched, gram_trace, singular_tol
from .refactoring import Refactorer
from .transform import check_finite_grads

__all__ = ["RefLoRATransform", "reflora_precondition", "reflora_preconditioners",
           "reference_preconditioners", "reference_pre_step"]


def reflora_preconditioners(X: Tensor, Y: Tensor, *, damping: float = 0.0,
                            singular_rtol: float | None = None,
                            warn: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    r"""``S* = X^{-1} # Y``, ``S*^{-1}`` and the F10 mask, in float64 (F3, F10).

    Parameters
    ----------
    X, Y : (..., r, r)
        The Grams ``A^T A`` and ``B^T B`` (any floating dtype; cast to float64, where the
        ``r x r`` factorization is cheap and round-off does not depend on the parameters').
    damping : float
        Relative damping ``X + d I``, ``Y + d I`` with ``d = damping (tr X + tr Y) / (2r)``.
    singular_rtol : float, optional
        Relative eigenvalue floor of the F10 fallback (:func:`~.gram.singular_tol`).
    warn : bool
        Let :func:`~reflora_analysis.theory.geometric_mean_and_inverse` warn about degenerate
        Grams (the transform passes ``False`` and warns once itself, naming the layers).

    Returns
    -------
    S, S_inv : (..., r, r) float64, from one Cholesky + ``eigh``
        (:func:`~reflora_analysis.theory.geometric_mean_and_inverse`), ``S X S = Y``.
    singular : (...,) bool, the elements that needed extra damping.
    """
    return theory.geometric_mean_and_inverse(X.to(torch.float64), Y.to(torch.float64),
                                             damping=damping, singular_rtol=singular_rtol,
                                             warn=warn)


def reflora_precondition(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, *,
                         damping: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""RefLoRA's gradients ``(grad_A S*^{-1}, grad_B S*)``, ``S* = (A^T A)^{-1} # (B^T B)``.

    The pure form of :class:`RefLoRATransform` (F1 with the optimal ``S*`` of F3): an SGD
    step on the returned gradients is the step on the optimally refactored pair, and its
    weight update ``dW(S*)`` depends on ``A B^T`` only (F6).

    Parameters
    ----------
    A, grad_A : (..., m, r)
    B, grad_B : (..., n, r)
        Paper orientation (PEFT: ``A = lora_B.weight``, ``B = lora_A.weight.T``); leading
        dimensions are a batch of layers.
    damping : float
        As in :func:`reflora_preconditioners`; 0 keeps the step exactly invariant.

    Returns
    -------
    grad_A', grad_B' : the shapes and dtypes of ``grad_A``, ``grad_B``; computed in
        ``promote_types(dtype, float32)`` with ``S*`` in float64.

    Examples
    --------
    >>> A, B, G = torch.randn(6, 2), torch.randn(5, 2), torch.randn(6, 5)
    >>> gA, gB = reflora_precondition(A, B, G @ B, G.T @ A)
    """
    cd = torch.promote_types(A.dtype, torch.float32)
    A, B = A.to(cd), B.to(cd)
    S, S_inv, _ = reflora_preconditioners(A.mT @ A, B.mT @ B, damping=damping,
                                          singular_rtol=singular_tol(damping, A.shape[-1], cd))
    return ((grad_A.to(cd) @ S_inv.to(cd)).to(grad_A.dtype),
            (grad_B.to(cd) @ S.to(cd)).to(grad_B.dtype))


class RefLoRATransform(Refactorer):
    r"""RefLoRA as a step pre-hook: ``grad_A <- grad_A S*^{-1}``, ``grad_B <- grad_B S*``.

    ``S* = (A^T A)^{-1} # (B^T B)`` is computed from the current weights before every active
    step (F1, F3; :func:`reflora_precondition` is the same maths on tensors). With SGD this is
    exactly the step on the optimally refactored pair (GL(r) invariant, F6); with
    Adam/AdamW the preconditioned gradients feed unchanged Adam (as the reference code does;
    not invariant, THEORY.md section 7). Weights and optimizer state are untouched.

    Parameters: see :class:`~.refactoring.Refactorer` (``method`` is ``"reflora"``).

    On active steps the finite-gradient check is fused into the gradient products (the sum of
    each product is a finiteness witness), so it costs no extra pass over the gradients;
    when it fires, gradients may already be preconditioned: zero them and skip the batch.

    Notes
    -----
    ``S*`` and ``S*^{-1}`` come from one batched Cholesky + ``eigh`` per group
    (:func:`~.gram.geometric_mean_and_inverse_batched`; same values as
    :func:`reflora_preconditioners`); on accelerators an ``eigvalsh`` pass first decides the
    F10 damping on the device, so the method reads nothing on the host (on a CPU, where a
    read synchronises nothing, it reads the F10 mask instead of paying that pass). The
    degenerate-Gram mask is accumulated on the device and read at the first active step,
    every :data:`~.refactoring.DEGENERATE_CHECK_EVERY` steps and in :meth:`state_dict`,
    until the warning has been given; the finite-gradient guard (``check_finite=True``,
    the default) costs one host read per step. (On CUDA ``torch.linalg.eigh`` and
    ``eigvalsh`` check their LAPACK status on the host internally; torch has no ``_ex``
    form of them.)

    Cost per step: two Grams and two gradient products per layer, ``4 (m + n) r^2`` flops,
    plus one batched Cholesky + ``eigh`` per group (``benchmarks/refactor_overhead.py``;
    results in ``benchmarks/RESULTS.md``). It agrees with the per-layer
    :func:`reference_preconditioners` to 1e-5 relative in float32.

    Examples
    --------
    ::

        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        RefLoRATransform(model, warmup_steps=100).attach(opt)
    """

    method = "reflora"
    phase = "pre"

    def _pre_step_checks_finite(self) -> bool:
        return True

    def preconditioners(self, group: PairGroup) -> tuple[Tensor, Tensor]:
        """``S*`` and ``S*^{-1}`` for every layer of ``group``, ``(L, r, r)``, float64.

        From :func:`~.gram.geometric_mean_and_inverse_batched` (no host read on accelerators,
        one on a CPU, where it synchronises nothing: ``group.sync_free``); its F10 mask
        (the layers that needed extra damping) is accumulated on the device for the
        one-time warning (:meth:`~.refactoring.Refactorer.check_degenerate`).
        """
        X, Y = group.compute_grams()
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        S, S_inv, singular = geometric_mean_and_inverse_batched(
            X64, Y64, self.damping, self._singular_tol(group), sync_free=group.sync_free)
        if self.damping > 0:
            # user damping makes a zero Gram (the lora_B = 0 start) regular, yet RefLoRA
            # still cannot leave that point (THEORY.md section 6): warn about it too
            singular = singular | (gram_trace(X64) <= 0) | (gram_trace(Y64) <= 0)
        self._record_degenerate(group, singular)
        return S, S_inv

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        sums: list | None = [] if self.check_finite else None
        for group in self._groups:
            S, S_inv = self.preconditioners(group)
            cd = group.compute_dtype
            group.right_multiply_grads(S_inv.to(cd), S.to(cd), self.write_back, sums)
        self._degenerate_check_due("damping keeps the result finite")
        # the finite-gradient guard (not part of the method): one host read per step
        if sums and not bool(torch.isfinite(torch.stack([x.float() for x in sums]).sum())):
            # NaN/Inf in a gradient (or a product that overflowed): name the layer
            check_finite_grads(self.pairs, self.step_count)


# --------------------------------------------------------------------------------------
# Per-layer reference (the reference code's algorithm): baseline for tests and benchmarks
# --------------------------------------------------------------------------------------


def reference_geometric_mean(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(S, S^{-1})`` with ``S = X^{-1} # Y``, by the reference code's two eigendecompositions.

    From the Grams (``(..., r, r)``), for tests; :func:`reference_preconditioners` is the
    per-layer algorithm as the reference code runs it (it needs the factor ``A``).
    """
    y, V = torch.linalg.eigh(theory.symmetrize(Y))
    sigma = y.clamp_min(0).sqrt()
    R_gram = (V * sigma.unsqueeze(-2)).mT @ X @ (V * sigma.unsqueeze(-2))
    return _reference_from_eigh(sigma, V, R_gram)


def _reference_from_eigh(sigma: Tensor, V: Tensor, R_gram: Tensor) -> tuple[Tensor, Tensor]:
    # Y = V diag(sigma^2) V^T and R^T R = diag(sigma) V^T X V diag(sigma) = W diag(mu^2) W^T
    # give S^{-1} = V diag(1/sigma) W diag(mu) W^T diag(1/sigma) V^T (the SPD T with
    # T Y T = X) and S = V diag(sigma) W diag(1/mu) W^T diag(sigma) V^T. The reference code
    # adds eps = finfo(dtype).eps to sigma and mu before dividing; so do we.
    eps = torch.finfo(sigma.dtype).eps
    mu_sq, W = torch.linalg.eigh(theory.symmetrize(R_gram))
    mu = mu_sq.clamp_min(0).sqrt()
    left_inv = (V / (sigma + eps).unsqueeze(-2)) @ W
    S_inv = (left_inv * mu.unsqueeze(-2)) @ left_inv.mT
    left = (V * sigma.unsqueeze(-2)) @ W
    S = (left / (mu + eps).unsqueeze(-2)) @ left.mT
    return S, S_inv


def reference_preconditioners(pairs) -> list[tuple[Tensor, Tensor]]:
    r"""``(S*, S*^{-1})`` per layer: the reference code's algorithm, a Python loop.

    Per layer, in ``promote_types(dtype, float32)``: the eigendecomposition
    ``B^T B = V diag(sigma^2) V^T`` (PEFT: ``lora_A lora_A^T``); ``R = A V diag(sigma)``
    (an extra ``m x r`` product); the eigendecomposition ``R^T R = W diag(mu^2) W^T``; then

        S*^{-1} = V diag(1/sigma) W diag(mu) W^T diag(1/sigma) V^T,
        S*      = V diag(sigma) W diag(1/mu) W^T diag(sigma) V^T,

    which is ``X^{-1} # Y`` with ``X = A^T A``, ``Y = B^T B`` (F3). Two eigendecompositions
    and three ``O(k r^2)`` products per layer (``B^T B``, ``R``, ``R^T R``), against the
    batched engine's two Grams and one batched Cholesky + eigh per group. The batched
    :class:`RefLoRATransform` must agree with this to 1e-5 relative in float32.
    """
    out = []
    for pair in find_lora_pairs(pairs):
        cd = torch.promote_types(pair.A.dtype, torch.float32)
        A, B = pair.A.to(cd), pair.B.to(cd)
        y, V = torch.linalg.eigh(B.mT @ B)
        sigma = y.clamp_min(0).sqrt()
        R = A @ (V * sigma)
        out.append(_reference_from_eigh(sigma, V, R.mT @ R))
    return out


def reference_pre_step(pairs) -> None:
    """The reference RefLoRA pre-step hook: per layer ``grad_A S^{-1}``, ``grad_B S``.

    Like the reference code it rebinds ``.grad`` to the new products (no ``copy_``).
    """
    pairs = find_lora_pairs(pairs)
    for pair, (S, S_inv) in zip(pairs, reference_preconditioners(pairs)):
        if pair.a.grad is not None:
            pair.a.grad = (pair.a.grad.to(S.dtype) @ S_inv).to(pair.a.dtype)
        if pair.b.grad is not None:
            g = pair.b.grad.to(S.dtype)
            new = S @ g if pair.b_transposed else g @ S  # stored B^T: (grad_B S)^T = S grad_B^T
            pair.b.grad = new.to(pair.b.dtype)
