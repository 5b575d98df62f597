r"""The one step timer: :func:`round_robin`, plus the memory readings of a training step.

:func:`round_robin` times callables ``step(i)`` (a training step of each method) in turns,
the order rotated from round to round, so machine noise (other processes, frequency
changes) falls on every method alike; separate processes cannot ensure that (there,
20-step medians of identical work differed by up to 20 %). The overhead experiment
(:mod:`.overhead`) and ``benchmarks/training_overhead.py`` / ``refactor_overhead.py`` all
time with it. What is timed there is the package's own training step,
:func:`reflora_analysis.train.train_step` on a run built by
:func:`reflora_analysis.train.build_run` (:func:`make_run`, :func:`run_step`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["CLOCKS", "StepTimes", "round_robin", "make_run", "run_step", "leave_zero_start",
           "PeakRSS", "rss_bytes"]

#: ``wall``: ``time.perf_counter``; ``cpu``: process CPU time (robust on a shared machine
#: for a single-threaded CPU run: time spent descheduled does not count)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

TurnHook = Callable[[str, bool], Any]


@dataclass
class StepTimes:
    """Seconds of the timed steps of one callable: per round, and (``time_optimizer``) the
    part spent in ``optimizer.step()`` (the method's hooks included)."""

    rounds: list[list[float]] = field(default_factory=list)
    optimizer_rounds: list[list[float]] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        """Every timed step, in order."""
        return [s for r in self.rounds for s in r]

    @property
    def optimizer_seconds(self) -> list[float]:
        return [s for r in self.optimizer_rounds for s in r]

    def median(self) -> float:
        return statistics.median(self.seconds)


def _synchronizer(device) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return lambda: torch.cuda.synchronize(torch.device(device))
    return lambda: None


class _OptimizerClock:
    """Time inside ``optimizer.step()`` of every optimizer, through torch's global step
    hooks (they run before the first and after the last per-optimizer hook, so a method's
    pre/post-step hooks are inside)."""

    def __init__(self, now, sync):
        self.now, self.sync, self.elapsed, self._start, self._handles = now, sync, 0.0, 0.0, []

    def _pre(self, *_):
        self.sync()
        self._start = self.now()

    def _post(self, *_):
        self.sync()
        self.elapsed += self.now() - self._start

    def __enter__(self):
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        self._handles = [register_optimizer_step_pre_hook(self._pre),
                         register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def round_robin(steppers: Mapping[str, Callable[[int], Any]], *, rounds: int,
                per_turn: int = 1, warmup: int = 0, device="cpu", clock: str | Callable = "wall",
                before_turn: TurnHook | None = None, after_turn: TurnHook | None = None,
                rotate: bool = True, time_optimizer: bool = False) -> dict[str, StepTimes]:
    """Time ``steppers[name](i)`` in turns: ``warmup`` untimed steps of each first, then
    ``rounds`` rounds in which each callable takes ``per_turn`` timed steps.

    ``i`` counts each callable's own steps from 0 (so every method sees the same batches).
    The order of the callables is rotated from round to round (``rotate``). Each step is
    timed alone with ``clock`` (``"wall"``, ``"cpu"`` or a callable), on CUDA between two
    ``torch.cuda.synchronize()``. ``before_turn(name, timed)`` / ``after_turn(name, timed)``
    run around every turn, outside the timed region (reset the weights, read memory).
    ``time_optimizer``: also record the time inside ``optimizer.step()``.

    Returns ``{name: StepTimes}`` (``.rounds``: seconds per timed step, per round).
    """
    if int(rounds) < 0 or int(per_turn) < 1 or int(warmup) < 0:
        raise ValueError(f"round_robin needs rounds >= 0, per_turn >= 1, warmup >= 0; got "
                         f"rounds={rounds}, per_turn={per_turn}, warmup={warmup}")
    names = list(steppers)
    now = CLOCKS[clock] if isinstance(clock, str) else clock
    sync = _synchronizer(device)
    opt_clock = _OptimizerClock(now, sync) if time_optimizer else None
    done = dict.fromkeys(names, 0)
    times = {name: StepTimes() for name in names}

    def turn(name: str, n: int, timed: bool) -> None:
        if before_turn is not None:
            before_turn(name, timed)
        steps, opts = [], []
        for _ in range(n):
            sync()
            if opt_clock is not None:
                opt_clock.elapsed = 0.0
            start = now()
            steppers[name](done[name])
            sync()
            steps.append(now() - start)
            opts.append(opt_clock.elapsed if opt_clock is not None else None)
            done[name] += 1
        if after_turn is not None:
            after_turn(name, timed)
        if timed:
            times[name].rounds.append(steps)
            if opt_clock is not None:
                times[name].optimizer_rounds.append(opts)

    with opt_clock if opt_clock is not None else contextlib.nullcontext():
        if warmup:
            for name in names:
                turn(name, int(warmup), False)
        for index in range(int(rounds)):
            shift = index % len(names) if rotate and names else 0
            for name in names[shift:] + names[:shift]:
                turn(name, int(per_turn), True)
    return times


def make_run(task, method: str, *, optimizer: str = "adamw", lr: float | None = None,
             seed: int = 0, device="cpu", steps: int = 1):
    """A training run of ``method`` on the already built ``task`` (several runs may share one
    task: one model, one optimizer each): :func:`reflora_analysis.train.build_run` of a
    :class:`reflora_analysis.config.RunConfig` with these arguments (``lr=None``: the task's
    default). ``steps`` must exceed the last step index to be timed (the end step updates
    nothing)."""
    from ..config import RunConfig
    from ..train import build_run

    config = RunConfig(task=task, method=method, optimizer=optimizer, lr=lr, steps=int(steps),
                       seed=int(seed), device=str(device), progress=False)
    return build_run(config, task=task)


def run_step(run, step: int):
    """One training step of ``run`` (:func:`reflora_analysis.train.train_step`); raises the
    step's error (a non-finite loss, gradient or weight) instead of timing a broken run."""
    from ..train import train_step

    result = train_step(run, step)
    if getattr(result, "error", None) is not None:
        raise result.error
    return result


def leave_zero_start(task, seed: int) -> None:
    """Give zero LoRA factors (PEFT's ``lora_B = 0``) small random values, in place.

    Timing starts where training spends its time: past the degenerate start, where the
    refactoring methods take their normal path (THEORY.md section 6; the reference code
    warms up with plain LoRA first). Scale 1e-3 / sqrt(r): small, but well above round-off.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    with torch.no_grad():
        for pair in task.pairs:
            for factor in pair.params:
                if not bool(factor.any()):
                    noise = torch.randn(factor.shape, generator=gen, dtype=torch.float32)
                    factor.copy_(noise.to(factor.dtype) * (1e-3 / pair.rank ** 0.5))


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample the RSS every ``interval`` seconds in a thread between :meth:`start` and
    :meth:`stop` (or as a context manager); ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def start(self) -> "PeakRSS":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
