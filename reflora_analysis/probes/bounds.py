r"""Tightness of the descent-lemma bounds of ``THEORY.md`` F8.

For an ``L``-smooth loss ``l`` of the (effective) product ``M = A B^T`` and one
preconditioned step ``dW(S)`` (F2),

    l(M + dW(S)) <= U_exact(S) = l(M) + <G, dW(S)> + (L/2) ||dW(S)||_F^2 <= U_relaxed(S),

computed by :func:`reflora_analysis.theory.upper_bounds`. LoRA is ``S = I``, RefLoRA
``S = S*`` (F3), RefLoRA-S ``S = s* I`` (F7), and ``balance``, whose SGD step equals
RefLoRA's (``BASELINES.md`` section 5), ``S = S*``. The step ``dW`` itself is always the
method's own (``methods.single_step_update``; for the ``S``-family it equals ``dW(S)``), so
``next_loss`` is the loss the optimizer reaches, and ``U_exact`` is the descent lemma
``l(M) + <G, dW> + (L/2) ||dW||^2`` for it; ``U_relaxed`` is defined only for the
``S``-family and is reported as NaN for the others.

With a LoRA scaling ``s`` (``W = W0 + s A B^T``), everything is expressed for
``l~(M) = l(W0 + s M)``: ``G~ = s dl/dW`` and ``L~ = s^2 L``.

When ``L`` is unknown it is *estimated* as ``lambda_max`` of the Hessian of ``l`` in ``W`` at
the current iterate (:func:`estimate_smoothness`: Lanczos on Hessian-vector products of
``loss_in_W``). This is exact for quadratic losses (least squares, matrix factorization);
for other losses it is a local curvature, not a global constant, so the inequalities may be
violated and the probe reports ``bound/L_estimated = 1``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..theory import optimal_preconditioner, scalar_preconditioner, upper_bounds, weight_update
from ._util import canonical_method, loss_and_grad_in_W
from .consistency import step_update
from .sharpness import lanczos_top_eigenvalues

__all__ = ["preconditioner_for", "estimate_smoothness", "bound_step", "bound_line_scan"]

def s_family() -> tuple[str, ...]:
    """Methods whose one SGD step is the preconditioned step ``dW(S)`` of F1/F2: plain LoRA
    (``S = I``) and the registry's refactoring methods. ``balance`` is one because its SGD
    step equals RefLoRA's (``BASELINES.md`` section 5: projecting onto the balanced
    factorization before the step is F4/F5's refactoring with ``P P^T = S*``)."""
    from ..methods import refactoring_methods
    return ("lora", *refactoring_methods())


def preconditioner_for(method: str, A: Tensor, B: Tensor, damping: float = 0.0) -> Tensor | None:
    """``S`` of the method in F1, or ``None`` for methods outside :func:`s_family`.

    ``lora``: ``I``; ``reflora``: ``S*`` (F3) of the relatively damped Grams (``damping``, as
    :class:`~reflora_analysis.refactor.Refactorer` uses it); ``balance``: the undamped ``S*``
    (the balanced projection takes no damping); ``reflora-s``: ``s* I`` (F7). ``method`` is
    normalised (``"LoRA"`` -> ``"lora"``); an unknown name is a ``ValueError``.
    """
    method = canonical_method(method)
    eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    if method == "lora":
        return eye
    if method == "reflora":
        return optimal_preconditioner(A, B, damping=damping)
    if method == "balance":
        return optimal_preconditioner(A, B)
    if method == "reflora-s":
        return scalar_preconditioner(A, B) * eye
    return None


def estimate_smoothness(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor, *, tol: float = 1e-3,
                        max_iter: int = 100, seed: int = 0) -> tuple[float, int]:
    r"""``lambda_max(d^2 l / dW^2)`` at ``W`` by Lanczos on HVPs; returns ``(L, hvps)``.

    Exact smoothness constant for quadratic ``l``; a local estimate otherwise (see module).
    Clamped at 0 (a concave direction does not reduce the upper curvature below 0).
    """
    W = W.detach()

    def matvec(v):
        Wv = W.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn_W(Wv), Wv, create_graph=True)
            (hv,) = torch.autograd.grad(g, Wv, grad_outputs=v.view_as(W).to(W.dtype),
                                        allow_unused=True)
        return (torch.zeros_like(W) if hv is None else hv).reshape(-1).to(torch.float64)

    info = lanczos_top_eigenvalues(matvec, W.numel(), tol=tol, max_iter=max_iter, seed=seed,
                                   device=W.device)
    return max(info["values"][0], 0.0), info["hvps"]


