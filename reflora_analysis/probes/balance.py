r"""Balance of the LoRA factors (``THEORY.md`` F4, F5).

Per layer, in paper notation (``A`` m x r, ``B`` n x r):

* ``norm_diff = ||A||_F^2 - ||B||_F^2`` (0 when balanced; conserved by gradient flow on
  ``f(A B^T)``, which is why plain LoRA never balances itself),
* ``norm_ratio = ||A||_F / ||B||_F``,
* ``gap = theory.balance_gap(A, B) = ||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` in [0, 1],
* the eigenvalues (= singular values) of the Grams ``A^T A`` and ``B^T B``, descending.

Aggregates: sums of squared norms over layers (``norm_diff``, ``norm_ratio`` of the
totals), and the mean and max of the per-layer gaps. Cost: two ``r x r`` Grams and two
``r x r`` eigendecompositions per layer, no forward pass.
"""

from __future__ import annotations

import math

import torch

from ..pairs import LoraPair, find_lora_pairs
from ..theory import balance_gap, gram

__all__ = ["layer_balance", "balance_stats", "per_layer_balance"]


def layer_balance(A: torch.Tensor, B: torch.Tensor) -> dict:
    """Balance statistics of one pair ``A`` (m x r), ``B`` (n x r); see the module docstring."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"expected A (m x r) and B (n x r) with a shared rank, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    A64, B64 = A.detach().to(torch.float64), B.detach().to(torch.float64)
    na2, nb2 = float(A64.square().sum()), float(B64.square().sum())
    return {
        "norm_A_sq": na2,
        "norm_B_sq": nb2,
        "norm_diff": na2 - nb2,
        "norm_ratio": math.sqrt(na2 / nb2) if nb2 > 0 else math.inf if na2 > 0 else float("nan"),
        "gap": float(balance_gap(A64, B64)),
        "sv_AtA": torch.linalg.eigvalsh(gram(A64)).flip(0).clamp_min(0).tolist(),
        "sv_BtB": torch.linalg.eigvalsh(gram(B64)).flip(0).clamp_min(0).tolist(),
    }


def balance_stats(model_or_pairs) -> dict:
    """Per-layer :func:`layer_balance` and aggregates for a PEFT model or a list of pairs.

    Returns ``{"layers": {name: layer_dict}, "norm_diff", "norm_ratio", "gap_mean",
    "gap_max"}`` where ``norm_diff = sum ||A_l||^2 - sum ||B_l||^2`` and ``norm_ratio =
    sqrt(sum ||A_l||^2 / sum ||B_l||^2)``.
    """
    pairs: list[LoraPair] = find_lora_pairs(model_or_pairs)
    layers = {p.name: layer_balance(p.A, p.B) for p in pairs}
    na2 = sum(v["norm_A_sq"] for v in layers.values())
    nb2 = sum(v["norm_B_sq"] for v in layers.values())
    gaps = [v["gap"] for v in layers.values()]
    return {
        "layers": layers,
        "norm_diff": na2 - nb2,
        "norm_ratio": math.sqrt(na2 / nb2) if nb2 > 0 else math.inf if na2 > 0 else float("nan"),
        "gap_mean": sum(gaps) / len(gaps),
        "gap_max": max(gaps),
    }


def per_layer_balance(model_or_pairs) -> dict[str, list]:
    r"""Per-pair balance as aligned lists, in pair order (for per-layer figures):
    ``{"names", "gap", "norm_ratio", "norm_diff"}`` (:func:`layer_balance` of every pair)."""
    pairs: list[LoraPair] = find_lora_pairs(model_or_pairs)
    rows = [layer_balance(p.A, p.B) for p in pairs]
    return {"names": [p.name for p in pairs], **{k: [r[k] for r in rows]
                                                 for k in ("gap", "norm_ratio", "norm_diff")}}
