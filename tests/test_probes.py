"""Tests of reflora_analysis.probes against known answers (THEORY.md F6, F8, F9)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis import theory
from reflora_analysis.methods import build_optimizer, single_step_update
from reflora_analysis.pairs import find_lora_pairs
from reflora_analysis.probes import (FlatSliceWarning, ProbeContext, available_probes,
                                     bound_line_scan, consistency_score, consistency_table,
                                     eigenvalue_density,
                                     gradient_in_W, hessian_trace, lanczos_top_eigenvalues,
                                     loss_landscape, make_probes, preconditioner_for,
                                     top_hessian_eigenvalue)

torch.set_num_threads(1)
F64 = torch.float64


class Factors(nn.Module):
    """``W = W0 + A B^T`` with A (m x r), B (n x r) in paper orientation; dropout for mode tests."""

    def __init__(self, A, B, W0=None, dropout=0.0):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.B = nn.Parameter(B.clone())
        self.register_buffer("W0", torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype)
                             if W0 is None else W0.clone())
        self.drop = nn.Dropout(dropout)

    def weight(self):
        return self.W0 + self.A @ self.B.T


@dataclass
class MFTask:
    """A single-layer task with the fields probes use (the tasks registry's Task contract)."""

    model: Factors
    Y: torch.Tensor
    name: str = "mf-test"

    def __post_init__(self):
        self.pairs = find_lora_pairs([(self.model.A, self.model.B)])
        self.W0 = self.model.W0
        self.smoothness = 1.0  # l(W) = 1/2 ||W - Y||^2 has Hessian I

    def loss_in_W(self, W):
        return 0.5 * (W - self.Y).square().sum()

    def loss(self, batch):
        return self.loss_in_W(self.model.drop(self.model.weight()))

    def batch(self, step):
        return None


def balanced_minimiser(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    U, s, Vh = torch.linalg.svd(Y)
    return U[:, :r] * s[:r].sqrt(), Vh[:r].T * s[:r].sqrt(), Y, g


def f9_closed_form(A, B):
    return float(theory.spectral_norm(A) ** 2 + theory.spectral_norm(B) ** 2)


# ---------------------------------------------------------------- sharpness (F9)

@pytest.mark.parametrize("method", ["lanczos", "pyhessian"])
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_f9_top_eigenvalue_at_minimiser(method, balanced, seed):
    A, B, Y, g = balanced_minimiser(9, 7, 3, seed)
    if not balanced:  # an unbalanced factorization of the same minimiser
        P = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))[0] @ torch.diag(
            torch.tensor([3.0, 1.0, 0.4], dtype=F64))
        A, B = theory.refactor(A, B, P)
    model = Factors(A, B)
    value, info = top_hessian_eigenvalue(model, lambda: 0.5 * (model.weight() - Y).square().sum(),
                                         method=method, tol=1e-3, return_info=True, seed=seed)
    exact = f9_closed_form(A, B)
    if balanced:  # F9: equality 2 sigma_1(Y) at the balanced factorization
        assert exact == pytest.approx(2 * float(theory.spectral_norm(Y)), rel=1e-12)
    else:
        assert exact > 2 * float(theory.spectral_norm(Y)) * 1.1
    # tolerance: the brief's 1e-3 relative for both paths
    assert abs(value - exact) <= 1e-3 * exact
    assert info["converged"] and info["residual"] <= 1e-3 * abs(value) and info["hvps"] >= 2


def test_lanczos_matches_eigvalsh_and_residual_bounds_error():
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))[0]
    lam = torch.cat([torch.tensor([5.0, 4.9, 4.0], dtype=F64), torch.rand(197, generator=g, dtype=F64) * 3 - 1])
    H = (Q * lam) @ Q.T
    info = lanczos_top_eigenvalues(lambda v: H @ v, 200, k=3, tol=1e-8, seed=0)
    exact = torch.linalg.eigvalsh(H).flip(0)[:3].tolist()
    assert info["converged"]
    for v, e, res in zip(info["values"], exact, info["residuals"]):
        assert abs(v - e) <= res + 1e-12  # the residual bound bounds the true error
        assert abs(v - e) <= 1e-8 * abs(e)


@pytest.mark.parametrize("method", ["lanczos", "pyhessian"])
def test_top_k_eigenvalues_both_paths(method):
    model, closure, H = _quadratic_model(d=40, seed=5)
    values, info = top_hessian_eigenvalue(model, closure, method=method, k=3, tol=1e-6,
                                          return_info=True)
    exact = torch.linalg.eigvalsh(H).flip(0)[:3].tolist()
    # the 1e-6 residual bound bounds each error (the top 3 are separated from the rest)
    assert values == pytest.approx(exact, rel=1e-5) and len(info["residual"]) == 3


