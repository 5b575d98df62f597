r"""Notebook 06: time per training step and peak memory of every method.

``run = overhead.setup(globals())``, ``data = overhead.experiment(run)``, then
:func:`reflora_analysis.plotting.publish_overhead`. Derived: ``seed`` (the first seed).
Quick (:data:`SPEC`): at most 20 timed steps after at most 3 warm-up steps, 2 repeats.

Time: :func:`interleaved_step_times`, every method's :func:`reflora_analysis.train.train_step`
round-robin in one process (:func:`~.timing.round_robin`). Memory: :func:`measure_overhead`,
one method per fresh process (``isolate``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from typing import Any, Mapping, Sequence

import torch

from .common import as_float, methods_or_all, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, at_most
from .provenance import machine_info
from .timing import PeakRSS, leave_zero_start, make_run, round_robin, rss_bytes, run_step

__all__ = ["SPEC", "setup", "experiment", "measure_overhead", "interleaved_step_times",
           "overhead_experiment"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": params["seeds"][0]}


SPEC = NotebookSpec(
    "06_overhead",
    parameters=dict(quick=False, device="cpu", seeds=[0], steps=50, warmup=5, repeats=2,
                    methods=None, task="vader-movies", optimizer="adamw", isolate=True,
                    out_dir=None),
    quick=Preset(steps=at_most(20), warmup=at_most(3), repeats=at_most(2)),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """:func:`overhead_experiment` with the run's arguments; prints the methods that failed."""
    data = overhead_experiment(run["methods"], task=run["task"], optimizer=run["optimizer"],
                               steps=run["steps"], warmup=run["warmup"], repeats=run["repeats"],
                               seed=run["seed"], device=run["device"], isolate=run["isolate"],
                               out_dir=run.out, quick=run["quick"])
    for method, error in data["errors"].items():
        print(f"{method}: {error}")
    return data


def _timing_task(task: str, *, seed: int, device: str, quick: bool,
                 task_overrides: Mapping[str, Any] | None, optimizer: str, lr: float | None):
    """``(task, lr)``: the task built as for training, past PEFT's zero start."""
    from ..tasks import make_task
    from ..train import seed_everything

    seed_everything(seed)
    t = make_task(task, seed=seed, device=device, quick=quick, **dict(task_overrides or {}))
    leave_zero_start(t, seed)
    return t, float(t.default_lr[optimizer]) if lr is None else float(lr)


