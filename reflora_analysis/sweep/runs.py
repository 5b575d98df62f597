"""Running a sweep's grid: one folder per run, resumable, on a backend (:mod:`.backends`:
this process, a local process pool, or Ray tasks on a cluster).

Run ids are deterministic and readable: ``{task}__{method}__{optimizer}__lr{lr:g}__s{seed}``
(:func:`run_id`). A run is *done* when its ``result.json`` says ``finished`` or ``diverged``
and ``run.meta.json`` agrees (``completed`` / ``diverged``); a done run is never re-run. Any
other run is resumed from its checkpoint or, without one, restarted from step 0 (its old
log removed first); a run that ``failed`` is retried by the next invocation.

Each run (:func:`_execute`): ``train.seed_everything(seed)``, ``make_task(task, seed=seed,
**task_options)`` (plus the method's own options, ``methods.method_task_options``: ``dora``
-> ``use_dora``, ``full`` -> ``full_finetune``), ``train.run(..., log_every=1, eval_every=0,
evaluate_at_ends=False)`` (the loss of every step, no evaluation: nothing reads one from the
log), then :func:`evaluate_splits`, the one evaluation of each split; the outcome goes to
``result.json``. Divergence and other exceptions are recorded, never raised; after every run
the results table is rewritten.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Sequence

from ..io import atomic_write_json
from .backends import Backend, current_backend, make_backend
from .settings import GridSettings, check_list, check_lr, check_seed, pin_settings, prepare
from .table import as_stored, read_json_or_none, write_table

__all__ = ["run_id", "evaluate_splits", "run_grid", "run_sweep", "is_done"]

_DONE = {"finished": "completed", "diverged": "diverged"}  # result.json status -> meta status
_CONFIG_KEYS = ("run_id", "task", "method", "optimizer", "lr", "seed", "steps", "task_options",
                "hparams")


def run_id(task: str, method: str, optimizer: str, lr: float, seed: int) -> str:
    """``{task}__{method}__{optimizer}__lr{lr:g}__s{seed}``, e.g. ``mf__lora__adamw__lr0.05__s0``."""
    return f"{task}__{method}__{optimizer}__lr{float(lr):g}__s{int(seed)}"


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


def is_done(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has its final outcome (finished or diverged)."""
    result = read_json_or_none(run_dir / "result.json")
    meta = read_json_or_none(run_dir / "run.meta.json")
    return (result is not None and meta is not None and result.get("status") in _DONE
            and meta.get("status") == _DONE[result["status"]])


def _execute(spec: dict) -> str:
    """Train and evaluate one run described by ``spec``; write its ``result.json``.

    Returns the outcome status. Divergence and other exceptions are recorded, not raised;
    ``KeyboardInterrupt`` / ``SystemExit`` propagate (the run stays unfinished).
    """
    from .. import train
    from ..checkpoint import PoisonedCheckpointError
    from ..methods.registry import method_task_options
    from ..tasks import make_task

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
        # the method's own task options too (dora: use_dora, full: full_finetune)
        task = make_task(spec["task"], seed=spec["seed"], device=spec["device"],
                         **method_task_options(spec["method"], spec["task_options"]))
        train.run(task, spec["method"], optimizer=spec["optimizer"], lr=spec["lr"],
                  steps=spec["steps"], seed=spec["seed"], device=spec["device"], out=out,
                  log_every=1, eval_every=0, evaluate_at_ends=False,
                  checkpoint_every=spec["checkpoint_every"],
                  resume=resume, progress=False, **spec["hparams"])
        metrics = evaluate_splits(task)
        status = "finished"
    except (train.TrainingDiverged, PoisonedCheckpointError) as exc:
        status, message = "diverged", str(exc)
    except Exception as exc:  # recorded; the next invocation retries it
        status, message = "failed", f"{type(exc).__name__}: {exc}"
    atomic_write_json(run_dir / "result.json", {"status": status, "message": message, **metrics})
    return status


def _check_task_builds(task: str, task_options: dict, device: str, seed: int,
                       runs_here: bool = True) -> None:
    """Build the task once, so that a bad option is one clear error, not a column of failures.

    ``runs_here=False`` (the backend's runs go elsewhere, e.g. a CPU-only Ray head driving GPU
    workers): the device may be missing here, so the check builds on the CPU and leaves the
    device to the workers, which name it if it is missing."""
    from ..tasks import make_task
    from ..train import resolve_device
    if runs_here:
        resolve_device(device)
    built = make_task(task, seed=seed, device=device if runs_here else "cpu", **task_options)
    del built


