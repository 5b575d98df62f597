r"""Tightness of the descent-lemma bounds of ``THEORY.md`` F8, with a smoothness that holds.

For a loss ``l`` of the (effective) product ``M = A B^T`` and one preconditioned step
``dW(S)`` (F2),

    l(M + dW(S)) <= U_exact(S) = l(M) + <G, dW(S)> + (L/2) ||dW(S)||_F^2 <= U_relaxed(S),

computed by :func:`reflora_analysis.theory.upper_bounds`. LoRA is ``S = I``, RefLoRA
``S = S*`` (F3), RefLoRA-S ``S = s* I`` (F7), and ``balance``, whose SGD step equals
RefLoRA's (``BASELINES.md`` section 5), ``S = S*``. The step ``dW`` itself is always the
method's own (``methods.single_step_update``; for the ``S``-family it equals ``dW(S)``), so
``next_loss`` is the loss the optimizer reaches; ``U_relaxed`` is defined only for the
``S``-family and is NaN for the others. With a LoRA scaling ``s`` (``W = W0 + s A B^T``),
everything is expressed for ``l~(M) = l(W0 + s M)``: ``G~ = s dl/dW`` and ``L~ = s^2 L``.

Which ``L``. The first inequality needs only the curvature *on the segment* of the step:
with ``phi(t) = l(W + t dW)``, ``l(W + dW) = l(W) + <G, dW> + int_0^1 (1 - t) phi''(t) dt``,
so it holds whenever ``L ||dW||^2 >= max_{0<=t<=1} phi''(t)``. When ``L`` is not given
(``L=None``) :func:`segment_smoothness` estimates it on that segment: the curvature at
``points`` equally spaced ``t`` in [0, 1] (both ends included), either along the step
(``curvature="directional"``: ``phi''(t) / ||dW||^2``, one Hessian-vector product per point,
the weakest ``L`` this step needs) or in every direction (``"hessian"``: the largest
algebraic eigenvalue of the Hessian in ``W`` at each point, scipy's ``eigsh`` on a
Hessian-vector-product ``LinearOperator``; exact ``L`` for quadratic losses), takes the
largest, clamps it at 0 and multiplies by ``1 + margin`` (default 0.1) for the curvature
between the points. Sampling is not a proof, so every result also counts its
**violations** (``next_loss > U_exact`` beyond round-off) and gives ``L_needed``, the
smallest ``L`` that makes this step's ``U_exact`` hold: ``L >= L_needed`` exactly when
there is no violation. The curvature at ``W`` alone (:func:`estimate_smoothness`) is a
local value approached from below, not a bound: on a quartic loss it let ``next_loss``
exceed ``U_exact`` (``tests/test_bounds_certified.py``).

Several LoRA layers (:func:`joint_bound_step`, real models): the optimizer moves every
layer at once, so F8 is applied to ``l`` as a function of the joint ``M = (M_1, ..., M_K)``
(aggregated, not per layer: a per-layer bound ignores the other layers' moves and the
cross-layer curvature): ``<G, dW> = sum_i <G_i, dW_i>``, ``||dW||^2 = sum_i ||dW_i||^2``,
one ``L`` for the joint segment, and ``U_relaxed = l + sum_i (U_relaxed_i - l)`` (F8b's
relaxation holds layer by layer, so the sum bounds the joint ``U_exact``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor, nn

from ..theory import optimal_preconditioner, scalar_preconditioner, upper_bounds, weight_update
from ._util import (_widened, canonical_method, evaluate_loss, gradient_in_W, loss_and_grad_in_W,
                    math_attention, preserved_state, substituted_parameters)
from .consistency import step_update

__all__ = ["preconditioner_for", "estimate_smoothness", "segment_smoothness", "hessian_operator",
           "top_curvature", "bound_step", "joint_bound_step", "bound_line_scan",
           "roundoff_tolerance", "CURVATURES"]

#: How :func:`segment_smoothness` measures the curvature at each point of the segment.
CURVATURES = ("directional", "hessian")
DEFAULT_POINTS, DEFAULT_MARGIN = 5, 0.1


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


def check_smoothness_options(curvature: str, points: int, margin: float) -> None:
    """``ValueError`` (one line) for an unknown ``curvature``, fewer than 2 ``points`` (the two
    ends of the segment) or a negative / non-finite ``margin``."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}; got {curvature!r}")
    if not isinstance(points, (int, np.integer)) or isinstance(points, bool) or points < 2:
        raise ValueError(f"points must be an integer >= 2 (both ends of the step), got {points!r}")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")


