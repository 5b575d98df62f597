r"""The mathematics of RefLoRA, as pure functions on torch tensors.

Notation (``THEORY.md`` section 1, paper convention): ``W = W0 + A B^T`` with
``A`` of shape ``(..., m, r)``, ``B`` of shape ``(..., n, r)``, ``M = A B^T`` and
``G = dl/dW`` of shape ``(..., m, n)``. Every function is batched over leading
dimensions and keeps the dtype it is given, so float64 inputs give float64 answers.

Nothing here knows about ``nn.Module``, optimizers or PEFT: this module is the
reference that the stateful code (:mod:`reflora_analysis.refactor`) and the tests
(``tests/test_theory.py``) are checked against.

Facts implemented (``THEORY.md``):

====  ==========================================================  ========================
F1    refactored step equals a preconditioned step                :func:`preconditioned_step`
F2    closed form of the induced weight update                    :func:`weight_update`
F3    S* = (A^T A)^{-1} # (B^T B)                                  :func:`optimal_preconditioner`,
                                                                  :func:`geometric_mean_and_inverse`
F4    balance of the refactored factors                           :func:`refactor_balanced`
F5    minimal norm ||AP||^2 + ||BP^{-T}||^2 >= 2 ||M||_*          :func:`factor_norm`
F6    consistency: A S* A^T = (M M^T)^{1/2}                       :func:`weight_update`
F7    scalar variant s* = ||B||_F / ||A||_F                       :func:`scalar_preconditioner`
F8    descent-lemma bounds U_exact <= U_relaxed                   :func:`upper_bounds`
F10   damping of degenerate Grams, never NaN/Inf                  :func:`geometric_mean`
====  ==========================================================  ========================
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "DegenerateGramWarning",
    "gram",
    "symmetrize",
    "sym_sqrt",
    "sym_inv_sqrt",
    "nuclear_norm",
    "spectral_norm",
    "relative_damping",
    "geometric_mean",
    "geometric_mean_and_inverse",
    "geometric_mean_reference",
    "optimal_preconditioner",
    "scalar_preconditioner",
    "refactor",
    "refactor_balanced",
    "factor_norm",
    "preconditioned_step",
    "weight_update",
    "balance_gap",
    "upper_bounds",
]


class DegenerateGramWarning(UserWarning):
    """A Gram matrix was (numerically) singular and extra damping was added (F10)."""


def gram(A: Tensor) -> Tensor:
    """``A^T A`` for ``A`` of shape ``(..., m, r)``; returns ``(..., r, r)``."""
    return A.mT @ A


def symmetrize(X: Tensor) -> Tensor:
    """``(X + X^T) / 2``: removes the round-off asymmetry before an ``eigh``."""
    return 0.5 * (X + X.mT)


def _eigh_psd(X: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, negative round-off clamped to 0."""
    evals, evecs = torch.linalg.eigh(symmetrize(X))
    return evals.clamp_min(0.0), evecs


