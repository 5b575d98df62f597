r"""Sharpness of the loss with respect to the trainable (LoRA) parameters.

The Hessian ``H = d^2 l / d theta^2`` over the parameters of ``model`` that require grad
(for a PEFT model: the LoRA factors, plus any trainable head), or over the ``params`` given
(``probes.SharpnessProbe`` passes the LoRA factors, ``THEORY.md`` section 5), is accessed
only through Hessian-vector products (double backward, forward recomputed per product, math
attention backend, eval mode), wrapped as a ``scipy.sparse.linalg.LinearOperator``.

* :func:`top_hessian_eigenvalue` -- the largest *algebraic* eigenvalue(s) ``lambda_max(H)``
  by scipy's ``eigsh`` (ARPACK Lanczos) or ``lobpcg`` (block, for repeated eigenvalues), with a
  residual per eigenpair (:mod:`.hessian_spectrum`), or by PyHessian 0.1's power iteration on
  the shifted ``H + c I`` (it finds the largest *magnitude* otherwise).
* :func:`hessian_trace` -- ``tr H`` by Hutch++ (Meyer, Musco, Musco, Woodruff 2021) or
  Hutchinson, with a standard error and a Student t confidence interval (:mod:`.trace`).
* :func:`per_layer_sharpness` -- both per LoRA pair (the Hessian block of its two factors).
* :func:`eigenvalue_density` -- the spectral density by stochastic Lanczos quadrature
  (Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019), Gaussian-broadened.

Known answer (``THEORY.md`` F9): for ``f(A, B) = 1/2 ||A B^T - Y||_F^2`` at a minimiser
(``A B^T = Y`` of rank r) the Hessian is ``J^T J`` with ``J(dA, dB) = dA B^T + A dB^T`` and
``lambda_max = sigma_max(A)^2 + sigma_max(B)^2`` (``2 sigma_1(Y)`` when balanced). At the
balanced minimiser its eigenvalues are ``sigma_i + sigma_j`` (``i, j <= r``; each ``i != j``
twice) and ``sigma_i`` (multiplicity ``m + n - 2r``): ``sigma = (5, 3)`` gives ``[10, 8, 8, 6,
5, ...]``, a repeated eigenvalue.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor, nn

from ._util import (HessianOperator, LossClosure, SymmetricTorchOperator, evaluate_loss,
                    math_attention, preserved_state, progress_bar, trainable_parameters)
from .hessian_spectrum import RECORD_BYTES, check_positive_int, default_budget, top_eigenpairs
from .trace import TRACE_METHODS, rademacher, trace_estimate

__all__ = ["lanczos_top_eigenvalues", "top_hessian_eigenvalue", "hessian_trace",
           "per_layer_sharpness", "eigenvalue_density", "METHODS"]

#: ``method`` of :func:`top_hessian_eigenvalue`: ``"lanczos"`` and ``"eigsh"`` are the same
#: (scipy ``eigsh``, ARPACK's implicitly restarted Lanczos); ``"auto"`` is ``eigsh`` for
#: ``k = 1`` and the block ``lobpcg`` for ``k > 1``.
METHODS = ("auto", "lanczos", "eigsh", "lobpcg", "pyhessian")

_check_positive_int = check_positive_int
_rademacher = rademacher


def _tridiagonal_eigh(alphas, betas):
    """Eigenpairs (ascending) of the symmetric tridiagonal T (diagonal alphas, off-diagonal
    betas), by LAPACK's tridiagonal solver (for the SLQ quadrature of :func:`eigenvalue_density`)."""
    if len(alphas) == 1:
        return np.array(alphas, dtype=np.float64), np.ones((1, 1))
    return eigh_tridiagonal(np.asarray(alphas, dtype=np.float64),
                            np.asarray(betas[: len(alphas) - 1], dtype=np.float64))


