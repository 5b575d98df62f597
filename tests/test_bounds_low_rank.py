r"""``theory.upper_bounds`` computes F8b from ``r x r`` cores, with no ``m x n`` SVD.

The oracle is the previous dense formula (:func:`dense_upper_bounds`: full SVDs of
``G^T M G^T`` and ``M``, the ``m x n`` product ``G M^T G``). Hypothesis draws ``m, n`` in
1..9, ``r`` in 1..12 (so ``r >= min(m, n)`` is frequent), batch shapes, factor scales
``10^[-3, 3]``, full-rank, rank-deficient and zero ``A`` or ``B``.

Tolerance: float64, ``|new - old| <= 1e-10 * scale``, ``scale`` the size of the terms
(``|l| + 2 eta ||G||^2 ||A|| ||B|| + eta^2 ||G||^2 ||A|| ||B|| + curvature``, Frobenius
norms, a bound on each term by submultiplicativity), not of the result. Both routes are
backward-stable matrix products, QRs and SVDs, whose errors are a few dozen ``eps ~ 2e-16``
times that scale (worst seen over 2000 extra examples: 1.4e-15), so 1e-10 is 10^4 above
round-off and far below the O(1) error of a wrong term (a transposed product, a spectral
norm in place of a nuclear one). Rank deficiency costs nothing here: the errors are
absolute in the scale, not relative to the small singular values.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora_analysis import theory as th

torch.set_num_threads(1)
F64 = torch.float64
RTOL = 1e-10
FACTOR_KINDS = ("full", "A rank-deficient", "B rank-deficient", "A=0", "B=0")


def dense_upper_bounds(A, B, G, loss, eta, L, S):
    """The previous implementation of ``upper_bounds`` (m x n SVDs), kept as the oracle."""
    dW = th.weight_update(A, B, G, eta, S)
    U_exact = loss + (G * dW).sum((-2, -1)) + 0.5 * L * dW.square().sum((-2, -1))
    M = A @ B.mT
    T = th._trace(S @ th.gram(A)) + th._trace(torch.linalg.solve(S, th.gram(B).mT).mT)
    g_norm = torch.linalg.matrix_norm(G)
    first_order = -2 * eta * torch.linalg.matrix_norm(G.mT @ M @ G.mT, ord="nuc")
    second_order = eta**2 * (G * (G @ M.mT @ G)).sum((-2, -1))
    curvature = 0.5 * L * (eta * g_norm * T + eta**2 * g_norm**2
                           * torch.linalg.matrix_norm(M, ord=2)) ** 2
    return U_exact, loss + first_order + second_order + curvature


def _factor(gen, batch, rows, r, kind_rank):
    """``rows x r`` Gaussian factor of rank ``min(kind_rank, rows, r)``."""
    k = max(1, min(kind_rank, rows, r))
    return (torch.randn(batch + (rows, k), generator=gen, dtype=F64)
            @ torch.randn(batch + (k, r), generator=gen, dtype=F64))


@st.composite
def problems(draw):
    m, n, r = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 12))
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    kind = draw(st.sampled_from(FACTOR_KINDS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    full = r if kind == "full" else max(1, min(m, n, r) - 1)  # deficient when min(m, n, r) > 1
    A = _factor(gen, batch, m, r, r if kind.startswith("B") else full)
    B = _factor(gen, batch, n, r, r if kind.startswith("A") else full)
    A = A * 10.0 ** draw(st.floats(-3, 3)) * (kind != "A=0")
    B = B * 10.0 ** draw(st.floats(-3, 3)) * (kind != "B=0")
    G = torch.randn(batch + (m, n), generator=gen, dtype=F64) * 10.0 ** draw(st.floats(-2, 2))
    Q = torch.linalg.qr(torch.randn(batch + (r, r), generator=gen, dtype=F64)).Q
    evals = 10.0 ** (2 * torch.rand(batch + (r,), generator=gen, dtype=F64) - 1)
    S = th.symmetrize((Q * evals.unsqueeze(-2)) @ Q.mT)  # SPD, cond <= 100
    eta, L = 10.0 ** draw(st.floats(-4, 0)), 10.0 ** draw(st.floats(-2, 2))
    return A, B, G, float(draw(st.floats(-10, 10))), eta, L, S


def _scale(A, B, G, loss, eta, L, S):
    """Sum of the absolute sizes of the terms of both bounds (module docstring)."""
    fro = torch.linalg.matrix_norm
    g2, ab = fro(G) ** 2, fro(A) * fro(B)
    T = th._trace(S @ th.gram(A)) + th._trace(torch.linalg.solve(S, th.gram(B)))
    dW = th.weight_update(A, B, G, eta, S)
    curvature = 0.5 * L * ((eta * fro(G) * T + eta**2 * g2 * ab) ** 2 + fro(dW) ** 2)
    return abs(loss) + 2 * eta * g2 * ab + eta**2 * g2 * ab + fro(G) * fro(dW) + curvature


@settings(max_examples=150, deadline=None)
@given(problems())
def test_low_rank_bounds_equal_the_dense_formula(problem):
    new, old = th.upper_bounds(*problem), dense_upper_bounds(*problem)
    scale = _scale(*problem)
    for name, a, b in (("U_exact", new[0], old[0]), ("U_relaxed", new[1], old[1])):
        assert a.shape == b.shape == problem[0].shape[:-2], name
        assert bool(((a - b).abs() <= RTOL * scale).all()), f"{name}: {(a - b).abs().max()}"


@settings(max_examples=100, deadline=None)
@given(problems())
def test_low_rank_norms_equal_dense_norms(problem):
    """Each norm on its own, so no term can hide behind a larger one: ``||X Y^T||_*`` and
    ``||X Y^T||_2`` against full SVDs, relative to ``||X||_F ||Y||_F``."""
    A, B, G = problem[:3]
    for X, Y in ((A, B), (G.mT @ A, G @ B)):
        nuc, spec = th._low_rank_norms(X, Y)
        P = X @ Y.mT
        scale = torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(Y)
        assert bool(((nuc - torch.linalg.matrix_norm(P, ord="nuc")).abs() <= RTOL * scale).all())
        assert bool(((spec - torch.linalg.matrix_norm(P, ord=2)).abs() <= RTOL * scale).all())


def test_no_svd_larger_than_the_rank(monkeypatch):
    """The point of the rewrite: no singular values of an ``m x n`` matrix (the dense formula
    takes them, so it fails here)."""
    seen = []
    svdvals, matrix_norm = torch.linalg.svdvals, torch.linalg.matrix_norm

    def spy_svdvals(X, *args, **kwargs):
        seen.append(tuple(X.shape[-2:]))
        return svdvals(X, *args, **kwargs)

    def spy_matrix_norm(X, ord="fro", *args, **kwargs):
        if ord not in ("fro",):
            seen.append(tuple(X.shape[-2:]))
        return matrix_norm(X, ord, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svdvals", spy_svdvals)
    monkeypatch.setattr(torch.linalg, "matrix_norm", spy_matrix_norm)
    gen = torch.Generator().manual_seed(0)
    m, n, r = 40, 30, 3
    A, B = (torch.randn(k, r, generator=gen, dtype=F64) for k in (m, n))
    G = torch.randn(m, n, generator=gen, dtype=F64)
    th.upper_bounds(A, B, G, 1.0, 0.1, 1.0, torch.eye(r, dtype=F64))
    assert seen and all(max(shape) <= r for shape in seen), seen


def test_rank_zero_factors_give_zero_norms():
    """``r = 0``: ``M = 0``, so both norms are 0 (no empty-reduction error)."""
    nuc, spec = th._low_rank_norms(torch.zeros(2, 4, 0, dtype=F64), torch.zeros(2, 3, 0, dtype=F64))
    assert nuc.shape == spec.shape == (2,)
    assert bool((nuc == 0).all() and (spec == 0).all())


def test_float32_agrees_with_float64():
    """The GPU dtype: float32 within 1e-5 of the float64 result, relative to the scale
    (float32 eps 6e-8 times a few dozen flops)."""
    gen = torch.Generator().manual_seed(3)
    A, B = (torch.randn(5, k, 4, generator=gen, dtype=F64) for k in (20, 12))
    G = torch.randn(5, 20, 12, generator=gen, dtype=F64)
    S = th.gram(torch.randn(5, 6, 4, generator=gen, dtype=F64))
    args64 = (A, B, G, 0.5, 0.01, 2.0, S)
    low = th.upper_bounds(*(t.float() if torch.is_tensor(t) else t for t in args64))
    scale = _scale(*args64)
    for a, b in zip(low, th.upper_bounds(*args64)):
        assert bool(((a.double() - b).abs() <= 1e-5 * scale).all())
