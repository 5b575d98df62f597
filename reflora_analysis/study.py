r"""A study's evidence from finished sweep folders (one per task): figures, tables, a report.

Each folder must hold a finished :func:`reflora_analysis.sweep.tune_then_test` (or
``run_sweep`` + ``summarize``): ``sweep.json``, ``results.json``, ``protocol.json``, read by
:mod:`reflora_analysis.study_sweep` (:func:`load_sweep`). Nothing is recomputed by hand: the
numbers are :func:`reflora_analysis.sweep.summarize` (``write=False``, i.e.
:func:`reflora_analysis.stats.compare`) at the lrs, seeds and split of ``protocol.json``.

:func:`write_study_report` writes, in the paper's form (its GLUE table, its loss curves), per
task ``loss_curves_<task>`` and ``lr_sensitivity_<task>`` (PNG + PDF) and ``speed_<task>.md/.csv``,
then ``paper_table.md/.csv``, ``study.json`` (parameters, machine, wall time, command) and
``README.md`` (what the numbers show, in sentences generated from them, whichever way they
come out). Command line: ``python -m reflora_analysis.study SWEEP_DIR... --out DIR --title T``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.signal import lfilter

from . import stats, sweep
from .io import atomic_write_json, atomic_write_text, write_csv_atomic
from .study_sweep import DONE, StudySweep, as_sweep, load_all, load_sweep

try:  # the project's figure style (one colour per method, reproducible PNG/PDF files)
    from .plotting import apply_style, method_color, method_label, save_figure
except ImportError:  # plotting unavailable: matplotlib's defaults, reproducible metadata
    def apply_style() -> None: """matplotlib's defaults."""
    def method_color(name: str) -> str: return {"lora": "k", "reflora": "#D55E00"}.get(name, "#0072B2")
    def method_label(name: str) -> str: return {"lora": "LoRA", "reflora": "RefLoRA"}.get(name, name)

    def save_figure(fig, path_stem, metadata=None) -> dict[str, str]:
        stem = Path(str(path_stem).removesuffix(".png").removesuffix(".pdf"))
        stem.parent.mkdir(parents=True, exist_ok=True)
        for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
            fig.savefig(stem.with_suffix(f".{fmt}"), format=fmt, metadata=meta, bbox_inches="tight")
        return {fmt: str(stem.with_suffix(f".{fmt}")) for fmt in ("png", "pdf")}

__all__ = ["StudySweep", "load_sweep", "loss_curves_figure", "lr_sensitivity_figure", "paper_table",
           "speed_table", "study_sentences", "machine_info", "write_study_report", "add_arguments",
           "run_command", "command", "FORMAT", "PERCENT_METRICS"]

FORMAT = "reflora-study/1"
#: metrics in [0, 1] shown in percent (differences in percentage points, pp)
PERCENT_METRICS = ("accuracy", "f1", "matthews_correlation", "exact_match")
_CELL_FIELDS = ("metric", "split", "chosen_lr", "n", "mean", "std", "diff", "diff_ci_low",
                "diff_ci_high", "n_pairs", "verdict")
_SPEED_FIELDS = ("method", "chosen_lr", "n", "steps_censored") + tuple(
    f"{k}_{s}" for k in ("steps_to_target", "steps_diff", "auc", "auc_diff")
    for s in ("mean", "ci_low", "ci_high"))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x, metric: str = "", kind: str = "value") -> str:
    """A number for a table: accuracy-like metrics in percent (differences in pp), steps with
    up to 4 digits, others with 4 (value), 2 (spread) or 3 (signed diff) significant digits."""
    if not _finite(x):
        return "–" if x is None or math.isnan(x) else ("+inf" if x > 0 else "-inf")
    sign = "+" if kind == "diff" else ""
    if stats.bare_metric(metric) in PERCENT_METRICS:
        return f"{100 * x:{sign}.1f}"
    if metric == "steps":
        return f"{x:{sign}.4g}"
    return f"{x:{sign}#.{ {'value': 4, 'spread': 2, 'diff': 3}[kind] }g}"


def _unit(metric: str, diff: bool = False) -> str:
    return (" pp" if diff else " %") if stats.bare_metric(metric) in PERCENT_METRICS else ""


