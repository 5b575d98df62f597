"""Tests of the method registry (``reflora_analysis.methods``): each method's defining property.

Oracles come from ``../shared/BASELINES.md`` section 7: ScaledGD (d = 0), RefLoRA-SGD,
balance and LoRA-RITE give the same W from (A, B) and (A P, B P^{-T}); LoRA-Pro's g~ equals
P_A G + (I - P_A) G P_B and is first-order invariant; LoRA-RITE with V = I, beta1 = 0 is
ScaledGD; under SGD balance and RefLoRA give the same W; PEFT's own optimizers agree with ours.
All invariance checks run in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis.methods import (METHOD_INFO, METHODS, LoraRiteTransform, PairTransform,
                                      Refactorer, available_methods, build_optimizer,
                                      create_reflora_optimizer, dora_methods, get_method,
                                      make_method, pairless_methods, refactoring_methods,
                                      single_step_update)
from reflora_analysis.methods.lora_pro import (equivalent_factor_gradients, equivalent_gradient,
                                               sylvester_psd)
from reflora_analysis.pairs import find_lora_pairs

torch.set_num_threads(1)
D = torch.float64
ALL = ["lora", "lora+", "scaledgd", "lora-rite", "lora-pro", "reflora", "reflora-s", "balance",
       "balora", "dora", "full"]
# hparams making the exactly-invariant methods exact: no damping (it is not GL(r)-covariant)
EXACT = {"scaledgd": {"damping": 0.0}, "reflora": {"damping": 0.0}, "balance": {"damping": 0.0},
         "lora-rite": {"skip": None}}  # a unit-scale random G trips LoRA-RITE's skip guard


def _problem(seed: int, m: int = 7, n: int = 5, r: int = 2):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, r, generator=g, dtype=D)
    B = torch.randn(n, r, generator=g, dtype=D)
    G = torch.randn(m, n, generator=g, dtype=D)
    return A, B, G, g


def _gl(r: int, g: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    """A random P in GL(r) with singular values in [e^-spread, e^spread] (cond <= e^(2 spread))."""
    Q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=D))
    Q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=D))
    s = torch.exp(spread * (2 * torch.rand(r, generator=g, dtype=D) - 1))
    return Q1 @ torch.diag(s) @ Q2


def _refactor(A, B, P):
    return A @ P, torch.linalg.solve(P, B.T).T


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


# ---------------------------------------------------------------------------- registry

def test_registry_lists_every_method_with_its_facts():
    assert available_methods() == ALL
    for name in ALL:
        info = METHOD_INFO[name]
        assert info["invariance"] in {"exact", "first-order", "scalar", "none", "n/a"}
        assert info["paper"] and info["formula"] and info["state"]
    assert {n for n in ALL if METHOD_INFO[n]["invariance"] == "exact"} == \
        {"scaledgd", "lora-rite", "reflora", "balance", "balora"}


def test_every_registered_method_builds_its_own_transform_class():
    for name in available_methods():
        spec = get_method(name)
        assert spec is METHODS[name] and spec.name == name
        assert spec.invariance == METHOD_INFO[name]["invariance"]
        if not spec.lora_layers:  # full trains a module's own weights (test_method_variants)
            continue
        _, t = build_optimizer(name, _pairs(), lr=1e-2, **EXACT.get(name, {}))
        # explicit pairs: no PEFT helper stands in for the method's own class
        assert type(t) is spec.transform_cls if spec.transform_cls else t is None, name
        assert spec.phase == (t.phase if t is not None else None)
        if spec.phase == "post":
            assert type(t).post_step is not PairTransform.post_step
        elif spec.phase == "pre":
            assert type(t).pre_step is not PairTransform.pre_step


def test_refactoring_family_flag_matches_the_classes():
    family = [n for n in available_methods()
              if METHODS[n].transform_cls is not None
              and issubclass(METHODS[n].transform_cls, Refactorer)]
    assert refactoring_methods() == family == [n for n in ALL if METHODS[n].refactoring]
    assert len(family) == 3 and {METHODS[n].phase for n in family} == {"pre", "post"}
    for name in family:
        t = Refactorer(_pairs(), method=name)  # the documented entry point dispatches
        assert type(t) is METHODS[name].transform_cls and isinstance(t, Refactorer)
        assert t.method == name and t.state_key == "Refactorer"
        assert METHODS[name].hparams == {"warmup_steps": 0, "interval": 1, "damping": 0.0}
    for name in set(ALL) - set(family):
        with pytest.raises(ValueError, match="unknown refactoring method .*valid methods: "
                                             + ", ".join(family)):
            Refactorer(_pairs(), method=name)
    with pytest.raises(ValueError, match="is method 'reflora', not 'balance'"):
        METHODS["reflora"].transform_cls(_pairs(), method="balance")


def test_attach_flag_says_which_methods_make_method_accepts():
    for name in available_methods():
        spec = METHODS[name]
        opt = torch.optim.SGD([p for pair in _pairs() for p in pair], lr=1e-2)
        pairs = [tuple(opt.param_groups[0]["params"])]
        if spec.any_optimizer:
            t = make_method(name, pairs, opt, **EXACT.get(name, {}))
            assert isinstance(t, spec.transform_cls)
        else:
            with pytest.raises(ValueError, match="cannot be attached"):
                make_method(name, pairs, opt)
    assert pairless_methods() == [n for n in ALL if not METHODS[n].needs_pairs]
    assert dora_methods() == [n for n in ALL if METHODS[n].dora]


def test_a_method_name_is_resolved_in_one_place():
    from reflora_analysis.probes.consistency import consistency_score, step_update

    assert get_method(" LoRA+ ") is METHODS["lora+"]
    A, B, G, _ = _problem(0)
    message = "unknown method 'nope'; valid methods: " + ", ".join(ALL)
    calls = [lambda: get_method("nope"), lambda: build_optimizer("nope", _pairs(), lr=1e-2),
             lambda: make_method("nope", _pairs(), torch.optim.SGD(_pairs()[0], lr=1.0)),
             lambda: single_step_update("nope", A, B, G, 1e-2),
             lambda: step_update("nope", A, B, G, 1e-2),
             lambda: consistency_score("nope", A, B, lambda W: W)]
    for call in calls:
        with pytest.raises(ValueError) as excinfo:
            call()
        assert str(excinfo.value) == message


def test_no_tuple_of_method_names_is_spelled_outside_the_registry():
    """The registry's flags are the single source: no literal list of two or more method
    names in the methods package, the refactor module or the consistency probe."""
    import ast
    import pathlib

    import reflora_analysis

    root = pathlib.Path(reflora_analysis.__file__).parent
    files = [*sorted((root / "methods").glob("*.py")), root / "refactor.py",
             root / "probes" / "consistency.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts
                         if isinstance(e, ast.Constant) and e.value in METHODS]
                assert len(names) < 2, f"{path.name}:{node.lineno} spells {names}"


# ---------------------------------------------------------------------------- invariance

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(sorted(EXACT)),
       lr=st.sampled_from([1e-3, 1e-2, 1e-1]), r=st.integers(1, 3))
def test_exact_methods_give_one_update_for_every_factorization(seed, method, lr, r):
    A, B, G, g = _problem(seed, r=r)
    dW = single_step_update(method, A, B, G, lr, **EXACT[method])
    A2, B2 = _refactor(A, B, _gl(r, g))
    dW2 = single_step_update(method, A2, B2, G, lr, **EXACT[method])
    assert dW.norm() > 0
    # float64 round-off amplified by cond(P)^2 <= e^4 and the r x r solves: ~1e-13 observed
    assert _rel(dW2, dW) < 1e-8


@pytest.mark.parametrize("method", ["lora", "lora+"])
def test_lora_and_loraplus_are_not_invariant(method):
    A, B, G, g = _problem(3)
    dW = single_step_update(method, A, B, G, 1e-2)
    P = torch.diag(torch.tensor([3.0, 0.5], dtype=D))
    dW2 = single_step_update(method, *_refactor(A, B, P), G, 1e-2)
    assert _rel(dW2, dW) > 1e-2


def test_scaledgd_damping_breaks_exact_invariance():
    A, B, G, g = _problem(4)
    P = torch.diag(torch.tensor([5.0, 0.2], dtype=D))
    dW = single_step_update("scaledgd", A, B, G, 1e-2, damping=1e-1)
    dW2 = single_step_update("scaledgd", *_refactor(A, B, P), G, 1e-2, damping=1e-1)
    assert _rel(dW2, dW) > 1e-3


def _mf_loss(A, B, Y):
    return 0.5 * (A @ B.T - Y).square().sum()


def _run(method, A, B, Y, steps, lr, optimizer="sgd", transform_cls=None, **hp):
    """``steps`` steps of ``method`` on the mf loss; returns the W after each step."""
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    if transform_cls is None:
        opt, _ = build_optimizer(method, [(a, b)], optimizer=optimizer, lr=lr, **hp)
    else:
        opt = torch.optim.SGD([a, b], lr=lr)
        transform_cls([(a, b)], **hp).attach(opt)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        _mf_loss(a, b, Y).backward()
        opt.step()
        out.append((a @ b.T).detach().clone())
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_rite_trajectory_is_invariant_over_several_steps(optimizer):
    A, B, _, g = _problem(5, m=8, n=6, r=3)
    Y = torch.randn(8, 3, generator=g, dtype=D) @ torch.randn(3, 6, generator=g, dtype=D)
    P = _gl(3, g, spread=1.5)
    ws1 = _run("lora-rite", A, B, Y, 8, 1e-2, optimizer, skip=None)
    ws2 = _run("lora-rite", *_refactor(A, B, P), Y, 8, 1e-2, optimizer, skip=None)
    for w1, w2 in zip(ws1, ws2):
        assert _rel(w2, w1) < 1e-8  # float64, cond(P)^2 ~ e^6; observed ~1e-13
    # a real adaptive trajectory, not a frozen one
    assert _rel(ws1[-1], A @ B.T) > 1e-2


def test_lora_rite_sgd_and_adamw_give_the_same_lora_updates():
    A, B, _, g = _problem(6)
    Y = torch.randn(7, 5, generator=g, dtype=D)
    for w1, w2 in zip(_run("lora-rite", A, B, Y, 4, 1e-2, "sgd", skip=None, weight_decay=0.1),
                      _run("lora-rite", A, B, Y, 4, 1e-2, "adamw", skip=None, weight_decay=0.1)):
        assert _rel(w2, w1) < 1e-12  # same arithmetic, only who applies the SGD step differs


@pytest.mark.parametrize("method,optimizer", [("lora-rite", "sgd"), ("lora-pro", "adamw")])
def test_stateful_transforms_resume_from_the_optimizer_state_dict(method, optimizer):
    A, B, _, g = _problem(17)
    Y = torch.randn(7, 5, generator=g, dtype=D)
    hp = {"skip": None} if method == "lora-rite" else {}

    def steps(opt, a, b, k):
        for _ in range(k):
            opt.zero_grad()
            _mf_loss(a, b, Y).backward()
            opt.step()

    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    opt, _ = build_optimizer(method, [(a, b)], optimizer=optimizer, lr=1e-2, **hp)
    steps(opt, a, b, 2)
    saved = copy.deepcopy(opt.state_dict())
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt2, t2 = build_optimizer(method, [(a2, b2)], optimizer=optimizer, lr=1e-2, **hp)
    opt2.load_state_dict(saved)
    assert t2.step_count == 2
    steps(opt, a, b, 2)
    steps(opt2, a2, b2, 2)
    # identical arithmetic after an exact restore; a fresh state would differ by O(1)
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())


class _IdentitySecondMoment(LoraRiteTransform):
    def _second_moment(self, V_old, P, gram, beta2_hat):  # batched: (2, layers, r, r)
        return torch.eye(gram.shape[-1], dtype=gram.dtype).expand_as(gram)


def test_lora_rite_with_identity_second_moment_and_no_momentum_is_scaledgd():
    A, B, _, g = _problem(7, m=6, n=5, r=2)
    Y = torch.randn(6, 5, generator=g, dtype=D)
    rite = _run(None, A, B, Y, 3, 5e-2, transform_cls=_IdentitySecondMoment,
                betas=(0.0, 0.999), eps=0.0, clip=None, skip=None)
    sgd = _run("scaledgd", A, B, Y, 3, 5e-2, damping=0.0)
    plain = _run("lora", A, B, Y, 3, 5e-2)
    for w_rite, w_sgd in zip(rite, sgd):
        assert _rel(w_rite, w_sgd) < 1e-12  # identical formulas up to QR round-off
    assert _rel(plain[-1], sgd[-1]) > 1e-3  # the check can tell methods apart


def test_lora_rite_first_step_matches_the_hand_computation():
    """k = 0 (no memory): V_A = Gbar_A^T Gbar_A / m, step A -= eta Gbar_A V_A^{-1/2} R_B^{-T}."""
    A, B, G, _ = _problem(16)
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    a.grad, b.grad = G @ B, G.T @ A
    opt, _ = build_optimizer("lora-rite", [(a, b)], lr=1e-2, eps=0.0, clip=None, skip=None)
    opt.step()
    for X, Y, grad, new in ((A, B, G @ B, a), (B, A, G.T @ A, b)):
        U, R = torch.linalg.qr(Y)
        Gbar = grad @ torch.linalg.inv(R)
        evals, E = torch.linalg.eigh(Gbar.T @ Gbar / X.shape[0])
        step = Gbar @ E @ torch.diag(evals.rsqrt()) @ E.T @ torch.linalg.inv(R).T
        assert _rel(new.detach(), X - 1e-2 * step) < 1e-12  # float64, r = 2 solves


def test_lora_rite_guards_and_zero_factor():
    A, B, G, g = _problem(8)
    # clipping: a huge gradient gives the same step as a modest one (direction normalised)
    small = single_step_update("lora-rite", A, B, G, 1e-2, skip=None)
    huge = single_step_update("lora-rite", A, B, 1e4 * G, 1e-2, skip=None)
    assert _rel(huge, small) < 1e-6
    # skipping: RMS of the unmagnified gradient above `skip` -> no step, and a warning
    with pytest.warns(UserWarning, match="skip=None"):
        assert single_step_update("lora-rite", A, B, 1e4 * G, 1e-2).abs().max() == 0
    # PEFT start (A = 0): finite, B does not move
    a, b = nn.Parameter(torch.zeros(7, 2, dtype=D)), nn.Parameter(B.clone())
    a.grad, b.grad = G @ B, torch.zeros_like(B)
    opt, _ = build_optimizer("lora-rite", [(a, b)], lr=1e-2)
    opt.step()
    assert torch.isfinite(a).all() and a.abs().max() > 0 and torch.equal(b.detach(), B)


# ---------------------------------------------------------------------------- LoRA-Pro

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.sampled_from([1.0, 2.0, 0.5]), r=st.integers(1, 3))
def test_lora_pro_equivalent_gradient_is_the_tangent_projection(seed, s, r):
    A, B, G, _ = _problem(seed, r=r)
    g_tilde = equivalent_gradient(A, B, s * G @ B, s * G.T @ A, scaling=s)
    P_A = A @ torch.linalg.solve(A.T @ A, A.T)
    P_B = B @ torch.linalg.solve(B.T @ B, B.T)
    expected = P_A @ G + (G - P_A @ G) @ P_B
    assert _rel(g_tilde, expected) < 1e-10  # float64 solves of well-conditioned r x r Grams
    # the Sylvester X only moves mass between the factors: s (ghat_A B^T + A ghat_B^T) unchanged
    ghat_A, ghat_B = equivalent_factor_gradients(A, B, s * G @ B, s * G.T @ A, s, "sylvester")
    assert _rel(s * (ghat_A @ B.T + A @ ghat_B.T), expected) < 1e-10


def test_sylvester_x_solves_its_equation_and_minimises_the_distance():
    A, B, G, g = _problem(9, r=3)
    X1, X2, C = A.T @ A, B.T @ B, torch.randn(3, 3, generator=g, dtype=D)
    X = sylvester_psd(X1, X2, C)
    assert _rel(X1 @ X + X @ X2, C) < 1e-12
    grad_A, grad_B = G @ B, G.T @ A
    ghat_A, ghat_B = equivalent_factor_gradients(A, B, grad_A, grad_B, 1.0, "sylvester")
    base_A, base_B = equivalent_factor_gradients(A, B, grad_A, grad_B, 1.0, "zero")

    def distance(Xp):
        return ((base_A - A @ Xp - grad_A).square().sum()
                + (base_B + B @ Xp.T - grad_B).square().sum())

    X_opt = torch.linalg.lstsq(A, base_A - ghat_A).solution  # recover the X that was used
    best = distance(X_opt)
    for _ in range(5):
        assert distance(X_opt + 1e-3 * torch.randn(3, 3, generator=g, dtype=D)) > best


def test_lora_pro_is_first_order_but_not_exactly_invariant():
    A, B, G, g = _problem(10)
    P = _gl(2, g, spread=1.0)
    spreads = []
    for lr in (1e-3, 1e-5):
        dW = single_step_update("lora-pro", A, B, G, lr)
        dW2 = single_step_update("lora-pro", *_refactor(A, B, P), G, lr)
        spreads.append(_rel(dW2, dW))
    # the O(eta) part agrees, so the relative spread is O(eta): 100x smaller eta, ~100x smaller
    assert 30 < spreads[0] / spreads[1] < 300 and spreads[0] > 1e-8
    Q, _ = torch.linalg.qr(torch.randn(2, 2, generator=g, dtype=D))
    dW3 = single_step_update("lora-pro", *_refactor(A, B, Q), G, 1e-1)
    assert _rel(dW3, single_step_update("lora-pro", A, B, G, 1e-1)) < 1e-10  # exact for O(r)


def test_lora_pro_full_mode_keeps_m_by_n_moments():
    A, B, _, g = _problem(11)
    Y = torch.randn(7, 5, generator=g, dtype=D)
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    opt, t = build_optimizer("lora-pro", [(a, b)], optimizer="adamw", lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _mf_loss(a, b, Y).backward()
        opt.step()
    assert t.mode == "full" and t.moments[0]["exp_avg_sq"].shape == (7, 5)
    assert not opt.state  # AdamW never saw the LoRA factors
    assert _mf_loss(a, b, Y) < _mf_loss(A, B, Y)


# ---------------------------------------------------------------------------- descent, equalities

@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", [m for m in ALL if METHODS[m].lora_layers])  # full: no pairs
def test_every_method_decreases_the_mf_loss_for_a_small_step(method, optimizer):
    A, B, _, g = _problem(12, m=8, n=6, r=2)
    Y = torch.randn(8, 2, generator=g, dtype=D) @ torch.randn(2, 6, generator=g, dtype=D)
    # LoRA-RITE's skip guard (RMS > 1, tuned for LLM-scale gradients) would drop this step
    hp = {"skip": None} if method == "lora-rite" else {}
    W = _run(method, A, B, Y, 1, 1e-3, optimizer, **hp)[0]
    before, after = 0.5 * (A @ B.T - Y).square().sum(), 0.5 * (W - Y).square().sum()
    assert after < before - 1e-8 * before


def test_balance_and_reflora_give_the_same_sgd_trajectory():
    A, B, _, g = _problem(13, m=8, n=6, r=3)
    Y = torch.randn(8, 6, generator=g, dtype=D)
    for w1, w2 in zip(_run("balance", A, B, Y, 6, 2e-2, damping=0.0),
                      _run("reflora", A, B, Y, 6, 2e-2, damping=0.0)):
        assert _rel(w1, w2) < 1e-10  # BASELINES 5: equal W with SGD; float64 round-off only


def test_plain_module_with_explicit_pairs_trains_its_other_parameters():
    A, B, _, _ = _problem(14)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
            self.head = nn.Parameter(torch.zeros(3, dtype=D))

    model = Plain()
    opt, t = build_optimizer("reflora", model, pairs=[(model.a, model.b)], lr=1e-2)
    trained = [p for grp in opt.param_groups for p in grp["params"]]
    assert t is not None and len(trained) == 3 and any(p is model.head for p in trained)


# ---------------------------------------------------------------------------- PEFT models

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _peft_model(seed=0, use_dora=False):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                               use_dora=use_dora)).double()
    with torch.no_grad():  # a generic point (PEFT starts at lora_B = 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def _lora_state_after_step(model, opt):
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=D)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("method,optimizer,hp", [("lora+", "sgd", {"ratio": 16.0}),
                                                 ("lora+", "adamw", {"ratio": 4.0}),
                                                 ("scaledgd", "sgd", {"damping": 1e-2}),
                                                 ("scaledgd", "adamw", {"damping": 1e-6})])
def test_peft_optimizers_and_ours_give_the_same_update(method, optimizer, hp):
    peft_model = _peft_model()
    ours_model = copy.deepcopy(peft_model)
    opt_peft, t_peft = build_optimizer(method, peft_model, optimizer=optimizer, lr=1e-2, **hp)
    assert t_peft is None  # really PEFT's helper (ours always returns no transform for lora+)
    if method == "scaledgd":
        assert type(opt_peft).__name__ == "RiemannianPreconditionedOptimizer"
    opt_ours, _ = build_optimizer(method, find_lora_pairs(ours_model), optimizer=optimizer,
                                  lr=1e-2, **hp)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    new_peft = _lora_state_after_step(peft_model, opt_peft)
    new_ours = _lora_state_after_step(ours_model, opt_ours)
    for name in new_peft:
        step = (new_peft[name] - before[name]).norm()
        assert step > 0
        # same formula in float64; pinv vs eigh-pinv of a well-conditioned 2 x 2: round-off
        assert float((new_ours[name] - new_peft[name]).norm()) <= 1e-10 * float(step)


def test_peft_model_trains_non_lora_parameters_with_the_base_optimizer():
    model = _peft_model()
    head = model.base_model.model.fc2.base_layer.bias
    head.requires_grad_(True)
    opt, _ = build_optimizer("reflora", model, optimizer="adamw", lr=1e-2)
    assert any(p is head for grp in opt.param_groups for p in grp["params"])


@pytest.mark.parametrize("method", ["balance", "reflora-s"])
def test_dora_output_is_unchanged_by_refactoring_the_factors(method):
    model = _peft_model(use_dora=True)
    x = torch.randn(5, 6, dtype=D)
    before = model(x).detach()
    factors = [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
               and "magnitude" not in n]
    opt, t = build_optimizer(method, model, lr=1e-2, damping=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: only the refactoring acts
    after = [p.detach() for n, p in model.named_parameters() if "lora_" in n and "magnitude" not in n]
    assert max(float((x1 - x0).norm()) for x0, x1 in zip(factors, after)) > 1e-3
    assert _rel(model(x).detach(), before) < 1e-12  # DoRA sees only A B^T: round-off only


def test_lora_pro_refuses_dora_and_others_accept_it():
    model = _peft_model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        build_optimizer("lora-pro", model, lr=1e-2)
    for method in ("lora", "lora+", "scaledgd", "lora-rite", "reflora"):
        build_optimizer(method, model, lr=1e-2)


def test_create_reflora_optimizer_matches_build_optimizer():
    from reflora_analysis.refactor import Refactorer

    model = _peft_model(seed=2)
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    opt = create_reflora_optimizer(model, torch.optim.SGD, lr=1e-2, damping=0.0)
    assert isinstance(opt.reflora_transform, Refactorer)
    opt_twin, _ = build_optimizer("reflora", twin, optimizer="sgd", lr=1e-2, damping=0.0)
    ours, theirs = _lora_state_after_step(model, opt), _lora_state_after_step(twin, opt_twin)
    for n in ours:
        assert torch.equal(ours[n], theirs[n]) and not torch.equal(ours[n], start[n])
    with pytest.raises(TypeError, match="optimizer_cls"):
        create_reflora_optimizer(model, "sgd", lr=1e-2)


def test_make_method_attaches_to_a_foreign_optimizer():
    model = _peft_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    t = make_method("reflora", model, opt, warmup_steps=1)
    assert t.warmup_steps == 1
    # lora-rite on a foreign AdamW: it steps the LoRA factors itself, AdamW never sees them
    model = _peft_model(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    make_method("lora-rite", model, opt, skip=None)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    after = _lora_state_after_step(model, opt)
    assert all(not torch.equal(after[n], start[n]) for n in start) and not opt.state
    with pytest.raises(ValueError, match="build_optimizer"):
        make_method("lora+", model, torch.optim.SGD(model.parameters(), lr=1.0))


# ---------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_one_line_errors():
    A, B, G, _ = _problem(15)
    pairs = [(nn.Parameter(A.clone()), nn.Parameter(B.clone()))]
    with pytest.raises(ValueError, match="valid methods: lora, lora\\+"):
        build_optimizer("qlora", pairs, lr=1e-2)
    with pytest.raises(ValueError, match="valid optimizers: sgd, adamw"):
        build_optimizer("lora", pairs, optimizer="adam", lr=1e-2)
    for lr in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="lr must be positive"):
            build_optimizer("lora", pairs, lr=lr)
    with pytest.raises(ValueError, match="unknown hyper-parameter.*'ratoi'.*valid: .*ratio"):
        build_optimizer("lora+", pairs, lr=1e-2, ratoi=4)
    with pytest.raises(ValueError, match="momentum=0"):
        build_optimizer("lora-rite", pairs, lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match="ratio must be a positive"):
        build_optimizer("lora+", pairs, lr=1e-2, ratio=-1)
    with pytest.raises(ValueError, match="damping"):
        build_optimizer("scaledgd", pairs, lr=1e-2, damping=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer("lora", pairs, lr=1e-2, weight_decay=-0.1)
    with pytest.raises(ValueError, match="G must be m x n = 7 x 5"):
        single_step_update("lora", A, B, G.T, 1e-2)
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        build_optimizer("lora", nn.Linear(3, 3), lr=1e-2)
    assert set(METHODS) == set(ALL)


# ---------------------------------------------------------------------------- review fixes

def _pairs(seed=15):
    A, B, _, _ = _problem(seed)
    return [(nn.Parameter(A.clone()), nn.Parameter(B.clone()))]


def _one_line(excinfo) -> bool:
    return "\n" not in str(excinfo.value)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("hp,exc,match", [
    ({"betas": 2}, TypeError, "betas must be a pair"),
    ({"betas": (0.9,)}, TypeError, "betas must be a pair"),
    ({"betas": ("a", 0.9)}, TypeError, "betas must be a pair"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas must lie in \[0, 1\)"),
    ({"eps": "x"}, TypeError, "eps must be a number"),
    ({"eps": -1e-6}, ValueError, "eps must be"),
    ({"clip": "x"}, TypeError, "clip must be a number or None"),
    ({"clip": 0.0}, ValueError, "clip must be > 0"),
    ({"skip": "x"}, TypeError, "skip must be a number or None"),
    ({"skip": -1.0}, ValueError, "skip must be > 0"),
    ({"skip": math.nan}, ValueError, "skip must be > 0"),
    ({"cap": "x"}, TypeError, "cap .*must be a number"),
    ({"cap": -1.0}, ValueError, "cap .*must be finite and >= 0"),
    ({"escaped_mass": "yes"}, TypeError, "escaped_mass must be True or False"),
])
def test_lora_rite_bad_hyperparameters_raise_one_line_errors_naming_them(hp, exc, match, optimizer):
    with pytest.raises(exc, match="lora-rite " + match) as excinfo:
        build_optimizer("lora-rite", _pairs(), optimizer=optimizer, lr=1e-2, **hp)
    assert _one_line(excinfo)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("hp,exc,match", [
    ({"eps": "a"}, TypeError, "lora-pro eps must be a number"),
    ({"eps": -1.0}, ValueError, "lora-pro eps must be"),
    ({"betas": 2}, TypeError, "lora-pro betas must be a pair"),
    ({"betas": (0.9, 1.5)}, ValueError, r"lora-pro betas must lie in \[0, 1\)"),
])
def test_lora_pro_validates_its_adam_hyperparameters_whatever_the_optimizer(hp, exc, match,
                                                                            optimizer):
    # under SGD these are unused, but a typo must not pass silently either
    with pytest.raises(exc, match=match) as excinfo:
        build_optimizer("lora-pro", _pairs(), optimizer=optimizer, lr=1e-2, **hp)
    assert _one_line(excinfo)
    build_optimizer("lora-pro", _pairs(), optimizer=optimizer, lr=1e-2, betas=(0.5, 0.9), eps=0.0)


@pytest.mark.parametrize("label", ["A", "B", "G"])
def test_single_step_update_refuses_integer_tensors(label):
    A, B, G, _ = _problem(15)
    args = {"A": A, "B": B, "G": G}
    args[label] = args[label].round().to(torch.int64)
    with pytest.raises(TypeError, match=f"{label} must be floating point, got torch.int64"):
        single_step_update("lora", args["A"], args["B"], args["G"], 1e-2)


def test_method_info_notes_state_the_caveats_the_tests_rely_on():
    # lora-rite: the reference skip=1.0 zeroes the whole update at a unit-scale point ...
    A, B, G, _ = _problem(18)
    with pytest.warns(UserWarning, match="skip=None"):
        assert single_step_update("lora-rite", A, B, 3 * G, 1e-2).abs().max() == 0
    assert single_step_update("lora-rite", A, B, 3 * G, 1e-2, skip=None).abs().max() > 0
    notes = METHOD_INFO["lora-rite"]["notes"]
    assert "skip=1.0" in notes and "skip=None" in notes
    # ... and balance equals reflora under SGD only away from singular Grams: from A = 0
    # (PEFT's start) balance leaves the layer unprojected, reflora's damped preconditioner acts
    Z = torch.zeros_like(A)
    Y = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    with pytest.warns(UserWarning, match="singular"):
        w_balance = _run("balance", Z, B, Y, 3, 2e-2, damping=0.0)
        w_reflora = _run("reflora", Z, B, Y, 3, 2e-2, damping=0.0)
    assert _rel(w_balance[-1], w_reflora[-1]) > 1e-2  # observed ~1e4: really different
    assert "singular" in METHOD_INFO["balance"]["notes"]


@pytest.mark.parametrize("transform_cls,hp,bad", [
    (LoraRiteTransform, {"skip": None}, "LoRA-RITE"),
    (None, {}, "LoRA-Pro"),
])
def test_stateful_transforms_refuse_foreign_state(transform_cls, hp, bad):
    from reflora_analysis.methods import LoraProTransform

    cls = transform_cls or LoraProTransform
    t = cls(_pairs(), **hp)
    for state in ("not a dict", {"step_count": 0}, {**t.state_dict(), t.state_key: {"step": 0}},
                  {**t.state_dict(), t.state_key: {"step": 0, t.layers_field: [None, None]}}):
        with pytest.raises(ValueError, match=f"{bad} transform with 1 pairs"):
            t.load_state_dict(state)
    t.load_state_dict(t.state_dict())


def _forbid_host_sync(monkeypatch):
    def sync(self, *args):
        raise AssertionError("host synchronisation (tensor -> Python value) inside pre_step")

    for name in ("__float__", "__bool__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_lora_rite_guards_run_on_the_device_without_host_syncs(monkeypatch):
    """Clip, cap, escaped mass and (once its warning is shown) skip never read a tensor on the host."""
    A, B, G, _ = _problem(19)
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    opt, t = build_optimizer("lora-rite", [(a, b)], lr=1e-2, cap=1e-3, escaped_mass=True)
    with pytest.warns(UserWarning, match="skip=None"):  # the one allowed sync: the first skip
        a.grad, b.grad = 1e4 * G @ B, 1e4 * G.T @ A
        opt.step()
    assert t.skipped == 2
    with monkeypatch.context() as mp:
        _forbid_host_sync(mp)
        for scale in (1e4, 1e-2):  # skipped (warning already shown), then a step the cap acts on
            a.grad, b.grad = scale * G @ b.detach(), scale * G.T @ a.detach()
            t.pre_step(opt)
    assert t.skipped == 4 and torch.isfinite(a.grad).all() and a.grad.abs().max() > 0


def test_lora_rite_device_guards_match_the_host_formulas():
    """clip, cap and skip as the module docstring states them, step by step (float64)."""
    A, B, G, _ = _problem(20)
    clip, cap, lr = 0.05, 1e-3, 1e-2
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    a.grad, b.grad = G @ B, G.T @ A
    opt, _ = build_optimizer("lora-rite", [(a, b)], lr=lr, eps=0.0, clip=clip, skip=10.0, cap=cap)
    opt.step()
    _, R_A = torch.linalg.qr(A)
    _, R_B = torch.linalg.qr(B)
    Gbars = [G @ B @ torch.linalg.inv(R_B), G.T @ A @ torch.linalg.inv(R_A)]
    total = math.sqrt(sum(float(x.square().sum()) for x in Gbars))
    assert total > clip  # the clip acts, so it is tested
    for X, R_other, Gbar, new in ((A, R_B, Gbars[0], a), (B, R_A, Gbars[1], b)):
        Gbar = Gbar * (clip / total)
        evals, E = torch.linalg.eigh(Gbar.T @ Gbar / X.shape[0])
        M = Gbar @ E @ torch.diag(evals.rsqrt()) @ E.T
        rms = float(M.square().mean().sqrt())
        assert rms > cap  # the cap acts too
        M = M / (rms / cap)
        assert _rel(new.detach(), X - lr * M @ torch.linalg.inv(R_other).T) < 1e-12  # float64


# ---------------------------------------------------------------------------- Conv LoRA

class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((-1, -2)))


def _conv_peft_model():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_ConvNet(), LoraConfig(r=2, lora_alpha=4,
                                                  target_modules=["conv", "fc"])).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("method", ["lora", "lora+"])
def test_lora_and_loraplus_train_peft_conv_lora_layers(method):
    model = _conv_peft_model()
    opt, t = build_optimizer(method, model, lr=1e-2, ratio=16.0) if method == "lora+" else \
        build_optimizer(method, model, lr=1e-2)
    assert t is None
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == set(lr_of) and any("conv" in n for n in trainable)
    for name, p in trainable.items():  # lora+: PEFT's lora_B (paper A) is the fast factor
        fast = method == "lora+" and "lora_B" in name
        assert lr_of[id(p)] == pytest.approx(16e-2 if fast else 1e-2), name
    before = {n: p.detach().clone() for n, p in trainable.items()}
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    model(x).square().sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in trainable.items())


@pytest.mark.parametrize("method", ["reflora", "scaledgd", "lora-rite", "lora-pro", "balance"])
def test_pair_methods_refuse_conv_lora_naming_the_methods_that_support_it(method):
    with pytest.raises(ValueError, match=r"Conv2d.*only methods lora and lora\+") as excinfo:
        build_optimizer(method, _conv_peft_model(), lr=1e-2)
    assert _one_line(excinfo)


def test_lora_rite_skip_warning_names_what_the_command_line_accepts():
    # the warning's advice must work where users read it: on the command line too
    import re
    import warnings

    from reflora_analysis.keyvalue import parse_key_value
    A, B, G, _ = _problem(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single_step_update("lora-rite", A, B, 1e4 * G, 1e-2)
    message = next(str(w.message) for w in caught if "lora-rite" in str(w.message))
    advice = re.search(r"--hparam (\S+?)\)", message)
    assert advice, message
    key, value = parse_key_value(advice.group(1))
    assert key == "skip" and value is None
    assert single_step_update("lora-rite", A, B, 1e4 * G, 1e-2, **{key: value}).abs().max() > 0


def test_build_optimizer_takes_the_readme_positional_form():
    # README API row: methods.build_optimizer(method, model, optimizer, lr)
    from reflora_analysis.tasks import make_task
    task = make_task("mf", seed=0)
    positional, _ = build_optimizer("reflora", task.pairs, "adamw", 0.02)
    keyword, _ = build_optimizer("reflora", task.pairs, optimizer="adamw", lr=0.02)
    assert type(positional) is type(keyword) is torch.optim.AdamW
    assert positional.param_groups[0]["lr"] == keyword.param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match="lr is required"):
        build_optimizer("reflora", task.pairs, "adamw")
