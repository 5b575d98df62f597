r"""Notebook 05: training loss and held-out accuracy of every method on a real model.

``run = convergence.setup(globals())``, ``data = convergence.experiment(run)``, then
:func:`reflora_analysis.plotting.publish_convergence`. Derived: ``task_overrides``
(``model_path``, ``data_path``, ``eval_examples``; ``None`` ones are left to the task).
Quick (:data:`SPEC`): at most 3 seeds and 30 steps after at most 5 warm-up steps, 64
held-out examples unless ``eval_examples`` is given.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .common import as_float, long_table, methods_or_all, report_failures, series, sweep_runs, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, fill, first

__all__ = ["SPEC", "setup", "experiment", "real_model_convergence"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"task_overrides": {k: params[k] for k in ("model_path", "data_path", "eval_examples")}}


SPEC = NotebookSpec(
    "05_real_model_convergence",
    parameters=dict(quick=False, device="cpu", seeds=[0, 1, 2], steps=300, methods=None,
                    task="nlu-minilm", optimizer="adamw", lr=None, model_path=None,
                    data_path=None, eval_examples=None, refactor_warmup=30, out_dir=None),
    quick=Preset(seeds=first(3), steps=at_most(30), refactor_warmup=at_most(5),
                 eval_examples=fill(64)),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """:func:`real_model_convergence` with the run's arguments; prints the failed runs."""
    data = real_model_convergence(run["methods"], task=run["task"], optimizer=run["optimizer"],
                                  lr=run["lr"], steps=run["steps"], seeds=run["seeds"],
                                  device=run["device"], task_overrides=run["task_overrides"],
                                  out_dir=run.out, quick=run["quick"],
                                  refactor_warmup=run["refactor_warmup"])
    report_failures(data["runs"], "{method} seed {seed}: {status}")
    return data


def _strip_eval(record: Mapping[str, Any]) -> dict[str, float]:
    return {k[5:]: as_float(v) for k, v in record.items() if k.startswith("eval/")}


def _convergence_series(records, task=None) -> dict[str, Any]:
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    return {"lr": as_float(records[0]["lr"]) if records else math.nan,
            "step": [int(r["step"]) for r in records], "loss": series(records, "loss"),
            "time": series(records, "time"),
            "eval_initial": _strip_eval(evals[0]) if evals else {},
            "eval_final": _strip_eval(evals[-1]) if evals else {}}


def real_model_convergence(methods: Sequence[str] | None = None, *, task: str = "nlu-minilm",
                           optimizer: str = "adamw", lr: float | None = None, steps: int = 200,
                           seeds: Sequence[int] = (0, 1, 2), device: str = "cpu",
                           task_overrides: Mapping[str, Any] | None = None, out_dir=None,
                           quick: bool = False, refactor_warmup: int = 0,
                           **hparams) -> dict[str, Any]:
    r"""Training loss vs step and held-out accuracy for every method over several seeds.

    ``refactor_warmup``: plain LoRA steps before RefLoRA / RefLoRA-S / Balance act (the
    PEFT start is degenerate for them; see :func:`~.common.train_records`).

    Each (method, seed) trains a fresh ``task`` (default ``nlu-minilm``: the pretrained
    MiniLM encoder with PEFT LoRA on the VADER lexicon; ``seq-cls``/``causal-lm`` with a
    ``model_path``/``data_path`` in ``task_overrides`` for GLUE / commonsense) with the
    base ``optimizer`` at the task's default step size. ``task.evaluate()`` runs at the
    first and last step. The analogue of the paper's GLUE loss curves.

    Returns ``{"runs": [{"method", "seed", "step", "loss", "eval_initial", "eval_final"}]}``;
    writes ``convergence.csv`` (per step), ``accuracy.csv`` and ``convergence.json``.
    """
    methods = methods_or_all(methods)
    swept = sweep_runs(methods, task=task, steps=steps, seeds=seeds, device=device,
                       quick=quick, task_options=task_overrides, optimizer=optimizer, lr=lr,
                       refactor_warmup=refactor_warmup, collect=_convergence_series, **hparams)
    runs = swept.runs
    data = {"task": task, "task_config": swept.task_config, "optimizer": optimizer,
            "methods": methods, "seeds": list(seeds), "steps": steps, "runs": runs}
    metrics = sorted({k for r in runs for k in r["eval_final"]})
    accuracy = ([(r["method"], r["seed"], *[r["eval_final"].get(k, math.nan) for k in metrics])
                 for r in runs])
    write_data(out_dir, "convergence", data, {
        "convergence": long_table(runs, ["method", "seed"], ["step", "loss"]),
        "accuracy": (["method", "seed", *[f"final_{k}" for k in metrics]], accuracy)})
    return data