def test_sharpness_bad_input():
    model = Factors(torch.ones(3, 1, dtype=F64), torch.ones(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="unknown method"):
        top_hessian_eigenvalue(model, lambda: model.weight().sum(), method="power")
    with pytest.raises(ValueError, match="scalar"):
        top_hessian_eigenvalue(model, lambda: model.weight())


def _quadratic_model(d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    # a decaying spectrum with a few negative eigenvalues (an indefinite Hessian)
    lam = 20.0 / torch.arange(1, d + 1, dtype=F64) - 0.2
    H = (Q * lam) @ Q.T
    x = nn.Parameter(torch.randn(d, generator=g, dtype=F64))
    model = nn.Module()
    model.x = x
    return model, (lambda: 0.5 * x @ (H @ x)), H


def test_hutchpp_trace_within_three_standard_errors():
    model, closure, H = _quadratic_model()
    est, se = hessian_trace(model, closure, n_samples=30, seed=1)
    exact = float(H.trace())
    # 3 standard errors: a ~99.7% interval for the (near-Gaussian) Hutchinson part
    assert 0 < se and abs(est - exact) <= 3 * se
    est_h, se_h = hessian_trace(model, closure, n_samples=30, method="hutchinson", seed=1)
    assert abs(est_h - exact) <= 3 * se_h and se < se_h  # Hutch++ deflation shrinks the error


def test_slq_density_integrates_to_one_and_has_the_right_mean():
    model, closure, H = _quadratic_model()
    out = eigenvalue_density(model, closure, n_v=8, n_iter=30)
    integral = np.trapezoid(out["density"], out["grid"])
    assert integral == pytest.approx(1.0, abs=1e-3)  # grid covers nodes +- 5 sigma
    mean = np.trapezoid(out["grid"] * out["density"], out["grid"])
    exact_mean = float(H.trace()) / H.shape[0]
    # SLQ mean is a Hutchinson estimate of tr(H)/d with 8 vectors: 20% is ~4 standard errors
    assert mean == pytest.approx(exact_mean, rel=0.2)


# ---------------------------------------------------------------- consistency (F6)

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 4))
def test_consistency_exact_for_reflora_and_scaledgd_not_lora(seed, r):
    g = torch.Generator().manual_seed(seed)
    m, n = 8, 6
    A = torch.randn(m, r, generator=g, dtype=F64)
    B = torch.randn(n, r, generator=g, dtype=F64)
    Y = torch.randn(m, n, generator=g, dtype=F64)
    grad_fn = lambda W: W - Y  # noqa: E731
    # 1e-8: round-off of a few r x r solves with cond(P) <= 4 is ~1e-13. damping=0: the
    # default relative damping (1e-8) perturbs S* and hence the invariance at that order.
    assert consistency_score("reflora", A, B, grad_fn, seed=seed, damping=0.0) < 1e-8
    assert consistency_score("scaledgd", A, B, grad_fn, seed=seed, damping=0.0) < 1e-8
    # plain LoRA: dW = -eta (A A^T G + G B B^T) + ...; P with singular values in [0.5, 2]
    # changes A A^T by O(1) relative
    assert consistency_score("lora", A, B, grad_fn, seed=seed) > 1e-2


def test_consistency_bad_input():
    A, B = torch.randn(4, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="grad_fn returned shape"):
        consistency_score("lora", A, B, lambda W: W.T)
    with pytest.raises(ValueError, match="zero update"):
        consistency_score("lora", A, B, lambda W: torch.zeros_like(W))


def test_gradient_in_W_matches_autograd():
    A, B, Y, _ = balanced_minimiser(5, 4, 2, 7)
    Y = Y + 1.0
    model = Factors(A, B)
    pairs = find_lora_pairs([(model.A, model.B)])
    (G,) = gradient_in_W(model, lambda: 0.5 * (model.weight() - Y).square().sum(), pairs)
    torch.testing.assert_close(G, model.weight().detach() - Y, rtol=1e-12, atol=1e-12)
    assert model.A.shape == (5, 2) and model.B.shape == (4, 2)