def _specs(s: GridSettings, cells: list[tuple[str, float, int]]) -> list[dict]:
    """One run description per cell; refuses lrs whose run ids (or folders) collide."""
    specs, ids = [], {}
    for method, lr, seed in cells:
        rid = run_id(s.task, method, s.optimizer, lr, seed)
        if rid in ids and ids[rid] != (method, lr, seed):
            raise ValueError(f"learning rates {ids[rid][1]!r} and {lr!r} give the same run id "
                             f"{rid!r}; use lrs that differ in 6 significant digits")
        ids[rid] = (method, lr, seed)
        run_dir = s.out_dir / "runs" / rid
        config = {"run_id": rid, "task": s.task, "method": method, "optimizer": s.optimizer,
                  "lr": lr, "seed": seed, "steps": s.steps, "task_options": s.task_options,
                  "hparams": s.per_method[method]}
        old = read_json_or_none(run_dir / "config.json")
        if old is not None and old != as_stored(config):
            raise ValueError(f"{run_dir} holds a different run (lr {old.get('lr')!r}); use lrs that "
                             "differ in 6 significant digits or another output directory")
        specs.append({**config, "run_dir": str(run_dir), "device": s.device,
                      "checkpoint_every": s.checkpoint_every})
    return specs


def run_grid(s: GridSettings, cells: list[tuple[str, float, int]],
             backend: Backend | None = None) -> list[dict]:
    """Run the ``(method, lr, seed)`` cells not done yet on ``backend`` (default:
    :func:`~.backends.current_backend`); return the whole table."""
    specs = _specs(s, cells)
    todo = [spec for spec in specs if not is_done(Path(spec["run_dir"]))]
    backend = backend or current_backend()
    if todo:
        from ..methods.registry import method_task_options
        for method in dict.fromkeys(spec["method"] for spec in todo):
            method_task_options(method, s.task_options)  # a contradiction: one error up front
        _check_task_builds(s.task, s.task_options, s.device, todo[0]["seed"],
                           getattr(backend, "runs_here", True))
    for spec in todo:
        Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["run_dir"]) / "result.json").unlink(missing_ok=True)  # outcome: unknown again
        atomic_write_json(Path(spec["run_dir"]) / "config.json",
                          {k: spec[k] for k in _CONFIG_KEYS}, digits=None)

    bar = None
    if s.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"sweep {s.task}",
                   unit="run", file=sys.stderr, dynamic_ncols=True)
    rows = write_table(s.out_dir)

    def finished(spec: dict) -> None:  # here, after each run, whichever backend ran it
        write_table(s.out_dir)
        if bar is not None:
            bar.set_postfix_str(spec["run_id"])
            bar.update(1)
    try:
        if todo:
            backend.run(_execute, todo, jobs=s.jobs, on_done=finished)
            rows = write_table(s.out_dir)
    finally:
        if bar is not None:
            bar.close()
    return rows


def run_sweep(task: str, methods: Sequence[str], lrs: Sequence[float], seeds: Sequence[int],
              steps: int, out_dir, *, optimizer: str = "adamw", jobs: int = 1,
              task_options: Mapping | None = None, hparams: Mapping | None = None,
              progress: bool = True, device: str = "cpu",
              checkpoint_every: int | None = None, backend: Backend | str | None = None) -> list[dict]:
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
    backend : where the runs execute (:mod:`.backends`): ``"local"`` (``jobs``), ``"ray"``, a
        backend object (``RayBackend(address=...)``), or None for the current one (local
        unless inside ``use_backend``). The results table is the same whichever runs them.

    Returns
    -------
    The results table (also ``results.csv`` / ``results.json``): one dict per run recorded
    in ``out_dir`` (this grid and any earlier one), sorted by (method, lr, seed); columns
    :data:`~reflora_analysis.sweep.table.RESULT_COLUMNS` then ``val_*`` and ``test_*``.
    """
    lrs = check_list("lrs", lrs, check_lr)
    seeds = check_list("seeds", seeds, check_seed)
    backend = make_backend(backend) if isinstance(backend, str) else backend
    s = prepare(task, methods, optimizer, steps, out_dir, task_options=task_options,
                hparams=hparams, device=device, checkpoint_every=checkpoint_every, jobs=jobs,
                progress=progress)
    pin_settings(s)
    return run_grid(s, [(m, lr, seed) for m in s.methods for lr in lrs for seed in seeds], backend)