def _interval_text(mean, low, high, metric, n_pairs, confidence) -> str:
    text = f"{_fmt(mean, metric, 'diff')}{_unit(metric, diff=True)}"
    if not (_finite(low) and _finite(high)):
        return f"{text} (only {n_pairs} paired seed(s): no interval)"
    return (f"{text} [{_fmt(low, metric, 'diff')}, {_fmt(high, metric, 'diff')}] "
            f"({confidence:.0%} CI, {n_pairs} paired seeds)")


def _metric_name(sw: StudySweep, short: bool = False) -> str:
    """``test accuracy (higher is better)``, or with ``short`` ``test accuracy ↑``."""
    arrow = ("↑" if short else "(higher is better)") if sw.direction == "max" else \
        ("↓" if short else "(lower is better)")
    return f"{'test' if sw.split == 'test' else 'validation'} {sw.metric} {arrow}"


def _figure_title(headline: str, detail: str, note: str | None) -> str:
    """A figure's title: ``headline``, ``detail`` on the next line and, when given, ``(note)``
    on a last line (e.g. ``quick: pipeline demonstration, not evidence``: the figure says it
    itself, not only its caption)."""
    return f"{headline}\n{detail}" + (f"\n({note})" if note else "")


def loss_curves_figure(sweep_dir, out_path, *, ema: float | None = None, band: str = "iqr",
                       log_y: bool | None = None, note: str | None = None) -> dict:
    """Training loss vs step of each method at its chosen lr: median over the report (test)
    seeds, band = interquartile (``band="iqr"``) or min-max range, stated in the title; ``ema``
    in [0, 1) smooths each seed's curve first (stated in the legend); ``log_y`` None: log when
    the losses span > 1.3 decades; ``note``: a last title line (:func:`_figure_title`). A
    diverged run's curve ends at its divergence. Writes ``out_path`` (.png and .pdf); returns
    ``{"png", "pdf", "caption"}``."""
    sw = as_sweep(sweep_dir)
    if band not in ("iqr", "minmax"):
        raise ValueError(f"band must be 'iqr' or 'minmax', got {band!r}")
    if ema is not None and not (_finite(ema) and 0 <= ema < 1):
        raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
    apply_style()
    fig = Figure(figsize=(3.4, 2.6))
    ax, drawn, diverged = fig.add_subplot(), [], 0
    for m in sw.summary["protocol"]["methods"]:
        rows = [r for r in sw.cell_rows(m, sw.report_seeds) if r["status"] in DONE]
        if not rows:
            continue
        diverged += sum(r["status"] == "diverged" for r in rows)
        curves = sweep.load_curves(sw.path, rows)
        stack = np.full((len(rows), max(len(c) for c in curves.values())), np.nan)
        for i, r in enumerate(rows):
            c = np.asarray(curves[r["run_id"]], dtype=float)
            c[~np.isfinite(c)] = np.nan
            # EMA y_t = ema y_{t-1} + (1 - ema) x_t, y_0 = x_0 (NaN after a divergence stays NaN)
            stack[i, :len(c)] = lfilter([1 - ema], [1, -ema], c, zi=[ema * c[0]])[0] if ema else c
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps after divergence
            q = (25, 50, 75) if band == "iqr" else (0, 50, 100)
            lo, mid, hi = np.nanpercentile(stack, q, axis=0)
        x, color = np.arange(stack.shape[1]), method_color(m)
        ax.plot(x, mid, color=color, label=f"{method_label(m)} (lr {sw.chosen[m]:g})")
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
        drawn.append(stack)
    values = np.concatenate([s.ravel() for s in drawn]) if drawn else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if log_y or (log_y is None and values.size and np.log10(values.max() / values.min()) > 1.3):
        ax.set_yscale("log")
    what = "interquartile range" if band == "iqr" else "min-max range"
    title = f"{sw.label}: training loss at each method's chosen lr"
    ax.set(xlabel="step", ylabel="training loss", title=_figure_title(
        title, f"median over {len(sw.report_seeds)} seeds, band: {what}", note))
    ax.legend(title=f"EMA {ema:g} of each seed's loss" if ema else "per-step loss (no smoothing)")
    caption = (f"{title}; median over the report seeds {sw.report_seeds}, band = {what}"
               + (f"; each seed smoothed by an EMA of factor {ema:g}" if ema else "")
               + (f"; {diverged} diverged run(s) end at their divergence" if diverged else ""))
    meta = {"title": title + (f" ({note})" if note else ""), "caption": caption}
    return {**save_figure(fig, out_path, metadata=meta), "caption": caption}