def test_gradient_in_W_while_an_older_graph_is_alive():
    """A training step's graph (kept alive by its ``loss``, as train.run keeps it until the next
    step) holds the parameters' gradient accumulators; G must be computed without changing
    their shape, and the parameters, their grads and that graph must be left usable."""
    A, B, Y, _ = balanced_minimiser(5, 4, 2, 7)
    Y = Y + 1.0
    model = Factors(A, B)
    pairs = find_lora_pairs([(model.A, model.B)])
    closure = lambda: 0.5 * (model.weight() - Y).square().sum()  # noqa: E731
    loss = closure()
    loss.backward(retain_graph=True)
    snap = _snapshot(model)
    (G,) = gradient_in_W(model, closure, pairs)
    torch.testing.assert_close(G, model.weight().detach() - Y, rtol=1e-12, atol=1e-12)
    _assert_same(model, snap)
    grads = [model.A.grad.clone(), model.B.grad.clone()]
    loss.backward()  # the old graph still accumulates into the same parameters
    torch.testing.assert_close(model.A.grad, 2 * grads[0], rtol=0, atol=0)
    torch.testing.assert_close(model.B.grad, 2 * grads[1], rtol=0, atol=0)


def test_gradient_in_W_substitutes_factors_without_touching_the_parameters():
    A, B, Y, _ = balanced_minimiser(6, 5, 2, 3)
    model = Factors(A, B)
    pairs = find_lora_pairs([(model.A, model.B)])
    seen = []

    def closure():
        seen.append((model.A, tuple(model.A.shape), pairs[0].a.shape))
        return 0.5 * (model.weight() - Y).square().sum()

    gradient_in_W(model, closure, pairs)
    inside, shape, param_shape = seen[0]
    assert inside is not pairs[0].a and shape == (6, 2 + 5)  # a widened stand-in [A, 0]
    assert param_shape == (6, 2)  # the parameter itself never changed shape
    assert model.A is pairs[0].a  # and is back in the module


class _TwoLayerTask:
    """Two LoRA pairs and no loss_in_W: what a Hugging Face task looks like to the probes."""

    name = "two-layer"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.model = nn.ModuleList([Factors(torch.randn(4, 2, generator=g, dtype=F64),
                                            torch.randn(3, 2, generator=g, dtype=F64))
                                    for _ in range(2)])
        self.pairs = find_lora_pairs([(f.A, f.B) for f in self.model])
        self.Y = torch.randn(4, 3, generator=g, dtype=F64)
        self.loss_in_W = None

    def loss(self, batch):
        return sum(0.5 * (f.weight() - self.Y).square().sum() for f in self.model)

    def batch(self, step):
        return None


def test_probes_declare_what_they_need():
    from reflora_analysis.probes import supported_probes
    mf = MFTask(Factors(torch.ones(3, 1, dtype=F64), torch.ones(2, 1, dtype=F64)),
                torch.zeros(3, 2, dtype=F64))
    two = _TwoLayerTask()
    assert supported_probes(mf) == available_probes()
    # a model holding its LoRA factors supports every probe (bound along the step's direction)
    assert supported_probes(two) == available_probes()
    for probe in make_probes(available_probes()):
        probe.check(mf)
    with pytest.raises(ValueError, match=r"^probe 'bound' cannot run on task 'two-layer': "
                                         r"curvature 'hessian' needs a single-layer task"):
        make_probes("bound", curvature="hessian")[0].check(two)
    two.model = None
    with pytest.raises(ValueError, match=r"^probe 'bound' cannot run on task 'two-layer': it "
                                         r"needs a single-layer task with loss_in_W"):
        make_probes("bound")[0].check(two)
    two.model = nn.ModuleList()
    two.pairs = []
    for name in ("balance", "consistency"):
        with pytest.raises(ValueError, match=f"probe '{name}' cannot run on task 'two-layer'"):
            make_probes(name)[0].check(two)


def test_make_probes_takes_names_lists_and_callables():
    def mine(ctx):
        return {}
    probes = make_probes(["balance,consistency", mine, "sharpness"], tol=1e-2)
    assert [getattr(p, "name", None) for p in probes] == ["balance", "consistency", None,
                                                          "sharpness"]
    assert probes[2] is mine and probes[3].tol == 1e-2
    assert make_probes(mine) == [mine]
    with pytest.raises(ValueError, match="unknown probe 'x'; valid: balance, consistency"):
        make_probes(["balance", "x"])
    with pytest.raises(TypeError, match="a probe must be"):
        make_probes(["balance", 3])


def test_a_probe_leaves_the_global_rng_alone():
    """Training draws dropout masks from the global RNG: a probe must not shift that stream."""
    from reflora_analysis.probes import Probe

    class Noisy(Probe):
        name = "noisy"

        def measure(self, ctx):
            return {"noisy/draw": float(torch.rand(()))}

    task = _TwoLayerTask()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Noisy()(ProbeContext(task, "lora", "sgd", 0.1, 0, None))
    assert torch.equal(torch.rand(3), expected)


