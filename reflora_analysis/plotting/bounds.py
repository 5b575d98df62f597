r"""Figures of notebook 02: the descent-lemma bounds (F8) vs step size and along runs.

Every figure states the smoothness constant it used (the task's known ``L``, or how it was
estimated on each step's segment) and, for the runs, the count of violations (steps where
the next loss exceeded ``U_exact`` beyond round-off)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .lines import finite_or_nan
from .style import COLUMN_WIDTH, method_color, method_label, method_marker

__all__ = ['plot_bound_scan', 'plot_bound_tightness', 'plot_bound_tightness_real',
           'publish_bounds', 'smoothness_text', 'violations_text']

_BOUND_STYLES = {"loss": "-", "U_exact": "--", "U_relaxed": ":"}
_BOUND_LABELS = {"loss": r"loss $\ell(W_t + \Delta W)$", "U_exact": "upper bd. (F8a)",
                 "U_relaxed": "relaxed bd. (F8b)"}


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.2g}"


def _descent_text(scan: Mapping[str, Any]) -> str:
    """Per bound: the largest step size up to which it stays below l(W_t), RefLoRA vs LoRA."""
    d = scan.get("descent_eta")
    if not d:
        return ""
    lines = [r"bound $< \ell(W_t)$ up to $\eta$ ="]
    for key, label in (("U_exact", "F8a"), ("U_relaxed", "F8b")):
        lines.append(f"{label}: {_fmt(d['reflora'][key])} (RefLoRA), {_fmt(d['lora'][key])} (LoRA)")
    return "\n".join(lines)


def plot_bound_scan(data: Mapping[str, Any], *, yscale: str = "linear", headroom: float = 0.6):
    """Loss and both upper bounds against the step size at each chosen iterate, LoRA (S = I)
    vs RefLoRA (S = S*) (analogue of ``paper-upper-bounds.png``). The step size spans
    decades (log x); the y axis is linear by default, zoomed as the paper's is, from just
    below the lowest loss reached to ``l(W_t) + headroom * (l(W_t) - lowest)`` (bounds
    grow like eta^4 and leave the panel at the top). Each panel states up to which step size
    each bound stays below ``l(W_t)`` (on the grid, whose resolution the title gives)."""
    scans = data["scans"]
    fig, axes = plt.subplots(1, len(scans), figsize=(COLUMN_WIDTH * min(len(scans), 2) * 1.0,
                                                      2.8), squeeze=False, sharey=False)
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
        ax.text(0.02, 0.02, _descent_text(scan), transform=ax.transAxes, fontsize=5.5,
                va="bottom", ha="left", color="0.2")
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
    ratio = data.get("eta_ratio")
    grid = f"; $\\eta$ grid ratio {ratio:.3g}" if ratio and math.isfinite(ratio) else ""
    fig.suptitle(f"F8 bounds vs step size ({data.get('task')}, known L = {data.get('L'):g}; "
                 f"dash-dot: default $\\eta$ = {data.get('lr'):g}{grid})", fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig


def smoothness_text(data: Mapping[str, Any]) -> str:
    """How the runs' ``L`` was obtained, in words (for titles and captions)."""
    smooth = data.get("smoothness") or {}
    if smooth.get("source") == "segment":
        return (f"L estimated per step on its segment: {smooth.get('curvature')} curvature at "
                f"{smooth.get('points')} points, max x (1 + {smooth.get('margin'):g})")
    L = data.get("L")
    return f"known L = {L:.3g}" if isinstance(L, (int, float)) else "L: n/a"


def violations_text(data: Mapping[str, Any]) -> str:
    """``violations (next loss > U_exact): LoRA 0/40, RefLoRA 0/40``."""
    viol, probed = data.get("violations") or {}, data.get("probed") or {}
    parts = [f"{method_label(m)} {viol[m]}/{probed.get(m, '?')}" for m in viol]
    return "violations (next loss > U_exact): " + (", ".join(parts) if parts else "n/a")