def _lr_points(sw: StudySweep, method: str, column: str, band: str):
    """Per lr: (lr, mean, low, high, usable runs) of ``column`` over the selection seeds (an lr
    is eligible only when every selection seed is usable: ``stats.select_lr``'s rule)."""
    out = []
    for lr in sorted({float(r["lr"]) for r in sw.rows if r["method"] == method}):
        vals = [float(r[column]) for r in sw.cell_rows(method, sw.selection_seeds, lr)
                if r["status"] == "finished" and _finite(r.get(column))]
        mean = math.fsum(vals) / len(vals) if vals else math.nan
        lo = hi = mean
        if band == "t" and len(vals) >= 2:
            lo, hi = (lambda iv: (iv.low, iv.high))(stats.t_interval(vals, sw.confidence))
        elif band == "minmax" and vals:
            lo, hi = min(vals), max(vals)
        out.append((lr, mean, lo, hi, len(vals)))
    return out


def lr_sensitivity_figure(sweep_dir, out_path, *, metric: str | None = None,
                          band: str = "t", note: str | None = None) -> dict:
    """Validation ``metric`` (default: the protocol's) vs learning rate (log x) per method:
    mean over the tuning seeds, band = t interval at the protocol's confidence (95 %;
    ``band="t"``) or min-max range, the chosen lr ringed; ``note``: a last title line
    (:func:`_figure_title`). Diverged / failed runs are left out (counted in the caption).
    Writes ``out_path`` (.png and .pdf); returns ``{"png", "pdf", "caption"}``."""
    sw = as_sweep(sweep_dir)
    if band not in ("t", "minmax"):
        raise ValueError(f"band must be 't' or 'minmax', got {band!r}")
    metric = stats.bare_metric(metric or sw.metric)
    column = f"val_{metric}"
    if not any(column in r for r in sw.rows):
        raise ValueError(f"{sw.path}: no validation metric {metric!r} in the results table")
    apply_style()
    fig = Figure(figsize=(3.4, 2.6))
    ax, left_out = fig.add_subplot(), 0
    for m in sw.summary["protocol"]["methods"]:
        lr, mean, lo, hi, n = (np.array(v, dtype=float) for v in zip(*_lr_points(sw, m, column, band)))
        bad = n < len(sw.selection_seeds)  # not eligible: drawn as x at the top, not as a mean
        left_out += int(np.sum(len(sw.selection_seeds) - n))
        mean, lo, hi, color = *(np.where(bad, np.nan, a) for a in (mean, lo, hi)), method_color(m)
        ax.plot(lr, mean, marker="o", markersize=3, color=color, label=method_label(m))
        ax.fill_between(lr, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(lr[bad], np.full(bad.sum(), 0.97), "x", color=color, transform=ax.get_xaxis_transform(),
                label=f"{method_label(m)}: lr not eligible (a seed diverged)" if bad.any() else "_")
        if sw.chosen.get(m) is not None and float(sw.chosen[m]) in lr:
            ax.plot([sw.chosen[m]], [mean[list(lr).index(float(sw.chosen[m]))]], marker="o",
                    markersize=9, markerfacecolor="none", markeredgecolor=color, linestyle="none")
    ticks = sorted({float(r["lr"]) for r in sw.rows})
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks], rotation=30 if len(ticks) > 4 else 0)
    ax.minorticks_off()
    what = f"{sw.confidence:.0%} t interval" if band == "t" else "min-max range"
    title = f"{sw.label}: validation {metric} vs learning rate"
    ax.set(xlabel="learning rate", ylabel=f"validation {metric}", title=_figure_title(
        title, f"mean over {len(sw.selection_seeds)} tuning seeds, band: {what}, ring: chosen lr",
        note))
    ax.legend()
    caption = (f"{title}; mean over the tuning seeds {sw.selection_seeds}, band = {what}; "
               f"ring = the lr chosen on validation ({sw.summary['protocol']['selection']['column']})"
               + (f"; {left_out} run(s) diverged, failed or missing, left out; x at the top: an lr "
                  "not eligible (some tuning seed unusable)" if left_out else ""))
    meta = {"title": title + (f" ({note})" if note else ""), "caption": caption}
    return {**save_figure(fig, out_path, metadata=meta), "caption": caption}


