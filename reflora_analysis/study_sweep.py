"""A finished sweep folder as the study reads it: :class:`StudySweep` and :func:`load_sweep`.

A folder holds a finished :func:`reflora_analysis.sweep.tune_then_test` (or ``run_sweep`` +
``summarize``): ``sweep.json``, ``results.json``, ``protocol.json``. :func:`load_sweep`
refuses a missing or unfinished one (a ``ValueError`` naming the runs without a result) and
summarises it with :func:`reflora_analysis.sweep.summarize` (``write=False``) at the
protocol's chosen lrs, seeds and split; :mod:`reflora_analysis.study` draws its figures,
tables and sentences from that summary alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import stats, sweep
from .io import read_json

__all__ = ["StudySweep", "load_sweep", "as_sweep", "load_all", "DONE"]

#: the outcomes of a run that is over (``result.json`` status): its numbers may be used
DONE = ("finished", "diverged")


@dataclass
class StudySweep:
    """A finished sweep folder, read (:func:`load_sweep`): its files, the summary at the
    protocol's chosen lrs (``summary``: :func:`reflora_analysis.sweep.summarize`'s result)
    and, from that summary's protocol, what the figures and tables need."""

    path: Path
    settings: dict
    protocol: dict
    rows: list
    summary: dict
    label: str
    task: str
    metric: str            # bare report metric, e.g. accuracy
    split: str             # report split: test, or validation where the task has none
    direction: str         # max / min
    baseline: str | None
    confidence: float
    chosen: dict           # method -> chosen lr (None: no eligible lr)
    selection_seeds: list
    report_seeds: list
    by_method: dict        # method -> its summary row (``stats.SUMMARY_COLUMNS``)

    def cell_rows(self, method: str, seeds: Sequence[int], lr=None) -> list[dict]:
        """The results rows of ``method`` at ``lr`` (default: its chosen lr) on ``seeds``."""
        lr = self.chosen.get(method) if lr is None else lr
        return [r for r in self.rows if r["method"] == method and lr is not None
                and float(r["lr"]) == float(lr) and int(r["seed"]) in set(seeds)]


def _check_finished(path: Path, protocol: dict, rows: list[dict]) -> None:
    """ValueError unless every run the protocol uses is done (finished or diverged)."""
    running = [c.parent.name for c in sorted(path.glob("runs/*/config.json"))
               if not (c.parent / "result.json").is_file()]
    index = {(r["method"], float(r["lr"]), int(r["seed"])): r for r in rows}
    cells = {(m, float(lr), int(s)) for m, lr in protocol["selection"]["chosen_lr"].items()
             if lr is not None for s in protocol["report"]["seeds"]}
    cells |= {(m, float(p["lr"]), int(s)) for m, per_lr in protocol["selection"]["per_lr"].items()
              for p in per_lr for s in protocol["selection"]["seeds"]}
    problems = [f"run(s) without a result (in progress or killed): {running[:5]}"] if running else []
    problems += [f"{m} lr={lr:g} seed {s}: {index.get((m, lr, s), {}).get('status', 'no run')}"
                 for m, lr, s in sorted(cells) if index.get((m, lr, s), {}).get("status") not in DONE]
    if problems:
        raise ValueError(f"the sweep in {path} is unfinished: {'; '.join(problems[:8])} (rerun the "
                         "same sweep command to finish it; failed runs are retried)")


def load_sweep(sweep_dir, *, metric: str | None = None,
               baseline: str | None = None) -> StudySweep:
    """Read a finished sweep folder (ValueError, naming the problem, for a missing or
    unfinished one) and summarise it at its protocol's chosen lrs, selection / report seeds
    and split. ``metric``: report another metric than the protocol's (the lrs stay those
    chosen on the protocol's metric); ``baseline``: default the protocol's."""
    path = Path(sweep_dir)
    if not path.is_dir():
        raise ValueError(f"no sweep folder at {path}")
    missing = [n for n in ("sweep.json", "results.json", "protocol.json") if not (path / n).is_file()]
    if missing:
        raise ValueError(f"{path} is not a finished sweep folder (no {', '.join(missing)}); run the "
                         "sweep (with --test-seeds, or summarize it) to the end first")
    settings, protocol = read_json(path / "sweep.json"), read_json(path / "protocol.json")
    rows = sweep.load_results(path)
    try:
        _check_finished(path, protocol, rows)
        sel, rep = protocol["selection"], protocol["report"]
        summary = sweep.summarize(
            path, metric=metric or rep["column"], direction=None if metric else sel["direction"],
            baseline=protocol.get("baseline") if baseline is None else baseline,
            methods=protocol["methods"], selection_seeds=sel["seeds"], report_seeds=rep["seeds"],
            report_split=rep.get("requested_split", "auto"), chosen_lrs=sel["chosen_lr"],
            confidence=protocol["confidence"], write=False)
    except KeyError as exc:
        raise ValueError(f"{path / 'protocol.json'} lacks {exc}: summarize the sweep again") from None
    p = summary["protocol"]
    return StudySweep(path=path, settings=settings, protocol=protocol, rows=rows, summary=summary,
                      label=str(p["task"]), task=str(p["task"]),
                      metric=stats.bare_metric(p["report"]["column"]), split=p["report"]["split"],
                      direction=p["selection"]["direction"], baseline=p["baseline"],
                      confidence=float(p["confidence"]), chosen=p["selection"]["chosen_lr"],
                      selection_seeds=p["selection"]["seeds"], report_seeds=p["report"]["seeds"],
                      by_method={r["method"]: r for r in summary["rows"]})


def as_sweep(sweep_dir, metric=None, baseline=None) -> StudySweep:
    """``sweep_dir`` read (:func:`load_sweep`), or as it is when it is a :class:`StudySweep`
    already summarised for this ``metric`` and ``baseline`` (read once, drawn many times)."""
    if isinstance(sweep_dir, StudySweep) and metric in (None, sweep_dir.metric) \
            and baseline in (None, sweep_dir.baseline):
        return sweep_dir
    path = sweep_dir.path if isinstance(sweep_dir, StudySweep) else sweep_dir
    return load_sweep(path, metric=metric, baseline=baseline)


def load_all(sweep_dirs, metric=None, baseline=None) -> list[StudySweep]:
    """The sweeps, labelled by task (``task (folder)`` when two share a task)."""
    if isinstance(sweep_dirs, (str, os.PathLike, StudySweep)) or not (sweep_dirs := list(sweep_dirs)):
        raise ValueError(f"give a non-empty list of sweep folders, got {sweep_dirs!r}")
    sweeps = [as_sweep(d, metric, baseline) for d in sweep_dirs]
    tasks = [s.task for s in sweeps]
    for s in sweeps:
        s.label = s.task if tasks.count(s.task) == 1 else f"{s.task} ({s.path.name})"
    if len({s.label for s in sweeps}) != len(sweeps):
        raise ValueError(f"the same sweep folder is given twice: {[str(s.path) for s in sweeps]}")
    return sweeps
