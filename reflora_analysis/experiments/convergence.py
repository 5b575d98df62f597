r"""Notebook 05: the encoder study on the four VADER sentence tasks (the paper's GLUE table).

``run = convergence.setup(globals())``, ``data = convergence.experiment(run)``, then
:func:`reflora_analysis.plotting.publish_convergence`.

Per task (``vader-movies``, ``vader-tweets``, ``vader-amazon``, ``vader-nyt``: MiniLM-L6 +
PEFT LoRA by default; any local encoder checkpoint, e.g. DeBERTaV3, by ``model_path``) the
two-stage protocol of :func:`reflora_analysis.sweep.tune_then_test`: every method x ``lrs``
x ``seeds``, the lr chosen per method on the **validation** split; then each method at its
chosen lr on ``test_seeds``, reported on the **test** split with the paired difference to
LoRA and its t interval (:mod:`reflora_analysis.stats`). :func:`run_study` is the loop over
the tasks, shared with notebook 07 (:mod:`.causal_lm`); the sweep folders go to
``<out>/sweeps/<task>/`` (resumable: a finished run is never re-run; no checkpoints, so a
killed run restarts from step 0).

Derived: ``task_options`` (every run of every task: ``quick``, ``batch_size``,
``max_length``, ``eval_examples``, ``model_path`` when given, ``evaluate_test=False``: a
plain ``evaluate()`` skips the test split; the sweep evaluates each split once, after
training), ``hparams``
(``refactor_warmup`` as ``<method>:warmup_steps`` of each method that takes it) and
``demonstration`` (quick, or fewer seeds than the protocol's minimums: the run is then
labelled a pipeline demonstration, whose numbers decide nothing).

Quick (:data:`SPEC`), a **pipeline demonstration**: the first 2 methods and the first 2
lrs of the lists, 2 seeds that both choose the lr and report, 4 steps, 16 tokens, 16
validation / test examples, plus each task's own quick settings (batch 8, the first 256
training examples). About 90 s on 2 idle cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..sweep import MIN_TEST_SEEDS, MIN_TUNE_SEEDS, tune_then_test
from .common import write_data
from .timing import CLOCKS
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, first

__all__ = ["SPEC", "VADER_TASKS", "setup", "experiment", "real_model_convergence", "run_study",
           "study_hparams", "is_demonstration", "study_title", "derive_study_arguments"]

#: the four human-rated sentence tasks of :mod:`reflora_analysis.tasks.sentence_tasks`
VADER_TASKS = ["vader-movies", "vader-tweets", "vader-amazon", "vader-nyt"]


def study_hparams(methods: Sequence[str], refactor_warmup: int) -> dict[str, int]:
    """``{"<method>:warmup_steps": refactor_warmup}`` for each of ``methods`` that takes a
    ``warmup_steps`` (plain LoRA steps first: PEFT's B = 0 start is degenerate for the
    refactoring methods, THEORY.md F10); ``{}`` for a warm-up of 0."""
    from ..methods import get_method
    if not refactor_warmup:
        return {}
    return {f"{m}:warmup_steps": int(refactor_warmup) for m in methods
            if "warmup_steps" in get_method(m).hparams}


def is_demonstration(params: Mapping[str, Any]) -> bool:
    """Quick mode, or fewer tune / test seeds than the protocol's minimums (3 / 5)."""
    return bool(params["quick"]) or len(set(params["seeds"])) < MIN_TUNE_SEEDS \
        or len(set(params["test_seeds"])) < MIN_TEST_SEEDS


def derive_study_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """The derived arguments of a study notebook (05, 07): ``task_options``, ``hparams``,
    ``demonstration`` (module docstring)."""
    # evaluate_test=False changes no number: the sweep's runs evaluate nothing inside train.run
    # (evaluate_at_ends=False) and sweep.evaluate_splits reports both splits. Kept because each
    # run's config.json records the options: existing sweep folders must keep matching.
    options = {"quick": bool(params["quick"]), "batch_size": params["batch_size"],
               "max_length": params["max_length"], "eval_examples": params["eval_examples"],
               "evaluate_test": False}
    if params["model_path"] is not None:
        options["model_path"] = params["model_path"]
    return {"task_options": options, "demonstration": is_demonstration(params),
            "hparams": study_hparams(params["methods"], params["refactor_warmup"])}


