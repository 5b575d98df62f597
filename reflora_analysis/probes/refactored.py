r"""Sharpness at the refactored (balanced) factorization of the current ``W`` (THEORY.md F4, F9).

The paper's flatness claim is about the refactored factors, which RefLoRA never stores (it
preconditions the gradient of the stored ones, F1). Among all factorizations
``(A P, B P^{-T})`` of one product, the balanced one (``P P^T = S*``, F3; then
``(AP)^T (AP) = (B P^{-T})^T (B P^{-T})``, F4) is the flattest at a minimiser of the
matrix-factorization loss (F9: ``lambda_max = sigma_max(A)^2 + sigma_max(B)^2 >=
2 sigma_1(M)``, with equality exactly when balanced). This view measures the top Hessian
eigenvalue w.r.t. the LoRA factors *at the balanced factorization of the current W*, for any
method, so a figure can put it beside the value at the stored factors:

1. per LoRA pair, ``(A', B') = (A P, B P^{-T})`` with ``P = S*^{1/2}``
   (:func:`reflora_analysis.theory.refactor_balanced`, float64), laid out as the pair stores
   its factors (PEFT keeps ``B^T``) in the parameter's dtype;
2. the model computes with those tensors in place of its factor parameters
   (:func:`~._util.substituted_parameters`): the parameters themselves are never written, so
   they, their ``.grad`` and any live autograd graph through them are untouched;
3. Lanczos on Hessian-vector products w.r.t. the substitutes
   (:func:`~.sharpness.top_hessian_eigenvalue`), optionally the Hutch++ trace.

Balanced factors are unique up to an orthogonal ``Q`` (``(A'Q, B'Q)``), which leaves the
Hessian's spectrum unchanged, so the value does not depend on which balanced pair is taken
(an SVD split gives the same). ``W = W0 + s A B^T`` is unchanged by construction
(``info["product_error"]`` measures it). A rank-deficient pair (PEFT's zero start: ``A = 0``)
has no balanced factorization in ``GL(r)``; it gets the F10 damping (the factors then tend
to the balanced limit ``(0, 0)`` of a zero product) and is counted in
``info["degenerate_layers"]``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import theory
from ..pairs import LoraPair, find_lora_pairs
from . import Probe, ProbeContext
from ._util import LossClosure, substituted_parameters
from .sharpness import hessian_trace, top_hessian_eigenvalue

__all__ = ["balanced_pair", "balanced_substitutes", "sharpness_at_balanced_factors",
           "trace_interval", "BalancedSharpnessProbe"]

F64 = torch.float64


def balanced_pair(pair: LoraPair, damping: float = 0.0) -> dict:
    r"""The balanced factorization of one pair's product, in float64 paper orientation.

    ``A'`` (m x r) ``= A P``, ``B'`` (n x r) ``= B P^{-1}``, ``P = S*^{1/2}`` (F3, F4), so
    ``A' B'^T = A B^T`` and ``A'^T A' = B'^T B'``. Returns ``{"A", "B", "degenerate",
    "gap_before", "gap_after"}``: ``degenerate`` is True where a Gram was numerically singular
    and got the F10 damping (then ``gap_after`` need not be 0); the gaps are
    :func:`~reflora_analysis.theory.balance_gap` of the stored and the balanced factors.
    """
    A = pair.A.detach().to(F64)
    B = pair.B.detach().to(F64)
    _, _, singular = theory.geometric_mean_and_inverse(theory.gram(A), theory.gram(B),
                                                       damping=damping, warn=False)
    with warnings.catch_warnings():  # the mask above reports it, per layer
        warnings.simplefilter("ignore", theory.DegenerateGramWarning)
        A_bal, B_bal = theory.refactor_balanced(A, B, damping=damping)
    return {"A": A_bal, "B": B_bal, "degenerate": bool(singular),
            "gap_before": float(theory.balance_gap(A, B)),
            "gap_after": float(theory.balance_gap(A_bal, B_bal))}


def _stored_layout(pair: LoraPair, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` as the pair stores them (``b = B^T`` when ``b_transposed``), fresh leaves in
    the parameters' dtype and device that require grad (the Hessian's variables)."""
    a = A.to(pair.a.device, pair.a.dtype)
    b = (B.T if pair.b_transposed else B).to(pair.b.device, pair.b.dtype)
    return a.contiguous().requires_grad_(True), b.contiguous().requires_grad_(True)


