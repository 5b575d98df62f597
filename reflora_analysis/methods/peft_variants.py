r"""The baselines that change the model rather than the optimizer: ``dora`` and ``full``.

Both train with the base optimizer alone (SGD or AdamW, no transform). What makes them
baselines is the model they train, which the task builds from an option the method sets
(``MethodSpec.task_options``, applied by :func:`~.registry.method_task_options`):

- ``dora`` (Liu et al., ICML 2024, arXiv 2402.09353): PEFT ``LoraConfig(use_dora=True)``.
  Each adapted layer computes ``W' = m (W0 + s A B^T) / ||W0 + s A B^T||_c`` (column norms,
  ``m`` a trainable magnitude vector ``lora_magnitude_vector``, initialised to
  ``||W0||_c``); the base optimizer trains A, B, ``m`` and any head, as ``lora`` does.
- ``full``: full fine-tuning, the reference row of the LoRA papers' tables. The task is
  built with ``full_finetune=True``: **no LoRA layers are attached** (a frozen zero adapter
  would add cost and a pair list that probes would mistake for trained factors) and every
  parameter of the model requires grad; the base optimizer trains all of them.

Each builder checks that the model it is given is the one its name promises, so a task
built without the method's option fails with one clear line instead of silently training
plain LoRA under another name.
"""

from __future__ import annotations

from torch import nn

from .base import Trainables, is_peft_model, make_base_optimizer, uses_dora
from .lora import build_lora

__all__ = ["build_dora", "build_full", "model_trainables"]


def build_dora(tr: Trainables, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict):
    """LoRA's optimizer (:func:`~.lora.build_lora`) on a model with DoRA layers.

    A module without DoRA layers is refused (``ValueError``). Explicit (A, B) pairs without
    a module (``single_step_update``, the consistency probe) get LoRA's factor step, which is
    DoRA's: the magnitude vector is not a factor.
    """
    if tr.model is not None and not uses_dora(tr.model):
        raise ValueError("method 'dora' trains PEFT DoRA layers, but the model has none; build "
                         "the task with use_dora=True (train, sweep and the study do this for "
                         "method 'dora')")
    return build_lora(tr, optimizer, lr, weight_decay, base_kwargs)


def model_trainables(model, method: str = "full") -> Trainables:
    """Every parameter of ``model`` as ``Trainables.others`` (no pairs), for full fine-tuning.

    Raises ``ValueError`` (one line) for (A, B) pairs instead of a module, a model with PEFT
    LoRA layers, or a model with a frozen parameter: each means the task was not built with
    ``full_finetune=True``, so "full fine-tuning" would be a false name for the run.
    """
    hint = "build the task with full_finetune=True (train, sweep and the experiments do this for method 'full')"
    if not isinstance(model, nn.Module):
        raise ValueError(f"method {method!r} fine-tunes a model's own weights: pass the nn.Module, "
                         "not (A, B) pairs")
    if is_peft_model(model):
        raise ValueError(f"method {method!r} fine-tunes the model's own weights, but the model has "
                         f"PEFT LoRA layers; {hint}")
    params = list(model.parameters())  # tied weights appear once
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"method {method!r} trains every weight, but {len(frozen)} parameter "
                         f"tensor(s) of the model are frozen (first: {frozen[0]}); {hint}")
    return Trainables(pairs=[], others=params, model=model, from_model=True)


def build_full(tr: Trainables, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict):
    """The base optimizer over every parameter of the model (``tr`` from
    :func:`model_trainables`); no transform."""
    return make_base_optimizer(optimizer, [{"params": tr.others}], lr=lr,
                               weight_decay=weight_decay, base_kwargs=base_kwargs), None
