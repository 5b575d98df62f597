r"""Figures of notebook 05: training loss and held-out accuracy on a real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .lines import line_with_band, longest_steps, stack_rows
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['plot_convergence', 'publish_convergence']

def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return y
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1): i + 1]
        seg = seg[np.isfinite(seg)]
        out[i] = seg.mean() if seg.size else np.nan
    return out


def plot_convergence(data: Mapping[str, Any], *, smooth: int | None = None,
                     metric: str = "accuracy"):
    """Left: training loss vs step (running mean over ``smooth`` steps per seed; line =
    median over seeds, band = min-max); right: held-out ``metric`` after training per
    method (bar = mean, dots = seeds, dotted line = before training)."""
    runs = data["runs"]
    steps = max((len(r["step"]) for r in runs), default=1)
    smooth = smooth if smooth is not None else max(1, steps // 15)
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.6),
                                  gridspec_kw={"width_ratios": [1.6, 1]})
    for method in data["methods"]:
        sel = [r for r in runs if r["method"] == method]
        if not sel:
            continue
        rows = np.stack([_running_mean(r, smooth) for r in stack_rows([r["loss"] for r in sel])])
        line_with_band(ax, longest_steps(sel), rows, color=method_color(method),
                        label=method_label(method))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy)" + (f"\n{smooth}-step running mean" if smooth > 1 else ""))
    ax.set_title(f"{data.get('task')}, {data.get('optimizer')}, seeds {data.get('seeds')}")
    handles, labels_ = ax.get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=4, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    xs, labels, initial = [], [], []
    for i, method in enumerate(data["methods"]):
        vals = [r["eval_final"].get(metric, np.nan) for r in runs if r["method"] == method]
        init = [r["eval_initial"].get(metric, np.nan) for r in runs if r["method"] == method]
        vals = [v for v in vals if np.isfinite(v)]
        if not vals:
            continue
        axb.bar(i, np.mean(vals), color=method_color(method), width=0.7, alpha=0.85)
        axb.plot([i] * len(vals), vals, "o", markerfacecolor="white", markeredgecolor="0.1",
                 markeredgewidth=0.7, markersize=3, linestyle="none")
        xs.append(i)
        labels.append(method_label(method))
        initial.extend(v for v in init if np.isfinite(v))
    if initial:
        axb.axhline(float(np.mean(initial)), color="0.4", linestyle=":", linewidth=0.9,
                    label="before training")
        axb.legend(fontsize=6, loc="lower right")
    finals = [r["eval_final"].get(metric, np.nan) for r in runs]
    finite = [v for v in finals + initial if np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.02, (hi - lo) * 0.15)
        axb.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1 else hi + pad)
    axb.set_xticks(xs)
    axb.set_xticklabels(labels, rotation=45, ha="right")
    axb.set_ylabel(f"held-out {metric}")
    axb.set_title(f"after {max(0, steps - 1)} steps (bar: mean, dots: seeds)")
    axb.grid(axis="x", visible=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def publish_convergence(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 05's figure into ``out``: ``convergence``."""
    return {"convergence": publish(plot_convergence(data), Path(out) / "convergence", {
        "caption": f"{data['task']}: training loss vs step (median and min-max over seeds "
                   f"{data['seeds']}) and held-out accuracy per method; analogue of "
                   "paper-glue-loss-curves.png", "data": "convergence.csv, accuracy.csv"})}
