r"""Learning-rate x seed sweeps, resumable, with one tidy results table and an honest summary.

A sweep is a grid of independent runs ``(task, method, lr, seed)`` with the same optimizer,
step budget, task options and hyper-parameters, each trained by :func:`reflora_analysis.train.run`
in its own folder::

    OUT/
      sweep.json                 settings shared by every run (task, optimizer, steps, ...)
      results.csv, results.json  one row per run (rewritten atomically after each run)
      summary.csv, summary.md, protocol.json   (summarize / tune_then_test)
      runs/<run_id>/
        config.json              the run's configuration
        run.jsonl, run.meta.json, run.ckpt.pt   (train.run's files)
        result.json              outcome + validation/test metrics (written last)

Run ids are deterministic and readable: ``{task}__{method}__{optimizer}__lr{lr:g}__s{seed}``
(e.g. ``mf__lora__adamw__lr0.05__s0``; :func:`run_id`).

Resuming: a run is *done* when its ``result.json`` says ``finished`` or ``diverged`` and
``run.meta.json`` agrees (``completed`` / ``diverged``); a done run is never re-run (to retry
a diverged one, delete its folder). Any other run is resumed from its checkpoint
(``resume=True``; checkpoints every ``checkpoint_every`` steps and at the last step) or,
without one, restarted from step 0 (its old files are removed first). A run that ``failed``
(an exception other than divergence) is retried by the next invocation. So a killed sweep
loses at most the work of the runs in flight since their last checkpoint.

Evaluation: after training, :func:`evaluate_splits` (the one adapter to the tasks' contract)
asks the task for ``validation`` and ``test`` metrics. The results table has columns
``val_<name>`` and ``test_<name>`` (NaN where a task has no test split).

Per-run seeding: the task is built in-process after ``train.seed_everything(seed)`` (as
``train.run`` does for a task given by name) and handed to ``train.run``, which re-seeds
before building the optimizer; the sweep's runs are deterministic, but with tasks whose
training draws from the global RNG (dropout) they are not bit-identical to
``reflora-analysis train --seed S``.

The statistics (lr selection on validation, report on test, paired verdicts, speed) live in
:mod:`reflora_analysis.stats`; :func:`summarize` applies them to a sweep folder and
:func:`tune_then_test` runs the two-stage protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import stats
from .io import (atomic_write_json, atomic_write_text, decode_nonfinite, read_json, read_json_lines,
                 round_significant, to_jsonable, write_csv_atomic)

__all__ = ["run_id", "run_sweep", "tune_then_test", "summarize", "load_results", "load_curves",
           "evaluate_splits", "add_arguments", "command", "RESULT_COLUMNS", "MIN_TUNE_SEEDS",
           "MIN_TEST_SEEDS"]

FORMAT = "reflora-sweep/1"
MIN_TUNE_SEEDS = 3
MIN_TEST_SEEDS = 5

#: fixed columns of the results table; then ``val_<metric>`` and ``test_<metric>`` (sorted)
RESULT_COLUMNS = ["run_id", "task", "method", "optimizer", "lr", "seed", "steps", "status",
                  "message", "final_step", "final_loss", "smoothed_final_loss", "smooth_window",
                  "auc_loss", "wall_time_s", "hparams", "run_dir"]

_DONE = {"finished": "completed", "diverged": "diverged"}  # result.json status -> meta status


# ---- evaluation adapter ---------------------------------------------------------------------

def evaluate_splits(task) -> dict[str, dict[str, float] | None]:
    """``{"validation": {...}, "test": {...} or None}`` of a trained task.

    A task with ``evaluate_split(split)`` is asked for ``"validation"`` and ``"test"``; any
    other task's ``evaluate()`` counts as validation and ``test`` is None. The one place to
    adjust when the tasks' evaluation contract changes.
    """
    import torch

    def floats(metrics) -> dict[str, float]:
        return {str(k): float(v) for k, v in dict(metrics).items()}

    with torch.no_grad():
        split = getattr(task, "evaluate_split", None)
        if callable(split):
            return {"validation": floats(split("validation")), "test": floats(split("test"))}
        return {"validation": floats(task.evaluate()), "test": None}


# ---- names and checks ---------------------------------------------------------------------

def run_id(task: str, method: str, optimizer: str, lr: float, seed: int) -> str:
    """``{task}__{method}__{optimizer}__lr{lr:g}__s{seed}``, e.g. ``mf__lora__adamw__lr0.05__s0``."""
    return f"{task}__{method}__{optimizer}__lr{float(lr):g}__s{int(seed)}"


def _check_list(name: str, values, check) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one")
    return list(dict.fromkeys(check(v) for v in values))  # duplicates dropped, order kept


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"learning rates must be finite numbers > 0, got {lr!r}")
    return float(lr)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
    return int(seed)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_methods(methods) -> list[str]:
    from .methods import available_methods
    valid = available_methods()

    def check(m):
        if not isinstance(m, str) or m.strip().lower() not in valid:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(valid)}")
        return m.strip().lower()
    return _check_list("methods", methods, check)


def _method_hparams(methods: list[str], optimizer: str, hparams: Mapping | None) -> dict[str, dict]:
    """Per-method hyper-parameters. A key ``name`` applies to every method, ``method:name``
    to that method only; each must be accepted by the method (or the base optimizer)."""
    from .methods import METHODS
    from .methods.base import BASE_OPTIMIZER_KWARGS
    per = {m: {} for m in methods}
    base_keys = set(BASE_OPTIMIZER_KWARGS[optimizer]) | {"weight_decay"}
    for key, value in sorted((hparams or {}).items(), key=lambda kv: ":" in kv[0]):
        scope, sep, name = str(key).rpartition(":")
        targets = methods if not sep else [scope.strip().lower()]
        name = name.strip()
        for m in targets:
            if m not in per:
                raise ValueError(f"hyper-parameter {key!r} names method {m!r}, which is not swept "
                                 f"({', '.join(methods)})")
            valid = base_keys | set(METHODS[m].hparams)
            if name not in valid:
                hint = "" if sep else f"; scope it to one method as 'METHOD:{name}'"
                raise ValueError(f"hyper-parameter {name!r} does not apply to method {m!r} with "
                                 f"{optimizer} (valid: {', '.join(sorted(valid))}){hint}")
            per[m][name] = value
    return {m: dict(sorted(h.items())) for m, h in per.items()}


# ---- one run (in this process or a worker) ----------------------------------------------------

def _read_json(path: Path):
    """The decoded JSON at ``path`` (non-finite strings back to floats), or None."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _as_stored(obj):
    """``obj`` as it reads back from a JSON file written at full precision."""
    return decode_nonfinite(to_jsonable(obj))


