r"""Figures of notebook 04: sharpness over training and loss landscapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .lines import auto_log, finite_or_nan, method_line_kw
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['plot_sharpness', 'plot_landscape', 'publish_sharpness_landscape']

def plot_sharpness(data: Mapping[str, Any]):
    """Top Hessian eigenvalue (left) and trace +- standard error (right) over training,
    w.r.t. the LoRA parameters; on mf the dotted line is F9's 2 sigma_1(Y)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.5))
    for run in data["runs"]:
        c, lab = method_color(run["method"]), method_label(run["method"])
        step = np.asarray(run["step"], dtype=float)
        ax1.plot(step, finite_or_nan(run["top_eigenvalue"]), color=c, marker="o", markersize=2.5,
                 label=lab)
        tr, se = finite_or_nan(run["trace"]), finite_or_nan(run["trace_stderr"])
        ax2.plot(step, tr, color=c, marker="o", markersize=2.5, label=lab)
        ax2.fill_between(step, tr - se, tr + se, color=c, alpha=0.2, linewidth=0)
    ref = data.get("reference", {}).get("two_sigma1_Y")
    if ref:
        ax1.axhline(ref, color="0.4", linestyle=":", linewidth=0.9,
                    label=r"$2\sigma_1(Y)$ (F9, balanced minimiser)")
    from matplotlib.ticker import MaxNLocator

    for ax, key in ((ax1, "top_eigenvalue"), (ax2, "trace")):
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        auto_log(ax, [v for run in data["runs"] for v in finite_or_nan(run[key])]
                  + ([ref] if ref and ax is ax1 else []))
    ax1.set_ylabel(r"$\lambda_{\max}$ of the Hessian")
    ax2.set_ylabel("Hessian trace (Hutch++)")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"Sharpness w.r.t. the LoRA factors ({data.get('task')}, "
                 f"{data.get('optimizer')}, seed {data.get('seed')})", fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_landscape(data: Mapping[str, Any]):
    """Left: 1-D slices of the loss around each method's solution (same random direction
    seed, ``normalization`` mode); right: 2-D slices with shared log-spaced contour levels."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    runs = data["runs"]
    n = len(runs)
    fig = plt.figure(figsize=(min(2 * COLUMN_WIDTH, COLUMN_WIDTH * (1 + 0.7 * n) * 0.7), 2.7),
                     layout="constrained")
    grid = fig.add_gridspec(1, n + 1, width_ratios=[1.4] + [1] * n)
    ax = fig.add_subplot(grid[0, 0])
    for run in runs:
        ax.plot(run["offsets"], np.maximum(finite_or_nan(run["loss_1d"]), 1e-300),
                color=method_color(run["method"]), label=method_label(run["method"]),
                **method_line_kw(run["method"]))
    ax.set_yscale("log")
    ax.set_xlabel(r"offset $\alpha$ along $d_1$")
    ax.set_ylabel("loss")
    ax.set_title("1-D slice")
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    all2d = np.concatenate([finite_or_nan(np.ravel(r["loss_2d"])) for r in runs])
    pos = all2d[np.isfinite(all2d) & (all2d > 0)]
    levels = np.geomspace(max(pos.min(), pos.max() * 1e-12), pos.max(), 15) if pos.size else 10
    from matplotlib.colors import LogNorm
    cs = None
    for i, run in enumerate(runs):
        axc = fig.add_subplot(grid[0, i + 1])
        g = np.asarray(run["grid"], dtype=float)
        Z = np.maximum(np.asarray(run["loss_2d"], dtype=float), levels[0] if pos.size else 1e-300)
        cs = axc.contourf(g, g, Z.T, levels=levels, norm=LogNorm(), cmap="viridis")
        axc.plot([0], [0], marker="*", color=method_color(run["method"]), markersize=7,
                 markeredgecolor="white")
        axc.set_title(method_label(run["method"]), color=method_color(run["method"]))
        axc.set_xlabel(r"$\alpha$ ($d_1$)")
        axc.tick_params(labelsize=6)
        if i == 0:
            axc.set_ylabel(r"$\beta$ ($d_2$)")
        else:
            axc.set_yticklabels([])
        axc.set_aspect("equal")
        axc.grid(False)
    if cs is not None:
        cb = fig.colorbar(cs, ax=fig.axes[1:], shrink=0.8, pad=0.02,
                          ticks=LogLocator(numticks=6), format=LogFormatterSciNotation())
        cb.set_label("loss")
    fig.suptitle(f"Loss around the solution after {data.get('steps')} steps ({data.get('task')}; "
                 f"random directions, '{data.get('normalization')}' normalisation, "
                 f"seed {data.get('seed')})", fontsize=7.5)
    return fig


def publish_sharpness_landscape(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 04's figures into ``out`` from ``{"sharpness", "sharpness_real" (or None),
    "landscape"}``: ``sharpness``, ``sharpness_real`` and ``landscape``."""
    out = Path(out)
    sharp, real, land = data["sharpness"], data.get("sharpness_real"), data["landscape"]
    paths = {"sharpness": publish(plot_sharpness(sharp), out / "sharpness", {
        "caption": f"top Hessian eigenvalue and trace over training on {sharp['task']}",
        "data": "sharpness.csv"})}
    if real is not None:
        paths["sharpness_real"] = publish(plot_sharpness(real), out / "sharpness_real", {
            "caption": f"top Hessian eigenvalue and trace over training on {real['task']} (AdamW)",
            "data": "sharpness_real.csv"})
    paths["landscape"] = publish(plot_landscape(land), out / "landscape", {
        "caption": f"1-D and 2-D loss slices around each method's solution on {land['task']}",
        "data": "landscape.json, landscape_1d.csv"})
    return paths
