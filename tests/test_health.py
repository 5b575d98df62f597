"""Adapter health (probes/health.py) and per-layer balance (probes/balance.py) on known matrices.

Hand-computed values are compared at 1e-12 relative (float64 round-off of a few flops);
the QR route to the product's singular values against torch.linalg.svdvals of the dense
product at 1e-9 relative to sigma_1 (Gaussian factors, float64).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora_analysis.pairs import find_lora_pairs
from reflora_analysis.probes import ProbeContext, make_probes
from reflora_analysis.probes.balance import per_layer_balance
from reflora_analysis.probes.health import (adapter_health, condition_number, effective_rank,
                                            health_stats, product_singular_values)

F64 = torch.float64


def test_effective_rank_hand_computed():
    # p = (2/3, 1/3): H = ln 3 - (2/3) ln 2, erank = 3 / 2^(2/3)
    assert effective_rank(torch.tensor([2.0, 1.0])) == pytest.approx(3 / 2 ** (2 / 3), rel=1e-12)
    assert effective_rank(torch.tensor([5.0, 5.0, 5.0, 0.0])) == pytest.approx(3.0, rel=1e-12)
    assert effective_rank(torch.tensor([7.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(torch.zeros(3)) == 0.0  # the zero adapter: no spectrum
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -1.0]))


def test_condition_numbers_hand_computed():
    Q = torch.linalg.qr(torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))).Q
    A = Q @ torch.diag(torch.tensor([4.0, 1.0], dtype=F64))
    assert condition_number(A) == pytest.approx(4.0, rel=1e-12)
    assert condition_number(torch.ones(5, 2, dtype=F64)) == math.inf  # rank one
    with pytest.raises(ValueError, match="2-D"):
        condition_number(torch.ones(3))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 8), n=st.integers(2, 8), r=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_product_singular_values_match_the_dense_product(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(m, r, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64)
    ref = torch.linalg.svdvals(A @ B.T)
    k = min(r, m, n)
    got = product_singular_values(A, B)
    assert float((got[:k] - ref[:k]).abs().max()) <= 1e-9 * float(ref[0])


def test_adapter_health_on_a_known_pair_and_dominance():
    # A B^T = diag(3, 1) embedded, scaling 2: sigma(s A B^T) = (6, 2); W0 = 4 I: dominance 1.5
    A = torch.zeros(4, 2, dtype=F64)
    A[0, 0], A[1, 1] = 3.0, 1.0
    B = torch.zeros(3, 2, dtype=F64)
    B[0, 0] = B[1, 1] = 1.0
    h = adapter_health(A, B, scaling=2.0, w0_norm=4.0)
    assert h["dominance"] == pytest.approx(1.5, rel=1e-12)
    assert h["erank"] == pytest.approx(effective_rank(torch.tensor([3.0, 1.0])), rel=1e-12)
    assert h["cond_A"] == pytest.approx(3.0, rel=1e-12) and h["cond_B"] == pytest.approx(1.0)
    assert math.isnan(adapter_health(A, B)["dominance"])  # W0 unknown
    assert adapter_health(torch.zeros(4, 2, dtype=F64), B, w0_norm=1.0)["erank"] == 0.0


def test_health_probe_per_layer_on_explicit_pairs_and_mf():
    from reflora_analysis.tasks import make_task

    task = make_task("mf", seed=0)
    pair = task.pairs[0]
    before = pair.A.clone()
    out = make_probes("health", per_layer=True)[0](ProbeContext(task, "lora", "sgd", 0.1, 0))
    W0 = float(torch.linalg.matrix_norm(task.W0.to(F64), ord=2))
    expected = adapter_health(pair.A, pair.B, scaling=pair.scaling, w0_norm=W0)
    assert out[f"health/{pair.name}/dominance"] == pytest.approx(expected["dominance"], rel=1e-12)
    assert out["health/erank_min"] == pytest.approx(expected["erank"], rel=1e-12)
    assert torch.equal(pair.A, before)  # a probe leaves the factors as it found them


def test_health_reaches_the_base_weight_of_a_peft_layer():
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 4)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    layer = model.base_model.model.lin
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    stats = health_stats(model, pairs=find_lora_pairs(model))
    (name, h), = stats["layers"].items()
    with torch.no_grad():
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = float(torch.linalg.matrix_norm(delta.double(), ord=2)
                     / torch.linalg.matrix_norm(layer.base_layer.weight.double(), ord=2))
    assert h["dominance"] == pytest.approx(expected, rel=1e-5)  # float32 factors


def test_per_layer_balance_lists_every_pair():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 2, generator=g, dtype=F64)
    balanced = (A, A.clone())  # A^T A = B^T B: gap 0
    other = (torch.randn(5, 2, generator=g, dtype=F64), 3 * torch.randn(4, 2, generator=g, dtype=F64))
    table = per_layer_balance([balanced, other])
    assert table["names"] == ["pair0", "pair1"]
    assert table["gap"][0] < 1e-15 < 1e-2 < table["gap"][1]
    assert table["norm_ratio"][0] == pytest.approx(1.0, rel=1e-12)
