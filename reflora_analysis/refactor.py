r"""RefLoRA as optimizer hooks: the documented entry points of the refactoring methods.

This module keeps the names the README documents; the code lives in
:mod:`reflora_analysis.methods`, one transform class per method beside its pure kernel:

========== ========================================================= ====================
method     class (kernel)                                             module
========== ========================================================= ====================
reflora    ``RefLoRATransform`` (``reflora_precondition``), pre-step  ``methods.reflora``
reflora-s  ``RefLoRASTransform`` (``reflora_s_rescale``), post-step   ``methods.reflora_s``
balance    ``BalanceTransform`` (``balanced_projection``), post-step  ``methods.balance``
========== ========================================================= ====================

- :class:`Refactorer`: their common base; ``Refactorer(model, method="reflora",
  warmup_steps=0, interval=1, damping=0.0)`` builds the method's class
  (:mod:`reflora_analysis.methods.refactoring`);
- :class:`PairTransform`, :data:`STATE_DICT_KEY`, :func:`is_active_step`,
  :func:`check_finite_grads`, :class:`NonFiniteGradientError`: the optimizer integration of
  every method (:mod:`reflora_analysis.methods.transform`);
- :func:`reference_preconditioners`, :func:`reference_pre_step`: the reference code's
  per-layer algorithm, the baseline of tests and benchmarks
  (:mod:`reflora_analysis.methods.reflora`).

Example::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    refactorer = Refactorer(model, method="reflora", warmup_steps=100).attach(opt)
    loss.backward(); opt.step()        # gradients preconditioned inside opt.step()
"""

from __future__ import annotations

from .methods.refactoring import Refactorer
from .methods.reflora import reference_pre_step, reference_preconditioners
from .methods.registry import refactoring_methods
from .methods.transform import (STATE_DICT_KEY, NonFiniteGradientError, PairTransform,
                                check_finite_grads, is_active_step)

__all__ = [
    "STATE_DICT_KEY",
    "VALID_METHODS",
    "NonFiniteGradientError",
    "PairTransform",
    "Refactorer",
    "check_finite_grads",
    "is_active_step",
    "reference_preconditioners",
    "reference_pre_step",
]

#: The refactoring methods, read from the registry (``methods.refactoring_methods()``);
#: kept for code written against earlier versions.
VALID_METHODS = tuple(refactoring_methods())
