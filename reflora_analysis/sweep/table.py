"""The results table of a sweep folder: one row per run, read from the run folders.

A run folder ``runs/<run_id>/`` holds ``config.json`` (written before the run),
``run.jsonl`` / ``run.meta.json`` (``train.run``'s log) and ``result.json`` (outcome and
metrics, written last). Its row (:data:`RESULT_COLUMNS`, then ``val_<metric>`` and
``test_<metric>``, sorted; NaN where a run lacks one):

* ``final_loss``: the last logged training loss;
* ``smoothed_final_loss``: the mean of the last ``k = stats.smooth_window(steps)`` logged
  losses, and ``auc_loss``: the mean loss over steps ``0..steps``, both only for a run that
  finished with every step logged (``+inf`` for a diverged run, NaN otherwise);
* measured floats rounded to 10 significant digits (``io.round_significant``); ``lr`` exact.

:func:`write_table` rewrites ``results.csv`` and ``results.json`` atomically (rows sorted by
method, lr, seed); :func:`load_results` and :func:`load_curves` read them back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from .. import stats
from ..io import (atomic_write_json, decode_nonfinite, read_json, read_json_lines, round_significant,
                  to_jsonable, write_csv_atomic)

__all__ = ["RESULT_COLUMNS", "FORMAT", "write_table", "load_results", "load_curves", "loss_curve",
           "read_json_or_none", "as_stored"]

FORMAT = "reflora-sweep/1"

#: fixed columns of the results table; then ``val_<metric>`` and ``test_<metric>`` (sorted)
RESULT_COLUMNS = ["run_id", "task", "method", "optimizer", "lr", "seed", "steps", "status",
                  "message", "final_step", "final_loss", "smoothed_final_loss", "smooth_window",
                  "auc_loss", "wall_time_s", "hparams", "run_dir"]


def read_json_or_none(path: Path):
    """The decoded JSON at ``path`` (non-finite strings back to floats), or None."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def as_stored(obj):
    """``obj`` as it reads back from a JSON file written at full precision."""
    return decode_nonfinite(to_jsonable(obj))


def _round_floats(row: dict) -> dict:
    """Measured floats to the data files' 10 significant digits (``io.DATA_SIGNIFICANT_DIGITS``:
    reruns with another summation order give the same table); ``lr`` stays exact (identity)."""
    return {k: round_significant(v) if isinstance(v, float) and k != "lr" else v
            for k, v in row.items()}


def loss_curve(run_dir: Path) -> list[float]:
    """Training loss per step, from ``run.jsonl`` (the sweep logs every step)."""
    path = run_dir / "run.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for record in read_json_lines(path):
        if "loss" in record and "step" in record:
            by_step[int(record["step"])] = float(record["loss"])
    return [by_step[t] for t in sorted(by_step)]


def _row(run_dir: Path) -> dict | None:
    """The results-table row of one run folder, or None while its outcome is unknown."""
    config = read_json_or_none(run_dir / "config.json")
    result = read_json_or_none(run_dir / "result.json")
    if config is None or result is None:
        return None
    meta = read_json_or_none(run_dir / "run.meta.json") or {}
    steps, status = int(config["steps"]), result["status"]
    curve = loss_curve(run_dir)
    window = stats.smooth_window(steps)
    nan = float("nan")
    final_loss = curve[-1] if curve else nan
    smoothed = auc = nan
    if status == "finished" and len(curve) == steps + 1:
        smoothed = stats.trailing_mean(curve, window)[-1]
        auc = math.fsum(curve) / len(curve)
    elif status == "diverged":  # the loss is taken as +inf from the divergence on
        smoothed = auc = math.inf
    row = {"run_id": config["run_id"], "task": config["task"], "method": config["method"],
           "optimizer": config["optimizer"], "lr": float(config["lr"]), "seed": int(config["seed"]),
           "steps": steps, "status": status, "message": result.get("message", ""),
           "final_step": meta.get("final_step"), "final_loss": final_loss,
           "smoothed_final_loss": smoothed, "smooth_window": window, "auc_loss": auc,
           "wall_time_s": meta.get("elapsed", nan),
           "hparams": json.dumps(to_jsonable(config["hparams"]), sort_keys=True),
           "run_dir": f"runs/{config['run_id']}"}
    val, test = result.get("validation") or {}, result.get("test")
    for name in val:
        row[f"val_{name}"] = float(val[name])
        row[f"test_{name}"] = float(test[name]) if test and name in test else nan
    for name in (test or {}):
        row.setdefault(f"test_{name}", float(test[name]))
        row.setdefault(f"val_{name}", nan)
    return _round_floats(row)


def _columns(rows: Sequence[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r if k not in RESULT_COLUMNS})
    return RESULT_COLUMNS + [k for k in extra if k.startswith("val_")] + \
        [k for k in extra if not k.startswith("val_")]


def _collect(out_dir: Path) -> list[dict]:
    runs = out_dir / "runs"
    rows = [r for d in (sorted(runs.iterdir()) if runs.is_dir() else []) if d.is_dir()
            for r in [_row(d)] if r is not None]
    rows.sort(key=lambda r: (r["method"], r["lr"], r["seed"]))
    columns = _columns(rows)
    nan = float("nan")
    return [{c: r.get(c, nan) for c in columns} for r in rows]


def write_table(out_dir: Path) -> list[dict]:
    """Collect every run folder's row and rewrite ``results.csv`` / ``results.json``; return
    the rows."""
    rows = _collect(out_dir)
    columns = _columns(rows)
    # rows are rounded already (lr exact): written at full precision, they read back equal
    write_csv_atomic(out_dir / "results.csv", columns, ([r[c] for c in columns] for r in rows),
                     digits=None)
    atomic_write_json(out_dir / "results.json", {"format": FORMAT, "columns": columns, "rows": rows},
                      digits=None)
    return rows


def load_results(out_dir) -> list[dict]:
    """The rows of ``out_dir/results.json`` (floats exact; NaN/inf as floats)."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results table in {out_dir} (run a sweep there first)")
    return read_json(path)["rows"]


def load_curves(out_dir, rows: Sequence[Mapping] | None = None) -> dict[str, list[float]]:
    """``run_id -> training loss per step`` for the rows (default: every row of the table)."""
    out_dir = Path(out_dir)
    rows = load_results(out_dir) if rows is None else rows
    return {r["run_id"]: loss_curve(out_dir / r["run_dir"]) for r in rows}
