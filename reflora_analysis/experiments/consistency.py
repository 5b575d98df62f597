r"""Notebook 03: consistency (transformation invariance) where methods can differ, consistency
over training with AdamW, balance and adapter health over training.

``run = consistency.setup(globals())``, ``data = consistency.experiment(run)``
(``{"consistency", "spread", "balance": [panels], "health"}``), then
:func:`reflora_analysis.plotting.publish_consistency_balance`.

* ``consistency``: one SGD step's spread over refactorings (``THEORY.md`` F6) at three kinds
  of point: the task's start (``A ~ 0.01``, where LoRA and LoRA+ cannot differ:
  :mod:`reflora_analysis.probes.consistency`), a generic point (after ``generic_steps`` plain
  LoRA SGD steps from the start: the same point for every method) and random Gaussian factors;
* ``spread``: the spread of ``W`` after ``t`` steps from equivalent factorizations, per method,
  with SGD and with AdamW (:mod:`reflora_analysis.probes.consistency_training`);
* ``balance``: the balance gap over training on ``mf`` (SGD) and on ``real_task`` (AdamW);
* ``health``: per-layer balance and adapter health (effective rank, condition numbers,
  dominance; :mod:`reflora_analysis.probes.health`) over training on ``real_task``.

Quick (:data:`SPEC`): two seeds (one for the balance runs), at most 4 refactorings, 20 spread
steps with 2 refactorings, 3 real-model steps after 1 warm-up step for four methods, 16
validation examples and no test evaluation on ``vader-movies``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .common import (as_float, balance_series, long_table, methods_or_all, single_pair,
                     sweep_runs, tolerant_probes, write_data)
from .notebook import NotebookRun, NotebookSpec, Preset, at_most, fill, first, options_for_task

__all__ = ["SPEC", "setup", "experiment", "consistency_experiment", "spread_experiment",
           "balance_trajectories", "health_trajectories"]

#: The real-task methods of the quick preset (the refactoring family against LoRA).
QUICK_REAL_METHODS = ["lora", "reflora", "balance", "balora"]


def _derive(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"balance_seeds": list(params["seeds"]),  # the mf balance panel
            "real_seeds": list(params["seeds"][:1]),  # the real-model panels
            "real_task_options": {}}


SPEC = NotebookSpec(
    "03_consistency_balance",
    parameters=dict(quick=False, device="cpu", seeds=[0, 1, 2], steps=100, methods=None,
                    n_reparam=8, damping=0.0,
                    consistency_tasks=["mf", "sensing", "lowrank-regression"],
                    generic_steps=20, spread_task="mf", spread_steps=30, spread_reparam=4,
                    real_task="vader-movies", real_methods=None, real_steps=60,
                    real_refactor_warmup=10, out_dir=None),
    quick=Preset(seeds=first(2), real_steps=at_most(3), n_reparam=at_most(4),
                 real_refactor_warmup=at_most(1), balance_seeds=first(1),
                 spread_steps=at_most(20), spread_reparam=at_most(2),
                 real_methods=fill(QUICK_REAL_METHODS),
                 real_task_options=options_for_task(
                     "real_task", {"vader-movies": {"eval_examples": 16, "evaluate_test": False},
                                   "nlu-minilm": {"eval_examples": 64}})),
    derive=_derive)


def setup(namespace=None, /, **parameters) -> NotebookRun:
    """The notebook's run (:meth:`NotebookSpec.setup` of :data:`SPEC`)."""
    return SPEC.setup(namespace, **parameters)


