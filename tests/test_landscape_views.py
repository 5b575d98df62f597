"""Landscape views across training (probes/landscape.py): interpolation between two states and
several trajectories on their PCA plane, in delta-W space (GL(r)-invariant, PROBES.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis import theory
from reflora_analysis.probes.landscape import (Snapshot, interpolation, plane_loss_grid,
                                               snapshot, trajectory_pca)

torch.set_num_threads(1)
F64 = torch.float64


class Factors(nn.Module):
    """``W = W0 + A B^T`` plus a trainable bias ``h`` (a stand-in for a head)."""

    def __init__(self, A, B, W0=None):
        super().__init__()
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.h = nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype))
        self.register_buffer("W0", torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype)
                             if W0 is None else W0.clone())

    def forward(self):
        return self.W0 + self.A @ self.B.T + self.h[:, None]


def _problem(m=6, n=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Factors(torch.randn(m, r, generator=g, dtype=F64),
                    torch.randn(n, r, generator=g, dtype=F64),
                    W0=torch.randn(m, n, generator=g, dtype=F64))
    Y = torch.randn(m, n, generator=g, dtype=F64)
    return model, Y, g, (lambda: 0.5 * (model() - Y).square().sum())


def _state(model, g, step=-1, scale=1.0):
    """A random state of ``model`` as a snapshot (the model itself is left as it was)."""
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
        snap = snapshot(model, [(model.A, model.B)], step=step)
        for p, v in zip(model.parameters(), saved):
            p.copy_(v)
    return snap


def _refactored(snap: Snapshot, P: torch.Tensor) -> Snapshot:
    """The same functions, other factorizations: ``(A P, B P^{-T})`` per layer."""
    return Snapshot(tuple(theory.refactor(A, B, P) for A, B in snap.factors), snap.scalings,
                    snap.others, snap.step)


def _vector(snap: Snapshot) -> np.ndarray:
    """The snapshot as one explicit vector: every layer's s A B^T, then the other tensors."""
    return torch.cat([M.reshape(-1) for M in snap.delta_w()]
                     + [h.reshape(-1) for h in snap.others]).numpy()


# ---------------------------------------------------------------- interpolation

def test_interpolation_endpoints_exact_and_delta_w_line_is_the_closed_form():
    model, Y, g, closure = _problem()
    s0, s1 = _state(model, g), _state(model, g)
    before = [p.detach().clone() for p in model.parameters()]
    out = interpolation(model, closure, s0, s1, pairs=[(model.A, model.B)], n_points=9)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), before))
    t = out["t"]
    assert t[0] == -0.25 and t[-1] == 1.25 and 0.0 in t and 1.0 in t
    for snap, value in ((s0, out["start_loss"]), (s1, out["end_loss"])):
        with torch.no_grad():  # the endpoint's own loss, bit for bit
            model.A.copy_(snap.factors[0][0])
            model.B.copy_(snap.factors[0][1])
            model.h.copy_(snap.others[0])
            assert value == float(closure())
    # W(t) = W0 + (1-t) M0 + t M1 (+ the bias, linear too): a quadratic in t, 1e-10 relative
    M0, M1 = s0.delta_w()[0], s1.delta_w()[0]
    h0, h1 = s0.others[0], s1.others[0]
    ref = [0.5 * float((model.W0 + (1 - x) * M0 + x * M1 + ((1 - x) * h0 + x * h1)[:, None]
                        - Y).square().sum()) for x in t]
    np.testing.assert_allclose(out["loss"], ref, rtol=1e-10)
    assert out["barrier"] <= 1e-9 * max(ref)  # convex in W: no barrier above the chord


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), r=st.integers(1, 3))
def test_delta_w_interpolation_is_invariant_to_refactoring_factor_space_is_not(seed, r):
    model, Y, g, closure = _problem(r=r, seed=seed)
    s0, s1 = _state(model, g), _state(model, g)
    P = torch.randn(r, r, generator=g, dtype=F64) + 2 * torch.eye(r, dtype=F64)
    Q = torch.diag(torch.logspace(-1, 1, r, dtype=F64))  # a per-rank rescale
    pairs = [(model.A, model.B)]
    kw = dict(pairs=pairs, n_points=7)
    plain = interpolation(model, closure, s0, s1, **kw)["loss"]
    moved = interpolation(model, closure, _refactored(s0, P), _refactored(s1, Q @ P), **kw)["loss"]
    # the same W(t): equal to round-off of the r x r refactorings (1e-9 relative)
    np.testing.assert_allclose(moved, plain, rtol=1e-9)
    f_plain = interpolation(model, closure, s0, s1, space="factors", **kw)
    f_moved = interpolation(model, closure, _refactored(s0, P), _refactored(s1, Q @ P),
                            space="factors", **kw)["loss"]
    ends = np.isin(f_plain["t"], [0.0, 1.0])
    # the endpoints are the same functions in both spaces; inside, the factor-space line
    # moves with the factorizations
    np.testing.assert_allclose(f_moved[ends], plain[ends], rtol=1e-9)
    assert np.abs(f_moved - f_plain["loss"]).max() > 1e-6 * np.abs(f_plain["loss"]).max()


