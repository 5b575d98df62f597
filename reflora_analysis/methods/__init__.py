r"""LoRA optimizers: one base optimizer (SGD or AdamW) plus, per method, one transform class.

Methods (SGD form, paper notation; ``grad_A = s G B``, ``grad_B = s G^T A``):

- ``lora``: ``A -= eta grad_A``, ``B -= eta grad_B``. Not invariant. (:mod:`.lora`)
- ``lora+``: ``A -= ratio eta grad_A``, ``B -= eta grad_B``, ratio 16. Not invariant. (:mod:`.lora`)
- ``scaledgd``: ``A -= eta grad_A (B^T B + d)^+``, ``B -= eta grad_B (A^T A + d)^+``.
  Exact GL(r) invariance for ``d = 0``. (:mod:`.scaledgd`)
- ``lora-rite``: transformation-invariant adaptive preconditioning. Exact (wd = 0).
  (:mod:`.lora_rite`; its layers batched by :mod:`.rite_batched`)
- ``lora-pro``: equivalent gradient ``P_A G + (I - P_A) G P_B``. First-order. (:mod:`.lora_pro`)
- ``reflora``: ``grad_A S*^{-1}``, ``grad_B S*``, ``S* = (A^T A)^{-1} # (B^T B)`` before each
  step. Exact with SGD. (:mod:`.reflora`)
- ``reflora-s``: ``A /= sqrt(c)``, ``B *= sqrt(c)``, ``c = ||A||/||B||`` after each step. Scalar
  gauge. (:mod:`.reflora_s`)
- ``balance``: ``(A, B) <- (A P, B P^{-1})``, ``P = S*^{1/2}`` after each step. Exact with SGD.
  (:mod:`.balance`)

Each method module pairs a transform class (a :class:`~.transform.PairTransform`: hooks,
state, schedule) with the pure functional kernel it applies, as ``torch.optim.SGD`` pairs
with its functional ``sgd``: e.g. :class:`RefLoRATransform` and :func:`reflora_precondition`.
The last three form the refactoring family (:class:`~.refactoring.Refactorer`, sharing the
batched Gram engine of :mod:`.gram`).

The registry (:mod:`.registry`) is the single source of method names and facts:
:data:`METHODS` (``name -> MethodSpec`` with flags ``refactoring``, ``needs_pairs``, ``dora``,
``transform_cls``, ``phase``, ``any_optimizer``, ``invariance``), :func:`get_method` (the one
name lookup), :func:`available_methods`, :func:`refactoring_methods`, :data:`METHOD_INFO`.
Entry points: :func:`build_optimizer`, :func:`make_method` (the transform alone, for an
optimizer built elsewhere), :func:`single_step_update` (one SGD step of a method on one pair,
from a gradient in W) and :func:`create_reflora_optimizer` (PEFT-style sugar).

DoRA (PEFT ``use_dora=True``): the magnitude vector is an ordinary trainable parameter (base
optimizer at the base ``lr``; for ``lora+`` on PEFT models, PEFT's helper puts it, like every
1-D parameter, in the fast group); every method here acts on the LoRA factors only, and every method
except ``lora-pro`` is meaningful, since a DoRA layer's output depends on the factors only
through ``A B^T`` (``reflora-s`` and ``balance`` keep ``A B^T``, hence the DoRA output,
unchanged). ``lora-pro`` raises: its equivalent gradient is derived to match full fine-tuning
of ``W = W0 + s A B^T``, which a DoRA layer (``m * V / ||V||_c``) does not have.
"""

from __future__ import annotations

from .balance import BalanceTransform, balanced_projection
from .balora import BaLoRATransform, svd_split
from .lora_pro import LoraProTransform
from .lora_rite import LoraRiteTransform
from .refactoring import Refactorer, WeightRefactorer, create_reflora_optimizer
from .reflora import RefLoRATransform, reflora_precondition
from .reflora_s import RefLoRASTransform, reflora_s_rescale
from .registry import (METHOD_INFO, METHODS, MethodSpec, available_methods, build_optimizer,
                       dora_methods, get_method, make_method, method_task_options,
                       optimizer_methods, pairless_methods, refactoring_methods,
                       single_step_update)
from .scaledgd import ScaledGDTransform, scaled_gradients
from .transform import PairTransform

__all__ = [
    "METHODS",
    "METHOD_INFO",
    "MethodSpec",
    "available_methods",
    "build_optimizer",
    "dora_methods",
    "get_method",
    "make_method",
    "method_task_options",
    "optimizer_methods",
    "pairless_methods",
    "refactoring_methods",
    "single_step_update",
    "create_reflora_optimizer",
    "PairTransform",
    "Refactorer",
    "WeightRefactorer",
    "RefLoRATransform",
    "RefLoRASTransform",
    "BalanceTransform",
    "BaLoRATransform",
    "ScaledGDTransform",
    "LoraRiteTransform",
    "LoraProTransform",
    "reflora_precondition",
    "reflora_s_rescale",
    "balanced_projection",
    "svd_split",
    "scaled_gradients",
]
