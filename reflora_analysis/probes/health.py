r"""Adapter health along training, per LoRA pair: rank use, conditioning, dominance.

Per pair, in paper notation (``A`` m x r, ``B`` n x r, adapter ``s A B^T``, base weight ``W0``):

* ``erank``: the **effective rank** of ``A B^T`` (Roy & Vetterli, "The effective rank: a measure
  of effective dimensionality", EUSIPCO 2007): with singular values ``sigma_1..sigma_r`` and
  ``p_i = sigma_i / sum_j sigma_j``,

      erank = exp(H),   H = -sum_i p_i log p_i   (0 log 0 := 0),

  in ``[1, r]`` for a non-zero product (``r`` when all ``sigma_i`` are equal, 1 for rank one);
  0 for the zero product (e.g. PEFT's ``lora_B = 0`` start), which has no spectrum;
* ``cond_A``, ``cond_B``: the 2-norm condition numbers ``sigma_max / sigma_min`` of the factors
  (``inf`` for a rank-deficient factor). RefLoRA's and ScaledGD's ``r x r`` solves degrade with them;
* ``dominance``: ``sigma_max(s A B^T) / sigma_max(W0)``, how large the adapter has grown against
  the weight it adapts (``inf`` over a zero ``W0``; NaN where ``W0`` is unknown).

Cost: the singular values of ``A B^T`` through the ``r x r`` core of two thin QRs
(``A = Q_A R_A``, ``B = Q_B R_B``, ``sigma(A B^T) = sigma(R_A R_B^T)``), the factors' ``r``
singular values, and ``sigma_max(W0)`` once per layer (the base weight is frozen; cached by
:class:`HealthProbe`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..pairs import LoraPair

__all__ = ["effective_rank", "condition_number", "product_singular_values", "adapter_health",
           "base_weight", "health_stats"]


def effective_rank(singular_values: Tensor) -> float:
    r"""Roy & Vetterli's effective rank ``exp(-sum p_i log p_i)``, ``p = sigma / sum(sigma)``.

    ``singular_values``: a 1-D tensor of non-negative values (any order). Returns 0.0 when
    they are all zero. ``ValueError`` on a negative or non-finite value.
    """
    s = singular_values.detach().to(torch.float64).flatten()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("singular values must be finite and non-negative")
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def condition_number(X: Tensor) -> float:
    """``sigma_max(X) / sigma_min(X)`` of a 2-D tensor; ``inf`` when ``X`` is numerically
    rank-deficient, ``sigma_min <= max(X.shape) eps sigma_max`` with ``eps`` of X's dtype
    (below that, ``sigma_min`` is round-off of the storage, not a property of ``X``)."""
    if X.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(X.shape)}")
    sv = torch.linalg.svdvals(X.detach().to(torch.float64))
    eps = torch.finfo(X.dtype if X.is_floating_point() else torch.float64).eps
    if float(sv[-1]) <= max(X.shape) * eps * float(sv[0]):
        return math.inf
    return float(sv[0] / sv[-1])


def product_singular_values(A: Tensor, B: Tensor) -> Tensor:
    """The ``r`` singular values of ``A B^T`` (descending, float64) from the QR core."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"expected A (m x r) and B (n x r) with a shared rank, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    R_A = torch.linalg.qr(A.detach().to(torch.float64)).R
    R_B = torch.linalg.qr(B.detach().to(torch.float64)).R
    return torch.linalg.svdvals(R_A @ R_B.mT)


def adapter_health(A: Tensor, B: Tensor, *, scaling: float = 1.0,
                   w0_norm: float | None = None) -> dict[str, float]:
    r"""``{"erank", "cond_A", "cond_B", "dominance", "adapter_norm"}`` of one pair.

    ``w0_norm``: ``sigma_max(W0)`` (None: unknown, dominance NaN); ``adapter_norm`` is
    ``sigma_max(s A B^T)``. See the module docstring for the definitions.
    """
    sv = product_singular_values(A, B)
    adapter = abs(float(scaling)) * float(sv[0])
    if w0_norm is None:
        dominance = math.nan
    elif w0_norm > 0:
        dominance = adapter / w0_norm
    else:
        dominance = math.inf if adapter > 0 else math.nan
    return {"erank": effective_rank(sv), "cond_A": condition_number(A),
            "cond_B": condition_number(B), "dominance": dominance, "adapter_norm": adapter}


