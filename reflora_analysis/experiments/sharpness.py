r"""Notebook 04: sharpness over training, at the stored and at the balanced factors, and the
loss landscape along and across the methods' trajectories.

``run = sharpness.setup(globals())``, ``data = sharpness.experiment(run)`` (``{"sharpness",
"landscape", "sharpness_real", "landscape_real"}``; the real ones ``None`` without
``real_task``), then :func:`reflora_analysis.plotting.publish_sharpness_landscape`.

One training sweep per task (:func:`probe_sweep`) gives everything: every ``probe_every``
steps the top Hessian eigenvalue and trace at the stored factors (``SharpnessProbe``), the
top eigenvalue at the balanced factorization of the same ``W``
(:class:`~reflora_analysis.probes.refactored.BalancedSharpnessProbe`) and a snapshot of the
trainable state; the landscapes (:func:`landscape_views`) are computed from those snapshots
afterwards, on the same task (same seed: same base model and data for every method).

Derived (:func:`_derive`): ``seed`` (the first seed); for the real model, whose
Hessian-vector products are the expensive part, ``real_trace_samples = max(3,
trace_samples // 2)``, ``real_tol = max(tol, 0.01)``, ``real_max_iter`` (``None``: Lanczos
runs to ``real_tol``), ``real_n_points = min(n_points, 21)``, ``real_n_grid = min(n_grid,
15)`` (each grid point is a forward pass of the encoder), and the per-layer sharpness of
every ``real_layer_stride``-th pair with at most ``real_layer_max_iter = 20`` HVPs each. Quick (:data:`SPEC`): at most 100
steps on ``mf`` probed every >= 10, 10 Hutch++ samples (5 on the real model: the fewest
with a finite interval), a 31-point interpolation and a 31 x 31 plane on ``mf``; on
``vader-movies`` 4 steps probed at 0 and 4 with at most 6 Lanczos steps, batch 4, 32 tokens,
64 training and 16 validation examples (no test split), 7 interpolation points, a 9 x 9
plane, per-layer sharpness of every 12th LoRA pair (3 of 36) with 4 HVPs each.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .common import as_float, long_table, methods_or_all, sweep_runs, write_data
from .notebook import (NotebookRun, NotebookSpec, Preset, at_least, at_most, fill,
                       options_for_task)

__all__ = ["SPEC", "setup", "experiment", "probe_sweep", "sharpness_over_training",
           "landscape_views", "landscape_experiment", "trace_intervals"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seeds"][0],
            "real_trace_samples": max(3, params["trace_samples"] // 2),
            "real_tol": max(params["tol"], 0.01), "real_max_iter": None,
            "real_n_points": min(params["n_points"], 21), "real_n_grid": min(params["n_grid"], 15),
            "real_layer_stride": 1, "real_layer_max_iter": 20, "real_task_options": {}}


SPEC = NotebookSpec(
    "04_sharpness_landscape",
    parameters=dict(quick=False, device="cpu", seeds=[0], steps=300, probe_every=20,
                    methods=["lora", "reflora", "balance"], task="mf", trace_samples=30,
                    tol=0.001, real_task="vader-movies", real_steps=100, real_probe_every=20,
                    real_refactor_warmup=10, n_points=41, n_grid=41, out_dir=None),
    quick=Preset(steps=at_most(100), probe_every=at_least(10), real_steps=at_most(4),
                 real_probe_every=at_most(4), real_refactor_warmup=at_most(1),
                 trace_samples=at_most(10), n_points=at_most(31), n_grid=at_most(31),
                 real_max_iter=fill(6), real_n_points=at_most(7), real_n_grid=at_most(9),
                 real_layer_stride=at_least(12), real_layer_max_iter=at_most(4),
                 real_task_options=options_for_task("real_task", {
                     "vader-movies": {"batch_size": 4, "max_length": 32, "train_examples": 64,
                                      "eval_examples": 16, "evaluate_test": False},
                     "nlu-minilm": {"eval_examples": 64}})),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """Sharpness and landscapes on ``task`` (SGD) and, unless ``real_task`` is ``None``, on
    the real model (AdamW), with the run's arguments."""
    base = dict(seed=run["seed"], device=run["device"], quick=run["quick"])
    sweep = probe_sweep(run["methods"], task=run["task"], steps=run["steps"],
                        probe_every=run["probe_every"], tol=run["tol"],
                        trace_samples=run["trace_samples"], **base)
    out = {"sharpness": sharpness_data(sweep, out_dir=run.out, name="sharpness"),
           "landscape": landscape_views(sweep, n_points=run["n_points"], n_grid=run["n_grid"],
                                        out_dir=run.out, name="landscape"),
           "sharpness_real": None, "landscape_real": None}
    if run["real_task"]:
        sweep = probe_sweep(run["methods"], task=run["real_task"], optimizer="adamw",
                            steps=run["real_steps"], probe_every=run["real_probe_every"],
                            tol=run["real_tol"], max_iter=run["real_max_iter"],
                            trace_samples=run["real_trace_samples"],
                            task_overrides=run["real_task_options"],
                            refactor_warmup=run["real_refactor_warmup"],
                            per_layer={"stride": run["real_layer_stride"],
                                       "max_iter": run["real_layer_max_iter"]}, **base)
        out["sharpness_real"] = sharpness_data(sweep, out_dir=run.out, name="sharpness_real")
        out["landscape_real"] = landscape_views(sweep, n_points=run["real_n_points"],
                                                n_grid=run["real_n_grid"], out_dir=run.out,
                                                name="landscape_real")
    return out