def _cell(sw: StudySweep, row: Mapping) -> dict:
    extra = {"metric": sw.metric, "split": sw.split, "diff": row["diff_vs_baseline"]}
    return {k: extra[k] if k in extra else row[k] for k in _CELL_FIELDS}


def _cell_markdown(sw: StudySweep, cell: Mapping | None) -> str:
    if cell is None:
        return "–"
    if cell["chosen_lr"] is None:
        return "no eligible lr"
    text = f"{_fmt(cell['mean'], sw.metric)} ± {_fmt(cell['std'], sw.metric, 'spread')}" + (
        f" (n = {cell['n']})" if cell["n"] != len(sw.report_seeds) else "")
    if cell["verdict"] not in ("", "baseline"):
        d = [_fmt(cell[k], sw.metric, "diff") for k in ("diff", "diff_ci_low", "diff_ci_high")]
        text += f"<br>Δ {d[0]} [{d[1]}, {d[2]}] {cell['verdict']}"
    return text


def paper_table(sweep_dirs, metric: str | None = None, *, baseline: str | None = None,
                out_dir=None) -> tuple[str, list[dict]]:
    """The paper's table: a row per method, a column per task and an Average column. A cell:
    the report metric (test; validation where the task has none, said in the header) at the
    method's chosen lr, mean ± sample std over the report seeds, and for a non-baseline method
    the paired difference Δ to the baseline with its t interval and ``compare``'s verdict.
    Average: the unweighted mean of the task means (NaN when a task lacks the method).
    Returns ``(markdown, rows)``; a row: ``method``, ``label``, ``<task>:<field>`` for
    ``_CELL_FIELDS``, ``average``. ``out_dir``: also write ``paper_table.md/.csv`` there."""
    sweeps = load_all(sweep_dirs, metric, baseline)
    methods = list(dict.fromkeys(m for sw in sweeps for m in sw.summary["protocol"]["methods"]))
    bases = {sw.baseline for sw in sweeps}
    methods.sort(key=lambda m: m not in bases)  # the baseline first, then in order
    rows, lines = [], []
    for m in methods:
        row = {"method": m, "label": method_label(m)}
        cells = [sw.by_method.get(m) for sw in sweeps]
        for sw, r in zip(sweeps, cells):
            cell = _cell(sw, r) if r is not None else dict.fromkeys(_CELL_FIELDS, math.nan)
            row.update({f"{sw.label}:{k}": v for k, v in cell.items()})
        means = [row[f"{sw.label}:mean"] for sw in sweeps]
        row["average"] = math.fsum(means) / len(means) if all(map(_finite, means)) else math.nan
        rows.append(row)
        lines.append([row["label"]] + [_cell_markdown(sw, _cell(sw, r) if r else None)
                                       for sw, r in zip(sweeps, cells)]
                     + [_fmt(row["average"], sweeps[0].metric)])
    header = ["Method"] + [f"{sw.label}: {_metric_name(sw, True)}{_unit(sw.metric)}" for sw in sweeps]
    n = ", ".join(map(str, sorted({len(s.report_seeds) for s in sweeps})))
    markdown = _markdown_table(header + ["Average"], lines) + (
        f"\nCells: mean ± sample std over the report seeds (n = {n}; fewer where runs diverged or "
        f"failed) at each method's lr chosen on validation. Δ: paired (by seed) difference to "
        f"{method_label(sweeps[0].baseline or '-')}, mean and {sweeps[0].confidence:.0%} t interval; "
        "better / worse only when it excludes 0, else not separated. Average: unweighted mean of "
        "the task columns" + (" (the tasks report different metrics or splits: read it with care)"
                              if len({(s.metric, s.split) for s in sweeps}) > 1 else "") + ".\n")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_dir) / "paper_table.md", markdown)
        columns = list(rows[0]) if rows else ["method"]
        write_csv_atomic(Path(out_dir) / "paper_table.csv", columns, ([r[c] for c in columns]
                                                                      for r in rows))
    return markdown, rows


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def _ci(r: Mapping, key: str, kind: str = "value") -> str:
    """``mean [low, high]`` of the speed columns ``<key>_mean/_ci_low/_ci_high``; with
    censored runs (steps to target) as lower bounds ``≥``."""
    lower = "≥ " if key == "steps_to_target" and r["steps_censored"] else ""
    unit = "steps" if key.startswith("steps") else "loss"
    return "{} [{}, {}]".format(*(lower * _finite(v) + _fmt(v, unit, kind)
                                 for v in (r[f"{key}_mean"], r[f"{key}_ci_low"], r[f"{key}_ci_high"])))


