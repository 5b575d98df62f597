r"""Property tests of ``THEORY.md`` facts F1..F8 and F10 on :mod:`reflora_analysis.theory`.

F9 (sharpness) is tested with the probes. Hypothesis draws shapes ``m, n`` in 1..12, ranks
``r`` in 1..min(m, n), seeds, factor scales ``10^[-3, 3]`` (A and B independently), step
sizes ``10^[-4, 0]`` and leading batch dimensions; all in float64 except the float32 part of
F10. The tensors themselves come from a seeded ``torch.Generator``, so a falsifying example
prints as a handful of integers and floats.

Tolerances are relative to the *magnitude of the terms* of each identity (not of its
result, which can cancel to ~0): ``||lhs - rhs||_F <= rtol * magnitude``. Factors, P and S
are drawn with bounded condition numbers (factor singular values within a factor 10 of
their scale, so Gram condition numbers <= 1e4; P and random S within a factor 3 / 10), so
float64 round-off stays below ~cond * 1e-16 * (a few dozen flops). Each ``rtol`` is at least
100x (mostly 1000x) above the worst error seen over several hundred extra random examples
(``HYPOTHESIS_PROFILE=dev``), and many orders of magnitude below the O(1) error of a wrong
formula. Reference values are computed independently (explicit inverses, numpy SVD, scipy),
never by calling the function under test.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora_analysis import theory as th

torch.set_num_threads(1)
F64 = torch.float64


# --------------------------------------------------------------------------- random inputs


def _randn(gen, shape, dtype=F64):
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def _rand(gen, shape):
    return torch.rand(shape, generator=gen, dtype=F64)


def well_conditioned(gen, batch, rows, cols, scale=1.0, spread=10.0):
    """``rows x cols`` (rows >= cols); singular values log-uniform in scale * [1/spread, spread]."""
    U = torch.linalg.qr(_randn(gen, batch + (rows, cols))).Q
    V = torch.linalg.qr(_randn(gen, batch + (cols, cols))).Q
    sv = scale * spread ** (2 * _rand(gen, batch + (cols,)) - 1)
    return (U * sv.unsqueeze(-2)) @ V.mT


def random_spd(gen, batch, r, scale=1.0, spread=10.0):
    """SPD ``r x r`` with eigenvalues log-uniform in ``scale * [1/spread, spread]``."""
    Q = torch.linalg.qr(_randn(gen, batch + (r, r))).Q
    evals = scale * spread ** (2 * _rand(gen, batch + (r,)) - 1)
    return th.symmetrize((Q * evals.unsqueeze(-2)) @ Q.mT)


@dataclass(frozen=True)
class Case:
    """One drawn problem; ``tensors()`` builds it deterministically from ``seed``."""

    m: int
    n: int
    r: int
    batch: tuple
    seed: int
    log_a: float  # log10 of the scale of A
    log_b: float
    log_g: float
    log_eta: float

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)
        b = self.batch
        return SimpleNamespace(
            A=well_conditioned(gen, b, self.m, self.r, 10.0**self.log_a),
            B=well_conditioned(gen, b, self.n, self.r, 10.0**self.log_b),
            G=_randn(gen, b + (self.m, self.n)) * 10.0**self.log_g,
            eta=10.0**self.log_eta,
            # invertible, cond(P) <= 9: the refactoring of F1/F5/F6
            P=well_conditioned(gen, b, self.r, self.r, 1.0, spread=3.0),
            # a random SPD preconditioner, cond <= 100, scale 10^[-2, 2]
            S=random_spd(gen, b, self.r, 10.0 ** (4 * float(_rand(gen, ())) - 2)),
        )


BATCHES = st.sampled_from([(), (), (3,), (2, 2)])


@st.composite
def cases(draw, batches=BATCHES):
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    return Case(
        m=m,
        n=n,
        r=draw(st.integers(1, min(m, n))),
        batch=draw(batches),
        seed=draw(st.integers(0, 2**31 - 1)),
        log_a=draw(st.floats(-3, 3)),
        log_b=draw(st.floats(-3, 3)),
        log_g=draw(st.floats(-2, 2)),
        log_eta=draw(st.floats(-4, 0)),
    )


# ------------------------------------------------------------------------------- helpers


def fro(X):
    return torch.linalg.matrix_norm(X)


def op2(X):
    return torch.linalg.matrix_norm(X, ord=2)


def assert_small(err, magnitude, rtol, what, scalar=False):
    """Per batch element: ``||err||_F <= rtol * magnitude`` (magnitude: the terms' size).

    ``err`` is a batch of matrices, or of scalars when ``scalar`` is true.
    """
    ratio = (err.abs() if scalar else fro(err)) / magnitude
    worst = ratio.max().item()
    assert bool((ratio <= rtol).all()), f"{what}: relative error {worst:.3e} > {rtol:g}"


def trace(X):
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def svd_roots(M):
    """``(M M^T)^{1/2} = U Sigma U^T`` and ``(M^T M)^{1/2} = V Sigma V^T`` via numpy's SVD.

    Independent of :mod:`theory`, and exact for rank-deficient ``M`` (an eigen square root
    of ``M M^T`` would turn round-off eigenvalues ~eps ||M||^2 into errors ~sqrt(eps) ||M||).
    """
    U, sv, Vt = np.linalg.svd(M.numpy(), full_matrices=False)
    left = (U * sv[..., None, :]) @ np.swapaxes(U, -1, -2)
    right = (np.swapaxes(Vt, -1, -2) * sv[..., None, :]) @ Vt
    return torch.from_numpy(left), torch.from_numpy(right), torch.from_numpy(np.asarray(sv.sum(-1)))


# ---------------------------------------------------------------------------- F1 and F2


@settings(max_examples=40)
@given(cases())
def test_f1_preconditioned_step_is_plain_step_on_refactored_pair(case):
    t = case.tensors()
    A, B, G, eta, P = t.A, t.B, t.G, t.eta, t.P
    P_inv = torch.linalg.inv(P)
    # the refactored pair (A P, B P^{-T}), one plain gradient step there, mapped back
    A_r, B_r = A @ P, B @ P_inv.mT
    A_r_plus = A_r - eta * (G @ B_r)
    B_r_plus = B_r - eta * (G.mT @ A_r)
    A_back, B_back = A_r_plus @ P_inv, B_r_plus @ P.mT

    A_plus, B_plus = th.preconditioned_step(A, B, G, eta, P @ P.mT)

    # terms: A and the step eta G B S^{-1} (size <= eta ||G B|| ||P^{-1}||_2^2); cond(P)^2 <= 81
    # amplifies the round-off (seen: <~1.3e-15 of that).
    step_a = eta * fro(G @ B) * op2(P_inv) ** 2
    step_b = eta * fro(G.mT @ A) * op2(P) ** 2
    assert_small(A_plus - A_back, fro(A) + step_a, 1e-12, "A+ (F1)")
    assert_small(B_plus - B_back, fro(B) + step_b, 1e-12, "B+ (F1)")
    # theory.refactor is the same (A P, B P^{-T})
    A_t, B_t = th.refactor(A, B, P)
    assert_small(A_t - A_r, fro(A) * op2(P), 1e-12, "refactor A P")
    assert_small(B_t - B_r, fro(B) * op2(P_inv), 1e-12, "refactor B P^{-T}")


@settings(max_examples=40)
@given(cases())
def test_f2_weight_update_is_product_change_of_the_preconditioned_step(case):
    t = case.tensors()
    A, B, G, eta, S = t.A, t.B, t.G, t.eta, t.S
    A_plus, B_plus = th.preconditioned_step(A, B, G, eta, S)
    dW = th.weight_update(A, B, G, eta, S)
    # dW = A+ B+^T - A B^T cancels: compare against the size of the two products.
    magnitude = fro(A_plus) * fro(B_plus) + fro(A) * fro(B)
    assert_small(dW - (A_plus @ B_plus.mT - A @ B.mT), magnitude, 1e-12, "dW vs A+B+^T - AB^T (F2)")


@settings(max_examples=40)
@given(cases())
def test_f2_eta_squared_term_is_independent_of_s(case):
    t = case.tensors()
    A, B, G = t.A, t.B, t.G
    gen = torch.Generator().manual_seed(case.seed + 1)
    M = A @ B.mT
    second_closed = G @ M.mT @ G
    for S in (t.S, random_spd(gen, case.batch, case.r, 10.0), torch.eye(case.r, dtype=F64)):
        S_inv = torch.linalg.inv(S)
        first_closed = A @ S @ A.mT @ G + G @ B @ S_inv @ B.mT
        # dW(S, eta) = -eta F(S) + eta^2 Q exactly, so with eta = +-1 and 2:
        # Q = (dW(2) - 2 dW(1)) / 2 and F = (dW(-1) - dW(1)) / 2.
        d1, dm1, d2 = (th.weight_update(A, B, G, e, S) for e in (1.0, -1.0, 2.0))
        magnitude = fro(G) * (fro(A) ** 2 * op2(S) + fro(B) ** 2 * op2(S_inv)
                              + fro(A) * fro(B) * fro(G))
        assert_small((d2 - 2 * d1) / 2 - second_closed, magnitude, 1e-12,
                     "eta^2 term G M^T G (F2)")
        assert_small((dm1 - d1) / 2 - first_closed, magnitude, 1e-12,
                     "eta term A S A^T G + G B S^-1 B^T (F2)")


# ------------------------------------------------------------------------------------ F3


@settings(max_examples=40)
@given(cases())
def test_f3_geometric_mean_solves_sxs_eq_y_and_matches_reference(case):
    t = case.tensors()
    X, Y = th.gram(t.A), th.gram(t.B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.DegenerateGramWarning)  # full rank: no damping
        S = th.optimal_preconditioner(t.A, t.B)
    assert S.shape == case.batch + (case.r, case.r)
    assert torch.equal(S, S.mT)
    assert bool((torch.linalg.eigvalsh(S) > 0).all()), "S* not positive definite"
    # terms of S X S are of size ||S||^2 ||X||; cond(X), cond(Y) <= 1e4 (seen: <~5e-15).
    assert_small(S @ X @ S - Y, op2(S) ** 2 * fro(X), 1e-12, "S X S = Y (F3)")
    # issue 2: the Cholesky path agrees with the two-eigh reference to 1e-6 relative.
    S_ref = th.geometric_mean_reference(X, Y)
    assert_small(S - S_ref, fro(S_ref), 1e-6, "Cholesky vs reference (F3)")
    # uniqueness of the SPD solution: X^{-1} # Y and Y^{-1} # X are inverses of each other.
    S_swapped = th.geometric_mean(Y, X)
    eye = torch.eye(case.r, dtype=F64).expand_as(S)
    assert_small(S @ S_swapped - eye, op2(S) * op2(S_swapped), 1e-10, "(X^-1 # Y)(Y^-1 # X) = I")


@settings(max_examples=25)
@given(cases(batches=st.sampled_from([(3,), (2, 3)])))
def test_f3_batched_equals_per_element(case):
    t = case.tensors()
    X, Y = th.gram(t.A), th.gram(t.B)
    S = th.geometric_mean(X, Y)
    for index in np.ndindex(*case.batch):
        S_one = th.geometric_mean(X[index], Y[index])
        # batched LAPACK may take another code path: both results carry the F3 round-off
        # (~cond(X) * eps * r, up to ~1e-11 seen), so the S X S = Y tolerance applies.
        assert_small(S[index] - S_one, fro(S_one), 1e-9, f"batch element {index}")


@settings(max_examples=25)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(-3, 3), st.floats(-3, 3))
def test_f3_geometric_mean_of_general_spd_pairs(r, seed, log_x, log_y):
    gen = torch.Generator().manual_seed(seed)
    X = random_spd(gen, (), r, 10.0**log_x, spread=30.0)
    Y = random_spd(gen, (), r, 10.0**log_y, spread=30.0)
    S = th.geometric_mean(X, Y)
    assert_small(S @ X @ S - Y, op2(S) ** 2 * fro(X), 1e-12, "S X S = Y, general SPD (F3)")
    assert_small(S - th.geometric_mean_reference(X, Y), fro(S), 1e-6, "Cholesky vs reference")


@settings(max_examples=40)
@given(cases())
def test_f3_geometric_mean_and_inverse_from_one_factorization(case):
    t = case.tensors()
    X, Y = th.gram(t.A), th.gram(t.B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.DegenerateGramWarning)  # full rank: no damping
        S, S_inv, singular = th.geometric_mean_and_inverse(X, Y)
    assert S.shape == S_inv.shape == case.batch + (case.r, case.r)
    assert singular.shape == case.batch and singular.dtype == torch.bool
    assert not bool(singular.any())
    assert torch.equal(S, S.mT) and torch.equal(S_inv, S_inv.mT)
    for M in (S, S_inv):
        assert bool((torch.linalg.eigvalsh(M) > 0).all()), "not positive definite"
    eye = torch.eye(case.r, dtype=F64).expand_as(S)
    # same tolerances and reasons as the geometric_mean test above (cond(X), cond(Y) <= 1e4)
    assert_small(S @ X @ S - Y, op2(S) ** 2 * fro(X), 1e-12, "S X S = Y (F3)")
    assert_small(S_inv @ Y @ S_inv - X, op2(S_inv) ** 2 * fro(Y), 1e-12, "S^-1 Y S^-1 = X")
    assert_small(S @ S_inv - eye, op2(S) * op2(S_inv), 1e-12, "S S^-1 = I")
    # against geometric_mean and the explicit inverse of its S: both carry the F3 round-off
    # (~cond(S) eps r; worst seen over 600 extra examples 2e-14), far below the O(1) error
    # of a wrong formula
    S_gm = th.geometric_mean(X, Y)
    assert_small(S - S_gm, fro(S_gm), 1e-10, "S vs geometric_mean")
    S_gm_inv = torch.linalg.inv(S_gm)
    assert_small(S_inv - S_gm_inv, fro(S_gm_inv), 1e-10, "S^-1 vs inv(geometric_mean)")


@settings(max_examples=25)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(-3, 3), st.floats(-3, 3),
       st.sampled_from([0.0, 1e-6, 1e-2]))
def test_f3_geometric_mean_and_inverse_general_spd_and_damping(r, seed, log_x, log_y, damping):
    gen = torch.Generator().manual_seed(seed)
    X = random_spd(gen, (), r, 10.0**log_x, spread=30.0)
    Y = random_spd(gen, (), r, 10.0**log_y, spread=30.0)
    S, S_inv, singular = th.geometric_mean_and_inverse(X, Y, damping=damping)
    assert not bool(singular)
    # damping is applied as in geometric_mean: S solves the F3 equation of the damped Grams
    d = th.relative_damping(X, Y, damping)
    eye = torch.eye(r, dtype=F64)
    Xd, Yd = X + d * eye, Y + d * eye
    assert_small(S @ Xd @ S - Yd, op2(S) ** 2 * fro(Xd), 1e-12, "S X S = Y, damped SPD")
    assert_small(S @ S_inv - eye, op2(S) * op2(S_inv), 1e-12, "S S^-1 = I, damped SPD")
    S_gm = th.geometric_mean(X, Y, damping=damping)
    assert_small(S - S_gm, fro(S_gm), 1e-10, "S vs geometric_mean, damped")


@settings(max_examples=40)
@given(cases(batches=st.sampled_from([(3,), (2, 2)])),
       st.sampled_from(["A=0", "B=0", "both=0", "rank-deficient"]),
       st.sampled_from([torch.float64, torch.float32]), st.floats(-8, 8), st.floats(-8, 8))
def test_f10_geometric_mean_and_inverse_mask_marks_degenerate_elements(case, kind, dtype,
                                                                          log_a, log_b):
    if kind == "rank-deficient" and case.r == 1:
        kind = "A=0"
    gen = torch.Generator().manual_seed(case.seed)
    A_bad, B_bad = _degenerate_factors(kind, gen, case.batch, case.m, case.n, case.r, dtype)
    spread = 10.0 if dtype == F64 else 2.0  # as in the extreme-scale test: no damping needed
    A = well_conditioned(gen, case.batch, case.m, case.r, 1.0, spread).to(dtype)
    B = well_conditioned(gen, case.batch, case.n, case.r, 1.0, spread).to(dtype)
    # the first batch element degenerate, the others healthy
    A[(0,) * (A.dim() - 2)] = A_bad[(0,) * (A.dim() - 2)]
    B[(0,) * (B.dim() - 2)] = B_bad[(0,) * (B.dim() - 2)]
    A, B = A * 10.0**log_a, B * 10.0**log_b
    X, Y = th.gram(A), th.gram(B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.DegenerateGramWarning)  # warn=False: silent
        S, S_inv, singular = th.geometric_mean_and_inverse(X, Y, warn=False)
    expected = torch.zeros(case.batch, dtype=torch.bool)
    expected[(0,) * len(case.batch)] = True
    assert torch.equal(singular, expected), f"{kind}: mask {singular.tolist()}"
    assert S.dtype == S_inv.dtype == dtype
    assert bool(torch.isfinite(S).all()) and bool(torch.isfinite(S_inv).all()), kind
    with pytest.warns(th.DegenerateGramWarning):  # the default warns like geometric_mean
        S_warned, _, _ = th.geometric_mean_and_inverse(X, Y)
    assert torch.equal(S_warned, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.DegenerateGramWarning)
        S_gm = th.geometric_mean(X, Y)
    # same factorization and F10 damping, only the final r x r products differ: round-off
    # (worst seen over 400 extra examples: 2e-15 float64, 3e-7 float32)
    tol = 1e-12 if dtype == F64 else 1e-4
    healthy = ~expected
    assert_small((S - S_gm)[healthy], fro(S_gm[healthy]), tol, f"healthy elements ({kind})")
    assert_small((S - S_gm)[~healthy], fro(S_gm[~healthy]), tol, f"damped element ({kind})")


# ------------------------------------------------------------------------------------ F4


@settings(max_examples=40)
@given(cases())
def test_f4_refactor_balanced_equal_grams_same_product(case):
    t = case.tensors()
    A, B = t.A, t.B
    A_bal, B_bal = th.refactor_balanced(A, B)
    X_bal, Y_bal = th.gram(A_bal), th.gram(B_bal)
    # P = S*^{1/2} with cond(S*) <= 1e4: relative round-off in the Grams <~1e-12.
    assert_small(X_bal - Y_bal, fro(X_bal) + fro(Y_bal), 1e-11, "balanced Grams (F4)")
    assert_small(A_bal @ B_bal.mT - A @ B.mT, fro(A) * fro(B) + fro(A_bal) * fro(B_bal), 1e-12,
                 "same product (F4)")
    assert bool((th.balance_gap(A_bal, B_bal) <= 1e-9).all())


@settings(max_examples=25)
@given(cases())
def test_balance_gap_formula_and_range(case):
    t = case.tensors()
    X, Y = (th.gram(F).numpy() for F in (t.A, t.B))
    expected = np.linalg.norm(X - Y, axis=(-2, -1)) / (
        np.linalg.norm(X, axis=(-2, -1)) + np.linalg.norm(Y, axis=(-2, -1)))
    gap = th.balance_gap(t.A, t.B)
    assert gap.shape == case.batch
    np.testing.assert_allclose(gap.numpy(), expected, rtol=1e-12, atol=0)
    assert bool(((gap >= 0) & (gap <= 1)).all())


# ------------------------------------------------------------------------------------ F5


@settings(max_examples=40)
@given(cases(), st.floats(-2, 2))
def test_f5_factor_norm_bound_equality_at_s_star(case, log_t):
    t = case.tensors()
    A, B, P = t.A, t.B, t.P
    X, Y = th.gram(A), th.gram(B)
    _, _, nuc = svd_roots(A @ B.mT)  # ||M||_* from numpy, independent of theory
    T_P = th.factor_norm(*th.refactor(A, B, P))
    # T(S) = tr(S A^T A) + tr(S^{-1} B^T B) with S = P P^T (sum of positive terms)
    S = P @ P.mT
    T_trace = trace(S @ X) + trace(torch.linalg.inv(S) @ Y)
    assert_small(T_P - T_trace, T_trace, 1e-12, "T(S) trace form", scalar=True)
    assert bool((T_P >= 2 * nuc * (1 - 1e-10)).all()), "||AP||^2 + ||BP^-T||^2 < 2||M||_* (F5)"
    # equality at S* (the balanced factorization)
    T_bal = th.factor_norm(*th.refactor_balanced(A, B))
    assert_small(T_bal - 2 * nuc, 2 * nuc, 1e-11, "T(S*) = 2||M||_* (F5)", scalar=True)
    # S* minimises T over random SPD S ...
    S_star = th.optimal_preconditioner(A, B)
    S_inv_star = torch.linalg.inv(S_star)
    T_star = trace(S_star @ X) + trace(S_inv_star @ Y)
    T_random = trace(t.S @ X) + trace(torch.linalg.inv(t.S) @ Y)
    assert bool((T_star <= T_random * (1 + 1e-10)).all()), "T(S*) > T(S) for a random SPD S"
    # ... strictly: along S = t S*, T = (t + 1/t) ||M||_*, > 2 ||M||_* for t != 1.
    tt = 10.0**log_t
    T_line = trace(tt * S_star @ X) + trace(S_inv_star @ Y) / tt
    assert_small(T_line - (tt + 1 / tt) * nuc, (tt + 1 / tt) * nuc, 1e-11,
                 "T(t S*) = (t + 1/t)||M||_*", scalar=True)


# ------------------------------------------------------------------------------------ F6


@settings(max_examples=40)
@given(cases())
def test_f6_refactored_update_depends_on_m_alone(case):
    t = case.tensors()
    A0, B0, G, eta = t.A, t.B, t.G, t.eta
    A1, B1 = A0 @ t.P, B0 @ torch.linalg.inv(t.P).mT  # another factorization of M
    M = A0 @ B0.mT
    root_left, root_right, _ = svd_roots(M)
    closed = -eta * (root_left @ G + G @ root_right) + eta**2 * G @ M.mT @ G
    magnitude = (eta * fro(M) + eta**2 * fro(M) * fro(G)) * fro(G)
    for A, B in ((A0, B0), (A1, B1)):
        S_star = th.optimal_preconditioner(A, B)
        # A S* A^T = (M M^T)^{1/2}, B S*^{-1} B^T = (M^T M)^{1/2}; cond(Gram) <= 1e6 here.
        assert_small(A @ S_star @ A.mT - root_left, fro(M), 1e-10, "A S* A^T = (M M^T)^1/2 (F6)")
        assert_small(B @ torch.linalg.solve(S_star, B.mT) - root_right, fro(M), 1e-10,
                     "B S*^-1 B^T = (M^T M)^1/2 (F6)")
        dW = th.weight_update(A, B, G, eta, S_star)
        assert_small(dW - closed, magnitude, 1e-10, "dW(S*) closed form (F6)")


def test_f6_plain_lora_update_depends_on_the_factorization():
    gen = torch.Generator().manual_seed(20250524)
    m, n, r, eta = 8, 6, 3, 0.1
    A0 = well_conditioned(gen, (), m, r)
    B0 = well_conditioned(gen, (), n, r)
    G = _randn(gen, (m, n))
    eye = torch.eye(r, dtype=F64)
    lora0 = th.weight_update(A0, B0, G, eta, eye)
    ref0 = th.weight_update(A0, B0, G, eta, th.optimal_preconditioner(A0, B0))
    lora_spread, ref_spread = [], []
    for _ in range(5):
        A1, B1 = th.refactor(A0, B0, well_conditioned(gen, (), r, r, spread=3.0))
        lora_spread.append(float(fro(th.weight_update(A1, B1, G, eta, eye) - lora0) / fro(lora0)))
        S1 = th.optimal_preconditioner(A1, B1)
        ref_spread.append(float(fro(th.weight_update(A1, B1, G, eta, S1) - ref0) / fro(ref0)))
    assert min(lora_spread) > 1e-3, f"plain LoRA dW(I) barely changed: {lora_spread}"
    assert max(ref_spread) < 1e-9, f"RefLoRA dW(S*) changed: {ref_spread}"


# ------------------------------------------------------------------------------------ F7


def _scalar_objective(s, a2, b2):
    return s * a2 + b2 / s


@settings(max_examples=30)
@given(cases())
def test_f7_scalar_preconditioner_minimises_objective(case):
    t = case.tensors()
    s = th.scalar_preconditioner(t.A, t.B)
    assert s.shape == case.batch
    a2 = (fro(t.A) ** 2).reshape(-1).tolist()
    b2 = (fro(t.B) ** 2).reshape(-1).tolist()
    for s_i, a2_i, b2_i in zip(s.reshape(-1).tolist(), a2, b2):
        f_star = _scalar_objective(s_i, a2_i, b2_i)
        assert math.isclose(f_star, 2 * math.sqrt(a2_i * b2_i), rel_tol=1e-12)
        # scipy over log s on [1e-13, 1e13] (factor scales 1e-3..1e3 put s* in ~1e-7..1e7)
        found = scipy.optimize.minimize_scalar(
            lambda u: _scalar_objective(math.exp(u), a2_i, b2_i),
            bounds=(-30.0, 30.0), method="bounded", options={"xatol": 1e-10})
        assert f_star <= found.fun * (1 + 1e-12)
        # the minimum is flat: f(e^u) ~ f* (1 + (u - u*)^2 / 2), so xatol-level agreement in u
        assert abs(math.log(s_i) - found.x) < 1e-4
        grid = np.logspace(math.log10(s_i) - 3, math.log10(s_i) + 3, 601)
        assert f_star <= _scalar_objective(grid, a2_i, b2_i).min() * (1 + 1e-12)


def test_f7_zero_factor_gives_one():
    A = torch.zeros(3, 5, 2, dtype=F64)
    B = torch.randn(3, 4, 2, dtype=F64)
    A[1] = torch.randn(5, 2, dtype=F64)
    B[2] = 0.0
    s = th.scalar_preconditioner(A, B)
    assert bool(torch.isfinite(s).all())
    assert s[0].item() == 1.0 and s[2].item() == 1.0  # A = 0 (PEFT lora_B = 0 start)
    assert math.isclose(s[1].item(), (fro(B[1]) / fro(A[1])).item(), rel_tol=1e-15)


# ------------------------------------------------------------------------------------ F8


@settings(max_examples=40)
@given(cases(), st.integers(1, 12))
def test_f8_descent_lemma_bounds_on_least_squares(case, k):
    t = case.tensors()
    A, B, eta, S = t.A, t.B, t.eta, t.S
    gen = torch.Generator().manual_seed(case.seed + 2)
    X_data = _randn(gen, case.batch + (k, case.m))
    Y_data = _randn(gen, case.batch + (k, case.n)) * 10.0**case.log_g
    W0 = _randn(gen, case.batch + (case.m, case.n))

    def loss(W):
        return 0.5 * (X_data @ W - Y_data).square().sum((-2, -1))

    L = torch.linalg.eigvalsh(X_data.mT @ X_data)[..., -1]  # lambda_max(X^T X), (...,)
    M = A @ B.mT
    W = W0 + M
    G = X_data.mT @ (X_data @ W - Y_data)
    l_W = loss(W)
    U_exact, U_relaxed = th.upper_bounds(A, B, G, l_W, eta, L, S)
    dW = th.weight_update(A, B, G, eta, S)
    l_new = loss(W + dW)

    # independent U_relaxed from its formula (numpy SVD for the nuclear/spectral norms)
    T = trace(S @ th.gram(A)) + trace(torch.linalg.inv(S) @ th.gram(B))
    GMG = G.mT @ M @ G.mT
    nuc_GMG = torch.from_numpy(np.asarray(np.linalg.svd(GMG.numpy(), compute_uv=False).sum(-1)))
    M_2 = torch.from_numpy(np.asarray(np.linalg.svd(M.numpy(), compute_uv=False)[..., 0]))
    g = fro(G)
    first = 2 * eta * nuc_GMG
    second = eta**2 * (G * (G @ M.mT @ G)).sum((-2, -1))
    curvature = 0.5 * L * (eta * g * T + eta**2 * g**2 * M_2) ** 2
    inner = (G * dW).sum((-2, -1))
    quad = 0.5 * L * fro(dW) ** 2
    # every quantity is a sum of these terms: tolerances are relative to their total size
    magnitude = l_W + l_new + first + second.abs() + curvature + inner.abs() + quad
    rtol = 1e-12

    assert_small(U_relaxed - (l_W - first + second + curvature), magnitude, rtol,
                 "U_relaxed formula", scalar=True)
    # a quadratic's Taylor expansion is exact: U_exact - l(W+dW) = (L ||dW||^2 - ||X dW||^2) / 2
    gap = 0.5 * (L * fro(dW) ** 2 - fro(X_data @ dW) ** 2)
    assert_small(U_exact - l_new - gap, magnitude, rtol, "U_exact formula", scalar=True)
    assert bool((l_new <= U_exact + rtol * magnitude).all()), "l(W + dW) > U_exact (F8a)"
    assert bool((U_exact <= U_relaxed + rtol * magnitude).all()), "U_exact > U_relaxed (F8b)"
    S_star = th.optimal_preconditioner(A, B)
    _, U_relaxed_star = th.upper_bounds(A, B, G, l_W, eta, L, S_star)
    assert bool((U_relaxed_star <= U_relaxed + rtol * magnitude).all()), "U(S*) > U(S) (F8)"


# ----------------------------------------------------------------------------------- F10


def _degenerate_factors(kind, gen, batch, m, n, r, dtype):
    A = well_conditioned(gen, batch, m, r).to(dtype)
    B = well_conditioned(gen, batch, n, r).to(dtype)
    if kind == "A=0":  # the PEFT start lora_B = 0
        A = torch.zeros_like(A)
    elif kind == "B=0":
        B = torch.zeros_like(B)
    elif kind == "both=0":
        A, B = torch.zeros_like(A), torch.zeros_like(B)
    elif kind == "rank-deficient":  # last column of A repeats the first: rank r - 1
        A[..., -1] = A[..., 0]
    return A, B


@settings(max_examples=40)
@given(cases(), st.sampled_from(["A=0", "B=0", "both=0", "rank-deficient"]),
       st.sampled_from([torch.float64, torch.float32]), st.floats(-8, 8), st.floats(-8, 8))
def test_f10_degenerate_grams_warn_and_stay_finite(case, kind, dtype, log_a, log_b):
    if kind == "rank-deficient" and case.r == 1:
        kind = "A=0"  # a rank-1 factor is deficient only when zero
    gen = torch.Generator().manual_seed(case.seed)
    A, B = _degenerate_factors(kind, gen, case.batch, case.m, case.n, case.r, dtype)
    A, B = A * 10.0**log_a, B * 10.0**log_b
    G = _randn(gen, case.batch + (case.m, case.n), dtype)
    with pytest.warns(th.DegenerateGramWarning):
        S = th.optimal_preconditioner(A, B)
    assert S.dtype == dtype
    assert bool(torch.isfinite(S).all()), f"non-finite S* for {kind}"
    assert torch.equal(S, S.mT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.DegenerateGramWarning)
        A_bal, B_bal = th.refactor_balanced(A, B)
    eta = 10.0**case.log_eta
    outputs = [th.weight_update(A, B, G, eta, S), *th.preconditioned_step(A, B, G, eta, S),
               A_bal, B_bal, th.scalar_preconditioner(A, B), th.balance_gap(A, B)]
    if dtype == torch.float64:  # in float32 the bound's square can exceed 3e38 legitimately
        outputs += th.upper_bounds(A, B, G, 1.0, eta, 1.0, S)
    for out in outputs:
        assert bool(torch.isfinite(out).all()), f"non-finite output for {kind}"


@settings(max_examples=40)
@given(cases(), st.sampled_from([torch.float64, torch.float32]), st.floats(-8, 8),
       st.floats(-8, 8))
def test_f10_extreme_scales_need_no_damping(case, dtype, log_a, log_b):
    """Full-rank factors at scales 1e-8..1e8: the degeneracy test is scale-free, so no
    warning, and S X S = Y holds to the dtype's accuracy."""
    gen = torch.Generator().manual_seed(case.seed)
    # float32 gets tighter conditioning (cond(Gram) <= 16): its round-off is ~1e-7 * cond
    spread = 10.0 if dtype == torch.float64 else 2.0
    A = well_conditioned(gen, case.batch, case.m, case.r, 10.0**log_a, spread).to(dtype)
    B = well_conditioned(gen, case.batch, case.n, case.r, 10.0**log_b, spread).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.DegenerateGramWarning)
        S = th.optimal_preconditioner(A, B)
    assert bool(torch.isfinite(S).all())
    X, Y = th.gram(A).double(), th.gram(B).double()
    S = S.double()
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    assert_small(S @ X @ S - Y, op2(S) ** 2 * fro(X), rtol, f"S X S = Y at extreme scale ({dtype})")


