r"""RefLoRA, RefLoRA-S and balanced projection, through :class:`reflora_analysis.refactor.Refactorer`.

RefLoRA: Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient
Fine-Tuning of Large Models", NeurIPS 2025 (arXiv 2505.18877); ``THEORY.md`` F1-F7.
Balanced projection: cf. BaLoRA, Castin, Nadjahi, Ablin, Peyre, ICML 2026 (arXiv 2605.31484).

- ``reflora``: ``grad_A <- grad_A S*^{-1}``, ``grad_B <- grad_B S*``,
  ``S* = (A^T A)^{-1} # (B^T B)`` (pre-step). Exact GL(r) invariance with SGD (F6).
- ``reflora-s``: after each step ``A <- A / sqrt(c)``, ``B <- sqrt(c) B``, ``c = ||A||_F/||B||_F``,
  moments rescaled (F7). Removes the scalar gauge only.
- ``balance``: after each step ``(A, B) <- (A P, B P^{-1})``, ``P = S*^{1/2}`` (balanced, same
  ``A B^T``; F4). With SGD its W trajectory equals ``reflora``'s; Adam moments untouched.

This module only wires the base optimizer to the Refactorer; all the maths lives in
:mod:`reflora_analysis.refactor` and :mod:`reflora_analysis.theory`.
"""

from __future__ import annotations

import torch

from ..refactor import Refactorer
from .base import Trainables, check_lr, make_base_optimizer, resolve_trainables

__all__ = ["build_refactored", "create_reflora_optimizer"]


def build_refactored(tr: Trainables, optimizer: str, lr: float, weight_decay: float,
                     base_kwargs: dict, *, method: str, warmup_steps: int = 0, interval: int = 1,
                     damping: float = 0.0):
    """Base optimizer over every trainable parameter with a :class:`Refactorer` attached."""
    groups = [{"params": tr.lora_params + tr.others}]
    opt = make_base_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                              base_kwargs=base_kwargs)
    transform = Refactorer(tr.pairs, method=method, warmup_steps=warmup_steps,
                           interval=interval, damping=damping).attach(opt)
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
    method : "reflora" | "reflora-s" | "balance".
    warmup_steps, interval, damping : see :class:`~reflora_analysis.refactor.Refactorer`.
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
