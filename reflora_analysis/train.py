"""The training loop, :func:`fit` (one screen), over public parts that can be used alone.

Parts: a :class:`~reflora_analysis.config.RunConfig` (every option, validated once) ->
:func:`build_run` (task, model, optimizer, transform, probes: a :class:`Run`) ->
:func:`train_step` per iteration (batch, forward, backward, the non-finite policy, the
update: a :class:`StepResult`) -> :class:`RunLog` (the JSON lines, ``.meta.json``, the
refusal to replace an earlier run) and :func:`save_run_checkpoint` /
:func:`restore_checkpoint`; :func:`probe_values` and :func:`evaluate` are the callbacks.
:func:`run` is the keyword interface: it builds a ``RunConfig`` and calls :func:`fit`.

Iteration ``t = 0, 1, ..., steps`` (``t`` = number of updates applied so far):

1. at a checkpoint step (``t % checkpoint_every == 0``), save the state *before* iteration
   ``t`` (weights, optimizer, transform, RNG; see :mod:`reflora_analysis.checkpoint`);
2. probes (every ``probe_every``) and ``task.evaluate()`` (``eval_every``, and at the first
   and last step) at the current weights ``theta_t``;
3. ``loss_t = task.loss(task.batch(t))`` at ``theta_t``; one JSON line
   ``{"step": t, "loss": loss_t, "lr", "time", "method", "optimizer", ...probe values}``
   is appended and flushed (step 0 is the initial point, before any update);
4. unless ``t == steps``: backward, finiteness check of every gradient, then
   ``optimizer.step()`` (the method's transform runs in the optimizer's step hooks),
   ``zero_grad``.

So line ``t`` always reports the loss *after* ``t`` updates, and a checkpoint at step ``t``
is a clean boundary: resuming from it truncates the JSON lines to ``step < t`` and runs
iteration ``t`` again, which reproduces the uninterrupted run bit for bit on CPU (batches
are deterministic in ``(seed, step)`` and every global RNG is restored).

Divergence: a non-finite loss or gradient raises :class:`TrainingDiverged` naming the step
(and the layer, for gradients) after logging the line, or, with ``skip_nonfinite=True``,
skips the update (the line carries ``"skipped": true``) and continues. A non-finite weight
after an update always stops the run. No checkpoint is ever written from a non-finite
state (:class:`~reflora_analysis.checkpoint.PoisonedCheckpointError`).

Under ``torchrun`` (``torch.distributed`` initialised) each rank computes the loss of its
shard of ``task.batch(t)`` (dim 0), gradients are averaged across ranks before the optimizer
step (so the method's transform sees identical reduced gradients everywhere), the logged
loss is the cross-rank mean, and rank 0 alone runs probes/evaluation and writes files; see
:mod:`reflora_analysis.distributed` (under ``--fsdp`` the frozen base is sharded, so every
rank evaluates and probes are refused).

Determinism: bit-identical on CPU for a fixed seed (and across a kill/resume). On CUDA,
kernels such as atomics-based reductions are not bit-reproducible unless the user enables
``torch.use_deterministic_algorithms(True)`` (not set here: it is a process-wide switch).

Files written next to ``out`` (``run.jsonl``): ``run.meta.json`` (config, versions --
``reflora_analysis_version`` at the top level --, status, summary; rewritten atomically at
start and end) and ``run.ckpt.pt`` (the latest checkpoint). An existing log, meta or
checkpoint is never replaced silently: without ``resume`` (continue it) or ``overwrite``
(replace all three) the run raises ``FileExistsError`` before doing anything.

Probes are checked against the task before step 0 (``Probe.check``), so a probe that cannot
run on the task (e.g. ``bound`` on a multi-layer model) fails at once with a ``ValueError``
naming both, before any file is written.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .checkpoint import (PoisonedCheckpointError, RunLog, capture_rng_state, checkpoint_path,
                         first_nonfinite_tensor, load_checkpoint, meta_path,
                         restore_training_state, save_checkpoint)
from .config import RunConfig
from .distributed import DistributedContext
from .refactor import NonFiniteGradientError
from .tasks.base import resolve_device

__all__ = ["run", "fit", "build_run", "train_step", "probe_values", "evaluate",
           "restore_checkpoint", "save_run_checkpoint", "Run", "StepResult", "RunLog",
           "RunConfig", "TrainingDiverged", "checkpoint_path", "meta_path", "resolve_device",
           "seed_everything", "jsonable_scalar"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight stopped the run.

    Attributes: ``step`` (iteration index), ``layer`` (parameter name or None), ``what``
    (``"loss"``, ``"gradient"`` or ``"weights"``).
    """

    def __init__(self, message: str, *, step: int, layer: str | None = None, what: str = "loss"):
        super().__init__(message)
        self.step, self.layer, self.what = step, layer, what


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def jsonable_scalar(value):
    """Tensors and numpy scalars -> float; everything else as given."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().item())  # .item() keeps float64 exact
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- build ----------------------------------------------------------------------------------

@dataclass
class Run:
    """What one run trains with, built by :func:`build_run`; the loop's only state.

    ``config`` is resolved (``config.task`` is ``task``, ``config.lr`` a float), so
    ``config.identity()`` works. ``probes`` are callables ``ProbeContext -> dict``, already
    checked against the task. ``start``, ``elapsed`` (seconds trained before) and ``skipped``
    (updates skipped as non-finite) change as the run goes (``restore_checkpoint`` sets them).
    """

    config: RunConfig
    task: Any
    optimizer: torch.optim.Optimizer
    transform: Any
    probes: list
    dist: DistributedContext = field(default_factory=DistributedContext)
    start: int = 0
    elapsed: float = 0.0
    skipped: int = 0

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def probes_due(self, step: int) -> bool:
        """Probes run at ``step``: every ``probe_every`` steps, on rank 0."""
        return bool(self.probes) and self.is_main and step % self.config.probe_every == 0

    def eval_due(self, step: int) -> bool:
        """``task.evaluate()`` runs at ``step``: every ``eval_every``, first and last (if
        ``evaluate_at_ends``); rank 0 (all ranks under FSDP: a sharded forward is a collective)."""
        c = self.config
        ends = c.evaluate_at_ends and step in (0, c.steps)
        return (self.is_main or self.dist.fsdp) and (ends or bool(c.eval_every and step % c.eval_every == 0))

    def log_due(self, step: int) -> bool:
        """Line ``step`` is logged (a non-finite step is logged too): every ``log_every``
        steps, the last one, and where probes or evaluation ran."""
        c = self.config
        return (step % c.log_every == 0 or step == c.steps or self.probes_due(step)
                or self.eval_due(step))

    @functools.cached_property
    def params(self) -> list[nn.Parameter]:
        """The optimizer's parameters, in its order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @functools.cached_property
    def parameter_names(self) -> dict[int, str]:
        """``id(param) -> name``: LoRA factors in paper notation (``layer.A``), others by path."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        for pair in getattr(self.task, "pairs", None) or ():
            names[id(pair.a)], names[id(pair.b)] = f"{pair.name}.A", f"{pair.name}.B"
        return names

    def batch(self, step: int, *, shard: bool = True):
        """``task.batch(step)``: this rank's shard (``shard``), floats cast to ``config.dtype``."""
        batch = self.task.batch(step)
        if shard and self.dist.world_size > 1:
            batch = self.dist.shard(batch)
        return _cast_floats(batch, self.config.dtype) if self.config.dtype is not None else batch

    def autocast(self):
        """The forward pass's context: bf16 autocast when ``config.autocast_bf16``."""
        if not self.config.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.config.device).type, dtype=torch.bfloat16)

    def describe(self, message: str) -> str:
        """``message (method, optimizer, lr=...)``, the suffix of every divergence message."""
        c = self.config
        return f"{message} ({c.method}, {c.optimizer}, lr={c.lr:g})"