def _round_floats(row: dict) -> dict:
    """Measured floats to the data files' 10 significant digits (``io.DATA_SIGNIFICANT_DIGITS``:
    reruns with another summation order give the same table); ``lr`` stays exact (identity)."""
    return {k: round_significant(v) if isinstance(v, float) and k != "lr" else v
            for k, v in row.items()}


def _is_done(run_dir: Path) -> bool:
    result = _read_json(run_dir / "result.json")
    meta = _read_json(run_dir / "run.meta.json")
    return (result is not None and meta is not None and result.get("status") in _DONE
            and meta.get("status") == _DONE[result["status"]])


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _execute(spec: dict) -> str:
    """Train and evaluate one run described by ``spec``; write its ``result.json``.

    Returns the outcome status. Divergence and other exceptions are recorded, not raised;
    ``KeyboardInterrupt`` / ``SystemExit`` propagate (the run stays unfinished).
    """
    from . import train
    from .checkpoint import PoisonedCheckpointError
    from .tasks import make_task

    run_dir = Path(spec["run_dir"])
    out = run_dir / "run.jsonl"
    ckpt = train.checkpoint_path(out)
    (run_dir / "result.json").unlink(missing_ok=True)
    resume = ckpt.is_file()
    if not resume:  # restart: nothing to resume from, so no stale log may survive
        for path in (out, train.meta_path(out)):
            path.unlink(missing_ok=True)
    status, message, metrics = "failed", "", {"validation": None, "test": None}
    try:
        train.seed_everything(spec["seed"])
        task = make_task(spec["task"], seed=spec["seed"], device=spec["device"],
                         **spec["task_options"])
        train.run(task, spec["method"], optimizer=spec["optimizer"], lr=spec["lr"],
                  steps=spec["steps"], seed=spec["seed"], device=spec["device"], out=out,
                  log_every=1, eval_every=0, checkpoint_every=spec["checkpoint_every"],
                  resume=resume, progress=False, **spec["hparams"])
        metrics = evaluate_splits(task)
        status = "finished"
    except (train.TrainingDiverged, PoisonedCheckpointError) as exc:
        status, message = "diverged", str(exc)
    except Exception as exc:  # recorded; the next invocation retries it
        status, message = "failed", f"{type(exc).__name__}: {exc}"
    atomic_write_json(run_dir / "result.json", {"status": status, "message": message, **metrics})
    return status


