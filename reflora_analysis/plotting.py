r"""One figure style and one colour per method, shared by every notebook.

Every figure of the project goes through this module so that a method has the same
colour (and label) in every figure, figures are readable at one column width
(3.4 in, 8 pt text) and files are written atomically and reproducibly.

Colours follow the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies). Their assignment mirrors the paper's figures where it can, so a reader
can put ours next to theirs: LoRA black and RefLoRA red as in the paper's
matrix-factorization figure, ScaledGD purple, LoRA-RITE green.

========== ============ =============================================
method     colour       why
========== ============ =============================================
lora       black        paper, matrix factorization figure
lora+      grey         a LoRA variant: close to LoRA's black
scaledgd   purple       paper, matrix factorization figure
lora-rite  green        paper, GLUE loss curves
lora-pro   blue         distinct from every other
reflora    vermillion   paper (red)
reflora-s  orange       paper, matrix factorization (orange/red)
balance    sky blue     balanced projection (BaLoRA); distinct
========== ============ =============================================

Step sizes within one method are told apart by line style (:data:`STEP_LINESTYLES`),
as the paper does (solid for eta, dash-dot for 3 eta).

Files: :func:`save_figure` writes ``<stem>.png`` and ``<stem>.pdf`` atomically (temporary
file + rename, :mod:`reflora_analysis.io`) with PDF metadata that do not depend on the
wall clock (``SOURCE_DATE_EPOCH`` when set, otherwise no creation date), so the same data
give byte-identical PDFs. It also records the figure in ``figures.json`` next to it, the
manifest that :mod:`reflora_analysis.figures` turns into ``figures/index.md``.

The per-figure plotting functions (``plot_*``) take the plain data returned by
:mod:`reflora_analysis.experiments` and return the matplotlib figure; notebooks call one
experiment and one plotting function.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from .io import atomic_write_bytes, atomic_write_json

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "METHOD_MARKERS",
    "STEP_LINESTYLES",
    "COLUMN_WIDTH",
    "method_color",
    "method_label",
    "method_marker",
    "apply_style",
    "show",
    "publish",
    "save_figure",
    "finite_or_nan",
    "plot_mf_loss",
    "plot_mf_balance",
    "plot_bound_scan",
    "plot_bound_tightness",
    "plot_consistency",
    "consistency_markdown",
    "plot_balance_trajectories",
    "plot_sharpness",
    "plot_landscape",
    "plot_convergence",
    "plot_overhead",
]

METHOD_COLORS: dict[str, str] = {
    "lora": "#000000",
    "lora+": "#8c8c8c",
    "scaledgd": "#9b59b6",
    "lora-rite": "#009E73",
    "lora-pro": "#0072B2",
    "reflora": "#D55E00",
    "reflora-s": "#E69F00",
    "balance": "#56B4E9",
}

METHOD_LABELS: dict[str, str] = {
    "lora": "LoRA",
    "lora+": "LoRA+",
    "scaledgd": "ScaledGD",
    "lora-rite": "LoRA-RITE",
    "lora-pro": "LoRA-Pro",
    "reflora": "RefLoRA",
    "reflora-s": "RefLoRA-S",
    "balance": "Balance (BaLoRA)",
}

METHOD_MARKERS: dict[str, str] = {
    "lora": "o", "lora+": "v", "scaledgd": "s", "lora-rite": "D",
    "lora-pro": "^", "reflora": "*", "reflora-s": "P", "balance": "X",
}

#: line styles for the first, second, ... step size of one method (paper: solid, dash-dot)
STEP_LINESTYLES: tuple[str, ...] = ("-", "-.", ":", "--")

#: one column of a two-column paper, inches
COLUMN_WIDTH = 3.4

# colours for names outside the registry (a user's own method): stable per name
_EXTRA_COLORS = ("#7f3c8d", "#a5aa99", "#11a579", "#e73f74", "#3969ac", "#80ba5a")


def method_color(name: str) -> str:
    """The colour of method ``name`` (same in every figure).

    Registered methods get :data:`METHOD_COLORS`; any other name gets a colour chosen
    by a stable hash of the name (CRC32), so it too is the same in every figure.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"method name must be a non-empty str, got {name!r}")
    key = name.lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)]