def experiment(run: NotebookRun) -> dict[str, Any]:
    """Consistency scores at three kinds of point, the training spreads, the mf balance runs
    and (``real_task`` not ``None``) the real-model balance and health runs."""
    base = dict(device=run["device"], out_dir=run.out, quick=run["quick"])
    cons = consistency_experiment(run["methods"], tasks=run["consistency_tasks"],
                                  seeds=run["seeds"], n_reparam=run["n_reparam"],
                                  damping=run["damping"], generic_steps=run["generic_steps"],
                                  **base)
    spread = spread_experiment(run["methods"], task=run["spread_task"], seed=run["seeds"][0],
                               steps=run["spread_steps"], n_reparam=run["spread_reparam"], **base)
    panels = [balance_trajectories(run["methods"], task="mf", optimizer="sgd",
                                   steps=run["steps"], seeds=run["balance_seeds"],
                                   name="balance_mf", **base)]
    health = None
    if run["real_task"]:
        health = health_trajectories(
            run["real_methods"] or run["methods"], task=run["real_task"], optimizer="adamw",
            steps=run["real_steps"], seeds=run["real_seeds"],
            task_overrides=run["real_task_options"],
            refactor_warmup=run["real_refactor_warmup"], **base)
        panels.append(health)
    return {"consistency": cons, "spread": spread, "balance": panels, "health": health}


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


def _point_hparams(method: str, damping: float | None) -> dict:
    """The hyper-parameters a score is taken with: the invariance-making ones
    (:func:`~reflora_analysis.probes.consistency_training.invariance_hparams`: no damping,
    LoRA-RITE without its skip guard) with ``damping`` as given (``None``: the default)."""
    from ..probes.consistency_training import invariance_hparams

    hp = invariance_hparams(method)
    if "damping" in hp:
        if damping is None:
            hp.pop("damping")
        else:
            hp["damping"] = float(damping)
    return hp


def _lora_point(A, B, grad_fn, lr: float, steps: int):
    """The factors after ``steps`` plain LoRA SGD steps from ``(A, B)`` (a generic point)."""
    from ..methods import build_optimizer

    a, b = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt, _ = build_optimizer("lora", [(a, b)], optimizer="sgd", lr=lr)
    for _ in range(steps):
        G = grad_fn(a.detach() @ b.detach().T)
        a.grad, b.grad = G @ b.detach(), G.T @ a.detach()
        opt.step()
    return a.detach().clone(), b.detach().clone()


def _points(task: str, seed: int, device: str, quick: bool, generic_steps: int):
    """``(default lrs, grad_fn, {point name: (A, B)})`` of one problem instance (float64)."""
    from ..tasks import make_task

    t = make_task(task, seed=seed, device=device, quick=quick)
    pair = single_pair(t)
    A = pair.A.detach().to(torch.float64).clone()
    B = pair.B.detach().to(torch.float64).clone()
    lrs = {k: float(v) for k, v in t.default_lr.items()}
    grad_fn, lr = _grad_fn(t, A, B), lrs["sgd"]
    gen = torch.Generator().manual_seed(int(seed))
    r = A.shape[1]
    random = (torch.randn(A.shape, generator=gen, dtype=torch.float64) / r ** 0.5,
              torch.randn(B.shape, generator=gen, dtype=torch.float64) / r ** 0.5)
    return lrs, grad_fn, {"start": (A, B), "generic": _lora_point(A, B, grad_fn, lr, generic_steps),
                         "random": random}