def test_interpolation_refuses_bad_input():
    model, Y, g, closure = _problem()
    s0, s1 = _state(model, g), _state(model, g)
    pairs = [(model.A, model.B)]
    with pytest.raises(ValueError, match="unknown space"):
        interpolation(model, closure, s0, s1, pairs=pairs, space="weights")
    with pytest.raises(ValueError, match=r"t_range must contain \[0, 1\]"):
        interpolation(model, closure, s0, s1, pairs=pairs, t_range=(0.2, 1.0))
    other, _, g2, _ = _problem(r=3)
    with pytest.raises(ValueError, match="does not match the model"):
        interpolation(model, closure, s0, _state(other, g2), pairs=pairs)


# ---------------------------------------------------------------- PCA plane

def _reference_pca(snaps):
    X = np.stack([_vector(s) for s in snaps])
    Xc = X - X.mean(0)
    _, sv, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:2].T, sv[:2] ** 2 / (sv ** 2).sum(), Vt[:2], X.mean(0)


@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3))
def test_trajectory_pca_matches_an_explicit_svd_and_ignores_the_factorization(seed, sizes):
    model, _, g, _ = _problem(seed=seed)
    trajs = {f"m{i}": [_state(model, g, step=k) for k in range(n)] for i, n in enumerate(sizes)}
    if sum(sizes) < 3:
        trajs["m0"].append(_state(model, g, step=9))
    pca = trajectory_pca(trajs)
    snaps = [s for v in trajs.values() for s in v]
    coords, ratio, _, _ = _reference_pca(snaps)
    mine = np.concatenate(list(pca["coords"].values()))
    # the Gram route squares nothing that matters here: 1e-8 relative to the spread
    np.testing.assert_allclose(pca["explained_variance"], ratio, rtol=1e-8)
    for k in range(2):
        sign = np.sign(mine[:, k] @ coords[:, k])
        np.testing.assert_allclose(mine[:, k], sign * coords[:, k],
                                   atol=1e-8 * np.abs(coords).max())
    # GL(r): refactor every snapshot differently, same functions, same plane
    gen = torch.Generator().manual_seed(seed + 1)
    moved = {k: [_refactored(s, torch.randn(2, 2, generator=gen, dtype=F64)
                             + 3 * torch.eye(2, dtype=F64)) for s in v] for k, v in trajs.items()}
    pca2 = trajectory_pca(moved)
    np.testing.assert_allclose(pca2["explained_variance"], pca["explained_variance"], rtol=1e-8)
    for name in trajs:
        np.testing.assert_allclose(np.abs(pca2["coords"][name]), np.abs(pca["coords"][name]),
                                   atol=1e-8 * np.abs(coords).max())


