"""A sweep's settings: every argument checked before any run starts, and pinned in ``sweep.json``.

:func:`prepare` turns the arguments of :func:`~reflora_analysis.sweep.run_sweep` /
:func:`~reflora_analysis.sweep.tune_then_test` into a :class:`GridSettings` (or raises a
``ValueError`` naming the bad one); :func:`pin_settings` records the settings every run of
an output folder shares and refuses a folder that holds a sweep with other settings (a later
call may extend the grid, never change the settings).

Hyper-parameters: a key ``name`` applies to every method, ``method:name`` to that method only;
each must be accepted by the method or by the base optimizer (:func:`_method_hparams`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..io import atomic_write_json
from .table import FORMAT, as_stored, read_json_or_none

__all__ = ["GridSettings", "prepare", "pin_settings", "check_list", "check_lr", "check_seed"]


@dataclass(frozen=True)
class GridSettings:
    """The checked settings shared by every run of one grid.

    ``per_method``: method -> its hyper-parameters (scoped ones resolved); ``hparams``: the
    hyper-parameters as given (sorted by key), as pinned in ``sweep.json``;
    ``checkpoint_every``: steps between checkpoints (0: none).
    """

    task: str
    methods: list[str]
    optimizer: str
    steps: int
    jobs: int
    checkpoint_every: int
    task_options: dict
    per_method: dict[str, dict]
    hparams: dict
    out_dir: Path
    device: str
    progress: bool


def check_list(name: str, values, check) -> list:
    """``[check(v) for v in values]``, duplicates dropped (order kept); a non-list or an
    empty list is a ``ValueError``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one")
    return list(dict.fromkeys(check(v) for v in values))  # duplicates dropped, order kept


def check_lr(lr) -> float:
    """A learning rate: a finite number > 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"learning rates must be finite numbers > 0, got {lr!r}")
    return float(lr)


def check_seed(seed) -> int:
    """A seed: an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
    return int(seed)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_methods(methods) -> list[str]:
    from ..methods import available_methods
    valid = available_methods()

    def check(m):
        if not isinstance(m, str) or m.strip().lower() not in valid:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(valid)}")
        return m.strip().lower()
    return check_list("methods", methods, check)


def _method_hparams(methods: list[str], optimizer: str, hparams: Mapping | None) -> dict[str, dict]:
    """Per-method hyper-parameters. A key ``name`` applies to every method, ``method:name``
    to that method only; each must be accepted by the method (or the base optimizer)."""
    from ..methods import METHODS
    from ..methods.base import BASE_OPTIMIZER_KWARGS
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


def _raw_hparams(hparams: Mapping | None) -> dict:
    """The hyper-parameters as given (sorted by key), as pinned in ``sweep.json``."""
    return dict(sorted((str(k), v) for k, v in (hparams or {}).items()))


def prepare(task, methods, optimizer, steps, out_dir, *, task_options, hparams, device,
            checkpoint_every, jobs, progress) -> GridSettings:
    """Check every argument before any run starts (creating ``out_dir/runs``); return the
    normalised settings. ``checkpoint_every=None`` means ``max(1, steps // 10)``."""
    from ..methods.base import BASE_OPTIMIZERS
    from ..tasks import available_tasks
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
    return GridSettings(task=task, methods=methods, optimizer=optimizer, steps=steps, jobs=jobs,
                        checkpoint_every=checkpoint_every, task_options=task_options,
                        per_method=per_method, hparams=_raw_hparams(hparams), out_dir=out_dir,
                        device=device, progress=progress)


def pin_settings(settings: GridSettings) -> None:
    """Pin the settings every run of ``settings.out_dir`` shares (``sweep.json``: task,
    optimizer, steps, task options, hyper-parameters as given); refuse a different sweep there."""
    out_dir = settings.out_dir
    path = out_dir / "sweep.json"
    wanted = as_stored({"format": FORMAT, "task": settings.task, "optimizer": settings.optimizer,
                        "steps": settings.steps, "task_options": settings.task_options,
                        "hparams": settings.hparams})
    old = read_json_or_none(path)
    if old is not None:
        diff = [k for k in wanted if old.get(k) != wanted[k]]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there vs {wanted[k]!r} now" for k in diff)
            raise ValueError(f"{out_dir} holds a sweep with other settings ({shown}); use another "
                             "output directory")
        return
    atomic_write_json(path, wanted, digits=None)