def consistency_experiment(methods: Sequence[str] | None = None, *,
                           tasks: Sequence[str] = ("mf", "lowrank-regression"),
                           seeds: Sequence[int] = (0, 1, 2), n_reparam: int = 8,
                           damping: float | None = 0.0, generic_steps: int = 20,
                           device: str = "cpu", out_dir=None, quick: bool = False) -> dict[str, Any]:
    r"""Consistency score of every method, per task, seed and kind of point.

    For a problem instance (task, seed), :func:`reflora_analysis.probes.consistency_score`
    draws ``n_reparam`` well-conditioned ``P`` and returns ``max_i ||dW_i - dW_0||_F /
    ||dW_0||_F`` over one SGD step of the method from each factorization ``(A P, B P^{-T})``,
    at three points (float64): ``start``, the task's initial factors (``A ~ 0.01``: LoRA and
    LoRA+ score alike there); ``generic``, after ``generic_steps`` plain LoRA SGD steps (the
    same point for every method); ``random``, Gaussian factors ``N(0, 1/r)``. The loss is the
    task's at every point. ~1e-15 for exactly invariant methods (F6), O(1) for plain LoRA.

    ``damping`` goes to every method that takes one (exact invariance needs 0; ``None``
    keeps the defaults); LoRA-RITE runs without its skip guard (registry notes).

    Returns ``{"methods", "tasks", "points", "scores": [{"method", "task", "seed", "point",
    "score", "damping"}], "info"}``; writes ``consistency.csv`` / ``.json``.
    """
    from ..methods import METHOD_INFO
    from ..probes import consistency_score

    methods = methods_or_all(methods)
    scores = []
    for task in tasks:
        for seed in seeds:
            lrs, grad_fn, points = _points(task, seed, device, quick, generic_steps)
            lr = lrs["sgd"]
            for point, (A, B) in points.items():
                for method in methods:
                    hp = _point_hparams(method, damping)
                    score = consistency_score(method, A, B, grad_fn, n_reparam=n_reparam,
                                              seed=seed, lr=lr, **hp)
                    scores.append({"method": method, "task": task, "seed": seed,
                                   "point": point, "score": as_float(score),
                                   "damping": hp.get("damping")})
    info = {m: {k: v for k, v in METHOD_INFO.get(m, {}).items() if isinstance(v, (str, int, float))}
            for m in methods}
    data = {"methods": methods, "tasks": list(tasks), "seeds": list(seeds),
            "points": ["start", "generic", "random"], "generic_steps": generic_steps,
            "n_reparam": n_reparam, "damping": damping, "dtype": "float64", "scores": scores,
            "info": info}
    rows = [(s["method"], s["task"], s["seed"], s["point"], s["score"],
             "" if s["damping"] is None else s["damping"],
             info.get(s["method"], {}).get("invariance", "")) for s in scores]
    write_data(out_dir, "consistency", data, {"consistency": (
        ["method", "task", "seed", "point", "score", "damping", "invariance"], rows)})
    return data


def spread_experiment(methods: Sequence[str] | None = None, *, task: str = "mf", seed: int = 0,
                      steps: int = 30, n_reparam: int = 4, device: str = "cpu", out_dir=None,
                      quick: bool = False) -> dict[str, Any]:
    r"""Consistency over training: ``spread(t) = max_i ||W_t^(i) - W_t^(0)||_F /
    ||W_t^(0) - W_0||_F`` of every method with SGD and with AdamW (the task's default step
    sizes) from ``n_reparam`` equivalent factorizations of the task's start
    (:func:`~reflora_analysis.probes.consistency_training.training_spread`, float64).

    Returns ``{"task", "seed", "lrs", "runs": [{"method", "optimizer", "lr", "step",
    "spread", "spread_abs", "grad_norm"}]}``; writes ``spread.csv`` / ``.json``.
    """
    from ..probes.consistency_training import spread_table

    methods = methods_or_all(methods)
    lrs, grad_fn, points = _points(task, seed, device, quick, 0)
    A, B = points["start"]
    runs = spread_table(methods, A, B, grad_fn, lrs=lrs, steps=steps, n_reparam=n_reparam,
                        seed=seed, progress=True)
    data = {"task": task, "seed": seed, "lrs": lrs, "n_reparam": n_reparam, "steps": steps,
            "dtype": "float64", "methods": methods, "runs": runs}
    write_data(out_dir, "spread", data, {"spread": long_table(
        runs, ["method", "optimizer", "lr"], ["step", "spread", "spread_abs", "grad_norm"])})
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


