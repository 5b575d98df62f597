r"""The comparison protocol on one sweep's results table: :func:`compare`.

On the rows of one sweep (one task, optimizer and step budget), per method:

1. the lr, chosen on the validation metric over the selection seeds
   (:func:`~reflora_analysis.stats.primitives.select_lr`; or ``chosen_lrs`` as given);
2. the report: at that lr, over the report seeds and on the report split, mean, sample std
   and t interval of the metric over the seeds whose run finished with a finite value (the
   others counted in ``n_failed`` and named in ``notes``, never imputed);
3. the paired difference to the baseline, ``d_s = metric(method, s) - metric(baseline, s)``
   over the seeds where both are finite: mean, t interval and verdict;
4. speed: steps to the baseline's smoothed final training loss of the same seed (censored
   runs enter as ``steps + 1``: the columns are then lower bounds) and the area under the
   training-loss curve, each with its paired difference to the baseline.

The rules are stated in :mod:`reflora_analysis.stats` and recorded, in words, in the
``protocol`` part of :func:`compare`'s result (written to ``protocol.json`` by the sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .primitives import (NAN, Interval, _check_confidence, _finite, _index, _usable, bare_metric,
                         default_metric, metric_direction, select_lr, smooth_window, steps_to_reach,
                         t_interval, trailing_mean, verdict)

__all__ = ["compare", "SUMMARY_COLUMNS"]

#: the columns of :func:`compare`'s rows (``summary.csv``), one row per method
SUMMARY_COLUMNS = [
    "method", "chosen_lr", "selection_metric", "selection_value", "n_selection_seeds",
    "report_metric", "n", "n_failed", "mean", "std", "ci_low", "ci_high",
    "diff_vs_baseline", "diff_ci_low", "diff_ci_high", "n_pairs", "verdict",
    "steps_to_target_mean", "steps_to_target_ci_low", "steps_to_target_ci_high", "steps_censored",
    "steps_diff_mean", "steps_diff_ci_low", "steps_diff_ci_high",
    "auc_mean", "auc_ci_low", "auc_ci_high", "auc_diff_mean", "auc_diff_ci_low", "auc_diff_ci_high",
    "notes",
]


def _interval_or_nan(values: Sequence[float], confidence: float) -> Interval:
    """t interval, or the mean with NaN bounds when fewer than 2 values are usable."""
    if len(values) >= 2:
        return t_interval(values, confidence)
    mean = float(values[0]) if values else NAN
    return Interval(mean=mean, std=NAN, low=NAN, high=NAN, half_width=NAN, n=len(values),
                    confidence=confidence)


def _unique(rows, key):
    values = sorted({r[key] for r in rows}, key=str)
    if len(values) != 1:
        raise ValueError(f"the table mixes several {key}s ({values}); compare one sweep at a time")
    return values[0]


@dataclass
class _Comparison:
    """The checked inputs of one :func:`compare` call and what its stages decide: the chosen
    lrs (``selection``), the report ``split`` and the baseline's loss ``target`` per seed."""

    rows: list[dict]
    task: Any
    optimizer: Any
    steps: int
    methods: list[str]
    baseline: str | None
    selection_seeds: list[int]
    report_seeds: list[int]
    metric: str
    direction: str
    confidence: float
    curves: Mapping[str, Sequence[float]] | None
    index: dict = field(init=False)
    selection: dict = field(default_factory=dict)
    split: str = ""
    target: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = _index(self.rows)

    @property
    def sel_col(self) -> str:
        return f"val_{self.metric}"

    @property
    def rep_col(self) -> str:
        return f"{'test' if self.split == 'test' else 'val'}_{self.metric}"

    @property
    def window(self) -> int:
        return smooth_window(self.steps)

    def cell(self, method: str, seed: int) -> Mapping | None:
        """The run of ``method`` at its chosen lr and ``seed`` (None: no lr, or no such run)."""
        lr = self.selection[method]["lr"]
        return None if lr is None else self.index.get((method, lr, seed))


