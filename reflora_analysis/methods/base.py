r"""Shared plumbing of the method registry: resolving parameters, base optimizers, checks.

Every method of :mod:`reflora_analysis.methods` is "a base optimizer (SGD or AdamW) plus, for
some methods, a :class:`~reflora_analysis.refactor.PairTransform` that changes the LoRA
gradients or weights around each step". This module holds what all of them share:

- :class:`Trainables`: the LoRA pairs (paper notation, :mod:`reflora_analysis.pairs`) and the
  other trainable parameters (a classifier head, biases, DoRA magnitudes), found once;
- :func:`make_base_optimizer`: ``torch.optim.SGD`` / ``torch.optim.AdamW`` from a name;
- :func:`internal_sgd_step`: the "outer SGD step done by the transform" used by the methods
  that are adaptive optimizers in their own right (LoRA-RITE, LoRA-Pro "full") when the base
  optimizer is AdamW, so that AdamW does not re-normalise their direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from ..pairs import LoraPair, find_lora_pairs

__all__ = [
    "BASE_OPTIMIZERS",
    "BASE_OPTIMIZER_KWARGS",
    "Trainables",
    "resolve_trainables",
    "make_base_optimizer",
    "check_lr",
    "group_lr",
    "internal_sgd_step",
    "is_peft_model",
    "uses_dora",
    "gram_pinv",
]

#: Base optimizers by name.
BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}

#: Keyword arguments passed through to the base optimizer (everything else is a method hparam).
BASE_OPTIMIZER_KWARGS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "nesterov"),
    "adamw": ("betas", "eps"),
}


@dataclass
class Trainables:
    """What one call of ``build_optimizer`` trains.

    ``pairs`` are the LoRA pairs (paper notation); ``others`` every other trainable parameter
    (trained by the base optimizer at the base learning rate); ``model`` the module when one
    was given, else ``None``; ``from_model`` whether the pairs were found in ``model`` itself
    (then PEFT's own optimizer helpers can serve it).
    """

    pairs: list[LoraPair]
    others: list[nn.Parameter] = field(default_factory=list)
    model: nn.Module | None = None
    from_model: bool = False

    @property
    def lora_params(self) -> list[nn.Parameter]:
        return [p for pair in self.pairs for p in pair.params]


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def resolve_trainables(model_or_pairs, pairs=None) -> Trainables:
    """Find the LoRA pairs and the other trainable parameters.

    Parameters
    ----------
    model_or_pairs : nn.Module | Sequence[(A, B)] | Sequence[LoraPair]
        A PEFT model (every ``requires_grad`` parameter is trained; LoRA pairs found by
        :func:`~reflora_analysis.pairs.find_lora_pairs`) or explicit pairs (paper orientation).
    pairs : optional
        Explicit pairs of a plain-torch ``nn.Module`` (its other ``requires_grad`` parameters
        are trained by the base optimizer).
    """
    if isinstance(model_or_pairs, nn.Module):
        found = find_lora_pairs(pairs if pairs is not None else model_or_pairs)
        lora_ids = {id(p) for pair in found for p in pair.params}
        others = [p for p in _unique(model_or_pairs.parameters())
                  if p.requires_grad and id(p) not in lora_ids]
        return Trainables(pairs=found, others=others, model=model_or_pairs,
                          from_model=pairs is None)
    if pairs is not None:
        raise TypeError("pairs= is only for an nn.Module whose LoRA factors are plain parameters; "
                        "pass the pairs as the first argument instead")
    return Trainables(pairs=find_lora_pairs(model_or_pairs))


def check_lr(lr) -> float:
    """``lr`` as a positive finite float, else a one-line ``ValueError``."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a positive number, got {type(lr).__name__}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    return float(lr)


def make_base_optimizer(name: str, param_groups: list[dict], *, lr: float, weight_decay: float,
                        base_kwargs: dict) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``torch.optim.AdamW`` over ``param_groups`` (empty groups dropped).

    Group dicts may override ``lr`` and ``weight_decay``; ``base_kwargs`` are the pass-through
    keywords of :data:`BASE_OPTIMIZER_KWARGS`.
    """
    groups = [g for g in param_groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return BASE_OPTIMIZERS[name](groups, lr=lr, weight_decay=weight_decay, **base_kwargs)


def group_lr(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> float:
    """The current learning rate of the group holding ``param`` (so LR schedulers apply)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    raise ValueError("parameter is not managed by this optimizer (build the optimizer and the "
                     "transform from the same model)")


@torch.no_grad()
def internal_sgd_step(optimizer: torch.optim.Optimizer, param: nn.Parameter, direction: Tensor,
                      weight_decay: float) -> None:
    r"""``p <- p - lr (direction + wd p)`` with the group's ``lr``; then ``p.grad = None``.

    Used in a step pre-hook by methods whose own moments replace Adam's: clearing ``.grad``
    makes the base optimizer (AdamW) skip ``p`` entirely (no second normalisation, no second
    weight decay), while the other parameters still get AdamW.
    """
    lr = group_lr(optimizer, param)
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(direction.to(param.dtype), alpha=-lr)
    param.grad = None


def is_peft_model(model) -> bool:
    """True when ``model`` is an ``nn.Module`` containing PEFT LoRA layers."""
    if not isinstance(model, nn.Module):
        return False
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def uses_dora(model) -> bool:
    """True when a PEFT LoRA layer of ``model`` has DoRA enabled (``use_dora=True``)."""
    if not is_peft_model(model):
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) and any(bool(v) for v in getattr(m, "use_dora", {}).values())
               for m in model.modules())


def gram_pinv(X: Tensor, damping: float = 0.0) -> Tensor:
    r"""``(X + d I)^+`` for a symmetric PSD ``(..., r, r)`` Gram, via ``eigh``.

    Eigenvalues below ``r * eps * lambda_max`` count as zero (pseudo-inverse), so a zero
    factor (PEFT's ``lora_B = 0`` start) gives a zero, never an Inf/NaN.
    """
    X = (X + X.mT) / 2
    if damping:
        X = X + damping * torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    evals, evecs = torch.linalg.eigh(X)
    tol = X.shape[-1] * torch.finfo(X.dtype).eps * evals.abs().amax(-1, keepdim=True)
    inv = torch.where(evals > tol, 1.0 / torch.where(evals > tol, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    return (evecs * inv.unsqueeze(-2)) @ evecs.mT
