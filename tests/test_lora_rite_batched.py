"""The batched LoRA-RITE (``methods/rite_batched.py``) against a plain per-layer oracle.

The oracle below is written from ``../shared/BASELINES.md`` section 3, one layer at a time
with ``torch.linalg.pinv`` (no batching, no triangular solves), in float64. The transform
must follow it over 20+ steps on a mix of layers: two of the same shape (one stacked group),
other shapes, two ranks (two classes), PEFT's ``B^T`` storage and paper storage, a zero
factor (PEFT's ``A = 0`` start) and a rank-deficient one, with each guard switched on.

Tolerance 1e-10 (relative, float64): the two sides compute the same formulas in a different
association and with ``R^{-1}`` by a triangular solve instead of an SVD, so they differ by
round-off, ``~eps cond(R)`` per step, amplified along the trajectory. Observed: <= 3e-15 for
well-conditioned layers; up to 6e-12 for the rank-deficient one, whose QR basis has a
column fixed by round-off (the pseudo-inverse ignores it only up to ~eps / sigma_min of the
following steps). Changes of the algorithm (a transposed transport, a damped pseudo-inverse,
a bias correction one step off) move the weights by 1e-2 to 1 (measured), and
:func:`test_the_oracle_comparison_can_fail` checks that near variants differ by > 1e-4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis.methods import LoraRiteTransform
from reflora_analysis.methods.rite_batched import triangular_pinv
from reflora_analysis.pairs import LoraPair

torch.set_num_threads(1)
D = torch.float64
TOL = 1e-10
# (m, n, r, B stored transposed as PEFT does, which factor starts special)
LAYERS = [(7, 5, 2, True, None), (7, 5, 2, True, None), (6, 9, 3, False, None),
          (5, 4, 2, True, "zero A"), (8, 6, 3, True, "rank-deficient B"), (4, 6, 3, True, None)]


# ---------------------------------------------------------------------------- the oracle

def _bh(beta: float, k: int) -> float:
    return 0.0 if beta == 0 else beta * (1 - beta**k) / (1 - beta ** (k + 1))


def _sym(X):
    return 0.5 * (X + X.T)


def _rms(X) -> float:
    return float(X.square().mean().sqrt())


def oracle_step(layers, state, k, lr, hp):
    """One LoRA-RITE step (BASELINES.md section 3) of every layer, in place.

    ``layers``: per layer ``[A (m x r), B (n x r), grad_A, grad_B]`` (grads None: layer left
    alone); ``state``: per layer dict or None (fresh: zeros). Returns the skipped count.
    """
    b1, b2 = _bh(hp["betas"][0], k), _bh(hp["betas"][1], k)
    work, skipped = [], 0
    for i, (A, B, gA, gB) in enumerate(layers):
        if gA is None:
            continue
        (U_A, R_A), (U_B, R_B) = torch.linalg.qr(A), torch.linalg.qr(B)  # step 1
        RpA, RpB = torch.linalg.pinv(R_A), torch.linalg.pinv(R_B)
        G = {"A": gA @ RpB, "B": gB @ RpA}  # step 2
        for side in "AB":  # step 3, skip
            if hp["skip"] is not None and not _rms(G[side]) <= hp["skip"]:
                G[side], skipped = torch.zeros_like(G[side]), skipped + 1
        work.append((i, U_A, U_B, RpA, RpB, G))
    c = math.sqrt(sum(float(w[5][s].square().sum()) for w in work for s in "AB"))
    for i, U_A, U_B, RpA, RpB, G in work:
        if hp["clip"] is not None and c > hp["clip"]:  # step 3, global clip
            G = {s: G[s] / (c / hp["clip"]) for s in "AB"}
        A, B = layers[i][0], layers[i][1]
        old = state[i] or {"U_A": torch.zeros_like(A), "U_B": torch.zeros_like(B),
                           "V_A": torch.zeros(A.shape[1], A.shape[1], dtype=D),
                           "V_B": torch.zeros(A.shape[1], A.shape[1], dtype=D),
                           "M_A": torch.zeros_like(A), "M_B": torch.zeros_like(B),
                           "rho_A": 0.0, "rho_B": 0.0}
        new = {"U_A": U_A, "U_B": U_B}
        P = {"A": U_B.T @ old["U_B"], "B": U_A.T @ old["U_A"]}  # step 4
        for s in "AB":
            V_old, rho = old["V_" + s], old["rho_" + s]
            moved = P[s] @ V_old @ P[s].T
            if hp["escaped_mass"]:  # step 6
                by_eig = float((torch.linalg.eigvalsh(V_old) - torch.linalg.eigvalsh(_sym(moved))).max())
                by_tr = float(torch.trace(V_old) - torch.trace(moved))
                rho = b2 * (rho + min(max(by_eig, 0.0), max(by_tr, 0.0)))
            V = _sym(b2 * moved + (1 - b2) * G[s].T @ G[s] / G[s].shape[0])  # step 5
            lam, E = torch.linalg.eigh(V)  # step 7 (negative round-off eigenvalues as 0)
            Sbar = G[s] @ E @ torch.diag(1 / ((lam.clamp_min(0) + rho).sqrt() + hp["eps"])) @ E.T
            Sbar = torch.nan_to_num(Sbar, nan=0.0, posinf=0.0, neginf=0.0)
            M = b1 * old["M_" + s] @ P[s].T + (1 - b1) * Sbar  # step 8
            if hp["cap"] > 0:  # step 9
                M = M / max(1.0, _rms(M) / hp["cap"])
            new.update({"V_" + s: V, "M_" + s: M, "rho_" + s: rho})
        layers[i][0] = A - lr * (new["M_A"] @ RpB.T + hp["wd"] * A)  # step 10
        layers[i][1] = B - lr * (new["M_B"] @ RpA.T + hp["wd"] * B)
        state[i] = new
    return skipped


# ---------------------------------------------------------------------------- problem

def _start(seed: int, spec=LAYERS):
    """Per layer ``(A, B, Y)``: random factors (special ones as named), a target of scale ~1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n, r, _, special in spec:
        A = torch.randn(m, r, generator=g, dtype=D)
        B = torch.randn(n, r, generator=g, dtype=D)
        if special == "zero A":
            A = torch.zeros(m, r, dtype=D)
        if special == "rank-deficient B":
            B[:, 1] = B[:, 0]  # rank r - 1: R_B is singular, R_B^+ a true pseudo-inverse
        Y = torch.randn(m, n, generator=g, dtype=D) / math.sqrt(n)
        out.append((A, B, Y))
    return out


