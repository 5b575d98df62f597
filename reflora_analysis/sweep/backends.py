"""Where a sweep's runs execute: this process or a local process pool, or Ray tasks on a cluster.

A backend takes the runs of a grid that are not done yet and calls ``execute(spec)`` (the
sweep's one-run function, :func:`reflora_analysis.sweep.runs._execute`, which writes the
run's folder and its ``result.json``) once per run, somewhere; after each run it calls
``on_done(spec)`` *in this process*, which rewrites the results table from the run folders.
So every backend writes the same table: it is read from the files the runs leave.

* :class:`LocalBackend` (``--backend local``, the default): the runs one after the other in
  this process (``jobs=1``), or on a ``spawn`` pool of ``jobs`` processes, each with
  ``max(1, cores // jobs)`` torch threads.
* :class:`RayBackend` (``--backend ray [--address ADDR]``): each run is a Ray task asking for
  ``cpus_per_run`` CPUs (and one GPU when the device is ``cuda``), so Ray runs as many at a
  time as the cluster has room for (``--jobs N``: at most ``N`` in flight). Ray is an
  optional extra (``pip install 'reflora-analysis[ray]'``), imported only here and only
  when asked for. ``address``: the cluster to join (``auto``, ``ray://head:10001``); without
  it, ``ray.init()`` joins ``RAY_ADDRESS`` if set, else starts a local Ray (shut down
  afterwards). A Ray that is already initialised in this process is used as it is.
  Requirements on a cluster: every node has ``reflora-analysis`` installed (the same
  version) and sees the sweep's ``--out`` folder at the same path (a shared filesystem, as on
  SLURM clusters): a run whose folder a node cannot see fails at once with a message saying so.
  Spell a GPU device ``cuda`` (Ray assigns each run its GPU through ``CUDA_VISIBLE_DEVICES``).

The backend of :func:`~reflora_analysis.sweep.run_sweep` is its ``backend`` argument, else the
one set by :func:`use_backend` (a context, as ``joblib.parallel_backend``; this is how the
``sweep`` command runs :func:`~reflora_analysis.sweep.tune_then_test` on Ray), else local.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import socket
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

__all__ = ["Backend", "LocalBackend", "RayBackend", "make_backend", "use_backend",
           "current_backend", "BACKENDS"]

BACKENDS = ("local", "ray")

Execute = Callable[[dict], str]
OnDone = Callable[[dict], None]


class Backend(Protocol):
    """Runs ``execute(spec)`` for every spec, calling ``on_done(spec)`` here after each.

    ``runs_here``: the runs use this machine's devices (a local pool), so the sweep checks the
    requested device here before starting them; False where they run elsewhere (Ray workers).
    """

    name: str
    runs_here: bool

    def run(self, execute: Execute, specs: Sequence[dict], *, jobs: int, on_done: OnDone) -> None:
        ...


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


class LocalBackend:
    """This process (``jobs == 1`` or one run) or a ``spawn`` pool of ``jobs`` processes."""

    name = "local"
    runs_here = True

    def run(self, execute: Execute, specs: Sequence[dict], *, jobs: int, on_done: OnDone) -> None:
        if jobs == 1 or len(specs) <= 1:
            for spec in specs:
                execute(spec)
                on_done(spec)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(specs)),
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_set_threads, initargs=(max(1, _cores() // jobs),))
        try:
            futures = {pool.submit(execute, spec): spec for spec in specs}
            for future in as_completed(futures):
                future.result()  # execute records run errors; this raises only if a worker died
                on_done(futures[future])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def _run_on_ray_worker(execute: Execute, spec: dict, threads: int) -> str:
    """The body of one Ray task: the run's folder must be visible here (a shared filesystem)."""
    run_dir = Path(spec["run_dir"])
    if not (run_dir / "config.json").is_file():
        raise RuntimeError(f"run folder {run_dir} is not visible on Ray node {socket.gethostname()}: "
                           "the sweep's --out must be on a filesystem every node shares")
    _set_threads(threads)
    return execute(spec)


class RayBackend:
    """Each run a Ray task (``cpus_per_run`` CPUs; one GPU for a ``cuda`` device).

    ``address``: passed to ``ray.init`` (None: ``RAY_ADDRESS`` or a new local Ray);
    ``max_in_flight``: at most this many runs submitted at once (None: all of them, Ray
    queues what does not fit). ``jobs`` (the local pool size) is not used.
    """

    name = "ray"
    runs_here = False

    def __init__(self, address: str | None = None, *, cpus_per_run: int = 1,
                 max_in_flight: int | None = None):
        _require_ray()
        if cpus_per_run < 1:
            raise ValueError(f"cpus_per_run must be >= 1, got {cpus_per_run}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"runs in flight (--jobs) must be >= 1, got {max_in_flight}")
        self.address, self.cpus_per_run, self.max_in_flight = address, cpus_per_run, max_in_flight

    def run(self, execute: Execute, specs: Sequence[dict], *, jobs: int, on_done: OnDone) -> None:
        import ray
        if not specs:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address)
        try:
            self._submit_all(ray, execute, list(specs), on_done)
        finally:
            if started:
                ray.shutdown()

    def _submit_all(self, ray, execute: Execute, specs: list[dict], on_done: OnDone) -> None:
        """Submit (at most ``max_in_flight`` at a time), then hand each finished run to ``on_done``."""
        remote = ray.remote(_run_on_ray_worker)
        limit = self.max_in_flight or len(specs)
        waiting, in_flight = list(reversed(specs)), {}
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < limit:
                    spec = waiting.pop()
                    gpus = 1 if str(spec["device"]).startswith("cuda") else 0
                    ref = remote.options(num_cpus=self.cpus_per_run, num_gpus=gpus).remote(
                        execute, spec, self.cpus_per_run)
                    in_flight[ref] = spec
                done, _ = ray.wait(list(in_flight), num_returns=1)
                spec = in_flight.pop(done[0])
                ray.get(done[0])  # execute records run errors; this raises if the task could not run
                on_done(spec)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--backend ray needs Ray, an optional dependency: "
                         "pip install 'reflora-analysis[ray]'")


def make_backend(name: str = "local", *, address: str | None = None,
                 max_in_flight: int | None = None) -> Backend:
    """The backend called ``name`` (:data:`BACKENDS`); one-line ``ValueError`` for an unknown
    name, an ``address`` without ``ray``, or ``ray`` when Ray is not installed."""
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown sweep backend {name!r}; valid: {', '.join(BACKENDS)}")
    if address is not None and name != "ray":
        raise ValueError("--address (a Ray cluster to join) needs --backend ray")
    if name == "ray":
        return RayBackend(address, max_in_flight=max_in_flight)
    return LocalBackend()


_CURRENT: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "reflora_sweep_backend", default=None)


def current_backend() -> Backend:
    """The backend set by the innermost :func:`use_backend`, else a :class:`LocalBackend`."""
    return _CURRENT.get() or LocalBackend()


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[Backend]:
    """Run the sweeps inside the ``with`` block on ``backend`` (a backend or its name)."""
    backend = make_backend(backend) if isinstance(backend, str) else backend
    token = _CURRENT.set(backend)
    try:
        yield backend
    finally:
        _CURRENT.reset(token)
