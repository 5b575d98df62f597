r"""The landscape figure of notebook 04: interpolation lines and the trajectories' PCA plane.

Input: :func:`reflora_analysis.experiments.sharpness.landscape_views`'s data. Everything is in
``delta W`` (GL(r)-invariant), except the dashed factor-space lines drawn for contrast.
"""

from __future__ import annotations

from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .lines import finite_or_nan, method_line_kw
from .style import COLUMN_WIDTH, method_color, method_label, method_marker

__all__ = ["plot_landscape", "plot_interpolations", "plot_plane"]


def _log_if_wide(ax, values) -> None:
    vals = np.array([v for v in values if np.isfinite(v) and v > 0])
    if vals.size and vals.max() / vals.min() > 20:
        ax.set_yscale("log")


def plot_interpolations(ax_along, ax_between, data: Mapping[str, Any]) -> None:
    """Left: loss from the common start (t = 0) to each method's solution (t = 1). Right: from
    the first method's solution (t = 0) to each other's (t = 1), in delta W (solid) and in
    factor space (dashed)."""
    for line in data["along"]:
        m = line["method"]
        ax_along.plot(line["t"], finite_or_nan(line["loss"]), color=method_color(m),
                      label=method_label(m), **method_line_kw(m))
    for line in data["between"]:
        m, dashed = line["to"], line["space"] == "factors"
        ax_between.plot(line["t"], finite_or_nan(line["loss"]), color=method_color(m),
                        linestyle="--" if dashed else "-", linewidth=1.0 if dashed else 1.4,
                        label=f"to {method_label(m)}" + (" (factors)" if dashed else ""))
    for ax, lines in ((ax_along, data["along"]), (ax_between, data["between"])):
        for x in (0.0, 1.0):
            ax.axvline(x, color="0.6", linewidth=0.6, linestyle=":")
        _log_if_wide(ax, [v for line in lines for v in finite_or_nan(line["loss"])])
        ax.set_xlabel("t")
    ax_along.set_ylabel("loss")
    ax_along.set_title("start (0) to solution (1)", fontsize=7.5)
    first = data["between"][0]["from"] if data["between"] else None
    ax_between.set_title(f"{method_label(first)} (0) to the others (1)" if first
                         else "(one method: no pair)", fontsize=7.5)
    ax_along.legend(fontsize=6, frameon=False)
    if data["between"]:
        ax_between.legend(fontsize=5.5, frameon=False)


def plot_plane(ax, plane: Mapping[str, Any]) -> None:
    """The loss over the trajectories' PCA plane (log-spaced filled contours) with each
    method's trajectory (start: circle, end: the method's marker); the axes state the share of
    the trajectories' variance they hold."""
    from matplotlib.colors import LogNorm

    a, b = np.asarray(plane["a"]), np.asarray(plane["b"])
    Z = finite_or_nan(np.ravel(plane["loss"])).reshape(len(a), len(b))
    pos = Z[np.isfinite(Z) & (Z > 0)]
    if pos.size and pos.max() > pos.min():
        levels = np.geomspace(pos.min(), pos.max(), 16)
        cs = ax.contourf(a, b, np.clip(Z, levels[0], levels[-1]).T, levels=levels, norm=LogNorm(),
                         cmap="viridis", alpha=0.9)
        plt.colorbar(cs, ax=ax, pad=0.02, format="%.3g").set_label("loss", fontsize=7)
    for m, pts in plane["coords"].items():
        xy = np.asarray(pts, dtype=float).reshape(-1, 2)
        c = method_color(m)
        ax.plot(xy[:, 0], xy[:, 1], color=c, **{"linewidth": 1.1, **method_line_kw(m)})
        ax.plot(xy[0, 0], xy[0, 1], marker="o", color=c, markersize=3.5, markeredgecolor="white")
        ax.plot(xy[-1, 0], xy[-1, 1], marker=method_marker(m), color=c, markersize=6,
                markeredgecolor="white", linestyle="none")
    ev = plane["explained_variance"]
    ax.set_xlabel(f"PC1 of $\\Delta W$ ({100 * ev[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f} %)")
    anchor = plane.get("anchor")
    ax.set_title(f"PCA plane of the trajectories ({100 * (ev[0] + ev[1]):.1f} %)"
                 + (f",\nthrough {method_label(anchor[0])}'s solution" if anchor else ""),
                 fontsize=7)
    ax.grid(False)


def plot_landscape(data: Mapping[str, Any]):
    """The three landscape views of one task (:func:`plot_interpolations`, :func:`plot_plane`)."""
    plane = data.get("plane")
    fig, axes = plt.subplots(1, 3 if plane else 2, figsize=(2 * COLUMN_WIDTH, 2.6),
                             gridspec_kw={"width_ratios": [1, 1, 1.35] if plane else [1, 1]})
    plot_interpolations(axes[0], axes[1], data)
    if plane:
        plot_plane(axes[2], plane)
    fig.suptitle(f"Loss landscape in $\\Delta W$ ({data.get('task')}, {data.get('optimizer')}, "
                 f"{data.get('steps')} steps, seed {data.get('seed')}; loss on the batch of the "
                 "last step)", fontsize=7.5)
    fig.tight_layout()
    return fig