def _solver_operator(matvec, dim: int, k: int, max_iter, device=None) -> SymmetricTorchOperator:
    """The LinearOperator a solve runs on: at most ``max_iter`` products in all (default
    :func:`~.hessian_spectrum.default_budget`), recording them for free residuals; when the
    records may not fit in ``RECORD_BYTES``, ``k`` products are kept back for the residuals."""
    budget = default_budget(dim, k) if max_iter is None else int(max_iter)
    check_positive_int("max_iter", budget, minimum=1)
    if 16 * dim * budget > RECORD_BYTES:
        if budget <= k:
            raise ValueError(f"max_iter={budget} leaves no product for the solver after the "
                             f"{k} residual products (the problem is too large to record)")
        budget -= k
    return SymmetricTorchOperator(matvec, dim, device, budget=budget, record_bytes=RECORD_BYTES)


def lanczos_top_eigenvalues(matvec, dim: int, *, k: int = 1, tol: float = 1e-3,
                            max_iter: int | None = None, seed: int = 0, device=None,
                            callback=None, solver: str = "eigsh") -> dict:
    r"""Largest ``k`` algebraic eigenvalues of a symmetric operator, by scipy.

    ``matvec``: float64 torch vector ``(dim,)`` -> ``(dim,)``. ``solver="eigsh"`` (ARPACK's
    implicitly restarted Lanczos, ``which="LA"``) or ``"lobpcg"`` (a block of ``k`` vectors:
    finds repeated eigenvalues, see :mod:`.hessian_spectrum`). Stops when every Ritz pair has
    ``||H v_i - theta_i v_i|| <= tol |theta_i|`` (which bounds the relative error; the true
    error is usually far smaller, ``<= residual^2 / gap``) or after ``max_iter`` products
    (default ``max(300, 20 k)``), returning its best estimate
    with ``converged = False``. ``callback(products, values, residuals)`` is called once at
    the end.

    Returns dict with ``values`` (descending, list of k floats), ``residuals``, ``hvps``,
    ``converged``, ``iterations`` (= ``hvps``), ``solver``, ``block``.
    """
    check_positive_int("k", k)
    if not (isinstance(tol, (float, int)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    op = _solver_operator(matvec, int(dim), k, max_iter, device)
    info = top_eigenpairs(op, k, tol=float(tol), solver=solver, seed=seed)
    if callback is not None:
        callback(info["hvps"], info["values"], info["residuals"])
    return info


def _variables(model: nn.Module, params) -> list[Tensor]:
    """The Hessian's variables: ``params`` (validated, duplicates dropped) or, when ``None``,
    every parameter of ``model`` that requires grad."""
    if params is None:
        return trainable_parameters(model)
    if isinstance(params, Tensor):
        raise TypeError("params must be a sequence of tensors, not a single tensor")
    out, seen = [], set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad; the "
                             "Hessian needs differentiable parameters")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("params is empty; nothing to probe")
    return out


@contextlib.contextmanager
def _probing(model: nn.Module, params: Sequence[Tensor]):
    """Eval mode (dropout makes HVPs random), only ``params`` requiring grad (the other
    trainable parameters, e.g. a classifier head, are constants of the Hessian), and exact
    restoration of everything after."""
    with preserved_state(model, params):
        model.eval()
        chosen = {id(p) for p in params}
        for p in model.parameters():
            if id(p) not in chosen:
                p.requires_grad_(False)
        yield


class _ClosureAsModel(nn.Module):
    """Adapter for PyHessian's ``criterion(model(inputs), targets)`` API.

    ``forward`` ignores its input and returns ``loss_closure()`` and the criterion returns
    its first argument, so any model (dict inputs, Hugging Face) works. The wrapped model is a
    submodule, so ``parameters()`` (what PyHessian differentiates) are the model's trainable ones.
    """

    def __init__(self, model: nn.Module, loss_closure: LossClosure):
        super().__init__()
        self.model = model
        self._closure = loss_closure

    def forward(self, _inputs):
        return evaluate_loss(self._closure)


@contextlib.contextmanager
def _pyhessian_hvp_counter(counter: list, shift: float = 0.0):
    """Count PyHessian's Hessian-vector products in ``counter[0]``; with ``shift = c`` they
    become products with ``H + c I`` (PyHessian's power iteration then sees the shifted
    spectrum)."""
    # the submodule (its name is shadowed by the class in the package namespace)
    ph = importlib.import_module("pyhessian.hessian")
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter[0] += 1
        hv = original(gradsH, params, v)
        return hv if shift == 0 else tuple(h + shift * x for h, x in zip(hv, v))

    ph.hessian_vector_product = counted
    try:
        yield
    finally:
        ph.hessian_vector_product = original


def _pyhessian_power(model, loss_closure, params, k, max_iter, seed, ph_tol, shift, counter):
    """One call of PyHessian 0.1's ``eigenvalues(top_n=k)`` on ``H + shift I``; returns the
    unit eigenvectors as flat float64 tensors (its eigenvalues are recomputed by the caller)."""
    from pyhessian import hessian as PyHessian
    dtype, device = params[0].dtype, params[0].device
    old_default = torch.get_default_dtype()
    dummy = (torch.zeros(1, device=device), torch.zeros(1, device=device))
    with torch.random.fork_rng(devices=[]), math_attention(), \
            _pyhessian_hvp_counter(counter, shift):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # PyHessian draws its start vectors in the default dtype
        try:
            with warnings.catch_warnings():
                # PyHessian calls backward(create_graph=True); we clear those grads below.
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                ph = PyHessian(_ClosureAsModel(model, loss_closure), criterion=lambda out, _y: out,
                               data=dummy, cuda=device.type == "cuda")
                _, vecs = ph.eigenvalues(maxIter=max_iter, tol=ph_tol, top_n=k)
        finally:
            torch.set_default_dtype(old_default)
    for p in params:  # PyHessian's backward(create_graph=True) left graph-carrying grads
        p.grad = None
    flat = [torch.cat([x.detach().reshape(-1).to(torch.float64) for x in vec]) for vec in vecs]
    return [v / v.norm() for v in flat]


def _pyhessian_certified(model, loss_closure, params, op, k, tol, max_iter, seed, ph_tol, shift,
                         counter):
    r"""PyHessian's power iteration on ``H + shift I``, rerun with a 10x tighter ``tol`` (down
    to 1e-12) until every Rayleigh quotient ``theta = v^T H v`` (of ``H``, unshifted) has the
    residual ``||H v - theta v|| <= tol |theta|`` (one product each)."""
    attempts = 0
    while True:
        attempts += 1
        vecs = _pyhessian_power(model, loss_closure, params, k, max_iter, seed + attempts - 1,
                                ph_tol, shift, counter)
        values, residuals = [], []
        for v in vecs:
            hv = op.matvec(v)
            theta = float(v @ hv)
            values.append(theta)
            residuals.append(float((hv - theta * v).norm()))
        ok = all(res <= tol * abs(lam) for lam, res in zip(values, residuals))
        if ok or ph_tol <= 1e-12:
            return values, residuals, ok, ph_tol, attempts
        ph_tol /= 10


def _pyhessian_top(model, loss_closure, params, k, tol, max_iter, seed, pyhessian_tol):
    r"""The largest *algebraic* eigenvalue(s) by PyHessian 0.1's power iteration.

    Power iteration finds the largest-*magnitude* eigenvalue ``mu`` (on an indefinite Hessian
    possibly negative: -38.91 where ``lambda_max`` = 8.56, issue 14). So: first ``mu``; if
    ``k = 1`` and ``mu >= 0`` it is ``lambda_max``; otherwise PyHessian runs again on
    ``H + c I`` with ``c = |mu| (1 + 2 tol)`` ``>= -lambda_min`` (``|mu|`` is the spectral radius),
    whose spectrum is ``>= 0``, so its largest-magnitude eigenvalues are the largest algebraic
    ones of ``H`` plus ``c``. PyHessian stops on the relative step-to-step change, an error
    of about ``change / (1 - lambda_2 / lambda_1)``, far above its ``tol`` on gapped spectra
    (``PROBES.md``); each run therefore starts at ``pyhessian_tol`` (default ``tol^2``) and is
    tightened until the residual bound holds (:func:`_pyhessian_certified`). Vectors and the
    start are drawn in the parameters' dtype, so float64 problems stay float64.
    """
    if importlib.util.find_spec("pyhessian") is None:  # pragma: no cover
        raise ImportError("method='pyhessian' needs the pyhessian package")
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"method='pyhessian' needs float32 or float64 parameters (it draws its "
                         f"vectors in the default dtype), got {dtype}; use method='lanczos'")
    op = HessianOperator(loss_closure, params)
    counter = [0]
    ph_tol = tol * tol if pyhessian_tol is None else float(pyhessian_tol)
    run = lambda n, shift: _pyhessian_certified(  # noqa: E731
        model, loss_closure, params, op, n, tol, max_iter, seed, ph_tol, shift, counter)
    values, residuals, ok, final_tol, attempts = run(1, 0.0)
    magnitude, shift = values[0], 0.0
    if k > 1 or magnitude < 0:
        shift = abs(magnitude) * (1 + 2 * tol)
        values, residuals, ok, final_tol, more = run(k, shift)
        attempts += more
    order = np.argsort(values)[::-1]
    return {"values": [float(values[i]) for i in order],
            "residuals": [residuals[i] for i in order], "hvps": counter[0] + op.hvps,
            "converged": ok, "iterations": counter[0], "pyhessian_tol": final_tol,
            "attempts": attempts, "largest_magnitude": magnitude, "shift": shift,
            "solver": "pyhessian", "block": False}