SPEC = NotebookSpec(
    "05_real_model_convergence",
    parameters=dict(quick=False, device="cpu", tasks=list(VADER_TASKS), methods=["lora", "reflora"],
                    lrs=[1e-3, 3e-3, 3e-4, 1e-2, 1e-4], seeds=[0, 1, 2], test_seeds=[0, 1, 2, 3, 4],
                    steps=60, optimizer="adamw", model_path=None, batch_size=16, max_length=32,
                    eval_examples=400, refactor_warmup=10, jobs=1, out_dir=None),
    quick=Preset(methods=first(2), lrs=first(2), seeds=first(2), test_seeds=first(2),
                 steps=at_most(4), batch_size=at_most(8), max_length=at_most(16),
                 eval_examples=at_most(16), refactor_warmup=at_most(1)),
    derive=derive_study_arguments)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def study_title(what: str, run: NotebookRun) -> str:
    """``what`` with the methods and optimizer; a demonstration says so first."""
    title = f"{what}: {', '.join(run['methods'])} with {run['optimizer']}"
    if run["demonstration"]:
        title = (f"PIPELINE DEMONSTRATION, not evidence ({run['steps']} steps, seeds "
                 f"{run['seeds']} / {run['test_seeds']}): {title}")
    return title


def study_command(notebook: str, run: NotebookRun) -> str:
    """The ``figures`` command that reproduces a study notebook's run (05, 07)."""
    quick = " --quick" if run["quick"] else ""
    device = f" --device {run['device']}" if run["device"] != "cpu" else ""
    return f"reflora-analysis figures --only {notebook}{quick}{device} (arguments as used: params.json)"


def study_notebook_arguments(run: NotebookRun) -> dict[str, Any]:
    """The keyword arguments a study notebook (05, 07) passes from its run to its study
    function: the grid, the protocol's seeds, the training settings and the output folder."""
    names = ("lrs", "seeds", "test_seeds", "steps", "optimizer", "device", "task_options",
             "hparams", "jobs", "demonstration")
    return {**{name: run[name] for name in names}, "out_dir": run.out}


def print_chosen_lrs(data: dict[str, Any]) -> None:
    """One line per task: the lr each method chose on validation."""
    for task, chosen in data["chosen_lr"].items():
        print(f"{task}: lr chosen on validation: {chosen}")


def experiment(run: NotebookRun) -> dict[str, Any]:
    """:func:`real_model_convergence` with the run's arguments; prints the chosen lrs."""
    encoder = Path(run["model_path"]).name if run["model_path"] else "MiniLM-L6"
    data = real_model_convergence(
        run["tasks"], run["methods"], **study_notebook_arguments(run),
        title=study_title(f"{encoder} + LoRA on the VADER sentence tasks", run),
        command=study_command("05", run))
    print_chosen_lrs(data)
    return data


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    from ..tasks import available_tasks
    if isinstance(tasks, str) or not list(tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(available_tasks())}")
    return list(dict.fromkeys(tasks))


def _summary_table(sweeps: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list]]:
    """One row per (task, method): the protocol's summary (``stats.SUMMARY_COLUMNS``)."""
    from ..stats import SUMMARY_COLUMNS
    rows = [[task, *[r[c] for c in SUMMARY_COLUMNS]] for task, s in sweeps.items() for r in s["rows"]]
    return ["task", *SUMMARY_COLUMNS], rows