# ---- the table ------------------------------------------------------------------------------

def _curve(run_dir: Path) -> list[float]:
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
    config, result = _read_json(run_dir / "config.json"), _read_json(run_dir / "result.json")
    if config is None or result is None:
        return None
    meta = _read_json(run_dir / "run.meta.json") or {}
    steps, status = int(config["steps"]), result["status"]
    curve = _curve(run_dir)
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


def _write_table(out_dir: Path) -> list[dict]:
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
    return {r["run_id"]: _curve(out_dir / r["run_dir"]) for r in rows}


# ---- the sweep --------------------------------------------------------------------------------

def _settings(out_dir: Path, settings: dict) -> None:
    """Pin the settings every run of ``out_dir`` shares; refuse a different sweep there."""
    path = out_dir / "sweep.json"
    wanted = _as_stored({"format": FORMAT, **settings})
    old = _read_json(path)
    if old is not None:
        diff = [k for k in wanted if old.get(k) != wanted[k]]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there vs {wanted[k]!r} now" for k in diff)
            raise ValueError(f"{out_dir} holds a sweep with other settings ({shown}); use another "
                             "output directory")
        return
    atomic_write_json(path, wanted, digits=None)


def _prepare(task, methods, optimizer, steps, out_dir, task_options, hparams, device,
             checkpoint_every, jobs):
    """Check every argument before any run starts; return the normalised settings."""
    from .methods.base import BASE_OPTIMIZERS
    from .tasks import available_tasks
    if task not in available_tasks():
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(available_tasks())}")
    methods = _check_methods(methods)
    if not isinstance(optimizer, str) or optimizer.strip().lower() not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(BASE_OPTIMIZERS)}")
    optimizer = optimizer.strip().lower()
    steps = _check_int("steps", steps, 1)
    jobs = _check_int("jobs", jobs, 1)
    if checkpoint_every is None:
        checkpoint_every = max(1, steps // 10)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 0)
    task_options = dict(task_options or {})
    per_method = _method_hparams(methods, optimizer, hparams)
    out_dir = Path(out_dir)
    try:
        (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {out_dir}: {err.strerror}") from None
    return methods, optimizer, steps, jobs, checkpoint_every, task_options, per_method, out_dir


def _check_task_builds(task: str, task_options: dict, device: str, seed: int) -> None:
    """Build the task once, so that a bad option is one clear error, not a column of failures."""
    from .tasks import make_task
    from .train import resolve_device
    resolve_device(device)
    built = make_task(task, seed=seed, device=device, **task_options)
    del built


def _run_grid(task, cells: list[tuple[str, float, int]], *, optimizer, steps, out_dir: Path,
              task_options, per_method, device, checkpoint_every, jobs, progress) -> list[dict]:
    """Run the ``(method, lr, seed)`` cells not done yet; return the whole table."""
    specs, ids = [], {}
    for method, lr, seed in cells:
        rid = run_id(task, method, optimizer, lr, seed)
        if rid in ids and ids[rid] != (method, lr, seed):
            raise ValueError(f"learning rates {ids[rid][1]!r} and {lr!r} give the same run id "
                             f"{rid!r}; use lrs that differ in 6 significant digits")
        ids[rid] = (method, lr, seed)
        run_dir = out_dir / "runs" / rid
        config = {"run_id": rid, "task": task, "method": method, "optimizer": optimizer, "lr": lr,
                  "seed": seed, "steps": steps, "task_options": task_options,
                  "hparams": per_method[method]}
        old = _read_json(run_dir / "config.json")
        if old is not None and old != _as_stored(config):
            raise ValueError(f"{run_dir} holds a different run (lr {old.get('lr')!r}); use lrs that "
                             "differ in 6 significant digits or another output directory")
        specs.append({**config, "run_dir": str(run_dir), "device": device,
                      "checkpoint_every": checkpoint_every})
    todo = [s for s in specs if not _is_done(Path(s["run_dir"]))]
    if todo:
        _check_task_builds(task, task_options, device, todo[0]["seed"])
    for spec in todo:
        Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["run_dir"]) / "result.json").unlink(missing_ok=True)  # outcome: unknown again
        config = {k: spec[k] for k in ("run_id", "task", "method", "optimizer", "lr", "seed",
                                       "steps", "task_options", "hparams")}
        atomic_write_json(Path(spec["run_dir"]) / "config.json", config, digits=None)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"sweep {task}",
                   unit="run", file=sys.stderr, dynamic_ncols=True)
    rows = _write_table(out_dir)
    try:
        if jobs == 1 or len(todo) <= 1:
            for spec in todo:
                if bar is not None:
                    bar.set_postfix_str(spec["run_id"])
                _execute(spec)
                rows = _write_table(out_dir)
                if bar is not None:
                    bar.update(1)
        else:
            rows = _run_pool(todo, jobs, out_dir, bar)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _run_pool(todo: list[dict], jobs: int, out_dir: Path, bar) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    rows = []
    try:
        futures = {pool.submit(_execute, spec): spec for spec in todo}
        for future in as_completed(futures):
            future.result()  # _execute records run errors; this raises only if a worker died
            rows = _write_table(out_dir)
            if bar is not None:
                bar.set_postfix_str(futures[future]["run_id"])
                bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return _write_table(out_dir)


