"""The training loop: one flat, readable function, :func:`run`.

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
:mod:`reflora_analysis.distributed`.

Determinism: bit-identical on CPU for a fixed seed (and across a kill/resume). On CUDA,
kernels such as atomics-based reductions are not bit-reproducible unless the user enables
``torch.use_deterministic_algorithms(True)`` (not set here: it is a process-wide switch).

Files written next to ``out`` (``run.jsonl``): ``run.meta.json`` (config, versions --
``reflora_analysis_version`` at the top level --, status, summary; rewritten atomically at
start and end) and ``run.ckpt.pt`` (the latest checkpoint). An existing log, meta or
checkpoint is never replaced silently: without ``resume`` (continue it) or ``overwrite``
(replace all three) ``run`` raises ``FileExistsError`` before doing anything.

Probes are checked against the task before step 0 (``Probe.check``), so a probe that cannot
run on the task (e.g. ``bound`` on a multi-layer model) fails at once with a ``ValueError``
naming both, before any file is written.
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from . import __version__
from .checkpoint import (PoisonedCheckpointError, load_checkpoint,
                         load_trainable_state, restore_rng_state, save_checkpoint,
                         capture_rng_state)
from .io import JsonLinesWriter, atomic_write_json, to_jsonable, truncate_json_lines
from .methods.base import BASE_OPTIMIZERS, check_lr
from .refactor import NonFiniteGradientError
from .tasks.base import resolve_device

__all__ = ["run", "TrainingDiverged", "checkpoint_path", "meta_path", "resolve_device",
           "seed_everything"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight stopped the run.

    Attributes: ``step`` (iteration index), ``layer`` (parameter name or None), ``what``
    (``"loss"``, ``"gradient"`` or ``"weights"``).
    """

    def __init__(self, message: str, *, step: int, layer: str | None = None, what: str = "loss"):
        super().__init__(message)
        self.step, self.layer, self.what = step, layer, what


def checkpoint_path(out) -> Path:
    """``run.jsonl`` -> ``run.ckpt.pt`` (the latest checkpoint of that run)."""
    return Path(out).with_suffix(".ckpt.pt")