def plot_bound_tightness(data: Mapping[str, Any]):
    """Per step of an SGD run: l(W_{t+1}), U_exact, U_relaxed (left) and the ratios
    U / l(W_{t+1}) >= 1 (right; 1 = tight); the title gives L and the violation counts."""
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.6))
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
    fig.suptitle(f"Descent-lemma bounds along a run ({data.get('task')}, seed {data.get('seed')}, "
                 f"{smoothness_text(data)})\n{violations_text(data)}", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    return fig


def plot_bound_tightness_real(data: Mapping[str, Any]):
    r"""Per SGD step on a real model: the actual loss change ``l(W_{t+1}) - l(W_t)`` against
    the bound's ``U_exact - l(W_t)`` (left; the bound holds where the dashed line is above
    the solid one) and the smoothness used, ``L``, against ``L_needed``, the smallest ``L``
    for which this step's bound holds (right; ``L_needed <= L`` is no violation, equality a
    tight bound; error bars: the float round-off allowance). Hollow markers: steps where
    RefLoRA's transform was not yet active (warm-up: a LoRA step)."""
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.7))
    for run in data["runs"]:
        method, c = run["method"], method_color(run["method"])
        step = np.asarray(run["step"], dtype=float)
        base = finite_or_nan(run["bound_loss"])
        active = np.asarray(finite_or_nan(run.get("method_active", [1.0] * len(step))) == 1.0)
        mk = method_marker(method)
        for axis, (solid, dashed) in ((ax, ("next_loss", "U_exact")), (axr, ("L_needed", "L"))):
            ys = [finite_or_nan(run[k]) - (base if axis is ax else 0.0) for k in (solid, dashed)]
            axis.plot(step, ys[0], color=c, linestyle="-", linewidth=0.9)
            axis.plot(step, ys[1], color=c, linestyle="--", linewidth=0.9)
            for y in ys:
                axis.scatter(step[active], y[active], color=c, marker=mk, s=12, zorder=3)
                axis.scatter(step[~active], y[~active], facecolors="none", edgecolors=c,
                             marker=mk, s=12, zorder=3)
        # round-off: L_needed moves by this when the next loss is off by the tolerance
        axr.errorbar(step, finite_or_nan(run["L_needed"]), fmt="none", ecolor=c, elinewidth=0.6,
                     capsize=1.5, yerr=finite_or_nan(run.get("L_needed_roundoff", [0.0] * len(step))))
        ax.plot([], [], color=c, linestyle="-", marker=mk, markersize=3,
                label=f"{method_label(method)} " + r"$\ell(W_{t+1}) - \ell(W_t)$")
        ax.plot([], [], color=c, linestyle="--", marker=mk, markersize=3,
                label=f"{method_label(method)} " + r"$U_{exact} - \ell(W_t)$")
        axr.plot([], [], color=c, linestyle="-", label=f"{method_label(method)} " + r"$L_{needed}$")
        axr.plot([], [], color=c, linestyle="--", label=f"{method_label(method)} $L$ used")
    ax.axhline(0.0, color="0.5", linewidth=0.6)
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel("change of the loss")
    ax.set_title("actual change vs the bound's", fontsize=7.5)
    axr.axhline(0.0, color="0.5", linewidth=0.6)
    axr.set_xlabel("iteration $t$")
    axr.set_ylabel("smoothness (in the joint $M$)")
    axr.set_title(r"$L_{needed} \leq L$: the bound holds", fontsize=7.5)
    for axis in (ax, axr):
        axis.legend(fontsize=5.5, frameon=False, loc="best")
    layers = {int(v) for r in data["runs"] for v in finite_or_nan(r.get("layers", [])) if v == v}
    where = f"{data.get('task')}, " + (f"{layers.pop()} LoRA layers" if len(layers) == 1 else
                                       "all LoRA layers") + " jointly"
    fig.suptitle(f"F8 along SGD runs on {where} (seed {data.get('seed')}, lr {_fmt(data.get('lr'))})\n"
                 f"{smoothness_text(data)}; {violations_text(data)}", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def publish_bounds(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 02's figures into ``out`` from ``{"scan", "tightness", "real"}``:
    ``bounds_vs_step_size``, ``bound_tightness`` and (when ``real`` is given)
    ``bound_tightness_real``."""
    out = Path(out)
    figs = {
        "bounds_vs_step_size": publish(plot_bound_scan(data["scan"]), out / "bounds_vs_step_size", {
            "caption": "loss and both F8 upper bounds vs step size at chosen iterates, LoRA vs "
                       "RefLoRA (log step-size axis; known L); each panel gives the largest step "
                       "size up to which each bound stays below l(W_t); analogue of "
                       "paper-upper-bounds.png",
            "data": "bound_scan.csv, bound_descent.csv"}),
        "bound_tightness": publish(plot_bound_tightness(data["tightness"]), out / "bound_tightness", {
            "caption": "l(W_t+1), U_exact and U_relaxed at every SGD step, and their ratios; "
                       f"{smoothness_text(data['tightness'])}; {violations_text(data['tightness'])}",
            "data": "bound_tightness.csv"})}
    real = data.get("real")
    if real:
        figs["bound_tightness_real"] = publish(
            plot_bound_tightness_real(real), out / "bound_tightness_real", {
                "caption": "real sentence task: actual loss change vs U_exact - l(W_t) per SGD "
                           "step, and the smoothness used vs the smallest one the step needs; "
                           f"{smoothness_text(real)}; {violations_text(real)}",
                "data": "bound_tightness_real.csv"})
    return figs
