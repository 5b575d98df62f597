"""The statistics of a sweep folder: :func:`summarize` one, or run the two-stage protocol
(:func:`tune_then_test`: choose each method's lr on validation, rerun it on fresh seeds and
report on test).

Both apply :func:`reflora_analysis.stats.compare` to the folder's results table and loss
curves and write ``summary.csv`` (:data:`reflora_analysis.stats.SUMMARY_COLUMNS`),
``summary.md`` (:func:`reflora_analysis.stats.summary_markdown`) and ``protocol.json``
(``compare``'s protocol plus the settings and the grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .. import stats
from ..io import atomic_write_json, atomic_write_text, write_csv_atomic
from .runs import run_grid
from .settings import GridSettings, check_list, check_lr, check_seed, pin_settings, prepare
from .table import load_curves, load_results, read_json_or_none

__all__ = ["summarize", "tune_then_test", "MIN_TUNE_SEEDS", "MIN_TEST_SEEDS"]

MIN_TUNE_SEEDS = 3
MIN_TEST_SEEDS = 5


def _write_summary(out_dir: Path, summary: dict, extra_protocol: Mapping | None = None) -> None:
    protocol = {**summary["protocol"], **(extra_protocol or {})}
    write_csv_atomic(out_dir / "summary.csv", stats.SUMMARY_COLUMNS,
                     ([r[c] for c in stats.SUMMARY_COLUMNS] for r in summary["rows"]))
    atomic_write_text(out_dir / "summary.md", stats.summary_markdown(summary))
    atomic_write_json(out_dir / "protocol.json", protocol)


def summarize(out_dir, *, metric: str | None = None, direction: str | None = None,
              baseline: str | None = "lora", methods: Sequence[str] | None = None,
              selection_seeds: Sequence[int] | None = None,
              report_seeds: Sequence[int] | None = None, report_split: str = "auto",
              chosen_lrs: Mapping[str, float | None] | None = None,
              confidence: float = 0.95, write: bool = True) -> dict:
    """:func:`reflora_analysis.stats.compare` on ``out_dir``'s table and loss curves.

    With ``write``, writes ``summary.csv``, ``summary.md`` and ``protocol.json`` there.
    Returns ``{"rows": [...], "protocol": {...}}``.
    """
    out_dir = Path(out_dir)
    rows = load_results(out_dir)
    if methods is not None:
        rows = [r for r in rows if r["method"] in set(methods)]
    summary = stats.compare(rows, curves=load_curves(out_dir, rows), metric=metric,
                            direction=direction, baseline=baseline, methods=methods,
                            selection_seeds=selection_seeds, report_seeds=report_seeds,
                            report_split=report_split, chosen_lrs=chosen_lrs,
                            confidence=confidence)
    if write:
        settings = read_json_or_none(out_dir / "sweep.json") or {}
        grid = {"methods": sorted({r["method"] for r in rows}),
                "lrs": sorted({r["lr"] for r in rows}), "seeds": sorted({r["seed"] for r in rows}),
                "runs": len(rows)}
        _write_summary(out_dir, summary, {"settings": settings, "grid": grid})
    return summary


def _tune(s: GridSettings, lrs: list[float], tune_seeds: list[int], metric: str | None,
          direction: str | None) -> tuple[str, str, dict[str, float | None]]:
    """Stage 1: run ``methods x lrs x tune_seeds``; per method the lr chosen on the
    validation metric (:func:`reflora_analysis.stats.select_lr`; None: no eligible lr).
    Returns (bare metric, direction, chosen lrs)."""
    rows = run_grid(s, [(m, lr, seed) for m in s.methods for lr in lrs for seed in tune_seeds])
    tune_rows = [r for r in rows
                 if r["method"] in s.methods and r["lr"] in lrs and r["seed"] in tune_seeds]
    metric = stats.bare_metric(metric if metric is not None else stats.default_metric(tune_rows))
    direction = stats.metric_direction(metric, direction)
    column = f"val_{metric}"
    if not any(column in r for r in tune_rows):
        raise ValueError(f"unknown metric {metric!r}; the runs report: "
                         f"{', '.join(sorted(k[4:] for k in tune_rows[0] if k.startswith('val_')))}")
    chosen = {m: stats.select_lr(tune_rows, m, column, direction, tune_seeds)["lr"]
              for m in s.methods}
    return metric, direction, chosen


def tune_then_test(task: str, methods: Sequence[str], lrs: Sequence[float],
                   tune_seeds: Sequence[int], test_seeds: Sequence[int], steps: int, out_dir, *,
                   optimizer: str = "adamw", jobs: int = 1, task_options: Mapping | None = None,
                   hparams: Mapping | None = None, metric: str | None = None,
                   direction: str | None = None, baseline: str = "lora",
                   report_split: str = "auto", progress: bool = True, device: str = "cpu",
                   checkpoint_every: int | None = None, confidence: float = 0.95,
                   demonstration: bool = False) -> dict:
    """The two-stage protocol; both stages resumable, all files in ``out_dir``.

    1. run ``methods x lrs x tune_seeds`` (>= 3 seeds); per method choose the lr on the
       validation metric (:func:`reflora_analysis.stats.select_lr`);
    2. run each method at its chosen lr on ``test_seeds`` (>= 5; runs already done for
       overlapping seeds are reused), and report on the test split with paired comparisons
       to ``baseline`` (:func:`reflora_analysis.stats.compare`).

    Writes ``results.*``, ``summary.csv``, ``summary.md`` and ``protocol.json`` (grid, chosen
    lrs, rules). Returns ``{"rows", "protocol"}`` as :func:`summarize`.

    ``demonstration=True`` lifts the seed minimums (at least one tune seed and the two report
    seeds an interval needs remain) for a pipeline demonstration such as a notebook's quick
    mode; ``protocol.json`` records ``"demonstration": true``: such numbers decide nothing.
    """
    lrs = check_list("lrs", lrs, check_lr)
    tune_seeds = check_list("tune_seeds", tune_seeds, check_seed)
    test_seeds = check_list("test_seeds", test_seeds, check_seed)
    if len(tune_seeds) < MIN_TUNE_SEEDS and not demonstration:
        raise ValueError(f"tune_then_test needs at least {MIN_TUNE_SEEDS} distinct tune seeds "
                         f"(--seeds), got {tune_seeds}")
    if len(test_seeds) < MIN_TEST_SEEDS and not demonstration:
        raise ValueError(f"tune_then_test needs at least {MIN_TEST_SEEDS} distinct test seeds "
                         f"(--test-seeds), got {test_seeds}")
    s = prepare(task, methods, optimizer, steps, out_dir, task_options=task_options,
                hparams=hparams, device=device, checkpoint_every=checkpoint_every, jobs=jobs,
                progress=progress)
    methods = s.methods
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {methods}")
    pin_settings(s)
    metric, direction, chosen = _tune(s, lrs, tune_seeds, metric, direction)

    # stage 2: test at the chosen lrs (a method without an eligible lr is reported as such)
    cells = [(m, chosen[m], seed) for m in methods if chosen[m] is not None for seed in test_seeds]
    rows = run_grid(s, cells)
    keep = set(cells) | {(m, lr, seed) for m in methods for lr in lrs for seed in tune_seeds}
    rows = [r for r in rows if (r["method"], r["lr"], r["seed"]) in keep]
    summary = stats.compare(rows, curves=load_curves(s.out_dir, rows), metric=metric,
                            direction=direction, baseline=baseline, methods=methods,
                            selection_seeds=tune_seeds, report_seeds=test_seeds,
                            report_split=report_split, chosen_lrs=chosen, confidence=confidence)
    settings = read_json_or_none(s.out_dir / "sweep.json") or {}
    _write_summary(s.out_dir, summary, {
        "protocol": "tune_then_test", "demonstration": bool(demonstration), "settings": settings,
        "grid": {"methods": methods, "lrs": lrs, "tune_seeds": tune_seeds,
                 "test_seeds": test_seeds, "reused_seeds": sorted(set(tune_seeds) & set(test_seeds))},
        "stages": ["1: methods x lrs x tune_seeds; lr chosen per method on validation",
                   "2: each method at its chosen lr on test_seeds; report on the report split"]})
    return summary
