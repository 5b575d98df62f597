r"""Sharpness of the loss with respect to the trainable (LoRA) parameters.

The Hessian ``H = d^2 l / d theta^2`` over the parameters of ``model`` that require grad
(for a PEFT model: the LoRA factors, plus any trainable head), or over the ``params`` given
(``probes.SharpnessProbe`` passes the LoRA factors, ``THEORY.md`` section 5), is accessed
only through Hessian-vector products (double backward, forward recomputed per product, math
attention backend, eval mode).

* :func:`top_hessian_eigenvalue` -- ``lambda_max(H)`` by our Lanczos (full
  reorthogonalisation, float64 tridiagonal, residual stop) or by a wrapper around
  PyHessian 0.1's power iteration.
* :func:`hessian_trace` -- ``tr H`` by Hutch++ (Meyer, Musco, Musco, Woodruff 2021) or
  Hutchinson, with a standard error.
* :func:`eigenvalue_density` -- the spectral density by stochastic Lanczos quadrature
  (Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019), Gaussian-broadened.

Known answer (``THEORY.md`` F9): for ``f(A, B) = 1/2 ||A B^T - Y||_F^2`` at a minimiser
(``A B^T = Y`` of rank r) the Hessian is ``J^T J`` with ``J(dA, dB) = dA B^T + A dB^T`` and
``lambda_max = sigma_max(A)^2 + sigma_max(B)^2`` (``2 sigma_1(Y)`` when balanced).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor, nn

from ._util import (HessianOperator, LossClosure, evaluate_loss, math_attention,
                    preserved_state, progress_bar, trainable_parameters)

__all__ = ["lanczos_top_eigenvalues", "top_hessian_eigenvalue", "hessian_trace",
           "eigenvalue_density"]


def _check_positive_int(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _tridiagonal_eigh(alphas, betas):
    """Eigenpairs (ascending) of the symmetric tridiagonal T (diagonal alphas, off-diagonal betas).

    LAPACK's tridiagonal solver: ~10x faster than a dense ``eigh`` on small T, which matters
    because it runs once per Lanczos step.
    """
    if len(alphas) == 1:
        return np.array(alphas, dtype=np.float64), np.ones((1, 1))
    return eigh_tridiagonal(np.asarray(alphas, dtype=np.float64),
                            np.asarray(betas[: len(alphas) - 1], dtype=np.float64))


def lanczos_top_eigenvalues(matvec, dim: int, *, k: int = 1, tol: float = 1e-3,
                            max_iter: int | None = None, seed: int = 0,
                            device=None, callback=None) -> dict:
    r"""Largest ``k`` eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    After ``j`` steps, ``Q_j^T H Q_j = T_j`` (tridiagonal, float64) with Ritz pairs
    ``(theta_i, Q_j s_i)``; the residual of each is exactly
    ``||H Q_j s_i - theta_i Q_j s_i|| = |beta_j e_j^T s_i|`` and bounds the distance from
    ``theta_i`` to the spectrum. Iteration stops when, for each of the top ``k`` Ritz values,
    ``|beta_j e_j^T s_i| <= tol * |theta_i|``, or when ``beta_j`` vanishes (an invariant
    subspace: the Ritz values are exact). Both reorthogonalisation passes ("twice is enough")
    keep ``Q`` orthonormal to round-off, so no spurious copies appear.

    Parameters
    ----------
    matvec : callable, float64 vector (dim,) -> (dim,)
    dim : int
    k : int
        Number of largest (algebraic) eigenvalues.
    tol : float
        Relative residual bound (the true relative error is usually far smaller:
        ``|theta - lambda| <= residual^2 / gap``).
    max_iter : int, optional
        Default ``min(dim, max(300, 20 k))``.
    callback : callable, optional
        Called after every step with ``(iteration, values, residuals)`` (e.g. to show progress).

    Returns
    -------
    dict with ``values`` (descending, list of k floats), ``residuals``, ``hvps``, ``converged``,
    ``iterations``.
    """
    _check_positive_int("k", k)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters {dim}")
    max_iter = min(dim, max(300, 20 * k)) if max_iter is None else min(int(max_iter), dim)
    _check_positive_int("max_iter", max_iter, minimum=k)
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    q /= q.norm()
    Q = torch.empty(max_iter + 1, dim, dtype=torch.float64, device=device)
    Q[0] = q
    alphas: list[float] = []
    betas: list[float] = []
    values, residuals, converged, hvps = [], [], False, 0
    for j in range(max_iter):
        w = matvec(Q[j]).to(torch.float64)
        hvps += 1
        alpha = float(w @ Q[j])
        alphas.append(alpha)
        basis = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        theta, S = _tridiagonal_eigh(alphas, betas)
        top = min(k, j + 1)
        values = theta[::-1][:top].tolist()
        residuals = (abs(beta) * np.abs(S[-1, ::-1][:top])).tolist()
        if callback is not None:
            callback(j + 1, values, residuals)
        scale = max(abs(values[0]), np.finfo(np.float64).tiny)
        invariant = beta <= 1e-12 * max(scale, abs(alpha))
        if top == k and (invariant or all(res <= tol * max(abs(v), 1e-300)
                                          for v, res in zip(values, residuals))):
            converged = True
            if invariant:
                residuals = [0.0] * top
            break
        if invariant:  # Krylov space exhausted before k values: restart is not worth it here
            break
        betas.append(beta)
        Q[j + 1] = w / beta
    return {"values": values, "residuals": residuals, "hvps": hvps, "converged": converged,
            "iterations": len(alphas)}


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
def _pyhessian_hvp_counter(counter: list):
    import sys

    import pyhessian  # noqa: F401  (loads the submodule; its name is shadowed by the class)
    ph = sys.modules["pyhessian.hessian"]
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        yield
    finally:
        ph.hessian_vector_product = original


def _pyhessian_top(model, loss_closure, params, k, tol, max_iter, seed, pyhessian_tol):
    r"""PyHessian 0.1 power iteration, made to reach the accuracy asked for.

    PyHessian stops when the eigenvalue changes by less than ``tol`` (relative) between two
    iterations; the error is then about ``change / (1 - lambda_2 / lambda_1)``, far above
    ``tol`` on gapped spectra (``PROBES.md``: 4e-3 error at its default 1e-3 on gap 0.9).
    So we run it at ``pyhessian_tol`` (default ``tol^2``, i.e. 1e-6 for 1e-3), then check the
    residual ``||H v - theta v|| <= tol |theta|`` with one more HVP (the same criterion as our
    Lanczos); while it fails, PyHessian is rerun with a 10x tighter tolerance (down to 1e-12).
    PyHessian draws float32 start vectors with ``torch.randn``: the default dtype is set to the
    parameters' dtype while it runs so float64 problems stay float64. It finds the largest
    *magnitude* eigenvalue (power iteration), not the largest algebraic one.
    """
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as exc:  # pragma: no cover
        raise ImportError("method='pyhessian' needs the pyhessian package") from exc
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"method='pyhessian' needs float32 or float64 parameters (it draws its "
                         f"vectors in the default dtype), got {dtype}; use method='lanczos'")
    op = HessianOperator(loss_closure, params)
    ph_tol = tol * tol if pyhessian_tol is None else float(pyhessian_tol)
    counter = [0]
    old_default = torch.get_default_dtype()
    wrapper = _ClosureAsModel(model, loss_closure)
    device = params[0].device
    dummy = (torch.zeros(1, device=device), torch.zeros(1, device=device))
    attempts = 0
    while True:
        attempts += 1
        with torch.random.fork_rng(devices=[]), math_attention(), _pyhessian_hvp_counter(counter):
            torch.manual_seed(seed + attempts - 1)
            torch.set_default_dtype(dtype)
            try:
                with warnings.catch_warnings():
                    # PyHessian calls backward(create_graph=True); we clear those grads below.
                    warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                    ph = PyHessian(wrapper, criterion=lambda out, _y: out, data=dummy,
                                   cuda=device.type == "cuda")
                    vals, vecs = ph.eigenvalues(maxIter=max_iter, tol=ph_tol, top_n=k)
            finally:
                torch.set_default_dtype(old_default)
            for p in params:  # PyHessian's backward(create_graph=True) left graph-carrying grads
                p.grad = None
        residuals = []
        for lam, vec in zip(vals, vecs):
            v = torch.cat([x.detach().reshape(-1).to(torch.float64) for x in vec])
            v = v / v.norm()
            hv = op.matvec(v)
            theta = float(v @ hv)
            residuals.append(float((hv - theta * v).norm()))
        ok = all(res <= tol * abs(lam) for lam, res in zip(vals, residuals))
        if ok or ph_tol <= 1e-12:
            break
        ph_tol /= 10
    order = np.argsort(vals)[::-1]
    return {"values": [float(vals[i]) for i in order], "residuals": [residuals[i] for i in order],
            "hvps": counter[0] + op.hvps, "converged": ok, "iterations": counter[0],
            "pyhessian_tol": ph_tol, "attempts": attempts}


def top_hessian_eigenvalue(model: nn.Module, loss_closure: LossClosure, method: str = "lanczos",
                           k: int = 1, tol: float = 1e-3, max_iter: int | None = None,
                           return_info: bool = False, seed: int = 0,
                           pyhessian_tol: float | None = None, recompute_forward: bool = True,
                           params: Sequence[Tensor] | None = None, progress: bool = False):
    r"""Largest eigenvalue(s) of the Hessian of ``loss_closure()`` w.r.t. the trainable parameters.

    Parameters
    ----------
    model : nn.Module
        Its parameters with ``requires_grad`` are the variables (PEFT: the LoRA factors and
        any trainable head), unless ``params`` is given.
    loss_closure : callable () -> scalar tensor
        Recomputes the loss with ``model`` (called once per Hessian-vector product).
    method : {"lanczos", "pyhessian"}
        ``"lanczos"``: :func:`lanczos_top_eigenvalues`, largest algebraic eigenvalues, stopped
        on the residual bound ``|beta_j e_j^T s| <= tol |theta|``. ``"pyhessian"``: PyHessian
        0.1's power iteration (largest magnitude), wrapped for any model and the CPU, with its
        stopping tolerance tightened until the same residual bound holds (see ``_pyhessian_top``).
    k : int
        Number of eigenvalues; ``k = 1`` returns a float, ``k > 1`` a descending list.
    tol : float
        Relative residual bound, which bounds the relative error.
    max_iter : int, optional
        Lanczos steps (default ``min(dim, 300)``), or PyHessian iterations per eigenvalue
        (default 1000).
    return_info : bool
        Also return a dict: ``residual`` (list), ``hvps``, ``converged``, ``iterations``,
        ``seconds``.
    seed : int
        Start vector.
    pyhessian_tol : float, optional
        PyHessian's own stopping tolerance to start from (default ``tol^2``).
    recompute_forward : bool
        Lanczos only: recompute the forward pass for every product (default; memory of one
        double backward) or keep one gradient graph (one backward per product, faster on
        small models, PyHessian's choice).
    params : sequence of tensors, optional
        The variables of the Hessian (e.g. the LoRA factors only, ``[t for p in pairs for t in
        p.params]``); default every parameter of ``model`` that requires grad. The other
        parameters are held constant. ``"pyhessian"`` needs them to be parameters of ``model``.
    progress : bool
        Lanczos only: a tqdm bar on stderr counting the Hessian-vector products (up to
        ``max_iter``; it stops early on convergence) with the current estimate and residual.

    Notes
    -----
    Runs in eval mode under the math attention backend; parameters, ``.grad``,
    ``requires_grad`` and the train/eval mode of every module are restored exactly.
    Cost: one forward and one double backward per Hessian-vector product.
    """
    if method not in ("lanczos", "pyhessian"):
        raise ValueError(f"unknown method {method!r}; valid: 'lanczos', 'pyhessian'")
    _check_positive_int("k", k)
    if not (isinstance(tol, (float, int)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    params = _variables(model, params)
    if method == "pyhessian":  # PyHessian takes the model's grad-requiring parameters in order
        order = {id(p): i for i, p in enumerate(model.parameters())}
        if any(id(p) not in order for p in params):
            raise ValueError("method='pyhessian' needs params that are parameters of model")
        params = sorted(params, key=lambda p: order[id(p)])
    start = time.perf_counter()
    with _probing(model, params):
        if method == "lanczos":
            dim = sum(p.numel() for p in params)
            total = min(dim, max(300, 20 * k)) if max_iter is None else min(int(max_iter), dim)
            with progress_bar(progress, total, "sharpness: Lanczos lambda_max") as bar:
                op = HessianOperator(loss_closure, params, recompute_forward=recompute_forward,
                                     progress=bar)

                def show(_j, vals, res):
                    bar.set_postfix(lam=f"{vals[0]:.4g}", res=f"{res[0]:.2g}", refresh=False)
                info = lanczos_top_eigenvalues(op.matvec, op.dim, k=k, tol=tol, max_iter=max_iter,
                                               seed=seed, device=op.device, callback=show)
        else:
            info = _pyhessian_top(model, loss_closure, params, k, tol,
                                  1000 if max_iter is None else int(max_iter), seed, pyhessian_tol)
    info["seconds"] = time.perf_counter() - start
    info["residual"] = info.pop("residuals")
    values = info["values"]
    value = values[0] if k == 1 else values
    if k == 1:
        info["residual"] = info["residual"][0] if info["residual"] else float("nan")
    info["value"] = value
    return (value, info) if return_info else value


def _rademacher(shape, gen, device):
    return (torch.randint(0, 2, shape, generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
            ).to(device)


def hessian_trace(model: nn.Module, loss_closure: LossClosure, n_samples: int = 99,
                  method: str = "hutch++", seed: int = 0, return_info: bool = False,
                  params: Sequence[Tensor] | None = None, progress: bool = False):
    r"""``tr H`` with a standard error, from ``n_samples`` Hessian-vector products.

    ``"hutchinson"``: ``mean_i z_i^T H z_i`` over Rademacher ``z_i``; standard error
    ``std / sqrt(n)``. ``"hutch++"`` (Meyer et al. 2021): with ``n = 3 s``, ``Q = orth(H S)``
    for Rademacher ``S`` (n x s, s HVPs), then ``tr(Q^T H Q)`` (s HVPs, exact) plus Hutchinson
    on the deflated ``(I - Q Q^T) H (I - Q Q^T)`` with the remaining s vectors; the standard
    error is that of the Hutchinson part (the low-rank part has none given ``Q``). For
    indefinite Hessians read the result as an absolute error +- standard error.

    ``params``: the variables (default every parameter of ``model`` that requires grad), as in
    :func:`top_hessian_eigenvalue`. ``progress``: a tqdm bar on stderr counting the
    ``n_samples`` Hessian-vector products.

    Returns ``(estimate, standard_error)`` (and an info dict with ``hvps``, ``seconds`` when
    ``return_info``).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"unknown trace method {method!r}; valid: 'hutch++', 'hutchinson'")
    _check_positive_int("n_samples", n_samples, minimum=3 if method == "hutch++" else 2)
    params = _variables(model, params)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    with _probing(model, params), progress_bar(progress, n_samples,
                                               f"sharpness: trace ({method})") as bar:
        op = HessianOperator(loss_closure, params, progress=bar)
        d = op.dim
        if method == "hutchinson":
            Z = _rademacher((n_samples, d), gen, op.device)
            samples = torch.stack([z @ op.matvec(z) for z in Z])
            low_rank = 0.0
        else:
            s = n_samples // 3
            n_g = n_samples - 2 * s
            S = _rademacher((s, d), gen, op.device)
            HS = torch.stack([op.matvec(x) for x in S])
            Q, _ = torch.linalg.qr(HS.T)  # d x s
            low_rank = float(sum(q @ op.matvec(q) for q in Q.T))
            Z = _rademacher((n_g, d), gen, op.device)
            Z = Z - (Z @ Q) @ Q.T
            samples = torch.stack([z @ op.matvec(z) for z in Z])
        estimate = low_rank + float(samples.mean())
        n_h = len(samples)
        se = float(samples.std(unbiased=True) / math.sqrt(n_h)) if n_h > 1 else float("inf")
    info = {"hvps": op.hvps, "seconds": time.perf_counter() - start}
    return (estimate, se, info) if return_info else (estimate, se)


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