def roundoff_tolerance(loss: float, dtype: torch.dtype) -> float:
    """Allowance for round-off when comparing ``next_loss`` with a bound:
    ``rtol * max(1, |loss|)``, ``rtol = 1e-10`` in float64 and ``100 eps`` in other dtypes
    (``1.2e-5`` in float32: a transformer's loss recomputed through another but equal
    factorization moves by ~1e-6 relative)."""
    rtol = 1e-10 if dtype == torch.float64 else 100 * torch.finfo(dtype).eps
    return rtol * max(1.0, abs(float(loss)))


def hessian_operator(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor) -> LinearOperator:
    r"""``d^2 l / dW^2`` at ``W`` as a scipy ``LinearOperator`` on flat float64 vectors of
    length ``W.numel()`` (double backward through ``loss_fn_W``; each product recomputes the
    forward). ``op.hvps`` counts the products taken."""
    W = W.detach()

    def matvec(v):
        Wv = W.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn_W(Wv), Wv, create_graph=True)
            hv = None
            if g.requires_grad:  # else the loss is linear in W: zero Hessian
                (hv,) = torch.autograd.grad(g, Wv, allow_unused=True, grad_outputs=torch.as_tensor(
                    np.ravel(v)).to(W).view_as(W))
        op.hvps += 1
        hv = torch.zeros_like(W) if hv is None else hv
        return hv.detach().reshape(-1).to(torch.float64).cpu().numpy()

    op = LinearOperator((W.numel(), W.numel()), matvec=matvec, dtype=np.float64)
    op.hvps = 0
    return op


def top_curvature(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor, *, tol: float = 1e-8,
                  max_iter: int | None = None, seed: int = 0) -> tuple[float, int]:
    """``(lambda_max, hvps)``: the largest *algebraic* eigenvalue of the Hessian of ``loss_fn_W``
    at ``W`` (scipy ``eigsh(which="LA")``, relative accuracy ``tol``, start vector drawn from
    ``seed``; a dense ``eigvalsh`` below 3 unknowns, where ARPACK cannot run).
    ``RuntimeError`` if ARPACK does not converge in ``max_iter`` restarts."""
    op = hessian_operator(loss_fn_W, W)
    d = op.shape[0]
    if d < 3:
        H = np.column_stack([op.matvec(e) for e in np.eye(d)])
        return float(np.linalg.eigvalsh(0.5 * (H + H.T))[-1]), op.hvps
    v0 = np.random.default_rng(seed).standard_normal(d)
    try:
        value = eigsh(op, k=1, which="LA", tol=tol, v0=v0, maxiter=max_iter,
                      return_eigenvectors=False)[0]
    except ArpackNoConvergence as exc:
        raise RuntimeError(f"eigsh did not reach the top Hessian eigenvalue to tol {tol} in "
                           f"{op.hvps} Hessian-vector products") from exc
    return float(value), op.hvps


def estimate_smoothness(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor, *, tol: float = 1e-8,
                        max_iter: int | None = None, seed: int = 0) -> tuple[float, int]:
    r"""``(max(lambda_max(d^2 l / dW^2 at W), 0), hvps)``: the local curvature at ``W``.

    Exact smoothness constant for quadratic ``l``; otherwise a local value, **not** a bound:
    ``U_exact`` with it can lie below the next loss. For a bound that holds along a step
    use :func:`segment_smoothness` (what ``L=None`` does in :func:`bound_step`).
    """
    value, hvps = top_curvature(loss_fn_W, W, tol=tol, max_iter=max_iter, seed=seed)
    return max(value, 0.0), hvps