# ---------------------------------------------------------------- the sweep

_SERIES = {"loss": "loss", "top_eigenvalue": "sharpness/lambda_max",
           "top_eigenvalue_balanced": "sharpness_balanced/lambda_max",
           "trace": "sharpness/trace", "trace_stderr": "sharpness/trace_se",
           "trace_ci_low": "sharpness/trace_ci_low", "trace_ci_high": "sharpness/trace_ci_high",
           "trace_confidence": "sharpness/trace_confidence",
           "degenerate_layers": "sharpness_balanced/degenerate_layers",
           "product_error": "sharpness_balanced/product_error",
           "balance_gap": "sharpness_balanced/gap_before",
           "hvps": "sharpness/hvps", "hvps_balanced": "sharpness_balanced/hvps"}


class _SnapshotRecorder:
    """A probe callback ``ctx -> {}`` that keeps a :class:`~..probes.landscape.Snapshot` of
    the trainable state at every probed step (for the landscapes)."""

    name = "snapshot"

    def __init__(self):
        self.snapshots = []

    def __call__(self, ctx) -> dict:
        from ..probes.landscape import snapshot
        self.snapshots.append(snapshot(ctx.task.model, ctx.task.pairs, step=ctx.step))
        return {}


def _same_state(a, b) -> bool:
    """Two snapshots of the same model hold bit-identical tensors."""
    return all(torch.equal(x, y) for p, q in zip(a.factors, b.factors) for x, y in zip(p, q)) \
        and all(torch.equal(x, y) for x, y in zip(a.others, b.others))


class _SharedStart:
    """A probe measured once at the common start: at step 0 of a later run whose trainable
    state equals the first run's step-0 state bit for bit (every method of a sweep starts
    from the same seeded task; the probes measure the state on ``task.batch(0)``, never the
    method), the first run's values are returned instead of measuring them again."""

    def __init__(self, probe, start: dict):
        self.probe, self.name, self.start = probe, probe.name, start

    def check(self, task) -> None:
        self.probe.check(task)

    def __call__(self, ctx) -> dict:
        if ctx.step != 0:
            return self.probe(ctx)
        from ..probes.landscape import snapshot
        now = snapshot(ctx.task.model, ctx.task.pairs)
        first = self.start.setdefault("state", now)
        if first is not now and self.name in self.start and _same_state(first, now):
            return dict(self.start[self.name])
        out = self.probe(ctx)
        if first is now:
            self.start[self.name] = dict(out)
        return out


def _finite(snap) -> bool:
    return all(bool(torch.isfinite(t).all()) for pair in snap.factors for t in pair) and \
        all(bool(torch.isfinite(t).all()) for t in snap.others)