def run_sweep(task: str, methods: Sequence[str], lrs: Sequence[float], seeds: Sequence[int],
              steps: int, out_dir, *, optimizer: str = "adamw", jobs: int = 1,
              task_options: Mapping | None = None, hparams: Mapping | None = None,
              progress: bool = True, device: str = "cpu",
              checkpoint_every: int | None = None) -> list[dict]:
    """Run the grid ``methods x lrs x seeds`` on ``task`` under ``out_dir``; return the table.

    Parameters
    ----------
    task : task name (``make_task``). methods : method names. lrs : step sizes > 0.
    seeds : integers >= 0. steps : optimizer updates per run.
    out_dir : sweep folder (created); the settings are pinned in ``sweep.json``, so a later
        call there may extend the grid (methods, lrs, seeds) but not change the settings.
    optimizer : ``sgd`` or ``adamw``. jobs : parallel runs (``spawn`` process pool; each
        worker uses ``max(1, cores // jobs)`` torch threads).
    task_options : ``make_task`` overrides (``quick`` included), the same for every run.
    hparams : method hyper-parameters; ``name`` for every method, ``method:name`` for one.
    checkpoint_every : default ``max(1, steps // 10)``; 0 = none (an interrupted run then
        restarts from step 0).

    Returns
    -------
    The results table (also ``results.csv`` / ``results.json``): one dict per run recorded
    in ``out_dir`` (this grid and any earlier one), sorted by (method, lr, seed); columns
    :data:`RESULT_COLUMNS` then ``val_*`` and ``test_*``.
    """
    lrs = _check_list("lrs", lrs, _check_lr)
    seeds = _check_list("seeds", seeds, _check_seed)
    (methods, optimizer, steps, jobs, checkpoint_every, task_options, per_method,
     out_dir) = _prepare(task, methods, optimizer, steps, out_dir, task_options, hparams, device,
                         checkpoint_every, jobs)
    _settings(out_dir, {"task": task, "optimizer": optimizer, "steps": steps,
                        "task_options": task_options, "hparams": _raw_hparams(hparams)})
    cells = [(m, lr, s) for m in methods for lr in lrs for s in seeds]
    return _run_grid(task, cells, optimizer=optimizer, steps=steps, out_dir=out_dir,
                     task_options=task_options, per_method=per_method, device=device,
                     checkpoint_every=checkpoint_every, jobs=jobs, progress=progress)


