r"""The method registry: the one place where a method name is resolved and its facts live.

:data:`METHODS` maps every name to a :class:`MethodSpec`: how to build the method, its
hyper-parameters (with defaults), its facts (paper, formula, invariance, state) and the family
flags everything else asks for (``refactoring``, ``needs_pairs``, ``dora``, the transform
class and its ``phase``, whether it attaches to any optimizer, the ``task_options`` it sets).
:func:`get_method` is the only name lookup; nothing else spells a list of method names.

Two methods change the model instead of the optimizer (:mod:`.peft_variants`): ``dora`` sets
the task option ``use_dora=True`` and ``full`` sets ``full_finetune=True`` (every weight
trained, no LoRA layers). :func:`method_task_options` merges a method's options into a
task's (refusing a contradiction); :func:`optimizer_methods` lists the methods that set none
and so run on every LoRA task, explicit (A, B) pairs included.

Entry points built on it: :func:`build_optimizer` (a base optimizer plus the method's
transform), :func:`make_method` (the transform alone, for an optimizer built elsewhere) and
:func:`single_step_update` (one SGD step of a method on one pair, from a gradient in W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .balance import BalanceTransform
from .balora import BALORA_HPARAMS, BaLoRATransform, build_balora
from .base import BASE_OPTIMIZER_KWARGS, BASE_OPTIMIZERS, check_lr, resolve_trainables, uses_dora
from .lora import DEFAULT_RATIO, build_lora, build_loraplus
from .lora_pro import LoraProTransform, build_lora_pro
from .lora_rite import LoraRiteTransform, attach_lora_rite, build_lora_rite
from .peft_variants import build_dora, build_full, model_trainables
from .refactoring import REFACTORING_HPARAMS, Refactorer, build_refactored
from .reflora import RefLoRATransform
from .reflora_s import RefLoRASTransform
from .scaledgd import DEFAULT_DAMPING, ScaledGDTransform, build_scaledgd
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
]


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry: how to build the method, its hyper-parameters, its facts and flags.

    Attributes
    ----------
    name : the registry name (lower case).
    build : ``build(trainables, optimizer, lr, weight_decay, base_kwargs, **hparams) ->
        (torch.optim.Optimizer, PairTransform | None)``, called by :func:`build_optimizer`.
    hparams : the method's hyper-parameters and their defaults.
    info : ``{"paper", "formula", "invariance", "state", "notes"}`` (:data:`METHOD_INFO`).
    dora : whether the method is available on DoRA layers (``use_dora=True``).
    transform_cls : the :class:`~.transform.PairTransform` subclass of the method, if any.
    refactoring : one of the refactoring family (a :class:`~.refactoring.Refactorer`:
        RefLoRA, RefLoRA-S, balance).
    needs_pairs : whether it needs the (A, B) pair mapping (``False``: it also trains PEFT
        Conv LoRA layers, whose factors have no such mapping).
    attach : ``attach(pairs, optimizer, **hparams) -> PairTransform`` for :func:`make_method`,
        or ``None`` when the method is tied to the optimizer :func:`build_optimizer` builds.
    task_options : task options the method sets (``make_task`` overrides, e.g.
        ``{"use_dora": True}``), merged by :func:`method_task_options`; empty for the
        methods that only change the optimizer.
    lora_layers : whether it trains LoRA layers (``False``: ``full``, which trains the
        model's own weights, so no pairs are looked for).
    """

    name: str
    build: Callable[..., tuple[torch.optim.Optimizer, PairTransform | None]]
    hparams: dict[str, Any]
    info: dict[str, str]
    dora: bool = True
    transform_cls: type[PairTransform] | None = None
    refactoring: bool = False
    needs_pairs: bool = True
    attach: Callable[..., PairTransform] | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    lora_layers: bool = True

    @property
    def invariance(self) -> str:
        """``"exact"`` | ``"first-order"`` | ``"scalar"`` | ``"none"`` (GL(r) invariance), or
        ``"n/a"`` where there is no factorization (``full``)."""
        return self.info["invariance"]

    @property
    def phase(self) -> str | None:
        """``"pre"`` (changes gradients before the step), ``"post"`` (changes weights after
        it) or ``None`` (no transform: the base optimizer alone)."""
        return None if self.transform_cls is None else self.transform_cls.phase

    @property
    def any_optimizer(self) -> bool:
        """Whether :func:`make_method` can attach it to an optimizer built elsewhere."""
        return self.attach is not None


