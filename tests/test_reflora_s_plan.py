"""RefLoRA-S caches which tensors it rescales; the cache must never go stale.

The transform walks the layers and the optimizer state once and reuses that plan while every
cached moment is still the tensor the optimizer holds. These tests change the state under it
(a reloaded state, a moment rebound by the optimizer, a layer whose state appears late) and
compare each step with the pure per-pair kernel :func:`reflora_s_rescale` (F7) applied to the
state as it was before the step. Float64, so the 1e-12 relative tolerance covers the few
roundings of one scale and one product per entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reflora_analysis.methods.reflora_s import reflora_s_rescale
from reflora_analysis.pairs import LoraPair
from reflora_analysis.refactor import Refactorer

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)


def make_pairs(seed: int, shapes=((6, 5), (6, 5), (4, 7))) -> list[LoraPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (m, n) in enumerate(shapes):
        a = nn.Parameter(torch.randn(m, 3, generator=g, dtype=F64) * (i + 1))
        b = nn.Parameter(torch.randn(3, n, generator=g, dtype=F64))  # PEFT storage: B^T
        pairs.append(LoraPair(f"l{i}", a, b, b_transposed=True))
    return pairs


def set_grads(pairs, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for q in (q for p in pairs for q in p.params):
        q.grad = torch.randn(q.shape, generator=g, dtype=F64)


def expected_after_post_step(pairs, opt) -> list[tuple]:
    """The pure kernel on a copy of each pair and its state, as the post-step hook sees it."""
    out = []
    for pair in pairs:
        A, Bt = pair.a.detach().clone(), pair.b.detach().clone()
        sa = copy.deepcopy(opt.state.get(pair.a, {}))
        sb = copy.deepcopy(opt.state.get(pair.b, {}))
        out.append(reflora_s_rescale(A, Bt, state_A=sa, state_B=sb))  # any orientation
    return out


def assert_matches(pairs, opt, expected) -> None:
    for pair, want in zip(pairs, expected):
        torch.testing.assert_close(pair.a.detach(), want.A, **TOL)
        torch.testing.assert_close(pair.b.detach(), want.B, **TOL)
        for param, state in ((pair.a, want.state_A), (pair.b, want.state_B)):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[param][key], state[key], **TOL)


def step_and_check(pairs, opt, transform, seed: int) -> None:
    """One optimizer step; the rescale it ends with must equal the pure kernel's."""
    set_grads(pairs, seed)
    transform.pre_step(opt)  # rescales once before the first step only (reference code)
    opt.step()  # the transform is not attached: its hooks are called here by hand
    expected = expected_after_post_step(pairs, opt)
    transform.post_step(opt)
    assert_matches(pairs, opt, expected)


@pytest.fixture
def setup():
    pairs = make_pairs(0)
    params = [q for p in pairs for q in p.params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    transform = Refactorer(pairs, method="reflora-s")  # not attached: steps are driven here
    return pairs, opt, transform


def test_a_reloaded_optimizer_state_is_rescaled_not_the_old_one(setup):
    pairs, opt, transform = setup
    for seed in range(3):
        step_and_check(pairs, opt, transform, seed)
    old = [opt.state[q]["exp_avg"] for p in pairs for q in p.params]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state object and moments
    step_and_check(pairs, opt, transform, 10)
    assert all(t is not opt.state[q]["exp_avg"] for t, q in
               zip(old, (q for p in pairs for q in p.params)))


def test_a_moment_rebound_by_the_optimizer_is_rescaled(setup):
    pairs, opt, transform = setup
    step_and_check(pairs, opt, transform, 0)
    step_and_check(pairs, opt, transform, 1)
    victim = pairs[1].a
    opt.state[victim]["exp_avg_sq"] = opt.state[victim]["exp_avg_sq"].clone()  # same dict
    step_and_check(pairs, opt, transform, 2)


def test_state_created_after_the_first_plan_is_rescaled(setup):
    pairs, opt, transform = setup
    late = pairs[2]
    for q in late.params:
        q.requires_grad_(False)  # no gradient yet: AdamW creates no state for it
    for seed in range(2):
        set_grads(pairs[:2], seed)
        for q in late.params:
            q.grad = None
        opt.step()
        transform.post_step(opt)
    assert late.a not in opt.state
    for q in late.params:
        q.requires_grad_(True)
    step_and_check(pairs, opt, transform, 5)
    assert "exp_avg" in opt.state[late.a]


def test_reflora_s_allocates_no_gram_workspace(setup):
    # RefLoRA-S needs only the factor norms: the engine's Gram buffer and stacked workspace
    # (two copies of the largest stacked class) would be memory beyond the method's state
    pairs, opt, transform = setup
    for seed in range(3):
        step_and_check(pairs, opt, transform, seed)
    assert all(g._work is None and g._grams is None for g in transform._groups)
    # RefLoRA, on the same engine, allocates both at its first step
    reflora = Refactorer(pairs, method="reflora")
    reflora.pre_step(opt)
    assert all(g._work is not None and g._grams is not None for g in reflora._groups)