def test_f10_one_warning_per_call_and_healthy_elements_untouched():
    gen = torch.Generator().manual_seed(7)
    A = well_conditioned(gen, (4,), 6, 3)
    B = well_conditioned(gen, (4,), 5, 3)
    A_bad = A.clone()
    A_bad[1] = 0.0
    A_bad[3, :, 2] = A_bad[3, :, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S = th.optimal_preconditioner(A_bad, B)
    assert [w.category for w in caught] == [th.DegenerateGramWarning]
    for i in (0, 2):  # damping is per batch element: the healthy ones are exact
        S_i = th.optimal_preconditioner(A[i], B[i])
        # batched vs single LAPACK paths differ by round-off only (see the F3 batch test)
        assert_small(S[i] - S_i, fro(S_i), 1e-9, f"healthy element {i}")
    assert bool(torch.isfinite(S).all())


def test_f10_explicit_damping_avoids_the_warning():
    A = torch.zeros(6, 3, dtype=F64)
    B = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.DegenerateGramWarning)
        S = th.optimal_preconditioner(A, B, damping=1e-3)
    assert bool(torch.isfinite(S).all())
    assert bool((torch.linalg.eigvalsh(S) > 0).all())


# ------------------------------------------------------------------------------ bad input

_A, _B, _G, _S = torch.ones(5, 2), torch.ones(4, 2), torch.ones(5, 4), torch.eye(2)
_bf16 = torch.bfloat16