def _attach_transform(transform_cls: type[PairTransform], pairs, optimizer, **hparams):
    return transform_cls(pairs, **hparams).attach(optimizer)


def _spec(name, build, hparams, *, paper, formula, invariance, state, notes, dora=True,
          transform_cls=None, needs_pairs=True, attach=None, task_options=None, lora_layers=True):
    info = {"paper": paper, "formula": formula, "invariance": invariance, "state": state,
            "notes": notes}
    return MethodSpec(name, build, dict(hparams), info, dora, transform_cls,
                      refactoring=False, needs_pairs=needs_pairs, attach=attach,
                      task_options=dict(task_options or {}), lora_layers=lora_layers)


def _refactoring_spec(transform_cls: type[Refactorer], *, paper, formula, invariance, state,
                      notes):
    """A refactoring method: its name, builder and flags all come from its class."""
    info = {"paper": paper, "formula": formula, "invariance": invariance, "state": state,
            "notes": notes}
    return MethodSpec(transform_cls.method, partial(build_refactored, transform_cls),
                      dict(REFACTORING_HPARAMS), info, transform_cls=transform_cls,
                      refactoring=True, attach=partial(_attach_transform, transform_cls))


_REFLORA_PAPER = ("Zhang, Li, Giannakis, RefLoRA: Refactored Low-Rank Adaptation for Efficient "
                  "Fine-Tuning of Large Models, NeurIPS 2025, arXiv 2505.18877")