def _health_collect(records, task=None) -> dict:
    """Series of the balance and health probes (per layer too) from a run's records."""
    recs = [r for r in records if "health/erank_mean" in r]
    names = [p.name for p in task.pairs] if task is not None else []

    def per_layer(prefix, key):
        return [[as_float(r.get(f"{prefix}/{n}/{key}")) for n in names] for r in recs]
    out = {"step": [int(r["step"]) for r in recs],
           "loss": [as_float(r.get("loss")) for r in recs], "layers": names}
    for key, rec_key in (("balance_gap", "balance/gap_mean"), ("norm_ratio", "balance/norm_ratio"),
                         ("erank_mean", "health/erank_mean"), ("erank_min", "health/erank_min"),
                         ("cond_A_max", "health/cond_A_max"), ("cond_B_max", "health/cond_B_max"),
                         ("dominance_max", "health/dominance_max"),
                         ("dominance_mean", "health/dominance_mean")):
        out[key] = [as_float(r.get(rec_key)) for r in recs]
    out.update(layer_gap=per_layer("balance", "gap"), layer_erank=per_layer("health", "erank"),
               layer_dominance=per_layer("health", "dominance"))
    return out


def health_trajectories(methods: Sequence[str] | None = None, *, task: str = "vader-movies",
                        optimizer: str = "adamw", steps: int = 60, seeds: Sequence[int] = (0,),
                        device: str = "cpu", lr: float | None = None, out_dir=None,
                        name: str = "balance_real", quick: bool = False,
                        task_overrides: Mapping[str, Any] | None = None,
                        refactor_warmup: int = 0) -> dict[str, Any]:
    r"""Per-layer balance and adapter health over training on a multi-layer task.

    Every step the ``balance`` and ``health`` probes run with ``per_layer=True``: per LoRA pair
    the balance gap, the effective rank of ``A B^T`` (Roy & Vetterli 2007), the condition
    numbers of ``A`` and ``B`` and the dominance ``sigma_max(s A B^T) / sigma_max(W0)``
    (:mod:`reflora_analysis.probes.health`), and their aggregates. ``refactor_warmup``: plain
    LoRA steps before the refactoring family acts (PEFT's ``A = 0`` start).

    Returns ``{"task", "optimizer", "methods", "seeds", "runs": [{"method", "seed", "step",
    "loss", "balance_gap", "norm_ratio", "erank_mean", ..., "layers", "layer_gap",
    "layer_erank", "layer_dominance"}]}``; writes ``<name>.csv`` (aggregates),
    ``<name>_layers.csv`` (per layer) and ``<name>.json``.
    """
    methods = methods_or_all(methods)
    swept = sweep_runs(methods, task=task, steps=steps, seeds=seeds, device=device,
                       quick=quick, task_options=task_overrides, optimizer=optimizer, lr=lr,
                       probes=lambda: tolerant_probes("balance,health", per_layer=True),
                       probe_every=1, refactor_warmup=refactor_warmup, collect=_health_collect)
    data = {"task": task, "optimizer": optimizer, "methods": methods, "seeds": list(seeds),
            "refactor_warmup": refactor_warmup, "runs": swept.runs}
    aggregates = ["step", "loss", "balance_gap", "norm_ratio", "erank_mean", "erank_min",
                  "cond_A_max", "cond_B_max", "dominance_max", "dominance_mean"]
    layer_rows = [(r["method"], r["seed"], step, layer, gap, erank, dom)
                  for r in swept.runs
                  for step, gaps, ranks, doms in zip(r["step"], r["layer_gap"], r["layer_erank"],
                                                     r["layer_dominance"])
                  for layer, gap, erank, dom in zip(r["layers"], gaps, ranks, doms)]
    write_data(out_dir, name, data, {
        name: long_table(swept.runs, ["method", "seed"], aggregates),
        f"{name}_layers": (["method", "seed", "step", "layer", "balance_gap", "erank",
                            "dominance"], layer_rows)})
    return data
