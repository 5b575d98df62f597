"""The sharpness view at the balanced (refactored) factors: probes/refactored.py (F4, F9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis import theory
from reflora_analysis.pairs import LoraPair, find_lora_pairs
from reflora_analysis.probes import ProbeContext, top_hessian_eigenvalue
from reflora_analysis.probes.refactored import (BalancedSharpnessProbe, balanced_pair,
                                                balanced_substitutes,
                                                sharpness_at_balanced_factors, trace_interval)

torch.set_num_threads(1)
F64 = torch.float64


class Factors(nn.Module):
    """``W = W0 + A B^T`` (A m x r, B n x r), a dropout for the mode checks."""

    def __init__(self, A, B, W0=None):
        super().__init__()
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.register_buffer("W0", torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype)
                             if W0 is None else W0.clone())
        self.drop = nn.Dropout(0.5)

    def forward(self):
        return self.drop(self.W0 + self.A @ self.B.T)


def _state(model):
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def _assert_same_state(model, before):
    values, grads, grad_values, req, modes = before
    for p, v, g, gv, r in zip(model.parameters(), values, grads, grad_values, req):
        assert torch.equal(p.detach(), v) and p.requires_grad == r  # bit for bit
        assert p.grad is g and (g is None or torch.equal(p.grad, gv))
    assert [m.training for m in model.modules()] == modes


def _unbalanced_minimiser(m, n, r, seed, spread=4.0):
    """``Y`` of rank r and an unbalanced exact factorization ``(A, B)`` of it."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    U, s, Vh = torch.linalg.svd(Y)
    C = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0] @ torch.diag(
        torch.logspace(0, math.log10(spread), r, dtype=F64))
    A = (U[:, :r] * s[:r].sqrt()) @ C
    B = torch.linalg.solve(C, (Vh[:r].T * s[:r].sqrt()).T).T
    return A, B, Y, s


# ---------------------------------------------------------------- the balanced factors

@settings(max_examples=25)
@given(m=st.integers(3, 9), n=st.integers(3, 9), r=st.integers(1, 3), seed=st.integers(0, 10**6),
       log_ratio=st.floats(-3, 3), transposed=st.booleans())
def test_balanced_pair_keeps_the_product_and_balances(m, n, r, seed, log_ratio, transposed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, r, generator=g, dtype=F64) * 10 ** log_ratio
    B = torch.randn(n, r, generator=g, dtype=F64)
    b = nn.Parameter(B.T.clone() if transposed else B.clone())
    pair = LoraPair("p", nn.Parameter(A.clone()), b, 1.0, transposed)
    out = balanced_pair(pair)
    # W unchanged: two r x r products of a well-conditioned P (m, n >= r + 2, Gaussian
    # factors) cost a few ulps relative to ||A|| ||B||, far inside 1e-12
    err = (out["A"] @ out["B"].T - A @ B.T).norm() / (A.norm() * B.norm())
    assert float(err) < 1e-12
    # balanced (F4): the Grams agree to round-off relative to their size
    X, Yg = theory.gram(out["A"]), theory.gram(out["B"])
    assert float((X - Yg).norm() / X.norm()) < 1e-9 and out["gap_after"] < 1e-9
    assert not out["degenerate"]
    # minimal norm (F5): ||A'||^2 + ||B'||^2 = 2 ||A B^T||_*
    total = out["A"].square().sum() + out["B"].square().sum()
    assert float(total) == pytest.approx(2 * float(theory.nuclear_norm(A @ B.T)), rel=1e-9)


def test_substitutes_follow_the_peft_layout_and_keep_the_function():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"],
                                                      init_lora_weights=False)).double()
    pairs = find_lora_pairs(model)
    assert pairs[0].b_transposed  # PEFT keeps lora_A = B^T (r x n)
    with torch.no_grad():
        pairs[0].a.mul_(30.0)  # unbalance the stored factors
    x = torch.randn(4, 6, dtype=F64)
    before = model(x)
    with balanced_substitutes(model, pairs) as (variables, info):
        a, b = variables
        assert a.shape == pairs[0].a.shape and b.shape == pairs[0].b.shape
        # balanced in paper orientation: A' = a, B' = b^T
        gap = (a.T @ a - b @ b.T).detach().norm() / (a.T @ a).detach().norm()
        assert float(gap) < 1e-9
        inside = model(x)
        assert info["gap_before"] > 0.5 and info["gap_after"] < 1e-9
    # the product, hence the output, is the same to round-off (1e-12 relative in float64)
    assert float((inside - before).detach().norm() / before.detach().norm()) < 1e-12
    assert torch.equal(model(x), before)  # the originals are back


# ---------------------------------------------------------------- the probe