def _raw_hparams(hparams: Mapping | None) -> dict:
    """The hyper-parameters as given (sorted by key), as pinned in ``sweep.json``."""
    return dict(sorted((str(k), v) for k, v in (hparams or {}).items()))


# ---- summary -------------------------------------------------------------------------------------

def _write_summary(out_dir: Path, summary: dict, extra_protocol: Mapping | None = None) -> None:
    protocol = {**summary["protocol"], **(extra_protocol or {})}
    write_csv_atomic(out_dir / "summary.csv", stats.SUMMARY_COLUMNS,
                     ([r[c] for c in stats.SUMMARY_COLUMNS] for r in summary["rows"]))
    atomic_write_text(out_dir / "summary.md", stats.summary_markdown(summary))
    atomic_write_json(out_dir / "protocol.json", protocol)


def summarize(out_dir, *, metric: str | None = None, direction: str | None = None,
              baseline: str | None = "lora", methods: Sequence[str] | None = None,
              selection_seeds: Sequence[int] | None = None,
              report_seeds: Sequence[int] | None = None, report_split: str = "auto",
              chosen_lrs: Mapping[str, float | None] | None = None,
              confidence: float = 0.95, write: bool = True) -> dict:
    """:func:`reflora_analysis.stats.compare` on ``out_dir``'s table and loss curves.

    With ``write``, writes ``summary.csv``, ``summary.md`` and ``protocol.json`` there.
    Returns ``{"rows": [...], "protocol": {...}}``.
    """
    out_dir = Path(out_dir)
    rows = load_results(out_dir)
    if methods is not None:
        rows = [r for r in rows if r["method"] in set(methods)]
    summary = stats.compare(rows, curves=load_curves(out_dir, rows), metric=metric,
                            direction=direction, baseline=baseline, methods=methods,
                            selection_seeds=selection_seeds, report_seeds=report_seeds,
                            report_split=report_split, chosen_lrs=chosen_lrs,
                            confidence=confidence)
    if write:
        settings = _read_json(out_dir / "sweep.json") or {}
        grid = {"methods": sorted({r["method"] for r in rows}),
                "lrs": sorted({r["lr"] for r in rows}), "seeds": sorted({r["seed"] for r in rows}),
                "runs": len(rows)}
        _write_summary(out_dir, summary, {"settings": settings, "grid": grid})
    return summary


