"""The F8 bound with an estimated smoothness that holds along the step (issue 14).

``bound_step(L=None)`` used to take ``L`` = the top Hessian eigenvalue at ``W`` alone; on a
non-quadratic loss the "upper bound" then fell below the next loss. These tests use losses
with a known Hessian:

* quartic ``l(W) = 1/4 ||W - Y||_F^4``: Hessian ``q I + 2 r r^T`` (``r = vec(W - Y)``,
  ``q = ||r||^2``), so ``lambda_max = 3 q`` at every point and the curvature grows along a
  step that overshoots. Along any segment ``phi(t) = l(W + t dW)`` is a quartic polynomial
  with ``phi''`` convex in ``t``, so its maximum on [0, 1] is at an end, both of which the
  estimate samples: the estimated bound holds for every draw, even with margin 0;
* least squares ``l(W) = 1/2 ||X W^T - Y||_F^2``: Hessian ``X^T X (x) I``, ``L = lambda_max(X^T X)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis.methods import single_step_update
from reflora_analysis.pairs import LoraPair, find_lora_pairs
from reflora_analysis.probes import ProbeContext, make_probes
from reflora_analysis.probes.bounds import (bound_line_scan, bound_step, estimate_smoothness,
                                            joint_bound_step, segment_smoothness, top_curvature)

torch.set_num_threads(1)
F64 = torch.float64


def quartic(Y):
    return lambda W: 0.25 * (W - Y).square().sum().square()


def least_squares(X, Yt):
    return lambda W: 0.5 * (X @ W.T - Yt).square().sum()  # W: m x n, X: k x n


@st.composite
def factor_cases(draw):
    m, n = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.randn(k, r, generator=g, dtype=F64) for k in (m, n))
    return A, B, torch.randn(m, n, generator=g, dtype=F64), g


def overshooting_lr(A, B, Y) -> float:
    """30 / (||A B^T - Y||^2 max(||A||_2^2, ||B||_2^2)): the LoRA step's relative change of the
    residual is ~30, far past the minimum, where the curvature is ~ (30)^2 times larger."""
    q = float((A @ B.T - Y).square().sum())
    s = max(float(torch.linalg.matrix_norm(X, 2)) ** 2 for X in (A, B))
    return 30.0 / (q * s)


# ---------------------------------------------------------------- known Hessians

@settings(max_examples=15)
@given(factor_cases())
def test_top_curvature_is_the_known_lambda_max_of_the_quartic(case):
    A, B, Y, _ = case
    W = A @ B.T
    q = float((W - Y).square().sum())
    value, hvps = top_curvature(quartic(Y), W)
    # eigsh tol 1e-8 (relative); the spectrum is {3q, q, ..., q}: gap 2q
    assert value == pytest.approx(3 * q, rel=1e-6) and hvps >= 1
    assert estimate_smoothness(quartic(Y), W)[0] == pytest.approx(3 * q, rel=1e-6)


def test_top_curvature_is_the_largest_algebraic_eigenvalue_of_an_indefinite_hessian():
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))[0]
    spectrum = torch.tensor([-40.0, -3, -1, 0.5, 1, 1, 2, 2, 3, 4, 5, 8.5], dtype=F64)
    H = Q @ torch.diag(spectrum) @ Q.T
    loss = lambda W: 0.5 * W.reshape(-1) @ H @ W.reshape(-1)  # noqa: E731  W: 3 x 4
    value, _ = top_curvature(loss, torch.zeros(3, 4, dtype=F64))
    assert value == pytest.approx(8.5, rel=1e-6)  # not -40, the largest magnitude
    assert estimate_smoothness(loss, torch.zeros(3, 4, dtype=F64))[0] == pytest.approx(8.5, rel=1e-6)


@settings(max_examples=15)
@given(factor_cases(), st.sampled_from([0.0, 0.1, 0.5]))
def test_on_a_quadratic_the_segment_estimate_is_the_exact_L(case, margin):
    A, B, _, g = case
    m, n = A.shape[0], B.shape[0]
    X = torch.randn(n + 3, n, generator=g, dtype=F64)
    Yt = torch.randn(n + 3, m, generator=g, dtype=F64)
    loss, W = least_squares(X, Yt), A @ B.T
    L_exact = float(torch.linalg.eigvalsh(X.T @ X)[-1])
    dW = torch.randn(m, n, generator=g, dtype=F64)
    hess = segment_smoothness(loss, W, dW, curvature="hessian", points=3, margin=margin)
    # eigsh at relative tol 1e-8; 1e-6 leaves room for ARPACK's stopping test
    assert hess["L_sampled"] == pytest.approx(L_exact, rel=1e-6)
    assert hess["L"] == pytest.approx((1 + margin) * L_exact, rel=1e-6)
    assert hess["values"] == pytest.approx([L_exact] * 3, rel=1e-6) and hess["margin"] == margin
    # along the step: the Rayleigh quotient <dW, H dW> / ||dW||^2 = ||X dW^T||^2 / ||dW||^2,
    # the same at every point (float64 double backward: 1e-10 relative)
    rayleigh = float((X @ dW.T).square().sum() / dW.square().sum())
    direc = segment_smoothness(loss, W, dW, margin=margin)
    assert direc["curvature"] == "directional" and direc["points"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert direc["values"] == pytest.approx([rayleigh] * 5, rel=1e-10)
    assert direc["L"] == pytest.approx((1 + margin) * rayleigh, rel=1e-10) and direc["hvps"] == 5


# ---------------------------------------------------------------- the bound holds along the step

@settings(max_examples=20)
@given(factor_cases(), st.sampled_from(["lora", "reflora"]))
def test_local_L_violates_on_the_quartic_and_the_segment_L_does_not(case, method):
    A, B, Y, _ = case
    loss, lr = quartic(Y), overshooting_lr(A, B, Y)
    L_local, _ = estimate_smoothness(loss, A @ B.T)
    old = bound_step(method, A, B, loss, lr, L_local)
    assert old["violations"] == 1 and old["next_loss"] > old["U_exact"]  # the old L=None
    assert old["L_needed"] > L_local
    for curvature in ("directional", "hessian"):
        for margin in (0.0, 0.1):  # phi'' is convex here: the sampled ends bound it exactly
            new = bound_step(method, A, B, loss, lr, curvature=curvature, margin=margin)
            assert new["smoothness"]["source"] == "segment"
            assert new["violations"] == 0, (curvature, margin)
            assert new["L_needed"] <= new["L"] * (1 + 1e-9)
            assert new["U_exact"] <= new["U_relaxed"] * (1 + 1e-12)  # F8b still above F8a
            assert new["next_loss"] == old["next_loss"]  # the same step, only L differs
    # directional: the weakest L this step needs <= the Hessian's (every direction)
    direc = bound_step(method, A, B, loss, lr)
    hess = bound_step(method, A, B, loss, lr, curvature="hessian")
    assert direc["L"] <= hess["L"] * (1 + 1e-6)


@settings(max_examples=10)
@given(factor_cases())
def test_violations_count_an_L_that_is_too_small(case):
    A, B, Y, _ = case
    loss, lr = quartic(Y), overshooting_lr(A, B, Y)
    new = bound_step("lora", A, B, loss, lr)
    assert new["violations"] == 0
    small = bound_step("lora", A, B, loss, lr, 0.5 * new["L_needed"])
    assert small["violations"] == 1 and small["smoothness"]["source"] == "given"
    # a quadratic with a positive definite Hessian: L = 0 drops the positive curvature term
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B.shape[0] + 4, B.shape[0], generator=g, dtype=F64)
    Yt = torch.randn(B.shape[0] + 4, A.shape[0], generator=g, dtype=F64)
    ls = least_squares(X, Yt)
    W = A @ B.T
    Wv = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(ls(Wv), Wv)
    etas = np.logspace(-4, -1, 5)
    estimated = bound_line_scan(A, B, G, ls, None, etas)
    zero = bound_line_scan(A, B, G, ls, 0.0, etas)
    for tag in ("lora", "reflora"):
        assert estimated[f"violations_{tag}"] == 0
        assert zero[f"violations_{tag}"] == len(etas)
    # the scan's L at each eta is shared by LoRA and RefLoRA, so F8b's order stays (S* minimises U)
    assert np.all(estimated["U_relaxed_reflora"] <= estimated["U_relaxed_lora"] * (1 + 1e-12))
    assert estimated["L"].shape == etas.shape and len(estimated["smoothness"]) == len(etas)


def test_bad_smoothness_options_are_one_line_value_errors():
    A, B = torch.ones(3, 1, dtype=F64), torch.ones(2, 1, dtype=F64)
    loss = quartic(torch.zeros(3, 2, dtype=F64))
    for kw, match in (({"curvature": "lanczos"}, "curvature must be one of directional, hessian"),
                      ({"points": 1}, "points must be an integer >= 2"),
                      ({"margin": -0.1}, "margin must be a finite number >= 0")):
        with pytest.raises(ValueError, match=match):
            bound_step("lora", A, B, loss, 0.1, **kw)
        with pytest.raises(ValueError, match=match):
            make_probes("bound", **kw)
    with pytest.raises(ValueError, match="L must be a finite number >= 0 or None"):
        bound_step("lora", A, B, loss, 0.1, -1.0)


# ---------------------------------------------------------------- several layers (real models)

class TwoLayers(nn.Module):
    """Two adapted weights ``W_i = W0_i + s_i A_i B_i^T`` coupled by a quartic loss."""

    def __init__(self, g, scalings=(1.0, 0.5)):
        super().__init__()
        self.A1, self.B1 = (nn.Parameter(torch.randn(k, 2, generator=g, dtype=F64)) for k in (4, 3))
        self.A2, self.B2 = (nn.Parameter(torch.randn(k, 2, generator=g, dtype=F64)) for k in (3, 5))
        self.W01, self.W02 = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
        self.C = torch.randn(4, 5, generator=g, dtype=F64)
        self.scalings = scalings

    def loss_of(self, W1, W2):
        return 0.25 * (W1 @ W2 - self.C).square().sum().square() + 0.5 * W2.square().sum()

    def weights(self):
        s1, s2 = self.scalings
        return self.W01 + s1 * self.A1 @ self.B1.T, self.W02 + s2 * self.A2 @ self.B2.T

    def forward(self):
        return self.loss_of(*self.weights())


@pytest.mark.parametrize("method", ["lora", "reflora"])
def test_joint_bound_moves_every_layer_at_once(method):
    model = TwoLayers(torch.Generator().manual_seed(7))
    pairs = [LoraPair("W1", model.A1, model.B1, 1.0, b_transposed=False),
             LoraPair("W2", model.A2, model.B2, 0.5, b_transposed=False)]
    lr = 1e-3
    res = joint_bound_step(model, model, pairs, method, lr)
    # the reference: each layer's own step from its G_i = s_i dl/dW_i, applied together
    W1, W2 = (w.detach().clone().requires_grad_(True) for w in model.weights())
    loss = model.loss_of(W1, W2)
    G1, G2 = torch.autograd.grad(loss, (W1, W2))
    loss, W1, W2 = loss.detach(), W1.detach(), W2.detach()
    d1 = single_step_update(method, model.A1.detach(), model.B1.detach(), G1, lr)
    d2 = single_step_update(method, model.A2.detach(), model.B2.detach(), 0.5 * G2, lr)
    # 1e-10: float64 round-off of the substituted forward and the range finder
    assert res["loss"] == pytest.approx(float(loss), rel=1e-10)
    assert res["next_loss"] == pytest.approx(float(model.loss_of(W1 + d1, W2 + 0.5 * d2)), rel=1e-10)
    first = float((G1 * d1).sum() + (0.5 * G2 * d2).sum())
    norm2 = float(d1.square().sum() + d2.square().sum())
    assert res["U_exact"] == pytest.approx(float(loss) + first + 0.5 * res["L"] * norm2, rel=1e-10)
    assert res["violations"] == 0 and res["layers"] == 2 and res["L_needed"] <= res["L"]
    assert res["U_exact"] <= res["U_relaxed"]
    assert model.A1.grad is None and model.training  # the model is left as it was


@dataclass
class ModelOnlyTask:
    """A single-layer problem seen as a model task (no loss_in_W): the joint path."""

    model: nn.Module
    pairs: list
    name: str = "model-only"

    def loss(self, batch):
        return self.model()

    def batch(self, step):
        return None


class OneLayer(nn.Module):
    def __init__(self, A, B, Y):
        super().__init__()
        self.A, self.B, self.Y = nn.Parameter(A.clone()), nn.Parameter(B.clone()), Y

    def forward(self):
        return quartic(self.Y)(self.A @ self.B.T)


@settings(max_examples=8)
@given(factor_cases())
def test_the_joint_path_equals_the_single_layer_path(case):
    A, B, Y, _ = case
    lr = overshooting_lr(A, B, Y) / 30  # a moderate step
    model = OneLayer(A, B, Y)
    task = ModelOnlyTask(model, find_lora_pairs([(model.A, model.B)]))
    out = make_probes("bound", relaxed=True)[0](ProbeContext(task, "reflora", "sgd", lr, 0, None))
    ref = bound_step("reflora", A, B, quartic(Y), lr)
    for key in ("loss", "next_loss", "U_exact", "U_relaxed", "L"):
        assert out[f"bound/{key}"] == pytest.approx(ref[key], rel=1e-9), key  # float64 round-off
    assert out["bound/violations"] == 0 and out["bound/L_estimated"] == 1.0
    assert out["bound/layers"] == 1.0 and out["bound/L_points"] == 5.0
    default = make_probes("bound")[0](ProbeContext(task, "reflora", "sgd", lr, 0, None))
    assert default["bound/U_relaxed"] == out["bound/U_relaxed"]  # on by default (cheap: r x r)
    off = make_probes("bound", relaxed=False)[0](ProbeContext(task, "reflora", "sgd", lr, 0, None))
    assert math.isnan(off["bound/U_relaxed"])
    assert default["bound/U_exact"] == off["bound/U_exact"] == out["bound/U_exact"]


@pytest.mark.slow
def test_bound_probe_on_a_tiny_real_model_past_step_0():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from reflora_analysis.tasks import make_task
    from reflora_analysis.train import run

    task = make_task("seq-cls", seed=0, quick=True)
    # a step size at which the second-order term is far above float32 round-off
    records = run(task, "lora", optimizer="sgd", lr=5.0, steps=3,
                  probes=make_probes("bound", points=3, relaxed=True), probe_every=1,
                  progress=False)
    probed = [r for r in records if "bound/U_exact" in r]
    assert [r["step"] for r in probed] == [0, 1, 2, 3]
    for r in probed[1:]:
        assert r["bound/layers"] == len(task.pairs) > 1 and r["bound/L_estimated"] == 1.0
        for key in ("loss", "next_loss", "U_exact", "U_relaxed", "L", "L_needed", "slack_exact"):
            assert math.isfinite(r[f"bound/{key}"]), key
        assert r["bound/violations"] == 0 and r["bound/hvps"] == 3
        assert r["bound/next_loss"] < r["bound/loss"]  # a descent step, visible above round-off