def method_label(name: str) -> str:
    """Display name of method ``name`` (``"reflora-s"`` -> ``"RefLoRA-S"``)."""
    return METHOD_LABELS.get(name.lower(), name)


def method_marker(name: str) -> str:
    """Marker of method ``name`` (for scatter plots and black-and-white prints)."""
    return METHOD_MARKERS.get(name.lower(), "o")


def apply_style() -> None:
    """Set the project's matplotlib style: 8 pt text, thin grid, no top/right spines.

    Sized for a figure one column wide (:data:`COLUMN_WIDTH`); saved at 200 dpi so the
    PNG is sharp on a repository page. Idempotent.
    """
    plt.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 200,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.03,
        "font.size": 8,
        "axes.titlesize": 8.5,
        "axes.labelsize": 8,
        "legend.fontsize": 7,
        "legend.framealpha": 0.85,
        "legend.handlelength": 2.2,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "lines.linewidth": 1.4,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linewidth": 0.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # TrueType: text stays selectable / searchable in the PDF
        "svg.hashsalt": "reflora-analysis",
        "path.simplify": True,
    })


def _pdf_metadata(metadata: Mapping[str, Any]) -> dict:
    """PDF info dictionary independent of the wall clock.

    ``CreationDate`` is ``SOURCE_DATE_EPOCH`` (reproducible-builds convention) when set,
    otherwise omitted, so two runs on the same data give the same bytes.
    """
    info = {"Creator": "reflora-analysis", "Producer": f"matplotlib {matplotlib.__version__}"}
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        info["CreationDate"] = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    else:
        info["CreationDate"] = None
    info["ModDate"] = None
    if "title" in metadata:
        info["Title"] = str(metadata["title"])
    return info


