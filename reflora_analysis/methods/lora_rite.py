r"""LoRA-RITE: transformation-invariant adaptive preconditioning (``BASELINES.md`` section 3).

Yen, Si, Liu, Wang, Hsieh, Lee, Kumar, Jain, Krishnan, Chang, "LoRA Done RITE: Robust
Invariant Transformation Equilibration for LoRA Optimization", ICLR 2025 (arXiv 2410.20625).
Written from the formula sheet (read from gkevinyen5418/LoRA-RITE@c9bb451), not from the code.

For each layer and each factor (shown for A; B is symmetric with A <-> B, m <-> n), step
counter k = 0, 1, ..., bias-corrected decay ``bh(beta) = beta (1 - beta^k) / (1 - beta^(k+1))``:

1. thin QR ``A = U_A R_A``, ``B = U_B R_B``; ``R^+`` the pseudo-inverse;
2. unmagnified gradient ``Gbar_A = grad_A R_B^+`` (``= s G U_B``);
3. guards: ``Gbar_A <- 0`` if ``RMS(Gbar_A) > skip``; global clip ``c = sqrt(sum ||Gbar||_F^2)``
   over all layers and both factors, every ``Gbar /= c / clip`` when ``c > clip``;
4. basis transport ``P_A = U_B^T U_B_old`` (``U_old = 0`` at k = 0);
5. ``V_A = sym(bh(beta2) P_A V_A P_A^T + (1 - bh(beta2)) Gbar_A^T Gbar_A / m)`` (r x r);
6. escaped mass (off by default) ``rho_A = bh(beta2) (rho_A + d)``, ``d = min([max_i(lambda_i(V)
   - lambda_i(P V P^T))]_+, [tr V - tr P V P^T]_+)``;
7. ``Sbar_A = Gbar_A E diag(1 / (sqrt(lambda + rho_A) + eps)) E^T``, ``(lambda, E) = eigh(V_A)``;
8. ``M_A = bh(beta1) M_A P_A^T + (1 - bh(beta1)) Sbar_A``;
9. capping (off by default) ``M_A /= max(1, RMS(M_A) / cap)``;
10. ``A <- A - eta (M_A (R_B^+)^T + wd A)``.

Defaults: betas (0.9, 0.999), eps 1e-6, clip 1.0, skip 1.0, cap 0 (off), escaped mass off.
With ``V = I`` and ``beta1 = 0`` (and no guards) the step is exactly ScaledGD with ``d = 0``.

Invariance: exact GL(r) (with wd = 0) over whole trajectories: every quantity above is either
invariant or rotates with the QR bases. State per layer ~ ``2 (m + n) r + 2 r^2 + 2`` numbers
(``U_old`` and ``M`` of both factors, ``V`` and ``rho``); compute O((m + n) r^2 + r^3).

Outer step and base optimizer: LoRA-RITE is an adaptive optimizer in its own right (the paper's
replacement for Adam), so its direction must reach the weights through a plain SGD step.
``build_optimizer("lora-rite", ..., optimizer="sgd")`` writes the direction into ``.grad`` and
torch SGD (no momentum; weight decay ``wd``) steps; with ``optimizer="adamw"`` the transform
takes that same SGD step itself (``outer_step="internal"``) and clears the LoRA gradients so that
AdamW only trains the non-LoRA parameters. Both give identical LoRA updates.

Differences from the reference code: pseudo-inverses instead of the code's damped inverses
(identical for full-rank factors); computation in at least float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..theory import symmetrize
from .base import (LayerStateTransform, check_betas, check_number, internal_sgd_step,
                   make_base_optimizer)

__all__ = ["LoraRiteTransform", "rite_precondition", "bias_corrected_decay", "attach_lora_rite"]


def bias_corrected_decay(beta: float, k: int) -> float:
    r"""``beta (1 - beta^k) / (1 - beta^(k+1))``: 0 at k = 0 (the first step keeps no memory)."""
    if beta == 0.0:
        return 0.0
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1))


def rite_precondition(Gbar: Tensor, V: Tensor, rho: float | Tensor, eps: float) -> Tensor:
    r"""``Sbar = Gbar E diag(1 / (sqrt(lambda + rho) + eps)) E^T`` with ``(lambda, E) = eigh(V)``.

    ``Gbar`` (m x r), ``V`` (r x r) symmetric PSD, ``rho`` a float or 0-dim tensor. NaNs (from a
    degenerate ``V``) become 0.
    """
    evals, evecs = torch.linalg.eigh(V)
    scale = 1.0 / ((evals.clamp_min(0.0) + rho).sqrt() + eps)
    out = (Gbar @ evecs) * scale @ evecs.mT
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _rms(X: Tensor) -> Tensor:
    return X.square().mean().sqrt()


class LoraRiteTransform(LayerStateTransform):
    """LoRA-RITE as a step pre-hook (see the module docstring for the algorithm).

    Parameters
    ----------
    model_or_pairs : PEFT model or list of (A, B) / LoraPair.
    betas : (beta1, beta2), default (0.9, 0.999).
    eps : float, default 1e-6.
    clip : float or None
        Global clip threshold of the unmagnified gradients (default 1.0; None: off).
    skip : float or None
        Per-factor RMS threshold above which the step of that factor is skipped (default 1.0,
        the reference value, tuned for LLM-scale gradients: generic unit-scale points trip it,
        so invariance checks pass None; on the command line ``--hparam skip=none``).
    cap : float
        Update capping threshold on RMS(M) (default 0: off).
    escaped_mass : bool
        Track the escaped mass rho (default False, as the reference code).
    weight_decay : float
        Used only with ``outer_step="internal"`` (with ``"grad"`` the SGD group applies it).
    outer_step : "grad" | "internal"
        ``"grad"``: write the direction into ``.grad`` for a plain-SGD base optimizer;
        ``"internal"``: step the LoRA factors here and clear their ``.grad`` (any base optimizer).

    Bad hyper-parameters raise a one-line ``TypeError`` (not a number / not a pair) or
    ``ValueError`` (out of range) naming the parameter.

    The guards are evaluated on the device: the only host synchronisation is one boolean per
    step ("was any factor skipped?") until the skip warning has been shown, none afterwards.
    """

    state_key, step_attr, layers_attr, label = "lora_rite", "rite_step", "rite_state", "LoRA-RITE"
    phase = "pre"

    def __init__(self, model_or_pairs, *, betas=(0.9, 0.999), eps: float = 1e-6,
                 clip: float | None = 1.0, skip: float | None = 1.0, cap: float = 0.0,
                 escaped_mass: bool = False, weight_decay: float = 0.0, outer_step: str = "grad"):
        betas = check_betas(betas, "lora-rite betas")
        eps = check_number("lora-rite eps", eps)
        clip = check_number("lora-rite clip", clip, strict=True, allow_none=True, finite=False)
        skip = check_number("lora-rite skip", skip, strict=True, allow_none=True, finite=False)
        cap = check_number("lora-rite cap (0: off)", cap)
        weight_decay = check_number("lora-rite weight_decay", weight_decay)
        if not isinstance(escaped_mass, bool):
            raise TypeError(f"lora-rite escaped_mass must be True or False, got {escaped_mass!r}")
        if outer_step not in ("grad", "internal"):
            raise ValueError(f"outer_step must be 'grad' or 'internal', got {outer_step!r}")
        super().__init__(model_or_pairs)
        self.betas = betas
        self.eps, self.clip, self.skip, self.cap = eps, clip, skip, cap
        self.escaped_mass = escaped_mass
        self.weight_decay = weight_decay
        self.outer_step = outer_step
        self.rite_step = 0
        self._skipped_total: Tensor | int = 0  # on the device; read through .skipped
        self._skip_warned = False
        self.rite_state: list[dict | None] = [None] * len(self.pairs)

    @property
    def skipped(self) -> int:
        """Factor updates dropped by the skip guard so far (reading it synchronises)."""
        return int(self._skipped_total)

    # -- pieces kept separate so tests can check them (e.g. V = I reduces to ScaledGD) --
    def _second_moment(self, V_old: Tensor, P: Tensor, Gbar: Tensor, beta2_hat: float) -> Tensor:
        """Step 5: the transported, bias-corrected r x r second moment."""
        return symmetrize(beta2_hat * P @ V_old @ P.mT
                          + (1.0 - beta2_hat) * Gbar.mT @ Gbar / Gbar.shape[0])

    @staticmethod
    def _escaped(V_old: Tensor, P: Tensor) -> Tensor:
        """Step 6: the mass of V_old lost by the basis change (0-dim, on the device)."""
        moved = symmetrize(P @ V_old @ P.mT)
        by_eig = (torch.linalg.eigvalsh(symmetrize(V_old)) - torch.linalg.eigvalsh(moved)).max()
        by_trace = torch.trace(V_old) - torch.trace(moved)
        return torch.minimum(by_eig.clamp_min(0.0), by_trace.clamp_min(0.0))

    def _skip_guard(self, Gbar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step 3: ``(Gbar or 0 when RMS(Gbar) > skip, the 0-dim skipped flag, the RMS)``.

        Decided on the device (``torch.where``); a NaN RMS counts as skipped, as before.
        """
        rms = _rms(Gbar)
        skipped = ~(rms <= self.skip)
        return torch.where(skipped, torch.zeros_like(Gbar), Gbar), skipped, rms

    def _record_skips(self, checks: list[tuple[str, str, Tensor, Tensor]]) -> None:
        """Count this step's skipped factors; warn (once) naming the first one.

        ``checks``: ``(layer, factor, skipped flag, rms)``. The count stays on the device; the
        one ``bool`` below is the only synchronisation, and only until the warning is shown.
        """
        device = checks[0][2].device
        count = torch.stack([flag.to(device) for _, _, flag, _ in checks]).sum()
        self._skipped_total = self._skipped_total + count
        if self._skip_warned or not bool(count):
            return
        self._skip_warned = True
        layer, factor, _, rms = next(c for c in checks if bool(c[2]))
        warnings.warn(f"lora-rite: update of factor {factor} in layer '{layer}' skipped at step "
                      f"{self.rite_step}: RMS of its unmagnified gradient {float(rms):.3g} > skip="
                      f"{self.skip} (the reference code's guard, tuned for LLM-scale "
                      "gradients); pass skip=None to disable it (command line: --hparam "
                      "skip=none). Shown once.", stacklevel=4)

    def _clip_scale(self, work: list) -> Tensor:
        """Step 3: ``min(1, clip / c)``, ``c = sqrt(sum ||Gbar||_F^2)`` over every layer (float64, on the device)."""
        device = work[0][6].device
        total = sum((w[6].square().sum() + w[7].square().sum()).to(device, torch.float64)
                    for w in work).sqrt()
        return torch.where(total > self.clip, self.clip / total, torch.ones_like(total))

    def _fresh_state(self, m: int, n: int, r: int, dtype, device) -> dict:
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return {"U_A": z(m, r), "U_B": z(n, r), "V_A": z(r, r), "V_B": z(r, r),
                "M_A": z(m, r), "M_B": z(n, r), "rho_A": 0.0, "rho_B": 0.0}

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        beta1, beta2 = self.betas
        b1h = bias_corrected_decay(beta1, self.rite_step)
        b2h = bias_corrected_decay(beta2, self.rite_step)
        work, skip_checks = [], []
        for i, pair in enumerate(self.pairs):
            if pair.grad_A is None or pair.grad_B is None:
                continue
            dtype = torch.promote_types(pair.A.dtype, torch.float32)
            A, B = pair.A.to(dtype), pair.B.to(dtype)
            U_A, R_A = torch.linalg.qr(A)
            U_B, R_B = torch.linalg.qr(B)
            R_A_pinv, R_B_pinv = torch.linalg.pinv(R_A), torch.linalg.pinv(R_B)
            Gbar_A = pair.grad_A.to(dtype) @ R_B_pinv
            Gbar_B = pair.grad_B.to(dtype) @ R_A_pinv
            if self.skip is not None:
                Gbar_A, skipped_A, rms_A = self._skip_guard(Gbar_A)
                Gbar_B, skipped_B, rms_B = self._skip_guard(Gbar_B)
                skip_checks += [(pair.name, "A", skipped_A, rms_A),
                                (pair.name, "B", skipped_B, rms_B)]
            work.append((i, pair, U_A, U_B, R_A_pinv, R_B_pinv, Gbar_A, Gbar_B))
        if skip_checks:
            self._record_skips(skip_checks)
        if self.clip is not None and work:
            scale = self._clip_scale(work)
            work = [(*w[:6], w[6] * scale.to(w[6].device), w[7] * scale.to(w[7].device))
                    for w in work]
        for i, pair, U_A, U_B, R_A_pinv, R_B_pinv, Gbar_A, Gbar_B in work:
            m, n = pair.shape
            st = self.rite_state[i]
            if st is None:
                st = self._fresh_state(m, n, pair.rank, Gbar_A.dtype, Gbar_A.device)
            P_A = U_B.mT @ st["U_B"]  # A's moments live in B's column basis, and vice versa
            P_B = U_A.mT @ st["U_A"]
            new = {"U_A": U_A, "U_B": U_B}
            directions = {}
            for side, Gbar, P, R_other_pinv in (("A", Gbar_A, P_A, R_B_pinv),
                                                 ("B", Gbar_B, P_B, R_A_pinv)):
                V_old, rho = st["V_" + side], st["rho_" + side]
                if self.escaped_mass:
                    rho = b2h * (rho + self._escaped(V_old, P))
                V = self._second_moment(V_old, P, Gbar, b2h)
                Sbar = rite_precondition(Gbar, V, rho, self.eps)
                M = b1h * st["M_" + side] @ P.mT + (1.0 - b1h) * Sbar
                if self.cap > 0:
                    excess = _rms(M) / self.cap  # where(): a NaN RMS leaves M as is
                    M = M / torch.where(excess > 1.0, excess, torch.ones_like(excess))
                new.update({"V_" + side: V, "M_" + side: M, "rho_" + side: rho})
                directions[side] = M @ R_other_pinv.mT
            self.rite_state[i] = new
            self._apply(optimizer, pair, directions["A"], directions["B"])
        self.rite_step += 1

    def _apply(self, optimizer, pair, D_A: Tensor, D_B: Tensor) -> None:
        if self.outer_step == "grad":
            pair.grad_A.copy_(D_A)
            pair.grad_B.copy_(D_B)
            return
        internal_sgd_step(optimizer, pair.a, D_A, self.weight_decay)
        internal_sgd_step(optimizer, pair.b, D_B.mT if pair.b_transposed else D_B,
                          self.weight_decay)