def probe_sweep(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                optimizer: str = "sgd", steps: int = 100, probe_every: int = 10, seed: int = 0,
                device: str = "cpu", trace_samples: int = 30, tol: float = 1e-3,
                max_iter: int | None = None, lr: float | None = None, quick: bool = False,
                task_overrides: Mapping[str, Any] | None = None, refactor_warmup: int = 0,
                per_layer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    r"""Train every method on a fresh ``task`` (same seed) and probe it every ``probe_every``.

    At each probed step, on that step's batch: ``lambda_max`` (Lanczos, relative residual
    ``tol``, at most ``max_iter`` steps) and the Hutch++ trace (``trace_samples``) w.r.t. the
    stored LoRA factors; ``lambda_max`` at the balanced factorization of the same ``W``
    (``THEORY.md`` F4, F9); a snapshot of the trainable state. The common start (step 0,
    the same for every method) is measured once (:class:`_SharedStart`). After training, the final
    state is snapshotted too and, with ``per_layer = {"stride": k, "max_iter": j}``, the
    top eigenvalue of each ``k``-th pair's own Hessian block is measured there
    (:func:`~reflora_analysis.probes.sharpness.per_layer_sharpness`, at most ``j``
    Hessian-vector products per layer, no trace).

    Returns ``{"task", "optimizer", "seed", "steps", "trace_samples", "runs": [{"method",
    "step", series...}], "trajectories": {method: [Snapshot]}, "task_object", "reference"}``
    (``trajectories`` and ``task_object`` are for :func:`landscape_views`, not JSON).
    """
    from ..probes import make_probes
    from ..probes.refactored import BalancedSharpnessProbe

    recorders, trajectories, layers, last, start = [], {}, {}, {}, {}

    def probes():
        recorders.append(_SnapshotRecorder())
        measured = [*make_probes("sharpness", tol=tol, max_iter=max_iter,
                                 trace_samples=trace_samples, seed=seed),
                    BalancedSharpnessProbe(tol=tol, max_iter=max_iter, seed=seed)]
        return [*(_SharedStart(p, start) for p in measured), recorders[-1]]

    def collect(records, t) -> dict:
        recs = [r for r in records if "sharpness/lambda_max" in r]
        snaps = [s for s in recorders[-1].snapshots if _finite(s)]
        if records and snaps and snaps[-1].step != int(records[-1]["step"]):
            from ..probes.landscape import snapshot
            final = snapshot(t.model, t.pairs, step=int(records[-1]["step"]))
            snaps += [final] if _finite(final) else []
        method = records[0]["method"] if records else f"run{len(trajectories)}"
        trajectories[method] = snaps
        if per_layer and records:
            layers[method] = _per_layer(t, steps, tol, seed, **per_layer)
        out = {"step": [int(r["step"]) for r in recs],
               "final_loss": as_float(records[-1]["loss"]) if records else math.nan}
        out.update({k: [as_float(r.get(v)) for r in recs] for k, v in _SERIES.items()})
        last["task"] = t  # every run has the same base model and data (same seed)
        return out

    swept = sweep_runs(methods_or_all(list(methods)), task=task, steps=steps, seeds=[seed],
                       device=device, quick=quick, task_options=task_overrides,
                       optimizer=optimizer, lr=lr, probe_every=probe_every, probes=probes,
                       refactor_warmup=refactor_warmup, collect=collect)
    task_object = last.get("task")
    return {"task": task, "optimizer": optimizer, "seed": seed, "steps": steps,
            "trace_samples": trace_samples, "runs": swept.runs, "trajectories": trajectories,
            "task_object": task_object, "per_layer": layers,
            "reference": _reference(task_object) if task_object is not None else {}}


def _per_layer(t, steps: int, tol: float, seed: int, stride: int = 1,
               max_iter: int | None = None) -> list[dict]:
    """Per-layer sharpness of every ``stride``-th LoRA pair at the final state, on the batch
    of the last step (``max_iter``: the HVP budget per layer; the value is then a Lanczos
    lower bound, ``converged`` says which)."""
    from ..probes.sharpness import per_layer_sharpness

    batch = t.batch(steps)
    rows = per_layer_sharpness(t.model, lambda: t.loss(batch), list(t.pairs)[::stride], tol=tol,
                               max_iter=max_iter, seed=seed, trace_samples=0)
    return [{k: (as_float(v) if isinstance(v, (int, float)) else v) for k, v in row.items()}
            for row in rows]


def _reference(t) -> dict[str, float]:
    """On a single-layer quadratic task (mf): F9's ``2 sigma_1(Y)``, the top eigenvalue at a
    balanced minimiser; the minimiser of ``l(W) = 1/2 ||W - Y||^2`` is ``Y = -G(0)``."""
    if getattr(t, "loss_in_W", None) is None or len(t.pairs) != 1 or t.name != "mf":
        return {}
    m, n = t.pairs[0].shape
    W = torch.zeros(m, n, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(t.loss_in_W(W), W)
    return {"two_sigma1_Y": 2 * float(torch.linalg.matrix_norm(-g, ord=2))}


# ---------------------------------------------------------------- sharpness data

def trace_intervals(run: Mapping[str, Any], trace_samples: int) -> tuple[list, list, str]:
    """``(low, high, label)`` of the trace's confidence interval per probed step: the
    probe's own ``trace_ci_low``/``trace_ci_high`` where it logged them (the Student t
    interval of ``hessian_trace``), else the same interval rebuilt by
    :func:`~reflora_analysis.probes.refactored.trace_interval` from the logged standard error
    and ``trace_samples`` (95 %)."""
    from ..probes.refactored import trace_interval

    low, high = list(run["trace_ci_low"]), list(run["trace_ci_high"])
    if all(math.isfinite(x) for x in low + high) and low:
        level = next((c for c in run.get("trace_confidence", []) if math.isfinite(c)), None)
        return low, high, (f"{100 * level:g} % " if level else "") + "Student t interval"
    low, high = [], []
    for tr, se in zip(run["trace"], run["trace_stderr"]):
        ci = trace_interval(tr, se, None, trace_samples)
        low.append(ci["low"])
        high.append(ci["high"])
    return low, high, "95 % Student t interval from the standard error"


def sharpness_data(sweep: Mapping[str, Any], *, out_dir=None, name: str = "sharpness") -> dict:
    """The plotted sharpness series of :func:`probe_sweep` (trace intervals filled in by
    :func:`trace_intervals`); writes ``<name>.csv``/``.json`` and, with per-layer values,
    ``<name>_layers.csv``."""
    runs, source = [], None
    for r in sweep["runs"]:
        low, high, source = trace_intervals(r, sweep["trace_samples"])
        runs.append({**r, "trace_ci_low": low, "trace_ci_high": high})
    data = {k: sweep[k] for k in ("task", "optimizer", "seed", "steps", "trace_samples",
                                  "reference", "per_layer")}
    data.update(runs=runs, trace_interval=source)
    columns = ["step", "loss", "top_eigenvalue", "top_eigenvalue_balanced", "trace",
               "trace_stderr", "trace_ci_low", "trace_ci_high", "degenerate_layers"]
    tables = {name: long_table(runs, ["method"], columns)}
    first = next((rows[0] for rows in data["per_layer"].values() if rows), None)
    if first is not None:
        keys = list(first)
        tables[f"{name}_layers"] = (["method", *keys], [
            (m, *[row.get(k) for k in keys]) for m, rows in data["per_layer"].items()
            for row in rows])
    write_data(out_dir, name, data, tables)
    return data


def sharpness_over_training(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                            optimizer: str = "sgd", steps: int = 100, probe_every: int = 10,
                            seed: int = 0, device: str = "cpu", trace_samples: int = 30,
                            tol: float = 1e-3, lr: float | None = None, out_dir=None,
                            name: str = "sharpness", quick: bool = False,
                            task_overrides: Mapping[str, Any] | None = None,
                            refactor_warmup: int = 0, max_iter: int | None = None) -> dict:
    r"""Top Hessian eigenvalue at the stored and at the balanced factors, and the trace with
    its confidence interval, over training (:func:`probe_sweep` then :func:`sharpness_data`).
    At a balanced minimiser of ``mf`` theory gives ``lambda_max = 2 sigma_1(Y)`` (F9), the
    flattest among all factorizations of the same product.

    Returns ``{"runs": [{"method", "step", "loss", "top_eigenvalue",
    "top_eigenvalue_balanced", "trace", "trace_stderr", "trace_ci_low", "trace_ci_high",
    ...}], "reference": {"two_sigma1_Y": ...}, ...}``; writes ``<name>.csv``/``.json``.
    """
    sweep = probe_sweep(methods, task=task, optimizer=optimizer, steps=steps,
                        probe_every=probe_every, seed=seed, device=device,
                        trace_samples=trace_samples, tol=tol, max_iter=max_iter, lr=lr,
                        quick=quick, task_overrides=task_overrides,
                        refactor_warmup=refactor_warmup)
    return sharpness_data(sweep, out_dir=out_dir, name=name)


# ---------------------------------------------------------------- landscapes

def _floats(values) -> list[float]:
    return [as_float(v) for v in np.asarray(values, dtype=float).ravel()]


def _interpolations(t, closure, trajectories, n_points: int) -> dict[str, list]:
    """Start -> solution per method (delta W), and methods[0]'s solution -> every other
    method's, in delta W and in factor space (the contrast ``PROBES.md`` predicts)."""
    from ..probes.landscape import interpolation

    names = [m for m, snaps in trajectories.items() if len(snaps) >= 2]
    along = []
    for m in names:
        out = interpolation(t.model, closure, trajectories[m][0], trajectories[m][-1],
                            pairs=t.pairs, n_points=n_points)
        along.append({"method": m, "t": _floats(out["t"]), "loss": _floats(out["loss"]),
                      "barrier": as_float(out["barrier"])})
    between = []
    for other in names[1:]:
        for space in ("delta-w", "factors"):
            out = interpolation(t.model, closure, trajectories[names[0]][-1],
                                trajectories[other][-1], pairs=t.pairs, space=space,
                                n_points=n_points)
            between.append({"from": names[0], "to": other, "space": space,
                            "t": _floats(out["t"]), "loss": _floats(out["loss"]),
                            "barrier": as_float(out["barrier"])})
    return {"along": along, "between": between}


def _plane(t, closure, trajectories, final_loss: Mapping[str, float],
           n_grid: int) -> dict[str, Any] | None:
    """Every trajectory on the PCA plane of their delta W, moved to pass through the solution
    with the lowest final loss (so that basin lies on the plane), with the loss on the grid."""
    from ..probes.landscape import plane_loss_grid, trajectory_pca

    kept = {m: s for m, s in trajectories.items() if s}
    if sum(len(s) for s in kept.values()) < 3:
        return None
    finite = {m: v for m, v in final_loss.items() if m in kept and math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else next(iter(kept))
    pca = trajectory_pca(kept, anchor=(best, -1))
    grid = plane_loss_grid(t.model, closure, pca, pairs=t.pairs, n_grid=n_grid)
    return {"explained_variance": _floats(pca["explained_variance"]),
            "coords": {m: [_floats(c) for c in pca["coords"][m]] for m in kept},
            "steps": pca["steps"], "anchor": pca["anchor"], "a": _floats(grid["a"]),
            "b": _floats(grid["b"]),
            "loss": [_floats(row) for row in grid["loss"]],
            "point_loss": {m: _floats(v) for m, v in grid["point_loss"].items()}}


def landscape_views(sweep: Mapping[str, Any], *, n_points: int = 41, n_grid: int = 41,
                    out_dir=None, name: str = "landscape") -> dict[str, Any]:
    r"""Interpolations and the trajectory plane from the snapshots of :func:`probe_sweep`.

    All in ``delta W`` (``W - W0``, all layers) and the other trainables, GL(r)-invariant
    (``PROBES.md``), evaluated on the loss of the batch of step ``steps`` (full batch on mf):
    the line from the start to each method's solution (``n_points`` over ``t`` in
    ``[-0.25, 1.25]``), the line between the first method's solution and each other's (also in
    factor space, for contrast), and the plane of the PCA of every snapshot of every method
    (through the solution with the lowest final loss) with the loss on an ``n_grid x n_grid``
    grid and each axis' explained variance.

    Returns ``{"task", "steps", "seed", "along", "between", "plane"}``; writes
    ``<name>.json`` and ``<name>_1d.csv`` (start -> solution: method, t, loss).
    """
    t, steps = sweep["task_object"], sweep["steps"]
    batch = t.batch(steps)
    closure = lambda: t.loss(batch)  # noqa: E731
    trajectories = sweep["trajectories"]
    data = {"task": sweep["task"], "optimizer": sweep["optimizer"], "steps": steps,
            "seed": sweep["seed"], "space": "delta-w",
            **_interpolations(t, closure, trajectories, n_points),
            "plane": _plane(t, closure, trajectories,
                            {r["method"]: r["final_loss"] for r in sweep["runs"]}, n_grid)}
    write_data(out_dir, name, data, {f"{name}_1d": long_table(
        data["along"], ["method"], ["t", "loss"], names=["t", "loss"])})
    return data


def landscape_experiment(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                         optimizer: str = "sgd", steps: int = 100, probe_every: int = 10,
                         seed: int = 0, device: str = "cpu", n_points: int = 41,
                         n_grid: int = 41, lr: float | None = None, out_dir=None,
                         quick: bool = False, **sweep_kw) -> dict[str, Any]:
    r"""Train, snapshot every ``probe_every`` steps and compute :func:`landscape_views`
    (the sharpness probes run too: :func:`probe_sweep`; ``sweep_kw`` go there)."""
    sweep = probe_sweep(methods, task=task, optimizer=optimizer, steps=steps,
                        probe_every=probe_every, seed=seed, device=device, lr=lr, quick=quick,
                        **sweep_kw)
    return landscape_views(sweep, n_points=n_points, n_grid=n_grid, out_dir=out_dir)