def compare(rows: Sequence[Mapping], *, curves: Mapping[str, Sequence[float]] | None = None,
            metric: str | None = None, direction: str | None = None,
            baseline: str | None = "lora", methods: Sequence[str] | None = None,
            selection_seeds: Sequence[int] | None = None,
            report_seeds: Sequence[int] | None = None, report_split: str = "auto",
            chosen_lrs: Mapping[str, float | None] | None = None,
            confidence: float = 0.95) -> dict:
    """The protocol on a results table: choose lrs on validation, report on test, compare.

    Parameters
    ----------
    rows : the sweep's results (one dict per run; one task, optimizer and step budget).
    curves : ``run_id -> training losses at steps 0..steps`` for the speed columns (NaN
        without it).
    metric : bare metric name (``accuracy``; columns ``val_accuracy`` / ``test_accuracy``);
        default :func:`default_metric`. direction : ``max`` / ``min``; default
        :func:`metric_direction`.
    baseline : the method every other is paired with (must be among the methods), or None.
    methods : the methods to report, in order (default: the table's, in order of appearance).
    selection_seeds, report_seeds : default: every seed in the table (then selection and
        report share seeds and the report is optimistic; ``protocol`` says so).
    report_split : ``test``, ``validation``, or ``auto`` (test when any report row has a
        finite test value, else validation, recorded in ``protocol``).
    chosen_lrs : skip the selection and use these lrs.

    Returns ``{"rows": [one dict per method, keys SUMMARY_COLUMNS], "protocol": {...}}``.
    """
    c = _checked(rows, curves=curves, metric=metric, direction=direction, baseline=baseline,
                 methods=methods, selection_seeds=selection_seeds, report_seeds=report_seeds,
                 confidence=confidence)
    c.selection = _chosen_lrs(c, chosen_lrs)
    c.split = _report_split(c, report_split)
    c.target = _baseline_targets(c)
    out_rows, per_seed = [], {}
    for m in c.methods:
        row, per_seed[m] = _method_row(c, m)
        out_rows.append(row)
    return {"rows": out_rows, "protocol": _protocol(c, str(report_split), per_seed)}


def _checked(rows, *, curves, metric, direction, baseline, methods, selection_seeds,
             report_seeds, confidence) -> _Comparison:
    """:func:`compare`'s arguments checked against the table, defaults filled in."""
    confidence = _check_confidence(confidence)
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("the results table is empty")
    steps = int(_unique(rows, "steps"))
    task, optimizer = _unique(rows, "task"), _unique(rows, "optimizer")
    table_methods = list(dict.fromkeys(r["method"] for r in rows))
    methods = list(dict.fromkeys(methods)) if methods is not None else table_methods
    unknown = [m for m in methods if m not in table_methods]
    if unknown:
        raise ValueError(f"method(s) {unknown} have no runs in the table (it has {table_methods})")
    if baseline is not None and baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {methods}; add it or "
                         "pass baseline=None")
    all_seeds = sorted({int(r["seed"]) for r in rows})
    selection_seeds = sorted({int(s) for s in (selection_seeds if selection_seeds is not None else all_seeds)})
    report_seeds = sorted({int(s) for s in (report_seeds if report_seeds is not None else all_seeds)})
    if len(report_seeds) < 2:
        raise ValueError(f"a confidence interval needs at least 2 report seeds, got {report_seeds}")
    if not selection_seeds:
        raise ValueError("no selection seeds")
    metric = bare_metric(metric if metric is not None else default_metric(rows))
    if not any(f"val_{metric}" in r for r in rows):
        names = sorted({k[4:] for r in rows for k in r if k.startswith("val_")})
        raise ValueError(f"unknown metric {metric!r}; the table has: {', '.join(names) or '(none)'}")
    return _Comparison(rows=rows, task=task, optimizer=optimizer, steps=steps, methods=methods,
                       baseline=baseline, selection_seeds=selection_seeds, report_seeds=report_seeds,
                       metric=metric, direction=metric_direction(metric, direction),
                       confidence=confidence, curves=curves)


