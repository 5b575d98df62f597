r"""The skeleton every experiment shares: build the task, train, collect series, save.

:func:`sweep_runs` is the loop "for each seed (and step-size multiplier) and method: build
the task with :func:`reflora_analysis.tasks.make_task`, train it with
:func:`train_records` (:func:`reflora_analysis.train.run`), collect the plotted series from
the logged records" that the experiments of every notebook run; a collector
(:func:`series_of`, :func:`balance_series` or the experiment's own function) names which
logged keys become which series. :func:`write_data` writes the result as CSV tables
(:func:`long_table`) and one JSON file, atomically, with non-finite numbers as the strings
``"NaN"``/``"Infinity"`` (standard JSON).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..io import atomic_write_json, read_json_lines, write_csv_atomic

__all__ = ["REFACTOR_METHODS", "is_refactoring", "as_float", "series", "methods_or_all",
           "tolerant_probes", "train_records", "series_of", "balance_series", "Sweep",
           "sweep_runs", "long_table", "write_data", "report_failures", "single_pair"]

def is_refactoring(method: str) -> bool:
    """Does ``method`` refactor the factors (the registry's ``refactoring`` flag), and so
    take ``warmup_steps``?"""
    from ..methods import METHODS
    spec = METHODS.get(method)
    return bool(spec is not None and spec.refactoring)


def _refactor_methods() -> tuple[str, ...]:
    from ..methods import refactoring_methods
    return tuple(refactoring_methods())


REFACTOR_METHODS = _refactor_methods()
"""Methods whose transform degenerates at PEFT's zero start and takes ``warmup_steps``
(the registry's refactoring family)."""

Records = Sequence[Mapping[str, Any]]
Collector = Callable[[Records, Any], dict]


def as_float(v) -> float:
    """``v`` as float; ``None`` and anything unparsable as NaN (also reads the
    JSON strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def series(records: Records, key: str) -> list[float]:
    """The values of ``key`` in ``records`` (NaN where a record lacks it)."""
    return [as_float(r.get(key)) for r in records]


def methods_or_all(methods) -> list[str]:
    """``methods`` checked against the registry (``"a,b"``: a list; ``None``: every method
    that runs on any LoRA task, ``methods.registry.optimizer_methods``: not ``dora`` and
    ``full``, which need a task with their option, e.g. not ``mf``)."""
    from ..methods import available_methods
    from ..methods.registry import optimizer_methods
    valid = available_methods()
    if methods is None:
        return optimizer_methods()
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    if not methods:
        raise ValueError("methods must name at least one method")
    return list(methods)


def single_pair(task):
    """The one LoRA pair of a single-layer task with ``loss_in_W`` (else ``ValueError``)."""
    if task.loss_in_W is None or len(task.pairs) != 1:
        raise ValueError(f"task {task.name!r} is not a single-layer task with loss_in_W "
                         "(use mf, sensing or lowrank-regression)")
    return task.pairs[0]


class _Tolerant:
    """Wrap a probe so that a numerical failure on a diverging run (e.g. ``eigh`` of a Gram
    with overflowed entries) logs nothing for that step instead of stopping the run; the
    missing value is plotted as a gap (NaN)."""

    def __init__(self, probe):
        self.probe, self.name = probe, probe.name

    def check(self, task) -> None:
        """Refuse a probe the task cannot support before step 0, as the bare probe does."""
        self.probe.check(task)

    def __call__(self, ctx):
        try:
            return self.probe(ctx)
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            if all(bool(torch.isfinite(p.detach()).all()) and float(p.detach().abs().max()) < 1e100
                   for pair in ctx.task.pairs for p in pair.params):
                raise  # not a blow-up: a real error
            return {}


def tolerant_probes(spec: str, **kw) -> list:
    """:func:`reflora_analysis.probes.make_probes`, each probe tolerant of a blown-up run."""
    from ..probes import make_probes
    return [_Tolerant(p) for p in make_probes(spec, **kw)]


def train_records(task, method: str, *, optimizer: str = "sgd", lr: float | None = None,
                  steps: int, seed: int = 0, device: str = "cpu", probes=(),
                  probe_every: int = 0, eval_every: int = 0, workdir=None,
                  refactor_warmup: int = 0, **hparams) -> dict[str, Any]:
    """Run :func:`reflora_analysis.train.run` and return its records, also when it diverges.

    ``refactor_warmup`` > 0 gives the refactoring methods (:func:`is_refactoring`) that many
    plain LoRA steps first: from PEFT's ``lora_B = 0`` start their preconditioner is
    degenerate and cannot move the zero factor (THEORY.md section 6; the reference code
    warms up for 100 steps on GLUE). Other methods ignore it.

    Returns ``{"status": "ok"|"diverged", "message": str, "records": [...]}``; for a
    diverged run the records are every line logged before the non-finite value (read back
    from the JSON lines the trainer flushed), so a divergence can be plotted as such.
    Any other error propagates.
    """
    from ..train import TrainingDiverged, run

    if refactor_warmup and is_refactoring(method):
        hparams = {"warmup_steps": int(refactor_warmup), **hparams}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            # scratch log only (the data are returned and written by the caller): in memory
            # where the OS offers it, since the trainer fsyncs every line
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="reflora-run-", dir=shm))
        path = Path(workdir) / f"{getattr(task, 'name', task)}-{method}-{optimizer}-{lr}-{seed}.jsonl"
        try:
            records = run(task, method, optimizer=optimizer, lr=lr, steps=steps, seed=seed,
                          device=device, out=path, probes=probes, probe_every=probe_every,
                          eval_every=eval_every, progress=False, **hparams)
            status, message = "ok", ""
        except TrainingDiverged as exc:
            records = read_json_lines(path) if path.exists() else []
            status, message = "diverged", str(exc)
    return {"status": status, "message": message, "records": records}


def series_of(keys: Mapping[str, str], *, where: str | None = None) -> Collector:
    """A collector: ``{"step": [...], name: series(records, key) for name, key in keys}``
    over the records that hold ``where`` (all records when ``None``)."""
    def collect(records: Records, task=None) -> dict:
        recs = [r for r in records if where is None or where in r]
        return {"step": [int(r["step"]) for r in recs],
                **{name: series(recs, key) for name, key in keys.items()}}
    return collect


def _balance_key(record: Mapping) -> str | None:
    for key in ("balance/gap", "balance/balance_gap", "balance/gap_mean"):
        if key in record:
            return key
    return next((k for k in record if k.startswith("balance/") and "gap" in k), None)


def balance_series(*, only_probed: bool) -> Collector:
    """A collector of the balance probe: step, loss, balance gap, ``||A||/||B||``.

    ``only_probed``: keep only the records with a balance value; otherwise keep every record
    (a step where a tolerant probe failed on a blowing-up run stays, with a NaN gap, so the
    loss of a diverging run is plotted to its end)."""
    def collect(records: Records, task=None) -> dict:
        recs = [r for r in records if _balance_key(r)] if only_probed else list(records)
        key = _balance_key(recs[0]) if recs else None
        gap = series(recs, key) if key else ([] if only_probed else [math.nan] * len(recs))
        return {"step": [int(r["step"]) for r in recs], "loss": series(recs, "loss"),
                "balance_gap": gap, "norm_ratio": series(recs, "balance/norm_ratio")}
    return collect


@dataclass
class Sweep:
    """What :func:`sweep_runs` returns: one dict per run, the task's configuration and the
    base step size the multipliers scale (``None`` without multipliers)."""

    runs: list[dict] = field(default_factory=list)
    task_config: dict = field(default_factory=dict)
    base_lr: float | None = None


def _run_lr(task, optimizer: str, lr, multiplier) -> tuple[float | None, float | None]:
    if multiplier is None:
        return lr, None
    base = float(task.default_lr[optimizer]) if lr is None else float(lr)
    return base * multiplier, base


def sweep_runs(methods: Sequence[str], *, task: str, steps: int, collect: Collector,
               seeds: Sequence[int] = (0,), device: str = "cpu", quick: bool = False,
               task_options: Mapping[str, Any] | None = None, optimizer: str = "sgd",
               lr: float | None = None, lr_multipliers: Sequence[float] | None = None,
               probes: str | Callable[[], list] | None = None, **train_kw) -> Sweep:
    """Train every (seed, lr multiplier, method) on a fresh task and collect its series.

    Loops seeds, then ``lr_multipliers`` (step size ``k * (lr or task.default_lr)``; the
    run records ``lr`` and ``multiplier``), then methods. Each run builds
    ``make_task(task, seed=, device=, quick=, **task_options)`` (``None`` options dropped;
    plus the method's own, ``methods.registry.method_task_options``: dora, full),
    trains it with :func:`train_records` (``probes``: names, built tolerant for each run, or
    a factory of probe lists; ``train_kw``: ``probe_every``, ``refactor_warmup``, method
    hyper-parameters, ...) and adds ``collect(records, task)`` to
    ``{"method", "seed", "status", "message"}``.
    """
    from ..methods.registry import METHODS, method_task_options
    from ..tasks import make_task

    options = {k: v for k, v in dict(task_options or {}).items() if v is not None}
    result = Sweep()
    for seed in seeds:
        for multiplier in (lr_multipliers if lr_multipliers is not None else (None,)):
            for method in methods:
                own = method_task_options(method, options) if method in METHODS else options
                t = make_task(task, seed=seed, device=device, quick=quick, **own)  # dora, full
                run_lr, base = _run_lr(t, optimizer, lr, multiplier)
                built = (tolerant_probes(probes) if isinstance(probes, str) else
                         probes() if callable(probes) else ())
                out = train_records(t, method, optimizer=optimizer, lr=run_lr, steps=steps,
                                    seed=seed, device=device, probes=built, **train_kw)
                entry = {"method": method, "seed": seed, "status": out["status"],
                         "message": out["message"]}
                if multiplier is not None:
                    entry.update(lr=run_lr, multiplier=float(multiplier))
                entry.update(collect(out["records"], t))
                result.runs.append(entry)
                result.task_config, result.base_lr = t.config, base
    return result


def long_table(runs: Iterable[Mapping], ids: Sequence[str], columns: Sequence[str], *,
               names: Sequence[str] | None = None) -> tuple[list[str], list[tuple]]:
    """``(header, rows)`` in long format: per run, one row per step, ``ids`` repeated, the
    ``columns`` series side by side (as ``zip``: the shortest series sets the length);
    ``names``: the CSV names of ``columns`` (default: the same)."""
    rows = [(*[r[k] for k in ids], *values)
            for r in runs for values in zip(*(r[c] for c in columns))]
    return [*ids, *(names or columns)], rows


def write_data(out_dir, name: str, data: Mapping[str, Any],
               tables: Mapping[str, tuple[Sequence[str], Iterable]] | None = None) -> None:
    """Write ``<name>.json`` and each ``tables`` entry ``{stem: (header, rows)}`` as
    ``<stem>.csv`` into ``out_dir`` (nothing when ``out_dir`` is ``None``)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem, (header, rows) in (tables or {}).items():
        write_csv_atomic(out / f"{stem}.csv", header, rows)
    atomic_write_json(out / f"{name}.json", data)


def report_failures(runs: Iterable[Mapping], template: str) -> list[str]:
    """Print (and return) ``template.format(**run)`` for every run that is not ``ok``."""
    lines = [template.format(**r) for r in runs if r.get("status", "ok") != "ok"]
    for line in lines:
        print(line)
    return lines