def _cast_floats(obj, dtype):
    """Cast the floating tensors inside a batch (tensor, dict, list, tuple) to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _pairs_argument(task) -> dict:
    """``{"pairs": task.pairs}`` for plain-torch models whose factors PEFT discovery cannot find.

    A PEFT model is passed alone (``build_optimizer`` may then use PEFT's own optimizer
    helpers); a plain ``nn.Module`` (``mf``: parameters ``A``, ``B``) needs its pairs named.
    A task without pairs (``full_finetune``: no LoRA layers) is passed alone too: method
    ``full`` trains its weights, any other method refuses it with ``NoLoraLayersError``.
    """
    from .pairs import NoLoraLayersError, find_lora_pairs
    pairs = getattr(task, "pairs", None)
    if not pairs:
        return {}
    if "peft" not in sys.modules:
        # no PEFT model can exist before peft is imported; skipping the discovery also
        # spares plain-torch runs peft's ~3 s import
        return {"pairs": pairs}
    try:
        find_lora_pairs(task.model)
        return {}
    except NoLoraLayersError:
        return {"pairs": pairs}


def build_run(config: RunConfig, task=None) -> Run:
    """Build everything ``config`` trains: the task, its model, the optimizer and transform.

    Contract
    --------
    * seeds every generator with ``config.seed`` (:func:`seed_everything`), then takes
      ``task`` if given (a built ``Task``, e.g. one task shared by several runs; it replaces
      ``config.task``), else ``config.task`` if it is a ``Task``, else builds it with
      ``make_task(config.task, seed=, device=, quick=, **config.task_options)``;
    * checks every probe against the task (``Probe.check``: ``ValueError`` before anything
      is trained), casts the model to ``config.dtype`` if set;
    * resolves the config (``lr=None`` -> ``task.default_lr[optimizer]``, ``world_size``
      from ``torch.distributed``) and builds the optimizer with
      :func:`reflora_analysis.methods.build_optimizer` (the method's transform attached to
      its step hooks); plain-torch models get their ``task.pairs`` passed explicitly (the
      one place of that fallback);
    * writes no file and takes no step: the returned :class:`Run` is at step 0 with fresh
      optimizer state (:func:`restore_checkpoint` moves it to a checkpoint).
    """
    from . import tasks
    from .methods import build_optimizer
    from .probes import make_probes
    dist = DistributedContext.current()
    seed_everything(config.seed)
    task = task if task is not None else config.task
    if isinstance(task, str):
        task = tasks.make_task(task, seed=config.seed, device=config.device, quick=config.quick,
                               **config.task_options)
    elif config.task_options and isinstance(config.task, str):
        raise ValueError("task_overrides only apply when task is given by name")
    probes = make_probes(list(config.probes))
    for probe in probes:
        if callable(getattr(probe, "check", None)):
            probe.check(task)
    if config.dtype is not None:
        task.model.to(dtype=config.dtype)
    if dist.fsdp:  # frozen base sharded across ranks, LoRA factors whole (distributed.py)
        from .distributed import prepare_fsdp
        prepare_fsdp(task, probes)
    config = config.resolve(task, world_size=dist.world_size)
    optimizer, transform = build_optimizer(config.method, task.model, optimizer=config.optimizer,
                                           lr=config.lr, **_pairs_argument(task), **config.hparams)
    return Run(config, task, optimizer, transform, probes, dist)


# ---- one step -------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What :func:`train_step` did at ``step``.

    ``loss``: the loss at the weights before the update (cross-rank mean); ``updated``:
    whether an optimizer update was applied; ``problem``: the non-finite loss or gradient
    found (then no update); ``skipped``: the update was skipped under ``skip_nonfinite``;
    ``error``: the :class:`TrainingDiverged` that must stop the run (``problem`` unless it was
    skipped, or non-finite weights after the update), to raise once the step is logged;
    ``seconds``: wall time of forward, backward and update (the batch's construction
    excluded; synchronised on CUDA).
    """

    step: int
    loss: float
    updated: bool = False
    problem: TrainingDiverged | None = None
    skipped: bool = False
    error: TrainingDiverged | None = None
    seconds: float = 0.0

    def fields(self) -> dict:
        """The JSON-line fields of the non-finite policy: ``nonfinite``, ``skipped``."""
        if self.problem is None:
            return {}
        return {"nonfinite": self.problem.what, "skipped": self.skipped}


