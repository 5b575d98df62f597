r"""Probes: measurements of LoRA training that leave the model exactly as they found it.

Functions (each documented in its module):

==============  =========================================================  ====================
module          measures                                                   cost
==============  =========================================================  ====================
balance         ||A||^2 - ||B||^2, ||A||/||B||, balance_gap, Gram spectra  r x r per layer
consistency     spread of one step's dW over factorizations (F6)           n_reparam steps
sharpness       lambda_max (Lanczos / PyHessian), trace (Hutch++), SLQ     HVPs (fwd + 2 bwd)
bounds          l(W+dW) vs U_exact, U_relaxed (F8); eta line scans         a few losses
landscape       1-D / 2-D loss slices (filter, rank, delta-w)              n or n^2 forwards
==============  =========================================================  ====================

Callbacks for ``train.run(probes=...)``: :func:`make_probes` ``("balance,consistency,
sharpness,bound")`` returns :class:`Probe` objects; ``probe(ctx)`` with a
:class:`ProbeContext` returns ``{"<probe>/<quantity>": float}`` including
``"<probe>/seconds"`` (and ``"<probe>/hvps"`` where Hessian-vector products are used).
``probe.check(task)`` raises ``ValueError`` (naming the probe, the task and the reason) when
the probe cannot run on ``task``; ``train.run`` calls it for every probe before step 0, and
:func:`supported_probes` lists the names that pass it.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ._util import gradient_in_W, loss_and_grad_in_W, preserved_state, step_method
from .balance import balance_stats, layer_balance
from .bounds import (DEFAULT_MARGIN, DEFAULT_POINTS, bound_line_scan, bound_probe_values,
                     bound_step, check_smoothness_options, estimate_smoothness,
                     preconditioner_for, single_layer)
from .consistency import consistency_score, consistency_table, random_gl
from .landscape import FlatSliceWarning, loss_landscape
from .sharpness import (eigenvalue_density, hessian_trace, lanczos_top_eigenvalues,
                        per_layer_sharpness, top_hessian_eigenvalue)

#: gradient_in_W's default ``max_width`` (the n x n identity it appends to B).
GRADIENT_IN_W_MAX_WIDTH = inspect.signature(gradient_in_W).parameters["max_width"].default

__all__ = [
    "ProbeContext", "Probe", "BalanceProbe", "ConsistencyProbe", "SharpnessProbe", "BoundProbe",
    "available_probes", "make_probes", "supported_probes", "balance_stats", "layer_balance",
    "consistency_score", "consistency_table", "random_gl", "top_hessian_eigenvalue",
    "lanczos_top_eigenvalues", "hessian_trace", "per_layer_sharpness", "eigenvalue_density",
    "bound_step",
    "bound_line_scan", "estimate_smoothness", "preconditioner_for", "loss_landscape",
    "FlatSliceWarning", "gradient_in_W", "loss_and_grad_in_W", "step_method",
]


@dataclass
class ProbeContext:
    """What a probe sees at one training step.

    ``batch`` may be ``None``: the probe then uses ``task.batch(step)``. ``hparams`` are the
    run's hyper-parameters; the probes that simulate one step of the method (consistency,
    bound) pass the method's own ones to ``methods.single_step_update``, without the schedule
    (``warmup_steps``, ``interval``). ``active`` says whether the method's transform acts on
    the coming optimizer step (``transform.is_active()``; ``train.run`` sets it): when it does
    not (warm-up, between ``interval`` steps) the step is plain LoRA's, and those probes
    simulate ``lora`` and report ``<probe>/method_active = 0``. ``progress``: long probes
    (sharpness) show tqdm bars on stderr for their Hessian-vector products (``train.run``
    sets it when its own progress bar is shown).
    """

    task: Any
    method: str
    optimizer: str
    lr: float
    step: int
    batch: Any = None
    hparams: dict = field(default_factory=dict)
    active: bool = True
    progress: bool = False

    def step_method(self) -> tuple[str, dict]:
        """``(method, hparams)`` of the SGD step taken now (``"lora"`` when not active)."""
        return step_method(self.method, self.hparams, self.active)

    def loss_closure(self):
        batch = self.batch if self.batch is not None else self.task.batch(self.step)
        return lambda: self.task.loss(batch)


def _task_name(task) -> str:
    return str(getattr(task, "name", type(task).__name__))


def _rng_preserved(model):
    """Fork torch's global RNG (CPU and the model's CUDA devices): a probe never shifts the
    random stream training draws from (dropout, sampling), whatever its loss closure does."""
    devices = set()
    if model is not None:
        devices = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    return torch.random.fork_rng(devices=sorted(devices))


class Probe:
    """Base callback: ``probe(ctx) -> dict[str, float]``, state restored, cost reported.

    Subclasses implement ``measure(ctx)`` and, when they need something of the task,
    ``requirements(task)``: the reason the probe cannot run on ``task`` (a phrase), or None.
    ``check(task)`` turns that reason into a ``ValueError`` naming the probe and the task.
    """

    name = "probe"

    def measure(self, ctx: ProbeContext) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def requirements(self, task) -> str | None:
        """Why this probe cannot run on ``task`` (e.g. ``"it needs ..."``), or None if it can."""
        if not getattr(task, "pairs", None):
            return "it needs the task's LoRA pairs (task.pairs is empty)"
        return None

    def check(self, task) -> None:
        """``ValueError`` (one line: probe, task, reason) if this probe cannot run on ``task``."""
        why = self.requirements(task)
        if why:
            raise ValueError(f"probe {self.name!r} cannot run on task {_task_name(task)!r}: {why}")

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        if not isinstance(ctx, ProbeContext):
            raise TypeError(f"a probe takes a ProbeContext, got {type(ctx).__name__}")
        self.check(ctx.task)
        start = time.perf_counter()
        model = getattr(ctx.task, "model", None)
        pair_params = [t for p in getattr(ctx.task, "pairs", []) for t in p.params]
        with preserved_state(model, pair_params), _rng_preserved(model):
            values = self.measure(ctx)
        values[f"{self.name}/seconds"] = time.perf_counter() - start
        return {k: float(v) for k, v in values.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BalanceProbe(Probe):
    """Aggregated balance (``balance/norm_diff``, ``norm_ratio``, ``gap_mean``, ``gap_max``,
    ``cond_AtA_max``, ``cond_BtB_max``); per layer too with ``per_layer=True``."""

    name = "balance"

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def measure(self, ctx):
        stats = balance_stats(ctx.task.pairs)
        out = {f"balance/{k}": stats[k] for k in ("norm_diff", "norm_ratio", "gap_mean", "gap_max")}

        def cond(sv):
            return sv[0] / sv[-1] if sv[-1] > 0 else math.inf
        out["balance/cond_AtA_max"] = max(cond(v["sv_AtA"]) for v in stats["layers"].values())
        out["balance/cond_BtB_max"] = max(cond(v["sv_BtB"]) for v in stats["layers"].values())
        if self.per_layer:
            for name, v in stats["layers"].items():
                for k in ("norm_diff", "norm_ratio", "gap"):
                    out[f"balance/{name}/{k}"] = v[k]
        return out


class ConsistencyProbe(Probe):
    r"""``consistency/score``: max over layers of :func:`consistency_score` of the step the run
    takes now (the method's, or ``lora`` while its transform is inactive: see
    ``consistency/method_active`` and :class:`ProbeContext`) at the current factors with the
    current gradient in W (``task.loss_in_W`` for single-layer tasks, else
    :func:`gradient_in_W`), and ``consistency/score_mean``.
    NaN where the method's update is zero. ``consistency/degenerate_layers`` counts layers with
    a (numerically) rank-deficient factor, e.g. the B = 0 start: there every factorization
    ``(A P, B P^{-T})`` still has a singular Gram, S* exists only through damping, and the
    score measures the damping rather than the method.

    Where the score is taken matters: at the tasks' ``A ~ 0.01`` start (and PEFT's ``A = 0``)
    the steps of LoRA and LoRA+ are both dominated by ``-eta G B B^T`` and score alike
    (:mod:`.consistency`); probed along training the factors are generic.
    ``consistency/norm_ratio`` (``sqrt(sum ||A||^2 / sum ||B||^2)`` over the probed layers)
    says how far the point is from such a start. With ``per_layer=True`` also
    ``consistency/<pair name>/score``."""

    name = "consistency"

    def __init__(self, n_reparam: int = 8, seed: int = 0, max_layers: int | None = None,
                 per_layer: bool = False):
        self.n_reparam, self.seed, self.max_layers = n_reparam, seed, max_layers
        self.per_layer = bool(per_layer)

    @staticmethod
    def _single_layer(task) -> bool:
        return getattr(task, "loss_in_W", None) is not None and len(task.pairs) == 1

    def requirements(self, task):
        why = super().requirements(task)
        if why or self._single_layer(task):
            return why
        if getattr(task, "model", None) is None:
            return "it needs task.model (or a single-layer task with loss_in_W)"
        wide = [p for p in list(task.pairs)[: self.max_layers]
                if p.shape[1] > GRADIENT_IN_W_MAX_WIDTH]
        if wide:
            return (f"layer {wide[0].name} has n = {wide[0].shape[1]} > {GRADIENT_IN_W_MAX_WIDTH} "
                    "inputs, too wide for gradient_in_W (it widens B by an n x n identity)")
        return None

    def measure(self, ctx):
        task = ctx.task
        method, hparams = ctx.step_method()
        pairs = list(task.pairs)[: self.max_layers]
        if self._single_layer(task):
            pr = pairs[0]
            W0 = task.W0 if task.W0 is not None else torch.zeros(pr.shape, dtype=pr.A.dtype,
                                                                  device=pr.A.device)
            _, G = loss_and_grad_in_W(task.loss_in_W, W0 + pr.scaling * pr.A @ pr.B.T)
            G_list = [pr.scaling * G]
        else:
            G_list = gradient_in_W(task.model, ctx.loss_closure(), pairs)
        scores = []
        for pr, G in zip(pairs, G_list):
            try:
                scores.append(consistency_score(method, pr.A.detach(), pr.B.detach(),
                                                lambda W, G=G: G, n_reparam=self.n_reparam,
                                                seed=self.seed, lr=ctx.lr, **hparams))
            except ValueError as exc:
                if "zero update" not in str(exc):
                    raise
                scores.append(math.nan)
        finite = [s for s in scores if not math.isnan(s)]

        def deficient(X):
            # relative to the precision the factor is stored in
            eps = torch.finfo(X.dtype).eps
            sv = torch.linalg.svdvals(X.detach().to(torch.float64))
            return bool(sv[0] == 0 or sv[-1] <= sv.shape[0] * eps * float(sv[0]))
        degenerate = sum(deficient(pr.A) or deficient(pr.B) for pr in pairs)
        na2 = sum(float(pr.A.detach().double().square().sum()) for pr in pairs)
        nb2 = sum(float(pr.B.detach().double().square().sum()) for pr in pairs)
        out = {"consistency/degenerate_layers": float(degenerate),
               "consistency/method_active": float(ctx.active),
               "consistency/norm_ratio": math.sqrt(na2 / nb2) if nb2 > 0 else math.nan,
               "consistency/score": max(finite) if finite else math.nan,
               "consistency/score_mean": sum(finite) / len(finite) if finite else math.nan}
        if self.per_layer:
            out.update({f"consistency/{pr.name}/score": s for pr, s in zip(pairs, scores)})
        return out


class SharpnessProbe(Probe):
    """``sharpness/lambda_max`` (largest algebraic eigenvalue: scipy ``eigsh`` by default),
    ``residual``, ``converged``; ``trace``, ``trace_se`` and the trace's Student t interval
    ``trace_ci_low``, ``trace_ci_high`` at ``trace_confidence`` (Hutch++, ``trace_samples``
    HVPs; 0 skips them); ``hvps``.

    The Hessian is taken w.r.t. the LoRA factors of ``task.pairs`` (``THEORY.md`` section 5);
    ``include_head=True`` takes every trainable parameter instead (e.g. a classifier head
    trained beside LoRA). ``per_layer=True`` adds, for each pair ``<name>``, the Hessian block
    of its own two factors (:func:`~.sharpness.per_layer_sharpness`):
    ``sharpness/<name>/lambda_max``, ``/trace``, ``/trace_ci_low``, ``/trace_ci_high`` (one
    more eigen-solve and trace per layer).
    """

    name = "sharpness"

    def __init__(self, tol: float = 1e-3, max_iter: int | None = None, trace_samples: int = 30,
                 seed: int = 0, method: str = "lanczos", include_head: bool = False,
                 per_layer: bool = False, confidence: float = 0.95):
        self.tol, self.max_iter, self.trace_samples = tol, max_iter, trace_samples
        self.seed, self.method, self.include_head = seed, method, include_head
        self.per_layer, self.confidence = bool(per_layer), confidence

    def parameters(self, task) -> list | None:
        """The variables of the Hessian: the LoRA factors, or ``None`` (every trainable one)."""
        pairs = getattr(task, "pairs", None)
        if self.include_head or not pairs:
            return None
        return [t for p in pairs for t in p.params]

    def requirements(self, task):
        model = getattr(task, "model", None)
        if not isinstance(model, torch.nn.Module):
            return "it needs task.model (an nn.Module) to take Hessian-vector products"
        if not any(p.requires_grad for p in model.parameters()):
            return "task.model has no parameter that requires grad"
        if self.per_layer and not getattr(task, "pairs", None):
            return "per_layer=True needs task.pairs (the LoRA layers)"
        return None

    def measure(self, ctx):
        closure = ctx.loss_closure()
        params = self.parameters(ctx.task)
        value, info = top_hessian_eigenvalue(ctx.task.model, closure, method=self.method,
                                             tol=self.tol, max_iter=self.max_iter,
                                             return_info=True, seed=self.seed, params=params,
                                             progress=ctx.progress)
        out = {"sharpness/lambda_max": value, "sharpness/residual": info["residual"],
               "sharpness/converged": float(info["converged"])}
        hvps = info["hvps"]
        if self.trace_samples:
            tr, se, tinfo = hessian_trace(ctx.task.model, closure, n_samples=self.trace_samples,
                                          seed=self.seed, return_info=True, params=params,
                                          progress=ctx.progress, confidence=self.confidence)
            out.update({"sharpness/trace": tr, "sharpness/trace_se": se,
                        "sharpness/trace_ci_low": tinfo["ci_low"],
                        "sharpness/trace_ci_high": tinfo["ci_high"],
                        "sharpness/trace_confidence": tinfo["confidence"]})
            hvps += tinfo["hvps"]
        if self.per_layer:
            for row in per_layer_sharpness(ctx.task.model, closure, ctx.task.pairs, tol=self.tol,
                                           max_iter=self.max_iter, seed=self.seed,
                                           trace_samples=self.trace_samples,
                                           confidence=self.confidence, method=self.method,
                                           progress=ctx.progress):
                for key in ("lambda_max", "trace", "trace_ci_low", "trace_ci_high"):
                    out[f"sharpness/{row['layer']}/{key}"] = row[key]
                hvps += row["hvps"]
        out["sharpness/hvps"] = float(hvps)
        return out


class BoundProbe(Probe):
    """F8 at the current iterate (``probes.bounds``): ``bound/loss``, ``next_loss`` (after one
    SGD step at ``ctx.lr`` of the method, or of ``lora`` while its transform is inactive:
    ``bound/method_active``), ``U_exact``, ``U_relaxed`` (NaN outside lora / reflora /
    reflora-s / balance), ``slack_exact``, ``L`` and how it was obtained (``L_estimated``: 0
    for the task's known constant, 1 for a segment estimate; ``L_sampled``, ``L_margin``,
    ``L_points``, ``L_hessian``, ``hvps``), ``L_needed`` (the smallest ``L`` for which
    ``U_exact`` holds), ``violations`` (1 if the next loss exceeds ``U_exact`` by more than
    ``violation_tol``, else 0: sum them over steps) and ``layers``.

    Single-layer tasks with ``loss_in_W`` use it (float64, ``curvature`` ``"directional"`` or
    ``"hessian"``); any other task with ``task.model`` holding its LoRA factors gets the joint
    bound over every layer (``joint_bound_step``: the step's batch, eval mode, directional
    curvature only; ``U_relaxed`` too unless ``relaxed=False``: its norms come from r x r
    cores, no m x n SVD). ``L`` unknown: estimated on the step's segment
    at ``points`` points with a safety ``margin``. The bound concerns the method's SGD step whatever
    ``ctx.optimizer`` is."""

    name = "bound"

    def __init__(self, curvature: str = "directional", points: int = DEFAULT_POINTS,
                 margin: float = DEFAULT_MARGIN, seed: int = 0, relaxed: bool | None = None):
        check_smoothness_options(curvature, points, margin)
        self.curvature, self.points, self.margin, self.seed = curvature, points, margin, seed
        self.relaxed = relaxed

    def requirements(self, task):
        why = super().requirements(task)
        if why or single_layer(task):
            return why
        model = getattr(task, "model", None)
        if not isinstance(model, torch.nn.Module):
            return ("it needs a single-layer task with loss_in_W (mf, sensing, "
                    "lowrank-regression) or task.model (an nn.Module holding the LoRA factors)")
        if self.curvature != "directional":
            return (f"curvature {self.curvature!r} needs a single-layer task with loss_in_W; "
                    "on a model with several LoRA layers use curvature='directional'")
        held = {id(p) for p in model.parameters()}
        if not all(id(t) in held for p in task.pairs for t in p.params):
            return "task.model does not hold the LoRA factors of task.pairs"
        wide = [p for p in task.pairs if p.shape[1] > GRADIENT_IN_W_MAX_WIDTH]
        if wide:
            return (f"layer {wide[0].name} has n = {wide[0].shape[1]} > {GRADIENT_IN_W_MAX_WIDTH} "
                    "inputs, too wide for gradient_in_W (it widens B by an n x n identity)")
        return None

    def measure(self, ctx):
        method, hparams = ctx.step_method()
        out = bound_probe_values(ctx.task, method, ctx.lr, loss_closure=ctx.loss_closure(),
                                 curvature=self.curvature, points=self.points,
                                 margin=self.margin, seed=self.seed, relaxed=self.relaxed,
                                 **hparams)
        out.pop("bound/seconds", None)
        out["bound/method_active"] = float(ctx.active)
        return out


from .health import HealthProbe  # noqa: E402  (after Probe: it subclasses it)

_PROBES = {"balance": BalanceProbe, "consistency": ConsistencyProbe,
           "sharpness": SharpnessProbe, "bound": BoundProbe, "health": HealthProbe}


def available_probes() -> list[str]:
    """Names accepted by :func:`make_probes`."""
    return list(_PROBES)


def supported_probes(task) -> list[str]:
    """The names of :func:`available_probes` whose default probe passes ``check(task)``."""
    out = []
    for name, cls in _PROBES.items():
        try:
            cls().check(task)
        except ValueError:
            continue
        out.append(name)
    return out


def make_probes(spec, **kw) -> list:
    """Probes from ``"balance,consistency"`` or a list of names / :class:`Probe` objects /
    callables ``ctx -> dict`` (kept as given; a name in a list may itself be comma-separated).

    Keyword arguments go to every named probe whose constructor accepts them (e.g.
    ``tol=1e-4`` to ``sharpness``, ``seed`` to consistency and sharpness); a keyword no
    requested probe accepts is an error. An unknown name is a ``ValueError`` listing the valid
    ones.
    """
    if spec is None:
        spec = []
    if isinstance(spec, str):
        spec = [spec]
    elif isinstance(spec, Probe) or (callable(spec) and not isinstance(spec, type)):
        spec = [spec]
    elif not isinstance(spec, (list, tuple)):
        raise TypeError("probe spec must be a comma-separated string of names, a probe, or a "
                        f"list of them, got {type(spec).__name__}")
    names = []
    for item in spec:
        if isinstance(item, str):
            names += [s.strip() for s in item.split(",") if s.strip()]
        else:
            names.append(item)
    probes, used = [], set()
    for name in names:
        if isinstance(name, Probe):
            probes.append(name)
            continue
        if not isinstance(name, str):
            if callable(name) and not isinstance(name, type):
                probes.append(name)  # a plain callback ctx -> dict
                continue
            raise TypeError(f"a probe must be a name, a Probe or a callable ctx -> dict, got "
                            f"{type(name).__name__}")
        if name not in _PROBES:
            raise ValueError(f"unknown probe {name!r}; valid: {', '.join(available_probes())}")
        cls = _PROBES[name]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        mine = {k: v for k, v in kw.items() if k in accepted}
        used |= set(mine)
        probes.append(cls(**mine))
    unused = set(kw) - used
    if unused:
        named = [n for n in names if isinstance(n, str)]
        raise ValueError(f"probe option(s) {sorted(unused)} not accepted by any of {named}")
    return probes
