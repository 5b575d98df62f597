r"""Notebook 04: sharpness over training and loss landscapes around the solutions.

``run = sharpness.setup(globals())``, ``data = sharpness.experiment(run)`` (``{"sharpness",
"sharpness_real", "landscape"}``), then
:func:`reflora_analysis.plotting.publish_sharpness_landscape`.

Derived (:func:`_derive`): ``seed`` (the first seed) and the real model's probe settings,
``real_trace_samples = max(3, trace_samples // 2)`` and ``real_tol = max(tol, 0.01)``
(its Hessian-vector products are the expensive part). Quick (:data:`SPEC`): at most 100
steps probed every >= 10, at most 6 Hutch++ samples, 21 x 11 landscape points, 3 real-model
steps probed at the last, 64 held-out examples on ``nlu-minilm``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .common import as_float, long_table, methods_or_all, series_of, sweep_runs, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, at_least, at_most, options_for_task

__all__ = ["SPEC", "setup", "experiment", "sharpness_over_training", "landscape_experiment"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seeds"][0],
            "real_trace_samples": max(3, params["trace_samples"] // 2),
            "real_tol": max(params["tol"], 0.01), "real_task_options": {}}


SPEC = NotebookSpec(
    "04_sharpness_landscape",
    parameters=dict(quick=False, device="cpu", seeds=[0], steps=300, probe_every=20,
                    methods=["lora", "reflora", "balance"], task="mf", trace_samples=30,
                    tol=0.001, real_task="nlu-minilm", real_steps=100, real_probe_every=20,
                    real_refactor_warmup=10, normalization="rank", span=1.0, n_points=41,
                    n_grid=21, out_dir=None),
    quick=Preset(steps=at_most(100), probe_every=at_least(10), real_steps=at_most(3),
                 real_probe_every=at_most(3), real_refactor_warmup=at_most(1),
                 trace_samples=at_most(6), n_points=at_most(21), n_grid=at_most(11),
                 real_task_options=options_for_task(
                     "real_task", {"nlu-minilm": {"eval_examples": 64}})),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """Sharpness on ``task`` and (``real_task`` not ``None``) on the real model, then the
    landscapes on ``task``, with the run's arguments."""
    base = dict(seed=run["seed"], device=run["device"], out_dir=run.out, quick=run["quick"])
    sharp = sharpness_over_training(run["methods"], task=run["task"], steps=run["steps"],
                                    probe_every=run["probe_every"], tol=run["tol"],
                                    trace_samples=run["trace_samples"], name="sharpness", **base)
    real = None
    if run["real_task"]:
        real = sharpness_over_training(
            run["methods"], task=run["real_task"], optimizer="adamw", steps=run["real_steps"],
            probe_every=run["real_probe_every"], trace_samples=run["real_trace_samples"],
            tol=run["real_tol"], name="sharpness_real", task_overrides=run["real_task_options"],
            refactor_warmup=run["real_refactor_warmup"], **base)
    land = landscape_experiment(run["methods"], task=run["task"], steps=run["steps"],
                                span=run["span"], n_points=run["n_points"],
                                n_grid=run["n_grid"], normalization=run["normalization"], **base)
    return {"sharpness": sharp, "sharpness_real": real, "landscape": land}


_SHARPNESS_SERIES = {"loss": "loss", "top_eigenvalue": "sharpness/lambda_max",
                     "trace": "sharpness/trace", "trace_stderr": "sharpness/trace_se",
                     "hvps": "sharpness/hvps", "seconds": "sharpness/seconds"}


