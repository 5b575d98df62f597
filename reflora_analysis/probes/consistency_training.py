r"""Consistency over training: does a method's *trajectory* depend on the factorization?

:mod:`.consistency` measures one SGD step. Here the method is trained for ``t`` steps, with
the optimizer people actually use (AdamW by default), from equivalent factorizations
``(A P_i, B P_i^{-T})`` of the same product (``P_0 = I``, ``P_i`` from
:func:`~.consistency.random_gl`, cond <= 4), and the weights are compared:

    spread(t) = max_i ||W_t^(i) - W_t^(0)||_F / ||W_t^(0) - W_0||_F,      W_t = A_t B_t^T,

the largest disagreement relative to the distance the reference run travelled (1 means the
runs disagree by as much as they moved). With SGD, RefLoRA, BaLoRA and ScaledGD (no damping)
are exactly invariant at every step (``THEORY.md`` F6 applied step by step: ~1e-12 in float64);
Adam's elementwise moments see the coordinates, so with AdamW RefLoRA, ScaledGD and the
geometric-mean ``balance`` are not invariant (``THEORY.md`` section 7). BaLoRA is the exception
with AdamW from a non-singular start: its SVD split is unique up to a signed permutation of
the columns (distinct singular values), and Adam's elementwise update commutes with signed
permutations, so equivalent starts stay equivalent (measured: ~1e-14 over 30 steps on ``mf``).

The loss is given as ``grad_fn(M) = dl/dM`` at ``M = A B^T`` (m x n; fold a LoRA scaling and
``W0`` into it); the gradients of the factors are ``grad_A = G B``, ``grad_B = G^T A``
(float64, no autograd). Points where the reference run's displacement is 0 give NaN.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..methods import build_optimizer, get_method
from .consistency import random_gl

__all__ = ["invariance_hparams", "training_spread", "spread_table"]


def invariance_hparams(method: str) -> dict:
    """The hyper-parameters that make ``method``'s SGD step exactly invariant where it can be:
    ``damping=0`` for the methods that take one (a fixed damping is not GL(r)-covariant) and
    ``skip=None`` for LoRA-RITE (its default guard zeroes unit-scale steps); ``{}`` otherwise."""
    spec = get_method(method)
    out = {}
    if "damping" in spec.hparams:
        out["damping"] = 0.0
    if "skip" in spec.hparams:
        out["skip"] = None
    return out


def _equivalent_starts(A: Tensor, B: Tensor, n_reparam: int, seed: int):
    gen = torch.Generator().manual_seed(int(seed))
    starts = [(A, B)]
    for _ in range(n_reparam):
        P = random_gl(A.shape[1], generator=gen, dtype=A.dtype).to(A.device)
        starts.append((A @ P, torch.linalg.solve(P, B.T).T))
    return starts


def training_spread(method: str, A: Tensor, B: Tensor, grad_fn: Callable[[Tensor], Tensor], *,
                    optimizer: str = "adamw", steps: int = 30, lr: float = 1e-2,
                    n_reparam: int = 4, seed: int = 0, weight_decay: float = 0.0,
                    **hparams) -> dict[str, list[float]]:
    r"""``spread(t)`` for ``t = 1..steps`` (module docstring) of ``method`` with ``optimizer``.

    Parameters
    ----------
    A, B : (m, r), (n, r), the start (use float64 for round-off-level invariance).
    grad_fn : callable (m, n) -> (m, n), ``dl/dM`` at ``M = A B^T``.
    optimizer, lr, weight_decay, hparams : as :func:`~reflora_analysis.methods.build_optimizer`.
    n_reparam, seed : the number of random ``P_i`` and their seed.

    Returns
    -------
    ``{"step": [1..steps], "spread": [...], "spread_abs": [max_i ||W_t^(i) - W_t^(0)||_F],
    "grad_norm": [||G_t||_F of the reference run]}``.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"expected A (m x r) and B (n x r) with a shared rank, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(n_reparam, int) or n_reparam < 1:
        raise ValueError(f"n_reparam must be a positive integer, got {n_reparam!r}")
    A, B = A.detach(), B.detach()
    W_start = A @ B.T
    runs = []
    for a0, b0 in _equivalent_starts(A, B, n_reparam, seed):
        a, b = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
        opt, _ = build_optimizer(method, [(a, b)], optimizer=optimizer, lr=lr,
                                 weight_decay=weight_decay, **hparams)
        runs.append((a, b, opt))
    out = {"step": [], "spread": [], "spread_abs": [], "grad_norm": []}
    for t in range(1, steps + 1):
        Ws = []
        for i, (a, b, opt) in enumerate(runs):
            G = grad_fn(a.detach() @ b.detach().T).to(a.dtype)
            if i == 0:
                out["grad_norm"].append(float(torch.linalg.matrix_norm(G)))
            a.grad, b.grad = G @ b.detach(), G.T @ a.detach()
            opt.step()
            Ws.append(a.detach() @ b.detach().T)
        moved = float(torch.linalg.matrix_norm(Ws[0] - W_start))
        worst = max(float(torch.linalg.matrix_norm(W - Ws[0])) for W in Ws[1:])
        out["step"].append(t)
        out["spread"].append(worst / moved if moved > 0 else float("nan"))
        out["spread_abs"].append(worst)
    return out


def spread_table(methods: Sequence[str], A: Tensor, B: Tensor,
                 grad_fn: Callable[[Tensor], Tensor], *, optimizers: Sequence[str] = ("sgd", "adamw"),
                 lrs: dict[str, float], steps: int = 30, n_reparam: int = 4, seed: int = 0,
                 progress: bool = False) -> list[dict]:
    r""":func:`training_spread` of every method with every optimizer, each with
    :func:`invariance_hparams`; ``lrs`` maps an optimizer to its step size. Rows
    ``{"method", "optimizer", "lr", "step", "spread", "spread_abs", "grad_norm"}`` (lists
    over steps)."""
    from tqdm.auto import tqdm

    rows = []
    combos = [(m, o) for o in optimizers for m in methods]
    for method, opt in tqdm(combos, desc="training spread", disable=not progress, leave=False):
        curve = training_spread(method, A, B, grad_fn, optimizer=opt, steps=steps,
                                lr=float(lrs[opt]), n_reparam=n_reparam, seed=seed,
                                **invariance_hparams(method))
        rows.append({"method": method, "optimizer": opt, "lr": float(lrs[opt]), **curve})
    return rows