class _Memory:
    """Peak training memory over the untimed warm-up turn (see :func:`measure_overhead`)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.sampler = None

    def before(self, name: str, timed: bool) -> None:
        if not timed and not self.cuda:
            self.base, self.sampler = rss_bytes(), PeakRSS().start()

    def after(self, name: str, timed: bool) -> None:
        if not timed and self.sampler is not None:
            self.sampler.stop()

    def reading(self) -> tuple[float, str]:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base,
                    "cuda max_memory_allocated - allocated before step 1")
        return self.sampler.peak - self.base, "peak RSS (2 ms sampling) - RSS before step 1"


def measure_overhead(method: str, *, task: str = "vader-movies", optimizer: str = "adamw",
                     steps: int = 20, warmup: int = 3, seed: int = 0, device: str = "cpu",
                     lr: float | None = None, quick: bool = False,
                     task_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    r"""Seconds per training step and peak training memory of one method (this process).

    The step is :func:`reflora_analysis.train.train_step` of a run built by
    :func:`reflora_analysis.train.build_run` (:func:`~.timing.make_run`) on the task's
    batches, from a point past PEFT's zero start (:func:`~.timing.leave_zero_start`):
    ``warmup`` untimed steps first (lazy optimizer state, allocator warm-up; the memory
    reading), then ``steps`` timed steps (:func:`~.timing.round_robin` with one callable).
    Reported time: the median per-step wall time (CUDA: synchronised).

    Memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the
    first step (model and data excluded; gradients, optimizer state, activations and the
    method's temporaries included). On CPU there is no allocator counter: the peak
    resident set size (sampled every 2 ms in a thread, during the warm-up steps only: its
    wake-ups compete for the GIL with the methods' hooks and would disturb the timing)
    minus the RSS before the first step; it includes the same items, rounded to pages,
    plus allocator caching, so only differences between methods larger than a few MB are
    meaningful. Run each method in a fresh process (:func:`overhead_experiment` does) so
    one method's freed pages do not hide the next one's.
    """
    if int(warmup) < 1 or int(steps) < 1:
        raise ValueError(f"overhead needs warmup >= 1 (the memory reading) and steps >= 1, "
                         f"got warmup={warmup}, steps={steps}")
    t, lr = _timing_task(task, seed=seed, device=device, quick=quick,
                         task_overrides=task_overrides, optimizer=optimizer, lr=lr)
    run = make_run(t, method, optimizer=optimizer, lr=lr, seed=seed, device=device,
                   steps=int(warmup) + int(steps))
    memory, last = _Memory(device), {}

    def step(i: int) -> None:
        last["result"] = run_step(run, i)

    times = round_robin({method: step}, rounds=1, per_turn=int(steps), warmup=int(warmup),
                        device=device, before_turn=memory.before,
                        after_turn=memory.after)[method].seconds
    peak, memory_kind = memory.reading()
    loss = getattr(last.get("result"), "loss", None)
    n_lora = sum(p.numel() for pair in t.pairs for p in pair.params)
    return {"method": method, "seconds_per_step": statistics.median(times),
            "seconds_all": times, "steps_per_second": 1.0 / statistics.median(times),
            "peak_memory_mb": peak / 2**20, "memory_kind": memory_kind,
            "lora_parameters": n_lora,
            "lora_parameter_mb": n_lora * next(t.model.parameters()).element_size() / 2**20,
            "final_loss": as_float(loss)}


def interleaved_step_times(methods: Sequence[str], *, task: str = "vader-movies",
                           optimizer: str = "adamw", steps: int = 20, warmup: int = 3,
                           seed: int = 0, device: str = "cpu", lr: float | None = None,
                           quick: bool = False,
                           task_overrides: Mapping[str, Any] | None = None) -> dict[str, list[float]]:
    r"""Seconds per training step of every method, measured round-robin in this process.

    One model, one run per method on it (:func:`~.timing.make_run`: each keeps its own
    optimizer state and hooks). Each round steps every method once
    (:func:`reflora_analysis.train.train_step`), in an order rotated from round to round,
    after restoring the trainable weights to the same starting point (past PEFT's zero
    start, :func:`~.timing.leave_zero_start`): :func:`~.timing.round_robin`. Machine noise
    then falls on all methods alike. ``warmup`` untimed steps per method come first.
    Returns ``{method: [seconds per timed step]}``.
    """
    t, lr = _timing_task(task, seed=seed, device=device, quick=quick,
                         task_overrides=task_overrides, optimizer=optimizer, lr=lr)
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]

    def restore(*_) -> None:
        with torch.no_grad():
            for p, p0 in zip(trainable, start):
                p.copy_(p0)

    steppers = {}
    for method in methods:
        restore()
        steppers[method] = functools.partial(run_step, make_run(
            t, method, optimizer=optimizer, lr=lr, seed=seed, device=device,
            steps=int(warmup) + int(steps)))
    times = round_robin(steppers, rounds=int(steps), warmup=int(warmup), device=device,
                        before_turn=restore)
    return {method: times[method].seconds for method in methods}


def _overhead_worker(queue, kwargs):  # pragma: no cover - runs in a child process
    try:
        threads = os.environ.get("REFLORA_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        queue.put(("ok", measure_overhead(**kwargs)))
    except BaseException as exc:  # report instead of hanging the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _isolation_context():
    """A multiprocessing context for one-process-per-measurement.

    ``forkserver`` (POSIX) with the package, torch and transformers preloaded in the
    server: each measurement is a fresh fork of a process that has imported but never
    computed, so it starts in well under a second and inherits no allocator state.
    Elsewhere ``spawn`` (each child imports everything again).
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["reflora_analysis.experiments", "reflora_analysis.tasks",
                                    "reflora_analysis.methods", "torch", "transformers", "peft"])
        return ctx
    return mp.get_context("spawn")


def _measure(kwargs: dict, ctx) -> tuple[str, Any]:
    """``("ok", measure_overhead(**kwargs))`` or ``("error", message)``; in a fresh process
    of ``ctx`` when given."""
    if ctx is None:
        try:
            return "ok", measure_overhead(**kwargs)
        except (ValueError, NotImplementedError) as exc:
            return "error", f"{type(exc).__name__}: {exc}"
    queue = ctx.Queue()
    proc = ctx.Process(target=_overhead_worker, args=(queue, kwargs))
    proc.start()
    status, payload = queue.get()
    proc.join()
    return status, payload


def _summary(method: str, reps: list[dict], interleaved: Mapping[str, list[float]] | None) -> dict:
    if interleaved is not None:  # round-robin in one process: noise falls on every method alike
        sec, seconds_all = statistics.median(interleaved[method]), interleaved[method]
    else:  # best of the repeats (timeit's convention: other load only ever adds time)
        sec = min(r["seconds_per_step"] for r in reps)
        seconds_all = [s for r in reps for s in r["seconds_all"]]
    return {"method": method, "seconds_per_step": sec, "steps_per_second": 1 / sec,
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in reps),
            "repeats": len(reps), "memory_kind": reps[0]["memory_kind"],
            "lora_parameter_mb": reps[0]["lora_parameter_mb"], "seconds_all": seconds_all}