def sym_sqrt(X: Tensor) -> Tensor:
    """Principal square root ``X^{1/2}`` of a symmetric PSD ``(..., r, r)`` matrix."""
    evals, evecs = _eigh_psd(X)
    return (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.mT


def sym_inv_sqrt(X: Tensor) -> Tensor:
    """``X^{-1/2}`` of a symmetric positive-definite ``(..., r, r)`` matrix."""
    evals, evecs = _eigh_psd(X)
    return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT


def nuclear_norm(X: Tensor) -> Tensor:
    """``||X||_*``, the sum of singular values, over the last two dimensions."""
    return torch.linalg.matrix_norm(X, ord="nuc")


def spectral_norm(X: Tensor) -> Tensor:
    """``||X||_2``, the largest singular value, over the last two dimensions."""
    return torch.linalg.matrix_norm(X, ord=2)


def _trace(X: Tensor) -> Tensor:
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def relative_damping(X: Tensor, Y: Tensor, damping: float) -> Tensor:
    r"""Damping scaled to the Grams: ``d = damping * (tr X + tr Y) / (2 r)``.

    Relative damping keeps the regularisation meaningful across scales 1e-8..1e8
    (THEORY.md section 6, F10). Shape ``(...,)``.
    """
    r = X.shape[-1]
    return damping * (_trace(X) + _trace(Y)) / (2 * r)


def _add_diag(X: Tensor, d: Tensor) -> Tensor:
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return X + d[..., None, None] * eye


def _cholesky_and_eigh(X: Tensor, Y: Tensor):
    """``X = L L^T`` and the eigenpairs of ``C = L^T Y L``: the whole cost of F3."""
    L, info = torch.linalg.cholesky_ex(X)
    evals, evecs = torch.linalg.eigh(symmetrize(L.mT @ Y @ L))
    return L, info, evals, evecs


def _numerically_singular(L: Tensor, info: Tensor, evals: Tensor,
                          rtol: float | None = None) -> Tensor:
    """Per batch element: X not PD, or X or C = L^T Y L condition number beyond 1/(r eps).

    cond(X) ~ (max diag L / min diag L)^2 is the cheap proxy a Cholesky gives for free.
    """
    tol = torch.finfo(L.dtype).eps * L.shape[-1] if rtol is None else rtol
    diag = L.diagonal(dim1=-2, dim2=-1).abs()
    x_bad = diag.amin(-1).square() <= tol * diag.amax(-1).square()
    c_bad = evals[..., 0] <= tol * evals[..., -1].abs()
    return (info != 0) | x_bad | c_bad | ~torch.isfinite(evals).all(-1)


def _factor_geometric_mean(X: Tensor, Y: Tensor, damping: float, singular_rtol: float | None,
                           caller: str, warn: bool):
    """Checks, damping and the one factorization behind F3, with the F10 fallback.

    Returns ``(L, evals, evecs, singular)``: ``X' = L L^T`` and ``L^T Y' L = E diag(evals) E^T``
    for the (damped) Grams ``X', Y'``, and the ``(...,)`` bool mask of the batch elements that
    needed the F10 extra damping. Shared by :func:`geometric_mean` and
    :func:`geometric_mean_and_inverse`, so both refuse the same inputs and damp alike.
    """
    _check_grams(X, Y, caller)
    if not (isinstance(damping, (int, float)) and damping >= 0 and damping < float("inf")):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    # NaN/Inf anywhere make the sum non-finite: one cheap reduction decides the common case;
    # only a non-finite sum (possibly an overflow of finite entries) is inspected exactly
    if not math.isfinite(float(X.sum() + Y.sum())) and \
            not bool((torch.isfinite(X).all() & torch.isfinite(Y).all()).item()):
        raise ValueError(f"{caller}: the Gram matrices hold NaN or Inf (the LoRA factors "
                         "are non-finite, e.g. after a diverged step)")
    X, Y = symmetrize(X), symmetrize(Y)
    if damping > 0:
        d = relative_damping(X, Y, damping)
        X, Y = _add_diag(X, d), _add_diag(Y, d)
    L, info, evals, evecs = _cholesky_and_eigh(X, Y)
    bad = _numerically_singular(L, info, evals, singular_rtol)
    if bool(bad.any()):
        if warn:
            warnings.warn(
                "singular or near-singular LoRA Gram matrix (e.g. the B = 0 start); extra "
                "damping added (THEORY.md F10). Consider warm-up steps or a balanced "
                "initialisation.",
                DegenerateGramWarning,
                stacklevel=3,
            )
        eps = torch.finfo(X.dtype).eps ** 0.5
        scale = relative_damping(X, Y, 1.0)
        floor = torch.where(scale > 0, scale, torch.ones_like(scale)) * eps
        extra = torch.where(bad, floor, torch.zeros_like(floor))
        X, Y = _add_diag(X, extra), _add_diag(Y, extra)
        L, info, evals, evecs = _cholesky_and_eigh(X, Y)
    return L, evals, evecs, bad


def geometric_mean(X: Tensor, Y: Tensor, damping: float = 0.0,
                   singular_rtol: float | None = None) -> Tensor:
    r"""The matrix geometric mean ``S = X^{-1} # Y``: the SPD solution of ``S X S = Y`` (F3).

    With the Cholesky factor ``X = L L^T`` and ``C = L^T Y L``,

        S = L^{-T} C^{1/2} L^{-1},

    one Cholesky and one ``r x r`` symmetric eigendecomposition (the reference code
    uses two eigendecompositions: :func:`geometric_mean_reference`). When ``S^{-1}`` is
    needed too, :func:`geometric_mean_and_inverse` gives both from the same factorization.

    Parameters
    ----------
    X, Y : (..., r, r) symmetric positive (semi-)definite.
    damping : float
        Relative damping (:func:`relative_damping`): ``X + d I`` and ``Y + d I``.
    singular_rtol : float, optional
        Condition threshold: ``X`` or ``C`` counts as singular when its smallest eigenvalue
        is below ``singular_rtol`` times its largest (default ``r * eps`` of the dtype; pass
        the precision the Grams were accumulated in when they were upcast).

    Returns
    -------
    S : (..., r, r) symmetric positive definite.

    Notes
    -----
    F10: where ``X`` is not numerically positive definite even after ``damping``, a
    damping of ``sqrt(eps) * (tr X + tr Y) / (2r)`` (or ``sqrt(eps)`` when both Grams
    vanish) is added to both Grams for that batch element and a
    :class:`DegenerateGramWarning` is issued, so the result is always finite.
    """
    L, evals, evecs, _ = _factor_geometric_mean(X, Y, damping, singular_rtol,
                                                "geometric_mean", warn=True)
    C_half = (evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)) @ evecs.mT
    # S = L^{-T} C^{1/2} L^{-1}: two triangular solves instead of an explicit inverse.
    Z = torch.linalg.solve_triangular(L.mT, C_half, upper=True)  # L^{-T} C^{1/2}
    S = torch.linalg.solve_triangular(L.mT, Z.mT, upper=True).mT  # (L^{-T} Z^T)^T = Z L^{-1}
    return symmetrize(S)