def meta_path(out) -> Path:
    """``run.jsonl`` -> ``run.meta.json`` (config, versions, status and summary)."""
    return Path(out).with_suffix(".meta.json")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _versions() -> dict[str, str]:
    versions = {"reflora_analysis": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
    for name in ("peft", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def _check_positive_int(name: str, value, *, allow_zero: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def _cast_floats(obj, dtype):
    """Cast the floating tensors inside a batch (tensor, dict, list, tuple) to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _parameter_names(task) -> dict[int, str]:
    """id(param) -> readable name: LoRA factors in paper notation ("layer.A"), others by module path."""
    names = {id(p): name for name, p in task.model.named_parameters()}
    for pair in getattr(task, "pairs", None) or ():
        names[id(pair.a)] = f"{pair.name}.A"
        names[id(pair.b)] = f"{pair.name}.B"
    return names


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first tensor holding NaN/Inf, else None.

    The common (finite) case costs one host-device sync in all: the per-tensor flags are
    reduced on the device first; only a failure is searched tensor by tensor.
    """
    if not tensors:
        return None
    flags = [torch.isfinite(t).all() for t in tensors.values()]
    if len({f.device for f in flags}) == 1:
        finite = bool(torch.stack(flags).all())
    else:  # a model spread over several devices: one sync per tensor
        finite = all(bool(f) for f in flags)
    if finite:
        return None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def _grads_by_name(params, names: dict[int, str]) -> dict[str, torch.Tensor]:
    return {names.get(id(p), f"<param {i}>"): p.grad for i, p in enumerate(params) if p.grad is not None}


def _weights_by_name(params, names: dict[int, str]) -> dict[str, torch.Tensor]:
    return {names.get(id(p), f"<param {i}>"): p.detach() for i, p in enumerate(params)}


def _pairs_argument(task) -> dict:
    """``{"pairs": task.pairs}`` for plain-torch models whose factors PEFT discovery cannot find.

    A PEFT model is passed alone (``build_optimizer`` may then use PEFT's own optimizer
    helpers); a plain ``nn.Module`` (``mf``: parameters ``A``, ``B``) needs its pairs named.
    """
    from .pairs import NoLoraLayersError, find_lora_pairs
    pairs = getattr(task, "pairs", None)
    if pairs and "peft" not in sys.modules:
        # no PEFT model can exist before peft is imported; skipping the discovery also
        # spares plain-torch runs peft's ~3 s import
        return {"pairs": pairs}
    try:
        find_lora_pairs(task.model)
        return {}
    except NoLoraLayersError:
        if not pairs:
            raise
        return {"pairs": pairs}


def _existing_outputs(out: Path) -> list[Path]:
    """The files of a previous run at ``out``: its log, meta and checkpoint, those that exist."""
    return [p for p in (out, meta_path(out), checkpoint_path(out)) if p.exists()]


def _refuse_to_replace(out: Path, dist_ctx) -> None:
    """``FileExistsError`` (every rank alike) if a previous run's files are at ``out``.

    Rank 0 looks, then tells the other ranks, so all of them raise (or none) even when
    they reach this point at different times."""
    found = _existing_outputs(out) if dist_ctx.rank == 0 else []
    message = None
    if found:
        message = (f"{found[0]} already exists (a previous run); pass --resume to continue it or "
                   f"--overwrite to replace it (train.run: resume=True / overwrite=True)")
    if dist_ctx.world_size > 1:
        import torch.distributed as dist
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise FileExistsError(message)


def _resolve_probes(probes) -> list:
    """Probe names (``"balance,sharpness"``, or a list mixing names, :class:`Probe` objects and
    callables ``ctx -> dict``) -> a list of callables; unknown names list the valid ones."""
    if probes is None:
        return []
    if isinstance(probes, str):
        if not probes.strip():
            return []
        items = [probes]
    elif callable(probes):
        items = [probes]
    else:
        try:
            items = list(probes)
        except TypeError:
            raise TypeError(f"probes must be probe names, Probe objects or callables, got "
                            f"{type(probes).__name__}") from None
    if not any(isinstance(p, str) for p in items):
        for p in items:
            if not callable(p):
                raise TypeError(f"a probe must be a name, a Probe or a callable ctx -> dict, "
                                f"got {type(p).__name__}")
        return items
    from .probes import make_probes
    return make_probes(items)


def _check_probes(probes, task) -> None:
    """Every probe that can say what it needs (``check(task)``) is asked before step 0."""
    for probe in probes:
        check = getattr(probe, "check", None)
        if callable(check):
            check(task)


def _module_modes(model) -> list:
    """Every submodule with its train/eval flag: a model may mix them (a pretrained encoder
    loaded in eval mode under a head in train mode), which ``model.train(flag)`` would flatten."""
    return [(m, m.training) for m in model.modules()]


def _restore_module_modes(modes) -> None:
    for m, flag in modes:
        m.training = flag


def _float(x) -> float:
    # .item() keeps float64 exact (a .float() first would round the logged loss to float32)
    return float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)


def _jsonable_scalar(value):
    """Tensors and numpy scalars -> float; everything else as given."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _float(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def run(task, method: str, *, optimizer: str = "sgd", lr: float | None = None, steps: int,
        seed: int = 0, device="cpu", out=None, probes: Iterable = (), probe_every: int = 0,
        log_every: int = 1, eval_every: int = 0, checkpoint_every: int = 0, resume: bool = False,
        skip_nonfinite: bool = False, progress: bool = True, dtype: torch.dtype | None = None,
        autocast_bf16: bool = False, task_overrides: dict | None = None, overwrite: bool = False,
        **method_hparams) -> list[dict]:
    """Train ``task`` with ``method`` and return the logged records (also written to ``out``).

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
    # ---- arguments -------------------------------------------------------------------
    steps = _check_positive_int("steps", steps, allow_zero=False)
    seed = _check_positive_int("seed", seed, allow_zero=True)
    probe_every = _check_positive_int("probe_every", probe_every, allow_zero=True)
    log_every = _check_positive_int("log_every", log_every, allow_zero=False)
    eval_every = _check_positive_int("eval_every", eval_every, allow_zero=True)
    checkpoint_every = _check_positive_int("checkpoint_every", checkpoint_every, allow_zero=True)
    if lr is not None:
        try:
            lr = check_lr(lr)  # the rule build_optimizer applies, checked before any set-up
        except (TypeError, ValueError):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}") from None
    # build_optimizer's rule too (stripped, lower case); normalised here because the name
    # also picks task.default_lr and goes into the run's identity
    if not isinstance(optimizer, str) or optimizer.strip().lower() not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(BASE_OPTIMIZERS)}")
    optimizer = optimizer.strip().lower()
    if (checkpoint_every or resume) and out is None:
        raise ValueError("checkpoint_every/resume need out= (the checkpoint lives next to the JSON lines)")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run at "
                         "out, overwrite replaces it")
    if out is not None:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create output directory {out.parent}: {err.strerror}") from None
    dev = resolve_device(device)
    probes = _resolve_probes(probes)
    if probes and not probe_every:
        raise ValueError("probes were given but probe_every is 0; pass probe_every=K")

    from .distributed import DistributedContext
    dist_ctx = DistributedContext.current()
    is_main = dist_ctx.rank == 0
    if out is not None and not resume and not overwrite:
        _refuse_to_replace(out, dist_ctx)

    # ---- task, model, optimizer -------------------------------------------------------
    seed_everything(seed)
    if isinstance(task, str):
        from .tasks import make_task
        task = make_task(task, seed=seed, device=str(dev), **(task_overrides or {}))
    elif task_overrides:
        raise ValueError("task_overrides only apply when task is given by name")
    _check_probes(probes, task)  # before anything is built on it or written
    model = task.model
    if dtype is not None:
        model.to(dtype=dtype)
    if lr is None:
        try:
            lr = float(task.default_lr[optimizer])
        except (KeyError, TypeError):
            raise ValueError(f"task {task.name!r} has no default lr for {optimizer!r}; pass lr") from None
    from .methods import build_optimizer
    opt, transform = build_optimizer(method, model, optimizer=optimizer, lr=lr,
                                     **_pairs_argument(task), **method_hparams)
    params = [p for group in opt.param_groups for p in group["params"]]
    names = _parameter_names(task)
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if autocast_bf16
                else contextlib.nullcontext())

    identity = {"task": task.name, "task_config": getattr(task, "config", {}), "method": method,
                "optimizer": optimizer, "lr": lr, "seed": seed,
                "hparams": dict(sorted(method_hparams.items())),
                "dtype": str(dtype) if dtype is not None else None, "autocast_bf16": autocast_bf16,
                "world_size": dist_ctx.world_size}

    # ---- resume ------------------------------------------------------------------------
    start, elapsed_before, skipped = 0, 0.0, 0
    records: list[dict] = []
    ckpt_file = checkpoint_path(out) if out is not None else None
    if resume and ckpt_file.is_file():
        ckpt = load_checkpoint(ckpt_file)
        if to_jsonable(ckpt["identity"]) != to_jsonable(identity):
            diff = [k for k in identity if to_jsonable(ckpt["identity"].get(k)) != to_jsonable(identity[k])]
            raise ValueError(f"checkpoint {ckpt_file} was written by a different run "
                             f"(differs in: {', '.join(diff)}); use another --out or drop --resume")
        if ckpt["step"] > steps:
            raise ValueError(f"checkpoint {ckpt_file} is at step {ckpt['step']} > steps={steps}")
        load_trainable_state(model, ckpt["trainable"])
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in ckpt["buffers"].items():
                if name in buffers:
                    buffers[name].copy_(value)
        opt.load_state_dict(ckpt["optimizer"])  # also restores the transform (its state-dict hook)
        start, elapsed_before = ckpt["step"], ckpt["elapsed"]
        skipped = int(ckpt["extra"].get("skipped", 0))
        restore_rng_state(ckpt["rng"])
        if out.exists() and is_main:
            records = truncate_json_lines(out, lambda r: r.get("step", -1) < start)
        if is_main:
            print(f"reflora-analysis: resuming from {ckpt_file} at step {start}", file=sys.stderr)
    elif resume and is_main:
        print(f"reflora-analysis: no checkpoint at {ckpt_file}; starting from step 0", file=sys.stderr)

    writer = None
    if out is not None and is_main:
        if start == 0:
            # a fresh run (overwrite, or resume without a checkpoint) replaces the old log, and
            # with overwrite the old checkpoint too: a later resume must not pick it up
            stale = [out] + ([checkpoint_path(out)] if overwrite else [])
            for path in stale:
                if path.exists():
                    path.unlink()
        writer = JsonLinesWriter(out)
        atomic_write_json(meta_path(out), {**identity, "steps": steps, "status": "running",
                                           "reflora_analysis_version": __version__,
                                           "versions": _versions(), "device": str(dev)})

    # ---- loop ------------------------------------------------------------------------------
    bar = None
    if progress and is_main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=f"{task.name}/{method}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed_before
    status, error = "completed", None
    try:
        for t in range(start, steps + 1):
            if checkpoint_every and is_main and t > start and (t % checkpoint_every == 0 or t == steps):
                # RNG is captured here, at the iteration boundary, so iteration t replays exactly
                save_checkpoint(ckpt_file, step=t, model=model, optimizer=opt, transform=transform,
                                identity=identity, elapsed=time.perf_counter() - t0,
                                rng=capture_rng_state(), extra={"skipped": skipped})

            record: dict[str, Any] = {}
            log_now = t % log_every == 0 or t == steps
            if probes and is_main and t % probe_every == 0:
                from .probes import ProbeContext
                modes = _module_modes(model)
                probe_batch = task.batch(t)
                if dtype is not None:
                    probe_batch = _cast_floats(probe_batch, dtype)
                # during warm-up / between interval steps the coming update is plain LoRA's
                ctx = ProbeContext(task=task, method=method, optimizer=optimizer, lr=lr, step=t,
                                   batch=probe_batch, hparams=dict(method_hparams),
                                   active=transform is None or transform.is_active(),
                                   progress=bar is not None)
                for probe in probes:
                    record.update({k: _jsonable_scalar(v) for k, v in probe(ctx).items()})
                _restore_module_modes(modes)
                log_now = True
            if is_main and (t == 0 or t == steps or (eval_every and t % eval_every == 0)):
                modes = _module_modes(model)
                with torch.no_grad():
                    record.update({f"eval/{k}": _jsonable_scalar(v) for k, v in task.evaluate().items()})
                _restore_module_modes(modes)
                log_now = True

            batch = task.batch(t)
            if dist_ctx.world_size > 1:
                batch = dist_ctx.shard(batch)
            if dtype is not None:
                batch = _cast_floats(batch, dtype)
            last = t == steps
            with (torch.no_grad() if last else contextlib.nullcontext()), autocast:
                loss = task.loss(batch)
            loss_value = _float(dist_ctx.mean(loss.detach()) if dist_ctx.world_size > 1 else loss)

            problem = None
            if not math.isfinite(loss_value):
                problem = TrainingDiverged(
                    f"loss is {loss_value} at step {t} ({method}, {optimizer}, lr={lr:g}); "
                    "lower the step size or pass --skip-nonfinite", step=t, what="loss")
            elif not last:
                loss.backward()
                if dist_ctx.world_size > 1:
                    dist_ctx.average_gradients(params)
                bad = _first_nonfinite(_grads_by_name(params, names))
                if bad is not None:
                    problem = TrainingDiverged(
                        f"non-finite gradient at step {t} in layer {bad} ({method}, {optimizer}, "
                        f"lr={lr:g}); lower the step size or pass --skip-nonfinite",
                        step=t, layer=bad, what="gradient")
                else:
                    try:
                        opt.step()
                    except NonFiniteGradientError as exc:
                        problem = TrainingDiverged(f"{exc} ({method}, {optimizer}, lr={lr:g})",
                                                   step=t, layer=getattr(exc, "layer", None),
                                                   what="gradient")
                opt.zero_grad(set_to_none=True)

            record = {"step": t, "loss": loss_value, "lr": lr,
                      "time": time.perf_counter() - t0, "method": method, "optimizer": optimizer,
                      **record}
            if problem is not None:
                record["nonfinite"] = problem.what
                record["skipped"] = bool(skip_nonfinite and not last)
                log_now = True
            if log_now:
                records.append(record)
                if writer is not None:
                    writer.write(record)
            if bar is not None:
                bar.update(0 if t == start else 1)
                bar.set_postfix(loss=f"{loss_value:.4g}")

            if problem is not None:
                if not skip_nonfinite:
                    raise problem
                skipped += 1
                if is_main:
                    print(f"reflora-analysis: skipped step {t}: {problem}", file=sys.stderr)
            elif not last:
                bad = _first_nonfinite(_weights_by_name(params, names))
                if bad is not None:
                    raise TrainingDiverged(f"weights became non-finite in layer {bad} after the update "
                                           f"of step {t} ({method}, {optimizer}, lr={lr:g}); lower "
                                           "the step size", step=t, layer=bad, what="weights")
    except TrainingDiverged as exc:
        status, error = "diverged", str(exc)
        raise
    except PoisonedCheckpointError as exc:
        status, error = "diverged", str(exc)
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
            final = next((r for r in reversed(records) if "loss" in r), {})
            atomic_write_json(meta_path(out), {
                **identity, "steps": steps, "status": status, "error": error,
                "reflora_analysis_version": __version__, "versions": _versions(),
                "device": str(dev), "skipped_steps": skipped,
                "final_step": final.get("step"), "final_loss": final.get("loss"),
                "elapsed": time.perf_counter() - t0,
                "final_eval": {k: v for k, v in final.items() if k.startswith("eval/")}})
    return records
