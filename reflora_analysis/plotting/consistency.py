r"""Figures of notebook 03: consistency scores at three kinds of point (with their Markdown
table), consistency over training, balance trajectories and adapter health."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, MaxNLocator

from .files import publish, publish_markdown
from .lines import line_with_band, longest_steps, method_line_kw, stack_rows
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['consistency_summary', 'consistency_markdown', 'plot_consistency', 'plot_spread',
           'plot_balance_trajectories', 'plot_health', 'publish_consistency_balance']

#: The kinds of point of the consistency scores, their markers and legend text.
POINTS = {"start": ("o", "task start (A ~ 0.01)"), "generic": ("s", "after LoRA steps"),
          "random": ("^", "random factors")}


def consistency_summary(data: Mapping[str, Any], *, floor: float = 1e-17) -> list[dict]:
    """Per method and kind of point: median, min and max of the score over tasks and seeds,
    and the method's claimed invariance (scores without a point are the ``start`` ones)."""
    out = []
    for method in data["methods"]:
        for point in data.get("points", ["start"]):
            vals = [s["score"] for s in data["scores"]
                    if s["method"] == method and s.get("point", "start") == point]
            vals = [v for v in vals if np.isfinite(v)]
            if not vals:
                continue
            out.append({"method": method, "point": point, "median": float(np.median(vals)),
                        "min": min(vals), "max": max(vals), "n": len(vals),
                        "invariance": data.get("info", {}).get(method, {}).get("invariance", "")})
    return out


def consistency_markdown(data: Mapping[str, Any]) -> str:
    """The consistency table as Markdown: per method the median score at each kind of point
    (start, generic, random) and the max over all of them."""
    rows = consistency_summary(data)
    points = list(data.get("points", ["start"]))
    lines = ["| method | claimed invariance | " + " | ".join(f"median at {p}" for p in points)
             + " | max |", "| --- | --- | " + " | ".join("---" for _ in points) + " | --- |"]
    for method in data["methods"]:
        mine = {r["point"]: r for r in rows if r["method"] == method}
        if not mine:
            continue
        cells = [f"{mine[p]['median']:.2e}" if p in mine else "-" for p in points]
        inv = next(iter(mine.values()))["invariance"] or "-"
        lines.append(f"| {method_label(method)} | {inv} | " + " | ".join(cells)
                     + f" | {max(r['max'] for r in mine.values()):.2e} |")
    return "\n".join(lines) + "\n"