def segment_samples(phi: Callable[[Tensor], Tensor], ts: Sequence[float]) -> list[tuple]:
    """``[(phi(t), phi'(t), phi''(t))]`` at each ``t`` by double backward through the scalar
    ``t`` (float64; ``phi`` casts it as it needs). ``phi''`` costs one Hessian-vector product."""
    out = []
    for t in ts:
        tt = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            y = phi(tt)
            (d1,) = torch.autograd.grad(y, tt, create_graph=True, allow_unused=True)
            d1 = torch.zeros((), dtype=torch.float64) if d1 is None else d1
            d2 = torch.autograd.grad(d1, tt, allow_unused=True)[0] if d1.requires_grad else None
        out.append((float(y.detach()), float(d1.detach()), 0.0 if d2 is None else float(d2)))
    return out


def certified(values: Sequence[float], ts: Sequence[float], *, curvature: str, margin: float,
              hvps: int) -> dict:
    """The record of a segment estimate: ``L = (1 + margin) max(0, max(values))``, with
    ``L_sampled = max(values)`` and everything it came from."""
    sampled = float(max(values))
    return {"L": (1.0 + margin) * max(sampled, 0.0), "L_sampled": sampled, "source": "segment",
            "curvature": curvature, "points": [float(t) for t in ts],
            "values": [float(v) for v in values], "margin": float(margin), "hvps": int(hvps)}


def given_smoothness(L) -> dict:
    """The record of a smoothness constant passed in (``ValueError`` unless finite and >= 0)."""
    if not isinstance(L, (int, float)) or not math.isfinite(L) or L < 0:
        raise ValueError(f"L must be a finite number >= 0 or None (estimate it), got {L!r}")
    return {"L": float(L), "L_sampled": math.nan, "source": "given", "curvature": None,
            "points": [], "values": [], "margin": 0.0, "hvps": 0}


def segment_smoothness(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor, dW: Tensor, *,
                       curvature: str = "directional", points: int = DEFAULT_POINTS,
                       margin: float = DEFAULT_MARGIN, tol: float = 1e-8, seed: int = 0) -> dict:
    r"""A smoothness constant for the segment ``W -> W + dW`` (module docstring).

    At ``t_k = k / (points - 1)``, ``k = 0..points-1``: ``directional``: ``phi''(t_k) /
    ||dW||_F^2`` with ``phi(t) = l(W + t dW)`` (0 for ``dW = 0``); ``hessian``:
    ``lambda_max`` of the Hessian in ``W`` at ``W + t_k dW`` (:func:`top_curvature`).
    Returns ``{"L", "L_sampled", "source", "curvature", "points", "values", "margin",
    "hvps"}`` with ``L = (1 + margin) max(0, L_sampled)``. On a quadratic ``l``: ``hessian``
    gives ``L_sampled = lambda_max`` (to ``tol``), ``directional`` the Rayleigh quotient
    ``<dW, H dW> / ||dW||^2``.
    """
    check_smoothness_options(curvature, points, margin)
    W, dW = W.detach(), dW.detach()
    if dW.shape != W.shape:
        raise ValueError(f"dW must have W's shape {tuple(W.shape)}, got {tuple(dW.shape)}")
    ts = np.linspace(0.0, 1.0, points)
    if curvature == "hessian":
        found = [top_curvature(loss_fn_W, W + float(t) * dW, tol=tol, seed=seed) for t in ts]
        return certified([v for v, _ in found], ts, curvature=curvature, margin=margin,
                         hvps=sum(h for _, h in found))
    norm2 = float(dW.double().square().sum())
    if norm2 == 0.0:
        return certified([0.0] * points, ts, curvature=curvature, margin=margin, hvps=0)
    samples = segment_samples(lambda t: loss_fn_W(W + t.to(W.dtype) * dW), ts)
    return certified([d2 / norm2 for _, _, d2 in samples], ts, curvature=curvature,
                     margin=margin, hvps=points)


def needed_smoothness(loss: float, next_loss: float, first_order: float, norm2: float) -> float:
    """``2 (l(W + dW) - l(W) - <G, dW>) / ||dW||^2``: the smallest ``L`` for which this step's
    ``U_exact`` holds (NaN for a zero step)."""
    return 2.0 * (next_loss - loss - first_order) / norm2 if norm2 > 0 else math.nan