# (problem, function, args, error type, strings the one-line message must contain)
BAD_INPUTS = [
    ("rank", th.optimal_preconditioner, (_A, torch.ones(4, 3)), ValueError, [(5, 2), (4, 3)]),
    ("rank", th.weight_update, (_A, torch.ones(4, 3), _G, 0.1, _S), ValueError, [(5, 2), (4, 3)]),
    ("rank", th.scalar_preconditioner, (_A, torch.ones(4, 3)), ValueError, [(5, 2), (4, 3)]),
    ("rank", th.refactor_balanced, (_A, torch.ones(4, 3)), ValueError, [(5, 2), (4, 3)]),
    ("rank", th.balance_gap, (_A, torch.ones(4, 3)), ValueError, [(5, 2), (4, 3)]),
    ("not a matrix", th.optimal_preconditioner, (torch.ones(5), _B), ValueError, [(5,), (4, 2)]),
    ("non-square", th.geometric_mean, (torch.ones(2, 3), torch.ones(2, 3)), ValueError, [(2, 3)]),
    ("non-square", th.geometric_mean_reference, (torch.ones(2, 3), torch.ones(2, 3)), ValueError,
     [(2, 3)]),
    ("gram shapes", th.geometric_mean, (torch.eye(2), torch.eye(3)), ValueError, [(2, 2), (3, 3)]),
    ("gram shapes", th.geometric_mean_and_inverse, (torch.eye(2), torch.eye(3)), ValueError,
     [(2, 2), (3, 3)]),
    ("half precision", th.geometric_mean_and_inverse, (_S.half(), _S.half()), TypeError,
     ["torch.float16"]),
    ("G shape", th.weight_update, (_A, _B, torch.ones(4, 5), 0.1, _S), ValueError, [(4, 5)]),
    ("G shape", th.preconditioned_step, (_A, _B, torch.ones(5, 3), 0.1, _S), ValueError, [(5, 3)]),
    ("G shape", th.upper_bounds, (_A, _B, torch.ones(5, 5), 1.0, 0.1, 1.0, _S), ValueError,
     [(5, 5)]),
    ("S shape", th.weight_update, (_A, _B, _G, 0.1, torch.eye(3)), ValueError, [(3, 3)]),
    ("S shape", th.preconditioned_step, (_A, _B, _G, 0.1, torch.ones(2, 3)), ValueError, [(2, 3)]),
    ("S shape", th.upper_bounds, (_A, _B, _G, 1.0, 0.1, 1.0, torch.eye(4)), ValueError, [(4, 4)]),
    ("P shape", th.refactor, (_A, _B, torch.eye(3)), ValueError, [(3, 3)]),
    ("mixed dtypes", th.optimal_preconditioner, (_A.double(), _B), TypeError,
     ["torch.float64", "torch.float32"]),
    ("mixed dtypes", th.weight_update, (_A, _B, _G.double(), 0.1, _S), TypeError,
     ["torch.float64", "torch.float32"]),
    ("S dtype", th.weight_update, (_A, _B, _G, 0.1, _S.double()), TypeError, ["torch.float64"]),
    ("half precision", th.optimal_preconditioner, (_A.to(_bf16), _B.to(_bf16)), TypeError,
     ["torch.bfloat16"]),
    ("half precision", th.geometric_mean, (_S.half(), _S.half()), TypeError, ["torch.float16"]),
    ("half precision", th.weight_update, (_A.to(_bf16), _B.to(_bf16), _G.to(_bf16), 0.1,
                                          _S.to(_bf16)), TypeError, ["torch.bfloat16"]),
]