def _sync(run: Run) -> None:
    if torch.device(run.config.device).type == "cuda":
        torch.cuda.synchronize(run.config.device)


def _gradient_problem(run: Run, step: int) -> TrainingDiverged | None:
    """Backward has run: average across ranks, then the first non-finite gradient, if any."""
    params = run.params
    if run.dist.world_size > 1:
        run.dist.average_gradients(params)
    names = run.parameter_names
    bad = first_nonfinite_tensor({names.get(id(p), f"<param {i}>"): p.grad
                                  for i, p in enumerate(params) if p.grad is not None})
    if bad is not None:
        message = run.describe(f"non-finite gradient at step {step} in layer {bad}")
        return TrainingDiverged(f"{message}; lower the step size or pass --skip-nonfinite",
                                step=step, layer=bad, what="gradient")
    return None


def _update(run: Run, step: int) -> TrainingDiverged | None:
    """``optimizer.step()`` (the transform runs in its hooks); its non-finite refusal as a problem."""
    try:
        run.optimizer.step()
    except NonFiniteGradientError as exc:
        return TrainingDiverged(run.describe(str(exc)), step=step,
                                layer=getattr(exc, "layer", None), what="gradient")
    return None


def _weights_error(run: Run, step: int) -> TrainingDiverged | None:
    names = run.parameter_names
    bad = first_nonfinite_tensor({names.get(id(p), f"<param {i}>"): p.detach()
                                  for i, p in enumerate(run.params)})
    if bad is None:
        return None
    message = run.describe(f"weights became non-finite in layer {bad} after the update of step {step}")
    return TrainingDiverged(f"{message}; lower the step size", step=step, layer=bad, what="weights")


