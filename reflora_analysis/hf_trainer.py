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

from .config import ConfigError, OptimizerConfig
from .methods import METHODS, build_optimizer

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
        ``{"ratio": 16}`` for LoRA+), and the base optimizer's keywords (``momentum``,
        ``nesterov`` for SGD; ``betas``, ``eps`` for AdamW, which then replace the
        ``TrainingArguments``' ``adam_*`` values). Checked at construction by the rules of a
        run's configuration (:class:`reflora_analysis.config.OptimizerConfig`).

    Attributes
    ----------
    lora_config : OptimizerConfig
        The validated method, base optimizer, ``learning_rate`` and hyper-parameters the
        optimizer is built from (``weight_decay`` and the AdamW ``betas``/``eps`` taken from
        the ``TrainingArguments``).
    lora_transform : PairTransform | None
        The transform attached to the optimizer (``None`` before training or for methods
        without one).
    """

    def __init__(self, *args, lora_method: str = "reflora", lora_hparams: dict | None = None,
                 **kwargs):
        try:  # the method's name first: fail before the Trainer is set up
            lora_method = OptimizerConfig(lora_method).method  # normalised (stripped, lower case)
        except ConfigError as exc:
            raise ValueError(f"unknown lora_method {lora_method!r}; valid methods: "
                             f"{', '.join(exc.valid or [])}") from None
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("RefTrainer builds its own optimizer from lora_method; do not pass "
                             "optimizers=(optimizer, ...)")
        self.lora_method = lora_method
        self.lora_hparams: dict[str, Any] = dict(lora_hparams or {})
        self.lora_transform = None
        super().__init__(*args, **kwargs)
        self.lora_config = self._lora_config()  # fail at construction, not after data loading

    def _lora_config(self) -> OptimizerConfig:
        """The method part of a run's config, from ``lora_*`` and the ``TrainingArguments``."""
        optim = getattr(self.args.optim, "value", self.args.optim)
        if optim not in SUPPORTED_OPTIM:
            raise ValueError(f"RefTrainer supports optim in {', '.join(SUPPORTED_OPTIM)}, got "
                             f"{optim!r}")
        base = SUPPORTED_OPTIM[optim]
        hparams: dict[str, Any] = {"weight_decay": self.args.weight_decay}
        if base == "adamw":
            own = METHODS[self.lora_method].hparams  # a method with its own betas/eps keeps them
            hparams.update({k: v for k, v in (("betas", (self.args.adam_beta1, self.args.adam_beta2)),
                                              ("eps", self.args.adam_epsilon)) if k not in own})
        try:
            return OptimizerConfig(self.lora_method, base, self.args.learning_rate,
                                   {**hparams, **self.lora_hparams})
        except ConfigError as exc:
            if exc.option != "hparams":
                raise
            raise ValueError(f"unknown lora_hparams {exc.value} for {self.lora_method!r} with "
                             f"optim {optim!r}; valid: {', '.join(exc.valid)}") from None

    def create_optimizer(self, model=None):
        """Build the optimizer (and attach the transform) with ``build_optimizer``."""
        if self.optimizer is not None:
            return self.optimizer
        c = self.lora_config
        self.optimizer, self.lora_transform = build_optimizer(
            c.method, self.model if model is None else model, optimizer=c.optimizer, lr=c.lr,
            **c.hparams)
        return self.optimizer