def speed_table(sweep_dir) -> tuple[str, list[dict]]:
    """Speed per method at its chosen lr (``compare``'s speed columns): steps to reach the
    baseline's smoothed final training loss of the same seed (never: censored, entering as
    steps + 1, a lower bound shown with ≥) and area under the training-loss curve, each with
    its t interval and paired difference to the baseline. Returns ``(markdown, rows)``."""
    sw = as_sweep(sweep_dir)
    rows = [{k: r[k] for k in _SPEED_FIELDS} for r in sw.summary["rows"]]
    base, steps = method_label(sw.baseline or "-"), sw.summary["protocol"]["steps"]
    lines = [[method_label(r["method"]), "–" if r["chosen_lr"] is None else f"{r['chosen_lr']:g}",
              _ci(r, "steps_to_target") + (f" ({r['steps_censored']}/{r['n']} never)"
                                           if r["steps_censored"] else ""),
              "baseline" if r["method"] == sw.baseline else _ci(r, "steps_diff", "diff"),
              _ci(r, "auc"), "baseline" if r["method"] == sw.baseline else _ci(r, "auc_diff", "diff")]
             for r in rows]
    header = ["Method", "lr", f"steps to {base}'s final loss", f"Δ steps vs {base}",
              "loss AUC", f"Δ AUC vs {base}"]
    legend = (f"\nSteps: first step whose smoothed training loss (mean of the last "
              f"{stats.smooth_window(steps)} logged losses) is <= {base}'s smoothed final loss on "
              f"the same seed; AUC: mean training loss over steps 0..{steps}. Means with "
              f"{sw.confidence:.0%} t intervals over the seeds {sw.report_seeds}; ≥: runs that "
              "never reached it enter as steps + 1, a lower bound.\n")
    return f"# {sw.label}: speed\n\n" + _markdown_table(header, lines) + legend, rows


def _speed_sentence(sw: StudySweep, r: Mapping, base: str) -> str:
    """Steps and AUC of one method against the baseline, with intervals and verdicts."""
    steps = sw.summary["protocol"]["steps"]
    auc = stats.Interval(mean=r["auc_diff_mean"], std=math.nan, low=r["auc_diff_ci_low"],
                         high=r["auc_diff_ci_high"], half_width=math.nan, n=r["n"],
                         confidence=sw.confidence)
    base_steps = sw.by_method[sw.baseline]["steps_to_target_mean"]
    text = (f"  Speed: {'≥ ' * bool(r['steps_censored'])}{_fmt(r['steps_to_target_mean'], 'steps')} "
            f"steps on average ({base}: {_fmt(base_steps, 'steps')}) to reach {base}'s smoothed "
            f"final training loss (runs of {steps} steps)")
    if r["steps_censored"]:
        text += f" (never reached on {r['steps_censored']} of {r['n']} seeds: a lower bound)"
    return (text + f"; area under the training-loss curve difference "
            f"{_interval_text(auc.mean, auc.low, auc.high, 'loss', r['n'], sw.confidence)}: "
            f"{stats.verdict(auc, 'min')} (lower is faster).")