def train_step(run: Run, step: int) -> StepResult:
    """Iteration ``step`` of ``run``: batch, forward, backward, non-finite policy, update.

    Contract
    --------
    * the batch is ``task.batch(step)`` (this rank's shard, cast to ``config.dtype``), its
      loss computed under ``run.autocast()``; the logged ``loss`` is the cross-rank mean;
    * ``step < config.steps``: backward, gradients averaged across ranks, every gradient
      checked finite, ``optimizer.step()`` (the method's transform in its hooks),
      ``zero_grad(set_to_none=True)``, every weight checked finite. ``step == config.steps``
      (the end point): the loss alone, under ``no_grad``, no update;
    * non-finite policy: a NaN/Inf loss or gradient leaves the weights untouched and sets
      ``problem``; with ``config.skip_nonfinite`` the update is counted as skipped
      (``run.skipped``) and the run goes on, otherwise ``error`` is set. Non-finite weights
      after an update always set ``error``. Nothing is raised here: the caller logs the step,
      then raises ``result.error`` (:func:`fit` does);
    * ``seconds`` times forward, backward and update with one timer (CUDA synchronised at
      both ends), for overhead measurements; probes, evaluation, logging and checkpoints are
      not part of a step.
    """
    batch, last = run.batch(step), step == run.config.steps
    _sync(run)
    begin = time.perf_counter()
    with (torch.no_grad() if last else contextlib.nullcontext()), run.autocast():
        loss = run.task.loss(batch)
    loss_value = float(run.dist.mean(loss.detach()).item())  # .item(): float64 stays exact
    problem = None
    if not math.isfinite(loss_value):
        message = run.describe(f"loss is {loss_value} at step {step}")
        problem = TrainingDiverged(f"{message}; lower the step size or pass --skip-nonfinite",
                                   step=step, what="loss")
    elif not last:
        loss.backward()
        problem = _gradient_problem(run, step) or _update(run, step)
        run.optimizer.zero_grad(set_to_none=True)
    result = StepResult(step, loss_value, updated=not last and problem is None, problem=problem)
    if problem is not None and run.config.skip_nonfinite:
        result.skipped = not last
        run.skipped += int(result.skipped)
        if run.is_main:
            print(f"reflora-analysis: skipped step {step}: {problem}", file=sys.stderr)
    elif problem is not None:
        result.error = problem
    elif result.updated:
        result.error = _weights_error(run, step)
    _sync(run)
    result.seconds = time.perf_counter() - begin
    return result


# ---- callbacks: probes and evaluation ------------------------------------------------------