def _grads(A, B, Y):
    """``grad_A, grad_B`` of ``0.5 ||A B^T - Y||_F^2``."""
    E = A @ B.T - Y
    return E @ B, E.T @ A


class Model:
    """The transform on explicit pairs (paper or PEFT storage), one SGD optimizer."""

    def __init__(self, start, spec, lr, hp, strategy="auto", outer="grad"):
        self.pairs, self.Y = [], [Y for _, _, Y in start]
        for i, ((A, B, _), (_, _, _, transposed, _)) in enumerate(zip(start, spec)):
            b = nn.Parameter((B.T if transposed else B).clone())
            self.pairs.append(LoraPair(f"layer{i}", nn.Parameter(A.clone()), b, 1.0, transposed))
        rite = {k: v for k, v in hp.items() if k != "wd"}
        params = [p for pair in self.pairs for p in pair.params]
        sgd_wd = hp["wd"] if outer == "grad" else 0.0
        self.opt = torch.optim.SGD(params, lr=lr, weight_decay=sgd_wd)
        wd = hp["wd"] if outer == "internal" else 0.0
        self.t = LoraRiteTransform(self.pairs, outer_step=outer, weight_decay=wd,
                                   strategy=strategy, **rite).attach(self.opt)

    def step(self, drop=()):
        for i, pair in enumerate(self.pairs):
            if i in drop:
                pair.a.grad = pair.b.grad = None
                continue
            gA, gB = _grads(pair.A, pair.B, self.Y[i])
            pair.a.grad = gA.clone()
            pair.b.grad = (gB.T if pair.b_transposed else gB).clone()
        self.opt.step()

    def weights(self):
        return [(p.A.clone(), p.B.clone()) for p in self.pairs]


def _oracle_run(start, steps, lr, hp, drop=lambda k: ()):
    layers = [[A.clone(), B.clone(), None, None] for A, B, _ in start]
    state, out, skipped = [None] * len(layers), [], 0
    for k in range(steps):
        for i, (A, B, Y) in enumerate(start):
            layers[i][2:] = [None, None] if i in drop(k) else _grads(layers[i][0], layers[i][1], Y)
        skipped += oracle_step(layers, state, k, lr, hp)
        out.append([(L[0].clone(), L[1].clone()) for L in layers])
    return out, state, skipped


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def _trajectory(model, steps: int) -> list:
    """The weights after each of ``steps`` plain steps of ``model``."""
    got = []
    for _ in range(steps):
        model.step()
        got.append(model.weights())
    return got


def _max_rel(run1, run2) -> float:
    return max(_rel(x, y) for w1, w2 in zip(run1, run2) for a, b in zip(w1, w2)
               for x, y in zip(a, b))


