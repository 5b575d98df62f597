r"""ScaledGD / Riemannian-preconditioned LoRA (``BASELINES.md`` section 2).

Tong, Ma, Chi, "Accelerating ill-conditioned low-rank matrix estimation via scaled gradient
descent", JMLR 2021 (arXiv 2005.08898); Zhang, Pilanci, "Riemannian preconditioned LoRA for
fine-tuning foundation models", ICML 2024 (arXiv 2402.02347).

Paper notation (A m x r, B n x r, ``grad_A = s G B``, ``grad_B = s G^T A``):

    A <- A - eta grad_A (B^T B + d I)^{-1},     B <- B - eta grad_B (A^T A + d I)^{-1}.

In PEFT terms ``g_lora_A <- (lora_B^T lora_B + d I)^{-1} g_lora_A`` and
``g_lora_B <- g_lora_B (lora_A lora_A^T + d I)^{-1}``: the same rule. Both preconditioners are
computed from the factors *before* the step (simultaneous update). With AdamW the
preconditioned gradients are fed to unmodified AdamW ("scaled AdamW" of the authors).

Invariance: with SGD and ``d = 0`` the weight update is identical for every factorization
``(A P, B P^{-T})``, ``P in GL(r)`` (exact, all orders in eta). ``d > 0`` and AdamW break it.

Damping: ``d`` is absolute, as in PEFT's ``reg``; default :data:`DEFAULT_DAMPING` ``= 1e-6``
(the authors' GPT-2 setting; PEFT defaults to 1e-2, the Mistral scripts use 1e-7..100). The
inverse is a pseudo-inverse (as PEFT's ``pinv``), so a zero factor (PEFT's ``lora_B = 0``
start) gives a finite step, and ``d = 0`` is allowed. Cost: O((m + n) r^2 + r^3) per layer, no
state.

On PEFT models :func:`reflora_analysis.methods.build_optimizer` uses
``peft.optimizers.create_riemannian_optimizer`` itself; :class:`ScaledGDTransform` is the
formula-level version for plain-torch pairs (``tests/test_methods.py`` checks both agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (BASE_OPTIMIZERS, check_number, gram_pinv, is_peft_model,
                   make_base_optimizer)
from .transform import PairTransform

__all__ = ["DEFAULT_DAMPING", "scaled_gradients", "ScaledGDTransform"]

#: Default absolute damping ``d`` of the r x r Grams.
DEFAULT_DAMPING = 1e-6


def scaled_gradients(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor,
                     damping: float = DEFAULT_DAMPING) -> tuple[Tensor, Tensor]:
    r"""``(grad_A (B^T B + d I)^+, grad_B (A^T A + d I)^+)``.

    Shapes: A, grad_A (m x r); B, grad_B (n x r). Computed in at least float32 and returned
    in the gradients' dtype.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)
    A, B = A.to(dtype), B.to(dtype)
    new_A = grad_A.to(dtype) @ gram_pinv(B.mT @ B, damping)
    new_B = grad_B.to(dtype) @ gram_pinv(A.mT @ A, damping)
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)


class ScaledGDTransform(PairTransform):
    """Step pre-hook: replace each pair's gradients by :func:`scaled_gradients`.

    Parameters
    ----------
    model_or_pairs : PEFT model or list of (A, B) / LoraPair.
    damping : float
        Absolute damping ``d >= 0`` (``d = 0``: exact GL(r) invariance with SGD).
    """

    phase = "pre"

    def __init__(self, model_or_pairs, *, damping: float = DEFAULT_DAMPING):
        damping = check_number("scaledgd damping", damping)
        super().__init__(model_or_pairs)
        self.damping = damping

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        for pair in self.pairs:
            gA, gB = pair.grad_A, pair.grad_B
            if gA is None or gB is None:
                continue
            new_A, new_B = scaled_gradients(pair.A, pair.B, gA, gB, self.damping)
            gA.copy_(new_A)
            gB.copy_(new_B)


def build_scaledgd(tr, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict, *,
                   damping: float = DEFAULT_DAMPING):
    """PEFT's ``create_riemannian_optimizer`` on PEFT models, :class:`ScaledGDTransform` otherwise.

    Note that PEFT's helper preconditions Linear LoRA layers only (embedding LoRA is left
    plain), while :class:`ScaledGDTransform` covers every pair of ``find_lora_pairs``.
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"scaledgd damping must be a number >= 0, got {damping!r}")
    if tr.model is not None and tr.from_model and is_peft_model(tr.model):
        # peft is an optional extra (and slow to import): only PEFT models load it
        from peft.optimizers import create_riemannian_optimizer

        opt = create_riemannian_optimizer(tr.model, BASE_OPTIMIZERS[optimizer], lr=lr,
                                          reg=float(damping), weight_decay=weight_decay,
                                          **base_kwargs)
        return opt, None
    opt = make_base_optimizer(optimizer, [{"params": tr.lora_params + tr.others}], lr=lr,
                              weight_decay=weight_decay, base_kwargs=base_kwargs)
    return opt, ScaledGDTransform(tr.pairs, damping=damping).attach(opt)
