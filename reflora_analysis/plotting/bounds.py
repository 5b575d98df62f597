r"""Figures of notebook 02: the descent-lemma bounds (F8) vs step size and along runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .lines import finite_or_nan
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['plot_bound_scan', 'plot_bound_tightness', 'publish_bounds']

_BOUND_STYLES = {"loss": "-", "U_exact": "--", "U_relaxed": ":"}
_BOUND_LABELS = {"loss": r"loss $\ell(W_t + \Delta W)$", "U_exact": "upper bd. (F8a)",
                 "U_relaxed": "relaxed bd. (F8b)"}


def plot_bound_scan(data: Mapping[str, Any], *, yscale: str = "linear", headroom: float = 0.6):
    """Loss and both upper bounds against the step size at each chosen iterate, LoRA (S = I)
    vs RefLoRA (S = S*) (analogue of ``paper-upper-bounds.png``). The step size spans
    decades (log x); the y axis is linear by default, zoomed as the paper's is, from just
    below the lowest loss reached to ``l(W_t) + headroom * (l(W_t) - lowest)`` (bounds
    grow like eta^4 and leave the panel at the top)."""
    scans = data["scans"]
    fig, axes = plt.subplots(1, len(scans), figsize=(COLUMN_WIDTH * min(len(scans), 2) * 1.0,
                                                      2.6), squeeze=False, sharey=False)
    for ax, scan in zip(axes[0], scans):
        eta = np.asarray(scan["eta"], dtype=float)
        l0 = scan["loss_at_iterate"]
        values = []
        for method in ("lora", "reflora"):
            for key, ls in _BOUND_STYLES.items():
                y = finite_or_nan(scan[method][key])
                y[y <= 0] = np.nan
                ax.plot(eta, y, color=method_color(method), linestyle=ls,
                        label=f"{method_label(method)} {_BOUND_LABELS[key]}")
                values.extend(y[np.isfinite(y)].tolist())
        ax.axhline(l0, color="0.5", linewidth=0.7, linestyle="-", zorder=0)
        ax.annotate(r"$\ell(W_t)$", (eta[0], l0), xytext=(2, 2), textcoords="offset points",
                    fontsize=6.5, color="0.35")
        if data.get("lr"):
            ax.axvline(data["lr"], color="0.5", linewidth=0.7, linestyle="-.", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale(yscale)
        low = min([v for v in values if v > 0], default=l0 * 0.9)
        low = min(low, l0 * 0.9)
        lo = low - 0.08 * (l0 - low) if yscale == "linear" else low / 1.5
        ax.set_ylim(max(lo, 0.0) if yscale == "linear" else lo, l0 + headroom * (l0 - low))
        ax.set_xlim(eta[0], eta[-1])
        ax.set_xlabel(r"step size $\eta$")
        ax.set_title(f"iterate $t$ = {scan['iterate']} of a LoRA run")
    axes[0][0].set_ylabel(r"loss / bound at $W_t + \Delta W(\eta)$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=6.5,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"F8 bounds vs step size ({data.get('task')}, L = {data.get('L'):g}; "
                 f"dash-dot: default $\\eta$ = {data.get('lr'):g})", fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig


def plot_bound_tightness(data: Mapping[str, Any]):
    """Per step of an SGD run: l(W_{t+1}), U_exact, U_relaxed (left) and the ratios
    U / l(W_{t+1}) >= 1 (right; 1 = tight)."""
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.5))
    for run in data["runs"]:
        c = method_color(run["method"])
        step = np.asarray(run["step"], dtype=float)
        nxt = finite_or_nan(run.get("next_loss", []))
        for key, ls in (("next_loss", "-"), ("U_exact", "--"), ("U_relaxed", ":")):
            y = finite_or_nan(run.get(key, []))
            if y.size and np.isfinite(y).any():
                lab = {"next_loss": r"$\ell(W_{t+1})$", "U_exact": "$U_{exact}$",
                       "U_relaxed": "$U_{relaxed}$"}[key]
                ax.plot(step[:len(y)], y, color=c, linestyle=ls,
                        label=f"{method_label(run['method'])} {lab}")
                if key != "next_loss":
                    with np.errstate(all="ignore"):
                        axr.plot(step[:len(y)], y / nxt[:len(y)], color=c, linestyle=ls,
                                 label=f"{method_label(run['method'])} {lab}" + r"$/\ell(W_{t+1})$")
    ax.set_yscale("log")
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel("loss / bound")
    ax.set_title(r"next loss and its bounds at each SGD step")
    axr.set_yscale("log")
    axr.axhline(1.0, color="0.5", linewidth=0.7)
    axr.set_xlabel("iteration $t$")
    axr.set_ylabel(r"bound / $\ell(W_{t+1})$ (1 = tight)")
    axr.set_title("tightness")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=6.5,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"Descent-lemma bounds along a run ({data.get('task')}, L = {data.get('L', float('nan')):.3g}, "
                 f"seed {data.get('seed')})", fontsize=8)
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    return fig


def publish_bounds(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 02's figures into ``out`` from ``{"scan", "tightness"}``:
    ``bounds_vs_step_size`` and ``bound_tightness``."""
    out = Path(out)
    return {
        "bounds_vs_step_size": publish(plot_bound_scan(data["scan"]), out / "bounds_vs_step_size", {
            "caption": "loss and both F8 upper bounds vs step size at chosen iterates, LoRA vs "
                       "RefLoRA (log step-size axis); analogue of paper-upper-bounds.png",
            "data": "bound_scan.csv"}),
        "bound_tightness": publish(plot_bound_tightness(data["tightness"]), out / "bound_tightness", {
            "caption": "l(W_t+1), U_exact and U_relaxed at every SGD step, and their ratios",
            "data": "bound_tightness.csv"})}