METHODS: dict[str, MethodSpec] = {s.name: s for s in [
    _spec("lora", build_lora, {},
          paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022, "
                "arXiv 2106.09685",
          formula="A <- A - eta grad_A, B <- B - eta grad_B (base optimizer on the factors)",
          invariance="none", state="base optimizer only (AdamW: 2(m+n)r)",
          notes="Plain LoRA; the update changes with the factorization (A P, B P^-T). Needs no "
                "(A, B) mapping, so it also trains PEFT Conv LoRA layers (as lora+ does).",
          needs_pairs=False),
    _spec("lora+", build_loraplus, {"ratio": DEFAULT_RATIO},
          paper="Hayou, Ghosh, Yu, LoRA+: Efficient Low Rank Adaptation of Large Models, "
                "ICML 2024, arXiv 2402.12354",
          formula="lr(A = PEFT lora_B) = ratio * lr(B = PEFT lora_A); ratio = 16",
          invariance="none", state="base optimizer only (AdamW: 2(m+n)r)",
          notes="PEFT models: peft.optimizers.create_loraplus_optimizer (1-D params in the fast "
                "group, embedding LoRA at lr 1e-6; Conv LoRA layers too); plain pairs: our two "
                "parameter groups.", needs_pairs=False),
    _spec("scaledgd", build_scaledgd, {"damping": DEFAULT_DAMPING},
          paper="Tong, Ma, Chi, JMLR 2021, arXiv 2005.08898; Zhang, Pilanci, Riemannian "
                "Preconditioned LoRA, ICML 2024, arXiv 2402.02347",
          formula="A <- A - eta grad_A (B^T B + d I)^+, B <- B - eta grad_B (A^T A + d I)^+; "
                  "d = 1e-6 (absolute)",
          invariance="exact", state="none extra; O((m+n)r^2 + r^3) per step",
          notes="Exact GL(r) invariance with SGD and damping=0 only; d > 0 or AdamW (scaled "
                "AdamW) break it. PEFT models: peft.optimizers.create_riemannian_optimizer "
                "(reg = damping; Linear LoRA only); plain pairs: ScaledGDTransform.",
          transform_cls=ScaledGDTransform, attach=partial(_attach_transform, ScaledGDTransform)),
    _spec("lora-rite", build_lora_rite,
          {"betas": (0.9, 0.999), "eps": 1e-6, "clip": 1.0, "skip": 1.0, "cap": 0.0,
           "escaped_mass": False},
          paper="Yen et al., LoRA Done RITE: Robust Invariant Transformation Equilibration for "
                "LoRA Optimization, ICLR 2025, arXiv 2410.20625",
          formula="Gbar_A = grad_A R_B^+; V_A = EMA(P V P^T, Gbar^T Gbar / m); "
                  "M_A = EMA(M P^T, Gbar V^-1/2); A <- A - eta (M_A R_B^+T + wd A)",
          invariance="exact", state="~2(m+n)r + 2r^2 + 2 per layer (replaces Adam's moments)",
          notes="An adaptive optimizer itself: optimizer='sgd' writes its direction into .grad "
                "for plain SGD (momentum must be 0); optimizer='adamw' takes the same SGD step "
                "inside the transform and AdamW trains only the non-LoRA parameters. Exact "
                "GL(r) invariance needs weight_decay=0. The reference default skip=1.0 zeroes a "
                "factor's update whenever the RMS of its unmagnified gradient Gbar exceeds 1 "
                "(it is tuned for LLM-scale gradients; generic unit-scale points, e.g. random "
                "factors and G, trip it), so consistency/invariance probes pass skip=None "
                "(command line: --hparam skip=none).",
          transform_cls=LoraRiteTransform, attach=attach_lora_rite),
    _spec("lora-pro", build_lora_pro, {"x_mode": "sylvester", "betas": (0.9, 0.999), "eps": 1e-8},
          paper="Wang, Liang, Zhang, Tan, LoRA-Pro: Are Low-Rank Adapters Properly Optimized?, "
                "ICLR 2025, arXiv 2407.18242",
          formula="g~ = P_A G + (I - P_A) G P_B; ghat_A = s^-2 (I - P_A) grad_A (B^T B)^-1 - A X, "
                  "ghat_B = s^-2 grad_B (A^T A)^-1 + B X^T, X from a Sylvester equation",
          invariance="first-order", state="SGD: none extra; AdamW ('full'): 2mn per layer",
          notes="optimizer='adamw' is the released 'full' mode: m x n Adam moments of g~ and an "
                "internal SGD outer step. Exact invariance only for orthogonal P. betas/eps "
                "act only with optimizer='adamw' (they are validated with 'sgd' too). Not "
                "available with DoRA.", dora=False, transform_cls=LoraProTransform),
    _refactoring_spec(
        RefLoRATransform, paper=_REFLORA_PAPER,
        formula="grad_A <- grad_A S*^-1, grad_B <- grad_B S*, S* = (A^T A)^-1 # (B^T B)",
        invariance="exact", state="none extra; O((m+n)r^2 + r^3) per step",
        notes="Exact GL(r) invariance with SGD; with AdamW the preconditioned gradients feed "
              "unchanged AdamW (not invariant). Use warmup_steps > 0 from the PEFT A = 0 start."),
    _refactoring_spec(
        RefLoRASTransform, paper=_REFLORA_PAPER,
        formula="after each step: A <- A / sqrt(c), B <- sqrt(c) B, c = ||A||_F / ||B||_F; "
                "Adam moments rescaled",
        invariance="scalar", state="none extra; O((m+n)r) per step",
        notes="Removes only the scalar gauge A -> aA, B -> B/a."),
    _refactoring_spec(
        BalanceTransform,
        paper="balanced projection by the geometric mean (this project), not BaLoRA's SVD split "
              "(that is method 'balora')",
        formula="after each step: (A, B) <- (A P, B P^-1), P = S*^(1/2) (A^T A = B^T B, same A B^T)",
        invariance="exact", state="none extra; O((m+n)r^2 + r^3) per step",
        notes="Balanced factors that differ from BaLoRA's SVD split by an r x r rotation: the same "
              "W as balora and reflora with SGD, a different algorithm with AdamW. With SGD and "
              "non-singular Grams in every layer the W trajectory equals "
              "reflora's (exact GL(r) invariance). Not from a singular start (PEFT's lora_B = 0): "
              "balance leaves layers with singular Grams unprojected while reflora's damped "
              "preconditioner still acts, so the trajectories differ (use warmup_steps). With "
              "AdamW the moments are not transformed (not invariant)."),
    _spec("balora", build_balora, BALORA_HPARAMS,
          paper="Castin, Nadjahi, Ablin, Peyre, BaLoRA, ICML 2026, arXiv 2605.31484 "
                "(code vcastin/balora, callbacks.ProjectionCallback)",
          formula="after each step: A B^T = U S V^T (thin SVD), A <- U S^(1/2), B <- V S^(1/2); "
                  "columns aligned (signed permutation) with the factors they replace",
          invariance="exact", state="none extra; O((m+n)r^2 + r^3) per step",
          notes="BaLoRA's SVD split; Adam moments not transformed. With SGD from a non-singular "
                "start the W trajectory equals reflora's (exact GL(r) invariance). With AdamW, "
                "from a start with distinct singular values, measured invariant too (the split "
                "is unique up to signed column permutations, which Adam's elementwise step "
                "commutes with); not the same algorithm as 'balance'. Layers with a "
                "rank-deficient product (A = 0 start) are projected only once it has full rank.",
          transform_cls=BaLoRATransform, attach=partial(_attach_transform, BaLoRATransform)),
    _spec("dora", build_dora, {},
          paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024, "
                "arXiv 2402.09353",
          formula="W' = m (W0 + s A B^T) / ||W0 + s A B^T||_c; base optimizer on A, B and m",
          invariance="none", state="base optimizer only (AdamW: 2((m+n)r + m))",
          notes="PEFT LoraConfig(use_dora=True), set by the method (task option use_dora=true; "
                "an explicit use_dora=false is refused). A, B and the magnitude vector m "
                "(lora_magnitude_vector, initialised to ||W0||_c) are trained by the base "
                "optimizer, as lora trains A and B. Other methods run on DoRA layers too "
                "(--set use_dora=true).",
          needs_pairs=False, task_options={"use_dora": True}),
    _spec("full", build_full, {},
          paper="full fine-tuning, the reference row of the LoRA papers' tables (e.g. Hu et "
                "al. 2022; RefLoRA, arXiv 2505.18877)",
          formula="W <- W - eta grad_W for every weight of the model (base optimizer)",
          invariance="n/a", state="base optimizer over every weight (AdamW: 2 x model size)",
          notes="Task option full_finetune=true, set by the method: no LoRA layers are attached "
                "and every parameter (embeddings, encoder, head) is trained. No (A, B) pairs, so "
                "the balance, consistency and bound probes refuse it; no GL(r) gauge exists.",
          dora=False, needs_pairs=False, task_options={"full_finetune": True}, lora_layers=False),
]}