def overhead_experiment(methods: Sequence[str] | None = None, *, task: str = "vader-movies",
                        optimizer: str = "adamw", steps: int = 20, warmup: int = 3,
                        repeats: int = 1, seed: int = 0, device: str = "cpu",
                        isolate: bool = True, out_dir=None, quick: bool = False,
                        task_overrides: Mapping[str, Any] | None = None,
                        interleave: bool = True) -> dict[str, Any]:
    r"""Time per step and peak memory of every method on the same model and batches.

    With ``interleave`` (default) the reported time is the median of
    :func:`interleaved_step_times` (all methods round-robin in this process, the same
    weights every time); the per-method measurements then serve the memory reading.

    Each method is measured by :func:`measure_overhead`, in a fresh process when ``isolate``
    (:func:`_isolation_context`; so peak-memory readings do not depend on the order of
    methods), ``repeats`` times in an interleaved order (without ``interleave`` the best
    repeat's median is reported, as timeit does, since load from other processes only adds
    time; memory: the median over repeats). Returns ``{"machine", "results":
    [{"method", "seconds_per_step", "steps_per_second", "peak_memory_mb", ...}],
    "relative_time": {method: time / time(lora)}, "errors"}``; writes ``overhead.csv`` / ``.json``.
    """
    methods = methods_or_all(methods)
    kwargs = dict(task=task, optimizer=optimizer, steps=steps, warmup=warmup, seed=seed,
                  device=device, quick=quick, task_overrides=dict(task_overrides or {}))
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    ctx = _isolation_context() if isolate else None
    for rep in range(int(repeats)):
        for method in (methods if rep % 2 == 0 else list(reversed(methods))):
            status, payload = _measure({**kwargs, "method": method}, ctx)
            if status == "ok":
                per_method[method].append(payload)
            else:
                errors[method] = payload
    measured = [m for m in methods if per_method[m]]
    if not measured:
        raise RuntimeError("no method could be measured: " +
                           "; ".join(f"{m}: {e}" for m, e in errors.items()))
    interleaved = interleaved_step_times(measured, **kwargs) if interleave else None
    results = [_summary(m, per_method[m], interleaved) for m in measured]
    base = next((r for r in results if r["method"] == "lora"), None)
    relative = ({r["method"]: r["seconds_per_step"] / base["seconds_per_step"] for r in results}
                if base else {})
    data = {"task": task, "optimizer": optimizer, "steps": steps, "warmup": warmup,
            "isolate": isolate, "interleave": interleave, "machine": machine_info(device),
            "results": results, "relative_time": relative, "errors": errors}
    rows = [(r["method"], r["seconds_per_step"], r["steps_per_second"], r["peak_memory_mb"],
             relative.get(r["method"], math.nan)) for r in results]
    write_data(out_dir, "overhead", data, {"overhead": (
        ["method", "seconds_per_step", "steps_per_second", "peak_memory_mb", "relative_time"],
        rows)})
    return data
