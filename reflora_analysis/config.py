"""Run configuration: every option of a training run, normalised and checked once.

:class:`RunConfig` is a frozen dataclass; constructing one validates everything a run needs
*before* anything is built or written (unknown task / method / optimizer / probe /
hyper-parameter names, ``lr``, counts, device, dtype, the probe and checkpoint intervals,
``resume`` vs ``overwrite``). Downstream code (:func:`reflora_analysis.train.build_run`,
the command line, :class:`~reflora_analysis.hf_trainer.RefTrainer`) trusts a config and
checks nothing again. The rules live here once:

==================  ===========================================================================
option              rule (normalisation)
==================  ===========================================================================
task                a name of :func:`reflora_analysis.tasks.available_tasks` or a ``Task``
method              a name of :func:`reflora_analysis.methods.available_methods` (stripped,
                    lower case)
optimizer           a base optimizer name, ``sgd`` or ``adamw`` (stripped, lower case)
lr                  a finite number > 0, or ``None``: the task's ``default_lr[optimizer]``,
                    filled in by :meth:`RunConfig.resolve` once the task is built
task_options        ``make_task`` overrides (a task given by name only), plus the options the
                    method sets (``methods.METHODS[method].task_options``: ``dora`` ->
                    ``use_dora=True``, ``full`` -> ``full_finetune=True``); a given option
                    that contradicts them is refused
hparams             names from the method's registry entry
                    (``methods.METHODS[method].hparams``), the base optimizer's keywords
                    (``methods.base.BASE_OPTIMIZER_KWARGS``) and ``weight_decay``; values are
                    the method's to check when it is built
steps               integer > 0;  seed, probe_every, eval_every, checkpoint_every: >= 0;
                    log_every > 0
evaluate_at_ends    ``task.evaluate()`` also at the first and the last step (default True);
                    False where nobody reads those values (a sweep evaluates every split
                    after training, :func:`reflora_analysis.sweep.evaluate_splits`)
probes              names (``"balance,consistency"`` or a list; each one of
                    :func:`reflora_analysis.probes.available_probes`), ``Probe`` objects or
                    callables ``ctx -> dict``; a tuple. Probes need ``probe_every > 0``
device              ``cpu``, ``cuda``, ``cuda:N`` (checked against this machine)
dtype               ``None`` or a floating torch dtype (``torch.float32`` or ``"float32"``)
out                 a ``Path`` or ``None``; ``checkpoint_every`` and ``resume`` need it;
                    ``resume`` and ``overwrite`` exclude each other
==================  ===========================================================================

A bad option raises :class:`ConfigError` (a ``ValueError``; :class:`ConfigTypeError` is also
a ``TypeError``) with a one-line message naming the option, e.g.
``lr must be a finite number > 0, got 0``; its ``cli`` attribute spells the same error
as the command line does (``--lr: must be a finite number > 0, got 0``), which is what
:meth:`RunConfig.from_cli` raises.

The run identity
----------------
:meth:`RunConfig.identity` is the dict a checkpoint stores and a resume compares (task name
and the built task's ``config``, method, optimizer, lr, seed, hyper-parameters, dtype,
autocast, world size); :meth:`RunConfig.fingerprint` is a short hash of it. Both need the
task built and the step size known: use the config of a built run
(``build_run(config).config``) or ``config.resolve(task)``.

Example
-------
>>> from reflora_analysis.config import RunConfig
>>> config = RunConfig("mf", "reflora", steps=100, probes="balance", probe_every=10)
>>> config.probes, config.lr
(('balance',), None)
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["RunConfig", "OptimizerConfig", "ConfigError", "ConfigTypeError", "FrozenDict",
           "check_count", "check_lr", "check_probes", "check_task", "task_options_from_cli"]


class ConfigError(ValueError):
    """A bad run option, with a one-line message naming it.

    Attributes: ``option`` (the field, e.g. ``"lr"``), ``value`` (what was given; for
    ``hparams`` the list of unknown names), ``valid`` (for an unknown name: the valid ones,
    else None) and ``cli`` (the message as the command line spells the option, e.g.
    ``--lr: ...``).
    """

    def __init__(self, option: str, message: str, *, cli: str | None = None, value: Any = None,
                 valid: list[str] | None = None):
        super().__init__(message)
        self.option, self.value, self.valid, self.cli = option, value, valid, cli or message


class ConfigTypeError(ConfigError, TypeError):
    """A run option of the wrong type (also a ``TypeError``)."""


class FrozenDict(dict):
    """A read-only dict (hashable, picklable): a frozen config's mappings stay as validated."""

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; build a new config instead")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        from .io import to_jsonable
        return hash(json.dumps(to_jsonable(dict(self)), sort_keys=True, default=repr))

    def __reduce__(self):
        return type(self), (dict(self),)

    def __repr__(self) -> str:
        return repr(dict(self))