def bound_step(method: str, A: Tensor, B: Tensor, loss_fn_W: Callable[[Tensor], Tensor],
               lr: float, L: float, *, W0: Tensor | None = None, scaling: float = 1.0,
               **hparams) -> dict:
    r"""Actual next loss and the F8 bounds for one SGD step of ``method`` at ``(A, B)``.

    ``W = W0 + scaling * A B^T``; ``loss_fn_W`` maps a full ``W`` (m x n) to a scalar;
    ``L`` is the smoothness constant of ``loss_fn_W`` in ``W``. Returns floats ``loss``,
    ``next_loss = l(W + scaling dW)``, ``U_exact``, ``U_relaxed`` (NaN outside the S-family)
    and ``update_norm = ||dW||_F``.
    """
    method = canonical_method(method)
    A, B = A.detach(), B.detach()
    W0 = torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype, device=A.device) if W0 is None else W0
    W = W0 + scaling * (A @ B.T)
    loss, G_W = loss_and_grad_in_W(loss_fn_W, W)
    G = scaling * G_W
    L_eff = scaling**2 * L
    # the method's actual step; for the S-family it equals weight_update(A, B, G, lr, S) (F2)
    dW = step_update(method, A, B, G, lr, **hparams)
    U_exact = loss + float((G * dW).sum()) + 0.5 * L_eff * float(dW.square().sum())
    S = preconditioner_for(method, A, B, damping=float(hparams.get("damping", 0.0)))
    U_relaxed = math.nan if S is None else float(upper_bounds(A, B, G, loss, lr, L_eff, S)[1])
    with torch.no_grad():
        next_loss = float(loss_fn_W(W + scaling * dW))
    return {"loss": loss, "next_loss": next_loss, "U_exact": U_exact, "U_relaxed": U_relaxed,
            "update_norm": float(torch.linalg.matrix_norm(dW))}


def bound_line_scan(A: Tensor, B: Tensor, G: Tensor, loss_fn_W: Callable[[Tensor], Tensor],
                    L: float, etas: Sequence[float], W0: Tensor | None = None) -> dict:
    r"""``l(W + dW(eta))``, ``U_exact`` and ``U_relaxed`` over step sizes, for LoRA and RefLoRA.

    ``W = W0 + A B^T`` (``W0 = 0`` by default), ``G`` the gradient of ``loss_fn_W`` at ``W``
    (paper orientation m x n), ``L`` its smoothness constant. For each ``eta`` and
    ``S in {I, S*}``: ``dW = dW(S)`` (F2), the actual loss and both bounds (F8). This is the
    data behind the paper's upper-bound figure (loss and bound against eta at one iterate).

    Returns a dict of float64 numpy arrays of shape ``(len(etas),)``: ``eta``,
    ``loss_lora``, ``U_exact_lora``, ``U_relaxed_lora``, the same with ``_reflora``, and the
    scalar ``loss0 = l(W)``.
    """
    etas = np.asarray(list(etas), dtype=np.float64)
    if etas.ndim != 1 or etas.size == 0 or not np.all(np.isfinite(etas)):
        raise ValueError("etas must be a non-empty 1-D sequence of finite step sizes")
    A, B, G = A.detach(), B.detach(), G.detach()
    if G.shape != (A.shape[0], B.shape[0]):
        raise ValueError(f"G must be m x n = {(A.shape[0], B.shape[0])}, got {tuple(G.shape)}")
    W0 = torch.zeros_like(G) if W0 is None else W0
    W = W0 + A @ B.T
    with torch.no_grad():
        loss0 = float(loss_fn_W(W))
    out: dict = {"eta": etas, "loss0": loss0}
    for tag, S in (("lora", torch.eye(A.shape[1], dtype=A.dtype, device=A.device)),
                   ("reflora", optimal_preconditioner(A, B))):
        losses, ue, ur = [], [], []
        for eta in etas:
            dW = weight_update(A, B, G, float(eta), S)
            with torch.no_grad():
                losses.append(float(loss_fn_W(W + dW)))
            u_exact, u_relaxed = upper_bounds(A, B, G, loss0, float(eta), L, S)
            ue.append(float(u_exact))
            ur.append(float(u_relaxed))
        out[f"loss_{tag}"] = np.array(losses)
        out[f"U_exact_{tag}"] = np.array(ue)
        out[f"U_relaxed_{tag}"] = np.array(ur)
    return out


def bound_probe_values(task, method: str, lr: float, **hparams) -> dict:
    """The per-step bound probe on a single-layer task (see ``probes.BoundProbe``)."""
    if getattr(task, "loss_in_W", None) is None or len(task.pairs) != 1:
        raise ValueError(f"the bound probe needs a single-layer task with loss_in_W (mf, sensing, "
                         f"lowrank-regression); task {getattr(task, 'name', task)!r} has none")
    start = time.perf_counter()
    pair = task.pairs[0]
    A, B = pair.A.detach(), pair.B.detach()
    W0 = task.W0 if task.W0 is not None else torch.zeros(pair.shape, dtype=A.dtype, device=A.device)
    L, hvps, estimated = task.smoothness, 0, 0.0
    if L is None:
        L, hvps = estimate_smoothness(task.loss_in_W, W0 + pair.scaling * A @ B.T)
        estimated = 1.0
    res = bound_step(method, A, B, task.loss_in_W, lr, float(L), W0=W0, scaling=pair.scaling,
                     **hparams)
    return {"bound/loss": res["loss"], "bound/next_loss": res["next_loss"],
            "bound/U_exact": res["U_exact"], "bound/U_relaxed": res["U_relaxed"],
            "bound/slack_exact": res["U_exact"] - res["next_loss"], "bound/L": float(L),
            "bound/L_estimated": estimated, "bound/hvps": float(hvps),
            "bound/seconds": time.perf_counter() - start}