def test_hessian_functions_show_progress_only_when_asked(capsys):
    g = torch.Generator().manual_seed(0)
    model = Factors(torch.randn(5, 2, generator=g, dtype=F64),
                    torch.randn(4, 2, generator=g, dtype=F64))
    closure = lambda: 0.5 * (model.weight() - 1.0).square().sum()  # noqa: E731
    for progress in (False, True):
        top_hessian_eigenvalue(model, closure, max_iter=4, progress=progress)
        hessian_trace(model, closure, n_samples=6, progress=progress)
        eigenvalue_density(model, closure, n_v=1, n_iter=3, progress=progress)
        err = capsys.readouterr().err
        for label in ("sharpness: Lanczos", "sharpness: trace (hutch++)", "sharpness: SLQ"):
            assert (label in err) is progress, (label, progress)


# ---------------------------------------------------------------- bounds (F8)

@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s", "balance"])
def test_bound_inequalities_along_an_mf_run(method):
    g = torch.Generator().manual_seed(0)
    m, n, r = 10, 8, 3
    Y = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    model = Factors(0.3 * torch.randn(m, r, generator=g, dtype=F64),
                    0.3 * torch.randn(n, r, generator=g, dtype=F64))
    task = MFTask(model, Y)
    probe = make_probes("bound")[0]
    lr = 0.05
    for step in range(30):
        out = probe(ProbeContext(task, method, "sgd", lr, step, None))
        scale = 1e-10 * max(1.0, abs(out["bound/loss"]))  # round-off allowance
        assert out["bound/next_loss"] <= out["bound/U_exact"] + scale
        # every method here is in the S-family (balance: BASELINES.md section 5), so F8b exists
        assert out["bound/U_exact"] <= out["bound/U_relaxed"] + scale
        A, B = model.A.detach(), model.B.detach()
        G = model.weight().detach() - Y
        # the probe's next loss is the loss the method's actual SGD step reaches (not the F2
        # formula the probe's own bound uses); rel 1e-12: float64 round-off of one step
        dW = single_step_update(method, A, B, G, lr)
        assert out["bound/next_loss"] == pytest.approx(task.loss_in_W(A @ B.T + dW).item(), rel=1e-12)
        opt, _ = build_optimizer(method, [(model.A, model.B)], lr=lr)
        model.A.grad, model.B.grad = G @ B, G.T @ A
        opt.step()  # the run itself, with the method's optimizer and transform
        model.A.grad = model.B.grad = None
    assert out["bound/loss"] < 0.5 * task.loss_in_W(torch.zeros(m, n, dtype=F64)).item()


def test_bound_line_scan_shapes_and_order():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 10, generator=g, dtype=F64)
    Yt = torch.randn(12, 6, generator=g, dtype=F64)
    L = float(torch.linalg.eigvalsh(X.T @ X)[-1])
    loss = lambda W: 0.5 * (X @ W.T - Yt).square().sum()  # noqa: E731  W: 6 x 10
    A = torch.randn(6, 2, generator=g, dtype=F64) * 2
    B = torch.randn(10, 2, generator=g, dtype=F64) * 0.3
    W = A @ B.T
    Wv = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(loss(Wv), Wv)
    etas = np.logspace(-5, -1, 9)
    out = bound_line_scan(A, B, G, loss, L, etas)
    for tag in ("lora", "reflora"):
        assert out[f"loss_{tag}"].shape == etas.shape
        assert np.all(out[f"loss_{tag}"] <= out[f"U_exact_{tag}"] + 1e-9)
        assert np.all(out[f"U_exact_{tag}"] <= out[f"U_relaxed_{tag}"] + 1e-9)
    assert np.all(out["U_relaxed_reflora"] <= out["U_relaxed_lora"] + 1e-9)  # S* minimises U
    with pytest.raises(ValueError, match="etas"):
        bound_line_scan(A, B, G, loss, L, [])