# ---- the rules ----------------------------------------------------------------------------

def check_count(name: str, value, *, minimum: int = 0) -> int:
    """``value`` as an ``int >= minimum`` (``minimum`` 0 or 1), else :class:`ConfigError`.

    Messages: ``steps must be > 0, got 0`` (``--steps: must be >= 1, got 0`` on the command
    line); a non-integer is a :class:`ConfigTypeError` (``steps must be an integer, got float``).
    """
    import numpy as np
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigTypeError(name, f"{name} must be an integer, got {type(value).__name__}",
                              cli=f"{flag}: expected an integer, got {value!r}", value=value)
    if value < minimum:
        bound = ">= 0" if minimum <= 0 else "> 0"
        raise ConfigError(name, f"{name} must be {bound}, got {value}",
                          cli=f"{flag}: must be >= {minimum}, got {value}", value=value)
    return int(value)


def check_lr(value, name: str = "lr") -> float:
    """``value`` as a finite float > 0 (the rule of ``build_optimizer``), else
    :class:`ConfigError` (``lr must be a finite number > 0, got 0``)."""
    from .methods.base import check_lr as rule
    try:
        return rule(value)
    except (TypeError, ValueError):
        reason = f"must be a finite number > 0, got {value!r}"
        raise ConfigError(name, f"{name} {reason}", cli=f"--{name.replace('_', '-')}: {reason}",
                          value=value) from None