def test_parameters_grads_and_modes_are_bit_identical_after_the_call():
    A, B, Y, _ = _unbalanced_minimiser(7, 5, 2, seed=3)
    model = Factors(A + 0.1, B)
    model.train()
    model.A.grad = torch.randn_like(model.A)  # left by a training step; B has none
    closure = lambda: 0.5 * (model() - Y).square().sum()  # noqa: E731
    live = closure()  # an autograd graph through the parameters, alive during the probe
    before = _state(model)
    value, info = sharpness_at_balanced_factors(model, closure, [(model.A, model.B)],
                                                trace_samples=9, return_info=True)
    _assert_same_state(model, before)
    # the live graph still backpropagates: the parameters were never written in place
    gA, gB = torch.autograd.grad(live, [model.A, model.B])
    assert torch.isfinite(gA).all() and math.isfinite(value) and info["hvps"] >= 9
    assert math.isfinite(info["trace_ci_low"]) and info["trace_ci_low"] <= info["trace"] <= \
        info["trace_ci_high"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f9_on_the_mf_task_balanced_minimiser_gives_two_sigma1(seed):
    from reflora_analysis.tasks import make_task

    task = make_task("mf", seed=seed)
    pair = task.pairs[0]
    W = torch.zeros(pair.shape, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(task.loss_in_W(W), W)
    Y = -g  # l(W) = 1/2 ||W - Y||^2
    U, s, Vh = torch.linalg.svd(Y)
    r = pair.rank
    C = torch.diag(torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=F64)[:r]) @ \
        torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed),
                                    dtype=F64))[0]
    with torch.no_grad():  # an unbalanced exact factorization of the rank-r target
        pair.A.copy_((U[:, :r] * s[:r].sqrt()) @ C)
        pair.B.copy_(torch.linalg.solve(C, (Vh[:r].T * s[:r].sqrt()).T).T)
    closure = lambda: task.loss(task.batch(0))  # noqa: E731
    assert float(closure()) < 1e-20  # a minimiser: G = 0, the Hessian is J^T J (F9)
    stored = top_hessian_eigenvalue(task.model, closure, tol=1e-10)
    balanced, info = sharpness_at_balanced_factors(task.model, closure, task.pairs, tol=1e-10,
                                                   return_info=True)
    # Lanczos' residual bound tol |theta| bounds the error: 1e-10 relative, checked at 1e-8
    assert stored == pytest.approx(float(theory.spectral_norm(pair.A) ** 2
                                         + theory.spectral_norm(pair.B) ** 2), rel=1e-8)
    assert balanced == pytest.approx(2 * float(s[0]), rel=1e-8)
    assert stored > 1.5 * balanced  # the stored factors are sharper
    assert info["converged"] and info["product_error"] < 1e-12 and info["degenerate_layers"] == 0


def test_degenerate_start_is_damped_and_tends_to_the_zero_factorization():
    """At A = 0 (PEFT's zero start in paper orientation) no P in GL(r) balances; the damped
    refactoring shrinks B to ~0, where the Hessian of 1/2||A B^T - Y||^2 is the coupling
    2 <G, dA dB^T> alone, whose top eigenvalue is sigma_max(G) (G = -Y at W = 0)."""
    g = torch.Generator().manual_seed(5)
    Y = torch.randn(6, 4, generator=g, dtype=F64)
    model = Factors(torch.zeros(6, 2, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64))
    model.eval()
    closure = lambda: 0.5 * (model() - Y).square().sum()  # noqa: E731
    value, info = sharpness_at_balanced_factors(model, closure, [(model.A, model.B)], tol=1e-9,
                                                return_info=True)
    assert info["degenerate_layers"] == 1 and info["product_error"] == 0.0
    # H = coupling + (PSD term ||dA B'^T||^2 of norm ||B'||_2^2), so by Weyl sigma_max(G) <=
    # lambda_max <= sigma_max(G) + ||B'||_2^2 (Lanczos: 1e-9 relative); B' = B P^{-1} with
    # P ~ damping^(-1/4) is small but not 0
    B_bal = balanced_pair(find_lora_pairs([(model.A, model.B)])[0])["B"]
    shift = float(theory.spectral_norm(B_bal)) ** 2
    sigma = float(theory.spectral_norm(Y))
    assert shift < 1e-3 * sigma
    assert sigma * (1 - 1e-8) <= value <= (sigma + shift) * (1 + 1e-8)


