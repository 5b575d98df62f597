r"""The balanced projection, as a post-step transform (``THEORY.md`` F4, F5, section 7).

The balanced projection by the matrix geometric mean. This is **not** BaLoRA (Castin, Nadjahi,
Ablin, Peyre, ICML 2026, arXiv 2605.31484): BaLoRA's SVD split ``(U S^{1/2}, V S^{1/2})`` of
``A B^T = U S V^T`` (method ``balora``, :mod:`.balora`) and the factors here differ by an
``r x r`` rotation. Both are balanced with the same product, so under SGD the weight
trajectories are identical (RefLoRA's); under AdamW the elementwise moments see the rotated
coordinates and the two are different algorithms (``tests/test_balora.py``).

After each step the pair is replaced by the balanced factorization of the same product:

    (A, B) <- (A P, B P^{-T}) = (A P, B P^{-1}),      P = S*^{1/2} (SPD),

with ``S* = (A^T A)^{-1} # (B^T B)`` (F3): then ``(AP)^T (AP) = (B P^{-1})^T (B P^{-1})`` (F4)
and ``||AP||_F^2 + ||B P^{-1}||_F^2 = 2 ||A B^T||_*``, the least over all refactorings (F5).
At a balanced point ``S* = I``, so with SGD the weight trajectory equals RefLoRA's.

- :func:`balanced_projection`: the pure kernel on one pair or a batch of pairs;
- :func:`balancing_maps`: ``P``, ``P^{-1}`` and the singular-layer mask from the Grams
  (shared by the kernel and the transform);
- :class:`BalanceTransform`: the transform on any optimizer, batched over the layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import theory
from .gram import PairGroup, singular_grams, singular_tol
from .refactoring import WeightRefactorer

__all__ = ["BalanceTransform", "balanced_projection", "balancing_maps"]


def balancing_maps(X: Tensor, Y: Tensor, *, singular_rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``P = S*^{1/2}``, ``P^{-1}`` and the singular mask, per layer (F3, F4, F10).

    ``S* = X^{-1} # Y`` (:func:`~reflora_analysis.theory.geometric_mean`, undamped) and
    ``S* = E diag(s) E^T`` (``eigh``) give ``P = E diag(s^{1/2}) E^T``, ``P^{-1} =
    E diag(s^{-1/2}) E^T``. The balanced factors ``(A P, B P^{-1})`` differ from BaLoRA's
    thin SVD split ``U S^{1/2}, V S^{1/2}`` by a rotation (same balanced product); ``P`` is
    continuous in (A, B), so no sign/order flips of singular vectors between steps.

    Parameters
    ----------
    X, Y : (L, r, r)
        The Grams ``A^T A``, ``B^T B`` (cast to float64).
    singular_rtol : float
        F10 threshold of :func:`~.gram.singular_grams`.

    Returns
    -------
    P, P_inv : (L, r, r) float64, symmetric; the identity where ``singular``.
    singular : (L,) bool, the layers whose Grams are (near) singular: projecting them would
        kill the other factor, so they are left as they are.
    """
    X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
    bad = singular_grams(X64, Y64, singular_rtol)
    with warnings.catch_warnings():
        # no damping: it would leave A^T A - B^T B ~ damping; singular layers (the only
        # ones that need it) are not projected at all
        warnings.simplefilter("ignore", theory.DegenerateGramWarning)
        S = theory.geometric_mean(X64, Y64)
    evals, evecs = torch.linalg.eigh(S)
    root = evals.clamp_min(torch.finfo(S.dtype).tiny).sqrt().unsqueeze(-2)
    P = (evecs * root) @ evecs.mT
    P_inv = (evecs / root) @ evecs.mT
    eye = torch.eye(X.shape[-1], dtype=S.dtype, device=S.device)
    keep = bad[:, None, None]
    P, P_inv = torch.where(keep, eye, P), torch.where(keep, eye, P_inv)
    return theory.symmetrize(P), theory.symmetrize(P_inv), bad


def balanced_projection(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    r"""The balanced factorization ``(A P, B P^{-1})`` of ``A B^T``, ``P = S*^{1/2}`` (F4, F5).

    The pure form of :class:`BalanceTransform`. Afterwards ``A'^T A' = B'^T B'`` and
    ``A' B'^T = A B^T``; a pair with a (near) singular Gram is returned unchanged (F10).

    Parameters
    ----------
    A : (m, r) or (L, m, r);   B : (n, r) or (L, n, r). Paper orientation.

    Returns
    -------
    A', B' : same shapes and dtypes; computed in ``promote_types(dtype, float32)`` with the
        ``r x r`` maps in float64.

    Examples
    --------
    >>> A, B = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> A2, B2 = balanced_projection(A, B)
    >>> torch.allclose(A2.T @ A2, B2.T @ B2) and torch.allclose(A2 @ B2.T, A @ B.T)
    True
    """
    cd = torch.promote_types(A.dtype, torch.float32)
    a, b = A.to(cd), B.to(cd)
    batched = a.dim() == 3
    a3, b3 = (a, b) if batched else (a.unsqueeze(0), b.unsqueeze(0))
    P, P_inv, _ = balancing_maps(a3.mT @ a3, b3.mT @ b3,
                                 singular_rtol=singular_tol(0.0, a.shape[-1], cd))
    a3, b3 = a3 @ P.to(cd), b3 @ P_inv.to(cd)
    a, b = (a3, b3) if batched else (a3[0], b3[0])
    return a.to(A.dtype), b.to(B.dtype)


class BalanceTransform(WeightRefactorer):
    r"""The balanced projection as a step post-hook: ``(A, B) <- (A P, B P^{-1})``, ``P = S*^{1/2}``.

    After every active step (F4, F5; :func:`balanced_projection` is the same maths on
    tensors) ``A^T A = B^T B`` and ``A B^T`` is unchanged. As with RefLoRA-S, the first
    active step is preceded by one projection (gradients transformed with it,
    ``grad_A P^{-1}``, ``grad_B P``; :class:`~.refactoring.WeightRefactorer`), so that with
    SGD the weight trajectory equals RefLoRA's exactly (at a balanced point ``S* = I``).

    **With Adam/AdamW the moments are not transformed** (as BaLoRA): a full-matrix change of
    coordinates cannot be carried by Adam's elementwise second moments, so after a
    projection the stored moments no longer match the refactored coordinates (THEORY.md
    section 7). Layers whose Grams are singular (e.g. a zero factor at the PEFT start) are
    not projected (projecting would kill the other factor); they are named in one
    :class:`~reflora_analysis.theory.DegenerateGramWarning`.

    Parameters: see :class:`~.refactoring.Refactorer` (``method`` is ``"balance"``;
    ``damping`` only raises the singularity threshold, the projection itself is undamped).

    Cost per step: ``4 (m + n) r^2`` flops plus ``r x r`` work per layer.
    """

    method = "balance"

    def refactor_group(self, group: PairGroup, optimizer, with_grads: bool) -> None:
        X, Y = group.compute_grams()
        P, P_inv, bad = balancing_maps(X, Y, singular_rtol=self._singular_tol(group))
        if not self._warned and bool(bad.any()):
            self._warn_once(group, bad, "those layers are not projected")
        cd = group.compute_dtype
        # moments untouched: Adam's elementwise moments cannot follow a full-matrix change
        # of coordinates (THEORY.md section 7), and BaLoRA leaves them too
        group.right_multiply_factors(P.to(cd), P_inv.to(cd))
        if with_grads:
            group.right_multiply_grads(P_inv.to(cd), P.to(cd))
