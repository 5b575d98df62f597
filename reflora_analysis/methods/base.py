r"""Shared plumbing of the method registry: resolving parameters, base optimizers, checks.

Every method of :mod:`reflora_analysis.methods` is "a base optimizer (SGD or AdamW) plus, for
some methods, a :class:`~reflora_analysis.methods.transform.PairTransform` that changes the LoRA
gradients or weights around each step". This module holds what all of them share:

- :class:`Trainables`: the LoRA pairs (paper notation, :mod:`reflora_analysis.pairs`) and the
  other trainable parameters (a classifier head, biases, DoRA magnitudes), found once;
- :func:`make_base_optimizer`: ``torch.optim.SGD`` / ``torch.optim.AdamW`` from a name;
- :func:`internal_sgd_step`: the "outer SGD step done by the transform" used by the methods
  that are adaptive optimizers in their own right (LoRA-RITE, LoRA-Pro "full") when the base
  optimizer is AdamW, so that AdamW does not re-normalise their direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..pairs import LoraPair, NoLoraLayersError, find_lora_pairs
from ..theory import symmetrize
from .transform import PairTransform

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
    "check_betas",
    "check_number",
    "LayerStateTransform",
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


def resolve_trainables(model_or_pairs, pairs=None, *, method: str | None = None) -> Trainables:
    """Find the LoRA pairs and the other trainable parameters.

    Parameters
    ----------
    model_or_pairs : nn.Module | Sequence[(A, B)] | Sequence[LoraPair]
        A PEFT model (every ``requires_grad`` parameter is trained; LoRA pairs found by
        :func:`~reflora_analysis.pairs.find_lora_pairs`) or explicit pairs (paper orientation).
    pairs : optional
        Explicit pairs of a plain-torch ``nn.Module`` (its other ``requires_grad`` parameters
        are trained by the base optimizer).
    method : optional
        The method being built (a registry name). Methods whose registry entry has
        ``needs_pairs=False`` (``methods.pairless_methods()``) need no pair mapping, so a
        PEFT model whose LoRA layers cannot be mapped to (A, B) pairs (Conv LoRA) is trained
        whole: ``pairs=[]`` and every ``requires_grad`` parameter in ``others``.
        For the other methods such a model raises a ``ValueError`` naming the layer and the
        methods that do support it.
    """
    if isinstance(model_or_pairs, nn.Module):
        try:
            found = find_lora_pairs(pairs if pairs is not None else model_or_pairs)
        except NoLoraLayersError:
            raise
        except ValueError as err:  # a PEFT LoRA layer without an (A, B) mapping, e.g. Conv2d
            if pairs is not None or not is_peft_model(model_or_pairs):
                raise
            from .registry import get_method, pairless_methods  # the registry imports us
            if method is None or get_method(method).needs_pairs:
                needs = f"method {method!r}" if method else "this method"
                raise ValueError(f"{err}; {needs} needs (A, B) pairs, only methods "
                                 f"{' and '.join(pairless_methods())} train such layers") from None
            others = [p for p in _unique(model_or_pairs.parameters()) if p.requires_grad]
            return Trainables(pairs=[], others=others, model=model_or_pairs, from_model=True)
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
    X = symmetrize(X)
    if damping:
        X = X + damping * torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    evals, evecs = torch.linalg.eigh(X)
    tol = X.shape[-1] * torch.finfo(X.dtype).eps * evals.abs().amax(-1, keepdim=True)
    inv = torch.where(evals > tol, 1.0 / torch.where(evals > tol, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    return (evecs * inv.unsqueeze(-2)) @ evecs.mT


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False,
                 allow_none: bool = False, finite: bool = True):
    """``value`` as a float checked against ``minimum``; a one-line error naming ``name``.

    ``TypeError`` when ``value`` is not a real number (``None`` passes through when
    ``allow_none``); ``ValueError`` when it is NaN, infinite (unless ``finite=False``), below
    ``minimum`` or, with ``strict``, equal to it.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number" + (" or None (off)" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = float(value)
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    ok = value > minimum if strict else value >= minimum  # False for NaN
    if not ok or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}{bound}"
                         f"{' or None (off)' if allow_none else ''}, got {value!r}")
    return value


def check_betas(betas, name: str = "betas") -> tuple[float, float]:
    """``(beta1, beta2)``, each a real number in ``[0, 1)``; one-line TypeError/ValueError."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")
    out = []
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"{name} must be a pair (beta1, beta2) of numbers in [0, 1), got "
                            f"{tuple(betas)!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {tuple(betas)!r}")
        out.append(float(beta))
    return out[0], out[1]


class LayerStateTransform(PairTransform):
    """A :class:`PairTransform` with its own step counter and per-layer state, saved with it.

    Subclasses name where that state lives: ``state_key`` (the entry of :meth:`state_dict`),
    ``step_attr`` / ``layers_attr`` (their attributes: an int and a list with one entry per
    pair), ``layers_field`` (the list's name inside the entry) and ``label`` (for errors).
    """

    state_key: str = ""
    step_attr: str = ""
    layers_attr: str = ""
    layers_field: str = "layers"
    label: str = ""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state[self.state_key] = {"step": getattr(self, self.step_attr),
                                 self.layers_field: getattr(self, self.layers_attr)}
        return state

    def load_state_dict(self, state: dict) -> None:
        own: Any = state.get(self.state_key) if isinstance(state, dict) else None
        layers = own.get(self.layers_field) if isinstance(own, dict) else None
        if not isinstance(layers, (list, tuple)) or len(layers) != len(self.pairs):
            raise ValueError(f"state does not belong to a {self.label} transform with "
                             f"{len(self.pairs)} pairs")
        super().load_state_dict({k: v for k, v in state.items() if k != self.state_key})
        setattr(self, self.step_attr, int(own["step"]))
        setattr(self, self.layers_attr, list(layers))
