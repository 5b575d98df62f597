r"""Notebook 02: loss and the descent-lemma bounds (F8) vs step size, and along runs.

``run = bounds.setup(globals())``, ``data = bounds.experiment(run)`` (``{"scan",
"tightness", "real"}``; ``real`` is ``None`` without ``real_task``), then
:func:`reflora_analysis.plotting.publish_bounds`.

* ``scan``: at iterates of a LoRA run on the single-layer ``task`` (``L`` known exactly),
  loss and both bounds against the step size for LoRA and RefLoRA, and for each iterate the
  largest step size up to which each bound stays below ``l(W_t)`` (``descent_eta``).
* ``tightness``: the bound probe at every SGD step of LoRA and RefLoRA on ``task``.
* ``real``: the same on the real sentence task (``real_task``, MiniLM; SGD at ``real_lr``,
  ten times the task's default 0.05, so that the second-order term of RefLoRA's small
  early steps stands above float32 round-off): no known ``L``, so
  the probe estimates it on each step's segment (directional curvature at ``real_points``
  points, safety ``margin``), jointly over every LoRA layer, and counts the violations.

Quick (:data:`SPEC`): at most 40 steps and 40 step sizes on ``task``; on ``vader-movies`` 3
steps (RefLoRA warms up for 1), 3 points per segment, 64 training and 16 validation
examples, no test split. Derived: ``seed`` (the first seed), ``real_task_options``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .common import (as_float, long_table, methods_or_all, series_of, single_pair, sweep_runs,
                     tolerant_probes, write_data)
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, options_for_task

__all__ = ["SPEC", "setup", "experiment", "bound_scan_experiment", "bound_tightness_experiment",
           "descent_limit"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seeds"][0], "real_task_options": {}}  # one problem instance


SPEC = NotebookSpec(
    "02_upper_bounds",
    parameters=dict(quick=False, device="cpu", seeds=[0], steps=100, iterates=[0, 30],
                    eta_min=0.0001, eta_max=1.0, n_etas=80, task="sensing",
                    real_task="vader-movies", real_steps=10, real_refactor_warmup=3,
                    real_lr=0.5, real_points=5, margin=0.1, out_dir=None),
    quick=Preset(steps=at_most(40), n_etas=at_most(40), real_steps=at_most(3),
                 real_refactor_warmup=at_most(1), real_points=at_most(3),
                 real_task_options=options_for_task("real_task", {
                     "vader-movies": {"train_examples": 64, "eval_examples": 16,
                                      "evaluate_test": False}})),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """The step-size scan and the tightness runs of LoRA and RefLoRA with the run's arguments,
    and (unless ``real_task`` is ``None``) the tightness runs on the real task."""
    common = dict(seed=run["seed"], device=run["device"], out_dir=run.out, quick=run["quick"])
    scan = bound_scan_experiment(task=run["task"], iterates=run["iterates"], n_etas=run["n_etas"],
                                 eta_range=(run["eta_min"], run["eta_max"]), **common)
    tight = bound_tightness_experiment(["lora", "reflora"], task=run["task"], steps=run["steps"],
                                       margin=run["margin"], **common)
    real = None
    if run["real_task"]:
        real = bound_tightness_experiment(
            ["lora", "reflora"], task=run["real_task"], steps=run["real_steps"],
            refactor_warmup=run["real_refactor_warmup"], lr=run["real_lr"],
            points=run["real_points"],
            margin=run["margin"], task_options=run["real_task_options"],
            name="bound_tightness_real", **common)
    return {"scan": scan, "tightness": tight, "real": real}


def descent_limit(eta: Sequence[float], values: Sequence[float], loss0: float) -> float:
    """The largest ``eta`` of the (increasing) grid up to which ``values < loss0`` holds from
    the smallest ``eta`` on: the step sizes a bound certifies as descent steps. NaN if the
    bound is not below ``loss0`` at the smallest ``eta``; the last ``eta`` if never above."""
    below = np.asarray(values, dtype=float) < loss0
    if below.size == 0 or not below[0]:
        return math.nan
    k = below.size if below.all() else int(np.argmin(below))
    return float(eta[k - 1])


def _scan_at(t, pair, etas, iterate: int) -> dict[str, Any]:
    """The F8 line scan at the task's current factors (one iterate)."""
    from ..probes import bound_line_scan

    A, B = pair.A.detach().clone(), pair.B.detach().clone()
    W0 = t.W0 if t.W0 is not None else torch.zeros(pair.shape, dtype=A.dtype)
    W = (W0 + pair.scaling * A @ B.T).detach().requires_grad_(True)
    (G,) = torch.autograd.grad(t.loss_in_W(W), W)
    scan = bound_line_scan(pair.scaling * A, B, G, t.loss_in_W, float(t.smoothness), etas, W0=W0)
    loss0 = as_float(scan["loss0"])
    entry = {"iterate": iterate, "eta": etas.tolist(), "loss_at_iterate": loss0,
             "descent_eta": {}, "violations": {}}
    for name in ("lora", "reflora"):
        entry[name] = {k: [as_float(v) for v in scan[f"{k}_{name}"]]
                       for k in ("loss", "U_exact", "U_relaxed")}
        entry["descent_eta"][name] = {k: descent_limit(etas, entry[name][k], loss0)
                                      for k in ("loss", "U_exact", "U_relaxed")}
        entry["violations"][name] = int(scan[f"violations_{name}"])
    return entry