def base_weight(task_or_model, pair: LoraPair) -> Tensor | None:
    r"""The base weight ``W0`` a pair adapts, or None when it cannot be found.

    A single-layer task gives ``task.W0``; a PEFT model (``task.model`` or the model itself)
    gives the ``base_layer.weight`` of the module named in ``pair.name``
    (``"<module>[<adapter>]"``, :func:`~reflora_analysis.pairs.find_lora_pairs`): ``out x in``,
    i.e. ``m x n`` in paper orientation (an Embedding's is the transpose, which has the same
    singular values).
    """
    W0 = getattr(task_or_model, "W0", None)
    if isinstance(W0, Tensor):
        return W0
    model = (task_or_model if isinstance(task_or_model, torch.nn.Module)
             else getattr(task_or_model, "model", None))  # a PeftModel's .model is the inner one
    if not isinstance(model, torch.nn.Module) or "[" not in pair.name:
        return None
    try:
        module = model.get_submodule(pair.name.rsplit("[", 1)[0])
    except AttributeError:
        return None
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    weight = getattr(base, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def health_stats(task_or_model, pairs=None, *, w0_norms: dict[str, float] | None = None) -> dict:
    r"""Per-pair :func:`adapter_health` and aggregates.

    ``pairs``: default ``task.pairs``. ``w0_norms``: a cache ``{pair name: sigma_max(W0)}``,
    filled as it goes. Returns ``{"layers": {name: dict}, "erank_mean", "erank_min",
    "cond_A_max", "cond_B_max", "dominance_mean", "dominance_max"}`` (NaN-free means where
    some dominance is unknown; NaN when none is known).
    """
    pairs = list(getattr(task_or_model, "pairs", []) if pairs is None else pairs)
    if not pairs:
        raise ValueError("no LoRA pairs to measure")
    cache = {} if w0_norms is None else w0_norms
    layers = {}
    for p in pairs:
        if p.name not in cache:
            W0 = base_weight(task_or_model, p)
            cache[p.name] = (None if W0 is None else
                             float(torch.linalg.matrix_norm(W0.detach().to(torch.float64), ord=2)))
        layers[p.name] = adapter_health(p.A, p.B, scaling=p.scaling, w0_norm=cache[p.name])
    ranks = [v["erank"] for v in layers.values()]
    dom = [v["dominance"] for v in layers.values() if not math.isnan(v["dominance"])]
    return {"layers": layers, "erank_mean": sum(ranks) / len(ranks), "erank_min": min(ranks),
            "cond_A_max": max(v["cond_A"] for v in layers.values()),
            "cond_B_max": max(v["cond_B"] for v in layers.values()),
            "dominance_mean": sum(dom) / len(dom) if dom else math.nan,
            "dominance_max": max(dom) if dom else math.nan}


# the package defines Probe before it imports this module (probes/__init__.py's registry)
from . import Probe  # noqa: E402


class HealthProbe(Probe):
    r"""``health/erank_mean``, ``erank_min``, ``cond_A_max``, ``cond_B_max``,
    ``dominance_mean``, ``dominance_max`` (:func:`health_stats`); with ``per_layer=True``
    also ``health/<pair name>/<erank|cond_A|cond_B|dominance>`` for every pair.

    ``sigma_max(W0)`` is computed once per pair and task (the base weight is frozen).
    """

    name = "health"

    def __init__(self, per_layer: bool = False):
        self.per_layer = bool(per_layer)
        self._w0_norms: dict[str, float] = {}
        self._task_id: int | None = None

    def measure(self, ctx):
        if self._task_id != id(ctx.task):
            self._w0_norms, self._task_id = {}, id(ctx.task)
        stats = health_stats(ctx.task, w0_norms=self._w0_norms)
        out = {f"health/{k}": v for k, v in stats.items() if k != "layers"}
        if self.per_layer:
            for name, values in stats["layers"].items():
                for k in ("erank", "cond_A", "cond_B", "dominance"):
                    out[f"health/{name}/{k}"] = values[k]
        return out