def tune_then_test(task: str, methods: Sequence[str], lrs: Sequence[float],
                   tune_seeds: Sequence[int], test_seeds: Sequence[int], steps: int, out_dir, *,
                   optimizer: str = "adamw", jobs: int = 1, task_options: Mapping | None = None,
                   hparams: Mapping | None = None, metric: str | None = None,
                   direction: str | None = None, baseline: str = "lora",
                   report_split: str = "auto", progress: bool = True, device: str = "cpu",
                   checkpoint_every: int | None = None, confidence: float = 0.95) -> dict:
    """The two-stage protocol; both stages resumable, all files in ``out_dir``.

    1. run ``methods x lrs x tune_seeds`` (>= 3 seeds); per method choose the lr on the
       validation metric (:func:`reflora_analysis.stats.select_lr`);
    2. run each method at its chosen lr on ``test_seeds`` (>= 5; runs already done for
       overlapping seeds are reused), and report on the test split with paired comparisons
       to ``baseline`` (:func:`reflora_analysis.stats.compare`).

    Writes ``results.*``, ``summary.csv``, ``summary.md`` and ``protocol.json`` (grid, chosen
    lrs, rules). Returns ``{"rows", "protocol"}`` as :func:`summarize`.
    """
    lrs = _check_list("lrs", lrs, _check_lr)
    tune_seeds = _check_list("tune_seeds", tune_seeds, _check_seed)
    test_seeds = _check_list("test_seeds", test_seeds, _check_seed)
    if len(tune_seeds) < MIN_TUNE_SEEDS:
        raise ValueError(f"tune_then_test needs at least {MIN_TUNE_SEEDS} distinct tune seeds "
                         f"(--seeds), got {tune_seeds}")
    if len(test_seeds) < MIN_TEST_SEEDS:
        raise ValueError(f"tune_then_test needs at least {MIN_TEST_SEEDS} distinct test seeds "
                         f"(--test-seeds), got {test_seeds}")
    (methods, optimizer, steps, jobs, checkpoint_every, task_options, per_method,
     out_dir) = _prepare(task, methods, optimizer, steps, out_dir, task_options, hparams, device,
                         checkpoint_every, jobs)
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {methods}")
    _settings(out_dir, {"task": task, "optimizer": optimizer, "steps": steps,
                        "task_options": task_options, "hparams": _raw_hparams(hparams)})
    common = dict(optimizer=optimizer, steps=steps, out_dir=out_dir, task_options=task_options,
                  per_method=per_method, device=device, checkpoint_every=checkpoint_every,
                  jobs=jobs, progress=progress)

    # stage 1: tune
    rows = _run_grid(task, [(m, lr, s) for m in methods for lr in lrs for s in tune_seeds], **common)
    tune_rows = [r for r in rows if r["method"] in methods and r["lr"] in lrs and r["seed"] in tune_seeds]
    metric = metric if metric is not None else stats.default_metric(tune_rows)
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            metric = metric[len(prefix):]
    direction = stats.metric_direction(metric, direction)
    column = f"val_{metric}"
    if not any(column in r for r in tune_rows):
        raise ValueError(f"unknown metric {metric!r}; the runs report: "
                         f"{', '.join(sorted(k[4:] for k in tune_rows[0] if k.startswith('val_')))}")
    chosen = {m: stats.select_lr(tune_rows, m, column, direction, tune_seeds)["lr"] for m in methods}

    # stage 2: test at the chosen lrs (a method without an eligible lr is reported as such)
    cells = [(m, chosen[m], s) for m in methods if chosen[m] is not None for s in test_seeds]
    rows = _run_grid(task, cells, **common)
    keep = {(m, lr, s) for m, lr, s in cells} | {(m, lr, s) for m in methods for lr in lrs
                                                 for s in tune_seeds}
    rows = [r for r in rows if (r["method"], r["lr"], r["seed"]) in keep]
    summary = stats.compare(rows, curves=load_curves(out_dir, rows), metric=metric,
                            direction=direction, baseline=baseline, methods=methods,
                            selection_seeds=tune_seeds, report_seeds=test_seeds,
                            report_split=report_split, chosen_lrs=chosen, confidence=confidence)
    settings = _read_json(out_dir / "sweep.json") or {}
    _write_summary(out_dir, summary, {
        "protocol": "tune_then_test", "settings": settings,
        "grid": {"methods": methods, "lrs": lrs, "tune_seeds": tune_seeds,
                 "test_seeds": test_seeds, "reused_seeds": sorted(set(tune_seeds) & set(test_seeds))},
        "stages": ["1: methods x lrs x tune_seeds; lr chosen per method on validation",
                   "2: each method at its chosen lr on test_seeds; report on the report split"]})
    return summary


# ---- command line -----------------------------------------------------------------------------

def _comma_list(kind, what: str):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, "
                                             f"got {text!r}") from None
    parse.__name__ = f"list of {what}"
    return parse


