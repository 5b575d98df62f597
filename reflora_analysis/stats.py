r"""Statistics of a sweep's results table: pure functions, no files, no training.

Everything here takes the rows that :mod:`reflora_analysis.sweep` writes (``results.json``:
one dict per run) and, for the speed comparison, the runs' training-loss curves. The rules
below are the comparison protocol; :func:`compare` records them in its ``protocol`` output.

Intervals
    :func:`t_interval`: mean, sample standard deviation ``s`` (``ddof=1``) and the two-sided
    Student t interval ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` (``c = 0.95`` by default).
    Needs ``n >= 2`` finite values (``ValueError`` otherwise).

Learning-rate selection (:func:`select_lr`)
    Per method, on the *validation* metric: for each lr, the mean over the selection seeds.
    An lr is eligible only when every selection seed has a finished run with a finite
    metric at that lr (a diverged seed disqualifies the lr). The best eligible mean wins
    (``max`` or ``min``, see :func:`metric_direction`); exact ties go to the smaller lr.

Report (:func:`compare`)
    At the chosen lr, on the report seeds and the report split (``test``; see ``report_split``):
    mean, std and t interval over the seeds whose run finished with a finite metric (the
    others are counted in ``n_failed`` and named in ``notes``, never imputed).

Paired difference to the baseline (``lora``)
    ``d_s = metric(method, seed s) - metric(baseline, seed s)`` over the report seeds where
    both are finite; mean and t interval of ``d``. ``verdict`` is ``better`` / ``worse`` only
    when the interval excludes zero (in the metric's good / bad direction), else
    ``not separated`` (also when fewer than 2 pairs exist).

Speed
    * smoothed training loss at step ``t``: the mean of the last ``k`` logged losses up to
      ``t`` (fewer at the start), ``k = smooth_window(steps) = max(1, steps // 10)``; the
      smoothed *final* loss is its value at the last step;
    * target, per seed: the baseline's smoothed final loss (at the baseline's chosen lr);
      ``steps to target`` of a run: the first step at which its smoothed loss is ``<=`` the
      target of the same seed (the baseline itself reaches it by the last step), ``inf`` if
      never (censored);
    * censoring: a censored run's true time is ``> steps``; the interval is computed with
      such runs set to ``steps + 1``, so with ``steps_censored > 0`` the mean and interval
      are lower bounds (Markdown shows them with ``>=``), not a valid interval;
    * area under the training-loss curve, ``auc_loss``: mean loss over steps ``0..steps``
      (a diverged run's is ``inf``); mean with interval, and the paired difference to the
      baseline with its interval.
    Only runs that finished are used; diverged or failed runs at the chosen lr are counted
    in ``n_failed``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "Interval",
    "t_interval",
    "paired_t_interval",
    "verdict",
    "metric_direction",
    "default_metric",
    "smooth_window",
    "trailing_mean",
    "steps_to_reach",
    "select_lr",
    "compare",
    "summary_markdown",
    "SUMMARY_COLUMNS",
]

NAN = float("nan")

#: bare metric names tried in order when no metric is given (first present with a value wins)
METRIC_PREFERENCE = ("accuracy", "f1", "matthews_correlation", "exact_match", "test_loss",
                     "relative_error", "loss")
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "ppl", "mse", "rmse", "mae")


@dataclass(frozen=True)
class Interval:
    """Mean, sample std (``ddof=1``) and the two-sided t interval ``[low, high]`` of ``n`` values."""

    mean: float
    std: float
    low: float
    high: float
    half_width: float
    n: int
    confidence: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
            or not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    return float(confidence)


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Student t interval of the mean of ``values`` (``n >= 2`` finite numbers).

    ``half_width = t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation. ``ValueError`` for fewer than 2 values or a non-finite one.
    """
    confidence = _check_confidence(confidence)
    xs = [float(v) for v in values]
    if len(xs) < 2:
        raise ValueError(f"a t interval needs at least 2 values (seeds), got {len(xs)}")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ValueError(f"t_interval: non-finite value(s) {bad}; drop or censor them first")
    from scipy import stats as _st
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(_st.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean=mean, std=std, low=mean - half, high=mean + half, half_width=half, n=n,
                    confidence=confidence)