def _verdict(loss, next_loss, first, norm2, smooth, units, dtype) -> dict:
    """The common part of a bound result, in the variable of ``first`` and ``norm2`` (``M``;
    ``units = s^2`` converts ``L`` from ``W`` to it): ``U_exact`` (F8a), the violation, its
    tolerance, and ``L_needed`` with ``L_needed_roundoff``, the change of ``L_needed`` that a
    next loss off by the tolerance makes: no violation exactly when ``L_needed <= L +
    L_needed_roundoff``."""
    U_exact = loss + first + 0.5 * units * smooth["L"] * norm2
    tol = roundoff_tolerance(loss, dtype)
    scaled = units * norm2
    return {"loss": loss, "next_loss": next_loss, "U_exact": U_exact,
            "update_norm": math.sqrt(norm2), "L": smooth["L"], "smoothness": smooth,
            "violations": int(next_loss > U_exact + tol), "violation_tol": tol,
            "L_needed": needed_smoothness(loss, next_loss, first, scaled),
            "L_needed_roundoff": 2.0 * tol / scaled if scaled > 0 else math.nan}


def bound_step(method: str, A: Tensor, B: Tensor, loss_fn_W: Callable[[Tensor], Tensor],
               lr: float, L: float | None = None, *, W0: Tensor | None = None,
               scaling: float = 1.0, curvature: str = "directional",
               points: int = DEFAULT_POINTS, margin: float = DEFAULT_MARGIN, seed: int = 0,
               **hparams) -> dict:
    r"""Actual next loss and the F8 bounds for one SGD step of ``method`` at ``(A, B)``.

    ``W = W0 + scaling * A B^T``; ``loss_fn_W`` maps a full ``W`` (m x n) to a scalar; ``L``
    is its smoothness constant in ``W``, or ``None``: estimated on the step's segment by
    :func:`segment_smoothness` (``curvature``, ``points``, ``margin``, ``seed``). Returns
    floats ``loss``, ``next_loss = l(W + scaling dW)``, ``U_exact``, ``U_relaxed`` (NaN
    outside the S-family), ``update_norm = ||dW||_F``, ``L`` (in ``W``), ``L_needed`` (the
    smallest ``L`` for which ``U_exact`` holds), ``violations`` (1 if ``next_loss >
    U_exact + violation_tol``, else 0; equivalently ``L_needed > L + L_needed_roundoff``) and
    ``smoothness`` (how ``L`` was obtained).
    """
    method = canonical_method(method)
    A, B = A.detach(), B.detach()
    W0 = torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype, device=A.device) if W0 is None else W0
    W = W0 + scaling * (A @ B.T)
    loss, G_W = loss_and_grad_in_W(loss_fn_W, W)
    G = scaling * G_W
    # the method's actual step; for the S-family it equals weight_update(A, B, G, lr, S) (F2)
    dW = step_update(method, A, B, G, lr, **hparams)
    smooth = (given_smoothness(L) if L is not None else segment_smoothness(
        loss_fn_W, W, scaling * dW, curvature=curvature, points=points, margin=margin, seed=seed))
    L_eff = scaling**2 * smooth["L"]
    with torch.no_grad():
        next_loss = float(loss_fn_W(W + scaling * dW))
    first, norm2 = float((G * dW).sum()), float(dW.square().sum())
    out = _verdict(loss, next_loss, first, norm2, smooth, scaling**2, W.dtype)
    S = preconditioner_for(method, A, B, damping=float(hparams.get("damping", 0.0)))
    out["U_relaxed"] = (math.nan if S is None else
                        float(upper_bounds(A, B, G, loss, lr, L_eff, S)[1]))
    return out