def bound_scan_experiment(*, task: str = "mf", iterates: Sequence[int] = (0, 20),
                          eta_range=(1e-4, 1.0), n_etas: int = 60, seed: int = 0,
                          device: str = "cpu", out_dir=None, quick: bool = False) -> dict[str, Any]:
    r"""Loss and both F8 bounds against the step size at chosen iterates, LoRA vs RefLoRA.

    The iterates ``W_t`` are those of a plain-LoRA SGD run (default step size) of the
    single-layer ``task`` (``L`` known exactly). At each, for ``eta`` log-spaced over
    ``eta_range`` and for ``S = I`` (LoRA) and ``S = S*`` (RefLoRA), the probe
    :func:`reflora_analysis.probes.bound_line_scan` returns the actual loss
    ``l(W_t + dW(S, eta))``, ``U_exact(S)`` (F8a) and ``U_relaxed(S)`` (F8b).
    The analogue of the paper's ``paper-upper-bounds.png`` (linear axes, one iterate).

    Returns ``{"task", "L", "lr", "eta_ratio", "scans": [{"iterate", "loss_at_iterate",
    "eta", "lora": {"loss", "U_exact", "U_relaxed"}, "reflora": {...}, "descent_eta":
    {method: {"loss", "U_exact", "U_relaxed"}} (:func:`descent_limit`), "violations":
    {method: count}}]}`` (``eta_ratio``: the grid's ratio between neighbouring step sizes,
    the resolution of ``descent_eta``); writes ``bound_scan.csv``, ``bound_descent.csv`` and
    ``bound_scan.json``.
    """
    from ..tasks import make_task
    from ..train import run

    iterates = sorted(set(int(t) for t in iterates))
    if not iterates or iterates[0] < 0:
        raise ValueError(f"iterates must be non-negative integers, got {iterates!r}")
    lo, hi = float(eta_range[0]), float(eta_range[1])
    if not (0 < lo < hi):
        raise ValueError(f"eta_range must satisfy 0 < low < high, got {eta_range!r}")
    etas = np.geomspace(lo, hi, int(n_etas))
    t = make_task(task, seed=seed, device=device, quick=quick)
    pair = single_pair(t)
    if t.smoothness is None:
        raise ValueError(f"task {task!r} has no known smoothness constant L")
    lr = float(t.default_lr["sgd"])
    scans, done = [], 0
    for it in iterates:
        if it > done:
            run(t, "lora", optimizer="sgd", lr=lr, steps=it - done, seed=seed, device=device,
                progress=False)
            done = it
        scans.append(_scan_at(t, pair, etas, it))
    ratio = float(etas[1] / etas[0]) if len(etas) > 1 else math.nan
    data = {"task": task, "task_config": t.config, "L": t.smoothness, "lr": lr, "seed": seed,
            "eta_ratio": ratio, "scans": scans}
    rows = [(s["iterate"], name, eta, s[name]["loss"][i], s[name]["U_exact"][i],
             s[name]["U_relaxed"][i]) for s in scans for name in ("lora", "reflora")
            for i, eta in enumerate(s["eta"])]
    descent = [(s["iterate"], name, key, s["descent_eta"][name][key], ratio) for s in scans
               for name in ("lora", "reflora") for key in ("loss", "U_exact", "U_relaxed")]
    write_data(out_dir, "bound_scan", data, {
        "bound_scan": (["iterate", "method", "eta", "loss", "U_exact", "U_relaxed"], rows),
        "bound_descent": (["iterate", "method", "curve", "largest_descent_eta", "eta_ratio"],
                          descent)})
    return data


