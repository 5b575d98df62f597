"""Tests of ``reflora_analysis.refactor``: the RefLoRA engine as optimizer hooks.

Every expected value is computed independently of the engine: with
``reflora_analysis.theory`` in float64 (THEORY.md F1, F3, F4, F7), with autograd, or with
the per-layer reference. Tolerances are stated where used, with the reason.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis import theory
from reflora_analysis.pairs import LoraPair, NoLoraLayersError, find_lora_pairs
from reflora_analysis.methods import refactoring_methods
from reflora_analysis.methods.reflora import reference_geometric_mean
from reflora_analysis.refactor import (
    STATE_DICT_KEY,
    NonFiniteGradientError,
    PairTransform,
    Refactorer,
    check_finite_grads,
    reference_pre_step,
    reference_preconditioners,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

F64 = torch.float64


def rel(x, y) -> float:
    x, y = x.to(F64), y.to(F64)
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def make_pair(m, n, r, seed, dtype=F64, scale_a=1.0, scale_b=1.0):
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter((scale_a * torch.randn(m, r, generator=g, dtype=F64)).to(dtype))
    B = nn.Parameter((scale_b * torch.randn(n, r, generator=g, dtype=F64)).to(dtype))
    return A, B


def quadratic_grads(pairs, seed, dtype=F64):
    """Gradients of l = sum_l 1/2 ||A B^T - Y_l||^2 via autograd; returns G per pair."""
    g = torch.Generator().manual_seed(seed + 1000)
    Gs = []
    for A, B in pairs:
        Y = torch.randn(A.shape[0], B.shape[0], generator=g, dtype=F64).to(dtype)
        loss = 0.5 * (A @ B.T - Y).square().sum()
        loss.backward()
        Gs.append((A @ B.T - Y).detach())
    return Gs


def expected_grads(A, B, G):
    """THEORY section 1 / F1 in float64: (G B S^{-1}, G^T A S), S = S* (F3)."""
    A, B, G = A.detach().to(F64), B.detach().to(F64), G.to(F64)
    S = theory.optimal_preconditioner(A, B)
    return (G @ B) @ torch.linalg.inv(S), (G.T @ A) @ S


# --------------------------------------------------------------------------------------
# tiny PEFT model (random config, no download)
# --------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_peft_model(dtype=torch.float32, seed=0, zero_b=False, embed=True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"] + (["embed_tokens"] if embed else [])
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(model, lcfg)
    if not zero_b:  # PEFT starts with lora_B = 0 (paper A = 0): make the Grams invertible
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    p.copy_(0.3 * torch.randn_like(p))
                elif "lora_embedding_A" in name:
                    p.copy_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def lm_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    return model(input_ids=ids, labels=ids).loss


def snapshot_grads(pairs):
    return [(p.grad_A.detach().clone(), p.grad_B.detach().clone()) for p in pairs]


# --------------------------------------------------------------------------------------
# "reflora": gradients after the hook equal THEORY section 1 / F1, F3
# --------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(r=st.integers(1, 5), extra_m=st.integers(2, 12), extra_n=st.integers(2, 12),
       seed=st.integers(0, 10_000), log_a=st.floats(-3, 3), log_b=st.floats(-3, 3))
def test_reflora_grads_equal_theory_explicit_pairs(r, extra_m, extra_n, seed, log_a, log_b):
    A, B = make_pair(r + extra_m, r + extra_n, r, seed, scale_a=10**log_a, scale_b=10**log_b)
    (G,) = quadratic_grads([(A, B)], seed)
    want_A, want_B = expected_grads(A, B, G)
    opt = torch.optim.SGD([A, B], lr=0.0)
    Refactorer([(A, B)], damping=0.0).attach(opt)
    opt.step()
    # float64 end to end, damping 0: only round-off of two r x r factorizations remains;
    # 1e-8 relative leaves room for Gram condition numbers up to ~1e6 at these scales.
    assert rel(A.grad, want_A) < 1e-8
    assert rel(B.grad, want_B) < 1e-8


def test_reflora_grads_equal_theory_peft_model():
    model = tiny_peft_model(dtype=F64)
    lm_loss(model).backward()
    pairs = find_lora_pairs(model)
    assert any("embed_tokens" in p.name for p in pairs)  # Embedding LoRA is covered
    before = snapshot_grads(pairs)
    expected = []
    for p, (gA, gB) in zip(pairs, before):
        S = theory.optimal_preconditioner(p.A.to(F64), p.B.to(F64))
        expected.append((gA @ torch.linalg.inv(S), gB @ S))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    Refactorer(model, damping=0.0).attach(opt)
    opt.step()
    for p, (eA, eB) in zip(pairs, expected):
        assert rel(p.grad_A, eA) < 1e-8, p.name  # float64, no damping: round-off only
        assert rel(p.grad_B, eB) < 1e-8, p.name


def test_sgd_step_equals_theory_preconditioned_step():
    A, B = make_pair(9, 7, 3, seed=1)
    (G,) = quadratic_grads([(A, B)], 1)
    A0, B0 = A.detach().clone(), B.detach().clone()
    S = theory.optimal_preconditioner(A0, B0)
    want_A, want_B = theory.preconditioned_step(A0, B0, G, 0.05, S)
    opt = torch.optim.SGD([A, B], lr=0.05)
    Refactorer([(A, B)], damping=0.0).attach(opt)
    opt.step()
    assert rel(A.detach(), want_A) < 1e-12  # float64; the step is a tiny correction
    assert rel(B.detach(), want_B) < 1e-12


def _sgd_run(method, steps=6, lr=0.02, seed=3):
    A, B = make_pair(8, 6, 3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(8, 6, generator=g, dtype=F64)
    opt = torch.optim.SGD([A, B], lr=lr)
    Refactorer([(A, B)], method=method, damping=0.0).attach(opt)
    Ws = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (A @ B.T - Y).square().sum()).backward()
        opt.step()
        Ws.append((A @ B.T).detach().clone())
    return Ws, A.detach(), B.detach()


def test_sgd_balance_and_reflora_give_the_same_weight_trajectory():
    W_ref, _, _ = _sgd_run("reflora")
    W_bal, A, B = _sgd_run("balance")
    W_lora, _, _ = _sgd_run("reflora", steps=1)  # sanity: the trajectory does move
    for k, (w1, w2) in enumerate(zip(W_ref, W_bal)):
        assert rel(w2, w1) < 1e-9, k  # float64, exact in exact arithmetic (BASELINES s. 5)
    assert rel(W_lora[0], W_ref[-1]) > 1e-3
    assert float(theory.balance_gap(A, B)) < 1e-10


def test_plain_sgd_differs_from_balance_so_the_trajectory_test_can_fail():
    A, B = make_pair(8, 6, 3, seed=3)
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(8, 6, generator=g, dtype=F64)
    opt = torch.optim.SGD([A, B], lr=0.02)
    for _ in range(6):
        opt.zero_grad()
        (0.5 * (A @ B.T - Y).square().sum()).backward()
        opt.step()
    W_bal, _, _ = _sgd_run("balance")
    assert rel((A @ B.T).detach(), W_bal[-1]) > 1e-6


# --------------------------------------------------------------------------------------
# batched engine == per-layer reference
# --------------------------------------------------------------------------------------


def test_reference_geometric_mean_matches_theory_float64():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 40, 6, generator=g, dtype=F64)
    B = torch.randn(5, 30, 6, generator=g, dtype=F64)
    X, Y = theory.gram(A), theory.gram(B)
    S, S_inv = reference_geometric_mean(X, Y)
    S0 = theory.geometric_mean_reference(X, Y)
    assert rel(S, S0) < 1e-10  # two-eigh algorithm vs theory's, both float64
    assert rel(S @ S_inv, torch.eye(6, dtype=F64).expand(5, 6, 6)) < 1e-10


@settings(max_examples=15)
@given(r=st.sampled_from([2, 4, 8]), layers=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_batched_engine_matches_per_layer_reference_float32(r, layers, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(layers):
        m, n = (int(x) for x in torch.randint(8 * r, 12 * r, (2,), generator=g))
        a = nn.Parameter(torch.randn(m, r, generator=g))
        b = nn.Parameter(torch.randn(r, n, generator=g))  # PEFT storage: B^T
        a.grad = torch.randn(m, r, generator=g)
        b.grad = torch.randn(r, n, generator=g)
        pairs.append(LoraPair(f"l{i}", a, b, b_transposed=True))
    eng = Refactorer(pairs)
    (group,) = eng._groups
    S, S_inv = eng.preconditioners(group)
    ref = reference_preconditioners(pairs)
    # issue 6: 1e-5 relative in float32. m >= 8r keeps cond(C) small (~20), so the
    # reference's float32 eigh error (~cond * 1e-7) stays well inside.
    for i, (S_r, S_inv_r) in enumerate(ref):
        assert rel(S[i], S_r) < 1e-5
        assert rel(S_inv[i], S_inv_r) < 1e-5
    grads_ref = []
    for p in pairs:
        grads_ref.append((p.a.grad.clone(), p.b.grad.clone()))
    eng.pre_step(None)
    engine_grads = [(p.a.grad.clone(), p.b.grad.clone()) for p in pairs]
    for p, (ga, gb) in zip(pairs, grads_ref):
        p.a.grad, p.b.grad = ga, gb
    reference_pre_step(pairs)
    for p, (ga, gb) in zip(pairs, engine_grads):
        assert rel(ga, p.a.grad) < 1e-5
        assert rel(gb, p.b.grad) < 1e-5


@pytest.mark.parametrize("strategy,write_back", [("stack", "copy"), ("loop", "rebind")])
def test_strategies_and_write_back_agree_with_default(strategy, write_back):
    model = tiny_peft_model()
    lm_loss(model).backward()
    pairs = find_lora_pairs(model)
    saved = snapshot_grads(pairs)
    Refactorer(model)._pre_hook(None, (), {})
    default = snapshot_grads(pairs)
    for p, (gA, gB) in zip(pairs, saved):
        p.grad_A.copy_(gA)
        p.grad_B.copy_(gB)
    Refactorer(model, strategy=strategy, write_back=write_back)._pre_hook(None, (), {})
    for p, (dA, dB) in zip(pairs, default):
        assert rel(p.grad_A, dA) < 1e-6  # float32, same maths issued differently
        assert rel(p.grad_B, dB) < 1e-6
        assert p.a.grad.shape == p.a.shape and p.b.grad.shape == p.b.shape


# --------------------------------------------------------------------------------------
# "reflora-s" and "balance"
# --------------------------------------------------------------------------------------


def _adamw_steps(model, steps, refactorer_kw=None, seed=0):
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ref = Refactorer(model, **refactorer_kw).attach(opt) if refactorer_kw else None
    for k in range(steps):
        opt.zero_grad()
        lm_loss(model, seed + k).backward()
        opt.step()
    return opt, ref


def test_reflora_s_keeps_products_balances_norms_and_rescales_moments():
    model = tiny_peft_model()
    opt, ref = _adamw_steps(model, 2, {"method": "reflora-s"})
    pairs = ref.pairs
    # unbalance the norms on purpose, so the rescale below has work to do
    with torch.no_grad():
        for p in pairs:
            p.a.mul_(3.0)
            p.b.div_(3.0)
    products = [p.product().detach().clone() for p in pairs]
    c = [float(p.A.norm() / p.B.norm()) for p in pairs]
    moments = [{k: opt.state[q][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for p in pairs for q in p.params]
    ref.post_step(opt)
    for p, w, ci in zip(pairs, products, c):
        assert rel(p.product(), w) < 1e-6  # float32: two roundings of a scalar rescale
        assert abs(float(p.A.norm() / p.B.norm()) - 1.0) < 1e-5  # F7: s* = 1 afterwards
        assert abs(ci - 1.0) > 0.1
    for j, p in enumerate(pairs):
        pw = c[j] ** 0.5
        for q, scale in ((p.a, pw), (p.b, 1 / pw)):  # derived: m ~ grad, v ~ grad^2
            before = moments.pop(0)
            assert rel(opt.state[q]["exp_avg"], scale * before["exp_avg"]) < 1e-6
            assert rel(opt.state[q]["exp_avg_sq"], scale**2 * before["exp_avg_sq"]) < 1e-6


def test_reflora_s_gradient_powers_match_autograd():
    """The moment powers rest on grad_A' = p grad_A, grad_B' = grad_B / p: check them."""
    model = tiny_peft_model(dtype=F64)
    pairs = find_lora_pairs(model)
    with torch.no_grad():
        for p in pairs:
            p.a.mul_(4.0)
    lm_loss(model).backward()
    old = snapshot_grads(pairs)
    p_scale = [float((p.A.norm() / p.B.norm()).sqrt()) for p in pairs]
    ref = Refactorer(model, method="reflora-s")
    ref.refactor_weights(None, with_grads=True)  # the initial call (moves grads along)
    moved = snapshot_grads(pairs)
    model.zero_grad()
    lm_loss(model).backward()
    for p, (gA, gB), (mA, mB), s in zip(pairs, old, moved, p_scale):
        assert rel(p.grad_A, s * gA) < 1e-10  # float64 autograd at the rescaled point
        assert rel(p.grad_B, gB / s) < 1e-10
        assert rel(mA, p.grad_A) < 1e-10 and rel(mB, p.grad_B) < 1e-10


def test_balance_keeps_every_adapted_weight_and_equalizes_grams():
    model = tiny_peft_model(dtype=F64)
    pairs = find_lora_pairs(model)
    with torch.no_grad():
        for p in pairs:
            p.a.mul_(5.0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits.detach()
    products = [p.product().detach().clone() for p in pairs]
    gaps = [float(theory.balance_gap(p.A, p.B)) for p in pairs]
    Refactorer(model, method="balance").post_step(None)
    for p, w, gap in zip(pairs, products, gaps):
        assert rel(p.product(), w) < 1e-10  # float64: A P P^{-1} B^T round-off
        assert gap > 0.1
        assert float(theory.balance_gap(p.A, p.B)) < 1e-8  # F4
    assert rel(model(input_ids=ids).logits.detach(), logits) < 1e-10


def test_balance_with_adamw_leaves_moments_untouched():
    model = tiny_peft_model()
    opt, ref = _adamw_steps(model, 2, {"method": "balance"})
    state = {id(q): opt.state[q]["exp_avg"].clone() for p in ref.pairs for q in p.params}
    ref.post_step(opt)
    for p in ref.pairs:
        for q in p.params:
            assert torch.equal(opt.state[q]["exp_avg"], state[id(q)])
        assert float(theory.balance_gap(p.A.double(), p.B.double())) < 1e-4  # float32 Grams


# --------------------------------------------------------------------------------------
# degenerate starts, dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", refactoring_methods())
def test_peft_zero_start_never_nan_and_warns_once(method):
    model = tiny_peft_model(zero_b=True, embed=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, ref = _adamw_steps(model, 3, {"method": method})
    for p in ref.pairs:
        for t in (p.A, p.B):
            assert torch.isfinite(t).all(), p.name
    degenerate = [w for w in caught if issubclass(w.category, theory.DegenerateGramWarning)]
    assert len(degenerate) <= 1
    if method != "reflora-s":  # reflora-s simply skips zero layers, nothing to warn about
        assert len(degenerate) == 1
        assert "lora" in str(degenerate[0].message)


def test_warmup_leaves_zero_start_and_then_preconditions():
    model = tiny_peft_model(dtype=F64, zero_b=True, embed=False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    ref = Refactorer(model, warmup_steps=2, damping=0.0).attach(opt)
    pairs = ref.pairs
    for k in range(3):
        opt.zero_grad()
        lm_loss(model, k).backward()
        raw = snapshot_grads(pairs)
        expected = None
        if k == 2:  # first active step: A is no longer 0 after two plain steps
            expected = []
            for p, (gA, gB) in zip(pairs, raw):
                S = theory.optimal_preconditioner(p.A, p.B)
                expected.append((gA @ torch.linalg.inv(S), gB @ S))
        pre = [(p.A.clone(), p.B.clone()) for p in pairs]
        opt.step()
        for j, p in enumerate(pairs):
            if k < 2:  # warm-up: plain gradients, untouched by the hook
                assert torch.equal(p.grad_A, raw[j][0]) and torch.equal(p.grad_B, raw[j][1])
            else:
                # float64, but A is ill-conditioned after two steps from 0: 1e-6 relative
                assert rel(p.grad_A, expected[j][0]) < 1e-6, p.name
                assert rel(p.grad_B, expected[j][1]) < 1e-6, p.name
            assert torch.isfinite(p.A).all() and torch.isfinite(p.B).all()
        assert not all(torch.equal(p.A, a) for p, (a, _) in zip(pairs, pre))
    assert ref.step_count == 3


def test_bf16_parameters_compute_in_float32_and_stay_bf16():
    A32, B32 = make_pair(24, 20, 4, seed=5, dtype=torch.float32)
    a = nn.Parameter(A32.detach().to(torch.bfloat16))
    b = nn.Parameter(B32.detach().T.contiguous().to(torch.bfloat16))  # PEFT storage
    pair = LoraPair("bf16", a, b, b_transposed=True)
    G = torch.randn(24, 20, generator=torch.Generator().manual_seed(0))
    a.grad = (G @ pair.B.float()).to(torch.bfloat16)
    b.grad = (G.T @ pair.A.float()).T.contiguous().to(torch.bfloat16)
    want_A, want_B = expected_grads(pair.A.float(), pair.B.float(), G)
    opt = torch.optim.SGD([a, b], lr=0.0)
    Refactorer([pair]).attach(opt)
    opt.step()
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: inputs and outputs each round by ~4e-3 relative
    assert rel(pair.grad_A.float(), want_A) < 3e-2
    assert rel(pair.grad_B.float(), want_B) < 3e-2
    for method in ("reflora-s", "balance"):
        product = pair.product().float().clone()
        Refactorer([pair], method=method).post_step(None)
        assert a.dtype == torch.bfloat16 and torch.isfinite(a.float()).all()
        assert rel(pair.product().float(), product) < 3e-2


def test_rank_deficient_explicit_pair_warns_and_stays_finite():
    A = nn.Parameter(torch.randn(10, 1, dtype=F64).repeat(1, 3))  # rank 1 < r = 3
    B = nn.Parameter(torch.randn(8, 3, dtype=F64))
    quadratic_grads([(A, B)], 0)
    opt = torch.optim.SGD([A, B], lr=0.1)
    Refactorer([(A, B)]).attach(opt)
    with pytest.warns(theory.DegenerateGramWarning, match="pair0"):
        opt.step()
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


# --------------------------------------------------------------------------------------
# schedule, state, attach/detach
# --------------------------------------------------------------------------------------


class _Recorder(PairTransform):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pre, self.post = [], []

    def pre_step(self, optimizer):
        self.pre.append(self.step_count)

    def post_step(self, optimizer):
        self.post.append(self.step_count)


@pytest.mark.parametrize("warmup,interval,active", [(0, 1, list(range(10))),
                                                    (2, 3, [2, 5, 8]), (4, 1, [4, 5, 6, 7, 8, 9])])
def test_warmup_and_interval_counting(warmup, interval, active):
    A, B = make_pair(6, 5, 2, seed=0)
    opt = torch.optim.SGD([A, B], lr=0.01)
    rec = _Recorder([(A, B)], warmup_steps=warmup, interval=interval).attach(opt)
    for k in range(10):
        quadratic_grads([(A, B)], k)
        opt.step()
        opt.zero_grad()
    assert rec.pre == active and rec.post == active
    assert rec.step_count == 10


def test_state_dict_round_trip_through_optimizer():
    model = tiny_peft_model()
    opt, ref = _adamw_steps(model, 3, {"method": "reflora-s", "warmup_steps": 1,
                                        "interval": 2, "damping": 1e-6})
    saved = opt.state_dict()
    assert json.loads(json.dumps(saved[STATE_DICT_KEY]))  # plain, JSON-able
    assert saved[STATE_DICT_KEY]["Refactorer"]["step_count"] == 3
    params = [q for q in model.parameters() if q.requires_grad]
    opt2 = torch.optim.AdamW(params, lr=1e-3)
    ref2 = Refactorer(model, method="reflora-s").attach(opt2)
    opt2.load_state_dict(saved)
    assert ref2.state_dict() == ref.state_dict()
    assert (ref2.step_count, ref2.warmup_steps, ref2.interval, ref2.damping) == (3, 1, 2, 1e-6)
    assert ref2.initialized
    assert STATE_DICT_KEY in saved  # the caller's dict is not consumed
    # direct round trip and mismatches
    ref3 = Refactorer(model, method="reflora-s")
    ref3.load_state_dict(ref.state_dict())
    assert ref3.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="method 'reflora-s'"):
        Refactorer(model, method="reflora").load_state_dict(ref.state_dict())
    A, B = make_pair(6, 5, 2, seed=0)
    with pytest.raises(ValueError, match="other shapes"):
        Refactorer([(A, B)], method="reflora-s").load_state_dict(ref.state_dict())


def test_detach_restores_plain_behaviour_and_attach_twice_fails():
    A, B = make_pair(7, 6, 2, seed=2)
    opt = torch.optim.SGD([A, B], lr=0.0)
    ref = Refactorer([(A, B)]).attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        ref.attach(opt)
    (G,) = quadratic_grads([(A, B)], 0)
    raw = (A.grad.clone(), B.grad.clone())
    ref.detach()
    opt.step()
    assert torch.equal(A.grad, raw[0]) and torch.equal(B.grad, raw[1])
    assert STATE_DICT_KEY not in opt.state_dict()
    assert ref.step_count == 0
    ref.attach(opt)  # re-attaching after detach works
    opt.step()
    assert not torch.equal(A.grad, raw[0]) and ref.step_count == 1


def test_adamw_state_is_created_normally_when_attached():
    model = tiny_peft_model()
    opt, ref = _adamw_steps(model, 1, {"method": "reflora"})
    for p in ref.pairs:
        for q in p.params:
            assert set(opt.state[q]) == {"step", "exp_avg", "exp_avg_sq"}


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


def test_model_without_lora_layers():
    with pytest.raises(NoLoraLayersError, match="no trainable LoRA layers"):
        Refactorer(nn.Sequential(nn.Linear(3, 3)))


def test_rank_larger_than_dimensions_is_rejected():
    A, B = make_pair(2, 6, 3, seed=0)
    with pytest.raises(ValueError, match="exceeds min"):
        Refactorer([(A, B)])


def test_wrong_shapes_are_rejected():
    A = nn.Parameter(torch.randn(5, 3))
    B = nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="share the rank"):
        Refactorer([(A, B)])
    with pytest.raises(ValueError, match="2-D"):
        Refactorer([(nn.Parameter(torch.randn(5)), B)])


@pytest.mark.parametrize("warmup", [0, 5])  # active step (fused check) and warm-up step
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_names_step_and_layer(warmup, bad):
    pairs = [make_pair(6, 5, 2, seed=s) for s in range(3)]
    quadratic_grads(pairs, 0)
    pairs[1][1].grad[2, 1] = bad
    opt = torch.optim.SGD([p for pr in pairs for p in pr], lr=0.1)
    Refactorer(pairs, warmup_steps=warmup).attach(opt)
    before = [p.detach().clone() for pr in pairs for p in pr]
    with pytest.raises(NonFiniteGradientError, match=r"factor B in layer 'pair1' at step 0"):
        opt.step()
    after = [p.detach() for pr in pairs for p in pr]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # the step was not taken


def test_check_finite_grads_skips_missing_grads():
    A, B = make_pair(6, 5, 2, seed=0)
    pairs = find_lora_pairs([(A, B)])
    check_finite_grads(pairs, 0)  # no grads at all: nothing to check
    A.grad = torch.full_like(A, float("nan"))
    with pytest.raises(NonFiniteGradientError, match="factor A"):
        check_finite_grads(pairs)


def test_unknown_method_and_bad_hyperparameters():
    A, B = make_pair(6, 5, 2, seed=0)
    with pytest.raises(ValueError, match="valid methods: reflora, reflora-s, balance"):
        Refactorer([(A, B)], method="refloraa")
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        Refactorer([(A, B)], warmup_steps=-1)
    with pytest.raises(TypeError, match="interval must be an int"):
        Refactorer([(A, B)], interval=1.5)
    with pytest.raises(ValueError, match="damping"):
        Refactorer([(A, B)], damping=float("nan"))


def test_parameters_missing_from_optimizer_are_named():
    A, B = make_pair(6, 5, 2, seed=0)
    opt = torch.optim.SGD([A], lr=0.1)
    with pytest.raises(ValueError, match="factor B of layer 'pair0'"):
        Refactorer([(A, B)]).attach(opt)


def test_peft_conv2d_lora_layer_is_named_in_the_error():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    model = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match="Conv2d"):
        Refactorer(model)


def test_mixed_ranks_and_dtypes_form_separate_groups():
    specs = [(7, 6, 2, F64), (9, 5, 3, F64), (8, 8, 2, torch.float32), (6, 9, 3, F64)]
    pairs = [make_pair(m, n, r, seed=i, dtype=dt) for i, (m, n, r, dt) in enumerate(specs)]
    Gs = quadratic_grads(pairs, 0)
    expected = [expected_grads(A, B, G) for (A, B), G in zip(pairs, Gs)]
    ref = Refactorer(pairs, damping=0.0)
    assert len(ref._groups) == 3
    ref.pre_step(None)
    for (A, B), (eA, eB), (_, _, _, dt) in zip(pairs, expected, specs):
        tol = 1e-8 if dt == F64 else 1e-5  # float32 pair: Grams and products in float32
        assert rel(A.grad, eA) < tol and rel(B.grad, eB) < tol
        assert A.grad.dtype == dt


def test_stack_strategy_with_bf16_and_missing_grads():
    pairs = []
    for i in range(3):
        A32, B32 = make_pair(16, 12, 2, seed=10 + i, dtype=torch.float32)
        a = nn.Parameter(A32.detach().to(torch.bfloat16))
        b = nn.Parameter(B32.detach().T.contiguous().to(torch.bfloat16))
        pairs.append(LoraPair(f"l{i}", a, b, b_transposed=True))
    g = torch.Generator().manual_seed(0)
    for p in pairs[:2]:  # the third pair has no gradient this step
        p.a.grad = torch.randn(p.a.shape, generator=g).to(torch.bfloat16)
        p.b.grad = torch.randn(p.b.shape, generator=g).to(torch.bfloat16)
    raw = [(p.grad_A.float().clone(), p.grad_B.float().clone()) for p in pairs[:2]]
    Refactorer(pairs, strategy="stack").pre_step(None)
    for p, (gA, gB) in zip(pairs, raw):
        S = theory.optimal_preconditioner(p.A.double(), p.B.double())
        assert p.a.grad.dtype == torch.bfloat16
        # bf16 storage rounds inputs and outputs (~4e-3 relative each)
        assert rel(p.grad_A.float(), gA.double() @ torch.linalg.inv(S)) < 3e-2
        assert rel(p.grad_B.float(), gB.double() @ S) < 3e-2
    assert pairs[2].a.grad is None and pairs[2].b.grad is None


# --------------------------------------------------------------------------------------
# engine internals introduced for speed: one factorization, vectorised reflora-s rescale
# --------------------------------------------------------------------------------------


def test_preconditioners_give_s_and_its_inverse_from_one_factorization():
    pairs = [make_pair(20 + i, 15 + 2 * i, 4, seed=40 + i) for i in range(5)]
    ref = Refactorer(pairs, damping=0.0)
    (group,) = ref._groups
    with warnings.catch_warnings():
        warnings.simplefilter("error", theory.DegenerateGramWarning)  # full rank: silent
        S, S_inv = ref.preconditioners(group)
    eye = torch.eye(4, dtype=F64)
    for i, (A, B) in enumerate(pairs):
        S_theory = theory.optimal_preconditioner(A.detach(), B.detach())
        # float64, cond(Gram) ~ 10: round-off of two r x r factorizations only
        assert rel(S[i], S_theory) < 1e-10
        assert rel(S_inv[i], torch.linalg.inv(S_theory)) < 1e-10
        assert rel(S[i] @ S_inv[i], eye) < 1e-12
        assert torch.equal(S_inv[i], S_inv[i].mT)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_reflora_warning_names_only_degenerate_layers_once(damping):
    # layer "pair1" starts at A = 0 (the PEFT start); the others are healthy. With damping
    # > 0 the Grams are regular, yet RefLoRA cannot leave A = 0: still warned, once.
    pairs = [make_pair(12, 10, 3, seed=60 + i) for i in range(3)]
    with torch.no_grad():
        pairs[1][0].zero_()
    params = [q for pair in pairs for q in pair]
    opt = torch.optim.SGD(params, lr=0.1)
    Refactorer(pairs, damping=damping).attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            opt.zero_grad()
            quadratic_grads(pairs, k)
            opt.step()
    degenerate = [str(w.message) for w in caught
                  if issubclass(w.category, theory.DegenerateGramWarning)]
    assert len(degenerate) == 1, degenerate
    assert "pair1" in degenerate[0] and "pair0" not in degenerate[0]
    assert "pair2" not in degenerate[0]
    assert all(torch.isfinite(q).all() for q in params)


def test_healthy_training_never_warns():
    pairs = [make_pair(12, 10, 3, seed=70 + i) for i in range(3)]
    params = [q for pair in pairs for q in pair]
    opt = torch.optim.SGD(params, lr=0.01)
    Refactorer(pairs).attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", theory.DegenerateGramWarning)
        for k in range(3):
            opt.zero_grad()
            quadratic_grads(pairs, k)
            opt.step()


@pytest.mark.parametrize("kind", ["adamw-amsgrad", "sgd-momentum"])
def test_reflora_s_rescales_weights_grads_and_every_moment(kind):
    """Vectorised rescale against the F7 formulas, per tensor, in float64: both storage
    orientations, a zero-factor layer (kept as is), grads (initial call) and every moment."""
    pairs = []
    for i in range(4):
        A, B = make_pair(9 + i, 7 + i, 2, seed=80 + i, scale_a=3.0 ** i)
        transposed = i % 2 == 0
        b = nn.Parameter(B.detach().T.contiguous()) if transposed else B
        pairs.append(LoraPair(f"l{i}", A, b, b_transposed=transposed))
    with torch.no_grad():
        pairs[3].a.zero_()  # A = 0: no rescaling can help, scale 1 (F7, F10)
    params = [q for p in pairs for q in p.params]
    opt = (torch.optim.AdamW(params, lr=1e-2, amsgrad=True) if kind == "adamw-amsgrad"
           else torch.optim.SGD(params, lr=1e-2, momentum=0.9))
    g = torch.Generator().manual_seed(1)
    for q in params:  # two plain steps fill the moments
        q.grad = torch.randn(q.shape, generator=g, dtype=F64)
    opt.step()
    opt.step()
    keys = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
            if k in opt.state[params[0]]]
    assert len(keys) == (3 if kind == "adamw-amsgrad" else 1)
    before = {id(q): {"w": q.detach().clone(), "g": q.grad.clone(),
                      **{k: opt.state[q][k].clone() for k in keys}} for q in params}
    norms = [(float(p.A.norm()), float(p.B.norm())) for p in pairs]
    Refactorer(pairs, method="reflora-s").refactor_weights(opt, with_grads=True)
    for p, (nA, nB) in zip(pairs, norms):
        s = (nA / nB) ** 0.5 if nA > 0 else 1.0  # p = sqrt(||A|| / ||B||)
        for q, grad_scale in ((p.a, s), (p.b, 1 / s)):
            old = before[id(q)]
            # float64: one rounding of a scalar product per entry
            assert rel(q.detach(), old["w"] / grad_scale) < 1e-14
            assert rel(q.grad, old["g"] * grad_scale) < 1e-14
            for k in keys:
                power = 2 if k.endswith("sq") else 1
                assert rel(opt.state[q][k], old[k] * grad_scale ** power) < 1e-14, k
        if nA == 0:  # untouched, bit for bit
            assert torch.equal(p.b.detach(), before[id(p.b)]["w"])
            assert torch.equal(p.b.grad, before[id(p.b)]["g"])


# --------------------------------------------------------------------------------------
# one class per method, each beside its pure kernel
# --------------------------------------------------------------------------------------


def test_refactorer_builds_the_class_of_each_method():
    from reflora_analysis.methods import BalanceTransform, RefLoRASTransform, RefLoRATransform

    A, B = make_pair(7, 6, 2, seed=0)
    for method, cls in (("reflora", RefLoRATransform), ("reflora-s", RefLoRASTransform),
                        ("balance", BalanceTransform)):
        ref = Refactorer([(A, B)], method=method)
        assert type(ref) is cls and isinstance(ref, Refactorer) and ref.method == method
        assert repr(ref).startswith(f"Refactorer(method='{method}', layers=1")
        direct = cls([(A, B)], damping=1e-3)  # the classes are usable on their own
        assert direct.method == method and direct.damping == 1e-3
    assert type(Refactorer([(A, B)])) is RefLoRATransform  # default method, as documented
    assert type(Refactorer([(A, B)], "balance")) is BalanceTransform  # positional method
    # one optimizer-state entry for the whole family: checkpoints of every method keep it
    opt = torch.optim.SGD([A, B], lr=0.0)
    Refactorer([(A, B)], method="balance").attach(opt)
    assert list(opt.state_dict()[STATE_DICT_KEY]) == ["Refactorer"]


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 4), seed=st.integers(0, 10_000), log_a=st.floats(-2, 2))
def test_reflora_precondition_kernel_is_theory_and_the_transform(r, seed, log_a):
    from reflora_analysis.methods import reflora_precondition

    A, B = make_pair(r + 5, r + 3, r, seed, scale_a=10**log_a)
    (G,) = quadratic_grads([(A, B)], seed)
    gA, gB = A.grad.clone(), B.grad.clone()
    kA, kB = reflora_precondition(A.detach(), B.detach(), gA, gB)
    want_A, want_B = expected_grads(A, B, G)
    assert rel(kA, want_A) < 1e-8 and rel(kB, want_B) < 1e-8  # F1/F3, float64 round-off
    assert torch.equal(A.grad, gA)  # pure: the inputs are left alone
    Refactorer([(A, B)]).pre_step(None)
    assert rel(A.grad, kA) < 1e-12 and rel(B.grad, kB) < 1e-12  # same maths, batched


def test_reflora_precondition_kernel_is_batched_over_layers():
    from reflora_analysis.methods import reflora_precondition

    g = torch.Generator().manual_seed(3)
    A, gA = (torch.randn(4, 9, 3, generator=g, dtype=F64) for _ in range(2))
    B, gB = (torch.randn(4, 7, 3, generator=g, dtype=F64) for _ in range(2))
    bA, bB = reflora_precondition(A, B, gA, gB)
    for i in range(4):
        oA, oB = reflora_precondition(A[i], B[i], gA[i], gB[i])
        assert rel(bA[i], oA) < 1e-12 and rel(bB[i], oB) < 1e-12
    f32 = reflora_precondition(A.float(), B.float(), gA.float(), gB.float())
    assert f32[0].dtype == torch.float32 and rel(f32[0], bA) < 1e-5


def test_balanced_projection_kernel_is_balanced_and_matches_the_transform():
    from reflora_analysis.methods import balanced_projection

    A, B = make_pair(9, 7, 3, seed=4, scale_a=5.0)
    A2, B2 = balanced_projection(A.detach(), B.detach())
    assert rel(A2 @ B2.T, (A @ B.T).detach()) < 1e-12  # same product
    assert float(theory.balance_gap(A2, B2)) < 1e-10  # F4
    assert float(theory.balance_gap(A.detach(), B.detach())) > 0.1
    Refactorer([(A, B)], method="balance").post_step(None)
    assert rel(A.detach(), A2) < 1e-12 and rel(B.detach(), B2) < 1e-12
    # batched, and a zero factor (singular Gram, F10) is returned unchanged
    batch_A = torch.stack([A2, torch.zeros_like(A2)])
    batch_B = torch.stack([B2, B2])
    out_A, out_B = balanced_projection(batch_A, batch_B)
    assert torch.equal(out_A[1], batch_A[1]) and torch.equal(out_B[1], batch_B[1])
    assert rel(out_A[0], A2) < 1e-10  # already balanced: P = I up to round-off


def test_reflora_s_rescale_kernel_matches_the_transform_on_weights_grads_and_moments():
    from reflora_analysis.methods import reflora_s_rescale

    A, B = make_pair(9, 7, 2, seed=5, scale_a=4.0)
    opt = torch.optim.AdamW([A, B], lr=1e-2, amsgrad=True)
    for k in range(2):
        opt.zero_grad()
        quadratic_grads([(A, B)], k)
        opt.step()
    state = {q: {k: v.clone() for k, v in opt.state[q].items()} for q in (A, B)}
    out = reflora_s_rescale(A.detach(), B.detach(), A.grad, B.grad,
                            state_A=opt.state[A], state_B=opt.state[B])
    assert torch.equal(opt.state[A]["exp_avg"], state[A]["exp_avg"])  # pure
    assert rel(out.A @ out.B.T, (A @ B.T).detach()) < 1e-14
    assert abs(float(out.A.norm() / out.B.norm()) - 1.0) < 1e-12  # F7: s* = 1 afterwards
    assert torch.equal(out.state_A["step"], state[A]["step"])  # non-moment entries kept
    Refactorer([(A, B)], method="reflora-s").refactor_weights(opt, with_grads=True)
    for q, w, gq, st_new in ((A, out.A, out.grad_A, out.state_A),
                             (B, out.B, out.grad_B, out.state_B)):
        assert rel(q.detach(), w) < 1e-14 and rel(q.grad, gq) < 1e-14
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert rel(opt.state[q][key], st_new[key]) < 1e-14, key
    zero = reflora_s_rescale(torch.zeros(4, 2, dtype=F64), torch.ones(3, 2, dtype=F64))
    assert torch.equal(zero.B, torch.ones(3, 2, dtype=F64)) and zero.grad_A is None
