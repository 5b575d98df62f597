"""BaLoRA's SVD split (methods/balora.py; BASELINES.md section 5) against dense references.

Tolerances: float64 throughout; identities of the split (balance, product, equality with the
SVD's own factors) hold to round-off, checked at 1e-10 relative (cond of the random factors is
modest: Gaussian m x r with m >= r + 2). Trajectory equalities over 20 SGD steps: 1e-9 relative.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reflora_analysis.methods import build_optimizer, get_method
from reflora_analysis.methods.balance import balanced_projection
from reflora_analysis.methods.balora import BaLoRATransform, svd_split
from reflora_analysis.pairs import LoraPair
from reflora_analysis.theory import DegenerateGramWarning

F64 = torch.float64


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


def _factors(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64),
            torch.randn(m, n, generator=g, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(4, 9), n=st.integers(4, 9), r=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_split_is_balanced_keeps_the_product_and_is_the_svd_split_up_to_signs(m, n, r, seed):
    A, B, _ = _factors(m, n, r, seed)
    A2, B2 = svd_split(A, B, align=False)
    assert _rel(A2 @ B2.T, A @ B.T) < 1e-10
    assert float((A2.T @ A2 - B2.T @ B2).norm()) < 1e-10 * float((A2.T @ A2).norm())
    U, S, Vh = torch.linalg.svd(A @ B.T, full_matrices=False)
    ref_A, ref_B = U[:, :r] * S[:r].sqrt(), Vh[:r].T * S[:r].sqrt()
    signs = torch.sign((A2 * ref_A).sum(0))  # each column equals the reference up to its sign
    assert _rel(A2 * signs, ref_A) < 1e-8 and _rel(B2 * signs, ref_B) < 1e-8
    # aligned: some signed permutation of the same columns, still balanced
    A3, B3 = svd_split(A, B)
    assert _rel(A3 @ B3.T, A @ B.T) < 1e-10
    gram = A3.T @ A3  # diag(S) with its entries permuted
    assert float((gram - torch.diag(gram.diagonal())).norm()) < 1e-10 * float(S[0])
    torch.testing.assert_close(gram.diagonal().sort(descending=True).values, S[:r],
                               rtol=1e-10, atol=1e-12)


def test_alignment_keeps_a_split_whose_columns_were_flipped_and_swapped():
    # the old behaviour (SVD's order and signs) would reorder and flip these columns back
    A, B, _ = _factors(8, 6, 3, 1)
    A2, B2 = svd_split(A, B, align=False)  # descending singular values
    Q = torch.tensor([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=F64)  # signed permutation
    A3, B3 = A2 @ Q, B2 @ Q
    A4, B4 = svd_split(A3, B3)
    assert _rel(A4, A3) < 1e-10 and _rel(B4, B3) < 1e-10
    A5, _ = svd_split(A3, B3, align=False)
    assert _rel(A5, A3) > 0.5  # SVD's own choice is not the stored one


def test_balora_differs_from_balance_by_a_rotation():
    A, B, _ = _factors(8, 6, 3, 2)
    Ab, Bb = balanced_projection(A, B)
    As, Bs = svd_split(A, B)
    O = torch.linalg.lstsq(Ab, As).solution  # As = Ab O
    assert _rel(Ab @ O, As) < 1e-10 and _rel(Bb @ O, Bs) < 1e-10
    assert float((O.T @ O - torch.eye(3, dtype=F64)).norm()) < 1e-10
    assert _rel(As, Ab) > 0.1  # a genuine rotation, not the identity


def _train(method, A, B, Y, optimizer, steps, lr, **hparams):
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    opt, transform = build_optimizer(method, [(a, b)], optimizer=optimizer, lr=lr, **hparams)
    Ws, grams = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((a @ b.T - Y) ** 2).sum()
        loss.backward()
        opt.step()
        Ws.append((a @ b.T).detach().clone())
        grams.append((a.T @ a - b.T @ b).detach().norm() / (a.T @ a).detach().norm())
    return Ws, grams, (a.detach(), b.detach()), transform


def test_sgd_trajectory_equals_refloras_and_every_iterate_is_balanced():
    # BASELINES.md section 5 oracle: non-singular start, float64, projection before step 1
    A, B, Y = _factors(9, 7, 3, 3)
    W_bal, gaps, _, t = _train("balora", A, B, Y, "sgd", 20, 0.02)
    W_ref, _, _, _ = _train("reflora", A, B, Y, "sgd", 20, 0.02, damping=0.0)
    W_lora, _, _, _ = _train("lora", A, B, Y, "sgd", 20, 0.02)
    assert max(_rel(x, y) for x, y in zip(W_bal, W_ref)) < 1e-9
    assert _rel(W_lora[-1], W_ref[-1]) > 1e-3  # the oracle can tell methods apart
    assert max(float(g) for g in gaps) < 1e-10
    assert isinstance(t, BaLoRATransform) and get_method("balora").phase == "post"


def test_adamw_balora_is_not_balance():
    A, B, Y = _factors(9, 7, 3, 4)
    W_bal, gaps, _, _ = _train("balora", A, B, Y, "adamw", 10, 0.01)
    W_geo, gaps_geo, _, _ = _train("balance", A, B, Y, "adamw", 10, 0.01)
    assert max(float(g) for g in gaps + gaps_geo) < 1e-10  # both balanced ...
    assert _rel(W_bal[-1], W_geo[-1]) > 1e-3  # ... yet different algorithms under AdamW
    W_bal2, _, _, _ = _train("balora", A, B, Y, "sgd", 10, 0.01)
    W_geo2, _, _, _ = _train("balance", A, B, Y, "sgd", 10, 0.01)
    assert max(_rel(x, y) for x, y in zip(W_bal2, W_geo2)) < 1e-9  # same W under SGD


def test_zero_start_is_projected_only_after_the_first_step():
    _, B, Y = _factors(9, 7, 3, 5)
    A = torch.zeros(9, 3, dtype=F64)  # PEFT's lora_B = 0
    with pytest.warns(DegenerateGramWarning, match="balora: rank-deficient product"):
        Ws, gaps, (a, b), _ = _train("balora", A, B, Y, "sgd", 3, 0.02)
    W_lora, _, _, _ = _train("lora", A, B, Y, "sgd", 1, 0.02)
    assert _rel(Ws[0], W_lora[0]) < 1e-12  # step 1 is plain LoRA's (nothing to project)
    assert float(gaps[0]) < 1e-10 and float(a.norm()) > 0  # then balanced, not dead


def test_peft_orientation_is_respected():
    # a LoraPair stored as PEFT does: a = lora_B (m x r), b = lora_A (r x n)
    A, B, Y = _factors(8, 6, 2, 6)
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.T.clone())
    pair = LoraPair("layer", a, b, scaling=1.0, b_transposed=True)
    t = BaLoRATransform([pair])
    t.project()
    assert _rel(a.detach() @ b.detach(), A @ B.T) < 1e-10  # delta W = lora_B lora_A kept
    gap = a.detach().T @ a.detach() - b.detach() @ b.detach().T
    assert float(gap.norm()) < 1e-10


def test_state_round_trip_and_bad_input():
    A, B, _ = _factors(8, 6, 2, 7)
    a, b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
    opt, t = build_optimizer("balora", [(a, b)], optimizer="sgd", lr=0.01)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    state = opt.state_dict()
    t2 = BaLoRATransform([(nn.Parameter(A.clone()), nn.Parameter(B.clone()))])
    t2.load_state_dict(state["reflora_analysis"]["BaLoRATransform"])
    assert t2.initialized and t2.step_count == 1
    with pytest.raises(ValueError, match="shared rank"):
        svd_split(A, B[:, :1])
    with pytest.raises(ValueError, match="rank-deficient"):
        svd_split(torch.zeros(8, 2, dtype=F64), B)
