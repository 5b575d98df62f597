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

Implementation: all layers at once (:mod:`.rite_batched`): the layers are grouped when the
transform is built, every ``r x r`` step is one batched call per (rank, dtype, device) class
and every tall step one per shape group, the state is kept stacked, and the guards are decided
on the device. ``R^+`` is a triangular solve where ``R`` is well conditioned and
``torch.linalg.pinv`` elsewhere (:func:`~.rite_batched.triangular_pinv`), so a zero or
rank-deficient factor keeps the pseudo-inverse semantics (``A = 0``: zero B-step, no NaN).
The per-layer formulas above are the test oracle (``tests/test_lora_rite_batched.py``).

Differences from the reference code: pseudo-inverses instead of the code's damped inverses
(identical for full-rank factors); computation in at least float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..pairs import LoraPair
from .base import LayerStateTransform, check_betas, check_number, make_base_optimizer
from .rite_batched import make_rite_classes, preconditioner, second_moment

__all__ = ["LoraRiteTransform", "rite_precondition", "bias_corrected_decay", "attach_lora_rite"]


def bias_corrected_decay(beta: float, k: int) -> float:
    r"""``beta (1 - beta^k) / (1 - beta^(k+1))``: 0 at k = 0 (the first step keeps no memory)."""
    if beta == 0.0:
        return 0.0
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1))


def rite_precondition(Gbar: Tensor, V: Tensor, rho: float | Tensor, eps: float) -> Tensor:
    r"""``Sbar = Gbar E diag(1 / (sqrt(lambda + rho) + eps)) E^T`` with ``(lambda, E) = eigh(V)``.

    ``Gbar`` (..., m, r), ``V`` (..., r, r) symmetric PSD, ``rho`` a float or a tensor of
    V's batch shape. NaNs (from a degenerate ``V``) become 0.
    """
    rho = torch.as_tensor(rho, dtype=V.dtype, device=V.device).expand(V.shape[:-2])
    return torch.nan_to_num(Gbar @ preconditioner(V, rho, eps), nan=0.0, posinf=0.0,
                            neginf=0.0)