def _chosen_lrs(c: _Comparison, chosen_lrs: Mapping[str, float | None] | None) -> dict[str, dict]:
    """Stage 1, per method: :func:`select_lr` on validation, or the lr of ``chosen_lrs``
    (with its validation mean, and the per-lr record of the selection it replaces)."""
    selection = {}
    for m in c.methods:
        sel = select_lr(c.rows, m, c.sel_col, c.direction, c.selection_seeds)
        if chosen_lrs is not None and m in chosen_lrs:
            lr = chosen_lrs[m]
            value = next((p["mean"] for p in sel["per_lr"] if lr is not None and p["lr"] == float(lr)), NAN)
            sel = {"lr": None if lr is None else float(lr), "value": value, "per_lr": sel["per_lr"]}
        selection[m] = sel
    return selection


def _report_split(c: _Comparison, report_split: str) -> str:
    """``test`` or ``validation``; ``auto``: test when any report run has a finite test value."""
    split = str(report_split).strip().lower()
    if split not in ("auto", "test", "validation"):
        raise ValueError(f"report_split must be auto, test or validation, got {report_split!r}")
    if split == "auto":
        report_rows = [c.index.get((m, c.selection[m]["lr"], s)) for m in c.methods
                       if c.selection[m]["lr"] is not None for s in c.report_seeds]
        has_test = any(r is not None and _finite(r.get(f"test_{c.metric}")) for r in report_rows)
        split = "test" if has_test else "validation"
    return split


def _baseline_targets(c: _Comparison) -> dict[int, float]:
    """Per report seed, the baseline's smoothed final training loss at its chosen lr (empty
    without a baseline or without curves)."""
    out = {}
    if c.baseline is None or c.curves is None:
        return out
    for s in c.report_seeds:
        r = c.cell(c.baseline, s)
        if _usable(r, "smoothed_final_loss"):
            # from the curve when there is one: the table's value is rounded (10 digits),
            # and the baseline must reach its own target exactly
            curve = c.curves.get(r["run_id"])
            smoothed = trailing_mean(curve, c.window)[-1] if curve else float(r["smoothed_final_loss"])
            out[s] = smoothed if math.isfinite(smoothed) else float(r["smoothed_final_loss"])
    return out


def _method_row(c: _Comparison, m: str) -> tuple[dict, dict]:
    """One method's summary row (keys :data:`SUMMARY_COLUMNS`) and its per-seed values."""
    values, row, notes = _report_columns(c, m)
    paired, paired_notes = _paired_columns(c, m, values)
    speed, auc, speed_columns, speed_notes = _speed_columns(c, m)
    row.update(paired, **speed_columns, notes="; ".join(notes + paired_notes + speed_notes))
    seed_info = {"metric": {s: values.get(s, NAN) for s in c.report_seeds},
                 "steps_to_target": {s: speed.get(s, NAN) for s in c.report_seeds},
                 "auc_loss": {s: auc.get(s, NAN) for s in c.report_seeds}}
    return {k: row[k] for k in SUMMARY_COLUMNS}, seed_info


def _report_columns(c: _Comparison, m: str) -> tuple[dict[int, float], dict, list[str]]:
    """Stage 2: the report metric per usable seed, its mean / std / interval, and notes on the
    chosen lr (none, or at the edge of the grid) and on the seeds left out."""
    lr = c.selection[m]["lr"]
    notes = []
    values = {s: float(c.cell(m, s)[c.rep_col]) for s in c.report_seeds if _usable(c.cell(m, s), c.rep_col)}
    if lr is None:
        notes.append("no eligible lr (every lr diverged, failed or lacks seeds)")
    else:
        tried = sorted(p["lr"] for p in c.selection[m]["per_lr"])
        if len(tried) > 1 and lr in (tried[0], tried[-1]):
            edge = "smallest" if lr == tried[0] else "largest"
            notes.append(f"chosen lr is the {edge} tried: the best lr may lie outside the grid")
    missing = [s for s in c.report_seeds if lr is not None and c.cell(m, s) is None]
    failed = [s for s in c.report_seeds if c.cell(m, s) is not None and s not in values]
    if missing:
        notes.append(f"no run for seed(s) {missing}")
    if failed:
        states = sorted({str(c.cell(m, s).get("status")) for s in failed})
        notes.append(f"seed(s) {failed} excluded ({', '.join(states)} or non-finite {c.rep_col})")
    summary = _interval_or_nan(list(values.values()), c.confidence)
    row = {"method": m, "chosen_lr": lr, "selection_metric": c.sel_col,
           "selection_value": c.selection[m]["value"], "n_selection_seeds": len(c.selection_seeds),
           "report_metric": c.rep_col, "n": summary.n, "n_failed": len(failed) + len(missing),
           "mean": summary.mean, "std": summary.std, "ci_low": summary.low, "ci_high": summary.high}
    return values, row, notes