def test_bound_probe_needs_loss_in_W_or_a_model():
    task = MFTask(Factors(torch.ones(3, 1, dtype=F64), torch.ones(2, 1, dtype=F64)),
                  torch.zeros(3, 2, dtype=F64))
    task.loss_in_W, task.model = None, None
    with pytest.raises(ValueError, match="single-layer task with loss_in_W .* or task.model"):
        make_probes("bound")[0](ProbeContext(task, "lora", "sgd", 0.1, 0, None))
    task.model = Factors(torch.ones(3, 1, dtype=F64), torch.ones(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="does not hold the LoRA factors"):  # other tensors
        make_probes("bound")[0].check(task)


# ---------------------------------------------------------------- landscape

def test_landscape_centre_and_symmetry_for_quadratic():
    A, B, Y, g = balanced_minimiser(6, 5, 2, 4)
    model = Factors(A, B)
    closure = lambda: 0.5 * (model.weight() - Y).square().sum()  # noqa: E731
    for norm in ("filter", "rank", "delta-w"):
        out = loss_landscape(model, closure, normalization=norm, n_points=11, extent=0.5,
                             pairs=[(model.A, model.B)])
        mid = len(out["grid"]) // 2
        assert out["grid"][mid] == 0.0 and np.array_equal(out["grid"], -out["grid"][::-1])
        assert out["loss"][mid] == out["centre_loss"] == closure().item()
        if norm == "delta-w":  # a straight line in W through the minimiser of a quadratic
            np.testing.assert_allclose(out["loss"], out["loss"][::-1], rtol=1e-10, atol=1e-12)
    out2 = loss_landscape(model, closure, dims=2, directions=("random", "update"),
                          normalization="delta-w", n_points=5, pairs=[(model.A, model.B)])
    assert out2["loss"].shape == (5, 5) and out2["loss"][2, 2] == out2["centre_loss"]


def test_landscape_invariances():
    A, B, Y, g = balanced_minimiser(6, 5, 2, 5)
    Y = Y + 0.1 * torch.randn(6, 5, generator=g, dtype=F64)

    def slice_of(a, b, norm):
        model = Factors(a, b)
        return loss_landscape(model, lambda: 0.5 * (model.weight() - Y).square().sum(),
                              normalization=norm, n_points=7, seed=3,
                              pairs=[(model.A, model.B)])["loss"]

    C = torch.diag(torch.tensor([5.0, 0.2], dtype=F64))  # per-rank rescale, same function
    P = torch.tensor([[2.0, 1.0], [0.3, 0.7]], dtype=F64)  # general GL(2)
    np.testing.assert_allclose(slice_of(A, B, "rank"), slice_of(*theory.refactor(A, B, C), "rank"),
                               rtol=1e-10)
    np.testing.assert_allclose(slice_of(A, B, "delta-w"),
                               slice_of(*theory.refactor(A, B, P), "delta-w"), rtol=1e-10)
    # literal filter normalisation is not invariant to the per-rank rescale (PROBES.md)
    diff = np.abs(slice_of(A, B, "filter") - slice_of(*theory.refactor(A, B, C), "filter")).max()
    assert diff > 1e-3


def test_landscape_flat_start_is_reported():
    A = torch.randn(6, 2, dtype=F64)
    model = Factors(A, torch.zeros(5, 2, dtype=F64))
    Y = torch.randn(6, 5, dtype=F64)
    closure = lambda: 0.5 * (model.weight() - Y).square().sum()  # noqa: E731
    with pytest.warns(FlatSliceWarning, match="B = 0"):
        out = loss_landscape(model, closure, normalization="filter", n_points=5,
                             pairs=[(model.A, model.B)])
    assert out["flat_start"] and out["flat"]
    with pytest.warns(FlatSliceWarning, match="unit Frobenius"):
        out = loss_landscape(model, closure, normalization="delta-w", n_points=5,
                             pairs=[(model.A, model.B)])
    assert not out["flat"]
    with pytest.raises(ValueError, match="odd"):
        loss_landscape(model, closure, n_points=4)


# ---------------------------------------------------------------- callbacks and state

def _snapshot(model):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
            [p.requires_grad for p in model.parameters()],
            [m.training for m in model.modules()])


def _assert_same(model, snap):
    values, grads, req, modes = snap
    for p, v, g, rq in zip(model.parameters(), values, grads, req):
        assert torch.equal(p.detach(), v) and p.requires_grad == rq
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1])
    assert [m.training for m in model.modules()] == modes


def test_probes_leave_model_untouched_and_report_cost():
    g = torch.Generator().manual_seed(2)
    model = Factors(torch.randn(7, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64),
                    dropout=0.5)
    task = MFTask(model, torch.randn(7, 5, generator=g, dtype=F64))
    model.train()
    model.A.grad = torch.randn(7, 2, dtype=F64)  # a grad left by the training step; B has none
    snap = _snapshot(model)
    probes = make_probes("balance,consistency,sharpness,bound", trace_samples=9)
    for probe in probes:
        out = probe(ProbeContext(task, "reflora", "sgd", 0.01, 3, None))
        assert f"{probe.name}/seconds" in out and all(isinstance(v, float) for v in out.values())
        _assert_same(model, snap)
    assert out["bound/hvps"] == 0
    sharp = probes[2](ProbeContext(task, "reflora", "sgd", 0.01, 3, None))
    assert sharp["sharpness/hvps"] >= 9 and sharp["sharpness/lambda_max"] > 0
    for norm in ("filter", "delta-w"):
        loss_landscape(model, lambda: task.loss(None), normalization=norm, n_points=3,
                       directions="update", pairs=task.pairs)
        _assert_same(model, snap)
    top_hessian_eigenvalue(model, lambda: task.loss(None), method="pyhessian")
    _assert_same(model, snap)


