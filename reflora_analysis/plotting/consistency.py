r"""Figures of notebook 03: consistency scores (with their Markdown table) and balance trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .files import publish, publish_markdown
from .lines import line_with_band, longest_steps, method_line_kw, stack_rows
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['consistency_summary', 'consistency_markdown', 'plot_consistency', 'plot_balance_trajectories', 'publish_consistency_balance']

def consistency_summary(data: Mapping[str, Any], *, floor: float = 1e-17) -> list[dict]:
    """Per method: median, min and max of the score over tasks and seeds, and its claim."""
    out = []
    for method in data["methods"]:
        vals = [s["score"] for s in data["scores"] if s["method"] == method]
        vals = [v for v in vals if np.isfinite(v)]
        if not vals:
            continue
        out.append({"method": method, "median": float(np.median(vals)), "min": min(vals),
                    "max": max(vals), "n": len(vals),
                    "invariance": data.get("info", {}).get(method, {}).get("invariance", "")})
    return out


def consistency_markdown(data: Mapping[str, Any]) -> str:
    """The consistency table (median, min, max over problems) as Markdown."""
    rows = consistency_summary(data)
    lines = ["| method | claimed invariance | median | min | max |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {method_label(r['method'])} | {r['invariance'] or '-'} | "
                     f"{r['median']:.2e} | {r['min']:.2e} | {r['max']:.2e} |")
    return "\n".join(lines) + "\n"


def plot_consistency(data: Mapping[str, Any], *, floor: float = 1e-17):
    """Horizontal bars: consistency score of every method (median over tasks x seeds,
    whiskers min-max), log scale; the dashed line is float64 machine epsilon."""
    rows = consistency_summary(data)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.3 * len(rows) + 0.9))
    y = np.arange(len(rows))[::-1]
    med = np.array([max(r["median"], floor) for r in rows])
    lo = np.array([max(r["min"], floor) for r in rows])
    hi = np.array([max(r["max"], floor) for r in rows])
    ax.barh(y, med - floor / 10, left=floor / 10,
            color=[method_color(r["method"]) for r in rows], height=0.65)
    ax.errorbar(med, y, xerr=[med - lo, hi - med], fmt="none", ecolor="0.2", elinewidth=0.8,
                capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{method_label(r['method'])} ({r['invariance'] or '?'})" for r in rows])
    ax.set_xscale("log")
    ax.set_xlim(floor / 10, max(1.0, hi.max() * 3))
    ax.axvline(np.finfo(np.float64).eps, color="0.3", linestyle="--", linewidth=0.8)
    ax.text(np.finfo(np.float64).eps * 1.5, y[-1] - 0.6, "float64 eps", fontsize=6,
            color="0.3", va="bottom")
    ax.set_xlabel(r"consistency score $\max_i \|\Delta W_i - \Delta W_0\|_F / \|\Delta W_0\|_F$")
    ax.grid(axis="y", visible=False)
    damping = data.get("damping")
    ax.set_title(f"Spread of one SGD step's update over {data.get('n_reparam')} refactorings\n"
                 f"({', '.join(data.get('tasks', []))}; {len(data.get('seeds', []))} seeds; float64"
                 + (f"; damping {damping:g}" if damping is not None else "") + ")", fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_balance_trajectories(panels: Sequence[Mapping[str, Any]], *, floor: float = 1e-17):
    """Per data set (column; e.g. mf with SGD, MiniLM with AdamW): the balance gap (top;
    mean over layers, 0 drawn at ``floor``) and ``||A||_F / ||B||_F`` over all layers
    (bottom; 1 = balanced norms; undefined at a zero factor) vs training step."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(panels), figsize=(COLUMN_WIDTH * len(panels), 3.9),
                             squeeze=False, sharex="col")
    for col, data in enumerate(panels):
        ax, ax2 = axes[0][col], axes[1][col]
        for method in data["methods"]:
            sel = [r for r in data["runs"] if r["method"] == method and r["balance_gap"]]
            if not sel:
                continue
            kw = method_line_kw(method)
            rows = np.maximum(stack_rows([r["balance_gap"] for r in sel]), floor)
            line_with_band(ax, longest_steps(sel), rows, color=method_color(method),
                            label=method_label(method)).set(**kw)
            if all(r.get("norm_ratio") for r in sel):
                line_with_band(ax2, longest_steps(sel), stack_rows([r["norm_ratio"] for r in sel]),
                                color=method_color(method), label=method_label(method),
                                positive=True).set(**kw)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, 3)
        ax2.set_yscale("log")
        ax2.axhline(1.0, color="0.5", linewidth=0.7, zorder=0)
        ax2.set_xlabel("training step")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_title(f"{data['task']} ({data['optimizer']}, seeds {data['seeds']})")
    axes[0][0].set_ylabel("balance gap (0 = balanced)")
    axes[1][0].set_ylabel(r"$\|A\|_F / \|B\|_F$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def publish_consistency_balance(data: Mapping[str, Any], out) -> dict[str, Any]:
    """Notebook 03's outputs into ``out`` from ``{"consistency", "balance": [panels]}``:
    ``consistency`` (figure), ``consistency_table.md`` (shown as Markdown) and
    ``balance_trajectories``."""
    out = Path(out)
    cons = data["consistency"]
    paths = {"consistency": publish(plot_consistency(cons), out / "consistency", {
        "caption": "consistency score of every method (log scale; median, min-max whiskers)",
        "data": "consistency.csv"})}
    publish_markdown(consistency_markdown(cons), out / "consistency_table.md")
    paths["consistency_table"] = str(out / "consistency_table.md")
    paths["balance_trajectories"] = publish(
        plot_balance_trajectories(data["balance"]), out / "balance_trajectories", {
            "caption": "balance gap and ||A||/||B|| over training on mf (SGD) and on the real "
                       "model (AdamW)", "data": "balance_mf.csv, balance_real.csv"})
    return paths