@contextlib.contextmanager
def _modes_kept(model: nn.Module):
    """Restore every submodule's train/eval flag afterwards (a model may mix them, which
    ``model.train(flag)`` would flatten)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def probe_values(run: Run, step: int, *, progress: bool = False) -> dict:
    """Every probe of ``run`` at the current weights (the whole ``task.batch(step)``), as
    ``{"<probe>/<quantity>": value}``; ``{}`` when no probe is due at ``step`` or on a rank
    other than 0. ``progress``: long probes show their own progress bars."""
    config = run.config
    if not run.probes_due(step):
        return {}
    from .probes import ProbeContext
    # during warm-up / between interval steps the coming update is plain LoRA's
    ctx = ProbeContext(task=run.task, method=config.method, optimizer=config.optimizer,
                       lr=config.lr, step=step, batch=run.batch(step, shard=False),
                       hparams=dict(config.hparams), progress=progress,
                       active=run.transform is None or run.transform.is_active())
    values = {}
    with _modes_kept(run.model):
        for probe in run.probes:
            values.update({k: jsonable_scalar(v) for k, v in probe(ctx).items()})
    return values


def evaluate(run: Run, step: int) -> dict:
    """``task.evaluate()`` as ``{"eval/<metric>": value}`` where :meth:`Run.eval_due` says (every
    ``eval_every``, first and last step); ``{}`` elsewhere and on ranks other than 0 (unless FSDP)."""
    if not run.eval_due(step):
        return {}
    with _modes_kept(run.model), torch.no_grad():
        return {f"eval/{k}": jsonable_scalar(v) for k, v in run.task.evaluate().items()}


# ---- checkpoints ----------------------------------------------------------------------------

def save_run_checkpoint(run: Run, log: RunLog, step: int, elapsed: float) -> None:
    """Save the state before iteration ``step`` to ``log.checkpoint_path`` when one is due
    (every ``checkpoint_every`` steps and at the last one, after the first iteration of this
    invocation, rank 0 only); RNG captured here, at the iteration boundary."""
    every = run.config.checkpoint_every
    if not (every and run.is_main and step > run.start
            and (step % every == 0 or step == run.config.steps)):
        return
    save_checkpoint(log.checkpoint_path, step=step, model=run.model, optimizer=run.optimizer,
                    transform=run.transform, identity=run.config.identity(), elapsed=elapsed,
                    rng=capture_rng_state(), extra={"skipped": run.skipped})


def restore_checkpoint(run: Run, log: RunLog) -> int:
    """Continue ``run`` from ``log``'s checkpoint, if there is one; returns the start step.

    Refuses (``ValueError``) a checkpoint of another run (its identity differs) or one past
    ``config.steps``; loads weights, buffers, optimizer and transform state and every RNG;
    sets ``run.start``, ``run.elapsed``, ``run.skipped``; truncates the log to the lines
    before the checkpoint step (rank 0). Without a checkpoint: a note, and step 0.
    """
    path = log.checkpoint_path
    if not path.is_file():
        if run.is_main:
            print(f"reflora-analysis: no checkpoint at {path}; starting from step 0", file=sys.stderr)
        return 0
    ckpt = load_checkpoint(path, identity=run.config.identity())
    if ckpt["step"] > run.config.steps:
        raise ValueError(f"checkpoint {path} is at step {ckpt['step']} > steps={run.config.steps}")
    restore_training_state(ckpt, run.model, run.optimizer)
    run.start, run.elapsed = ckpt["step"], ckpt["elapsed"]
    run.skipped = int(ckpt["extra"].get("skipped", 0))
    log.truncate(run.start)
    if run.is_main:
        print(f"reflora-analysis: resuming from {path} at step {run.start}", file=sys.stderr)
    return run.start


# ---- the loop -------------------------------------------------------------------------------

def _progress_bar(run: Run):
    if not (run.config.progress and run.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=run.config.steps, initial=run.start, unit="step", file=sys.stderr,
                desc=f"{run.task.name}/{run.config.method}", dynamic_ncols=True)


def fit(config: RunConfig, task=None) -> list[dict]:
    """Train as ``config`` says; return the logged records (also written to ``config.out``).

    ``task``: a built ``Task`` to use instead of ``config.task`` (see :func:`build_run`).
    Raises as :func:`run` does.
    """
    log = RunLog(config.out, dist=DistributedContext.current())
    log.prepare(resume=config.resume, overwrite=config.overwrite)  # before anything is built
    run = build_run(config, task)
    if config.resume:
        restore_checkpoint(run, log)
    log.open(run.config, start=run.start, overwrite=config.overwrite)
    bar = _progress_bar(run)
    t0 = time.perf_counter() - run.elapsed
    c = run.config
    try:
        for t in range(run.start, c.steps + 1):
            save_run_checkpoint(run, log, t, elapsed=time.perf_counter() - t0)
            values = {**probe_values(run, t, progress=bar is not None), **evaluate(run, t)}
            result = train_step(run, t)
            record = {"step": t, "loss": result.loss, "lr": c.lr, "time": time.perf_counter() - t0,
                      "method": c.method, "optimizer": c.optimizer, **values, **result.fields()}
            if result.problem or run.log_due(t):
                log.append(record)
            if bar is not None:
                bar.update(0 if t == run.start else 1)
                bar.set_postfix(loss=f"{result.loss:.4g}")
            if result.error is not None:
                raise result.error
    except BaseException as exc:
        diverged = isinstance(exc, (TrainingDiverged, PoisonedCheckpointError))
        error = str(exc) if diverged else f"{type(exc).__name__}: {exc}"
        log.close("diverged" if diverged else "failed", error, skipped=run.skipped,
                  elapsed=time.perf_counter() - t0)
        raise
    finally:
        if bar is not None:
            bar.close()
    log.close("completed", None, skipped=run.skipped, elapsed=time.perf_counter() - t0)
    return log.records


def run(task, method: str, *, optimizer: str = "sgd", lr: float | None = None, steps: int,
        seed: int = 0, device="cpu", out=None, probes: Iterable = (), probe_every: int = 0,
        log_every: int = 1, eval_every: int = 0, evaluate_at_ends: bool = True,
        checkpoint_every: int = 0, resume: bool = False, skip_nonfinite: bool = False,
        progress: bool = True, dtype: torch.dtype | None = None, autocast_bf16: bool = False,
        task_overrides: dict | None = None, overwrite: bool = False,
        **method_hparams) -> list[dict]:
    """Train ``task`` with ``method`` and return the logged records (also written to ``out``).

    Builds a :class:`~reflora_analysis.config.RunConfig` from the arguments (every check
    happens there, before anything is built or written) and runs :func:`fit`.

    Parameters
    ----------
    task : a :class:`reflora_analysis.tasks.Task` or a task name (built with
        ``make_task(name, seed=seed, device=device, **task_overrides)``).
    method : a name from :func:`reflora_analysis.methods.available_methods`.
    optimizer : ``"sgd"`` or ``"adamw"``; the base optimizer the method composes with.
    lr : step size; ``None`` takes ``task.default_lr[optimizer]``. Must be > 0.
    steps : number of optimizer updates (> 0); ``steps + 1`` lines (0..steps) at log_every=1.
    seed : seeds Python, numpy and torch, and the task's data.
    device : ``"cpu"`` or ``"cuda[:N]"`` (``ValueError`` if CUDA is absent).
    out : JSON-lines path (its directory is created), or None to keep records in memory.
        If its log, ``.meta.json`` or ``.ckpt.pt`` exists, ``resume`` or ``overwrite`` must
        be given (``FileExistsError`` otherwise, before anything is built or written).
    probes : probe names (``"balance,consistency"`` or a list of names, see
        :func:`reflora_analysis.probes.available_probes`), :class:`~reflora_analysis.probes.Probe`
        objects or callables ``ctx -> dict``, run every ``probe_every`` steps at the current
        weights. Each probe's ``check(task)`` runs before step 0 (``ValueError`` naming the
        probe and the task if it cannot run there).
    log_every, eval_every : logging / ``task.evaluate()`` interval (evaluate also runs at the
        first and last step; 0 = only there).
    evaluate_at_ends : False: no evaluation at the first and last step (a sweep evaluates its
        splits after training; the losses are the same either way).
    checkpoint_every : save a checkpoint every K steps (and at the end); needs ``out``.
    resume : continue from ``out``'s checkpoint (``ValueError`` if the checkpoint belongs to
        another configuration); lines after the checkpoint step are dropped and re-run.
        Without a checkpoint the run starts from step 0.
    skip_nonfinite : skip updates whose loss or gradient is NaN/Inf instead of stopping.
    progress : a progress bar on stderr (only when it is a terminal), also inside long probes
        (the sharpness probe's Hessian-vector products).
    dtype : cast the model's floating parameters (and batches) to this dtype.
    autocast_bf16 : run forward passes under ``torch.autocast(dtype=bfloat16)``.
    overwrite : replace the log, meta and checkpoint of a previous run at ``out`` (and start
        from step 0); exclusive with ``resume``.
    **method_hparams : passed to ``build_optimizer`` (e.g. ``damping``, ``warmup_steps``).

    Returns
    -------
    list of dict, one per logged step, in step order (for a resumed run: the kept lines of
    the earlier invocation followed by the new ones).

    Raises
    ------
    TrainingDiverged : non-finite loss/gradient (without ``skip_nonfinite``) or weights.
    FileExistsError : ``out`` holds a previous run and neither ``resume`` nor ``overwrite``.
    ValueError, TypeError, FileNotFoundError : bad arguments, with a one-line message.

    Examples
    --------
    >>> from reflora_analysis.train import run
    >>> records = run("mf", "reflora", steps=100, out="mf-reflora.jsonl")  # doctest: +SKIP
    """
    config = RunConfig(task, method, steps, optimizer=optimizer, lr=lr, seed=seed, device=device,
                       dtype=dtype, autocast_bf16=autocast_bf16, hparams=method_hparams,
                       task_options=task_overrides or {}, probes=probes, probe_every=probe_every,
                       log_every=log_every, eval_every=eval_every, evaluate_at_ends=evaluate_at_ends,
                       checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite,
                       skip_nonfinite=skip_nonfinite, progress=progress, out=out)
    return fit(config)