def _paired_columns(c: _Comparison, m: str, values: Mapping[int, float]) -> tuple[dict, list[str]]:
    """Stage 3: mean and t interval of ``metric(m, s) - metric(baseline, s)`` over the seeds
    where both are usable, and the verdict (``baseline`` for the baseline itself)."""
    if c.baseline is None:
        return dict(diff_vs_baseline=NAN, diff_ci_low=NAN, diff_ci_high=NAN, n_pairs=0, verdict=""), []
    if m == c.baseline:
        return dict(diff_vs_baseline=0.0, diff_ci_low=NAN, diff_ci_high=NAN, n_pairs=len(values),
                    verdict="baseline"), []
    base = {s: float(c.cell(c.baseline, s)[c.rep_col]) for s in c.report_seeds
            if _usable(c.cell(c.baseline, s), c.rep_col)}
    pairs = [s for s in c.report_seeds if s in values and s in base]
    d = _interval_or_nan([values[s] - base[s] for s in pairs], c.confidence)
    notes = [f"only {len(pairs)} seed(s) paired with {c.baseline}: no interval"] if len(pairs) < 2 else []
    return dict(diff_vs_baseline=d.mean, diff_ci_low=d.low, diff_ci_high=d.high, n_pairs=len(pairs),
                verdict=verdict(d if len(pairs) >= 2 else None, c.direction)), notes


def _speed_columns(c: _Comparison, m: str) -> tuple[dict, dict, dict, list[str]]:
    """Stage 4 for one method: steps to the baseline's target per finished seed (``inf`` if
    never; entering the interval as ``steps + 1``) and the loss AUC, each with its interval
    and its paired difference to the baseline. Returns (steps per seed, AUC per seed,
    columns, notes)."""
    finished = {s for s in c.report_seeds if _usable(c.cell(m, s), "auc_loss")}
    speed = {}
    if c.curves is not None and c.target:
        for s in sorted(finished & set(c.target)):
            curve = c.curves.get(c.cell(m, s)["run_id"])
            if curve is not None:
                speed[s] = steps_to_reach(curve, c.target[s], c.window)
    censored = [s for s, v in speed.items() if not math.isfinite(v)]
    sub = {s: (v if math.isfinite(v) else float(c.steps + 1)) for s, v in speed.items()}
    st = _interval_or_nan(list(sub.values()), c.confidence)
    auc = {s: float(c.cell(m, s)["auc_loss"]) for s in sorted(finished)}
    a = _interval_or_nan(list(auc.values()), c.confidence)
    columns = dict(steps_to_target_mean=st.mean, steps_to_target_ci_low=st.low,
                   steps_to_target_ci_high=st.high, steps_censored=len(censored),
                   auc_mean=a.mean, auc_ci_low=a.low, auc_ci_high=a.high,
                   **_speed_differences(c, m, sub, auc))
    notes = []
    if censored:
        notes.append(f"never reached {c.baseline}'s smoothed final loss on seed(s) {censored} "
                     f"(set to steps+1={c.steps + 1}: the steps columns are lower bounds)")
    return speed, auc, columns, notes