def study_sentences(sweep_dirs, metric: str | None = None, baseline: str | None = None) -> list[str]:
    """What the numbers show, one sentence per (task, method other than the baseline), from
    the summaries only: the paired difference to the baseline on the report metric with its
    interval and verdict, the speed numbers, the protocol's warnings and notes; then per
    method the count of verdicts over the tasks."""
    out, tally = [], {}
    for sw in load_all(sweep_dirs, metric, baseline):
        base = method_label(sw.baseline) if sw.baseline else None
        for r in sw.summary["rows"]:
            if r["verdict"] in ("", "baseline"):
                continue
            if r["chosen_lr"] is None:
                out.append(f"{method_label(r['method'])} on {sw.label}: no eligible lr (every lr "
                           "diverged or failed on some tuning seed): nothing to compare.")
                continue
            out.append(f"{method_label(r['method'])} vs {base} on {sw.label}: {_metric_name(sw)} "
                       "difference " + _interval_text(r["diff_vs_baseline"], r["diff_ci_low"],
                                                      r["diff_ci_high"], sw.metric, r["n_pairs"],
                                                      sw.confidence) + f": {r['verdict']}.")
            out[-1] += "\n" + _speed_sentence(sw, r, base)
            tally.setdefault((r["method"], base), []).append(r["verdict"])
        warning = sw.summary["protocol"]["report"].get("warning")
        notes = [f"{method_label(r['method'])}: {r['notes']}" for r in sw.summary["rows"] if r["notes"]]
        if warning or notes:
            out.append(f"Caveats on {sw.label}: " + "; ".join([warning] * bool(warning) + notes) + ".")
    for (m, base), verdicts in tally.items():
        out.append(f"Over {len(verdicts)} task(s), {method_label(m)} vs {base}: " + ", ".join(
            f"{verdicts.count(v)} {v}" for v in ("better", "worse", "not separated")) + ".")
    return out


def machine_info() -> dict:
    """Platform, CPU model (``/proc/cpuinfo``), logical cores, Python and torch versions."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        cpu = None
    torch = next((d.version for d in importlib.metadata.distributions(name="torch")), None)
    return {"platform": platform.platform(), "cpu": cpu or platform.processor() or None,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch}


def _sweep_record(sw: StudySweep) -> dict:
    p = sw.summary["protocol"]
    return {"dir": str(sw.path), "label": sw.label, "task": sw.task, "settings": sw.settings,
            "grid": sw.protocol.get("grid"), "protocol": sw.protocol.get("protocol", "summarize"),
            "baseline": p["baseline"], "confidence": p["confidence"],
            "selection": {k: p["selection"][k] for k in ("column", "direction", "seeds", "chosen_lr")},
            "report": {k: p["report"][k] for k in ("split", "column", "seeds", "warning")},
            "runs": len(sw.rows),
            "runs_wall_time_s": math.fsum(r["wall_time_s"] for r in sw.rows
                                          if _finite(r.get("wall_time_s")))}


def write_study_report(sweep_dirs, out_dir, *, title: str, machine: Mapping | None = None,
                       wall_time_s: float | None = None, command: str | None = None,
                       metric: str | None = None, baseline: str | None = None,
                       ema: float | None = None, band: str = "iqr",
                       title_note: str | None = None) -> dict:
    """Write the study of ``sweep_dirs`` (finished sweep folders, one per task) into
    ``out_dir``: the figures and tables above (``title_note``: a last line of every figure
    title, e.g. that the study is a pipeline demonstration), ``study.json`` (each sweep's
    parameters from ``sweep.json`` / ``protocol.json``; ``machine`` merged over
    :func:`machine_info`; ``wall_time_s``, ``command``; files; sentences) and ``README.md``.
    Returns study.json's content."""
    started = time.perf_counter()
    sweeps = load_all(sweep_dirs, metric, baseline)
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"figures": {}, "tables": ["paper_table.md", "paper_table.csv"]}
    speed_md = []
    for sw in sweeps:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", sw.label).strip("_") or "task"
        for name, make in (("loss_curves", lambda p: loss_curves_figure(sw, p, ema=ema, band=band,
                                                                         note=title_note)),
                           ("lr_sensitivity", lambda p: lr_sensitivity_figure(sw, p, note=title_note))):
            paths = make(out / f"{name}_{slug}")
            files["figures"][f"{name}_{slug}"] = {k: v if k == "caption" else Path(v).name
                                                  for k, v in paths.items()}
        md, rows = speed_table(sw)
        atomic_write_text(out / f"speed_{slug}.md", md)
        write_csv_atomic(out / f"speed_{slug}.csv", _SPEED_FIELDS,
                         ([r[k] for k in _SPEED_FIELDS] for r in rows))
        files["tables"] += [f"speed_{slug}.md", f"speed_{slug}.csv"]
        speed_md.append(md)
    table_md, _ = paper_table(sweeps, out_dir=out)
    sentences = study_sentences(sweeps)
    study = {"format": FORMAT, "title": title, "command": command, "wall_time_s": wall_time_s,
             "report_time_s": round(time.perf_counter() - started, 3),
             "machine": {**machine_info(), **dict(machine or {})},
             "parameters": {"metric": metric, "baseline": baseline, "ema": ema, "band": band,
                            "title_note": title_note},
             "sweeps": [_sweep_record(sw) for sw in sweeps], "files": files, "sentences": sentences}
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "README.md", _readme(title, sweeps, sentences, table_md, speed_md, study))
    return study