def test_make_probes_errors():
    assert set(available_probes()) == {"balance", "consistency", "sharpness", "bound", "health"}
    with pytest.raises(ValueError, match="valid: balance, consistency, sharpness, bound, health"):
        make_probes("balance,sharpnes")
    with pytest.raises(ValueError, match="not accepted"):
        make_probes("balance", tol=1e-4)
    assert [p.name for p in make_probes(["sharpness"], tol=1e-4)] == ["sharpness"]


# ---------------------------------------------------------------- Hugging Face + PEFT

def test_hf_peft_model_through_math_attention():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)  # default attention implementation (sdpa)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                      lora_dropout=0.1, init_lora_weights=False))
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    # a regression head on the (layer-normed) states, so the loss has real curvature in LoRA
    closure = lambda: (model(**batch).last_hidden_state @ proj - 1.0).square().mean()  # noqa: E731
    model.train()
    snap = _snapshot(model)
    value, info = top_hessian_eigenvalue(model, closure, tol=1e-3, return_info=True)
    assert info["converged"] and math.isfinite(value) and abs(value) > 1e-3
    _assert_same(model, snap)
    # the PyHessian path through the dict-input adapter, on the CPU: power iteration finds the
    # largest-magnitude eigenvalue, here negative (|lambda_min| > lambda_max), and the shifted
    # run the largest algebraic one; all are certified to a 1e-3 residual, so 2e-3 apart at most
    lam_min = -top_hessian_eigenvalue(model, lambda: -closure(), tol=1e-3)
    assert lam_min < 0 and abs(lam_min) > value  # the case the unshifted power iteration gets wrong
    ph, ph_info = top_hessian_eigenvalue(model, closure, method="pyhessian", tol=1e-3,
                                         return_info=True)
    assert ph == pytest.approx(value, rel=2e-3)
    assert ph_info["largest_magnitude"] == pytest.approx(lam_min, rel=2e-3)
    _assert_same(model, snap)
    pairs = find_lora_pairs(model)
    Gs = gradient_in_W(model, closure, pairs)
    # check against the gradient of the (frozen) base weight, which is dl/dW (scaling folded)
    layer = model.get_submodule(pairs[0].name.split("[")[0])
    w = layer.base_layer.weight
    model.eval()
    w.requires_grad_(True)
    (gw,) = torch.autograd.grad(closure(), w)
    w.requires_grad_(False)
    model.train()
    torch.testing.assert_close(Gs[0], pairs[0].scaling * gw, rtol=1e-5, atol=1e-7)
    out = loss_landscape(model, closure, normalization="delta-w", n_points=3)
    assert out["loss"][1] == out["centre_loss"]
    _assert_same(model, snap)


def test_consistency_table_and_probe_flag_degenerate_start():
    table = consistency_table(["lora", "reflora"], n_problems=2, n_reparam=3,
                              hparams={"reflora": {"damping": 0.0}})
    assert table["reflora"]["max"] < 1e-8 < 1e-2 < table["lora"]["median"]
    g = torch.Generator().manual_seed(0)
    model = Factors(torch.randn(5, 2, generator=g, dtype=F64), torch.zeros(4, 2, dtype=F64))
    task = MFTask(model, torch.randn(5, 4, generator=g, dtype=F64))
    out = make_probes("consistency")[0](ProbeContext(task, "lora", "sgd", 0.1, 0, None))
    assert out["consistency/degenerate_layers"] == 1.0


def test_lanczos_float32_parameters_keep_float64_recurrence():
    A, B, Y, _ = balanced_minimiser(9, 7, 3, 11)
    model = Factors(A.float(), B.float())
    Yf = Y.float()
    value, info = top_hessian_eigenvalue(model, lambda: 0.5 * (model.weight() - Yf).square().sum(),
                                         return_info=True)
    # float32 HVPs carry ~1e-6 relative noise; the 1e-3 target is unaffected
    assert abs(value - f9_closed_form(A, B)) <= 1e-3 * f9_closed_form(A, B) and info["converged"]
    assert model.A.dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or float64"):
        m16 = Factors(A.bfloat16(), B.bfloat16())
        top_hessian_eigenvalue(m16, lambda: m16.weight().float().square().sum(), method="pyhessian")


