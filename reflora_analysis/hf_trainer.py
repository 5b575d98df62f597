r"""Hugging Face ``Trainer`` integration: any method of :mod:`reflora_analysis.methods`.

:class:`RefTrainer` is a ``transformers.Trainer`` whose ``create_optimizer`` builds the
optimizer with :func:`reflora_analysis.methods.build_optimizer`, so RefLoRA, RefLoRA-S,
balance, ScaledGD, LoRA-RITE, LoRA-Pro, LoRA+ and plain LoRA all train a PEFT model through
the usual ``Trainer`` loop::

    trainer = RefTrainer(model=peft_model, args=TrainingArguments(..., optim="adamw_torch"),
                         train_dataset=ds, lora_method="reflora",
                         lora_hparams={"warmup_steps": 100})
    trainer.train()

Ordering: the Trainer clips gradients (``max_grad_norm``) and then calls
``optimizer.step()``; the method's transform runs inside that call (torch step hooks), so it
sees the clipped gradients, as in the RefLoRA reference code. The learning-rate scheduler acts
on every parameter group, including LoRA+'s two groups and the internal SGD steps of
LoRA-RITE / LoRA-Pro "full" (they read their group's current ``lr``).

Mapping of ``TrainingArguments``: ``optim`` ``"adamw_torch"`` / ``"adamw_torch_fused"`` ->
``"adamw"`` (with ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` unless the method has its
own ``betas``/``eps``), ``"sgd"`` -> ``"sgd"``; ``learning_rate`` -> ``lr``; ``weight_decay``
applies to every trainable parameter (the Trainer's no-decay groups for biases and norms are
not reproduced). Other ``optim`` values raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .methods import METHODS, available_methods, build_optimizer

__all__ = ["RefTrainer", "SUPPORTED_OPTIM"]

#: ``TrainingArguments.optim`` values RefTrainer understands, and the base optimizer they mean.
SUPPORTED_OPTIM = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "sgd": "sgd"}


class RefTrainer(Trainer):
    """``transformers.Trainer`` training the LoRA factors with ``lora_method``.

    Parameters
    ----------
    *args, **kwargs : those of ``transformers.Trainer``.
    lora_method : str
        One of :func:`reflora_analysis.methods.available_methods` (default ``"reflora"``).
    lora_hparams : dict, optional
        The method's hyper-parameters (e.g. ``{"warmup_steps": 100}`` for RefLoRA,
        ``{"ratio": 16}`` for LoRA+).

    Attributes
    ----------
    lora_transform : PairTransform | None
        The transform attached to the optimizer (``None`` before training or for methods
        without one).
    """

    def __init__(self, *args, lora_method: str = "reflora", lora_hparams: dict | None = None,
                 **kwargs):
        if not isinstance(lora_method, str) or lora_method not in METHODS:
            raise ValueError(f"unknown lora_method {lora_method!r}; valid methods: "
                             f"{', '.join(available_methods())}")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("RefTrainer builds its own optimizer from lora_method; do not pass "
                             "optimizers=(optimizer, ...)")
        self.lora_method = lora_method
        self.lora_hparams: dict[str, Any] = dict(lora_hparams or {})
        self.lora_transform = None
        super().__init__(*args, **kwargs)
        base = self._base_optimizer_name()  # fail at construction, not after data loading
        unknown = [k for k in self.lora_hparams
                   if k not in METHODS[lora_method].hparams
                   and k not in ("momentum", "nesterov", "betas", "eps")]
        if unknown:
            raise ValueError(f"unknown lora_hparams {unknown} for {lora_method!r}; valid: "
                             f"{', '.join(METHODS[lora_method].hparams) or '(none)'}")
        self._base = base

    def _base_optimizer_name(self) -> str:
        optim = getattr(self.args.optim, "value", self.args.optim)
        if optim not in SUPPORTED_OPTIM:
            raise ValueError(f"RefTrainer supports optim in {', '.join(SUPPORTED_OPTIM)}, got "
                             f"{optim!r}")
        return SUPPORTED_OPTIM[optim]

    def create_optimizer(self, model=None):
        """Build the optimizer (and attach the transform) with ``build_optimizer``."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        base_kwargs: dict[str, Any] = {}
        if self._base == "adamw":
            own = METHODS[self.lora_method].hparams
            if "betas" not in own:
                base_kwargs["betas"] = (self.args.adam_beta1, self.args.adam_beta2)
            if "eps" not in own:
                base_kwargs["eps"] = self.args.adam_epsilon
        self.optimizer, self.lora_transform = build_optimizer(
            self.lora_method, opt_model, optimizer=self._base, lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay, **{**base_kwargs, **self.lora_hparams})
        return self.optimizer