@pytest.mark.parametrize("problem, function, args, error, named", BAD_INPUTS,
                         ids=[f"{f.__name__}-{p}" for p, f, *_ in BAD_INPUTS])
def test_bad_input_raises_one_line_error_naming_the_problem(problem, function, args, error, named):
    with pytest.raises(error) as info:
        function(*args)
    message = str(info.value)
    assert "\n" not in message
    for item in named:
        assert str(item) in message, f"{item} not named in: {message}"


def test_non_finite_factors_raise_a_clear_error():
    # A diverged run hands NaN/Inf factors to the refactoring; eigh would raise a raw
    # LinAlgError deep inside torch. The message must say what is wrong instead.
    A = torch.randn(6, 2, dtype=torch.float64)
    B = torch.randn(5, 2, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        A_bad = A.clone()
        A_bad[0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            th.optimal_preconditioner(A_bad, B)
        with pytest.raises(ValueError, match="geometric_mean_and_inverse.*NaN or Inf"):
            th.geometric_mean_and_inverse(th.gram(A_bad), th.gram(B))


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf")])
def test_invalid_damping_is_refused(damping):
    # A negative damping used to be ignored silently (the code only added d > 0).
    X = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        th.geometric_mean(X, X, damping=damping)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        th.geometric_mean_and_inverse(X, X, damping=damping)