#: ``{name: {"paper", "formula", "invariance" ("exact"|"first-order"|"scalar"|"none"|"n/a"), "state", "notes"}}``.
METHOD_INFO: dict[str, dict[str, str]] = {name: dict(spec.info) for name, spec in METHODS.items()}


def available_methods() -> list[str]:
    """Names accepted by :func:`build_optimizer`, in registry order."""
    return list(METHODS)


def get_method(method) -> MethodSpec:
    """The registry entry of ``method`` (``" LoRA "`` -> ``METHODS["lora"]``).

    Raises ``ValueError("unknown method 'x'; valid methods: lora, ...")`` for any other name.
    """
    name = method.strip().lower() if isinstance(method, str) else None
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def optimizer_methods() -> list[str]:
    """Methods that set no task option (``MethodSpec.task_options`` empty): optimizers of the
    LoRA factors, which run on every LoRA task and on explicit (A, B) pairs. The others
    (``dora``, ``full``) need a task that offers their option."""
    return [name for name, spec in METHODS.items() if not spec.task_options]


def method_task_options(method, options=None) -> dict:
    """The task options of a run of ``method``: ``options`` (``make_task`` overrides) with
    the method's own (``MethodSpec.task_options``) added.

    ``method_task_options("dora", {"lora_r": 4}) == {"lora_r": 4, "use_dora": True}``. An
    option given with another value than the method's is one ``ValueError`` naming both,
    e.g. ``use_dora=False`` with ``dora``; the same value is accepted.
    """
    spec = get_method(method)
    merged = dict(options or {})
    for key, value in spec.task_options.items():
        if key in merged and merged[key] != value:
            raise ValueError(f"task option {key}={merged[key]!r} contradicts method {spec.name!r}, "
                             f"which sets {key}={value!r}; drop the option or choose another method")
        merged[key] = value
    return merged