HP = dict(betas=(0.9, 0.999), eps=1e-6, clip=None, skip=None, cap=0.0, escaped_mass=False,
          wd=0.0)
GUARDS = {  # each guard on, then all together; values chosen so that each one acts
    "clip": dict(clip=0.3),
    "skip": dict(skip=2.3),
    "cap": dict(cap=0.05),
    "escaped_mass": dict(escaped_mass=True),
    "all": dict(clip=0.3, skip=2.3, cap=0.05, escaped_mass=True, wd=0.01),
}


# ---------------------------------------------------------------------------- tests

@pytest.mark.filterwarnings("ignore:lora-rite")
@pytest.mark.parametrize("strategy", ["auto", "stack", "loop"])
@pytest.mark.parametrize("guard", list(GUARDS))
def test_batched_steps_follow_the_per_layer_oracle(guard, strategy):
    hp, steps, lr = {**HP, **GUARDS[guard]}, 24, 0.02
    start = _start(0)
    expected, _, skipped = _oracle_run(start, steps, lr, hp)
    model = Model(start, LAYERS, lr, hp, strategy)
    got = _trajectory(model, steps)
    assert _max_rel(got, expected) < TOL
    assert model.t.skipped == skipped
    if guard == "skip":  # the guard acted, but not on every factor
        assert 0 < skipped < 2 * len(LAYERS) * steps
    # PEFT's A = 0 start: B does not move at the first step (but for weight decay), then does
    zero = LAYERS.index(next(s for s in LAYERS if s[4] == "zero A"))
    if hp["wd"] == 0:
        assert torch.equal(expected[0][zero][1], start[zero][1])
        assert torch.equal(got[0][zero][1], start[zero][1])
    assert not torch.equal(expected[-1][zero][1], start[zero][1])
    assert all(torch.isfinite(x).all() for w in got for a in w for x in a)


@pytest.mark.parametrize("outer", ["grad", "internal"])
def test_weight_decay_and_both_outer_steps_follow_the_oracle(outer):
    hp, steps, lr = {**HP, "clip": 0.3, "wd": 0.05}, 20, 0.02
    start = _start(1)
    expected, _, _ = _oracle_run(start, steps, lr, hp)
    model = Model(start, LAYERS, lr, hp, outer=outer)
    got = _trajectory(model, steps)
    assert _max_rel(got, expected) < TOL


def test_layers_without_gradients_are_left_alone():
    """A layer whose gradients are None at a step keeps its weights and state (as before)."""
    hp, steps, lr = {**HP, "clip": 0.3}, 20, 0.02
    drop = lambda k: {0, 4} if k % 5 == 2 else ({2} if k == 7 else set())  # noqa: E731
    start = _start(2)
    expected, _, _ = _oracle_run(start, steps, lr, hp, drop)
    model = Model(start, LAYERS, lr, hp)
    got = []
    for k in range(steps):
        model.step(drop(k))
        got.append(model.weights())
    assert _max_rel(got, expected) < TOL
    assert torch.equal(got[2][0][0], got[1][0][0])  # layer 0 had no gradient at step 2


def test_the_oracle_comparison_can_fail():
    """The comparison tells the algorithm apart from near variants (so TOL is meaningful)."""
    start, lr = _start(0), 0.02
    expected, _, _ = _oracle_run(start, 20, lr, HP)
    for change in (dict(betas=(0.8, 0.999)), dict(betas=(0.9, 0.99)), dict(eps=1e-3)):
        variant, _, _ = _oracle_run(start, 20, lr, {**HP, **change})
        assert _max_rel(variant, expected) > 1e-4, change


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shapes=st.lists(
    st.tuples(st.integers(3, 9), st.integers(3, 9), st.integers(1, 3), st.booleans()),
    min_size=1, max_size=5), strategy=st.sampled_from(["auto", "loop"]))
def test_random_shapes_follow_the_oracle(seed, shapes, strategy):
    spec = [(m, n, min(r, m - 2, n - 2), t, None) for m, n, r, t in shapes]
    spec = spec + spec[:1]  # at least one shared shape: a stacked group
    hp, steps, lr = {**HP, "clip": 0.5}, 8, 0.01
    start = _start(seed, spec)
    expected, _, _ = _oracle_run(start, steps, lr, hp)
    model = Model(start, spec, lr, hp, strategy)
    got = _trajectory(model, steps)
    assert _max_rel(got, expected) < TOL  # observed <= 3e-15 over 150 random cases


def _old_format(state, k):
    """A checkpoint entry as the per-layer code wrote it (``rho`` a float when escaped mass is
    off); ``state`` in the oracle's format, which is that code's."""
    layers = [None if s is None else {key: (float(v) if key.startswith("rho") else v.clone())
                                      for key, v in s.items()} for s in state]
    return {"step": k, "layers": layers}