def save_figure(fig, path_stem, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``fig`` to ``<path_stem>.png`` and ``<path_stem>.pdf`` atomically.

    Parameters
    ----------
    fig : matplotlib Figure.
    path_stem : path without suffix, e.g. ``figures/01_matrix_factorization/mf_loss``;
        its directory is created if missing.
    metadata : JSON-able description recorded in ``figures.json`` next to the files
        (e.g. ``{"caption": ..., "data": "mf_loss.csv"}``); ``"title"`` also goes into
        the PDF's info dictionary.

    Returns ``{"png": path, "pdf": path}``. Each file is rendered into memory first and
    then renamed into place, so a crash never leaves a half-written figure and a
    previous figure of the same name survives any failure.
    """
    metadata = dict(metadata or {})
    stem = Path(path_stem)
    if stem.suffix in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in ("png", "pdf"):
        buffer = io.BytesIO()
        if fmt == "pdf":
            fig.savefig(buffer, format="pdf", metadata=_pdf_metadata(metadata))
        else:
            fig.savefig(buffer, format="png", metadata={"Software": None})
        target = stem.with_suffix(f".{fmt}")
        atomic_write_bytes(target, buffer.getvalue())
        out[fmt] = str(target)
    manifest_path = stem.parent / "figures.json"
    manifest = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
    manifest[stem.name] = {"png": stem.name + ".png", "pdf": stem.name + ".pdf", **metadata}
    atomic_write_json(manifest_path, dict(sorted(manifest.items())))
    return out


def finite_or_nan(values: Sequence[float]) -> np.ndarray:
    """``values`` as a float array with +-inf replaced by NaN (matplotlib breaks the line)."""
    arr = np.array([_as_float(v) for v in values], dtype=float)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _as_float(v) -> float:
    """Numbers or the strict-JSON strings ``"nan"``, ``"inf"``, ``"-inf"`` as float."""
    if v is None:
        return math.nan
    return float(v)


def show(paths: Mapping[str, str] | Sequence[Mapping[str, str]]) -> None:
    """Display saved PNGs inline when running under IPython (no-op otherwise).

    The runner uses the non-interactive Agg backend, so the executed notebook shows the
    files exactly as written to disk.
    """
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    items = [paths] if isinstance(paths, Mapping) else list(paths)
    for item in items:
        display(Image(filename=item["png"]))


def publish(fig, path_stem, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """:func:`save_figure`, close ``fig``, then :func:`show` the saved PNG (in a notebook).

    Closing first keeps JupyterLab's inline backend from drawing the figure a second time;
    what the notebook shows is exactly the file on disk.
    """
    paths = save_figure(fig, path_stem, metadata)
    plt.close(fig)
    show(paths)
    return paths


def _stack(series: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of unequal length (a diverged run stops early) padded with NaN."""
    n = max((len(s) for s in series), default=0)
    out = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        out[i, :len(s)] = finite_or_nan(s)
    return out


def _line_with_band(ax, x, rows: np.ndarray, *, color, label, linestyle="-", band=True,
                    positive=False):
    """Median over rows (seeds) as a line, min-max as a shaded band."""
    with np.errstate(all="ignore"), _quiet_nanwarnings():
        rows = np.where(rows <= 0, np.nan, rows) if positive else rows
        mid = np.nanmedian(rows, axis=0) if len(rows) > 1 else rows[0]
        lo, hi = np.nanmin(rows, axis=0), np.nanmax(rows, axis=0)
    x = np.asarray(x[:len(mid)], dtype=float)
    (line,) = ax.plot(x, mid[:len(x)], color=color, linestyle=linestyle, label=label)
    if band and len(rows) > 1:
        ax.fill_between(x, lo[:len(x)], hi[:len(x)], color=color, alpha=0.18, linewidth=0)
    return line


class _quiet_nanwarnings:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _longest_steps(runs: Sequence[Mapping]) -> list[int]:
    return max((r["step"] for r in runs), key=len, default=[])


def _mark_divergence(ax, runs: Sequence[Mapping], color: str, top: float) -> bool:
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


def _auto_log(ax, values: Iterable[float], decades: float = 1.3) -> None:
    """Log y axis when the positive values span more than ``decades`` decades, else linear
    (a log axis over a narrow range only adds unreadable tick labels)."""
    vals = np.array([v for v in values if np.isfinite(v) and v > 0])
    if vals.size and np.log10(vals.max() / vals.min()) > decades:
        ax.set_yscale("log")


def _method_line_kw(method: str) -> dict:
    """Draw order and width: RefLoRA on top; Balance (identical to RefLoRA under SGD,
    BASELINES.md section 5) as a wide translucent halo under it, so both stay visible."""
    key = method.lower()
    if key == "balance":
        return {"linewidth": 3.2, "alpha": 0.55, "zorder": 2.0}
    order = {"reflora": 3.2, "reflora-s": 3.1}
    return {"zorder": order.get(key, 2.5)}


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
            rows = _stack([r["loss"] for r in sel])
            # a diverged run counts as "above the panel" for the rest of the run, so the
            # median over seeds leaves the panel when most seeds diverged (never the
            # median of the survivors only)
            for i, r in enumerate(sel):
                if r.get("status") == "diverged":
                    rows[i, np.isnan(rows[i])] = np.inf
            rows[rows > top] = top * 1e3
            line = _line_with_band(ax, _longest_steps(sel), rows, color=method_color(method),
                                   label=method_label(method), linestyle=ls, positive=True)
            line.set(**_method_line_kw(method))
            if _mark_divergence(ax, sel, method_color(method), top):
                n_div = sum(r.get("status") == "diverged" for r in sel)
                diverged_here.append(method_label(method)
                                     + (f" ({n_div}/{len(sel)} seeds)" if len(sel) > 1 else ""))
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.set_xlim(0, max(len(_longest_steps(runs)) - 1, 1))
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
        kw = _method_line_kw(method)
        rows = np.maximum(_stack([r["balance_gap"] for r in sel]), floor)
        _line_with_band(ax, _longest_steps(sel), rows, color=method_color(method),
                        label=method_label(method)).set(**kw)
        if all("norm_ratio" in r for r in sel):
            rows = _stack([r["norm_ratio"] for r in sel])
            _line_with_band(ax2, _longest_steps(sel), rows, color=method_color(method),
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


# ---------------------------------------------------------------------------------------
# 02 upper bounds
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# 03 consistency and balance
# ---------------------------------------------------------------------------------------

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
            kw = _method_line_kw(method)
            rows = np.maximum(_stack([r["balance_gap"] for r in sel]), floor)
            _line_with_band(ax, _longest_steps(sel), rows, color=method_color(method),
                            label=method_label(method)).set(**kw)
            if all(r.get("norm_ratio") for r in sel):
                _line_with_band(ax2, _longest_steps(sel), _stack([r["norm_ratio"] for r in sel]),
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


# ---------------------------------------------------------------------------------------
# 04 sharpness and landscape
# ---------------------------------------------------------------------------------------

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
        _auto_log(ax, [v for run in data["runs"] for v in finite_or_nan(run[key])]
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
                **_method_line_kw(run["method"]))
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


# ---------------------------------------------------------------------------------------
# 05 real model
# ---------------------------------------------------------------------------------------

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
        rows = np.stack([_running_mean(r, smooth) for r in _stack([r["loss"] for r in sel])])
        _line_with_band(ax, _longest_steps(sel), rows, color=method_color(method),
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


# ---------------------------------------------------------------------------------------
# 06 overhead
# ---------------------------------------------------------------------------------------

def plot_overhead(data: Mapping[str, Any]):
    """Throughput (training steps per second) and peak training memory per method, side by
    side (analogue of ``paper-throughput-memory.png``), machine name in the title."""
    res = data["results"]
    names = [r["method"] for r in res]
    colors = [method_color(m) for m in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.6))
    x = np.arange(len(res))
    thr = [r["steps_per_second"] for r in res]
    mem = [r["peak_memory_mb"] for r in res]
    b1 = ax1.bar(x, thr, color=colors, width=0.7)
    b2 = ax2.bar(x, mem, color=colors, width=0.7)
    rel = data.get("relative_time", {})
    for bar, r in zip(b1, res):
        ratio = rel.get(r["method"])
        txt = f"{r['steps_per_second']:.2f}" + (f"\n({ratio:.2f}x)" if ratio else "")
        ax1.annotate(txt, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=5.5, xytext=(0, 1), textcoords="offset points")
    for bar, r in zip(b2, res):
        ax2.annotate(f"{r['peak_memory_mb']:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=5.5, xytext=(0, 1), textcoords="offset points")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels([method_label(m) for m in names], rotation=45, ha="right")
        ax.grid(axis="x", visible=False)
        ax.margins(y=0.18)
    ax1.set_ylabel("throughput (steps/s)")
    ax1.set_title("training throughput (time relative to LoRA)")
    kind = res[0]["memory_kind"] if res else ""
    ax2.set_ylabel("peak training memory (MB)")
    ax2.set_title("peak memory " + ("(CUDA allocator)" if "cuda" in kind else "(CPU: peak RSS delta)"))
    machine = data.get("machine", {})
    steps = data.get("steps")
    fig.suptitle(f"Overhead per method, {data.get('task')} + {data.get('optimizer')}, "
                 f"on {machine.get('device_name', '?')}\n"
                 + (f"median of {steps} steps, methods interleaved round-robin on the same weights"
                    if data.get("interleave") else
                    f"median of {steps} steps per process; short runs vary by about 20%"),
                 fontsize=8)
    fig.tight_layout()
    return fig