def paired_t_interval(values: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> Interval:
    """t interval of the paired differences ``values[i] - baseline[i]``."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values differ in length: {len(values)} vs {len(baseline)}")
    return t_interval([a - b for a, b in zip(values, baseline)], confidence)


def _direction(direction) -> str:
    text = str(direction).strip().lower()
    if text in ("max", "higher", "maximize", "maximise"):
        return "max"
    if text in ("min", "lower", "minimize", "minimise"):
        return "min"
    raise ValueError(f"direction must be 'max' (higher is better) or 'min' (lower is better), "
                     f"got {direction!r}")


def metric_direction(metric: str, direction: str | None = None) -> str:
    """``"max"`` or ``"min"``: ``direction`` if given, else ``min`` for names containing
    loss / error / perplexity / ppl / mse / rmse / mae, ``max`` otherwise (accuracy, f1...)."""
    if direction is not None:
        return _direction(direction)
    name = metric.lower()
    for prefix in ("val_", "test_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return "min" if any(word in name for word in _LOWER_IS_BETTER) else "max"


def verdict(diff: Interval | None, direction: str) -> str:
    """``better`` / ``worse`` when the interval of (method - baseline) excludes zero, else
    ``not separated``."""
    direction = _direction(direction)
    if diff is None or not (math.isfinite(diff.low) and math.isfinite(diff.high)) \
            or not diff.excludes_zero():
        return "not separated"
    good = diff.low > 0 if direction == "max" else diff.high < 0
    return "better" if good else "worse"


def default_metric(rows: Sequence[Mapping]) -> str:
    """The bare metric name used when none is given: the first of :data:`METRIC_PREFERENCE`
    with a finite ``val_`` value in ``rows``, else the alphabetically first ``val_`` column."""
    names = sorted({k[4:] for r in rows for k in r if k.startswith("val_")})
    finite = [n for n in names if any(_finite(r.get(f"val_{n}")) for r in rows)]
    for name in METRIC_PREFERENCE:
        if name in finite:
            return name
    if finite:
        return finite[0]
    raise ValueError("no run has a finite validation metric; nothing to select on")


def smooth_window(steps: int) -> int:
    """``k`` of the smoothed training loss: ``max(1, steps // 10)`` logged steps."""
    return max(1, int(steps) // 10)


def trailing_mean(losses: Sequence[float], window: int) -> list[float]:
    """``out[t] = mean(losses[max(0, t-window+1) .. t])`` (non-finite values propagate)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for t in range(len(losses)):
        chunk = losses[max(0, t - window + 1):t + 1]
        out.append(math.fsum(chunk) / len(chunk) if all(math.isfinite(v) for v in chunk)
                   else (math.inf if not any(math.isnan(v) for v in chunk) else NAN))
    return out


def steps_to_reach(losses: Sequence[float], target: float, window: int) -> float:
    """First step ``t`` (index into ``losses``, one value per step) at which the trailing
    ``window``-mean of the loss is ``<= target``; ``inf`` if never."""
    if not _finite(target):
        return NAN
    for t, value in enumerate(trailing_mean(losses, window)):
        if value <= target:  # NaN compares False
            return float(t)
    return math.inf


# ---- the table ---------------------------------------------------------------------------

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _index(rows: Sequence[Mapping]) -> dict[tuple, Mapping]:
    return {(r["method"], float(r["lr"]), int(r["seed"])): r for r in rows}


def _usable(row: Mapping | None, column: str) -> bool:
    return row is not None and row.get("status") == "finished" and _finite(row.get(column))


def select_lr(rows: Sequence[Mapping], method: str, column: str, direction: str,
              seeds: Sequence[int]) -> dict:
    """Choose ``method``'s lr on ``column`` (a ``val_`` metric) over ``seeds``; see the module doc.

    Returns ``{"lr": float | None, "value": mean at that lr, "per_lr": [{"lr", "mean", "n",
    "eligible", "reason"}, ...]}`` (``lr`` None when no lr is eligible).
    """
    direction = _direction(direction)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("select_lr: no selection seeds")
    index = _index(rows)
    lrs = sorted({float(r["lr"]) for r in rows if r["method"] == method})
    per_lr, best = [], None
    for lr in lrs:
        cells = {s: index.get((method, lr, s)) for s in seeds}
        missing = [s for s, r in cells.items() if r is None]
        bad = [s for s, r in cells.items() if r is not None and not _usable(r, column)]
        vals = [cells[s][column] for s in seeds if _usable(cells[s], column)]
        mean = math.fsum(vals) / len(vals) if vals else NAN
        reason = ""
        if missing:
            reason = f"no run for seed(s) {missing}"
        elif bad:
            states = sorted({str(cells[s].get("status")) for s in bad})
            reason = f"seed(s) {bad} not usable ({', '.join(states)} or non-finite {column})"
        per_lr.append({"lr": lr, "mean": mean, "n": len(vals), "eligible": not reason,
                       "reason": reason})
        if not reason:
            better = best is None or (mean > best["mean"] if direction == "max" else mean < best["mean"])
            if better:  # strict: an exact tie keeps the smaller lr (lrs ascend)
                best = per_lr[-1]
    return {"lr": best["lr"] if best else None, "value": best["mean"] if best else NAN,
            "per_lr": per_lr}


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
    metric = metric if metric is not None else default_metric(rows)
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            metric = metric[len(prefix):]
    if not any(f"val_{metric}" in r for r in rows):
        names = sorted({k[4:] for r in rows for k in r if k.startswith("val_")})
        raise ValueError(f"unknown metric {metric!r}; the table has: {', '.join(names) or '(none)'}")
    direction = metric_direction(metric, direction)
    sel_col = f"val_{metric}"

    # ---- stage 1: the lr of each method on validation -----------------------------------
    selection = {}
    for m in methods:
        if chosen_lrs is not None and m in chosen_lrs:
            lr = chosen_lrs[m]
            sel = select_lr(rows, m, sel_col, direction, selection_seeds)
            value = next((p["mean"] for p in sel["per_lr"] if lr is not None and p["lr"] == float(lr)), NAN)
            selection[m] = {"lr": None if lr is None else float(lr), "value": value, "per_lr": sel["per_lr"]}
        else:
            selection[m] = select_lr(rows, m, sel_col, direction, selection_seeds)

    # ---- the report split -----------------------------------------------------------------
    index = _index(rows)
    split = str(report_split).strip().lower()
    if split not in ("auto", "test", "validation"):
        raise ValueError(f"report_split must be auto, test or validation, got {report_split!r}")
    if split == "auto":
        report_rows = [index.get((m, selection[m]["lr"], s)) for m in methods
                       if selection[m]["lr"] is not None for s in report_seeds]
        has_test = any(r is not None and _finite(r.get(f"test_{metric}")) for r in report_rows)
        split = "test" if has_test else "validation"
    rep_col = f"{'test' if split == 'test' else 'val'}_{metric}"
    overlap = sorted(set(selection_seeds) & set(report_seeds))

    # ---- per-seed values at the chosen lr --------------------------------------------------
    def cell(m, s):
        lr = selection[m]["lr"]
        return None if lr is None else index.get((m, lr, s))

    def targets():
        out = {}
        if baseline is None or curves is None:
            return out
        for s in report_seeds:
            r = cell(baseline, s)
            if _usable(r, "smoothed_final_loss"):
                # from the curve when there is one: the table's value is rounded (10 digits),
                # and the baseline must reach its own target exactly
                curve = curves.get(r["run_id"])
                smoothed = trailing_mean(curve, window)[-1] if curve else float(r["smoothed_final_loss"])
                out[s] = smoothed if math.isfinite(smoothed) else float(r["smoothed_final_loss"])
        return out

    window = smooth_window(steps)
    target = targets()
    per_seed: dict[str, dict] = {}
    out_rows = []
    for m in methods:
        lr = selection[m]["lr"]
        notes = []
        values = {s: float(cell(m, s)[rep_col]) for s in report_seeds if _usable(cell(m, s), rep_col)}
        if lr is None:
            notes.append("no eligible lr (every lr diverged, failed or lacks seeds)")
        else:
            tried = sorted(p["lr"] for p in selection[m]["per_lr"])
            if len(tried) > 1 and lr in (tried[0], tried[-1]):
                edge = "smallest" if lr == tried[0] else "largest"
                notes.append(f"chosen lr is the {edge} tried: the best lr may lie outside the grid")
        missing = [s for s in report_seeds if lr is not None and cell(m, s) is None]
        failed = [s for s in report_seeds if cell(m, s) is not None and s not in values]
        if missing:
            notes.append(f"no run for seed(s) {missing}")
        if failed:
            states = sorted({str(cell(m, s).get("status")) for s in failed})
            notes.append(f"seed(s) {failed} excluded ({', '.join(states)} or non-finite {rep_col})")
        summary = _interval_or_nan(list(values.values()), confidence)
        row = {"method": m, "chosen_lr": lr, "selection_metric": sel_col,
               "selection_value": selection[m]["value"], "n_selection_seeds": len(selection_seeds),
               "report_metric": rep_col, "n": summary.n, "n_failed": len(failed) + len(missing),
               "mean": summary.mean, "std": summary.std, "ci_low": summary.low,
               "ci_high": summary.high}
        seed_info = {"metric": {s: values.get(s, NAN) for s in report_seeds}}

        # paired difference on the report metric
        if baseline is None:
            row.update(diff_vs_baseline=NAN, diff_ci_low=NAN, diff_ci_high=NAN, n_pairs=0,
                       verdict="")
        elif m == baseline:
            row.update(diff_vs_baseline=0.0, diff_ci_low=NAN, diff_ci_high=NAN,
                       n_pairs=len(values), verdict="baseline")
        else:
            base = {s: float(cell(baseline, s)[rep_col]) for s in report_seeds
                    if _usable(cell(baseline, s), rep_col)}
            pairs = [s for s in report_seeds if s in values and s in base]
            d = _interval_or_nan([values[s] - base[s] for s in pairs], confidence)
            row.update(diff_vs_baseline=d.mean, diff_ci_low=d.low, diff_ci_high=d.high,
                       n_pairs=len(pairs), verdict=verdict(d if len(pairs) >= 2 else None, direction))
            if len(pairs) < 2:
                notes.append(f"only {len(pairs)} seed(s) paired with {baseline}: no interval")

        # speed: steps to the baseline's smoothed final loss, and AUC
        finished = {s for s in report_seeds if _usable(cell(m, s), "auc_loss")}
        speed = {}
        if curves is not None and target:
            for s in sorted(finished & set(target)):
                curve = curves.get(cell(m, s)["run_id"])
                if curve is not None:
                    speed[s] = steps_to_reach(curve, target[s], window)
        censored = [s for s, v in speed.items() if not math.isfinite(v)]
        sub = {s: (v if math.isfinite(v) else float(steps + 1)) for s, v in speed.items()}
        st = _interval_or_nan(list(sub.values()), confidence)
        row.update(steps_to_target_mean=st.mean, steps_to_target_ci_low=st.low,
                   steps_to_target_ci_high=st.high, steps_censored=len(censored))
        if censored:
            notes.append(f"never reached {baseline}'s smoothed final loss on seed(s) {censored} "
                         f"(set to steps+1={steps + 1}: the steps columns are lower bounds)")
        auc = {s: float(cell(m, s)["auc_loss"]) for s in sorted(finished)}
        a = _interval_or_nan(list(auc.values()), confidence)
        row.update(auc_mean=a.mean, auc_ci_low=a.low, auc_ci_high=a.high)
        if baseline is None or m == baseline:
            row.update(steps_diff_mean=0.0 if m == baseline else NAN, steps_diff_ci_low=NAN,
                       steps_diff_ci_high=NAN, auc_diff_mean=0.0 if m == baseline else NAN,
                       auc_diff_ci_low=NAN, auc_diff_ci_high=NAN)
        else:
            base_speed = {}
            if curves is not None:
                for s in target:
                    r = cell(baseline, s)
                    curve = curves.get(r["run_id"])
                    if curve is not None:
                        v = steps_to_reach(curve, target[s], window)
                        base_speed[s] = v if math.isfinite(v) else float(steps + 1)
            sp = [s for s in sub if s in base_speed]
            ds = _interval_or_nan([sub[s] - base_speed[s] for s in sp], confidence)
            base_auc = {s: float(cell(baseline, s)["auc_loss"]) for s in report_seeds
                        if _usable(cell(baseline, s), "auc_loss")}
            ap = [s for s in auc if s in base_auc]
            da = _interval_or_nan([auc[s] - base_auc[s] for s in ap], confidence)
            row.update(steps_diff_mean=ds.mean, steps_diff_ci_low=ds.low, steps_diff_ci_high=ds.high,
                       auc_diff_mean=da.mean, auc_diff_ci_low=da.low, auc_diff_ci_high=da.high)
        seed_info["steps_to_target"] = {s: speed.get(s, NAN) for s in report_seeds}
        seed_info["auc_loss"] = {s: auc.get(s, NAN) for s in report_seeds}
        per_seed[m] = seed_info
        row["notes"] = "; ".join(notes)
        out_rows.append({k: row[k] for k in SUMMARY_COLUMNS})

    protocol = {
        "task": task, "optimizer": optimizer, "steps": steps, "methods": methods,
        "baseline": baseline, "confidence": confidence,
        "selection": {
            "split": "validation", "column": sel_col, "direction": direction,
            "seeds": selection_seeds,
            "rule": ("per method, the lr with the best mean validation metric over the selection "
                     "seeds; an lr is eligible only if every selection seed finished with a finite "
                     "metric; exact ties go to the smaller lr"),
            "chosen_lr": {m: selection[m]["lr"] for m in methods},
            "per_lr": {m: selection[m]["per_lr"] for m in methods},
        },
        "report": {
            "split": split, "column": rep_col, "seeds": report_seeds,
            "requested_split": str(report_split),
            "selection_report_overlap": overlap,
            "warning": _report_warning(split, str(report_split), overlap),
            "interval": (f"two-sided {confidence:.0%} Student t interval of the mean over seeds: "
                         "mean +- t_{(1+c)/2, n-1} s/sqrt(n), s the sample std (ddof=1); runs that "
                         "diverged or failed are excluded and counted in n_failed"),
        },
        "verdict_rule": (f"paired by seed: d = method - {baseline} on the report metric; 'better' / "
                         "'worse' only when the t interval of mean(d) excludes 0 (in the metric's "
                         "good / bad direction), else 'not separated'") if baseline else None,
        "speed": {
            "smooth_window": window,
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
    return {"rows": out_rows, "protocol": protocol}


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


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{digits}g}"
    return str(x)


def summary_markdown(summary: dict) -> str:
    """A Markdown page: one table row per method, then the rules of :func:`compare`."""
    p = summary["protocol"]
    conf = f"{p['confidence']:.0%}"
    lines = [f"# {p['task']}: {', '.join(p['methods'])} ({p['optimizer']}, {p['steps']} steps)", ""]
    lines.append(f"| method | lr | {p['report']['column']} mean ± sd [{conf} CI] | n | "
                 f"Δ vs {p['baseline']} [{conf} CI] | verdict | steps to {p['baseline']}'s loss "
                 f"[{conf} CI] | loss AUC [{conf} CI] | Δ AUC [{conf} CI] |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        ge = "≥ " if r["steps_censored"] else ""
        failed = f" ({r['n_failed']} failed)" if r["n_failed"] else ""
        censored = f" ({r['steps_censored']} censored)" if r["steps_censored"] else ""
        lines.append(
            f"| {r['method']} | {_fmt(r['chosen_lr'])} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} "
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['n']}"
            f"{failed} | "
            f"{_fmt(r['diff_vs_baseline'])} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}] | "
            f"{r['verdict'] or '–'} | {ge}{_fmt(r['steps_to_target_mean'])} "
            f"[{_fmt(r['steps_to_target_ci_low'])}, {_fmt(r['steps_to_target_ci_high'])}]"
            f"{censored} | "
            f"{_fmt(r['auc_mean'])} [{_fmt(r['auc_ci_low'])}, {_fmt(r['auc_ci_high'])}] | "
            f"{_fmt(r['auc_diff_mean'])} [{_fmt(r['auc_diff_ci_low'])}, {_fmt(r['auc_diff_ci_high'])}] |")
    notes = [f"- {r['method']}: {r['notes']}" for r in summary["rows"] if r["notes"]]
    sel, rep = p["selection"], p["report"]
    lines += ["", "## Protocol", "",
              f"- lr selection: {sel['rule']}; column `{sel['column']}` ({sel['direction']}), "
              f"seeds {sel['seeds']}.",
              f"- report: `{rep['column']}` on seeds {rep['seeds']}; {rep['interval']}."]
    if rep["warning"]:
        lines.append(f"- **note**: {rep['warning']}.")
    if p.get("verdict_rule"):
        lines.append(f"- verdict: {p['verdict_rule']}.")
    sp = p["speed"]
    lines += [f"- smoothed loss: {sp['smoothed_loss']}; steps to target: {sp['steps_to_target']} "
              f"(target: {sp['target']}).",
              f"- censoring: {sp['censoring']}.",
              f"- loss AUC: {sp['auc_loss']}."]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
