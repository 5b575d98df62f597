r"""Plain LoRA and LoRA+ (``BASELINES.md`` section 1).

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(arXiv 2106.09685). The base optimizer trains ``A`` and ``B`` directly:
``A <- A - eta grad_A``, ``B <- B - eta grad_B`` with SGD (AdamW likewise per entry).

LoRA+: Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024
(arXiv 2402.12354). Two learning rates, the larger one on the zero-initialised factor, PEFT's
``lora_B`` = paper ``A``:

    A <- A - ratio * eta grad_A,      B <- B - eta grad_B          (SGD; AdamW: two groups)

``ratio`` (PEFT's ``loraplus_lr_ratio``) defaults to :data:`DEFAULT_RATIO` ``= 16`` (PEFT docs'
example; the original README uses 20, its GLUE scripts 10..80). Neither method is invariant
to refactoring ``(A P, B P^{-T})``, not even to scalar ``P``.

On PEFT models LoRA+ is ``peft.optimizers.create_loraplus_optimizer`` itself (which also puts
every 1-D trainable parameter, e.g. biases and DoRA magnitudes, in the fast group and LoRA on
embeddings at lr 1e-6); on plain-torch pairs :func:`loraplus_param_groups` is our version
(fast group: paper A only; other parameters at ``lr``). ``tests/test_methods.py`` checks that
both give the same update on LoRA factors.

Neither method needs the (A, B) pair mapping, so on PEFT models with Conv LoRA layers (which
:func:`~reflora_analysis.pairs.find_lora_pairs` cannot map) they train every ``requires_grad``
parameter as is (LoRA+ through PEFT's helper, which groups by the ``lora_B`` name).
"""

from __future__ import annotations

from .base import BASE_OPTIMIZERS, Trainables, is_peft_model, make_base_optimizer

__all__ = ["DEFAULT_RATIO", "build_lora", "build_loraplus", "loraplus_param_groups"]

#: Default ``lr(paper A = PEFT lora_B) / lr(paper B = PEFT lora_A)`` of LoRA+.
DEFAULT_RATIO = 16.0


def build_lora(tr: Trainables, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict):
    """The base optimizer over every trainable parameter; no transform."""
    groups = [{"params": tr.lora_params + tr.others}]
    return make_base_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                               base_kwargs=base_kwargs), None


def loraplus_param_groups(tr: Trainables, lr: float, ratio: float) -> list[dict]:
    """Our LoRA+ groups: paper A (PEFT ``lora_B``) at ``ratio * lr``, everything else at ``lr``."""
    return [
        {"params": [pair.a for pair in tr.pairs], "lr": ratio * lr},
        {"params": [pair.b for pair in tr.pairs] + tr.others, "lr": lr},
    ]


def build_loraplus(tr: Trainables, optimizer: str, lr: float, weight_decay: float,
                   base_kwargs: dict, *, ratio: float = DEFAULT_RATIO):
    """LoRA+: PEFT's ``create_loraplus_optimizer`` on PEFT models, our groups otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"LoRA+ ratio must be a positive number (the paper uses >= 1), got {ratio!r}")
    if tr.model is not None and is_peft_model(tr.model) and tr.from_model:
        # peft is an optional extra (and slow to import): only PEFT models load it
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(tr.model, BASE_OPTIMIZERS[optimizer], lr=lr,
                                        loraplus_lr_ratio=float(ratio),
                                        loraplus_weight_decay=weight_decay, **base_kwargs)
        # PEFT keeps empty groups (e.g. no embedding LoRA); harmless for torch optimizers
        return opt, None
    groups = loraplus_param_groups(tr, lr, float(ratio))
    return make_base_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                               base_kwargs=base_kwargs), None