def test_probe_reports_its_keys_and_refuses_a_task_without_a_model():
    A, B, Y, _ = _unbalanced_minimiser(6, 5, 2, seed=1)
    model = Factors(A, B)

    class Task:
        name = "t"
        pairs = find_lora_pairs([(model.A, model.B)])

        def loss(self, batch):
            return 0.5 * (model() - Y).square().sum()

        def batch(self, step):
            return None

    task = Task()
    task.model = model
    out = BalancedSharpnessProbe(tol=1e-8)(ProbeContext(task, "lora", "sgd", 0.1, 0, None))
    assert out["sharpness_balanced/lambda_max"] == pytest.approx(
        2 * float(torch.linalg.matrix_norm(Y, ord=2)), rel=1e-6)
    assert {"sharpness_balanced/hvps", "sharpness_balanced/product_error",
            "sharpness_balanced/seconds"} <= set(out)
    task.model = None
    with pytest.raises(ValueError, match="sharpness_balanced.*task.model"):
        BalancedSharpnessProbe().check(task)


def test_factors_outside_the_model_are_refused():
    A, B, _, _ = _unbalanced_minimiser(5, 4, 2, seed=2)
    model = Factors(A, B)
    loose = [(nn.Parameter(A.clone()), nn.Parameter(B.clone()))]
    with pytest.raises(ValueError, match="not parameters of the Factors"):
        sharpness_at_balanced_factors(model, lambda: model().sum(), loose)


# ---------------------------------------------------------------- the trace interval

def test_trace_interval_prefers_the_estimators_own_and_else_is_a_t_interval():
    own = trace_interval(10.0, 1.0, {"ci_low": 7.0, "ci_high": 12.0, "confidence": 0.9}, 9)
    assert (own["low"], own["high"], own["confidence"], own["source"]) == \
        (7.0, 12.0, 0.9, "hessian_trace")
    # Hutch++ with 9 products: 3 sketch, 3 exact, 3 Hutchinson samples: t with 2 d.o.f.
    t = trace_interval(10.0, 1.0, {}, 9)
    assert t["high"] - 10.0 == pytest.approx(4.302653, rel=1e-6)
    assert 10.0 - t["low"] == pytest.approx(t["high"] - 10.0, rel=1e-12)
    hutchinson = trace_interval(10.0, 1.0, None, 9, method="hutchinson")  # 8 d.o.f.
    assert hutchinson["high"] - 10.0 == pytest.approx(2.306004, rel=1e-6)
    assert trace_interval(10.0, math.inf, None, 9)["high"] == math.inf  # no spread estimate


@pytest.mark.parametrize("n", [3, 5, 9, 12])
def test_trace_interval_rebuilds_the_estimators_own_interval(n):
    from reflora_analysis.probes import hessian_trace

    A, B, Y, _ = _unbalanced_minimiser(6, 5, 2, seed=4)
    model = Factors(A + 0.3, B)
    model.eval()
    closure = lambda: 0.5 * (model() - Y).square().sum()  # noqa: E731
    est, se, info = hessian_trace(model, closure, n_samples=n, return_info=True)
    if "ci_low" not in info:
        pytest.skip("hessian_trace reports no interval of its own")
    mine = trace_interval(est, se, None, n)
    assert mine["low"] == pytest.approx(info["ci_low"], rel=1e-12, abs=1e-12)
    assert mine["high"] == pytest.approx(info["ci_high"], rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        trace_interval(1.0, 1.0, None, 9, confidence=1.5)


# ---------------------------------------------------------------- over training (notebook 04)

def test_over_training_reflora_and_balance_share_the_balanced_view():
    """Under SGD RefLoRA and the balanced projection follow the same W (BASELINES.md section 5),
    so their balanced-factor sharpness agrees, while only the projection stores balanced
    factors (its stored and balanced values agree; RefLoRA's stored factors are sharper)."""
    from reflora_analysis.experiments.sharpness import sharpness_over_training

    data = sharpness_over_training(["reflora", "balance"], task="mf", steps=40, probe_every=20,
                                   trace_samples=6, tol=1e-8)
    runs = {r["method"]: r for r in data["runs"]}
    assert runs["reflora"]["step"] == [0, 20, 40]
    # Lanczos to 1e-8 relative; the two W trajectories agree to round-off: 1e-6 is loose
    np.testing.assert_allclose(runs["reflora"]["top_eigenvalue_balanced"],
                               runs["balance"]["top_eigenvalue_balanced"], rtol=1e-6)
    np.testing.assert_allclose(runs["balance"]["top_eigenvalue"][1:],
                               runs["balance"]["top_eigenvalue_balanced"][1:], rtol=1e-6)
    assert runs["reflora"]["top_eigenvalue"][-1] > 2 * runs["reflora"]["top_eigenvalue_balanced"][-1]
    assert all(lo <= tr <= hi for lo, tr, hi in zip(runs["reflora"]["trace_ci_low"],
                                                     runs["reflora"]["trace"],
                                                     runs["reflora"]["trace_ci_high"]))
    assert data["reference"]["two_sigma1_Y"] > 0