def test_bound_probe_for_methods_outside_the_S_family():
    g = torch.Generator().manual_seed(4)
    model = Factors(torch.randn(6, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64))
    task = MFTask(model, torch.randn(6, 5, generator=g, dtype=F64))
    for method in ("scaledgd", "lora-pro"):
        out = make_probes("bound")[0](ProbeContext(task, method, "sgd", 0.05, 0, None))
        assert math.isnan(out["bound/U_relaxed"])  # F8b is defined for S = I, S*, s* I only
        # the descent lemma holds for any step of an L-smooth loss (L = 1 here, exact)
        assert out["bound/next_loss"] <= out["bound/U_exact"] + 1e-10 * out["bound/loss"]
        assert out["bound/next_loss"] < out["bound/loss"]


# ---------------------------------------------------------------- the step the run takes

def _mf_task(seed=5, m=7, n=5, r=2):
    g = torch.Generator().manual_seed(seed)
    model = Factors(torch.randn(m, r, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64))
    return MFTask(model, torch.randn(m, n, generator=g, dtype=F64))


def test_inactive_transform_is_probed_as_plain_lora():
    task = _mf_task()
    probes = make_probes("consistency,bound")
    run_hparams = {"warmup_steps": 5, "interval": 2, "damping": 0.0, "momentum": 0.0}

    def measure(method, active, hparams):
        ctx = ProbeContext(task, method, "sgd", 0.05, 3, None, hparams=hparams, active=active)
        return {k: v for p in probes for k, v in p(ctx).items() if not k.endswith("/seconds")}

    lora = measure("lora", True, {})
    warm = measure("reflora", False, run_hparams)
    refl = measure("reflora", True, run_hparams)
    # inactive: exactly plain LoRA's step (same computation, so equal to the last bit)
    for key in ("consistency/score", "bound/next_loss", "bound/U_exact", "bound/U_relaxed"):
        assert warm[key] == lora[key], key
    assert warm["consistency/method_active"] == warm["bound/method_active"] == 0.0
    # active: RefLoRA's step although the run's schedule hyper-parameters are in the context
    # (1e-8: float64 round-off of r x r solves, cond(P) <= 4; LoRA's spread is O(1))
    assert refl["consistency/score"] < 1e-8 < 1e-2 < lora["consistency/score"]
    assert refl["consistency/method_active"] == refl["bound/method_active"] == 1.0
    A, B = task.pairs[0].A.detach(), task.pairs[0].B.detach()
    dW = single_step_update("reflora", A, B, A @ B.T - task.Y, 0.05)
    assert refl["bound/next_loss"] == pytest.approx(task.loss_in_W(A @ B.T + dW).item(), rel=1e-12)


def test_method_names_are_normalised_and_unknown_ones_refused():
    task = _mf_task()
    bound = make_probes("bound")[0]
    ctx = lambda method: ProbeContext(task, method, "sgd", 0.05, 0, None)  # noqa: E731
    plain, spelled = bound(ctx("lora")), bound(ctx(" LoRA "))
    assert spelled["bound/next_loss"] == plain["bound/next_loss"]
    assert not math.isnan(spelled["bound/U_relaxed"])
    A, B = task.pairs[0].A.detach(), task.pairs[0].B.detach()
    grad_fn = lambda W: W - task.Y  # noqa: E731
    assert consistency_score("RefLoRA", A, B, grad_fn, damping=0.0) < 1e-8
    with pytest.raises(ValueError, match="unknown method 'loraa'; valid methods: lora"):
        bound(ctx("loraa"))
    with pytest.raises(ValueError, match="unknown method 'loraa'"):
        consistency_score("loraa", A, B, grad_fn)
    with pytest.raises(ValueError, match="unknown method"):
        preconditioner_for("reflora_s", A, B)
    # a schedule has no meaning for one step: refused instead of silently probing warm-up
    with pytest.raises(ValueError, match="warmup_steps describe a training schedule"):
        consistency_score("reflora", A, B, grad_fn, warmup_steps=2)


