r"""BaLoRA's SVD split after each step (Castin, Nadjahi, Ablin, Peyre, ICML 2026, arXiv 2605.31484).

After every active optimizer step each pair is replaced by the SVD split of its product
(``BASELINES.md`` section 5; reference code ``callbacks.ProjectionCallback``):

    A B^T = U S V^T  (thin SVD, r columns),      A' = U S^{1/2},   B' = V S^{1/2},

so ``A'^T A' = S = B'^T B'`` (balanced, ``THEORY.md`` F4), ``A' B'^T = A B^T`` and
``||A'||_F^2 + ||B'||_F^2 = 2 ||A B^T||_*`` (F5). Paper notation (``pairs.LoraPair``): A is
PEFT's ``lora_B.weight`` (m x r), B is ``lora_A.weight^T`` (n x r); the reference code's
``lora_A <- S^{1/2} V^T R_A`` and ``lora_B <- R_B U S^{1/2}`` are this split in PEFT storage.

Cost ``O((m + n) r^2)``: ``A = Q_A R_A``, ``B = Q_B R_B`` (QR), the r x r core
``R_A R_B^T = U_k S V_k^T`` (SVD, float64), ``U = Q_A U_k``, ``V = Q_B V_k``.

**Columns.** The split is unique only up to a signed permutation of its columns (and a
rotation within equal singular values): SVD returns descending order and arbitrary signs,
and a sign flip or an order swap between steps would leave Adam's stored moments attached
to the wrong columns. Each projection therefore takes the signed permutation ``Pi`` that
brings ``(A' Pi, B' Pi)`` closest to the factors it replaces, i.e. maximises
``tr(Pi^T (A'^T A + B'^T B))`` (an assignment problem, ``scipy.optimize.linear_sum_assignment``);
``(A' Pi, B' Pi)`` is still an SVD split of the same product. (The reference code does not align.)

**Relation to** ``balance`` (:mod:`.balance`): that method's balanced factors ``(A P, B P^{-1})``,
``P = S*^{1/2}`` symmetric, and BaLoRA's differ by an ``r x r`` rotation. Under SGD both give
RefLoRA's weight trajectory (at any balanced point ``S* = I`` and ``A A^T = (M M^T)^{1/2}``
whatever the rotation); under AdamW the elementwise moments see rotated coordinates, so the
two are different algorithms.

**Adam moments are not transformed** (as BaLoRA): a change of coordinates by a full ``r x r``
matrix cannot be carried by elementwise second moments (``THEORY.md`` section 7).

**Start.** As :class:`~.refactoring.WeightRefactorer`, the first active step is preceded by
one projection (gradients transformed with it), so that with SGD the weight trajectory equals
RefLoRA's exactly from a non-singular start. A pair whose product is numerically
rank-deficient (PEFT's ``lora_B = 0`` start: ``A = 0``) is not projected (the split would
zero the other factor, a dead adapter) and named once in a
:class:`~reflora_analysis.theory.DegenerateGramWarning`: from ``A = 0`` the first projection
happens after the first step.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..pairs import LoraPair
from ..theory import DegenerateGramWarning
from .base import Trainables, make_base_optimizer
from .transform import PairTransform

__all__ = ["BaLoRATransform", "svd_split", "build_balora", "BALORA_HPARAMS"]

#: The registry's hyper-parameters of ``balora`` (BaLoRA's ``start_step`` and ``project_every``).
BALORA_HPARAMS = {"warmup_steps": 0, "interval": 1}


def _align(U: Tensor, V: Tensor, S: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The signed column permutation of the split ``(U S^{1/2}, V S^{1/2})`` closest to
    ``(A, B)``: maximises ``sum_j |C_{pi(j) j}|`` with ``C = A'^T A + B'^T B`` (r x r)."""
    root = S.sqrt()
    C = (U * root).mT @ A + (V * root).mT @ B
    rows, cols = linear_sum_assignment(-np.abs(C.detach().cpu().numpy()))
    order = np.empty_like(rows)
    order[cols] = rows  # position j takes split column order[j]
    idx = torch.as_tensor(order, device=U.device)
    sign = torch.sign(C[idx, torch.arange(len(order), device=U.device)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U[:, idx] * sign, V[:, idx] * sign, S[idx]


def _split_core(A: Tensor, B: Tensor):
    """``(Q_A, R_A, Q_B, R_B, U_k, S, V_k)``: QR of both factors, float64 SVD of the core."""
    Q_A, R_A = torch.linalg.qr(A)
    Q_B, R_B = torch.linalg.qr(B)
    core = R_A.to(torch.float64) @ R_B.to(torch.float64).mT
    U_k, S, V_kT = torch.linalg.svd(core)
    return Q_A, R_A, Q_B, R_B, U_k, S, V_kT.mT


def _rank_deficient(S: Tensor, dtype: torch.dtype) -> bool:
    """Numerically rank-deficient product: ``sigma_r <= r eps sigma_1`` (or zero)."""
    eps = torch.finfo(dtype).eps
    return bool(S[0] == 0 or S[-1] <= S.shape[0] * eps * S[0])


def svd_split(A: Tensor, B: Tensor, *, align: bool = True) -> tuple[Tensor, Tensor]:
    r"""BaLoRA's split ``(U S^{1/2}, V S^{1/2})`` of ``A B^T = U S V^T`` (module docstring).

    Parameters
    ----------
    A : (m, r);  B : (n, r). Paper orientation, full-rank product (else ``ValueError``).
    align : choose the signed column permutation closest to ``(A, B)`` (default); ``False``
        returns SVD's own order (descending ``S``) and signs.

    Returns
    -------
    A', B' : same shapes and dtypes; ``A'^T A' = B'^T B' = diag(S)`` (up to the permutation).
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"expected A (m x r) and B (n x r) with a shared rank, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    cd = torch.promote_types(A.dtype, torch.float32)
    a, b = A.detach().to(cd), B.detach().to(cd)
    Q_A, _, Q_B, _, U_k, S, V_k = _split_core(a, b)
    if _rank_deficient(S, cd):
        raise ValueError("A B^T is numerically rank-deficient: its SVD split would zero "
                         "columns of both factors")
    U, V = Q_A.to(torch.float64) @ U_k, Q_B.to(torch.float64) @ V_k
    if align:
        U, V, S = _align(U, V, S, a.to(torch.float64), b.to(torch.float64))
    root = S.sqrt()
    return (U * root).to(A.dtype), (V * root).to(B.dtype)


class BaLoRATransform(PairTransform):
    r"""BaLoRA as a step post-hook: each pair <- the aligned SVD split of its product.

    See the module docstring for the maths, the column alignment, the untouched Adam moments
    and the start. Parameters: ``warmup_steps`` (BaLoRA's ``start_step``), ``interval``
    (``project_every``) and ``check_finite`` as :class:`~.transform.PairTransform`.
    State (:meth:`state_dict`): the schedule, ``initialized`` and ``warned``.
    Cost per projection: two thin QRs, an ``r x r`` SVD and an ``r x r`` assignment per layer.
    """

    phase = "post"

    def __init__(self, model_or_pairs, *, warmup_steps: int = 0, interval: int = 1,
                 check_finite: bool = True):
        super().__init__(model_or_pairs, warmup_steps=warmup_steps, interval=interval,
                         check_finite=check_finite)
        self.initialized = False
        self._warned = False

    def _project(self, pair: LoraPair, with_grads: bool) -> bool:
        """Project one pair in place; False (untouched) when its product is rank-deficient."""
        cd = torch.promote_types(pair.A.dtype, torch.float32)
        a, b = pair.A.to(cd), pair.B.to(cd)
        Q_A, R_A, Q_B, R_B, U_k, S, V_k = _split_core(a, b)
        if _rank_deficient(S, cd):
            return False
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        U, V, S = _align(Q_A.to(torch.float64) @ U_k, Q_B.to(torch.float64) @ V_k, S, a64, b64)
        root = S.sqrt()
        new_a, new_b = U * root, V * root
        if with_grads:
            # A' = A P_A, B' = B P_B with P_A = A^+ A', P_B = B^+ B' (R upper triangular):
            # grad_A' = G B' = grad_A P_B, grad_B' = G^T A' = grad_B P_A
            solve = torch.linalg.solve_triangular
            P_A = solve(R_A.to(torch.float64), Q_A.to(torch.float64).mT @ new_a, upper=True)
            P_B = solve(R_B.to(torch.float64), Q_B.to(torch.float64).mT @ new_b, upper=True)
            for grad, P in ((pair.grad_A, P_B), (pair.grad_B, P_A)):
                if grad is not None:
                    grad.copy_((grad.to(torch.float64) @ P).to(grad.dtype))
        pair.A.copy_(new_a.to(pair.A.dtype))
        pair.B.copy_(new_b.to(pair.B.dtype))
        return True

    @torch.no_grad()
    def project(self, with_grads: bool = False) -> None:
        """Project every pair now (what :meth:`post_step` does)."""
        skipped = [p.name for p in self.pairs if not self._project(p, with_grads)]
        if skipped and not self._warned:
            self._warned = True
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more"
                                              if len(skipped) > 5 else "")
            warnings.warn(f"balora: rank-deficient product A B^T in {shown} at step "
                          f"{self.step_count} (e.g. the lora_B = 0 start); those layers are not "
                          "projected (THEORY.md F10). Shown once.", DegenerateGramWarning,
                          stacklevel=3)

    def pre_step(self, optimizer) -> None:
        if not self.initialized:
            self.project(with_grads=True)
            self.initialized = True

    def post_step(self, optimizer) -> None:
        self.project(with_grads=False)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(initialized=self.initialized, warned=self._warned)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initialized = bool(state.get("initialized", self.initialized))
        self._warned = bool(state.get("warned", self._warned))


def build_balora(tr: Trainables, optimizer: str, lr: float, weight_decay: float,
                 base_kwargs: dict, *, warmup_steps: int = 0, interval: int = 1):
    """Base optimizer over every trainable parameter with :class:`BaLoRATransform` attached
    (the registry's builder of ``balora``; the paper's optimizer is AdamW, wd 0.01)."""
    opt = make_base_optimizer(optimizer, [{"params": tr.lora_params + tr.others}], lr=lr,
                              weight_decay=weight_decay, base_kwargs=base_kwargs)
    return opt, BaLoRATransform(tr.pairs, warmup_steps=warmup_steps,
                                interval=interval).attach(opt)