def build_lora_rite(tr, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict,
                    **hparams):
    """SGD: direction in ``.grad``, plain SGD steps; AdamW: internal SGD step for LoRA factors.

    The transform is built first, so its hyper-parameters are checked (with messages naming
    lora-rite) before the base optimizer sees the shared ``betas``/``eps``.
    """
    if optimizer == "sgd":
        if base_kwargs.get("momentum", 0.0):
            raise ValueError("lora-rite keeps its own first moment; its outer SGD step must have "
                             "momentum=0")
        transform = LoraRiteTransform(tr.pairs, outer_step="grad", **hparams)
        groups = [{"params": tr.lora_params}, {"params": tr.others}]
    else:
        transform = LoraRiteTransform(tr.pairs, outer_step="internal", weight_decay=weight_decay,
                                      **hparams)
        groups = [{"params": tr.lora_params + tr.others}]
    opt = make_base_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                              base_kwargs=base_kwargs)
    return opt, transform.attach(opt)


def attach_lora_rite(pairs, optimizer: torch.optim.Optimizer, **hparams) -> LoraRiteTransform:
    """LoRA-RITE on an optimizer built elsewhere (``methods.make_method``): the transform
    takes the SGD outer step itself (``outer_step="internal"``) with the optimizer's largest
    group weight decay, so the foreign optimizer only trains the other parameters."""
    wd = {float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups}
    return LoraRiteTransform(pairs, outer_step="internal", weight_decay=max(wd),
                             **hparams).attach(optimizer)
