"""The Markdown page of a comparison (``summary.md``): :func:`summary_markdown`."""

from __future__ import annotations

import math

__all__ = ["summary_markdown"]


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{digits}g}"
    return str(x)


def summary_markdown(summary: dict) -> str:
    """A Markdown page of :func:`~reflora_analysis.stats.comparison.compare`'s result: one
    table row per method (mean ± sd [CI], paired difference and verdict, steps to the
    baseline's loss, loss AUC; NaN shown as ``–``, censored steps as ``≥``), then the rules
    recorded in its ``protocol`` and the per-method notes."""
    p = summary["protocol"]
    conf = f"{p['confidence']:.0%}"
    lines = [f"# {p['task']}: {', '.join(p['methods'])} ({p['optimizer']}, {p['steps']} steps)", ""]
    lines.append(f"| method | lr | {p['report']['column']} mean ± sd [{conf} CI] | n | "
                 f"Δ vs {p['baseline']} [{conf} CI] | verdict | steps to {p['baseline']}'s loss "
                 f"[{conf} CI] | loss AUC [{conf} CI] | Δ AUC [{conf} CI] |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        ge = "≥ " if r["steps_censored"] else ""
        failed = f" ({r['n_failed']} failed)" if r["n_failed"] else ""
        censored = f" ({r['steps_censored']} censored)" if r["steps_censored"] else ""
        lines.append(
            f"| {r['method']} | {_fmt(r['chosen_lr'])} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} "
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['n']}"
            f"{failed} | "
            f"{_fmt(r['diff_vs_baseline'])} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}] | "
            f"{r['verdict'] or '–'} | {ge}{_fmt(r['steps_to_target_mean'])} "
            f"[{_fmt(r['steps_to_target_ci_low'])}, {_fmt(r['steps_to_target_ci_high'])}]"
            f"{censored} | "
            f"{_fmt(r['auc_mean'])} [{_fmt(r['auc_ci_low'])}, {_fmt(r['auc_ci_high'])}] | "
            f"{_fmt(r['auc_diff_mean'])} [{_fmt(r['auc_diff_ci_low'])}, {_fmt(r['auc_diff_ci_high'])}] |")
    notes = [f"- {r['method']}: {r['notes']}" for r in summary["rows"] if r["notes"]]
    sel, rep = p["selection"], p["report"]
    lines += ["", "## Protocol", "",
              f"- lr selection: {sel['rule']}; column `{sel['column']}` ({sel['direction']}), "
              f"seeds {sel['seeds']}.",
              f"- report: `{rep['column']}` on seeds {rep['seeds']}; {rep['interval']}."]
    if rep["warning"]:
        lines.append(f"- **note**: {rep['warning']}.")
    if p.get("verdict_rule"):
        lines.append(f"- verdict: {p['verdict_rule']}.")
    sp = p["speed"]
    lines += [f"- smoothed loss: {sp['smoothed_loss']}; steps to target: {sp['steps_to_target']} "
              f"(target: {sp['target']}).",
              f"- censoring: {sp['censoring']}.",
              f"- loss AUC: {sp['auc_loss']}."]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
