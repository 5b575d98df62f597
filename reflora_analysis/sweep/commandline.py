"""The ``sweep`` sub-command: :func:`add_arguments` declares its options, :func:`command`
runs them (``reflora-analysis sweep`` or ``python -m reflora_analysis.sweep``, :func:`main`).

Lists are comma-separated (``--lrs 0.01,0.03``); ``--set`` / ``--hparam`` take ``KEY=VALUE``
read as ``train`` reads them (:func:`reflora_analysis.keyvalue.parse_key_value`:
``none``/``true``/``false``, a Python literal or JSON, else a string).

``--backend ray [--address ADDR]`` runs the runs as Ray tasks (:mod:`.backends`), e.g. on a
cluster started with ``ray start`` or under SLURM; the results table is the same as with the
default ``--backend local``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..keyvalue import parse_key_value
from .backends import BACKENDS, make_backend, use_backend
from .protocol import summarize, tune_then_test
from .runs import run_sweep
from .table import load_results

__all__ = ["add_arguments", "command", "main"]


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
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel runs: the local process pool's size (default 1); with "
                             "--backend ray, at most this many runs in flight (default: as many "
                             "as the cluster takes)")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="where the runs execute: local (this machine) or ray (Ray tasks; "
                             "pip install 'reflora-analysis[ray]')")
    parser.add_argument("--address", default=None,
                        help="with --backend ray: the Ray cluster to join (e.g. auto, "
                             "ray://head:10001); default RAY_ADDRESS, else a local Ray")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="task's small settings")
    parser.add_argument("--set", dest="settings", action="append", type=parse_key_value, default=[],
                        metavar="KEY=VALUE", help="task override, repeatable (e.g. --set rank=8)")
    parser.add_argument("--hparam", dest="hparams", action="append", type=parse_key_value, default=[],
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
    ray = args.backend == "ray"
    backend = make_backend(args.backend, address=args.address,
                           max_in_flight=args.jobs if ray else None)
    task_options = dict(args.settings)
    if args.quick:
        task_options["quick"] = True
    baseline = None if str(args.baseline).lower() == "none" else args.baseline
    jobs = 1 if ray or args.jobs is None else args.jobs  # the local pool's size
    common = dict(optimizer=args.optimizer, jobs=jobs, task_options=task_options,
                  hparams=dict(args.hparams), progress=not args.no_progress, device=args.device,
                  checkpoint_every=args.checkpoint_every)
    with use_backend(backend):
        summary = _run(args, baseline, common)
    return _print_outcome(Path(args.out), summary)


def _run(args: argparse.Namespace, baseline: str | None, common: dict) -> dict | None:
    """The sweep or the two-stage protocol; the summary, or None with one seed."""
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
    return summary


def _print_outcome(out: Path, summary: dict | None) -> int:
    """``summary.md`` on stdout, a one-line count on stderr; 1 when some run failed."""
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
    from . import __doc__ as overview
    parser = argparse.ArgumentParser(prog="reflora-analysis sweep", description=overview.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ValueError as exc:
        print(f"reflora-analysis: error: {exc}", file=sys.stderr)
        return 2
