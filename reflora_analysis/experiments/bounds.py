r"""Notebook 02: loss and the descent-lemma bounds (F8) vs step size, and along runs.

``run = bounds.setup(globals())``, ``data = bounds.experiment(run)`` (``{"scan",
"tightness"}``), then :func:`reflora_analysis.plotting.publish_bounds`. Quick
(:data:`SPEC`): at most 40 steps and 40 step sizes. Derived: ``seed`` (the first seed).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .common import as_float, long_table, methods_or_all, series_of, single_pair, sweep_runs, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, at_most

__all__ = ["SPEC", "setup", "experiment", "bound_scan_experiment", "bound_tightness_experiment"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seeds"][0]}  # one problem instance


SPEC = NotebookSpec(
    "02_upper_bounds",
    parameters=dict(quick=False, device="cpu", seeds=[0], steps=100, iterates=[0, 30],
                    eta_min=0.0001, eta_max=1.0, n_etas=80, task="sensing", out_dir=None),
    quick=Preset(steps=at_most(40), n_etas=at_most(40)),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """The step-size scan and the tightness runs of LoRA and RefLoRA with the run's arguments."""
    common = dict(task=run["task"], seed=run["seed"], device=run["device"], out_dir=run.out,
                  quick=run["quick"])
    scan = bound_scan_experiment(iterates=run["iterates"], n_etas=run["n_etas"],
                                 eta_range=(run["eta_min"], run["eta_max"]), **common)
    tight = bound_tightness_experiment(["lora", "reflora"], steps=run["steps"], **common)
    return {"scan": scan, "tightness": tight}


def _scan_at(t, pair, etas, iterate: int) -> dict[str, Any]:
    """The F8 line scan at the task's current factors (one iterate)."""
    from ..probes import bound_line_scan

    A, B = pair.A.detach().clone(), pair.B.detach().clone()
    W0 = t.W0 if t.W0 is not None else torch.zeros(pair.shape, dtype=A.dtype)
    W = (W0 + pair.scaling * A @ B.T).detach().requires_grad_(True)
    (G,) = torch.autograd.grad(t.loss_in_W(W), W)
    scan = bound_line_scan(pair.scaling * A, B, G, t.loss_in_W, float(t.smoothness), etas, W0=W0)
    entry = {"iterate": iterate, "eta": etas.tolist(), "loss_at_iterate": as_float(scan["loss0"])}
    for name in ("lora", "reflora"):
        entry[name] = {k: [as_float(v) for v in scan[f"{k}_{name}"]]
                       for k in ("loss", "U_exact", "U_relaxed")}
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

    Returns ``{"task", "L", "lr", "scans": [{"iterate", "loss_at_iterate", "eta", "lora":
    {"loss", "U_exact", "U_relaxed"}, "reflora": {...}}]}``; writes ``bound_scan.csv`` and
    ``bound_scan.json``.
    """
    import numpy as np

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
    data = {"task": task, "task_config": t.config, "L": t.smoothness, "lr": lr, "seed": seed,
            "scans": scans}
    rows = [(s["iterate"], name, eta, s[name]["loss"][i], s[name]["U_exact"][i],
             s[name]["U_relaxed"][i]) for s in scans for name in ("lora", "reflora")
            for i, eta in enumerate(s["eta"])]
    write_data(out_dir, "bound_scan", data, {"bound_scan": (
        ["iterate", "method", "eta", "loss", "U_exact", "U_relaxed"], rows)})
    return data


_BOUND_SERIES = {"loss": "loss", "next_loss": "bound/next_loss", "U_exact": "bound/U_exact",
                 "U_relaxed": "bound/U_relaxed"}


def _tightness_series(records, task=None) -> dict[str, Any]:
    out = series_of(_BOUND_SERIES, where="bound/U_exact")(records)
    probed = [r for r in records if "bound/U_exact" in r]
    return {"lr": as_float(probed[0]["lr"]) if probed else math.nan, **out}


def bound_tightness_experiment(methods: Sequence[str] = ("lora", "reflora"), *,
                               task: str = "mf", steps: int = 60, seed: int = 0,
                               device: str = "cpu", out_dir=None,
                               quick: bool = False) -> dict[str, Any]:
    r"""Per step of an SGD run: the actual next loss against ``U_exact`` and ``U_relaxed``.

    Uses the ``bound`` probe every step (``L`` of the task known exactly), so at every
    logged step ``l(W_{t+1}) <= U_exact <= U_relaxed`` (F8); the ratios show how tight.
    Returns ``{"runs": [{"method", "step", "loss", "next_loss", "U_exact", "U_relaxed"}]}``;
    writes ``bound_tightness.csv`` / ``.json``.
    """
    from ..tasks import make_task

    methods = methods_or_all(list(methods))
    swept = sweep_runs(methods, task=task, steps=steps, seeds=[seed], device=device,
                       quick=quick, optimizer="sgd", probes="bound", probe_every=1,
                       collect=_tightness_series)
    L = make_task(task, seed=seed, device=device, quick=quick).smoothness
    lr = next((r["lr"] for r in swept.runs if "lr" in r), math.nan)
    data = {"task": task, "seed": seed, "L": L, "lr": lr, "runs": swept.runs}
    write_data(out_dir, "bound_tightness", data, {"bound_tightness": long_table(
        swept.runs, ["method"], ["step", "loss", "next_loss", "U_exact", "U_relaxed"])})
    return data