def test_balance_preconditioner_is_reflora_s_star():
    # BASELINES.md section 5: with SGD balance's W step equals RefLoRA's, so S = S*
    A, B = torch.randn(6, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    G = torch.randn(6, 4, dtype=F64)
    S = preconditioner_for("balance", A, B)
    torch.testing.assert_close(S, theory.optimal_preconditioner(A, B), rtol=0, atol=0)
    # 1e-12 relative: float64 round-off of the projection (SVD-free r x r algebra)
    torch.testing.assert_close(single_step_update("balance", A, B, G, 0.1),
                               theory.weight_update(A, B, G, 0.1, S), rtol=1e-12, atol=1e-14)


def test_degenerate_layer_threshold_uses_the_factor_precision():
    # B with singular values 1 and 1e-9: rank-deficient in float32 (eps ~1.2e-7), not in float64
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=F64))[0]
    B64 = U * torch.tensor([1.0, 1e-9], dtype=F64)
    A64 = torch.randn(5, 2, generator=g, dtype=F64)
    probe = make_probes("consistency")[0]
    for dtype, expected in ((torch.float64, 0.0), (torch.float32, 1.0)):
        task = MFTask(Factors(A64.to(dtype), B64.to(dtype)), torch.randn(5, 4, generator=g).to(dtype))
        out = probe(ProbeContext(task, "lora", "sgd", 0.1, 0, None))
        assert out["consistency/degenerate_layers"] == expected, dtype


def _peft_classifier():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"],
                                                      init_lora_weights=False))
    batch = {"input_ids": torch.randint(0, 50, (4, 6)), "labels": torch.tensor([0, 1, 2, 1])}

    @dataclass
    class ClsTask:
        model: nn.Module
        name: str = "peft-cls-test"

        def __post_init__(self):
            self.pairs = find_lora_pairs(self.model)

        def loss(self, b):
            return self.model(**b).loss

        def batch(self, step):
            return batch

    return ClsTask(model)


def test_sharpness_probe_differentiates_the_lora_factors_only(monkeypatch):
    from reflora_analysis.probes import sharpness as sharpness_module
    task = _peft_classifier()
    lora_ids = {id(t) for p in task.pairs for t in p.params}
    trainable = {id(p) for p in task.model.parameters() if p.requires_grad}
    assert trainable - lora_ids, "the test model must have a trainable head"
    seen = []
    original = sharpness_module.HessianOperator

    def spy(closure, params, **kw):
        seen.append({id(p) for p in params})
        return original(closure, params, **kw)

    monkeypatch.setattr(sharpness_module, "HessianOperator", spy)
    snap = _snapshot(task.model)
    ctx = ProbeContext(task, "reflora", "adamw", 1e-3, 0, None)
    out = make_probes("sharpness", trace_samples=3, max_iter=5)[0](ctx)
    assert seen and all(s == lora_ids for s in seen)  # Lanczos and the trace: LoRA only
    assert out["sharpness/hvps"] >= 3
    _assert_same(task.model, snap)
    seen.clear()
    make_probes("sharpness", trace_samples=0, max_iter=5, include_head=True)[0](ctx)
    assert seen == [trainable]
    _assert_same(task.model, snap)


def test_hessian_functions_take_a_parameter_subset():
    # f(x, y) = 1/2 x^T H x + 5 x.y + 50 y^2: the x-block of the Hessian is H alone
    model, closure_x, H = _quadratic_model(d=12, seed=2)
    model.y = nn.Parameter(torch.ones(12, dtype=F64))
    closure = lambda: closure_x() + 5 * model.x @ model.y + 50 * model.y.square().sum()  # noqa: E731
    x_only = [model.x]
    exact = torch.linalg.eigvalsh(H)
    for method in ("lanczos", "pyhessian"):
        value = top_hessian_eigenvalue(model, closure, method=method, tol=1e-6, params=x_only)
        # the 1e-6 residual bound bounds the relative error (PyHessian returns its own power
        # iteration's estimate, ~1e-6 off here), far below 1e-4; the full Hessian's top is ~100
        assert value == pytest.approx(float(exact[-1]), rel=1e-4), method
    full = top_hessian_eigenvalue(model, closure, tol=1e-8)
    assert full > 90  # 100 on the y-block, shifted by the coupling: the subset matters
    est, se = hessian_trace(model, closure, n_samples=36, params=x_only)
    # Hutch++ on 12 dimensions with 12 deflation vectors is exact up to round-off
    assert est == pytest.approx(float(H.trace()), abs=1e-8)
    dens = eigenvalue_density(model, closure, n_v=2, n_iter=12, params=x_only)
    assert dens["nodes"][0].max() == pytest.approx(float(exact[-1]), rel=1e-8)
    assert model.y.requires_grad and model.x.requires_grad
    with pytest.raises(ValueError, match="does not require grad"):
        top_hessian_eigenvalue(model, closure, params=[model.x.detach()])
    with pytest.raises(ValueError, match="params is empty"):
        hessian_trace(model, closure, params=[])