_BOUND_SERIES = {"loss": "loss", "bound_loss": "bound/loss", "next_loss": "bound/next_loss",
                 "U_exact": "bound/U_exact", "U_relaxed": "bound/U_relaxed", "L": "bound/L",
                 "L_needed": "bound/L_needed", "L_needed_roundoff": "bound/L_needed_roundoff",
                 "L_sampled": "bound/L_sampled",
                 "L_estimated": "bound/L_estimated", "violations": "bound/violations",
                 "violation_tol": "bound/violation_tol", "method_active": "bound/method_active",
                 "layers": "bound/layers"}
_TABLE_COLUMNS = ["step", "loss", "bound_loss", "next_loss", "U_exact", "U_relaxed", "L", "L_needed",
                  "L_needed_roundoff", "violations", "method_active"]


def _tightness_series(records, task=None) -> dict[str, Any]:
    out = series_of(_BOUND_SERIES, where="bound/U_exact")(records)
    probed = [r for r in records if "bound/U_exact" in r]
    return {"lr": as_float(probed[0]["lr"]) if probed else math.nan, **out}


def _smoothness_record(runs, curvature: str, points: int, margin: float) -> dict[str, Any]:
    """How the runs' ``L`` was obtained: the task's known constant, or the segment estimate."""
    flags = {float(v) for r in runs for v in r.get("L_estimated", [])}
    if flags == {0.0}:
        values = {float(v) for r in runs for v in r["L"]}
        return {"source": "known", "L": values.pop() if len(values) == 1 else math.nan}
    return {"source": "segment", "curvature": curvature, "points": points, "margin": margin}


def bound_tightness_experiment(methods: Sequence[str] = ("lora", "reflora"), *,
                               task: str = "mf", steps: int = 60, seed: int = 0,
                               device: str = "cpu", out_dir=None, quick: bool = False,
                               lr: float | None = None, refactor_warmup: int = 0,
                               curvature: str = "directional",
                               points: int = 5, margin: float = 0.1,
                               task_options: Mapping[str, Any] | None = None,
                               name: str = "bound_tightness") -> dict[str, Any]:
    r"""Per step of an SGD run: the actual next loss against ``U_exact`` and ``U_relaxed``.

    The ``bound`` probe at every step: with the task's known ``L`` (single-layer tasks) or,
    without one, ``L`` estimated on each step's segment (``curvature``, ``points``,
    ``margin``; jointly over every LoRA layer of a real model). ``lr``: the SGD step size
    (``None``: the task's default). ``refactor_warmup``: plain LoRA steps before RefLoRA acts
    (PEFT's zero start; see ``method_active``).
    Returns ``{"task", "seed", "lr", "L" (known, else None), "smoothness", "violations":
    {method: count}, "probed": {method: steps}, "runs": [{"method", "step", "loss" (the run's), "bound_loss" (the
    probe's: eval mode), "next_loss", "U_exact", "U_relaxed", "L", "L_needed", "violations", ...}]}``; writes
    ``<name>.csv`` / ``.json``.
    """
    methods = methods_or_all(list(methods))
    swept = sweep_runs(methods, task=task, steps=steps, seeds=[seed], device=device,
                       quick=quick, task_options=task_options, optimizer="sgd", lr=lr,
                       probes=lambda: tolerant_probes("bound", curvature=curvature,
                                                      points=points, margin=margin),
                       probe_every=1, refactor_warmup=refactor_warmup,
                       collect=_tightness_series)
    smooth = _smoothness_record(swept.runs, curvature, points, margin)
    lr = next((r["lr"] for r in swept.runs if "lr" in r), math.nan)
    data = {"task": task, "seed": seed, "lr": lr, "task_config": swept.task_config,
            "L": smooth.get("L") if smooth["source"] == "known" else None,
            "smoothness": smooth, "refactor_warmup": refactor_warmup,
            "violations": {r["method"]: int(np.nansum(r["violations"])) for r in swept.runs},
            "probed": {r["method"]: len(r["step"]) for r in swept.runs}, "runs": swept.runs}
    write_data(out_dir, name, data, {name: long_table(swept.runs, ["method"], _TABLE_COLUMNS)})
    return data
