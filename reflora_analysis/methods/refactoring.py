r"""The refactoring family: what RefLoRA, RefLoRA-S and the balanced projection share.

Each of the three replaces a LoRA pair by another factorization of the same product,
``(A, B) -> (A P, B P^{-T})`` with ``P`` in GL(r) (``THEORY.md`` section 2), or takes the
step that such a refactoring induces:

=========== ============================================================ ==============
method      what it does                                                  when
=========== ============================================================ ==============
reflora     grad_A <- grad_A S*^{-1}, grad_B <- grad_B S*  (F1, F3)        before the step
reflora-s   A <- A / sqrt(c), B <- sqrt(c) B, c = ||A||/||B|| (F7);        after the step
            Adam/momentum moments rescaled to the new coordinates
balance     (A, B) <- (A P, B P^{-1}), P = S*^{1/2}: balanced, same A B^T  after the step
            (F4, F5); moments untouched
=========== ============================================================ ==============

One class per method, each beside its pure kernel: :class:`~.reflora.RefLoRATransform`
(:func:`~.reflora.reflora_precondition`), :class:`~.reflora_s.RefLoRASTransform`
(:func:`~.reflora_s.reflora_s_rescale`) and :class:`~.balance.BalanceTransform`
(:func:`~.balance.balanced_projection`). This module holds their common base
:class:`Refactorer` (damping, the batched Gram engine :class:`~.gram.PairGroup`, the one-time
F10 warning, the state saved in checkpoints), :class:`WeightRefactorer` (the base of the two
post-step methods) and the optimizer builders of the family.

``Refactorer(model, method=...)`` builds the method's class, found in the registry
(:func:`reflora_analysis.methods.get_method`); every instance is a ``Refactorer``.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from .. import theory
from .base import Trainables, check_lr, make_base_optimizer, resolve_trainables
from .gram import STRATEGIES, PairGroup, make_groups, singular_tol
from .transform import PairTransform

__all__ = ["REFACTORING_HPARAMS", "Refactorer", "WeightRefactorer", "build_refactored",
           "create_reflora_optimizer"]

#: The hyper-parameters (with defaults) every refactoring method takes in the registry.
REFACTORING_HPARAMS = {"warmup_steps": 0, "interval": 1, "damping": 0.0}

WRITE_BACKS = ("copy", "rebind")

#: The device-side degenerate-Gram mask is read on the host at the first active step, then
#: every this many steps and in ``state_dict()``, until the warning has been given: one host
#: read per 64 steps instead of one per step (the warning may come up to 63 steps late; the
#: damping itself is applied on the device at the step it is needed).
DEGENERATE_CHECK_EVERY = 64


def _refactoring_class(method) -> type["Refactorer"]:
    """The transform class of a refactoring method, from the registry (the one name lookup)."""
    from .registry import get_method, refactoring_methods  # the registry imports this module

    try:
        spec = get_method(method)
    except ValueError:
        spec = None
    if spec is None or not spec.refactoring:
        raise ValueError(f"unknown refactoring method {method!r}; valid methods: "
                         + ", ".join(refactoring_methods()))
    return spec.transform_cls


class Refactorer(PairTransform):
    r"""Base of the refactoring methods; ``Refactorer(model, method)`` builds one of them.

    ``Refactorer(model_or_pairs, method="reflora", ...)`` returns an instance of the
    method's class (:class:`~.reflora.RefLoRATransform`, :class:`~.reflora_s.RefLoRASTransform`
    or :class:`~.balance.BalanceTransform`; see their docstrings for what each does). The
    subclasses can also be built directly (``method`` then defaults to their own).

    Parameters
    ----------
    model_or_pairs : nn.Module | list of (A, B) | list of LoraPair
        A PEFT model (Linear and Embedding LoRA layers, every active adapter) or explicit
        pairs in paper orientation, A (m x r), B (n x r).
    method : {"reflora", "reflora-s", "balance"}
        A refactoring method of the registry (``methods.refactoring_methods()``).
    warmup_steps, interval : int
        See :class:`~.transform.PairTransform`. The PEFT start (``lora_B = 0``, i.e. A = 0)
        makes ``A^T A = 0``: RefLoRA's update of A is then (almost) zero and it cannot leave
        that point by itself (THEORY.md section 6), so use ``warmup_steps`` > 0 there.
    damping : float
        Relative damping of the Grams (``theory.relative_damping``): ``X + dI``, ``Y + dI``
        with ``d = damping (tr X + tr Y) / (2r)``. The default 0 keeps RefLoRA exactly
        GL(r)-invariant (F6); any d > 0 breaks invariance at order d. Grams that are
        near-singular after this damping get extra damping (F10) and one
        :class:`~reflora_analysis.theory.DegenerateGramWarning` per refactorer naming the
        layers (with d > 0 also layers with a zero factor, which RefLoRA cannot leave);
        results are always finite (F10). The damping is decided on the device at every
        step; the warning reads that decision lazily (:meth:`check_degenerate`).
    strategy : {"auto", "loop", "stack"}
        How the Grams and the per-layer ``(m x r) x (r x r)`` products are issued (see
        :class:`~.gram.PairGroup`): "stack" batches the factors of equal storage shape
        through a workspace (one ``bmm`` per shape), "loop" issues one ``mm`` per layer;
        ``"auto"`` stacks everything on accelerators and, on a CPU, the factors under
        :data:`~.gram.STACK_MAX_NUMEL` elements. Results are identical.
    write_back : {"copy", "rebind"}
        "reflora" only: ``"copy"`` writes the preconditioned gradients into the existing
        ``.grad`` tensors (``grad.copy_``; identity of ``.grad`` kept); ``"rebind"`` sets
        ``param.grad`` to the new tensor, as the reference code does, which saves one
        memory pass (measured in ``benchmarks/refactor_overhead.py``); gradients that are
        views (DDP ``gradient_as_bucket_view``) are still copied into.
    check_finite : bool
        See :class:`~.transform.PairTransform`. The check guards against NaN/Inf gradients
        (a diverged step) and is not part of the method (plain optimizers do none):
        ``check_finite=False`` gives the bare cost of the method.

    Notes
    -----
    Grams and products are computed in ``promote_types(dtype, float32)`` and written back
    in the parameter dtype (bf16/fp16 parameters work); the ``r x r`` factorizations run
    in float64 (tiny). The layers are grouped once, here (:class:`~.gram.PairGroup`); buffers
    (Grams, a shared workspace) are allocated once; nothing grows with the steps, and the
    hot path reads no tensor value on the host (the finite-gradient guard excepted). The state (:meth:`state_dict`) is saved in
    ``optimizer.state_dict()`` under the family's key ``"Refactorer"`` with the method's
    name, so a checkpoint restores only into the same method.

    Examples
    --------
    ::

        opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-4)
        refactorer = Refactorer(peft_model, "reflora", warmup_steps=100).attach(opt)
        torch.save(opt.state_dict(), "opt.pt")   # carries refactorer.state_dict()
    """

    #: The method's registry name, set by each subclass.
    method: ClassVar[str] = ""
    # one entry for the whole family in optimizer.state_dict() (checkpoint format 2)
    state_key = "Refactorer"

    def __new__(cls, *args, **kwargs):
        if cls is not Refactorer:
            return super().__new__(cls)
        method = args[1] if len(args) > 1 else kwargs.get("method", "reflora")
        return super().__new__(_refactoring_class(method))

    def __init__(self, model_or_pairs, method: str | None = None, *, warmup_steps: int = 0,
                 interval: int = 1, damping: float = 0.0, strategy: str = "auto",
                 write_back: str = "copy", check_finite: bool = True):
        if method is not None and not isinstance(self, _refactoring_class(method)):
            raise ValueError(f"{type(self).__name__} is method {self.method!r}, "
                             f"not {method!r}; use Refactorer(model, method={method!r})")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        if write_back not in WRITE_BACKS:
            raise ValueError(f"unknown write_back {write_back!r}; valid: {', '.join(WRITE_BACKS)}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
                or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite float >= 0, got {damping!r}")
        super().__init__(model_or_pairs, warmup_steps=warmup_steps, interval=interval,
                         check_finite=check_finite)
        self.damping = float(damping)
        self.write_back = write_back
        self.initialized = False  # post-step methods: initial refactoring done
        self._warned = False
        self._groups: list[PairGroup] = make_groups(self.pairs, strategy)
        # F10 layers seen since the last read, per group, on the device (see check_degenerate)
        self._degenerate = [torch.zeros(len(g.pairs), dtype=torch.bool, device=g.device)
                            for g in self._groups]
        self._degenerate_read = False

    # -- F10: near-singular Grams -----------------------------------------------------------
    def _warn_once(self, group: PairGroup, bad: Tensor, what: str) -> None:
        if self._warned:
            return
        self._warned = True
        names = [group.pairs[i].name for i in bad.nonzero().flatten().tolist()]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"{self.method}: singular or near-singular LoRA Gram matrix in {shown or 'a layer'} "
            f"at or before step {self.step_count} (e.g. the lora_B = 0 start); {what} "
            "(THEORY.md F10). "
            "Consider warmup_steps or a balanced initialisation. Shown once.",
            theory.DegenerateGramWarning, stacklevel=4,
        )

    def _record_degenerate(self, group: PairGroup, singular: Tensor) -> None:
        """OR ``singular`` ``(L,)`` into the group's device-side mask (no host read)."""
        if not self._warned:
            flags = self._degenerate[self._groups.index(group)]
            torch.logical_or(flags, singular, out=flags)

    def check_degenerate(self, what: str = "damping keeps the result finite") -> bool:
        """Read the device-side degenerate-Gram mask now (one host read per group) and give
        the one-time :class:`~reflora_analysis.theory.DegenerateGramWarning` if any layer
        was flagged since the last read; returns whether the warning has been given."""
        for group, flags in zip(self._groups, self._degenerate):
            if self._warned:
                break
            if bool(flags.any()):
                self._warn_once(group, flags, what)
            flags.zero_()
        self._degenerate_read = True
        return self._warned

    def _degenerate_check_due(self, what: str) -> None:
        """Call :meth:`check_degenerate` at the first active step and every
        :data:`DEGENERATE_CHECK_EVERY` steps, until the warning has been given."""
        if not self._warned and (not self._degenerate_read
                                 or self.step_count % DEGENERATE_CHECK_EVERY == 0):
            self.check_degenerate(what)

    def _singular_tol(self, group: PairGroup) -> float:
        return singular_tol(self.damping, group.rank, group.compute_dtype)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """:meth:`PairTransform.state_dict` plus ``method``, ``damping``, ``initialized`` and
        ``warned`` (plain Python, JSON-able). Reads the degenerate-Gram mask first
        (:meth:`check_degenerate`), so that ``warned`` is up to date."""
        if not self._warned and any(f.numel() for f in self._degenerate):
            self.check_degenerate()
        state = super().state_dict()
        state.update(method=self.method, damping=self.damping, initialized=self.initialized,
                     warned=self._warned)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it was saved by another method."""
        if isinstance(state, dict) and state.get("method", self.method) != self.method:
            raise ValueError(f"state dict was saved by method {state['method']!r}, this "
                             f"Refactorer uses {self.method!r}")
        super().load_state_dict(state)
        damping = state.get("damping", self.damping)
        if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"state dict has an invalid damping {damping!r}")
        self.damping = float(damping)
        self.initialized = bool(state.get("initialized", self.initialized))
        self._warned = bool(state.get("warned", self._warned))

    def __repr__(self) -> str:
        return (f"Refactorer(method={self.method!r}, layers={len(self.pairs)}, "
                f"warmup_steps={self.warmup_steps}, interval={self.interval}, "
                f"damping={self.damping}, step_count={self.step_count})")


class WeightRefactorer(Refactorer):
    """Base of the post-step refactorings (RefLoRA-S, balance): weights change after the step.

    Subclasses implement :meth:`refactor_group`. On the first active step the weights are
    refactored once *before* the optimizer step as well (the reference code's initial call),
    together with the gradients already computed, so that step sees consistent coordinates;
    afterwards every active step refactors the weights after the optimizer step.
    """

    phase = "post"

    def refactor_group(self, group: PairGroup, optimizer: torch.optim.Optimizer | None,
                       with_grads: bool) -> None:
        """Refactor the pairs of ``group`` in place (weights, and the gradients if
        ``with_grads``; optimizer moments as the method prescribes)."""
        raise NotImplementedError

    # no_grad also when called directly: the norms of the parameters must not record a graph
    @torch.no_grad()
    def refactor_weights(self, optimizer: torch.optim.Optimizer | None = None,
                         with_grads: bool = False) -> None:
        """Refactor every pair now (what :meth:`post_step` does; ``optimizer`` may be None)."""
        for group in self._groups:
            self.refactor_group(group, optimizer, with_grads)

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        if not self.initialized:
            self.refactor_weights(optimizer, with_grads=True)
            self.initialized = True

    @torch.no_grad()
    def post_step(self, optimizer) -> None:
        self.refactor_weights(optimizer, with_grads=False)


# --------------------------------------------------------------------------------------
# optimizers with a refactoring method attached
# --------------------------------------------------------------------------------------


def build_refactored(transform_cls: type[Refactorer], tr: Trainables, optimizer: str, lr: float,
                     weight_decay: float, base_kwargs: dict, *, warmup_steps: int = 0,
                     interval: int = 1, damping: float = 0.0):
    """Base optimizer over every trainable parameter with ``transform_cls`` attached (the
    registry's builder of the three refactoring methods)."""
    groups = [{"params": tr.lora_params + tr.others}]
    opt = make_base_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                              base_kwargs=base_kwargs)
    transform = transform_cls(tr.pairs, warmup_steps=warmup_steps, interval=interval,
                              damping=damping).attach(opt)
    return opt, transform


def create_reflora_optimizer(model, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                             method: str = "reflora", warmup_steps: int = 0, interval: int = 1,
                             damping: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    r"""An ``optimizer_cls`` over every trainable parameter of ``model`` with RefLoRA attached.

    The counterpart of PEFT's ``create_loraplus_optimizer`` / ``create_riemannian_optimizer``::

        opt = create_reflora_optimizer(peft_model, torch.optim.AdamW, lr=1e-4, warmup_steps=100)

    Parameters
    ----------
    model : PEFT model (or anything :func:`~reflora_analysis.pairs.find_lora_pairs` accepts
        that is an ``nn.Module``).
    optimizer_cls : a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.AdamW``.
    lr : float, > 0.
    method : a refactoring method ("reflora" | "reflora-s" | "balance").
    warmup_steps, interval, damping : see :class:`Refactorer`.
    kwargs : passed to ``optimizer_cls`` (``weight_decay``, ``betas``, ...).

    Returns
    -------
    The optimizer; the :class:`Refactorer` is kept as ``optimizer.reflora_transform`` (its
    hooks are registered on the optimizer; ``optimizer.reflora_transform.detach()`` removes them).
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module (a PEFT model), got {type(model).__name__}")
    lr = check_lr(lr)
    tr = resolve_trainables(model, method=method)
    optimizer = optimizer_cls(tr.lora_params + tr.others, lr=lr, **kwargs)
    optimizer.reflora_transform = Refactorer(model, method=method, warmup_steps=warmup_steps,
                                             interval=interval, damping=damping).attach(optimizer)
    return optimizer
