r"""Figures of notebook 01: loss and balance vs iteration on matrix factorization."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .lines import line_with_band, longest_steps, mark_divergence, method_line_kw, stack_rows
from .style import COLUMN_WIDTH, STEP_LINESTYLES, method_color, method_label

__all__ = ['plot_mf_loss', 'plot_mf_balance', 'publish_mf']

def plot_mf_loss(data: Mapping[str, Any], *, top: float = 1e6, floor: float = 1e-12):
    """Loss vs iteration, one panel per step size, every method (analogue of the paper's
    ``paper-matrix-factorization-loss.png``). Log y; a run whose loss passes ``top``
    (divergence) leaves the panel at a triangle on its top edge."""
    runs = data["runs"]
    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(1, len(lrs), figsize=(2 * COLUMN_WIDTH, 2.6), sharey=True,
                             squeeze=False)
    for ax, lr, ls in zip(axes[0], lrs, STEP_LINESTYLES):
        diverged_here = []
        for method in data["methods"]:
            sel = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not sel:
                continue
            rows = stack_rows([r["loss"] for r in sel])
            # a diverged run counts as "above the panel" for the rest of the run, so the
            # median over seeds leaves the panel when most seeds diverged (never the
            # median of the survivors only)
            for i, r in enumerate(sel):
                if r.get("status") == "diverged":
                    rows[i, np.isnan(rows[i])] = np.inf
            rows[rows > top] = top * 1e3
            line = line_with_band(ax, longest_steps(sel), rows, color=method_color(method),
                                   label=method_label(method), linestyle=ls, positive=True)
            line.set(**method_line_kw(method))
            if mark_divergence(ax, sel, method_color(method), top):
                n_div = sum(r.get("status") == "diverged" for r in sel)
                diverged_here.append(method_label(method)
                                     + (f" ({n_div}/{len(sel)} seeds)" if len(sel) > 1 else ""))
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.set_xlim(0, max(len(longest_steps(runs)) - 1, 1))
        ax.set_xlabel("iteration $t$")
        title = f"step size $\\eta$ = {lr:g}"
        if diverged_here:
            title += "\n" + r"$\blacktriangle$ diverged: " + ", ".join(diverged_here)
        ax.set_title(title, fontsize=7.5)
    axes[0][0].set_ylabel(r"loss $\ell(A_t B_t^\top)$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    cfg = data.get("task_config", {})
    fig.suptitle(f"Matrix factorization ({data.get('task', 'mf')}: m={cfg.get('m', '?')}, "
                 f"n={cfg.get('n', '?')}, r={cfg.get('rank', '?')}), full-batch SGD, "
                 f"seeds {data.get('seeds')}", fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_mf_balance(data: Mapping[str, Any], *, floor: float = 1e-17):
    """Balance of the factors vs iteration at the first step size: left the balance gap
    ``||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` (0 = balanced, drawn at
    ``floor``), right the norm ratio ``||A||_F / ||B||_F`` (1 = balanced norms)."""
    runs = data["runs"]
    lr = min(r["lr"] for r in runs)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.5))
    for method in data["methods"]:
        sel = [r for r in runs if r["method"] == method and r["lr"] == lr]
        if not sel:
            continue
        kw = method_line_kw(method)
        rows = np.maximum(stack_rows([r["balance_gap"] for r in sel]), floor)
        line_with_band(ax, longest_steps(sel), rows, color=method_color(method),
                        label=method_label(method)).set(**kw)
        if all("norm_ratio" in r for r in sel):
            rows = stack_rows([r["norm_ratio"] for r in sel])
            line_with_band(ax2, longest_steps(sel), rows, color=method_color(method),
                            label=method_label(method), positive=True).set(**kw)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 3)
    ax.set_ylabel("balance gap (0 = balanced)")
    ax2.set_yscale("log")
    ax2.axhline(1.0, color="0.5", linewidth=0.7, zorder=0)
    ax2.set_ylabel(r"$\|A_t\|_F / \|B_t\|_F$")
    for a in (ax, ax2):
        a.set_xlabel("iteration $t$")
    fig.suptitle(f"Balance of the factors, {data.get('task', 'mf')}, SGD $\\eta$ = {lr:g}",
                 fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def publish_mf(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 01's figures into ``out``: ``mf_loss`` and ``mf_balance``."""
    out = Path(out)
    return {
        "mf_loss": publish(plot_mf_loss(data), out / "mf_loss", {
            "caption": "loss vs iteration, every method, two SGD step sizes (log y); analogue of "
                       "paper-matrix-factorization-loss.png", "data": "mf_runs.csv"}),
        "mf_balance": publish(plot_mf_balance(data), out / "mf_balance", {
            "caption": "balance gap and ||A||/||B|| vs iteration at the default step size",
            "data": "mf_runs.csv"})}