def _check_method(method: str, k: int) -> str:
    """The solver behind ``method`` (:data:`METHODS`) for ``k`` eigenvalues."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(repr(m) for m in METHODS)}")
    if method == "auto":
        return "eigsh" if k == 1 else "lobpcg"
    return "eigsh" if method == "lanczos" else method


def _ordered_for_pyhessian(model: nn.Module, params: list) -> list:
    """PyHessian takes the model's grad-requiring parameters in the model's order."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    if any(id(p) not in order for p in params):
        raise ValueError("method='pyhessian' needs params that are parameters of model")
    return sorted(params, key=lambda p: order[id(p)])


def top_hessian_eigenvalue(model: nn.Module, loss_closure: LossClosure, method: str = "auto",
                           k: int = 1, tol: float = 1e-3, max_iter: int | None = None,
                           return_info: bool = False, seed: int = 0,
                           pyhessian_tol: float | None = None, recompute_forward: bool = True,
                           params: Sequence[Tensor] | None = None, progress: bool = False):
    r"""Largest algebraic eigenvalue(s) of the Hessian of ``loss_closure()`` w.r.t. the
    trainable parameters.

    Parameters
    ----------
    model : nn.Module
        Its parameters with ``requires_grad`` are the variables (PEFT: the LoRA factors and
        any trainable head), unless ``params`` is given.
    loss_closure : callable () -> scalar tensor
        Recomputes the loss with ``model`` (called once per Hessian-vector product).
    method : {"auto", "lanczos", "eigsh", "lobpcg", "pyhessian"}
        ``"lanczos"`` = ``"eigsh"``: scipy's ``eigsh(which="LA")`` on the HVP operator.
        ``"lobpcg"``: scipy's block LOBPCG (``largest=True``, block of ``k``), which also finds
        repeated eigenvalues (``"eigsh"``, one start vector, may miss a copy for ``k > 1``:
        at the balanced minimiser of F9 it returns ``[10, 8, 6]`` for ``[10, 8, 8]``, see
        :mod:`.hessian_spectrum`). ``"auto"`` (default): ``"eigsh"`` for ``k = 1``,
        ``"lobpcg"`` for ``k > 1``. Both stop when every pair has ``||H v_i - theta_i v_i|| <=
        tol |theta_i|``, with residuals from the recorded products. ``"pyhessian"``: PyHessian
        0.1's power iteration made to return the largest *algebraic* eigenvalues (a spectral
        shift) to the same residual bound (:func:`_pyhessian_top`).
    k : int
        Number of eigenvalues; ``k = 1`` returns a float, ``k > 1`` a descending list.
    tol : float
        Relative residual bound, which bounds the relative error.
    max_iter : int, optional
        Most Hessian-vector products of the solve, residuals included (default ``max(300,
        20 k)``); the best estimate so far is returned,
        ``converged = False``, when they run out. PyHessian: iterations per eigenvalue
        (default 1000).
    return_info : bool
        Also return a dict: ``value``, ``values`` (list), ``residual`` (float for ``k = 1``,
        else a list), ``hvps``, ``converged``, ``iterations``, ``solver`` (``"eigsh"``,
        ``"lobpcg"``, ``"dense"`` for tiny problems, ``"pyhessian"``), ``block``, ``seconds``;
        PyHessian adds ``largest_magnitude`` (what power iteration converges to), ``shift``,
        ``pyhessian_tol``, ``attempts``.
    seed : int
        Start vector(s).
    pyhessian_tol : float, optional
        PyHessian's own stopping tolerance to start from (default ``tol^2``).
    recompute_forward : bool
        Recompute the forward pass for every product (default; memory of one double
        backward) or keep one gradient graph (one backward per product, faster on small
        models, PyHessian's choice).
    params : sequence of tensors, optional
        The variables of the Hessian (e.g. the LoRA factors only, ``[t for p in pairs for t in
        p.params]``); default every parameter of ``model`` that requires grad. The other
        parameters are held constant. ``"pyhessian"`` needs them to be parameters of ``model``.
    progress : bool
        A tqdm bar on stderr counting the Hessian-vector products (up to ``max_iter``; it
        stops early on convergence).

    Notes
    -----
    Runs in eval mode under the math attention backend; parameters, ``.grad``,
    ``requires_grad`` and the train/eval mode of every module are restored exactly.
    Cost: one forward and one double backward per Hessian-vector product.
    """
    check_positive_int("k", k)
    solver = _check_method(method, k)
    if not (isinstance(tol, (float, int)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    params = _variables(model, params)
    if solver == "pyhessian":
        params = _ordered_for_pyhessian(model, params)
    start = time.perf_counter()
    with _probing(model, params):
        if solver == "pyhessian":
            info = _pyhessian_top(model, loss_closure, params, k, tol,
                                  1000 if max_iter is None else int(max_iter), seed, pyhessian_tol)
        else:
            dim = sum(p.numel() for p in params)
            total = default_budget(dim, k) if max_iter is None else int(max_iter)
            label = "Lanczos" if solver == "eigsh" else "LOBPCG"
            with progress_bar(progress, total, f"sharpness: {label} lambda_max") as bar:
                op = HessianOperator(loss_closure, params, recompute_forward=recompute_forward,
                                     progress=bar)
                info = lanczos_top_eigenvalues(op.matvec, op.dim, k=k, tol=tol,
                                               max_iter=max_iter, seed=seed, device=op.device,
                                               solver=solver)
                info["hvps"] = op.hvps
    info["seconds"] = time.perf_counter() - start
    info["residual"] = info.pop("residuals")
    values = info["values"]
    value = values[0] if k == 1 else values
    if k == 1:
        info["residual"] = info["residual"][0] if info["residual"] else float("nan")
    info["value"] = value
    return (value, info) if return_info else value


def hessian_trace(model: nn.Module, loss_closure: LossClosure, n_samples: int = 99,
                  method: str = "hutch++", seed: int = 0, return_info: bool = False,
                  params: Sequence[Tensor] | None = None, progress: bool = False,
                  confidence: float = 0.95):
    r"""``tr H`` with a standard error and a confidence interval, from ``n_samples`` HVPs.

    ``"hutchinson"``: ``mean_i z_i^T H z_i`` over Rademacher ``z_i``; standard error
    ``std / sqrt(n)``. ``"hutch++"`` (Meyer et al. 2021): with ``s = n // 3`` (at most ``(n - 2) // 2``: two
    random samples at least), ``Q = orth(H S)``
    for Rademacher ``S`` (s HVPs), then ``tr(Q^T H Q)`` (s HVPs, exact) plus Hutchinson on the
    deflated ``(I - Q Q^T) H (I - Q Q^T)`` with the remaining ``n - 2 s`` vectors; the standard
    error is that of the Hutchinson part (the low-rank part is exact given ``Q``). The interval
    is the two-sided Student t interval of the Hutchinson part's mean (``n_h - 1`` degrees of
    freedom), shifted by the exact part, at ``confidence`` (:mod:`.trace` explains why it, and
    not +-2 standard errors, holds its coverage). For indefinite Hessians read the result as an
    absolute error.

    ``params``: the variables (default every parameter of ``model`` that requires grad), as in
    :func:`top_hessian_eigenvalue`. ``progress``: a tqdm bar on stderr counting the
    ``n_samples`` Hessian-vector products.

    Returns ``(estimate, standard_error)``, and with ``return_info`` an info dict: ``ci_low``,
    ``ci_high`` (the interval: draw it as a band or error bar), ``confidence``, ``dof``,
    ``low_rank``, ``hvps``, ``seconds``.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; valid: 'hutch++', 'hutchinson'")
    check_positive_int("n_samples", n_samples, minimum=2)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    params = _variables(model, params)
    start = time.perf_counter()
    with _probing(model, params), progress_bar(progress, n_samples,
                                               f"sharpness: trace ({method})") as bar:
        op = HessianOperator(loss_closure, params, progress=bar)
        out = trace_estimate(op.matvec, op.dim, n_samples, method, seed=seed, device=op.device,
                             confidence=confidence)
    info = {k: out[k] for k in ("ci_low", "ci_high", "confidence", "dof", "low_rank")}
    info.update(hvps=op.hvps, seconds=time.perf_counter() - start)
    estimate, se = out["estimate"], out["standard_error"]
    return (estimate, se, info) if return_info else (estimate, se)


def per_layer_sharpness(model: nn.Module, loss_closure: LossClosure, pairs, *,
                        tol: float = 1e-3, max_iter: int | None = None, seed: int = 0,
                        trace_samples: int = 30, confidence: float = 0.95,
                        method: str = "auto", progress: bool = False) -> list[dict]:
    r"""Sharpness of each LoRA pair alone: the Hessian restricted to that pair's two factors.

    For pair ``i`` the variables are its stored factors ``(a_i, b_i)`` (``pair.params``); every
    other parameter is held constant, so the Hessian is the diagonal block
    ``H_ii = d^2 l / d(a_i, b_i)^2`` of the full LoRA Hessian (its eigenvalues interlace the
    full one's: ``lambda_max(H_ii) <= lambda_max(H)``). At a balanced minimiser of a
    single-layer ``1/2 ||A B^T - Y||^2`` this is ``2 sigma_1(Y)`` (``THEORY.md`` F9).

    Parameters
    ----------
    pairs : sequence of ``LoraPair`` (``find_lora_pairs(model)``, ``task.pairs``)
    tol, max_iter, seed, method
        As :func:`top_hessian_eigenvalue` (per layer).
    trace_samples : int
        Hutch++ samples per layer for :func:`hessian_trace` (0 skips the trace: its keys are
        then NaN).
    confidence : float
        Nominal coverage of the trace interval.

    Returns
    -------
    list of dict, one per pair, in order, with keys
    ``layer`` (str, ``pair.name``), ``index`` (int), ``m``, ``n``, ``rank`` (ints),
    ``lambda_max`` (float), ``residual`` (float, ``||H v - lambda v||``), ``converged``
    (bool), ``trace``, ``trace_se``, ``trace_ci_low``, ``trace_ci_high`` (floats),
    ``confidence`` (float), ``hvps`` (int, eigenvalue + trace) and ``seconds`` (float).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    _check_positive_int("trace_samples", trace_samples, minimum=0)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty; nothing to probe")
    rows = []
    for i, pair in enumerate(pairs):
        start = time.perf_counter()
        params = list(pair.params)
        value, info = top_hessian_eigenvalue(model, loss_closure, method=method, tol=tol,
                                             max_iter=max_iter, return_info=True, seed=seed,
                                             params=params, progress=progress)
        row = {"layer": pair.name, "index": i, "m": int(pair.shape[0]), "n": int(pair.shape[1]),
               "rank": int(pair.rank), "lambda_max": float(value),
               "residual": float(info["residual"]), "converged": bool(info["converged"]),
               "trace": math.nan, "trace_se": math.nan, "trace_ci_low": math.nan,
               "trace_ci_high": math.nan, "confidence": float(confidence),
               "hvps": int(info["hvps"])}
        if trace_samples:
            tr, se, tinfo = hessian_trace(model, loss_closure, n_samples=trace_samples,
                                          seed=seed, return_info=True, params=params,
                                          progress=progress)
            row.update(trace=float(tr), trace_se=float(se),
                       trace_ci_low=float(tinfo.get("ci_low", math.nan)),
                       trace_ci_high=float(tinfo.get("ci_high", math.nan)),
                       hvps=row["hvps"] + int(tinfo["hvps"]))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def eigenvalue_density(model: nn.Module, loss_closure: LossClosure, n_v: int = 4,
                       n_iter: int = 50, *, grid_points: int = 1000, sigma: float | None = None,
                       seed: int = 0, params: Sequence[Tensor] | None = None,
                       progress: bool = False) -> dict:
    r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

    For each of ``n_v`` Rademacher vectors ``v`` (normalised), ``n_iter`` Lanczos steps
    (full reorthogonalisation) give ``T = S diag(theta) S^T``; the quadrature nodes
    ``theta_i`` with weights ``w_i = S_{0i}^2`` (summing to 1) estimate the spectral measure
    ``(1/d) sum_j delta(lambda_j)``. The density is the average over vectors of
    ``sum_i w_i N(x; theta_i, sigma^2)`` on a grid covering every node +- 5 sigma, so it
    integrates to 1 (up to grid resolution). PyHessian's ``density()`` is not used: the PyPI
    release calls the removed ``torch.eig``. ``params``: the variables (default every
    parameter of ``model`` that requires grad), as in :func:`top_hessian_eigenvalue`.
    ``progress``: a tqdm bar on stderr counting the Hessian-vector products (at most
    ``n_v * n_iter``).

    Returns dict: ``grid`` (grid_points,), ``density`` (grid_points,), ``nodes``
    (n_v, m), ``weights`` (n_v, m), ``sigma``, ``hvps``, ``seconds``.
    """
    _check_positive_int("n_v", n_v)
    _check_positive_int("n_iter", n_iter)
    params = _variables(model, params)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    nodes, weights = [], []
    with _probing(model, params), progress_bar(
            progress, n_v * min(n_iter, sum(p.numel() for p in params)), "sharpness: SLQ") as bar:
        op = HessianOperator(loss_closure, params, progress=bar)
        m = min(n_iter, op.dim)
        for _ in range(n_v):
            v = _rademacher((op.dim,), gen, op.device)
            v /= v.norm()
            Q = [v]
            alphas, betas = [], []
            for j in range(m):
                w = op.matvec(Q[j])
                alphas.append(float(w @ Q[j]))
                basis = torch.stack(Q)
                for _ in range(2):
                    w = w - basis.T @ (basis @ w)
                beta = float(w.norm())
                if j == m - 1 or beta <= 1e-12 * max(abs(a) for a in alphas + [1e-300]):
                    break
                betas.append(beta)
                Q.append(w / beta)
            theta, S = _tridiagonal_eigh(alphas, betas)
            nodes.append(theta)
            weights.append(S[0] ** 2)
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        sigma = max(hi - lo, abs(hi), 1e-12) / 100.0
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points)
    density = np.zeros_like(grid)
    for theta, w in zip(nodes, weights):
        density += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2)
                    ).sum(1) / (sigma * math.sqrt(2 * math.pi))
    density /= n_v
    width = max(len(t) for t in nodes)
    pad = lambda a: np.pad(a, (0, width - len(a)), constant_values=np.nan)  # noqa: E731
    return {"grid": grid, "density": density, "nodes": np.stack([pad(t) for t in nodes]),
            "weights": np.stack([pad(w) for w in weights]), "sigma": sigma, "hvps": op.hvps,
            "seconds": time.perf_counter() - start}
