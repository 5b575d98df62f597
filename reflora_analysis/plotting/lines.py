r"""Helpers shared by the plotting modules: series as arrays, median lines with min-max bands."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["finite_or_nan", "as_float", "stack_rows", "line_with_band", "quiet_nanwarnings",
           "longest_steps", "mark_divergence", "auto_log", "method_line_kw"]

def finite_or_nan(values: Sequence[float]) -> np.ndarray:
    """``values`` as a float array with +-inf replaced by NaN (matplotlib breaks the line)."""
    arr = np.array([as_float(v) for v in values], dtype=float)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def as_float(v) -> float:
    """Numbers or the strict-JSON strings ``"nan"``, ``"inf"``, ``"-inf"`` as float."""
    if v is None:
        return math.nan
    return float(v)


def stack_rows(series: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of unequal length (a diverged run stops early) padded with NaN."""
    n = max((len(s) for s in series), default=0)
    out = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        out[i, :len(s)] = finite_or_nan(s)
    return out


def line_with_band(ax, x, rows: np.ndarray, *, color, label, linestyle="-", band=True,
                    positive=False):
    """Median over rows (seeds) as a line, min-max as a shaded band."""
    with np.errstate(all="ignore"), quiet_nanwarnings():
        rows = np.where(rows <= 0, np.nan, rows) if positive else rows
        mid = np.nanmedian(rows, axis=0) if len(rows) > 1 else rows[0]
        lo, hi = np.nanmin(rows, axis=0), np.nanmax(rows, axis=0)
    x = np.asarray(x[:len(mid)], dtype=float)
    (line,) = ax.plot(x, mid[:len(x)], color=color, linestyle=linestyle, label=label)
    if band and len(rows) > 1:
        ax.fill_between(x, lo[:len(x)], hi[:len(x)], color=color, alpha=0.18, linewidth=0)
    return line


class quiet_nanwarnings:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def longest_steps(runs: Sequence[Mapping]) -> list[int]:
    return max((r["step"] for r in runs), key=len, default=[])


def mark_divergence(ax, runs: Sequence[Mapping], color: str, top: float) -> bool:
    """A marker at the top edge where a run left the plot (diverged)."""
    marked = False
    for r in runs:
        if r.get("status") == "diverged" and r["step"]:
            vals = finite_or_nan(r["loss"])
            finite = np.where(np.isfinite(vals) & (vals < top))[0]
            last = r["step"][finite[-1] + 1] if len(finite) and finite[-1] + 1 < len(r["step"]) \
                else r["step"][-1]
            ax.plot([last], [top], marker="^", color=color, markersize=5, clip_on=False,
                    zorder=5, linestyle="none")
            marked = True
    return marked


def auto_log(ax, values: Iterable[float], decades: float = 1.3) -> None:
    """Log y axis when the positive values span more than ``decades`` decades, else linear
    (a log axis over a narrow range only adds unreadable tick labels)."""
    vals = np.array([v for v in values if np.isfinite(v) and v > 0])
    if vals.size and np.log10(vals.max() / vals.min()) > decades:
        ax.set_yscale("log")


def method_line_kw(method: str) -> dict:
    """Draw order and width: RefLoRA on top; Balance (identical to RefLoRA under SGD,
    BASELINES.md section 5) as a wide translucent halo under it, so both stay visible."""
    key = method.lower()
    if key == "balance":
        return {"linewidth": 3.2, "alpha": 0.55, "zorder": 2.0}
    order = {"reflora": 3.2, "reflora-s": 3.1}
    return {"zorder": order.get(key, 2.5)}