def _low_rank(dM: Tensor, rank: int, seed: int, roundoff: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(U, V)`` with ``U V^T = dM`` (m x k, n x k) for a ``dM`` of rank <= ``rank``: a
    randomized range finder with 4 extra columns (exact up to round-off; a factor step
    ``A+ B+^T - A B^T`` has rank <= 2r). ``ValueError`` if ``dM`` has a larger rank."""
    m, n = dM.shape
    k = rank + 4
    if k >= min(m, n):
        eye = torch.eye(n, dtype=dM.dtype, device=dM.device)
        return dM, eye
    omega = torch.randn(n, k, dtype=dM.dtype, device=dM.device,
                        generator=torch.Generator(device=dM.device).manual_seed(seed))
    Q = torch.linalg.qr(dM @ omega).Q
    U, V = Q, dM.T @ Q
    scale = float(torch.linalg.matrix_norm(dM))
    # dM = A+ B+^T - A B^T carries full-rank round-off of size eps ||A|| ||B|| (``roundoff``):
    # a tiny step (e.g. from a degenerate start) is all round-off and still a factor step
    if float(torch.linalg.matrix_norm(dM - U @ V.T)) > 1e-8 * scale + roundoff:
        raise ValueError(f"the step of a layer has rank > {rank}; expected a factor step")
    return U, V


def _segment_loss(model: nn.Module, loss_closure, pairs, steps: Sequence[Tensor], seed: int):
    """``phi(t) = l(M + t dM)`` jointly over every pair: each pair's factors are replaced by
    ``[A, t U]`` and ``[B, V]`` with ``U V^T = dM`` (:func:`_low_rank`), so the adapter
    computes ``s (A B^T + t dM)``; the parameters themselves are never touched."""
    factors = []
    for p, dM in zip(pairs, steps):
        A, B = p.A.detach().double(), p.B.detach().double()
        roundoff = 64 * torch.finfo(torch.float64).eps * float(A.norm() * B.norm() + dM.norm())
        U, V = _low_rank(dM, 2 * p.rank, seed, roundoff)
        factors.append((U.to(p.a.dtype), V.to(p.a.dtype)))

    def phi(t: Tensor) -> Tensor:
        swap = {}
        for p, (U, V) in zip(pairs, factors):
            swap[id(p.a)], swap[id(p.b)] = _widened(p, t.to(U.dtype) * U, V)
        with substituted_parameters(model, swap), math_attention():
            return evaluate_loss(loss_closure)
    return phi


def _pair_terms(pair, G: Tensor, method: str, lr: float, hparams: dict) -> dict:
    """One layer's factors and ``G`` (float64), its step ``dM``, ``<G, dM>`` and ``||dM||^2``."""
    A, B, G = (t.detach().to(torch.float64) for t in (pair.A, pair.B, G))
    dM = step_update(method, A, B, G, lr, **hparams)
    return {"A": A, "B": B, "G": G, "dM": dM, "first": float((G * dM).sum()),
            "norm2": float(dM.square().sum())}


def _relaxed_sum(terms, method: str, lr: float, L: float, hparams: dict) -> float:
    """``sum_i (U_relaxed_i - l)`` over the layers (F8b with the joint ``L``; NaN outside
    the S-family)."""
    total = 0.0
    for t in terms:
        S = preconditioner_for(method, t["A"], t["B"], damping=float(hparams.get("damping", 0.0)))
        if S is None:
            return math.nan
        total += float(upper_bounds(t["A"], t["B"], t["G"], 0.0, lr, L, S)[1])
    return total


def joint_bound_step(model: nn.Module, loss_closure, pairs, method: str, lr: float,
                     L: float | None = None, *, points: int = DEFAULT_POINTS,
                     margin: float = DEFAULT_MARGIN, seed: int = 0, relaxed: bool = True,
                     **hparams) -> dict:
    r"""F8 for one SGD step of ``method`` on every LoRA pair of ``model`` at once.

    Aggregated over the layers (module docstring): ``G_i = s_i dl/dW_i``
    (:func:`gradient_in_W`), ``dM_i`` each pair's step, ``loss = phi(0)`` and ``next_loss =
    phi(1)`` with ``phi(t) = l(M + t dM)`` (the loss of ``loss_closure`` with every factor
    replaced, in eval mode: no dropout), ``U_exact = loss + sum_i <G_i, dM_i> + (L/2)
    sum_i ||dM_i||^2``. ``L`` (in the joint ``M``) or ``None``: the directional curvature on
    the joint segment (``points``, ``margin``; a Hessian in the joint ``W`` of a real model
    is too large for ``eigsh``). Returns the keys of :func:`bound_step` and ``layers``;
    ``relaxed=False`` skips ``U_relaxed`` (NaN); it is cheap (its norms come from ``r x r``
    cores, :func:`~reflora_analysis.theory.upper_bounds`), a small part of the probe's cost.
    A classifier head trained beside LoRA stays where it is: the bound concerns the LoRA step.
    """
    method = canonical_method(method)
    check_smoothness_options("directional", points, margin)
    pairs = list(pairs)
    with preserved_state(model, [t for p in pairs for t in p.params]):
        model.eval()
        G_list = gradient_in_W(model, loss_closure, pairs)
        terms = [_pair_terms(p, G, method, lr, hparams) for p, G in zip(pairs, G_list)]
        phi = _segment_loss(model, loss_closure, pairs, [t["dM"] for t in terms], seed)
        first, norm2 = sum(t["first"] for t in terms), sum(t["norm2"] for t in terms)
        ts = np.linspace(0.0, 1.0, points)
        if L is None:
            samples = segment_samples(phi, ts)
            values = [d2 / norm2 if norm2 > 0 else 0.0 for _, _, d2 in samples]
            smooth = certified(values, ts, curvature="directional", margin=margin, hvps=points)
            loss, next_loss = samples[0][0], samples[-1][0]
        else:
            smooth = given_smoothness(L)
            with torch.no_grad():
                loss, next_loss = (float(phi(torch.tensor(t, dtype=torch.float64)))
                                   for t in (0.0, 1.0))
    out = _verdict(loss, next_loss, first, norm2, smooth, 1.0, pairs[0].a.dtype)
    out["U_relaxed"] = (loss + _relaxed_sum(terms, method, lr, smooth["L"], hparams)
                        if relaxed else math.nan)
    out["layers"] = len(pairs)
    return out


def _scan_smoothness(loss_fn_W, W, steps: Sequence[Tensor], L, options: dict) -> dict:
    """One ``L`` for every step of a line scan at one eta: the given one, or the largest
    segment estimate over the steps (so LoRA and RefLoRA share it, as F8b's comparison needs)."""
    if L is not None:
        return given_smoothness(L)
    found = [segment_smoothness(loss_fn_W, W, dW, **options) for dW in steps]
    return max(found, key=lambda s: s["L"])


def bound_line_scan(A: Tensor, B: Tensor, G: Tensor, loss_fn_W: Callable[[Tensor], Tensor],
                    L: float | None, etas: Sequence[float], W0: Tensor | None = None, *,
                    curvature: str = "directional", points: int = DEFAULT_POINTS,
                    margin: float = DEFAULT_MARGIN, seed: int = 0) -> dict:
    r"""``l(W + dW(eta))``, ``U_exact`` and ``U_relaxed`` over step sizes, for LoRA and RefLoRA.

    ``W = W0 + A B^T`` (``W0 = 0`` by default), ``G`` the gradient of ``loss_fn_W`` at ``W``
    (paper orientation m x n), ``L`` its smoothness constant or ``None``: then at each
    ``eta`` the larger of the two steps' :func:`segment_smoothness` (``curvature``,
    ``points``, ``margin``, ``seed``), shared by LoRA and RefLoRA. For each ``eta`` and
    ``S in {I, S*}``: ``dW = dW(S)`` (F2), the actual loss and both bounds (F8): the data
    behind the paper's upper-bound figure (loss and bound against eta at one iterate).

    Returns float64 numpy arrays of shape ``(len(etas),)``: ``eta``, ``L``, ``loss_lora``,
    ``U_exact_lora``, ``U_relaxed_lora``, the same with ``_reflora``; the scalar ``loss0 =
    l(W)``; ``violations_lora`` / ``violations_reflora`` (etas with ``loss > U_exact`` beyond
    round-off) and ``smoothness`` (the record of each eta's ``L``).
    """
    etas = np.asarray(list(etas), dtype=np.float64)
    if etas.ndim != 1 or etas.size == 0 or not np.all(np.isfinite(etas)):
        raise ValueError("etas must be a non-empty 1-D sequence of finite step sizes")
    A, B, G = A.detach(), B.detach(), G.detach()
    if G.shape != (A.shape[0], B.shape[0]):
        raise ValueError(f"G must be m x n = {(A.shape[0], B.shape[0])}, got {tuple(G.shape)}")
    options = dict(curvature=curvature, points=points, margin=margin, seed=seed)
    if L is None:
        check_smoothness_options(curvature, points, margin)
    W = (torch.zeros_like(G) if W0 is None else W0) + A @ B.T
    with torch.no_grad():
        loss0 = float(loss_fn_W(W))
    precond = {"lora": torch.eye(A.shape[1], dtype=A.dtype, device=A.device),
               "reflora": optimal_preconditioner(A, B)}
    cols = {f"{k}_{tag}": [] for tag in precond for k in ("loss", "U_exact", "U_relaxed")}
    records = []
    for eta in etas:
        steps = {tag: weight_update(A, B, G, float(eta), S) for tag, S in precond.items()}
        smooth = _scan_smoothness(loss_fn_W, W, list(steps.values()), L, options)
        records.append(smooth)
        for tag, S in precond.items():
            with torch.no_grad():
                cols[f"loss_{tag}"].append(float(loss_fn_W(W + steps[tag])))
            u_exact, u_relaxed = upper_bounds(A, B, G, loss0, float(eta), smooth["L"], S)
            cols[f"U_exact_{tag}"].append(float(u_exact))
            cols[f"U_relaxed_{tag}"].append(float(u_relaxed))
    out = {"eta": etas, "loss0": loss0, "L": np.array([s["L"] for s in records]),
           "smoothness": records, **{k: np.array(v) for k, v in cols.items()}}
    tol = roundoff_tolerance(loss0, W.dtype)
    for tag in precond:
        out[f"violations_{tag}"] = int(np.sum(out[f"loss_{tag}"] > out[f"U_exact_{tag}"] + tol))
    return out


def _flatten(res: dict) -> dict:
    """The probe's ``bound/<key>`` floats from a :func:`bound_step` result."""
    smooth = res["smoothness"]
    out = {f"bound/{k}": float(res[k]) for k in ("loss", "next_loss", "U_exact", "U_relaxed",
                                                 "L", "L_needed", "L_needed_roundoff", "violations",
                                                 "violation_tol")}
    out["bound/slack_exact"] = res["U_exact"] - res["next_loss"]
    out["bound/L_estimated"] = float(smooth["source"] == "segment")
    out["bound/L_sampled"] = smooth["L_sampled"]
    out["bound/L_margin"] = smooth["margin"]
    out["bound/L_points"] = float(len(smooth["points"]))
    out["bound/L_hessian"] = float(smooth["curvature"] == "hessian")
    out["bound/hvps"] = float(smooth["hvps"])
    out["bound/layers"] = float(res.get("layers", 1))
    return out


def single_layer(task) -> bool:
    """Whether ``task`` is a single-layer task with ``loss_in_W`` (mf, sensing, ...)."""
    return getattr(task, "loss_in_W", None) is not None and len(task.pairs) == 1


def bound_probe_values(task, method: str, lr: float, *, loss_closure=None,
                       curvature: str = "directional", points: int = DEFAULT_POINTS,
                       margin: float = DEFAULT_MARGIN, seed: int = 0,
                       relaxed: bool | None = None, **hparams) -> dict:
    """The per-step bound probe (see ``probes.BoundProbe``): :func:`bound_step` on a
    single-layer task (its known ``task.smoothness`` if any, else estimated), else
    :func:`joint_bound_step` on ``task.model`` with ``loss_closure`` (directional only;
    ``U_relaxed`` there unless ``relaxed=False``: ``None``, the default, means on)."""
    start = time.perf_counter()
    options = dict(points=points, margin=margin, seed=seed)
    if single_layer(task):
        pair = task.pairs[0]
        A, B = pair.A.detach(), pair.B.detach()
        W0 = task.W0 if task.W0 is not None else torch.zeros(pair.shape, dtype=A.dtype,
                                                             device=A.device)
        L = getattr(task, "smoothness", None)
        res = bound_step(method, A, B, task.loss_in_W, lr, None if L is None else float(L),
                         W0=W0, scaling=pair.scaling, curvature=curvature, **options, **hparams)
    else:
        if curvature != "directional":
            raise ValueError(f"curvature {curvature!r} needs a single-layer task with loss_in_W; "
                             "on a model only 'directional' is available")
        if loss_closure is None:
            raise ValueError("a task without loss_in_W needs loss_closure (the step's batch loss)")
        res = joint_bound_step(task.model, loss_closure, task.pairs, method, lr, **options,
                               relaxed=relaxed is None or bool(relaxed), **hparams)
    out = _flatten(res)
    out["bound/seconds"] = time.perf_counter() - start
    return out
