r"""RefLoRA-S: the scalar refactoring, as a post-step transform (``THEORY.md`` F7, section 7).

Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of
Large Models", NeurIPS 2025 (arXiv 2505.18877), scalar variant.

Over ``S = s I`` the minimiser of ``s ||A||_F^2 + ||B||_F^2 / s`` is ``s* = ||B||_F / ||A||_F``
(F7); RefLoRA-S moves the pair there after each step, with ``c = ||A||_F / ||B||_F`` and
``p = sqrt(c)``:

    A <- A / p,      B <- p B      (same A B^T; afterwards ||A||_F = ||B||_F).

In the new coordinates the gradients are ``p grad_A`` and ``grad_B / p``, so optimizer state
that averages gradients scales by ``p^{+-1}`` and state that averages squared gradients by
``p^{+-2}`` (:data:`MOMENT_POWERS`). Removes the scalar gauge ``A -> a A, B -> B / a`` only.

- :func:`reflora_s_rescale`: the pure kernel on one pair (weights, gradients, moments);
- :func:`reflora_s_scales`: ``1/p`` and ``p`` from the factor norms (shared with the transform);
- :class:`RefLoRASTransform`: the transform on any optimizer, vectorised over all layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .gram import PairGroup
from .refactoring import WeightRefactorer

__all__ = ["MOMENT_POWERS", "RefLoRASTransform", "Rescaled", "reflora_s_rescale",
           "reflora_s_scales"]

#: Adam-like state entries and the power of the gradient scale they carry: a coordinate
#: change that multiplies a gradient by p multiplies these entries by p ** power.
MOMENT_POWERS = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def reflora_s_scales(norm_A: Tensor, norm_B: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(1/p, p)`` with ``p = sqrt(||A||_F / ||B||_F)`` (F7), elementwise over layers.

    ``norm_A``, ``norm_B``: ``(L,)`` Frobenius norms. Layers with a zero or non-finite norm
    get ``p = 1``: no rescaling can balance a zero factor (F10), and they are left untouched.
    """
    ok = (norm_A > 0) & (norm_B > 0) & torch.isfinite(norm_A) & torch.isfinite(norm_B)
    c = torch.where(ok, norm_A / torch.where(ok, norm_B, torch.ones_like(norm_B)),
                    torch.ones_like(norm_A))
    p = c.sqrt()
    return 1.0 / p, p


#: Row of ``(factor, power)`` in the transform's ``(6, L)`` scale table
#: ``[p, 1/p, p^2, 1/p^2, 1/p, p]`` (the order of :func:`_scale_table`).
_ROW = {("A", 1): 0, ("B", 1): 1, ("A", 2): 2, ("B", 2): 3, ("A", -1): 4, ("B", -1): 5}


def _scale_table(inv_p: Tensor, p: Tensor) -> dict[tuple[str, int], Tensor]:
    """``(factor, power) -> scale``: gradients carry power 1, moments their
    :data:`MOMENT_POWERS`, and the weights themselves move by the inverse (power -1)."""
    return {("A", 1): p, ("B", 1): inv_p, ("A", 2): p ** 2, ("B", 2): inv_p ** 2,
            ("A", -1): inv_p, ("B", -1): p}


def _moment_powers(state: dict | None, like: Tensor):
    """``(key, tensor, power)`` of the moments in ``state`` that live in ``like``'s coordinates."""
    for key, power in MOMENT_POWERS.items():
        t = (state or {}).get(key)
        if isinstance(t, Tensor) and t.is_floating_point() and t.shape == like.shape:
            yield key, t, power


class Rescaled(NamedTuple):
    """Result of :func:`reflora_s_rescale` (``None`` where no input was given)."""

    A: Tensor
    B: Tensor
    grad_A: Tensor | None
    grad_B: Tensor | None
    state_A: dict | None
    state_B: dict | None


def reflora_s_rescale(A: Tensor, B: Tensor, grad_A: Tensor | None = None,
                      grad_B: Tensor | None = None, *, state_A: dict | None = None,
                      state_B: dict | None = None) -> Rescaled:
    r"""RefLoRA-S on one pair: ``(A / p, p B)`` and the gradients and moments that go with it.

    With ``p = sqrt(||A||_F / ||B||_F)`` (F7; ``p = 1`` when a factor is zero):

        A' = A / p,  B' = p B,  grad_A' = p grad_A,  grad_B' = grad_B / p,
        m' = p^{+-k} m  for every moment of :data:`MOMENT_POWERS` (k = 1: ``exp_avg``,
        ``momentum_buffer``; k = 2: ``exp_avg_sq``, ``max_exp_avg_sq``; + for A, - for B).

    ``A' B'^T = A B^T`` and ``||A'||_F = ||B'||_F``. Pure: nothing is modified in place.

    Parameters
    ----------
    A, grad_A : (m, r);   B, grad_B : (n, r) (or any orientation: only norms and scalars).
    state_A, state_B : optimizer state dicts of the two factors (``optimizer.state[p]``);
        entries other than the moments above are copied unchanged.

    Returns
    -------
    :class:`Rescaled` ``(A, B, grad_A, grad_B, state_A, state_B)``.
    """
    inv_p, p = reflora_s_scales(torch.linalg.vector_norm(A).to(torch.float64).reshape(1),
                                torch.linalg.vector_norm(B).to(torch.float64).reshape(1))
    scale = _scale_table(inv_p[0], p[0])

    def moved(t: Tensor | None, side: str, power: int) -> Tensor | None:
        return None if t is None else t * scale[(side, power)].to(t.dtype)

    def moved_state(state: dict | None, side: str, like: Tensor) -> dict | None:
        if state is None:
            return None
        out = dict(state)
        for key, t, power in _moment_powers(state, like):
            out[key] = moved(t, side, power)
        return out

    return Rescaled(moved(A, "A", -1), moved(B, "B", -1), moved(grad_A, "A", 1),
                    moved(grad_B, "B", 1), moved_state(state_A, "A", A),
                    moved_state(state_B, "B", B))


