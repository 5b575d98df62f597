r"""The optimizer integration shared by every method: :class:`PairTransform`.

A :class:`PairTransform` changes LoRA gradients before, or LoRA weights (and optimizer
moments) after, every step of any ``torch.optim.Optimizer``. It is attached through the
optimizer's own extension points (``register_step_pre_hook``, ``register_step_post_hook``,
``register_state_dict_post_hook``, ``register_load_state_dict_pre_hook``), keeps its state in
itself (never in ``optimizer.state[p]``, which AdamW fills lazily only while it is empty) and
saves that state inside ``optimizer.state_dict()`` under the key :data:`STATE_DICT_KEY`.

The maths of each method lives in a pure function beside its transform class (as
``torch.optim.SGD`` beside ``torch.optim._functional.sgd``); this module holds only what
every transform shares: the hooks, the warm-up/interval schedule (:func:`is_active_step`),
the step counter, the state-dict round trip and the finite-gradient guard
(:func:`check_finite_grads`).

Example::

    class Scale(PairTransform):
        def pre_step(self, optimizer):
            for pair in self.pairs:
                pair.a.grad.mul_(2.0)

    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    Scale(model, warmup_steps=10).attach(opt)   # runs inside every opt.step() from step 10
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..pairs import LoraPair, find_lora_pairs

__all__ = [
    "STATE_DICT_KEY",
    "NonFiniteGradientError",
    "PairTransform",
    "check_finite_grads",
    "is_active_step",
]

STATE_DICT_KEY = "reflora_analysis"
"""Key under which attached transforms store their state in ``optimizer.state_dict()``.