def sharpness_over_training(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                            optimizer: str = "sgd", steps: int = 100, probe_every: int = 10,
                            seed: int = 0, device: str = "cpu", trace_samples: int = 30,
                            tol: float = 1e-3, lr: float | None = None, out_dir=None,
                            name: str = "sharpness", quick: bool = False,
                            task_overrides: Mapping[str, Any] | None = None,
                            refactor_warmup: int = 0) -> dict[str, Any]:
    r"""Top Hessian eigenvalue and trace (w.r.t. the LoRA parameters) over training.

    ``lambda_max`` by Lanczos on Hessian-vector products stopped at relative residual
    ``tol``, the trace by Hutch++ with ``trace_samples`` products and its standard error
    (:mod:`reflora_analysis.probes.sharpness`), every ``probe_every`` steps on the batch of
    that step. At a balanced minimiser of ``mf`` theory gives ``lambda_max = 2 sigma_1(Y)``
    (F9), the flattest among all factorizations of the same product.

    Returns ``{"runs": [{"method", "step", "loss", "top_eigenvalue", "trace",
    "trace_stderr"}], "reference": {"two_sigma1_Y": ...}}``; writes ``<name>.csv``/``.json``.
    """
    from ..probes import make_probes
    from ..tasks import make_task

    methods = methods_or_all(list(methods))
    swept = sweep_runs(
        methods, task=task, steps=steps, seeds=[seed], device=device, quick=quick,
        task_options=task_overrides, optimizer=optimizer, lr=lr, probe_every=probe_every,
        probes=lambda: make_probes("sharpness", tol=tol, trace_samples=trace_samples, seed=seed),
        refactor_warmup=refactor_warmup,
        collect=series_of(_SHARPNESS_SERIES, where="sharpness/lambda_max"))
    reference = {}
    if task == "mf":
        sigma = _mf_target_sigma1(make_task(task, seed=seed, device=device, quick=quick))
        if sigma is not None:
            reference["two_sigma1_Y"] = 2 * sigma
    data = {"task": task, "optimizer": optimizer, "seed": seed, "runs": swept.runs,
            "reference": reference}
    write_data(out_dir, name, data, {name: long_table(
        swept.runs, ["method"], ["step", "loss", "top_eigenvalue", "trace", "trace_stderr"])})
    return data


def _mf_target_sigma1(task) -> float | None:
    """sigma_1 of the mf target: the minimiser of 1/2||W - Y||^2 is Y = W at G = 0."""
    if task.loss_in_W is None:
        return None
    m, n = task.pairs[0].shape
    W = torch.zeros(m, n, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(task.loss_in_W(W), W)
    Y = -g  # G = W - Y at W = 0
    return float(torch.linalg.matrix_norm(Y, ord=2))


def _landscape_series(*, steps: int, seed: int, span: float, n_points: int, n_grid: int,
                      normalization: str):
    """A collector: 1-D and 2-D loss slices around the trained task's solution."""
    from ..probes import loss_landscape

    def collect(records, t) -> dict[str, Any]:
        batch = t.batch(steps)
        closure = lambda: t.loss(batch)  # noqa: E731
        kw = dict(directions="random", normalization=normalization, extent=span, seed=seed,
                  pairs=t.pairs)
        one = loss_landscape(t.model, closure, dims=1, n_points=n_points, **kw)
        two = loss_landscape(t.model, closure, dims=2, n_points=n_grid, **kw)
        return {"final_loss": as_float(records[-1]["loss"]) if records else math.nan,
                "centre_loss": as_float(one["centre_loss"]),
                "offsets": [as_float(x) for x in one["grid"]],
                "loss_1d": [as_float(x) for x in one["loss"]],
                "grid": [as_float(x) for x in two["grid"]],
                "loss_2d": [[as_float(x) for x in row] for row in two["loss"]],
                "flat": bool(one["flat"] or two["flat"])}
    return collect


def landscape_experiment(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                         optimizer: str = "sgd", steps: int = 100, seed: int = 0,
                         device: str = "cpu", span: float = 1.0, n_points: int = 41,
                         n_grid: int = 21, normalization: str = "delta-w",
                         lr: float | None = None, out_dir=None,
                         quick: bool = False) -> dict[str, Any]:
    r"""1-D and 2-D loss slices around the solution each method reaches.

    After ``steps`` of training (same task instance and start for every method), the
    landscape probe evaluates ``l(theta + a d1)`` on ``n_points`` offsets in
    ``[-span, span]`` and ``l(theta + a d1 + b d2)`` on an ``n_grid x n_grid`` grid, with
    random directions normalised in ``normalization`` mode (``"delta-w"``: directions
    in the product space, invariant to every refactoring; ``"rank"``/``"filter"``: see
    :mod:`reflora_analysis.probes.landscape`). The same direction seed for every method.

    Returns ``{"runs": [{"method", "offsets", "loss_1d", "grid", "loss_2d", "center_loss"}]}``;
    writes ``landscape.json`` and ``landscape_1d.csv``.
    """
    methods = methods_or_all(list(methods))
    swept = sweep_runs(methods, task=task, steps=steps, seeds=[seed], device=device,
                       quick=quick, optimizer=optimizer, lr=lr,
                       collect=_landscape_series(steps=steps, seed=seed, span=span,
                                                 n_points=n_points, n_grid=n_grid,
                                                 normalization=normalization))
    data = {"task": task, "seed": seed, "span": span, "normalization": normalization,
            "steps": steps, "runs": swept.runs}
    write_data(out_dir, "landscape", data, {"landscape_1d": long_table(
        swept.runs, ["method"], ["offsets", "loss_1d"], names=["offset", "loss"])})
    return data