def plot_consistency(data: Mapping[str, Any], *, floor: float = 1e-17):
    """Per method (row) the score at each kind of point (marker: median over tasks x seeds,
    whiskers min-max), log scale; the dashed line is float64 machine epsilon."""
    rows = consistency_summary(data)
    methods = [m for m in data["methods"] if any(r["method"] == m for r in rows)]
    points = [p for p in data.get("points", ["start"]) if any(r["point"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.32 * len(methods) + 1.2))
    y = {m: i for i, m in enumerate(reversed(methods))}
    offset = {p: (k - (len(points) - 1) / 2) * 0.22 for k, p in enumerate(points)}
    for r in rows:
        yy = y[r["method"]] + offset[r["point"]]
        med, lo, hi = (max(r[k], floor) for k in ("median", "min", "max"))
        ax.errorbar([med], [yy], xerr=[[med - lo], [hi - med]], fmt=POINTS[r["point"]][0],
                    color=method_color(r["method"]), ecolor="0.4", elinewidth=0.7, capsize=1.5,
                    markersize=4)
    for p in points:
        ax.plot([], [], POINTS[p][0], color="0.3", label=POINTS[p][1])
    ax.set_yticks(list(y.values()))
    ax.set_yticklabels([f"{method_label(m)} ({data.get('info', {}).get(m, {}).get('invariance') or '?'})"
                        for m in y])
    ax.set_xscale("log")
    top = max([r["max"] for r in rows] + [1.0])
    ax.set_xlim(floor / 10, top * 3)
    ax.axvline(np.finfo(np.float64).eps, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_xlabel(r"consistency score $\max_i \|\Delta W_i - \Delta W_0\|_F / \|\Delta W_0\|_F$")
    ax.grid(axis="y", visible=False)
    ax.xaxis.set_major_locator(LogLocator(base=10.0, numticks=7))
    fig.legend(loc="lower center", ncol=len(points), fontsize=6, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    damping = data.get("damping")
    ax.set_title(f"Spread of one SGD step over {data.get('n_reparam')} refactorings\n"
                 f"({', '.join(data.get('tasks', []))}; {len(data.get('seeds', []))} seeds; "
                 f"generic = after {data.get('generic_steps', '?')} LoRA steps; float64"
                 + (f"; damping {damping:g}" if damping is not None else "") + ")", fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_spread(data: Mapping[str, Any], *, floor: float = 1e-17):
    """Per optimizer (column: SGD, AdamW) the spread of W over training from equivalent
    factorizations, per method (log scale; 0 drawn at ``floor``; a diverged run stops)."""
    optimizers = list(dict.fromkeys(r["optimizer"] for r in data["runs"]))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(COLUMN_WIDTH * len(optimizers), 2.6),
                             squeeze=False, sharey=True)
    for ax, opt in zip(axes[0], optimizers):
        for r in (r for r in data["runs"] if r["optimizer"] == opt):
            vals = np.maximum(np.asarray(r["spread"], dtype=float), floor)
            ax.plot(r["step"], vals, color=method_color(r["method"]),
                    label=method_label(r["method"]), **method_line_kw(r["method"]))
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, 30)
        ax.set_xlabel("training step t")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{opt} (lr {data['lrs'][opt]:g}) on {data['task']}", fontsize=7.5)
    axes[0][0].set_ylabel(r"$\max_i \|W_t^{(i)} - W_t^{(0)}\|_F / \|W_t^{(0)} - W_0\|_F$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"Consistency over training: {data['n_reparam']} equivalent starts "
                 f"(A P, B P^-T), float64", fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_balance_trajectories(panels: Sequence[Mapping[str, Any]], *, floor: float = 1e-17):
    """Per data set (column; e.g. mf with SGD, MiniLM with AdamW): the balance gap (top;
    mean over layers, 0 drawn at ``floor``) and ``||A||_F / ||B||_F`` over all layers
    (bottom; 1 = balanced norms; undefined at a zero factor) vs training step."""
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


def _health_series(ax, data, key, ylabel, *, log=True):
    for method in data["methods"]:
        sel = [r for r in data["runs"] if r["method"] == method and r.get(key)]
        if not sel:
            continue
        line_with_band(ax, longest_steps(sel), stack_rows([r[key] for r in sel]),
                       color=method_color(method), label=method_label(method),
                       positive=log).set(**method_line_kw(method))
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_health(data: Mapping[str, Any]):
    """Adapter health over training on a multi-layer task: mean effective rank of ``A B^T``,
    the largest dominance ``sigma_max(s A B^T) / sigma_max(W0)``, the largest condition number
    of ``A`` (solid) and ``B`` (dotted), and the per-layer balance gap at the last step."""
    fig, axes = plt.subplots(2, 2, figsize=(COLUMN_WIDTH * 2, 4.4))
    _health_series(axes[0][0], data, "erank_mean", "effective rank of A B^T (mean over layers)",
                   log=False)
    _health_series(axes[0][1], data, "dominance_max", r"max dominance $\sigma_1(sAB^T)/\sigma_1(W_0)$")
    ax = axes[1][0]
    _health_series(ax, data, "cond_A_max", "max condition number")
    for method in data["methods"]:
        sel = [r for r in data["runs"] if r["method"] == method and r.get("cond_B_max")]
        if sel:
            ax.plot(sel[0]["step"], sel[0]["cond_B_max"], color=method_color(method),
                    linestyle=":", linewidth=1.0)
    ax.set_title("A solid, B dotted (first seed)", fontsize=7)
    ax = axes[1][1]
    for method in data["methods"]:
        sel = [r for r in data["runs"] if r["method"] == method and r.get("layer_gap")]
        if sel:
            last = np.maximum(np.asarray(sel[0]["layer_gap"][-1], dtype=float), 1e-17)
            ax.plot(np.arange(len(last)), last, "o-", markersize=2, linewidth=0.8,
                    color=method_color(method), label=method_label(method))
    ax.set_yscale("log")
    ax.set_xlabel("LoRA layer (model order)")
    ax.set_ylabel("balance gap at the last step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"Adapter health on {data['task']} ({data['optimizer']}, seeds {data['seeds']})",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def publish_consistency_balance(data: Mapping[str, Any], out) -> dict[str, Any]:
    """Notebook 03's outputs into ``out`` from ``{"consistency", "spread", "balance":
    [panels], "health"}``: ``consistency`` (figure), ``consistency_table.md`` (shown as
    Markdown), ``consistency_training``, ``balance_trajectories`` and, with a real task,
    ``adapter_health``."""
    out = Path(out)
    cons = data["consistency"]
    paths = {"consistency": publish(plot_consistency(cons), out / "consistency", {
        "caption": "consistency score of every method at the task start, at a generic point "
                   "and at random factors (log scale; median, min-max whiskers)",
        "data": "consistency.csv"})}
    publish_markdown(consistency_markdown(cons), out / "consistency_table.md")
    paths["consistency_table"] = str(out / "consistency_table.md")
    if data.get("spread"):
        paths["consistency_training"] = publish(plot_spread(data["spread"]),
                                                out / "consistency_training", {
            "caption": "spread of W over training from equivalent factorizations, SGD and AdamW",
            "data": "spread.csv"})
    paths["balance_trajectories"] = publish(
        plot_balance_trajectories(data["balance"]), out / "balance_trajectories", {
            "caption": "balance gap and ||A||/||B|| over training on mf (SGD) and on the real "
                       "model (AdamW)", "data": "balance_mf.csv, balance_real.csv"})
    if data.get("health"):
        paths["adapter_health"] = publish(plot_health(data["health"]), out / "adapter_health", {
            "caption": "effective rank, dominance, condition numbers and per-layer balance over "
                       "training on the real model", "data": "balance_real.csv, "
                                                              "balance_real_layers.csv"})
    return paths
