r"""Figures of notebook 04: sharpness over training at the stored and at the balanced factors,
per-layer sharpness, and (:mod:`.landscape`) the loss landscapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from .files import publish
from .landscape import plot_landscape
from .lines import auto_log, finite_or_nan, method_line_kw
from .style import COLUMN_WIDTH, method_color, method_label, method_marker

__all__ = ["plot_sharpness", "plot_layer_sharpness", "plot_landscape",
           "publish_sharpness_landscape"]


def _eigenvalue_panel(ax, runs, key: str, ref: float | None, title: str) -> None:
    for run in runs:
        m = run["method"]
        ax.plot(np.asarray(run["step"], dtype=float), finite_or_nan(run[key]),
                color=method_color(m), marker=method_marker(m), markersize=3,
                label=method_label(m), **method_line_kw(m))
    if ref:
        ax.axhline(ref, color="0.4", linestyle=":", linewidth=0.9,
                   label=r"$2\sigma_1(Y)$ (F9: balanced minimiser)")
    ax.set_title(title, fontsize=7.5)


def _trace_panel(ax, runs) -> None:
    """The trace with its confidence interval as error bars (methods slightly offset in x so
    the bars do not hide each other)."""
    steps = [s for run in runs for s in run["step"]]
    width = (max(steps) - min(steps)) if steps else 1.0
    for i, run in enumerate(runs):
        m = run["method"]
        x = np.asarray(run["step"], dtype=float) + (i - (len(runs) - 1) / 2) * 0.01 * width
        tr = finite_or_nan(run["trace"])
        lo, hi = finite_or_nan(run["trace_ci_low"]), finite_or_nan(run["trace_ci_high"])
        err = np.vstack([np.clip(tr - lo, 0, None), np.clip(hi - tr, 0, None)])
        ax.errorbar(x, tr, yerr=np.where(np.isfinite(err), err, 0.0), color=method_color(m),
                    marker=method_marker(m), markersize=3, capsize=2, linewidth=1.0,
                    elinewidth=0.8, label=method_label(m))
    ax.set_title("Hessian trace (Hutch++), stored factors", fontsize=7.5)


def plot_sharpness(data: Mapping[str, Any]):
    """Top Hessian eigenvalue w.r.t. the LoRA factors at the stored factors (left) and at the
    balanced factorization of the same ``W`` (middle; shared y axis), and the trace with its
    confidence interval (right), over training; on mf the dotted line is F9's ``2 sigma_1(Y)``."""
    runs = data["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(2 * COLUMN_WIDTH, 2.5))
    ref = data.get("reference", {}).get("two_sigma1_Y")
    _eigenvalue_panel(axes[0], runs, "top_eigenvalue", ref, r"$\lambda_{\max}$ at the stored factors")
    _eigenvalue_panel(axes[1], runs, "top_eigenvalue_balanced", ref,
                      r"$\lambda_{\max}$ at the balanced factors")
    _trace_panel(axes[2], runs)
    eig = [v for run in runs for k in ("top_eigenvalue", "top_eigenvalue_balanced")
           for v in finite_or_nan(run[k])] + ([ref] if ref else [])
    for ax in axes[:2]:
        auto_log(ax, eig)
    finite = [v for v in eig if np.isfinite(v)]
    if finite and axes[0].get_yscale() == "linear":
        pad = 0.05 * (max(finite) - min(finite) or abs(max(finite)) or 1.0)
        for ax in axes[:2]:
            ax.set_ylim(min(finite) - pad, max(finite) + pad)
    auto_log(axes[2], [v for run in runs for v in finite_or_nan(run["trace"])])
    axes[0].set_ylabel(r"$\lambda_{\max}$ of the Hessian")
    axes[2].set_ylabel("trace")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, -0.01), fontsize=7)
    interval = data.get("trace_interval") or "confidence interval"
    fig.suptitle(f"Sharpness w.r.t. the LoRA factors ({data.get('task')}, {data.get('optimizer')}, "
                 f"seed {data.get('seed')}); trace bars: {interval}", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _layer_value_key(row: Mapping[str, Any]) -> str:
    for key in ("lambda_max", "top_eigenvalue", "value"):
        if key in row:
            return key
    raise ValueError(f"per-layer rows carry no eigenvalue (keys: {sorted(row)})")


def _layer_label(row: Mapping[str, Any], i: int) -> str:
    """``<block>.<module>`` from a PEFT pair name (``...layer.3.attention.self.query`` ->
    ``3.query``), else the name's tail."""
    name = str(row.get("layer", row.get("name", i))).split("[")[0]  # drop "[adapter]"
    parts = [p for p in name.split(".") if p]
    blocks = [p for p in parts if p.isdigit()]
    if blocks and parts:
        tail = parts[-1] if parts[-1] != "dense" else ".".join(parts[-2:])
        return f"{blocks[-1]}.{tail}"
    return name[-20:]


def plot_layer_sharpness(data: Mapping[str, Any]):
    """Per-layer (per LoRA pair) top Hessian eigenvalue at the final step, one row per method
    (log colour scale). ``data["per_layer"]``: ``{method: [row per layer]}``."""
    from matplotlib.colors import LogNorm

    per_layer = {m: rows for m, rows in data["per_layer"].items() if rows}
    methods = list(per_layer)
    key = _layer_value_key(per_layer[methods[0]][0])
    Z = np.array([[float(r[key]) for r in per_layer[m]] for m in methods])
    labels = [_layer_label(r, i) for i, r in enumerate(per_layer[methods[0]])]
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, 0.5 + 0.35 * len(methods) + 0.9))
    pos = Z[np.isfinite(Z) & (Z > 0)]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size and pos.max() > pos.min() else None
    im = ax.imshow(np.where(Z > 0, Z, np.nan), aspect="auto", cmap="magma", norm=norm)
    ax.set_yticks(range(len(methods)), [method_label(m) for m in methods], fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.grid(False)
    fig.colorbar(im, ax=ax, pad=0.01).set_label(r"$\lambda_{\max}$ of the layer's block", fontsize=7)
    rough = not all(bool(r.get("converged", True)) for rows in per_layer.values() for r in rows)
    fig.suptitle(f"Per-layer sharpness (each pair's own Hessian block) after {data.get('steps')} "
                 f"steps ({data.get('task')}, {data.get('optimizer')}, seed {data.get('seed')})"
                 + ("; not converged: Lanczos lower bounds" if rough else ""), fontsize=7.5)
    fig.tight_layout()
    return fig


def _publish_task(paths, data, land, out: Path, suffix: str) -> None:
    if data is not None:
        paths[f"sharpness{suffix}"] = publish(plot_sharpness(data), out / f"sharpness{suffix}", {
            "caption": f"top Hessian eigenvalue at the stored and at the balanced factors, and the "
                       f"trace with its {data.get('trace_interval')}, over training on "
                       f"{data['task']} ({data['optimizer']})",
            "data": f"sharpness{suffix}.csv"})
        if any(data.get("per_layer", {}).values()):
            paths[f"sharpness_layers{suffix}"] = publish(
                plot_layer_sharpness(data), out / f"sharpness_layers{suffix}", {
                    "caption": f"per-layer top Hessian eigenvalue at the last step on {data['task']}",
                    "data": f"sharpness{suffix}_layers.csv"})
    if land is not None:
        paths[f"landscape{suffix}"] = publish(plot_landscape(land), out / f"landscape{suffix}", {
            "caption": f"loss along start-to-solution and solution-to-solution lines, and the "
                       f"trajectories on their PCA plane (delta W) on {land['task']}",
            "data": f"landscape{suffix}.json, landscape{suffix}_1d.csv"})


def publish_sharpness_landscape(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 04's figures into ``out`` from ``{"sharpness", "landscape", "sharpness_real",
    "landscape_real"}`` (the real ones may be ``None``): ``sharpness``, ``landscape`` and, for
    the real model, ``sharpness_real``, ``sharpness_layers_real`` (when per-layer values were
    measured) and ``landscape_real``."""
    out = Path(out)
    paths: dict[str, dict] = {}
    _publish_task(paths, data["sharpness"], data["landscape"], out, "")
    _publish_task(paths, data.get("sharpness_real"), data.get("landscape_real"), out, "_real")
    return paths