def test_plane_grid_is_the_loss_on_the_plane_through_the_anchor():
    model, Y, g, closure = _problem(seed=3)
    trajs = {"a": [_state(model, g, k) for k in range(4)], "b": [_state(model, g, k) for k in range(3)]}
    pca = trajectory_pca(trajs, anchor=("b", -1))
    assert np.array_equal(pca["coords"]["b"][-1], [0.0, 0.0])
    before = [p.detach().clone() for p in model.parameters()]
    grid = plane_loss_grid(model, closure, pca, pairs=[(model.A, model.B)], n_grid=5)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), before))
    _, _, V, _ = _reference_pca([s for v in trajs.values() for s in v])
    V = V * np.sign(np.einsum("kd,kd->k", V, np.stack([  # the probe's signs
        sum(w * _vector(s) for w, s in zip(pca["weights"][:, k], pca["snapshots"]))
        for k in range(2)])))[:, None]
    origin = _vector(trajs["b"][-1])
    m, n = model.W0.shape
    for i, j in ((0, 0), (2, 3), (4, 1)):
        x = origin + grid["a"][i] * V[0] + grid["b"][j] * V[1]
        W = model.W0.numpy() + x[: m * n].reshape(m, n) + x[m * n:][:, None]
        ref = 0.5 * float(((W - Y.numpy()) ** 2).sum())
        assert grid["loss"][i, j] == pytest.approx(ref, rel=1e-9)
    # the trajectories' own losses, exactly
    for name, snaps in trajs.items():
        for snap, value in zip(snaps, grid["point_loss"][name]):
            W = model.W0 + snap.delta_w()[0] + snap.others[0][:, None]
            assert value == pytest.approx(0.5 * float((W - Y).square().sum()), rel=1e-12)


def test_collinear_trajectories_give_a_degenerate_second_axis():
    model, Y, g, closure = _problem(seed=4)
    s0, s1 = _state(model, g), _state(model, g)
    # the same product, the bias on a line: the centred points span one direction
    line = [Snapshot(s0.factors, s0.scalings, ((1 - x) * s0.others[0] + x * s1.others[0],), k)
            for k, x in enumerate((0.0, 0.5, 1.0))]
    pca = trajectory_pca({"line": line})
    ev = pca["explained_variance"]
    assert ev[0] == pytest.approx(1.0, rel=1e-12) and ev[1] == 0.0
    assert np.all(pca["coords"]["line"][:, 1] == 0)
    grid = plane_loss_grid(model, closure, pca, pairs=[(model.A, model.B)], n_grid=3)
    np.testing.assert_array_equal(grid["loss"], grid["loss"][:, :1].repeat(3, axis=1))


def test_pca_refuses_too_few_or_mismatched_snapshots():
    model, _, g, _ = _problem()
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        trajectory_pca({"a": [_state(model, g), _state(model, g)]})
    other, _, g2, _ = _problem(r=3)
    with pytest.raises(ValueError, match="same model"):
        trajectory_pca({"a": [_state(model, g), _state(model, g)], "b": [_state(other, g2)]})
    with pytest.raises(ValueError, match="anchor"):
        trajectory_pca({"a": [_state(model, g) for _ in range(3)]}, anchor=("z", 0))


# ---------------------------------------------------------------- PEFT layout, state restored

def test_peft_delta_w_interpolation_matches_the_merged_weight_and_restores_everything():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"],
                                                      init_lora_weights=False)).double()
    from reflora_analysis.pairs import find_lora_pairs

    pairs = find_lora_pairs(model)
    x, y = torch.randn(5, 6, dtype=F64), torch.randn(5, 4, dtype=F64)
    closure = lambda: (model(x) - y).square().mean()  # noqa: E731
    s0 = snapshot(model, pairs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    s1 = snapshot(model, pairs)
    model.train()
    model.base_model.model[0].lora_A["default"].weight.grad = torch.ones(2, 6, dtype=F64)
    before = [(p.detach().clone(), p.grad, p.requires_grad) for p in model.parameters()]
    out = interpolation(model, closure, s0, s1, n_points=5)
    for p, (v, grad, req) in zip(model.parameters(), before):
        assert torch.equal(p, v) and p.grad is grad and p.requires_grad == req
    assert model.training
    layer = model.base_model.model[0]
    W0, bias, s = layer.base_layer.weight, layer.base_layer.bias, pairs[0].scaling
    for x_t, value in zip(out["t"], out["loss"]):  # W(t) = W0 + s((1-t) A0 B0^T + t A1 B1^T)
        W = W0 + (1 - x_t) * s0.delta_w()[0] + x_t * s1.delta_w()[0]
        ref = float(((x @ W.T + bias) - y).square().mean())
        assert value == pytest.approx(ref, rel=1e-10)
    assert s == s0.scalings[0]