def _product_error(pair: LoraPair, a: Tensor, b: Tensor) -> float:
    r"""``||A' B'^T - A B^T||_F / (||A||_F ||B||_F)`` with the tensors the model will see:
    the round-off of the refactoring relative to its natural scale (0 when A or B is 0)."""
    A, B = pair.A.detach().to(F64), pair.B.detach().to(F64)
    A2 = a.detach().to(F64)
    B2 = (b.detach().T if pair.b_transposed else b.detach()).to(F64)
    scale = float(A.norm() * B.norm())
    err = float((A2 @ B2.T - A @ B.T).norm())
    return err / scale if scale > 0 else err


@contextlib.contextmanager
def balanced_substitutes(model: nn.Module, pairs: Sequence[LoraPair],
                         damping: float = 0.0) -> Iterator[tuple[list[Tensor], dict]]:
    """Inside the block ``model`` computes with every pair's balanced factors.

    Yields ``(variables, info)``: the substitute tensors (``[a'_1, b'_1, a'_2, ...]``, leaves
    requiring grad, the pairs' storage layout) and ``{"layers", "degenerate_layers",
    "product_error" (max over layers), "gap_before", "gap_after" (max over layers)}``. The
    original parameters are put back on exit and were never written. ``ValueError`` when a
    pair's factors are not parameters of ``model`` (nothing to substitute them in).
    """
    held = {id(p) for p in model.parameters()}
    for pr in pairs:
        if id(pr.a) not in held or id(pr.b) not in held:
            raise ValueError(f"the factors of LoRA pair {pr.name} are not parameters of the "
                             f"{type(model).__name__} given; pass the model that holds them")
    replacements, variables, layers = {}, [], []
    for pr in pairs:
        bal = balanced_pair(pr, damping=damping)
        a, b = _stored_layout(pr, bal["A"], bal["B"])
        replacements[id(pr.a)], replacements[id(pr.b)] = a, b
        variables += [a, b]
        layers.append({**bal, "product_error": _product_error(pr, a, b)})
    info = {"layers": len(layers),
            "degenerate_layers": sum(lay["degenerate"] for lay in layers),
            "product_error": max(lay["product_error"] for lay in layers),
            "gap_before": max(lay["gap_before"] for lay in layers),
            "gap_after": max(lay["gap_after"] for lay in layers)}
    with substituted_parameters(model, replacements):
        yield variables, info