def run_study(tasks: Sequence[str], methods: Sequence[str], *, lrs: Sequence[float],
              seeds: Sequence[int], test_seeds: Sequence[int], steps: int, out_dir,
              optimizer: str = "adamw", device: str = "cpu",
              task_options: Mapping[str, Any] | None = None,
              hparams: Mapping[str, Any] | None = None, jobs: int = 1,
              demonstration: bool = False, title: str = "study",
              command: str | None = None, progress: bool = True) -> dict[str, Any]:
    r"""Per task, :func:`reflora_analysis.sweep.tune_then_test` into ``out_dir/sweeps/<task>``
    (lr chosen on validation over ``seeds``, reported on test over ``test_seeds``, paired to
    ``lora``); every task is checked before the first run. Writes ``study_data.json`` (this
    returned data) and ``study_summary.csv`` (one row per task and method, the protocol's
    summary: chosen lr, mean, interval, paired difference, verdict, speed).

    Returns ``{"title", "command", "tasks", "methods", "lrs", "seeds", "test_seeds",
    "steps", "optimizer", "task_options", "hparams", "demonstration", "wall_time_s",
    "sweep_dirs": [folder per task, relative to out_dir], "chosen_lr": {task: {method: lr}},
    "sweeps": {task: {"dir", "chosen_lr", "rows"}}}`` (rows: ``stats.SUMMARY_COLUMNS``);
    :func:`reflora_analysis.plotting.publish_study` turns it into figures and tables.
    """
    if out_dir is None:
        raise ValueError("run_study needs an out_dir (the sweep folders go there)")
    tasks, started, sweeps = _check_tasks(tasks), CLOCKS["wall"](), {}
    for task in tasks:
        folder = Path(out_dir) / "sweeps" / task
        summary = tune_then_test(task, methods, lrs, seeds, test_seeds, steps, folder,
                                  optimizer=optimizer, jobs=jobs, task_options=task_options,
                                  hparams=hparams, progress=progress, device=device,
                                  checkpoint_every=0, demonstration=demonstration)
        sweeps[task] = {"dir": f"sweeps/{task}", "rows": summary["rows"],
                        "chosen_lr": summary["protocol"]["selection"]["chosen_lr"]}
    data = {"title": title, "command": command, "tasks": tasks, "methods": list(methods),
            "lrs": [float(x) for x in lrs], "seeds": list(seeds), "test_seeds": list(test_seeds),
            "steps": steps, "optimizer": optimizer, "task_options": dict(task_options or {}),
            "hparams": dict(hparams or {}), "demonstration": bool(demonstration),
            "wall_time_s": round(CLOCKS["wall"]() - started, 1),
            "sweep_dirs": [s["dir"] for s in sweeps.values()],
            "chosen_lr": {t: s["chosen_lr"] for t, s in sweeps.items()}, "sweeps": sweeps}
    write_data(out_dir, "study_data", data, {"study_summary": _summary_table(sweeps)})
    return data


def real_model_convergence(tasks: Sequence[str] = tuple(VADER_TASKS),
                           methods: Sequence[str] = ("lora", "reflora"), *,
                           lrs: Sequence[float] = (1e-3, 3e-3, 3e-4, 1e-2, 1e-4),
                           seeds: Sequence[int] = (0, 1, 2),
                           test_seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int = 60,
                           out_dir=None, optimizer: str = "adamw", device: str = "cpu",
                           task_options: Mapping[str, Any] | None = None,
                           hparams: Mapping[str, Any] | None = None, jobs: int = 1,
                           demonstration: bool = False, title: str | None = None,
                           command: str | None = None) -> dict[str, Any]:
    r"""The encoder study: :func:`run_study` on the VADER sentence tasks (``tasks``; any
    task with a validation and a test split works), the analogue of the paper's GLUE table
    and loss curves. ``task_options``: e.g. ``{"model_path": "/models/deberta-v3-base"}``
    for another encoder, ``batch_size``, ``max_length``, ``eval_examples``, ``quick``."""
    if not (isinstance(steps, int) and steps >= 1) or isinstance(steps, bool):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    title = title or f"Encoder study on {', '.join(tasks)}"
    return run_study(tasks, methods, lrs=lrs, seeds=seeds, test_seeds=test_seeds, steps=steps,
                     out_dir=out_dir, optimizer=optimizer, device=device,
                     task_options=task_options, hparams=hparams, jobs=jobs,
                     demonstration=demonstration, title=title, command=command)