def geometric_mean_and_inverse(X: Tensor, Y: Tensor, damping: float = 0.0,
                               singular_rtol: float | None = None,
                               warn: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    r"""``S = X^{-1} # Y``, its inverse ``S^{-1} = Y^{-1} # X`` and the F10 mask, from one
    factorization (F3).

    With ``X = L L^T`` (Cholesky) and ``L^T Y L = E diag(lam) E^T`` (symmetric eigh),
    ``q = lam^{1/4}``,

        M = L^{-T} E diag(q),      N = L E diag(q)^{-1},
        S = M M^T = L^{-T} (L^T Y L)^{1/2} L^{-1},
        S^{-1} = N N^T = L (L^T Y L)^{-1/2} L^T,

    so ``M^T N = I`` and ``S S^{-1} = I`` by construction: one Cholesky, one ``eigh``, one
    triangular solve and three ``r x r`` products, against :func:`geometric_mean` followed by
    an explicit inverse. Both results are symmetric positive definite (Gram forms).

    Parameters
    ----------
    X, Y : (..., r, r) symmetric positive (semi-)definite, float32 or float64.
    damping, singular_rtol : float
        As in :func:`geometric_mean` (the same checks, errors and damping).
    warn : bool
        Issue the :class:`DegenerateGramWarning` of the F10 fallback. Callers that report
        degenerate elements themselves (with names, once) pass ``False`` and read the mask.

    Returns
    -------
    S, S_inv : (..., r, r)
        ``S X S = Y`` and ``S_inv Y S_inv = X`` (to round-off, on the damped Grams).
    singular : (...,) bool
        Batch elements that were numerically singular (``X`` not positive definite, or
        ``X`` or ``L^T Y L`` with condition beyond ``1 / singular_rtol``) after ``damping``
        and therefore got the F10 extra damping.

    Notes
    -----
    F10: the fallback is :func:`geometric_mean`'s (``sqrt(eps) (tr X + tr Y) / (2r)`` added
    where singular), so ``S`` equals :func:`geometric_mean`'s result up to round-off, and
    every output is finite. Eigenvalues below the dtype's ``tiny`` are clamped to it before
    the fourth root.
    """
    L, evals, evecs, bad = _factor_geometric_mean(X, Y, damping, singular_rtol,
                                                  "geometric_mean_and_inverse", warn)
    q = evals.clamp_min(torch.finfo(evals.dtype).tiny).pow(0.25).unsqueeze(-2)
    M = torch.linalg.solve_triangular(L.mT, evecs * q, upper=True)  # L^{-T} E lam^{1/4}
    N = (L @ evecs) / q  # L E lam^{-1/4}
    # Gram forms are symmetric in exact arithmetic; symmetrize drops the GEMM round-off
    return symmetrize(M @ M.mT), symmetrize(N @ N.mT), bad


def geometric_mean_reference(X: Tensor, Y: Tensor) -> Tensor:
    r"""``X^{-1} # Y`` with two eigendecompositions, following the reference code (F3).

        S = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}.

    Slower than :func:`geometric_mean` and kept as its independent check.
    """
    _check_grams(X, Y, "geometric_mean_reference")
    X_half = sym_sqrt(X)
    X_inv_half = sym_inv_sqrt(X)
    return symmetrize(X_inv_half @ sym_sqrt(X_half @ Y @ X_half) @ X_inv_half)


def optimal_preconditioner(A: Tensor, B: Tensor, damping: float = 0.0) -> Tensor:
    r"""``S* = (A^T A)^{-1} # (B^T B)``, the refactoring that minimises the bound (F3, F5, F8).

    ``A``: (..., m, r), ``B``: (..., n, r); returns (..., r, r), SPD. With ``P P^T = S*``
    the refactored factors ``(A P, B P^{-T})`` are balanced (F4).
    """
    _check_factors(A, B)
    _check_linalg_dtype(A, "A and B")
    return geometric_mean(gram(A), gram(B), damping=damping)


def scalar_preconditioner(A: Tensor, B: Tensor) -> Tensor:
    r"""RefLoRA-S: ``s* = ||B||_F / ||A||_F``, the minimiser of ``s ||A||^2 + ||B||^2 / s`` (F7).

    Returns shape ``(...,)``. Where ``A = 0`` no rescaling can help (the product is 0 and
    the ratio undefined): ``s = 1`` there, never Inf or NaN (F10).
    """
    _check_factors(A, B)
    norm_a = torch.linalg.matrix_norm(A)
    norm_b = torch.linalg.matrix_norm(B)
    ok = (norm_a > 0) & (norm_b > 0)
    return torch.where(ok, norm_b / torch.where(ok, norm_a, torch.ones_like(norm_a)),
                       torch.ones_like(norm_a))


def refactor(A: Tensor, B: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    r"""The equivalent factorization ``(A P, B P^{-T})`` of the same product ``A B^T``."""
    _check_factors(A, B)
    _check_square(P, A, "P")
    _check_linalg_dtype(A, "A, B and P")
    return A @ P, torch.linalg.solve(P, B.mT).mT


def refactor_balanced(A: Tensor, B: Tensor, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""The balanced factorization ``(A P, B P^{-T})`` with ``P = S*^{1/2}`` (F4, F5).

    ``(AP)^T (AP) = (B P^{-T})^T (B P^{-T})`` and ``||AP||_F^2 + ||BP^{-T}||_F^2 = 2 ||A B^T||_*``.
    ``A``: (..., m, r), ``B``: (..., n, r). Requires full column rank (else damping, F10).
    """
    S = optimal_preconditioner(A, B, damping=damping)
    evals, evecs = _eigh_psd(S)
    root = evals.sqrt().unsqueeze(-2)
    P = (evecs * root) @ evecs.mT
    P_inv_T = (evecs / root) @ evecs.mT  # P is symmetric, so P^{-T} = P^{-1}
    return A @ P, B @ P_inv_T


def factor_norm(A: Tensor, B: Tensor) -> Tensor:
    r"""``T = ||A||_F^2 + ||B||_F^2``; over refactorings, ``T(S) = tr(S A^T A) + tr(S^{-1} B^T B)``.

    F5: ``T >= 2 ||A B^T||_*`` with equality exactly at the balanced factorization.
    """
    return A.square().sum((-2, -1)) + B.square().sum((-2, -1))


def _spd_solve_right(X: Tensor, S: Tensor) -> Tensor:
    """``X S^{-1}`` for SPD ``S`` (``S`` symmetric, so ``X S^{-1} = (S^{-1} X^T)^T``)."""
    return torch.linalg.solve(S, X.mT).mT


def preconditioned_step(
    A: Tensor, B: Tensor, G: Tensor, eta: float, S: Tensor
) -> tuple[Tensor, Tensor]:
    r"""One gradient step on the refactored pair, mapped back (F1).

        A+ = A - eta grad_A S^{-1},   B+ = B - eta grad_B S,
        grad_A = G B,  grad_B = G^T A.

    ``S`` (..., r, r) SPD; ``S = I`` is plain LoRA.
    """
    _check_factors(A, B, G)
    _check_square(S, A, "S")
    _check_linalg_dtype(A, "A, B, G and S")
    grad_A = G @ B
    grad_B = G.mT @ A
    return A - eta * _spd_solve_right(grad_A, S), B - eta * grad_B @ S


def weight_update(A: Tensor, B: Tensor, G: Tensor, eta: float, S: Tensor) -> Tensor:
    r"""The weight update induced by the preconditioner ``S`` (F2):

        dW(S) = -eta (A S A^T G + G B S^{-1} B^T) + eta^2 G B A^T G.

    Equals ``A+ B+^T - A B^T`` of :func:`preconditioned_step`. At ``S = S*`` it depends on
    ``M = A B^T`` alone (F6). Shapes: A (..., m, r), B (..., n, r), G (..., m, n).
    """
    _check_factors(A, B, G)
    _check_square(S, A, "S")
    _check_linalg_dtype(A, "A, B, G and S")
    first = A @ S @ (A.mT @ G) + (G @ B) @ _spd_solve_right(B, S).mT
    second = (G @ B) @ (A.mT @ G)
    return -eta * first + eta**2 * second


def balance_gap(A: Tensor, B: Tensor) -> Tensor:
    r"""``||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)``: 0 when balanced (F4), at most 1.

    Returns 0 for ``A = B = 0``. Shape ``(...,)``.
    """
    _check_factors(A, B)
    X, Y = gram(A), gram(B)
    num = torch.linalg.matrix_norm(X - Y)
    den = torch.linalg.matrix_norm(X) + torch.linalg.matrix_norm(Y)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def upper_bounds(
    A: Tensor, B: Tensor, G: Tensor, loss: Tensor | float, eta: float, L: float, S: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The descent-lemma bound and its S-relaxation at one iterate (F8a, F8b).

        U_exact(S) = l + <G, dW(S)> + (L/2) ||dW(S)||_F^2
        U(S)       = l - 2 eta ||G^T M G^T||_* + eta^2 <G, G M^T G>
                     + (L/2) (eta ||G||_F T(S) + eta^2 ||G||_F^2 ||M||_2)^2,
        T(S)       = tr(S A^T A) + tr(S^{-1} B^T B).

    For an ``L``-smooth loss, ``l(W + dW(S)) <= U_exact(S) <= U(S)`` and ``U(S*) <= U(S)``.
    Returns ``(U_exact, U_relaxed)``, each of shape ``(...,)``.

    No ``m x n`` SVD: ``M = A B^T`` and ``G^T M G^T = (G^T A)(G B)^T`` have rank <= r, so
    their norms come from at most ``r x r`` cores (:func:`_low_rank_norms`), and
    ``<G, G M^T G> = <G (G^T A), G B>`` is a sum over ``m x r`` entries: O(m n r + (m + n) r^2).
    """
    _check_factors(A, B, G)
    _check_square(S, A, "S")
    _check_linalg_dtype(A, "A, B, G and S")
    dW = weight_update(A, B, G, eta, S)
    U_exact = loss + (G * dW).sum((-2, -1)) + 0.5 * L * dW.square().sum((-2, -1))
    GtA, GB = G.mT @ A, G @ B  # G^T M G^T = GtA GB^T (n x m) and G M^T G = GB GtA^T (m x n)
    nuc_GMG, _ = _low_rank_norms(GtA, GB)
    _, M_2 = _low_rank_norms(A, B)
    T = _trace(S @ gram(A)) + _trace(_spd_solve_right(gram(B), S))
    g_norm = torch.linalg.matrix_norm(G)
    first_order = -2 * eta * nuc_GMG
    second_order = eta**2 * ((G @ GtA) * GB).sum((-2, -1))  # <G, GB GtA^T> = <G GtA, GB>
    curvature = 0.5 * L * (eta * g_norm * T + eta**2 * g_norm**2 * M_2) ** 2
    return U_exact, loss + first_order + second_order + curvature


def _low_rank_norms(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(||X Y^T||_*, ||X Y^T||_2)`` for ``X`` (..., p, r), ``Y`` (..., q, r), without forming
    the ``p x q`` product: with thin QRs ``X = Q_X R_X``, ``Y = Q_Y R_Y`` (orthonormal columns),
    ``X Y^T = Q_X (R_X R_Y^T) Q_Y^T`` has the singular values of the core ``R_X R_Y^T``
    (``min(p, r) x min(q, r)``). Rank-deficient factors are fine (Householder QR needs no
    pivot). Each of shape ``(...,)``; both 0 for ``r = 0``."""
    core = torch.linalg.qr(X, mode="r").R @ torch.linalg.qr(Y, mode="r").R.mT
    sv = torch.linalg.svdvals(core)  # descending; empty when r = 0
    return sv.sum(-1), sv[..., :1].sum(-1)


def _check_factors(A: Tensor, B: Tensor, G: Tensor | None = None) -> None:
    """Shape and dtype checks with messages that name the problem (never a deep matmul error)."""
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"A and B must be matrices (..., m, r) and (..., n, r); got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"A (m x r) and B (n x r) must share the rank r; got A "
                         f"{tuple(A.shape)} and B {tuple(B.shape)}")
    if G is not None and G.shape[-2:] != (A.shape[-2], B.shape[-2]):
        raise ValueError(f"G must be m x n = {A.shape[-2]} x {B.shape[-2]} to match A "
                         f"{tuple(A.shape)} and B {tuple(B.shape)}; got {tuple(G.shape)}")
    if A.dtype != B.dtype or (G is not None and G.dtype != A.dtype):
        got = f"A {A.dtype}, B {B.dtype}" + ("" if G is None else f", G {G.dtype}")
        raise TypeError(f"A, B and G must share one dtype; got {got}")


def _check_square(S: Tensor, A: Tensor, name: str) -> None:
    """``S`` (or ``P``) must be ``(..., r, r)`` for the rank ``r`` of ``A``, in its dtype."""
    r = A.shape[-1]
    if S.dim() < 2 or S.shape[-2:] != (r, r):
        raise ValueError(f"{name} must be r x r = {r} x {r} to match the rank of A and B; "
                         f"got {tuple(S.shape)}")
    if S.dtype != A.dtype:
        raise TypeError(f"{name} must have the dtype of A and B ({A.dtype}); got {S.dtype}")


def _check_grams(X: Tensor, Y: Tensor, caller: str) -> None:
    """Two square Grams of one shape and one float32/float64 dtype."""
    if X.dim() < 2 or X.shape != Y.shape or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{caller} needs two square Grams of the same shape, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    if X.dtype != Y.dtype:
        raise TypeError(f"{caller} needs two Grams of one dtype, got {X.dtype} and {Y.dtype}")
    _check_linalg_dtype(X, "the Grams")


def _check_linalg_dtype(X: Tensor, what: str) -> None:
    """The r x r factorizations (Cholesky, eigh, solve) need float32 or float64."""
    if X.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{what} have dtype {X.dtype}; the r x r factorizations need float32 "
                        f"or float64: promote half-precision factors first (e.g. A.float())")
