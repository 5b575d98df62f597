r"""The statistics of one results table, one rule each: pure functions, no files, no training.

Intervals
    :func:`t_interval`: mean, sample standard deviation ``s`` (``ddof=1``) and the two-sided
    Student t interval ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` (``c = 0.95`` by default);
    :func:`paired_t_interval` the same of the differences ``values[i] - baseline[i]``;
    :func:`verdict` reads a difference's interval (``better`` / ``worse`` only when it
    excludes zero).

Metrics
    :func:`metric_direction` (``min`` for losses and errors, ``max`` otherwise) and
    :func:`default_metric` (the first of :data:`METRIC_PREFERENCE` the runs report).

Speed
    :func:`smooth_window` ``k = max(1, steps // 10)``; :func:`trailing_mean` the smoothed
    loss ``mean(losses[max(0, t-k+1) .. t])``; :func:`steps_to_reach` the first step whose
    smoothed loss is ``<= target``.

Learning-rate selection
    :func:`select_lr`: per method, on the *validation* metric: for each lr, the mean over the
    selection seeds. An lr is eligible only when every selection seed has a finished run
    with a finite metric at that lr (a diverged seed disqualifies the lr). The best eligible
    mean wins (``max`` or ``min``, see :func:`metric_direction`); exact ties go to the
    smaller lr.

:mod:`reflora_analysis.stats.comparison` combines them into the protocol's report; the
rules as a whole are in :mod:`reflora_analysis.stats`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

__all__ = ["Interval", "t_interval", "paired_t_interval", "verdict", "metric_direction",
           "bare_metric", "default_metric", "smooth_window", "trailing_mean", "steps_to_reach",
           "select_lr", "METRIC_PREFERENCE", "NAN"]

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
    name = bare_metric(metric.lower())
    return "min" if any(word in name for word in _LOWER_IS_BETTER) else "max"


def bare_metric(metric: str) -> str:
    """The metric's name without its split prefix: ``val_accuracy`` and ``test_accuracy`` ->
    ``accuracy`` (a leading ``val_`` is removed, then a leading ``test_``)."""
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            metric = metric[len(prefix):]
    return metric


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
    """Choose ``method``'s lr on ``column`` (a ``val_`` metric) over ``seeds`` (module docstring).

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
