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

Where the runs execute: :mod:`.backends` (this process or a local process pool, or Ray
tasks on a cluster: ``run_sweep(..., backend="ray")``, ``with use_backend(RayBackend(address=
"auto")): tune_then_test(...)``, ``reflora-analysis sweep ... --backend ray``); the results
table is the same whichever backend ran the runs.

Layout: :mod:`.settings` (argument checks, ``sweep.json``), :mod:`.runs` (run ids, one run,
the grid, :func:`run_sweep`), :mod:`.backends` (where the runs execute), :mod:`.table` (the
results table), :mod:`.protocol` (:func:`summarize`, :func:`tune_then_test`),
:mod:`.commandline` (the ``sweep`` sub-command). Every public name is importable from here.
"""

from __future__ import annotations

from .backends import LocalBackend, RayBackend, make_backend, use_backend
from .commandline import add_arguments, command, main
from .protocol import MIN_TEST_SEEDS, MIN_TUNE_SEEDS, summarize, tune_then_test
from .runs import evaluate_splits, run_id, run_sweep
from .settings import _method_hparams  # noqa: F401  (tests check the scoping rules directly)
from .table import RESULT_COLUMNS, load_curves, load_results

__all__ = ["run_id", "run_sweep", "tune_then_test", "summarize", "load_results", "load_curves",
           "evaluate_splits", "add_arguments", "command", "RESULT_COLUMNS", "MIN_TUNE_SEEDS",
           "MIN_TEST_SEEDS", "LocalBackend", "RayBackend", "make_backend", "use_backend"]