def _check_choice(option: str, value, valid: list[str], *, label: str) -> str:
    """A name from ``valid`` (stripped, lower case): ``unknown <label> 'x'; valid: a, b``."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in valid:
        raise ConfigError(option, f"unknown {label} {value!r}; valid: {', '.join(valid)}",
                          value=value, valid=list(valid))
    return name


def _check_hparams(method: str, optimizer: str, hparams) -> FrozenDict:
    """Hyper-parameter names against the method's registry entry and the base optimizer's
    keywords (values are checked by the method when it is built)."""
    from .methods import METHODS
    from .methods.base import BASE_OPTIMIZER_KWARGS
    if hparams is None:
        hparams = {}
    if not isinstance(hparams, Mapping) or not all(isinstance(k, str) for k in hparams):
        raise ConfigTypeError("hparams", f"hparams must be a mapping of names to values, got "
                              f"{type(hparams).__name__}", value=hparams)
    valid = sorted(set(METHODS[method].hparams) | set(BASE_OPTIMIZER_KWARGS[optimizer])
                   | {"weight_decay"})
    unknown = [k for k in hparams if k not in valid]
    if unknown:
        raise ConfigError("hparams", f"unknown hyper-parameter(s) {', '.join(map(repr, unknown))} "
                          f"for method {method!r} with optimizer {optimizer!r}; valid: "
                          f"{', '.join(valid)}", value=unknown, valid=valid)
    return FrozenDict(hparams)


def _check_method_part(method, optimizer, lr, hparams) -> tuple[str, str, float | None, FrozenDict]:
    """The rules :class:`OptimizerConfig` and :class:`RunConfig` share."""
    from .methods import available_methods
    from .methods.base import BASE_OPTIMIZERS
    method = _check_choice("method", method, available_methods(), label="method")
    optimizer = _check_choice("optimizer", optimizer, list(BASE_OPTIMIZERS), label="optimizer")
    lr = None if lr is None else check_lr(lr)
    return method, optimizer, lr, _check_hparams(method, optimizer, hparams)


def check_probes(probes) -> tuple:
    """Probe names (split at commas, each one of ``available_probes()``: ``unknown probe 'x';
    valid: ...``), ``Probe`` objects and callables ``ctx -> dict``, as a tuple."""
    if probes is None:
        return ()
    if isinstance(probes, str) or callable(probes):
        probes = [probes]
    try:
        items = list(probes)
    except TypeError:
        raise ConfigTypeError("probes", "probes must be probe names, Probe objects or callables, "
                              f"got {type(probes).__name__}", value=probes) from None
    from .probes import available_probes
    valid, out = available_probes(), []
    for item in items:
        if isinstance(item, str):
            for name in filter(None, (s.strip() for s in item.split(","))):
                if name not in valid:
                    raise ConfigError("probes", f"unknown probe {name!r}; valid: {', '.join(valid)}",
                                      value=name, valid=valid)
                out.append(name)
        elif callable(item):
            out.append(item)
        else:
            raise ConfigTypeError("probes", "a probe must be a name, a Probe or a callable ctx -> "
                                  f"dict, got {type(item).__name__}", value=item)
    return tuple(out)


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.strip().removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError("dtype", f"dtype must be a floating torch dtype (torch.float32, "
                          f"torch.float64, torch.bfloat16, ...), got {dtype!r}", value=dtype)
    return dtype


def check_task(task, options: Mapping | None = None) -> tuple[Any, FrozenDict]:
    """A task name of ``available_tasks()`` (``unknown task 'x'; valid: ...``) or a built
    ``Task``; ``options`` (``make_task`` overrides) only with a name. Returns both, the
    options frozen (each option is checked by the task itself when it is built)."""
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ConfigTypeError("task_options", f"task_options must be a mapping, got "
                              f"{type(options).__name__}", value=options)
    if isinstance(task, str):
        from .tasks import available_tasks
        if task not in available_tasks():
            raise ConfigError("task", f"unknown task {task!r}; valid: {', '.join(available_tasks())}",
                              value=task, valid=available_tasks())
    elif not all(hasattr(task, a) for a in ("name", "model", "loss", "batch")):
        raise ConfigTypeError("task", f"task must be a task name or a Task, got "
                              f"{type(task).__name__}", value=task)
    elif options:
        raise ConfigError("task_options", "task_overrides only apply when task is given by name")
    return task, FrozenDict(options)


def with_method_options(task, method: str, options: FrozenDict) -> FrozenDict:
    """``options`` plus the task options ``method`` sets (``MethodSpec.task_options``: ``dora``
    -> ``use_dora=True``, ``full`` -> ``full_finetune=True``) when the task is built by name.

    A contradiction is a :class:`ConfigError` (``--set use_dora=false: contradicts --method
    dora, which sets use_dora=true`` on the command line). A built ``Task`` keeps its model:
    ``build_optimizer`` then refuses one that lacks what the method trains.
    """
    from .methods.registry import get_method, method_task_options
    if not isinstance(task, str):
        return options
    try:
        return FrozenDict(method_task_options(method, options))
    except ValueError as exc:
        key = next(k for k in get_method(method).task_options if k in options)
        given, own = (json.dumps(v) if isinstance(v, bool) else v  # as --set spells them
                      for v in (options[key], get_method(method).task_options[key]))
        raise ConfigError("task_options", str(exc), value={key: options[key]},
                          cli=f"--set {key}={given}: contradicts --method {method}, which sets "
                              f"{key}={own}") from None


def _check_files(out, checkpoint_every: int, resume: bool, overwrite: bool) -> Path | None:
    if (checkpoint_every or resume) and out is None:
        raise ConfigError("out", "checkpoint_every/resume need out= (the checkpoint lives next "
                          "to the JSON lines)")
    if resume and overwrite:
        raise ConfigError("overwrite", "resume and overwrite exclude each other: resume continues "
                          "the run at out, overwrite replaces it",
                          cli="--resume and --overwrite exclude each other")
    return None if out is None else Path(out)


def task_options_from_cli(args) -> dict:
    """``make_task`` overrides of a command line: ``--set KEY=VALUE`` pairs, ``--model`` as
    ``model_path`` and ``--data`` as ``data_path``."""
    options = dict(args.settings)
    for key, path in (("model_path", args.model), ("data_path", args.data)):
        if path is not None:
            options[key] = path
    return options


# ---- the configurations ---------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerConfig:
    """The method part of a run, validated: ``method``, base ``optimizer``, ``lr``, ``hparams``.

    The same rules as :class:`RunConfig` (which applies them to its own fields); used where
    there is no task, e.g. by :class:`~reflora_analysis.hf_trainer.RefTrainer`. ``lr`` may be
    ``None`` (then :func:`~reflora_analysis.methods.build_optimizer` needs one given).
    """

    method: str
    optimizer: str = "sgd"
    lr: float | None = None
    hparams: Mapping[str, Any] = field(default_factory=FrozenDict)

    def __post_init__(self):
        values = _check_method_part(self.method, self.optimizer, self.lr, self.hparams)
        for name, value in zip(("method", "optimizer", "lr", "hparams"), values):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class RunConfig:
    """Every option of one training run, validated once (module docstring for the rules).

    Fields mirror :func:`reflora_analysis.train.run`'s keywords: ``task`` (a name or a
    ``Task``), ``method``, ``steps``, ``optimizer``, ``lr`` (None: the task's default),
    ``seed``, ``device``, ``dtype``, ``autocast_bf16``, ``hparams`` (the method's and the base
    optimizer's keywords; ``train.run``'s ``**method_hparams``), ``task_options``
    (``make_task`` overrides; ``train.run``'s ``task_overrides``), ``quick`` (the task's small
    settings), ``probes``, ``probe_every``, ``log_every``, ``eval_every``,
    ``evaluate_at_ends``, ``checkpoint_every``, ``resume``, ``overwrite``, ``skip_nonfinite``,
    ``progress``, ``out``, and ``world_size`` (processes training together; :func:`build_run`
    sets it from ``torch.distributed``).

    Immutable: ``hparams`` and ``task_options`` are :class:`FrozenDict`, ``probes`` a tuple;
    derive a changed config with ``dataclasses.replace``.
    """

    task: Any
    method: str
    steps: int
    optimizer: str = "sgd"
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype | None = None
    autocast_bf16: bool = False
    hparams: Mapping[str, Any] = field(default_factory=FrozenDict)
    task_options: Mapping[str, Any] = field(default_factory=FrozenDict)
    quick: bool = False
    probes: tuple = ()
    probe_every: int = 0
    log_every: int = 1
    eval_every: int = 0
    evaluate_at_ends: bool = True
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: bool = False
    progress: bool = True
    out: Path | None = None
    world_size: int = 1

    def __post_init__(self):
        task, options = check_task(self.task, self.task_options)
        method, optimizer, lr, hparams = _check_method_part(self.method, self.optimizer, self.lr,
                                                            self.hparams)
        options = with_method_options(task, method, options)
        counts = {"steps": check_count("steps", self.steps, minimum=1),
                  "seed": check_count("seed", self.seed),
                  "probe_every": check_count("probe_every", self.probe_every),
                  "log_every": check_count("log_every", self.log_every, minimum=1),
                  "eval_every": check_count("eval_every", self.eval_every),
                  "checkpoint_every": check_count("checkpoint_every", self.checkpoint_every),
                  "world_size": check_count("world_size", self.world_size, minimum=1)}
        out = _check_files(self.out, counts["checkpoint_every"], self.resume, self.overwrite)
        from .tasks.base import resolve_device
        try:
            device = str(resolve_device(self.device))
        except ValueError as exc:
            raise ConfigError("device", str(exc), value=self.device) from None
        probes = check_probes(self.probes)
        if probes and not counts["probe_every"]:
            raise ConfigError("probe_every", "probes were given but probe_every is 0; pass "
                              "probe_every=K", cli="--probe needs --probe-every K")
        values = dict(task=task, task_options=options, method=method, optimizer=optimizer, lr=lr,
                      hparams=hparams, out=out, device=device, probes=probes,
                      dtype=_check_dtype(self.dtype), **counts)
        for flag in ("autocast_bf16", "quick", "evaluate_at_ends", "resume", "overwrite",
                     "skip_nonfinite", "progress"):
            values[flag] = bool(getattr(self, flag))
        for name, value in values.items():
            object.__setattr__(self, name, value)

    # ---- construction from the command line ---------------------------------------------

    @classmethod
    def from_cli(cls, args, **changes) -> "RunConfig":
        """The config of ``reflora-analysis train`` (its ``argparse`` namespace).

        ``changes`` replace fields (e.g. ``device`` under ``torchrun``). Errors are
        :class:`ConfigError` spelled as the command line names the options
        (``--lr: must be a finite number > 0, got 0.0``, ``--probe needs --probe-every K``).
        """
        hparams = dict(args.hparams)
        if getattr(args, "weight_decay", None) is not None:
            hparams["weight_decay"] = args.weight_decay
        options = task_options_from_cli(args)
        fields = dict(task=args.task, method=args.method, steps=args.steps,
                      optimizer=args.optimizer, lr=args.lr, seed=args.seed, device=args.device,
                      autocast_bf16=args.bf16, hparams=hparams, task_options=options,
                      quick=args.quick, probes=args.probe, probe_every=args.probe_every or 0,
                      log_every=args.log_every, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      overwrite=args.overwrite, skip_nonfinite=args.skip_nonfinite,
                      progress=not args.no_progress, out=args.out)
        fields.update(changes)
        try:
            return cls(**fields)
        except ConfigError as exc:
            error = ConfigTypeError if isinstance(exc, TypeError) else ConfigError
            raise error(exc.option, exc.cli, value=exc.value, valid=exc.valid) from None

    # ---- the built task and the identity -------------------------------------------------

    @property
    def task_name(self) -> str:
        return self.task if isinstance(self.task, str) else str(self.task.name)

    @property
    def resolved(self) -> bool:
        """Whether the task is built and the step size known (:meth:`identity` works)."""
        return not isinstance(self.task, str) and self.lr is not None

    def resolve(self, task, *, world_size: int | None = None) -> "RunConfig":
        """This config for the built ``task``: ``task`` set to it, ``lr`` defaulting to
        ``task.default_lr[optimizer]``, ``world_size`` set (if given). Nothing else changes
        and nothing is validated again; ``ValueError`` if the task has no default step size
        for the optimizer and ``lr`` is None."""
        lr = self.lr
        if lr is None:
            try:
                lr = check_lr(float(task.default_lr[self.optimizer]))
            except (KeyError, TypeError, AttributeError, ConfigError):
                raise ConfigError("lr", f"task {getattr(task, 'name', task)!r} has no default lr "
                                  f"for {self.optimizer!r}; pass lr") from None
        resolved = copy.copy(self)  # frozen: fields set below, without re-running the checks
        object.__setattr__(resolved, "task", task)
        object.__setattr__(resolved, "lr", lr)
        if world_size is not None:
            object.__setattr__(resolved, "world_size", check_count("world_size", world_size,
                                                                   minimum=1))
        return resolved

    def identity(self) -> dict:
        """What a checkpoint of this run stores and a resume compares: ``task``,
        ``task_config`` (the built task's ``config``), ``method``, ``optimizer``, ``lr``,
        ``seed``, ``hparams`` (sorted), ``dtype`` (``str`` or None), ``autocast_bf16``,
        ``world_size``. Needs a resolved config (:meth:`resolve`)."""
        if not self.resolved:
            raise ValueError("identity() needs the built task and the step size: use "
                             "build_run(config).config or config.resolve(task)")
        return {"task": self.task.name, "task_config": getattr(self.task, "config", {}),
                "method": self.method, "optimizer": self.optimizer, "lr": self.lr,
                "seed": self.seed, "hparams": dict(sorted(self.hparams.items())),
                "dtype": str(self.dtype) if self.dtype is not None else None,
                "autocast_bf16": self.autocast_bf16, "world_size": self.world_size}

    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of :meth:`identity` (canonical JSON): equal for equal
        identities, different otherwise."""
        from .io import to_jsonable
        text = json.dumps(to_jsonable(self.identity()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