def _speed_differences(c: _Comparison, m: str, steps: Mapping[int, float],
                       auc: Mapping[int, float]) -> dict:
    """Paired (by seed) differences to the baseline of the steps to target (censored as
    ``steps + 1`` on both sides) and of the loss AUC; 0 for the baseline, NaN without one."""
    if c.baseline is None or m == c.baseline:
        same = 0.0 if m == c.baseline else NAN
        return dict(steps_diff_mean=same, steps_diff_ci_low=NAN, steps_diff_ci_high=NAN,
                    auc_diff_mean=same, auc_diff_ci_low=NAN, auc_diff_ci_high=NAN)
    base_steps = {}
    if c.curves is not None:
        for s in c.target:
            curve = c.curves.get(c.cell(c.baseline, s)["run_id"])
            if curve is not None:
                v = steps_to_reach(curve, c.target[s], c.window)
                base_steps[s] = v if math.isfinite(v) else float(c.steps + 1)
    sp = [s for s in steps if s in base_steps]
    ds = _interval_or_nan([steps[s] - base_steps[s] for s in sp], c.confidence)
    base_auc = {s: float(c.cell(c.baseline, s)["auc_loss"]) for s in c.report_seeds
                if _usable(c.cell(c.baseline, s), "auc_loss")}
    ap = [s for s in auc if s in base_auc]
    da = _interval_or_nan([auc[s] - base_auc[s] for s in ap], c.confidence)
    return dict(steps_diff_mean=ds.mean, steps_diff_ci_low=ds.low, steps_diff_ci_high=ds.high,
                auc_diff_mean=da.mean, auc_diff_ci_low=da.low, auc_diff_ci_high=da.high)


def _protocol(c: _Comparison, requested_split: str, per_seed: dict) -> dict:
    """The rules applied, in words, with the choices made (``protocol.json``)."""
    baseline, confidence, steps = c.baseline, c.confidence, c.steps
    overlap = sorted(set(c.selection_seeds) & set(c.report_seeds))
    return {
        "task": c.task, "optimizer": c.optimizer, "steps": steps, "methods": c.methods,
        "baseline": baseline, "confidence": confidence,
        "selection": {
            "split": "validation", "column": c.sel_col, "direction": c.direction,
            "seeds": c.selection_seeds,
            "rule": ("per method, the lr with the best mean validation metric over the selection "
                     "seeds; an lr is eligible only if every selection seed finished with a finite "
                     "metric; exact ties go to the smaller lr"),
            "chosen_lr": {m: c.selection[m]["lr"] for m in c.methods},
            "per_lr": {m: c.selection[m]["per_lr"] for m in c.methods},
        },
        "report": {
            "split": c.split, "column": c.rep_col, "seeds": c.report_seeds,
            "requested_split": requested_split,
            "selection_report_overlap": overlap,
            "warning": _report_warning(c.split, requested_split, overlap),
            "interval": (f"two-sided {confidence:.0%} Student t interval of the mean over seeds: "
                         "mean +- t_{(1+c)/2, n-1} s/sqrt(n), s the sample std (ddof=1); runs that "
                         "diverged or failed are excluded and counted in n_failed"),
        },
        "verdict_rule": (f"paired by seed: d = method - {baseline} on the report metric; 'better' / "
                         "'worse' only when the t interval of mean(d) excludes 0 (in the metric's "
                         "good / bad direction), else 'not separated'") if baseline else None,
        "speed": {
            "smooth_window": c.window,
            "smoothed_loss": ("mean of the last k logged training losses up to a step "
                              "(k = max(1, steps // 10); fewer at the start)"),
            "target": f"per seed, {baseline}'s smoothed final training loss at its chosen lr",
            "steps_to_target": "first step whose smoothed training loss <= the target; inf if never",
            "censoring": (f"a run that never reaches the target is censored; it enters the mean "
                          f"and interval as steps + 1 = {steps + 1}, so with steps_censored > 0 "
                          "those columns are lower bounds, not a valid interval"),
            "auc_loss": ("mean training loss over steps 0..steps (area under the curve / (steps+1)); "
                         "inf for a diverged run"),
        },
        "per_seed": per_seed,
    }


def _report_warning(split: str, requested: str, overlap: list[int]) -> str:
    warnings = []
    if split == "validation":
        why = "the task has no test split" if requested == "auto" else "as requested"
        warnings.append(f"reported on the validation metric ({why})")
    if overlap and split == "validation":
        warnings.append(f"seeds {overlap} were used both to choose the lr and to report: the "
                        "reported numbers are optimistic")
    elif overlap:
        warnings.append(f"seeds {overlap} were used both to choose the lr (validation split) and to "
                        "report (test split)")
    return "; ".join(warnings)