Its value is a dict ``{transform.state_key: transform.state_dict()}``, so several
transforms can share one optimizer."""


def is_active_step(step: int, warmup_steps: int = 0, interval: int = 1) -> bool:
    """The schedule of every :class:`PairTransform`: step ``k`` is transformed when
    ``k >= warmup_steps`` and ``(k - warmup_steps) % interval == 0``."""
    k = step - warmup_steps
    return k >= 0 and k % interval == 0


class NonFiniteGradientError(ValueError):
    """A LoRA gradient holds NaN or Inf; the message names the step and the layer."""


def _stored_grads(pairs: Sequence[LoraPair]) -> list[tuple[str, str, Tensor]]:
    out = []
    for pair in pairs:
        for factor, param in (("A", pair.a), ("B", pair.b)):
            if param.grad is not None:
                out.append((pair.name, factor, param.grad))
    return out


def check_finite_grads(pairs: Sequence[LoraPair], step: int | None = None) -> None:
    """Raise :class:`NonFiniteGradientError` if any LoRA gradient holds NaN or Inf.

    One fused norm over all gradients and a single host read decide the common case;
    only when that norm is not finite (NaN/Inf, or a finite gradient whose norm overflows)
    are the tensors inspected one by one to name the first bad layer. Pairs whose
    gradients are ``None`` are skipped.
    """
    grads = _stored_grads(pairs)
    if not grads:
        return
    norms = torch._foreach_norm([g for _, _, g in grads])
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return
    for name, factor, g in grads:
        if not bool(torch.isfinite(g).all()):
            where = "" if step is None else f" at step {step}"
            raise NonFiniteGradientError(
                f"non-finite (NaN/Inf) gradient of LoRA factor {factor} in layer '{name}'{where}; "
                "lower the learning rate, clip gradients, or skip this batch"
            )


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class PairTransform:
    """Base of every transform of LoRA gradients/weights around an optimizer step.

    Parameters
    ----------
    model_or_pairs : nn.Module | list of (A, B) | list of LoraPair
        Resolved with :func:`~reflora_analysis.pairs.find_lora_pairs`.
    warmup_steps : int
        The first ``warmup_steps`` optimizer steps are left untouched (plain LoRA).
    interval : int
        After warm-up, act on every ``interval``-th step only.
    check_finite : bool
        Raise :class:`NonFiniteGradientError` before a step whose LoRA gradients hold
        NaN/Inf (the step is then not taken).

    Step ``k`` (0-based, counted by :attr:`step_count`) is *active* when
    ``k >= warmup_steps`` and ``(k - warmup_steps) % interval == 0``. Subclasses override
    :meth:`pre_step` (gradients, in place) and/or :meth:`post_step` (weights, moments);
    both run only on active steps. :attr:`step_count` increases after every step taken
    while attached.

    Class attribute :attr:`phase` says where the method acts: ``"pre"`` (gradients, before
    the step) or ``"post"`` (weights, after it); the method registry reads it.
    """

    phase: str | None = None

    def __init__(self, model_or_pairs, *, warmup_steps: int = 0, interval: int = 1,
                 check_finite: bool = True):
        self.pairs: list[LoraPair] = find_lora_pairs(model_or_pairs)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.interval = check_int("interval", interval, 1)
        self.check_finite = bool(check_finite)
        self.step_count = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list = []

    # -- identity used inside optimizer.state_dict() -------------------------------------
    @property
    def state_key(self) -> str:
        """Name of this transform's entry under :data:`STATE_DICT_KEY`."""
        return type(self).__name__

    # -- schedule -------------------------------------------------------------------------
    def is_active(self) -> bool:
        """Whether the coming step (index :attr:`step_count`) is transformed."""
        return is_active_step(self.step_count, self.warmup_steps, self.interval)

    # -- hooks to override ----------------------------------------------------------------
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Modify LoRA gradients in place before the optimizer step (active steps only)."""

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Modify LoRA weights / optimizer state after the step (active steps only)."""

    # -- attach / detach ------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "PairTransform":
        """Register the step and state-dict hooks on ``optimizer``; returns ``self``."""
        if self._optimizer is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already attached to an optimizer; call detach() first"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for pair in self.pairs:
            for factor, param in (("A", pair.a), ("B", pair.b)):
                if id(param) not in optimized:
                    raise ValueError(
                        f"LoRA factor {factor} of layer '{pair.name}' is not among the parameters "
                        f"of this {type(optimizer).__name__}; build the optimizer over all LoRA "
                        "parameters before attaching"
                    )
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
            optimizer.register_state_dict_post_hook(self._save_hook),
            optimizer.register_load_state_dict_pre_hook(self._load_hook),
        ]
        self._optimizer = optimizer
        return self

    def detach(self) -> None:
        """Remove every hook; the optimizer behaves as if never attached. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizer = None

    def _pre_step_checks_finite(self) -> bool:
        """True where :meth:`pre_step` checks finiteness itself (fused with its own pass)."""
        return False

    @torch.no_grad()
    def _pre_hook(self, optimizer, args, kwargs):
        active = self.is_active()
        if self.check_finite and not (active and self._pre_step_checks_finite()):
            check_finite_grads(self.pairs, self.step_count)
        if active:
            self.pre_step(optimizer)
        return None

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs):
        if self.is_active():
            self.post_step(optimizer)
        self.step_count += 1

    def _save_hook(self, optimizer, state_dict):
        state_dict.setdefault(STATE_DICT_KEY, {})[self.state_key] = self.state_dict()
        return state_dict

    def _load_hook(self, optimizer, state_dict):
        saved = state_dict.get(STATE_DICT_KEY)
        if saved is not None and self.state_key in saved:
            self.load_state_dict(saved[self.state_key])
        return state_dict

    # -- state ----------------------------------------------------------------------------
    def _pair_shapes(self) -> list[list[int]]:
        return [[*p.shape, p.rank] for p in self.pairs]

    def state_dict(self) -> dict:
        """Plain-Python state: step counter, schedule and the layer shapes (for checks)."""
        return {
            "step_count": self.step_count,
            "warmup_steps": self.warmup_steps,
            "interval": self.interval,
            "pair_shapes": self._pair_shapes(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if the layers do not match."""
        if not isinstance(state, dict) or "step_count" not in state:
            raise ValueError(f"not a {type(self).__name__} state dict: {state!r:.200}")
        shapes = state.get("pair_shapes")
        if shapes is not None and [list(s) for s in shapes] != self._pair_shapes():
            raise ValueError(
                f"state dict is for {len(shapes)} LoRA layers of other shapes (m, n, r) than this "
                f"{type(self).__name__}'s {len(self.pairs)}; was it saved from another model?"
            )
        self.step_count = check_int("step_count", state["step_count"], 0)
        self.warmup_steps = check_int("warmup_steps", state.get("warmup_steps", self.warmup_steps), 0)
        self.interval = check_int("interval", state.get("interval", self.interval), 1)