def trace_interval(estimate: float, stderr: float, info: dict | None, n_samples: int,
                   method: str = "hutch++", confidence: float = 0.95) -> dict:
    r"""A confidence interval for a Hessian trace estimate: ``{"low", "high", "confidence",
    "source"}``.

    When ``info`` (the dict of :func:`~.sharpness.hessian_trace` with ``return_info=True``)
    carries ``ci_low``/``ci_high`` (and ``confidence``), those are returned
    (``source = "hessian_trace"``). Otherwise a Student t interval
    ``estimate +- t_{1-a/2, k-1} stderr`` over the ``k`` random samples behind the standard
    error (``source = "t-interval"``): ``k = n_samples`` for Hutchinson, and for Hutch++
    (``s`` sketch, ``s`` exact, the rest Hutchinson, ``s = min(n // 3, (n - 2) // 2)`` as
    :func:`~.sharpness.hessian_trace` splits them) ``k = n - 2 s``. With ``k < 2`` or an
    infinite standard error (no spread to estimate) the interval is infinite.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if info and "ci_low" in info and "ci_high" in info:
        return {"low": float(info["ci_low"]), "high": float(info["ci_high"]),
                "confidence": float(info.get("confidence", confidence)), "source": "hessian_trace"}
    from scipy import stats
    k = n_samples - 2 * max(0, min(n_samples // 3, (n_samples - 2) // 2)) \
        if method == "hutch++" else n_samples
    if k < 2 or not math.isfinite(stderr):
        return {"low": -math.inf, "high": math.inf, "confidence": confidence,
                "source": "t-interval"}
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * stderr
    return {"low": estimate - half, "high": estimate + half, "confidence": confidence,
            "source": "t-interval"}


def sharpness_at_balanced_factors(model: nn.Module, loss_closure: LossClosure, pairs=None, *,
                                  tol: float = 1e-3, max_iter: int | None = None, seed: int = 0,
                                  trace_samples: int = 0, damping: float = 0.0,
                                  progress: bool = False, return_info: bool = False):
    r"""``lambda_max`` of the Hessian w.r.t. the LoRA factors, at the balanced factorization
    of the current ``W`` (module docstring; F4, F9).

    Parameters
    ----------
    model : nn.Module
        Holds the pairs' factors as parameters; never modified.
    loss_closure : callable () -> scalar tensor
        Recomputes the loss with ``model`` (once per Hessian-vector product).
    pairs : LoRA pairs (anything :func:`~reflora_analysis.pairs.find_lora_pairs` takes)
        Default: every LoRA pair of ``model``. The Hessian is taken w.r.t. their factors only
        (a trainable head is held constant), as :class:`SharpnessProbe` does.
    tol, max_iter, seed, progress
        As :func:`~.sharpness.top_hessian_eigenvalue` (Lanczos, relative residual ``tol``).
    trace_samples : int
        Hutch++ samples for the trace at the balanced factors (0: none).
    damping : float
        Relative damping of the Grams (F10); 0 damps only numerically singular ones.

    Returns
    -------
    ``lambda_max`` (float), and with ``return_info`` a dict: ``residual``, ``converged``,
    ``hvps``, ``layers``, ``degenerate_layers``, ``product_error`` (max over layers of
    ``||A'B'^T - AB^T||_F / (||A|| ||B||)``), ``gap_before``, ``gap_after`` (max balance gap
    of the stored and the balanced factors), ``seconds``; with ``trace_samples``: ``trace``,
    ``trace_se``, ``trace_ci_low``, ``trace_ci_high``, ``trace_confidence``
    (:func:`trace_interval`).
    """
    pairs = find_lora_pairs(model if pairs is None else pairs)
    start = time.perf_counter()
    with balanced_substitutes(model, pairs, damping=damping) as (variables, info):
        value, lanczos = top_hessian_eigenvalue(model, loss_closure, tol=tol, max_iter=max_iter,
                                                seed=seed, params=variables, return_info=True,
                                                progress=progress)
        info.update(residual=lanczos["residual"], converged=bool(lanczos["converged"]),
                    hvps=lanczos["hvps"])
        if trace_samples:
            tr, se, tinfo = hessian_trace(model, loss_closure, n_samples=trace_samples, seed=seed,
                                          params=variables, return_info=True, progress=progress)
            ci = trace_interval(tr, se, tinfo, trace_samples)
            info.update(trace=tr, trace_se=se, trace_ci_low=ci["low"], trace_ci_high=ci["high"],
                        trace_confidence=ci["confidence"], hvps=info["hvps"] + tinfo["hvps"])
    info["seconds"] = time.perf_counter() - start
    return (value, info) if return_info else value


class BalancedSharpnessProbe(Probe):
    """``sharpness_balanced/lambda_max`` at the balanced factorization of the current ``W``
    (:func:`sharpness_at_balanced_factors`) with ``residual``, ``converged``, ``hvps``,
    ``degenerate_layers``, ``product_error``, ``gap_before`` and, with ``trace_samples``,
    ``trace``, ``trace_se``, ``trace_ci_low``, ``trace_ci_high``. Same batch as the other
    probes of the step (``ctx.loss_closure()``)."""

    name = "sharpness_balanced"

    def __init__(self, tol: float = 1e-3, max_iter: int | None = None, trace_samples: int = 0,
                 seed: int = 0, damping: float = 0.0):
        self.tol, self.max_iter, self.trace_samples = tol, max_iter, trace_samples
        self.seed, self.damping = seed, damping

    def requirements(self, task):
        why = super().requirements(task)
        if why:
            return why
        if not isinstance(getattr(task, "model", None), nn.Module):
            return "it needs task.model (an nn.Module) holding the LoRA factors"
        return None

    def measure(self, ctx: ProbeContext) -> dict[str, float]:
        value, info = sharpness_at_balanced_factors(
            ctx.task.model, ctx.loss_closure(), ctx.task.pairs, tol=self.tol,
            max_iter=self.max_iter, seed=self.seed, trace_samples=self.trace_samples,
            damping=self.damping, progress=ctx.progress, return_info=True)
        keys = ("residual", "converged", "hvps", "degenerate_layers", "product_error",
                "gap_before", "trace", "trace_se", "trace_ci_low", "trace_ci_high")
        out = {f"{self.name}/{k}": float(info[k]) for k in keys if k in info}
        out[f"{self.name}/lambda_max"] = value
        return out