def _readme(title, sweeps, sentences, table_md, speed_md, study) -> str:
    """``README.md``: what the numbers show (generated), the tables, the figures, the rules."""
    p = sweeps[0].summary["protocol"]
    lines = [f"# {title}", "",
             f"Generated by `reflora_analysis.study` from {len(sweeps)} sweep folder(s): "
             + ", ".join(f"`{sw.path}` ({sw.label})" for sw in sweeps) + ".", ""]
    if study["command"]:
        lines += [f"Command: `{study['command']}`", ""]
    m = study["machine"]
    lines += [f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('platform')}, torch "
              f"{m.get('torch')}" + (f"; wall time {study['wall_time_s']:.0f} s"
                                     if _finite(study["wall_time_s"]) else "")
              + ".", "", "## What the numbers show", ""]
    lines += [f"- {s}" for s in sentences] + ["", "## Results table", "", table_md, "## Speed", ""]
    lines += [md.replace("# ", "### ", 1) for md in speed_md]
    lines += ["## Figures", ""] + [f"- [{k}]({v['png']}) ([PDF]({v['pdf']})): {v['caption']}"
                                   for k, v in study["files"]["figures"].items()]
    lines += ["", "## Rules", "", f"- lr selection: {p['selection']['rule']}.",
              f"- interval: {p['report']['interval']}."]
    if p.get("verdict_rule"):
        lines.append(f"- verdict: {p['verdict_rule']}.")
    lines += ["", "Parameters, machine and files: `study.json`."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ``study`` command."""
    add = parser.add_argument
    add("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="finished sweep folders (one per task)")
    add("--out", required=True, help="output folder of the report")
    add("--title", required=True, help="title of README.md")
    add("--metric", default=None, help="report metric (default: each protocol's)")
    add("--baseline", default=None, help="baseline method (default: each protocol's)")
    add("--ema", type=float, default=None, help="EMA factor in [0, 1) for the loss curves")
    add("--band", choices=("iqr", "minmax"), default="iqr", help="loss-curve band (default iqr)")
    add("--wall-time-s", type=float, default=None, help="the study's wall time, for study.json")


def run_command(args: argparse.Namespace, command_line: str | None = None) -> int:
    """Write the report for parsed ``args``; prints the sentences. Bad input raises ValueError."""
    study = write_study_report(args.sweep_dirs, args.out, title=args.title, metric=args.metric,
                               baseline=args.baseline, ema=args.ema, band=args.band,
                               wall_time_s=args.wall_time_s, command=command_line)
    print("\n".join(study["sentences"]) + f"\nreport: {Path(args.out) / 'README.md'}")
    return 0


def command(argv: Sequence[str] | None = None) -> int:
    """``python -m reflora_analysis.study SWEEP_DIR... --out DIR --title TITLE``: exit status
    0, or 2 with ``reflora-analysis: error: ...`` on stderr for bad input (e.g. an unfinished
    sweep)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m reflora_analysis.study",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args, "python -m reflora_analysis.study " + shlex.join(argv))
    except ValueError as exc:
        print(f"reflora-analysis: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(command())