def refactoring_methods() -> list[str]:
    """The refactoring family (``MethodSpec.refactoring``), in registry order."""
    return [name for name, spec in METHODS.items() if spec.refactoring]


def pairless_methods() -> list[str]:
    """Methods that need no (A, B) pair mapping (``needs_pairs=False``; Conv LoRA works)."""
    return [name for name, spec in METHODS.items() if not spec.needs_pairs]


def dora_methods() -> list[str]:
    """Methods available on DoRA layers (``MethodSpec.dora``)."""
    return [name for name, spec in METHODS.items() if spec.dora]


def _split_hparams(spec: MethodSpec, optimizer: str, hparams: dict) -> tuple[dict, dict]:
    """Separate base-optimizer keywords from method hyper-parameters (keys may go to both)."""
    base_keys = BASE_OPTIMIZER_KWARGS[optimizer]
    unknown = [k for k in hparams if k not in base_keys and k not in spec.hparams]
    if unknown:
        valid = sorted(set(spec.hparams) | set(base_keys))
        raise ValueError(f"unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for method "
                         f"{spec.name!r} with optimizer {optimizer!r}; valid: "
                         f"{', '.join(valid) or '(none)'}")
    base = {k: v for k, v in hparams.items() if k in base_keys}
    method = {k: v for k, v in hparams.items() if k in spec.hparams}
    return base, method


