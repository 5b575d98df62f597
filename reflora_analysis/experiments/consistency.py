r"""Notebook 03: consistency (transformation invariance) of every method, balance over training.

``run = consistency.setup(globals())``, ``data = consistency.experiment(run)``
(``{"consistency", "balance": [panels]}``), then
:func:`reflora_analysis.plotting.publish_consistency_balance` (which also writes the
Markdown table). Quick (:data:`SPEC`): two seeds (one for the balance runs), at most 4
refactorings, 3 real-model steps after 1 warm-up step, 64 held-out examples on
``nlu-minilm``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .common import as_float, balance_series, long_table, methods_or_all, single_pair, sweep_runs, write_data
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, first, options_for_task

__all__ = ["SPEC", "setup", "experiment", "consistency_experiment", "balance_trajectories"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"balance_seeds": list(params["seeds"]),  # the mf balance panel
            "real_seeds": list(params["seeds"][:1]),  # the real-model balance panel
            "real_task_options": {}}


SPEC = NotebookSpec(
    "03_consistency_balance",
    parameters=dict(quick=False, device="cpu", seeds=[0, 1, 2], steps=100, methods=None,
                    n_reparam=8, damping=0.0,
                    consistency_tasks=["mf", "sensing", "lowrank-regression"],
                    real_task="nlu-minilm", real_steps=60, real_refactor_warmup=10,
                    out_dir=None),
    quick=Preset(seeds=first(2), real_steps=at_most(3), n_reparam=at_most(4),
                 real_refactor_warmup=at_most(1), balance_seeds=first(1),
                 real_task_options=options_for_task(
                     "real_task", {"nlu-minilm": {"eval_examples": 64}})),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """Consistency scores, the mf balance runs and (``real_task`` not ``None``) the
    real-model balance runs, with the run's arguments."""
    base = dict(device=run["device"], out_dir=run.out, quick=run["quick"])
    cons = consistency_experiment(run["methods"], tasks=run["consistency_tasks"],
                                  seeds=run["seeds"], n_reparam=run["n_reparam"],
                                  damping=run["damping"], **base)
    panels = [balance_trajectories(run["methods"], task="mf", optimizer="sgd",
                                   steps=run["steps"], seeds=run["balance_seeds"],
                                   name="balance_mf", **base)]
    if run["real_task"]:
        panels.append(balance_trajectories(
            run["methods"], task=run["real_task"], optimizer="adamw", steps=run["real_steps"],
            seeds=run["real_seeds"], name="balance_real", task_overrides=run["real_task_options"],
            refactor_warmup=run["real_refactor_warmup"], **base))
    return {"consistency": cons, "balance": panels}


def _grad_fn(t, A: torch.Tensor, B: torch.Tensor):
    """``M -> grad l(W0 + M)`` of a single-layer task, in float64."""
    loss_in_W = t.loss_in_W
    W0 = (t.W0.detach().to(torch.float64) if t.W0 is not None
          else torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64))

    def grad_fn(M):
        W = (W0 + M).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_in_W(W), W)
        return g
    return grad_fn


def _score(method: str, A, B, grad_fn, *, n_reparam: int, seed: int, lr: float,
           damping: float | None) -> tuple[float, float | None]:
    """``(score, damping used)``: with ``damping`` where the method takes one."""
    from ..probes import consistency_score

    if damping is not None:
        try:
            return (consistency_score(method, A, B, grad_fn, n_reparam=n_reparam, seed=seed,
                                      lr=lr, damping=float(damping)), float(damping))
        except (TypeError, ValueError) as exc:
            if "damping" not in str(exc):
                raise  # a real error, not "the method has no damping"
    return consistency_score(method, A, B, grad_fn, n_reparam=n_reparam, seed=seed, lr=lr), None


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
    from ..methods import METHOD_INFO
    from ..tasks import make_task

    methods = methods_or_all(methods)
    scores = []
    for task in tasks:
        for seed in seeds:
            t = make_task(task, seed=seed, device=device, quick=quick)
            pair = single_pair(t)
            A = pair.A.detach().to(torch.float64).clone()
            B = pair.B.detach().to(torch.float64).clone()
            grad_fn, lr = _grad_fn(t, A, B), float(t.default_lr["sgd"])
            for method in methods:
                score, used = _score(method, A, B, grad_fn, n_reparam=n_reparam, seed=seed,
                                     lr=lr, damping=damping)
                scores.append({"method": method, "task": task, "seed": seed,
                               "score": as_float(score), "damping": used})
    info = {m: {k: v for k, v in METHOD_INFO.get(m, {}).items() if isinstance(v, (str, int, float))}
            for m in methods}
    data = {"methods": methods, "tasks": list(tasks), "seeds": list(seeds),
            "n_reparam": n_reparam, "damping": damping, "dtype": "float64", "scores": scores,
            "info": info}
    rows = [(s["method"], s["task"], s["seed"], s["score"],
             "" if s["damping"] is None else s["damping"],
             info.get(s["method"], {}).get("invariance", "")) for s in scores]
    write_data(out_dir, "consistency", data, {"consistency": (
        ["method", "task", "seed", "score", "damping", "invariance"], rows)})
    return data


def balance_trajectories(methods: Sequence[str] | None = None, *, task: str = "mf",
                         optimizer: str = "sgd", steps: int = 100, seeds: Sequence[int] = (0,),
                         device: str = "cpu", lr: float | None = None, out_dir=None,
                         name: str = "balance", quick: bool = False,
                         task_overrides: Mapping[str, Any] | None = None,
                         refactor_warmup: int = 0) -> dict[str, Any]:
    r"""Balance gap ``||A^T A - B^T B||_F / (||A^T A||_F + ||B^T B||_F)`` over training.

    For a multi-layer model the balance probe's aggregate over layers is used (see
    :mod:`reflora_analysis.probes`). ``refactor_warmup``: plain LoRA steps before the
    refactoring methods act (:func:`~.common.train_records`). Returns ``{"task", "runs":
    [{"method", "seed", "step", "balance_gap", "loss"}]}``; writes ``<name>.csv`` / ``.json``.
    """
    methods = methods_or_all(methods)
    swept = sweep_runs(methods, task=task, steps=steps, seeds=seeds, device=device,
                       quick=quick, task_options=task_overrides, optimizer=optimizer, lr=lr,
                       probes="balance", probe_every=1, refactor_warmup=refactor_warmup,
                       collect=balance_series(only_probed=True))
    data = {"task": task, "optimizer": optimizer, "methods": methods, "seeds": list(seeds),
            "runs": swept.runs}
    write_data(out_dir, name, data, {name: long_table(
        swept.runs, ["method", "seed"], ["step", "loss", "balance_gap"])})
    return data
