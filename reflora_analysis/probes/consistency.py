r"""Factorization consistency (transformation invariance) of a LoRA method (``THEORY.md`` F6).

Every ``P`` in GL(r) gives the same product: ``(A P)(B P^{-T})^T = A B^T``. An invariant
method takes the same weight step from every factorization of the same product;
RefLoRA does so exactly (F6: ``dW(S*)`` depends on ``M = A B^T`` alone), plain LoRA does not.

    score = max_i ||dW_i - dW_0||_F / ||dW_0||_F,

where ``dW_0`` is one SGD step of the method (:func:`reflora_analysis.methods.single_step_update`)
from ``(A, B)`` and ``dW_i`` the step from ``(A P_i, B P_i^{-T})``, ``i = 1..n_reparam``, with
the gradient ``G = grad_fn(W)`` evaluated at each factorization's product.
``P_i = U_i diag(d_i) V_i^T`` with Haar-random orthogonal ``U_i, V_i`` and ``d_i`` log-uniform
in ``[0.5, 2]``: condition number at most 4, so round-off does not masquerade as
non-invariance (float64 scores of exact methods are ~1e-14).

**Where to measure.** At a start with ``||A|| << ||B||`` (the single-layer tasks start at
``A ~ 0.01``, PEFT at ``A = 0``) every step is dominated by its ``A`` update
``-eta G B B^T``: LoRA's ``dW ~ -eta G B B^T`` and LoRA+'s ``dW ~ -ratio eta G B B^T`` then have
the same *relative* spread (both score 1.0734 on ``mf``, to five digits), so a score taken
there cannot tell such methods apart. :func:`trajectory_consistency` measures at generic
points instead: along the method's own SGD trajectory, once the factors have grown;
:func:`consistency_table` at random Gaussian factors. The spread of whole trajectories under
AdamW is :mod:`.consistency_training`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..methods import get_method, single_step_update
from ..methods.registry import optimizer_methods
from ._util import SCHEDULE_HPARAMS

__all__ = ["random_gl", "consistency_score", "consistency_table", "step_update",
           "trajectory_consistency"]


def random_gl(r: int, *, generator: torch.Generator, dtype=torch.float64,
              low: float = 0.5, high: float = 2.0) -> Tensor:
    """A well-conditioned random ``P`` in GL(r): ``U diag(d) V^T``, ``d`` log-uniform in
    ``[low, high]`` (Haar ``U``, ``V``), so ``cond(P) <= high / low``."""
    def haar():
        Z = torch.randn(r, r, generator=generator, dtype=torch.float64)
        Q, R = torch.linalg.qr(Z)
        return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)
    log_d = torch.empty(r, dtype=torch.float64).uniform_(math.log(low), math.log(high),
                                                         generator=generator)
    return ((haar() * log_d.exp().unsqueeze(0)) @ haar().T).to(dtype)


def step_update(method: str, A: Tensor, B: Tensor, G: Tensor, lr: float, **hparams) -> Tensor:
    """``dW`` of one SGD step of ``method`` on the pair (``methods.single_step_update``).

    ``method`` is normalised (``"LoRA"`` -> ``"lora"``). The schedule hyper-parameters
    ``warmup_steps`` / ``interval`` are refused: one step from fresh factors has no schedule
    (a fresh transform would be in its warm-up and take plain LoRA's step); pass the method the
    step actually is instead (``probes._util.step_method``).
    """
    schedule = sorted(k for k in hparams if k in SCHEDULE_HPARAMS)
    if schedule:
        raise ValueError(f"{', '.join(schedule)} describe a training schedule, not one step; "
                         "pass the method the step is ('lora' during warm-up) without them")
    return single_step_update(get_method(method).name, A, B, G, lr, **hparams)


def consistency_score(method: str, A: Tensor, B: Tensor, grad_fn: Callable[[Tensor], Tensor],
                      n_reparam: int = 8, seed: int = 0, lr: float = 1e-2,
                      return_updates: bool = False, **hparams):
    r"""Relative spread of one step's weight update over factorizations of ``A B^T``.

    Parameters
    ----------
    method : str
        A registered method name (``methods.available_methods()``).
    A, B : (m, r), (n, r)
    grad_fn : callable (m, n) -> (m, n)
        ``dL/dW`` at ``W = A B^T`` (paper orientation).
    n_reparam : int
        Number of random ``P`` (see the module docstring).
    lr : float
        Step size of the one SGD step.

    Returns
    -------
    float ``max_i ||dW_i - dW_0||_F / ||dW_0||_F`` (and the list of ``dW`` when
    ``return_updates``). ~1e-14 in float64 for exactly invariant methods (RefLoRA, ScaledGD).
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"expected A (m x r) and B (n x r) with a shared rank, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if not isinstance(n_reparam, int) or n_reparam < 1:
        raise ValueError(f"n_reparam must be a positive integer, got {n_reparam!r}")
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable W -> dL/dW, got {type(grad_fn).__name__}")
    method = get_method(method).name
    A, B = A.detach(), B.detach()
    gen = torch.Generator().manual_seed(int(seed))

    def update(a, b):
        G = grad_fn(a @ b.T)
        if G.shape != (A.shape[0], B.shape[0]):
            raise ValueError(f"grad_fn returned shape {tuple(G.shape)}, expected m x n = "
                             f"{(A.shape[0], B.shape[0])}")
        return step_update(method, a, b, G.to(a.dtype), lr, **hparams)

    dW0 = update(A, B)
    ref = float(torch.linalg.matrix_norm(dW0.to(torch.float64)))
    if not ref > 0:
        raise ValueError(f"method {method!r} made a zero update from this point; the relative "
                         "spread is undefined (e.g. a zero gradient or a B = 0 start)")
    updates, spread = [dW0], 0.0
    for _ in range(n_reparam):
        P = random_gl(A.shape[1], generator=gen, dtype=A.dtype).to(A.device)
        a = A @ P
        b = torch.linalg.solve(P, B.T).T  # B P^{-T}
        dW = update(a, b)
        updates.append(dW)
        spread = max(spread, float(torch.linalg.matrix_norm((dW - dW0).to(torch.float64))) / ref)
    return (spread, updates) if return_updates else spread


def consistency_table(methods: Sequence[str] | None = None, *, m: int = 30, n: int = 20,
                      r: int = 4, n_problems: int = 5, n_reparam: int = 8, seed: int = 0,
                      lr: float = 1e-2, dtype=torch.float64,
                      hparams: dict[str, dict] | None = None) -> dict[str, dict[str, float]]:
    r"""Consistency score of each method on random least-squares problems.

    Problem ``k``: ``l(W) = 1/2 ||W - Y_k||_F^2`` (so ``G = W - Y_k``) with Gaussian ``A, B``
    (m x r, n x r) scaled by ``1/sqrt(r)`` and a Gaussian target ``Y_k``. ``hparams`` maps a
    method name to its hyper-parameters (e.g. ``{"scaledgd": {"damping": 0.0}}``). Returns
    ``{method: {"median": ..., "max": ..., "invariance": the registry's claim}}``.
    """
    # None: the methods that act on (A, B) pairs alone (not dora/full, which change the model)
    methods = optimizer_methods() if methods is None else [get_method(m).name for m in methods]
    gen = torch.Generator().manual_seed(int(seed))
    problems = []
    for _ in range(n_problems):
        A = torch.randn(m, r, generator=gen, dtype=dtype) / math.sqrt(r)
        B = torch.randn(n, r, generator=gen, dtype=dtype) / math.sqrt(r)
        Y = torch.randn(m, n, generator=gen, dtype=dtype)
        problems.append((A, B, Y))
    table = {}
    for name in methods:
        scores = [consistency_score(name, A, B, lambda W, Y=Y: W - Y, n_reparam=n_reparam,
                                    seed=seed + i, lr=lr, **(hparams or {}).get(name, {}))
                  for i, (A, B, Y) in enumerate(problems)]
        scores.sort()
        table[name] = {"median": scores[len(scores) // 2], "max": scores[-1],
                       "invariance": get_method(name).invariance}
    return table


def trajectory_consistency(method: str, A: Tensor, B: Tensor, grad_fn: Callable[[Tensor], Tensor],
                           *, steps: int, lr: float, every: int = 1, n_reparam: int = 4,
                           seed: int = 0, **hparams) -> dict[str, list]:
    r""":func:`consistency_score` of ``method`` at the points of its own SGD trajectory.

    From ``(A, B)`` the method takes ``steps`` SGD steps at ``lr`` (gradients
    ``grad_A = G B``, ``grad_B = G^T A`` with ``G = grad_fn(A B^T)``; its transform and schedule
    included, as :func:`~reflora_analysis.methods.build_optimizer` builds it); at steps
    ``0, every, 2 every, ...`` the score of one step from the current factors is taken
    (``hparams`` without the schedule). Returns ``{"step", "score", "norm_ratio"}`` with
    ``norm_ratio = ||A||_F / ||B||_F`` (how far from the ``||A|| << ||B||`` start the point is);
    a step where the update is zero scores NaN. A diverging run (non-finite factors) stops.
    """
    from torch import nn

    from ..methods import build_optimizer

    if not isinstance(steps, int) or steps < 0 or not isinstance(every, int) or every < 1:
        raise ValueError(f"steps must be an int >= 0 and every an int >= 1, got {steps!r}, {every!r}")
    method = get_method(method).name
    a, b = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())
    opt, _ = build_optimizer(method, [(a, b)], optimizer="sgd", lr=lr, **hparams)
    point_hparams = {k: v for k, v in hparams.items() if k not in SCHEDULE_HPARAMS}
    out: dict[str, list] = {"step": [], "score": [], "norm_ratio": []}
    for t in range(steps + 1):
        A_t, B_t = a.detach(), b.detach()
        if not (bool(torch.isfinite(A_t).all()) and bool(torch.isfinite(B_t).all())):
            break
        if t % every == 0:
            try:
                score = consistency_score(method, A_t, B_t, grad_fn, n_reparam=n_reparam,
                                          seed=seed, lr=lr, **point_hparams)
            except ValueError as exc:
                if "zero update" not in str(exc):
                    raise
                score = math.nan
            out["step"].append(t)
            out["score"].append(score)
            out["norm_ratio"].append(float(A_t.norm() / B_t.norm()))
        if t < steps:
            G = grad_fn(A_t @ B_t.T).to(A_t.dtype)
            a.grad, b.grad = G @ B_t, G.T @ A_t
            opt.step()
    return out