def build_optimizer(method: str, model_or_pairs, optimizer: str = "sgd", lr: float | None = None,
                    *, weight_decay: float = 0.0, pairs=None, **hparams
                    ) -> tuple[torch.optim.Optimizer, PairTransform | None]:
    r"""The optimizer of ``method`` and its attached transform (``None`` if it has none).

    Parameters
    ----------
    method : one of :func:`available_methods`.
    model_or_pairs : nn.Module | list of (A, B) | list of LoraPair
        A PEFT model (every ``requires_grad`` parameter is trained; non-LoRA ones, e.g. a
        classifier head, by the base optimizer at ``lr``) or explicit pairs (A m x r, B n x r).
        PEFT Conv LoRA layers have no (A, B) mapping: the methods of
        :func:`pairless_methods` (``lora``, ``lora+``) train them (PEFT's own grouping for
        ``lora+``), the other methods raise ``ValueError`` saying so.
    optimizer : "sgd" | "adamw"
        The base optimizer (``torch.optim.SGD`` / ``torch.optim.AdamW``).
    lr : float > 0, required (positional or keyword: ``build_optimizer("reflora", model,
        "adamw", 1e-4)``).   weight_decay : float >= 0 (the base optimizer's).
    pairs : optional explicit pairs of a plain-torch ``nn.Module``.
    **hparams : the method's hyper-parameters (:data:`METHODS` ``[name].hparams`` holds the
        defaults) and the base optimizer's ``momentum``/``nesterov`` (SGD) or ``betas``/``eps``
        (AdamW). Unknown names raise ``ValueError`` listing the valid ones.

    Returns
    -------
    (optimizer, transform) : call ``optimizer.step()`` as usual; the transform's hooks run
    inside it (after gradient clipping done before ``step``).

    Examples
    --------
    >>> opt, t = build_optimizer("reflora", peft_model, optimizer="adamw", lr=1e-4,
    ...                          warmup_steps=100)                        # doctest: +SKIP
    """
    spec = get_method(method)
    if not isinstance(optimizer, str) or optimizer.strip().lower() not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers: "
                         f"{', '.join(BASE_OPTIMIZERS)}")
    optimizer = optimizer.strip().lower()
    if lr is None:
        raise ValueError("build_optimizer: lr is required (a number > 0)")
    lr = check_lr(lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    base_kwargs, method_hparams = _split_hparams(spec, optimizer, hparams)
    trainables = (resolve_trainables(model_or_pairs, pairs, method=spec.name) if spec.lora_layers
                  else model_trainables(model_or_pairs, spec.name))
    if not spec.dora and uses_dora(trainables.model):
        others = dora_methods()
        raise ValueError(f"method {spec.name!r} is not available with DoRA (use_dora=True): "
                         "its equivalent gradient targets full fine-tuning of W = W0 + s A B^T, "
                         f"which a DoRA layer does not have; use {', '.join(others[:-1])} or "
                         f"{others[-1]}")
    return spec.build(trainables, optimizer, lr, float(weight_decay), base_kwargs,
                      **method_hparams)


def make_method(method: str, model_or_pairs, optimizer: torch.optim.Optimizer, **hparams
                ) -> PairTransform:
    r"""Attach ``method``'s transform to an optimizer built elsewhere (e.g. by a Trainer).

    Only methods that are a transform around *any* base optimizer qualify
    (``METHODS[name].any_optimizer``): the refactoring methods ``reflora``, ``reflora-s``,
    ``balance``, ``scaledgd`` (:class:`~.scaledgd.ScaledGDTransform`; with an Adam-type
    optimizer this is "scaled AdamW") and ``lora-rite`` (internal SGD outer step, so the
    foreign optimizer only trains the other parameters). ``lora`` needs no transform;
    ``lora+`` needs its own parameter groups and ``lora-pro`` a mode tied to the base
    optimizer: use :func:`build_optimizer` for those.
    """
    spec = get_method(method)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    unknown = [k for k in hparams if k not in spec.hparams]
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for method "
                         f"{spec.name!r}; valid: {', '.join(spec.hparams) or '(none)'}")
    pairs = resolve_trainables(model_or_pairs, method=spec.name).pairs
    if not spec.dora and uses_dora(model_or_pairs):
        raise ValueError(f"method {spec.name!r} is not available with DoRA (use_dora=True)")
    if spec.attach is None:
        raise ValueError(f"method {spec.name!r} cannot be attached to an existing optimizer; "
                         "build it with reflora_analysis.methods.build_optimizer (or use "
                         "reflora_analysis.hf_trainer.RefTrainer)")
    return spec.attach(pairs, optimizer, **hparams)


def single_step_update(method: str, A: Tensor, B: Tensor, G: Tensor, lr: float, **hparams
                       ) -> Tensor:
    r"""``dW = A+ B+^T - A B^T`` after one SGD step of ``method`` from the factors.

    The gradients are those of a loss with gradient ``G`` in ``W = W0 + A B^T``:
    ``grad_A = G B``, ``grad_B = G^T A``. Inputs are not modified. Used by the consistency
    probe: for ``reflora``, ``balance``, ``lora-rite`` (``skip=None``: its default guard zeroes
    the step at unit-scale gradients) and ``scaledgd`` (``damping=0``) the result is the same
    for every factorization ``(A P, B P^{-T})`` of ``A B^T``.

    Shapes: A (m x r), B (n x r), G (m x n), floating point (else ``TypeError``); returns
    (m x n) in A's dtype.
    """
    for label, t in (("A", A), ("B", B), ("G", G)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{label} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{label} must be floating point, got {t.dtype}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A (m x r) and B (n x r) must share the rank; got {tuple(A.shape)} "
                         f"and {tuple(B.shape)}")
    if G.shape != (A.shape[0], B.shape[0]):
        raise ValueError(f"G must be m x n = {A.shape[0]} x {B.shape[0]}, got {tuple(G.shape)}")
    A0, B0, G = A.detach(), B.detach(), G.detach().to(A.dtype)
    a, b = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    a.grad, b.grad = G @ B0, G.mT @ A0
    opt, _ = build_optimizer(method, [(a, b)], optimizer="sgd", lr=lr, **hparams)
    opt.step()
    return a.detach() @ b.detach().mT - A0 @ B0.mT