STATE_KEYS = ("U_A", "U_B", "V_A", "V_B", "M_A", "M_B", "rho_A", "rho_B")


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
    strategy : "auto" | "stack" | "loop"
        How layers of one shape are batched (:mod:`.rite_batched`); the results agree to
        round-off. Not an algorithm parameter.

    Bad hyper-parameters raise a one-line ``TypeError`` (not a number / not a pair) or
    ``ValueError`` (out of range) naming the parameter.

    Layers are grouped once, here (:func:`~.rite_batched.make_rite_classes`): a step is a
    fixed number of batched calls per (rank, dtype, device) class and per shape group, not
    ~60 calls per layer. The guards are evaluated on the device: the only host
    synchronisation is one boolean per step ("was any factor skipped?") until the skip
    warning has been shown, none afterwards. :attr:`rite_state` is the per-layer view of the
    stacked state (the format of checkpoints written before the batching; both load).
    """

    state_key, step_attr, layers_attr, label = "lora_rite", "rite_step", "rite_state", "LoRA-RITE"
    phase = "pre"

    def __init__(self, model_or_pairs, *, betas=(0.9, 0.999), eps: float = 1e-6,
                 clip: float | None = 1.0, skip: float | None = 1.0, cap: float = 0.0,
                 escaped_mass: bool = False, weight_decay: float = 0.0, outer_step: str = "grad",
                 strategy: str = "auto"):
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
        classes = make_rite_classes(self.pairs, strategy)
        # groups first: they hold U and M (memory accounting walks attributes in this order)
        self.groups = [g for c in classes for g in c.groups]
        self.classes = classes
        rows = {id(p): (c, g, j) for c in self.classes for g in c.groups
                for j, p in enumerate(g.pairs)}
        self._where = [rows[id(p)] for p in self.pairs]  # pair index -> (class, group, row)
        self._started = [False] * len(self.pairs)  # has the layer taken a step yet?
        self._lr_map: tuple | None = None

    @property
    def skipped(self) -> int:
        """Factor updates dropped by the skip guard so far (reading it synchronises)."""
        return int(self._skipped_total)

    # -- the r x r second moment, a hook so tests can replace it (V = I gives ScaledGD) --
    def _second_moment(self, V_old: Tensor, P: Tensor, gram: Tensor, beta2_hat: float) -> Tensor:
        """Step 5 for a whole class, ``(2, L, r, r)`` each (:func:`.rite_batched.second_moment`)."""
        return second_moment(V_old, P, gram, beta2_hat)

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        """One LoRA-RITE step of every layer with gradients: steps 1-2 for all classes, the
        global guards (the clip needs every ``Gbar`` first), then steps 4-10 per class."""
        beta1, beta2 = self.betas
        b1h = bias_corrected_decay(beta1, self.rite_step)
        b2h = bias_corrected_decay(beta2, self.rite_step)
        if not self._mark_missing():
            norms = [c.unmagnify() for c in self.classes]
            scale, skipped = self._guards(norms)
            for c, skipped_c in zip(self.classes, skipped):
                directions = c.update(scale, skipped_c, b1h, b2h, self.eps, self.cap,
                                      self.escaped_mass, self._second_moment)
                for g, D in zip(c.groups, directions):
                    self._apply(optimizer, g, D)
        self.rite_step += 1

    def _mark_missing(self) -> bool:
        """Note in each group the layers without gradients (left untouched this step);
        True when no layer has any."""
        for g in self.groups:
            g.missing = [j for j, p in enumerate(g.pairs) if p.a.grad is None or p.b.grad is None]
        for i, (_, g, j) in enumerate(self._where):
            self._started[i] = self._started[i] or j not in g.missing
        return all(len(g.missing) == g.k for g in self.groups)

    def _guards(self, norms: list[Tensor]) -> tuple[Tensor | None, list]:
        """Step 3 for every layer: ``(clip scale min(1, clip / c) or None, per class the
        (2, L) skipped flags or Nones)``; a NaN RMS counts as skipped. On the device."""
        skipped: list = [None] * len(self.classes)
        if self.skip is not None:
            skipped = [~(n * c.inv_sqrt_size <= self.skip) for n, c in zip(norms, self.classes)]
            self._record_skips(skipped, norms)
            norms = [torch.where(s, 0.0, n) for s, n in zip(skipped, norms)]
        if self.clip is None:
            return None, skipped
        device = norms[0].device
        total = sum(n.to(device, torch.float64).square().sum() for n in norms).sqrt()
        return torch.where(total > self.clip, self.clip / total, 1.0), skipped

    def _record_skips(self, skipped: list[Tensor], norms: list[Tensor]) -> None:
        """Count this step's skipped factors; warn (once) naming the first one.

        The count stays on the device; the one ``bool`` below is the only synchronisation,
        and only until the warning is shown.
        """
        device = skipped[0].device
        count = sum(s.sum().to(device) for s in skipped)
        self._skipped_total = self._skipped_total + count
        if self._skip_warned or not bool(count):
            return
        self._skip_warned = True
        c_index = {id(c): k for k, c in enumerate(self.classes)}
        for pair, (c, g, j) in zip(self.pairs, self._where):
            k, row = c_index[id(c)], g.rows.start + j
            for side, factor in enumerate("AB"):
                if bool(skipped[k][side, row]):
                    rms = float(norms[k][side, row] * c.inv_sqrt_size[side, row])
                    warnings.warn(
                        f"lora-rite: update of factor {factor} in layer '{pair.name}' skipped at "
                        f"step {self.rite_step}: RMS of its unmagnified gradient {rms:.3g} > "
                        f"skip={self.skip} (the reference code's guard, tuned for LLM-scale "
                        "gradients); pass skip=None to disable it (command line: --hparam "
                        "skip=none). Shown once.", stacklevel=5)
                    return

    def _apply(self, optimizer, group, directions: list[Tensor]) -> None:
        """Step 10: ``.grad <- D`` (``"grad"``) or ``p <- p - lr (D + wd p)`` (``"internal"``)."""
        keep = [j for j in range(group.k) if j not in group.missing]
        if not keep:
            return
        for params, D in zip(group.params, directions):
            params = [params[j] for j in keep]
            if D.dtype != params[0].dtype:
                D = D.to(params[0].dtype)
            D = D.unbind(0)
            D = [D[j] for j in keep] if group.missing else list(D)
            if self.outer_step == "grad":
                torch._foreach_copy_([p.grad for p in params], D)
            else:
                self._sgd_step(optimizer, params, D)

    def _sgd_step(self, optimizer, params: list, directions: list[Tensor]) -> None:
        """The internal outer step of every parameter (then ``.grad = None``), one fused
        call per learning rate."""
        lrs = self._group_lrs(optimizer, params)
        for lr in dict.fromkeys(lrs):
            same = [k for k, x in enumerate(lrs) if x == lr]
            ps = [params[k] for k in same] if len(same) < len(params) else params
            ds = [directions[k] for k in same] if len(same) < len(params) else directions
            if self.weight_decay:
                torch._foreach_mul_(ps, 1.0 - lr * self.weight_decay)
            torch._foreach_add_(ps, ds, alpha=-lr)
        for p in params:
            p.grad = None

    def _group_lrs(self, optimizer, params: list) -> list[float]:
        """The current ``lr`` of each parameter's group (schedulers apply); the parameter ->
        group map is built once per optimizer layout."""
        key = (id(optimizer), len(optimizer.param_groups))
        if self._lr_map is None or self._lr_map[0] != key:
            self._lr_map = (key, {id(p): k for k, group in enumerate(optimizer.param_groups)
                                  for p in group["params"]})
        where = self._lr_map[1]
        if any(id(p) not in where for p in params):
            raise ValueError("parameter is not managed by this optimizer (build the optimizer "
                             "and the transform from the same model)")
        return [float(optimizer.param_groups[where[id(p)]]["lr"]) for p in params]

    # -- state: stacked inside the classes, saved per layer ------------------------------
    def _state_views(self, i: int) -> dict[str, Tensor]:
        """Views of pair ``i``'s rows of the stacked state, by :data:`STATE_KEYS`."""
        c, g, j = self._where[i]
        row = g.rows.start + j
        return {"U_A": g.U[0][j], "U_B": g.U[1][j], "V_A": c.V[0, row], "V_B": c.V[1, row],
                "M_A": g.M[0][j], "M_B": g.M[1][j], "rho_A": c.rho[0, row],
                "rho_B": c.rho[1, row]}

    @property
    def rite_state(self) -> list[dict | None]:
        """Per layer (pair order) a copy of its state, ``{"U_A", "U_B", "V_A", "V_B", "M_A",
        "M_B", "rho_A", "rho_B"}`` (tensors; the per-layer code's checkpoint format), or None
        before the layer's first step."""
        return [{k: v.clone() for k, v in self._state_views(i).items()} if started else None
                for i, started in enumerate(self._started)]

    @rite_state.setter
    def rite_state(self, layers: list) -> None:
        """Load :attr:`rite_state` (``rho`` may be a float, as older checkpoints hold). Every
        layer is checked before anything changes: a one-line ``ValueError`` names the layer
        and the entry that is missing or of the wrong shape."""
        layers = [None if layer is None else _checked(layer, pair, self._state_views(i))
                  for i, (layer, pair) in enumerate(zip(layers, self.pairs))]
        for c in self.classes:
            c.V, c.rho = torch.zeros_like(c.V), torch.zeros_like(c.rho)
        for g in self.groups:
            g.U, g.M = g.zero_state(bases=True), g.zero_state()
        for i, layer in enumerate(layers):
            self._started[i] = layer is not None
            if layer is not None:
                for key, target in self._state_views(i).items():
                    target.copy_(layer[key])


def _checked(layer, pair: LoraPair, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """One layer's saved state as tensors of the shapes of ``targets``, else ValueError."""
    if not isinstance(layer, dict) or set(STATE_KEYS) - set(layer):
        raise ValueError(f"LoRA-RITE state of layer '{pair.name}' must hold "
                         f"{', '.join(STATE_KEYS)}")
    out = {}
    for key, target in targets.items():
        try:
            out[key] = torch.as_tensor(layer[key])
        except (TypeError, ValueError, RuntimeError):
            out[key] = None
        if out[key] is None or out[key].shape != target.shape:
            got = "is not a tensor" if out[key] is None else f"has shape {tuple(out[key].shape)}"
            raise ValueError(f"LoRA-RITE state of layer '{pair.name}': {key} {got}, "
                             f"expected shape {tuple(target.shape)}")
    return out


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
