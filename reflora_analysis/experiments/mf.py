r"""Notebook 01: loss and balance vs iteration on matrix factorization.

``run = mf.setup(globals())``, ``data = mf.experiment(run)``, then
:func:`reflora_analysis.plotting.publish_mf`. Quick (:data:`SPEC`): one seed.
"""

from __future__ import annotations

from typing import Any, Sequence

from .common import balance_series, long_table, methods_or_all, report_failures, sweep_runs, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, first

__all__ = ["SPEC", "setup", "experiment", "run_mf_comparison"]

SPEC = NotebookSpec(
    "01_matrix_factorization",
    parameters=dict(quick=False, device="cpu", seeds=[0, 1, 2], steps=100, methods=None,
                    lr_multipliers=[1.0, 3.0], task="mf", optimizer="sgd", out_dir=None),
    quick=Preset(seeds=first(1)))


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run: its parameters (``globals()`` of the notebook and/or keywords)
    with the quick preset applied, ``params.json`` written (:meth:`NotebookSpec.setup`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """:func:`run_mf_comparison` with the run's arguments; prints the diverged runs."""
    data = run_mf_comparison(run["methods"], lr_multipliers=run["lr_multipliers"],
                             steps=run["steps"], seeds=run["seeds"], device=run["device"],
                             task=run["task"], optimizer=run["optimizer"], out_dir=run.out,
                             quick=run["quick"])
    report_failures(data["runs"], "{method} at lr={lr:g}, seed {seed}: {message}")
    return data


def run_mf_comparison(methods: Sequence[str] | None = None, *, lr_multipliers=(1.0, 3.0),
                      steps: int = 100, seeds: Sequence[int] = (0,), device: str = "cpu",
                      task: str = "mf", optimizer: str = "sgd", out_dir=None,
                      quick: bool = False) -> dict[str, Any]:
    r"""Loss and balance vs iteration on matrix factorization, every method, two step sizes.

    The analogue of the paper's Fig. 1 (reference ``paper-matrix-factorization-loss.png``):
    ``min 1/2 ||A B^T - Y||_F^2`` from the unbalanced start of the ``mf`` task, full-batch
    SGD at ``eta = task.default_lr["sgd"] * k`` for each ``k`` in ``lr_multipliers``
    (paper: 0.01 and 0.03). Each method composes with plain SGD. The balance probe logs
    ``balance_gap(A, B) = ||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` per step.
    ``quick`` builds the task with its small settings (``make_task(quick=True)``).

    Returns ``{"task", "task_config", "optimizer", "lrs", "runs": [{"method", "lr",
    "multiplier", "seed", "status", "step", "loss", "balance_gap"}]}``; writes
    ``mf_runs.csv`` (long format) and ``mf_runs.json`` into ``out_dir``.
    """
    methods = methods_or_all(methods)
    if not lr_multipliers or any(not (k > 0) for k in lr_multipliers):
        raise ValueError(f"lr_multipliers must be positive numbers, got {lr_multipliers!r}")
    swept = sweep_runs(methods, task=task, steps=steps, seeds=seeds, device=device,
                       quick=quick, optimizer=optimizer, lr_multipliers=lr_multipliers,
                       probes="balance", probe_every=1,
                       collect=balance_series(only_probed=False))
    data = {"task": task, "task_config": swept.task_config, "optimizer": optimizer,
            "lrs": [swept.base_lr * k for k in lr_multipliers],
            "multipliers": list(lr_multipliers), "methods": methods, "seeds": list(seeds),
            "runs": swept.runs}
    write_data(out_dir, "mf_runs", data, {"mf_runs": long_table(
        swept.runs, ["method", "lr", "seed"], ["step", "loss", "balance_gap", "norm_ratio"])})
    return data