class RefLoRASTransform(WeightRefactorer):
    r"""RefLoRA-S as a step post-hook: ``A <- A / p``, ``B <- p B``, ``p = sqrt(||A||_F / ||B||_F)``.

    After every active step (F7; :func:`reflora_s_rescale` is the same maths on tensors)
    the pair is rescaled to equal norms, ``A B^T`` unchanged. The loss in the new
    coordinates is ``f(A', B') = l((p A')(B'/p)^T)``, so its gradients are ``p grad_A`` and
    ``grad_B / p``. Optimizer moments that average gradients therefore become
    ``m_A <- p m_A``, ``m_B <- m_B / p`` (``exp_avg``, ``momentum_buffer``) and those
    averaging squared gradients ``v_A <- c v_A``, ``v_B <- v_B / c`` (``exp_avg_sq``,
    ``max_exp_avg_sq``); other state is left alone. Layers with ``A = 0`` or ``B = 0`` are
    skipped. One extra rescale happens before the first active step (the reference code's
    initial call; :class:`~.refactoring.WeightRefactorer`); it also rescales the gradients
    already computed, so that step sees consistent coordinates.

    Parameters: see :class:`~.refactoring.Refactorer` (``method`` is ``"reflora-s"``;
    ``damping`` and ``write_back`` play no role here).

    Notes
    -----
    Weights, gradients and moments are rescaled with ``torch._foreach_mul_`` and per-layer
    0-d scales: no host read, no per-tensor Python arithmetic; ``O((m + n) r)`` per step.
    """

    method = "reflora-s"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plans: dict[int, _RescalePlan] = {}  # id(group) -> its cached rescale plan

    def refactor_group(self, group: PairGroup, optimizer, with_grads: bool) -> None:
        # one (6, L) table of per-layer scales; each dtype's tensors are rescaled by one
        # _foreach_mul_ with 0-d scales gathered from it: no host read, and (through the
        # cached plan) no Python loop over layers on the steady-state path
        inv_p, p = reflora_s_scales(*group.factor_norms())
        table = torch.stack([p, inv_p, p * p, inv_p * inv_p, inv_p, p]).flatten()
        state = optimizer.state if optimizer is not None else {}
        plan = None if with_grads else self._plans.get(id(group))
        if plan is None or not plan.matches(state):
            plan = _RescalePlan(group, state, with_grads)
            if not with_grads:
                self._plans[id(group)] = plan
        for dtype, (tensors, index) in plan.buckets.items():
            torch._foreach_mul_(tensors, table.to(dtype).index_select(0, index).unbind(0))


class _RescalePlan:
    """Which tensors of a group RefLoRA-S rescales, by dtype, and the row of the scale
    table each one takes (``_ROW[(side, power)] * L + layer``).

    Built once and reused while :meth:`matches` holds: the optimizer's moments are created
    once and then updated in place, so walking the layers and their state every step (a
    Python loop over hundreds of tensors) would only rebuild the same lists. ``matches``
    re-checks that every cached moment is still the tensor the optimizer holds (a reloaded
    or rebuilt state, or a moment created since, forces a new plan), so a stale plan can
    never rescale a tensor the optimizer no longer uses.
    """

    def __init__(self, group: PairGroup, state, with_grads: bool):
        L = len(group.pairs)
        rows: dict[torch.dtype, tuple[list, list]] = {}
        self.moments: list[tuple] = []  # (param, key, tensor) that matches() re-checks

        def add(t: Tensor, side: str, power: int, i: int) -> None:
            tensors, index = rows.setdefault(t.dtype, ([], []))
            tensors.append(t)
            index.append(_ROW[(side, power)] * L + i)

        for i, pair in enumerate(group.pairs):
            for side, param in (("A", pair.a), ("B", pair.b)):
                add(param, side, -1, i)  # in place on the leaf: the hook runs under no_grad
                if with_grads and param.grad is not None:
                    add(param.grad, side, 1, i)
                for key, t, power in _moment_powers(state.get(param), param):
                    add(t, side, power, i)
                    self.moments.append((param, key, t))
        device = group.device
        self.buckets = {dtype: (tensors, torch.tensor(index, dtype=torch.long, device=device))
                        for dtype, (tensors, index) in rows.items()}
        self.params = [param for pair in group.pairs for param in (pair.a, pair.b)]
        self.state, self.with_state = state, sum(p in state for p in self.params)

    def matches(self, state) -> bool:
        """Same state object, the same parameters with state, and every moment unchanged."""
        if state is not self.state or sum(p in state for p in self.params) != self.with_state:
            return False
        return all(state.get(param, {}).get(key) is t for param, key, t in self.moments)