def test_old_format_checkpoint_loads_and_resumes():
    """A state written by the per-layer code (list of per-layer dicts, float rho, None for a
    layer that never stepped) continues as the uninterrupted oracle does."""
    hp, lr = {**HP, "clip": 0.3}, 0.02
    start = _start(3)
    drop = lambda k: {1} if k < 6 else set()  # noqa: E731  layer 1 first steps at k = 6
    expected, _, _ = _oracle_run(start, 14, lr, hp, drop)
    half, state, _ = _oracle_run(start, 5, lr, hp, drop)
    assert state[1] is None
    resumed = [(A, B, Y) for (A, B), (_, _, Y) in zip(half[-1], start)]
    model = Model(resumed, LAYERS, lr, hp)
    saved = model.opt.state_dict()
    saved["reflora_analysis"]["lora_rite"]["lora_rite"] = _old_format(state, 5)
    saved["reflora_analysis"]["lora_rite"]["step_count"] = 5
    model.opt.load_state_dict(saved)
    got = []
    for k in range(5, 14):
        model.step(drop(k))
        got.append(model.weights())
    assert _max_rel(got, expected[5:]) < TOL


@pytest.mark.parametrize("strategy", ["stack", "loop"])
def test_new_checkpoint_resumes_bit_identically(strategy):
    # larger layers too: there BLAS sums in a layout-dependent order, so a loaded state must
    # have the layout of a computed one (caught a loaded U in row-major order)
    spec = LAYERS + [(40, 33, 4, True, None), (40, 33, 4, False, None)]
    hp, lr = {**HP, "clip": 0.3, "escaped_mass": True}, 0.02
    start = _start(4, spec)
    a, b = Model(start, spec, lr, hp, strategy), Model(start, spec, lr, hp, strategy)
    for _ in range(5):
        a.step()
        b.step()
    saved = copy.deepcopy(a.opt.state_dict())
    layers = saved["reflora_analysis"]["lora_rite"]["lora_rite"]["layers"]
    assert all(set(s) == {"U_A", "U_B", "V_A", "V_B", "M_A", "M_B", "rho_A", "rho_B"}
               for s in layers)
    for _ in range(3):  # the saved copy must not follow later steps
        a.step()
    c = Model([(A, B, Y) for (A, B), (_, _, Y) in zip(b.weights(), start)], spec, lr, hp,
              strategy)
    c.opt.load_state_dict(saved)
    assert c.t.rite_step == 5
    for _ in range(3):
        b.step()
        c.step()
    assert all(torch.equal(x, y) for w1, w2 in zip(b.weights(), c.weights())
               for x, y in zip(w1, w2))


def test_a_wrong_state_is_refused_and_changes_nothing():
    model = Model(_start(5), LAYERS, 0.02, HP)
    model.step()
    before = model.t.state_dict()
    layers = before["lora_rite"]["layers"]
    for entry, match in (({**layers[2], "V_B": torch.zeros(2, 2, dtype=D)},
                          r"layer 'layer2': V_B has shape \(2, 2\), expected shape \(3, 3\)"),
                         ({**layers[2], "M_A": "text"}, "layer 'layer2': M_A is not a tensor"),
                         ({"U_A": None}, "layer 'layer2' must hold U_A, U_B")):
        bad = copy.deepcopy(before)
        bad["lora_rite"]["layers"][2] = entry
        with pytest.raises(ValueError, match=match):
            model.t.load_state_dict(bad)
    after = model.t.state_dict()["lora_rite"]["layers"]
    assert all(torch.equal(after[i][k], layers[i][k]) for i in range(len(LAYERS)) for k in layers[i])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 6), rank=st.integers(0, 6))
def test_triangular_pinv_is_the_pseudo_inverse(seed, r, rank):
    """Full-rank, rank-deficient and zero R (a batch mixing them): ``torch.linalg.pinv``."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, r)
    full = torch.linalg.qr(torch.randn(r + 3, r, generator=g, dtype=D))[1]
    low = torch.randn(r + 3, rank, generator=g, dtype=D) @ torch.randn(rank, r, generator=g,
                                                                        dtype=D)
    R = torch.stack([full, torch.linalg.qr(low)[1], torch.zeros(r, r, dtype=D)])
    got, expected = triangular_pinv(R), torch.linalg.pinv(R)
    assert torch.isfinite(got).all()
    # well-conditioned: the solve and the SVD agree to round-off; the others are pinv itself
    assert (got - expected).abs().max() <= 1e-8 * expected.abs().max().clamp_min(1.0)