def _setting(text: str) -> tuple[str, Any]:
    """``key=value``; the value read as JSON when possible (``3``, ``0.5``, ``true``), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sweep`` sub-command's options (see :func:`command`)."""
    parser.add_argument("--task", required=True, help="task name (see `reflora-analysis tasks`)")
    parser.add_argument("--methods", required=True, type=_comma_list(str, "method names"),
                        help="comma-separated methods, e.g. lora,reflora")
    parser.add_argument("--lrs", required=True, type=_comma_list(float, "numbers"),
                        help="comma-separated learning rates, e.g. 0.01,0.03")
    parser.add_argument("--seeds", required=True, type=_comma_list(int, "integers"),
                        help="comma-separated seeds (with --test-seeds: the tuning seeds, >= 3)")
    parser.add_argument("--test-seeds", type=_comma_list(int, "integers"), default=None,
                        help="run the two-stage protocol: choose each method's lr on --seeds "
                             "(validation), then rerun it on these seeds (>= 5) and report on test")
    parser.add_argument("--steps", required=True, type=int, help="optimizer updates per run")
    parser.add_argument("--out", required=True, help="sweep directory (resumable)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (default 1)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="task's small settings")
    parser.add_argument("--set", dest="settings", action="append", type=_setting, default=[],
                        metavar="KEY=VALUE", help="task override, repeatable (e.g. --set rank=8)")
    parser.add_argument("--hparam", dest="hparams", action="append", type=_setting, default=[],
                        metavar="[METHOD:]KEY=VALUE",
                        help="method hyper-parameter, repeatable; METHOD: limits it to one method "
                             "(e.g. --hparam reflora:warmup_steps=10)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="checkpoint interval in steps (default steps // 10; 0: none)")
    parser.add_argument("--metric", default=None,
                        help="metric for lr selection and report (default: accuracy if reported, "
                             "else a loss/error)")
    parser.add_argument("--direction", choices=("max", "min"), default=None,
                        help="is a higher metric better (max) or lower (min); default from its name")
    parser.add_argument("--baseline", default="lora",
                        help="method the others are paired with (default lora; 'none' for no pairing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    """Run the sweep (or, with ``--test-seeds``, the two-stage protocol) and summarise it.

    Prints ``summary.md`` on stdout. Exit status 0, or 1 when some run failed (an error
    other than divergence; rerun the same command to retry it). Bad input raises ValueError.
    """
    task_options = dict(args.settings)
    if args.quick:
        task_options["quick"] = True
    baseline = None if str(args.baseline).lower() == "none" else args.baseline
    common = dict(optimizer=args.optimizer, jobs=args.jobs, task_options=task_options,
                  hparams=dict(args.hparams), progress=not args.no_progress, device=args.device,
                  checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    if args.test_seeds is not None:
        if baseline is None:
            raise ValueError("the two-stage protocol needs a --baseline method")
        summary = tune_then_test(args.task, args.methods, args.lrs, args.seeds, args.test_seeds,
                                 args.steps, out, metric=args.metric, direction=args.direction,
                                 baseline=baseline, **common)
    else:
        run_sweep(args.task, args.methods, args.lrs, args.seeds, args.steps, out, **common)
        summary = None
        methods = [m.strip().lower() for m in args.methods]
        if len(set(args.seeds)) >= 2:
            # one stage: lr chosen and reported on the same seeds (summary.md says so)
            summary = summarize(out, metric=args.metric, direction=args.direction,
                                baseline=baseline if baseline in methods else None,
                                methods=methods)
        else:
            print("reflora-analysis: one seed: no intervals, no summary (results in "
                  f"{out / 'results.csv'})", file=sys.stderr)
    if summary is not None:
        print((out / "summary.md").read_text(encoding="utf-8"), end="")
    rows = load_results(out)
    failed = [r["run_id"] for r in rows if r["status"] == "failed"]
    diverged = sum(r["status"] == "diverged" for r in rows)
    print(f"reflora-analysis: {len(rows)} runs in {out / 'results.csv'} ({diverged} diverged, "
          f"{len(failed)} failed)", file=sys.stderr)
    if failed:
        print(f"reflora-analysis: error: {len(failed)} run(s) failed, e.g. {failed[0]}: "
              f"{next(r['message'] for r in rows if r['status'] == 'failed')}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reflora_analysis.sweep ...`` (the same options as ``reflora-analysis sweep``)."""
    parser = argparse.ArgumentParser(prog="reflora-analysis sweep", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ValueError as exc:
        print(f"reflora-analysis: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
