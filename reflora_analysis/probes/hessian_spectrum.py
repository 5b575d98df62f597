r"""Largest algebraic eigenvalues of a symmetric operator given only by its products.

The solvers are scipy's: ``eigsh`` (ARPACK's implicitly restarted Lanczos, ``which="LA"``)
and ``lobpcg`` (a block method, ``largest=True``), on a
:class:`~._util.SymmetricTorchOperator` (float64, counts and budgets its products). What we
add is the accounting:

* **Residuals per eigenpair.** Every product the solver asked for is recorded (while it fits in
  :data:`RECORD_BYTES`); a Rayleigh-Ritz step on their span (:func:`rayleigh_ritz`) returns
  Ritz pairs ``(theta_i, v_i)`` with the exact residuals ``||H v_i - theta_i v_i||`` at no extra
  product (``H v_i`` is a combination of the recorded outputs). The span contains the solver's
  own basis, so these values are at least as good as the solver's (Courant-Fischer). Without
  records the residuals cost ``k`` explicit products, reserved in the budget.
* **Convergence** is ``residual_i <= tol * |theta_i|`` for every ``i``, the same criterion as
  ARPACK's, checked by us on the records after every product (:func:`_monitor`; ARPACK itself
  checks only at its restarts, every ``ncv`` products), which stops the solver early; a solver
  stopped by the budget or by non-convergence still returns its best Ritz values, with
  ``converged = False``. ``|theta_i - lambda| <= residual_i`` for
  some eigenvalue ``lambda`` (and ``<= residual_i^2 / gap``).
* **Repeated eigenvalues.** A residual cannot tell which eigenvalue a Ritz value approximates: a
  single-vector Krylov method (Lanczos, ``eigsh``) can return ``[10, 8, 7]`` with small residuals
  for ``[10, 8, 8, 7, ...]`` when the start vector's Krylov space holds one direction of the
  double eigenvalue (it finds the second copy only through round-off or a breakdown restart).
  ``lobpcg`` iterates a block of ``k`` vectors and finds an eigenvalue of multiplicity up to
  ``k``: use ``solver="lobpcg"`` for clusters (``k = 1`` is never affected).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.sparse.linalg import ArpackNoConvergence, eigsh, lobpcg

from ._util import ProductBudgetExhausted, SolverStopped, SymmetricTorchOperator

__all__ = ["RECORD_BYTES", "SOLVERS", "rayleigh_ritz", "top_eigenpairs", "default_budget"]

#: Memory for the recorded products (inputs and outputs, float64) that make residuals free.
RECORD_BYTES = 256 * 2 ** 20
#: Solvers of :func:`top_eigenpairs`; ``"auto"`` is ``"eigsh"`` for ``k = 1`` and
#: ``"lobpcg"`` (a block, safe for repeated eigenvalues) for ``k > 1``.
SOLVERS = ("auto", "eigsh", "lobpcg")
#: Relative size below which a recorded direction counts as dependent on the others.
_RANK_TOL = 1e-8
#: LOBPCG iterations between two convergence checks (after a first single iteration).
_LOBPCG_CHUNK = 20


def check_positive_int(name, value, minimum=1):
    """``ValueError`` unless ``value`` is an integer (not bool) ``>= minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def default_budget(dim: int, k: int) -> int:
    """Default cap on the products of one eigen-solve: ``max(300, 20 k)`` (the former Lanczos
    default; ``dim`` is accepted for a future size-dependent rule and unused)."""
    return max(300, 20 * k)


def rayleigh_ritz(inputs, outputs, k: int):
    r"""Top ``k`` Ritz pairs of ``H`` on ``span(inputs)`` from recorded products ``H x_j``.

    With ``X = [x_1 .. x_m]`` (d x m) and ``Y = H X``: pivoted QR ``X P = Q R``, keeping the
    ``r`` columns with ``|R_jj| > 1e-8 |R_11|`` (an independent subset), so
    ``H Q_r = Y P_r R_11^{-1}`` exactly; then ``T = Q_r^T H Q_r = S diag(theta) S^T``.
    Returns ``(theta (desc, <= k), residuals ||H Q_r s_i - theta_i Q_r s_i||)`` (numpy arrays).
    """
    X = np.stack(inputs, axis=1)
    Y = np.stack(outputs, axis=1)
    Q, R, piv = scipy.linalg.qr(X, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    r = int(np.sum(diag > _RANK_TOL * diag[0])) if diag.size and diag[0] > 0 else 0
    if r == 0:
        return np.array([]), np.array([])
    Q = Q[:, :r]
    HQ = scipy.linalg.solve_triangular(R[:r, :r], Y[:, piv[:r]].T, trans="T", lower=False).T
    T = Q.T @ HQ
    theta, S = scipy.linalg.eigh(0.5 * (T + T.T))
    theta, S = theta[::-1][:k], S[:, ::-1][:, :k]
    residuals = np.linalg.norm(HQ @ S - (Q @ S) * theta, axis=0)
    return theta, residuals


def _explicit(op: SymmetricTorchOperator, values, vectors):
    """Residuals ``||H v - theta v||`` of unit Ritz vectors by ``k`` new products."""
    op.budget = None  # reserved in advance by top_eigenpairs
    V = vectors / np.linalg.norm(vectors, axis=0)
    return np.linalg.norm(op.matmat(V) - V * values, axis=0)


def _estimate(op, k, values=None, vectors=None):
    """Best top-``k`` values and their residuals: Rayleigh-Ritz on the records, else the
    solver's own pairs with explicit residuals (NaN if it returned none)."""
    if op.recorded and op.inputs:
        return rayleigh_ritz(op.inputs, op.outputs, k)
    if vectors is None or len(values) == 0:
        return np.full(k, np.nan), np.full(k, np.inf)
    order = np.argsort(values)[::-1][:k]
    values, vectors = np.asarray(values)[order], np.asarray(vectors)[:, order]
    return values, _explicit(op, values, vectors)


def _monitor(op, k, tol):
    """Stop the solver as soon as the recorded products meet the criterion: ARPACK checks
    only when it restarts (every ``ncv`` products), a Rayleigh-Ritz step on the records can
    check after every product (within ARPACK's first cycle that is plain Lanczos). Checks
    every product up to 40 records, then every 10th (the check costs ``O(d m^2)``)."""
    def check():
        m = len(op.inputs)
        if m > k and (m <= 40 or m % 10 == 0):
            theta, residuals = rayleigh_ritz(op.inputs, op.outputs, k)
            if _converged(theta, residuals, k, tol):
                raise SolverStopped("converged on the recorded products")
    return check


def _eigsh(op, k, tol, start):
    """ARPACK on ``op``; ``(values, vectors)`` of what converged (``None`` when stopped)."""
    dim, budget = op.shape[0], op.budget
    ncv = min(dim, max(2 * k + 1, 20))
    if budget is not None:
        ncv = max(k + 1, min(ncv, budget - 1))
    op.monitor = _monitor(op, k, tol)
    try:
        values, vectors = eigsh(op, k=k, which="LA", tol=tol, ncv=ncv, v0=start[:, 0],
                                maxiter=max(1, budget or 10 * dim))
        return values, vectors
    except ArpackNoConvergence as exc:
        return exc.eigenvalues, exc.eigenvectors
    except SolverStopped:
        return None, None
    finally:
        op.monitor = None


def _lobpcg(op, k, tol, start):
    """Chunked LOBPCG: one iteration gives the scale ``min_i |theta_i|``, then chunks of 20
    iterations at the absolute tolerance ``tol * min_i |theta_i|`` until our relative criterion
    holds on the recorded products (without records: one run to the budget's end)."""
    import warnings
    X, values, abs_tol, chunk = start, None, None, 1
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is reported by us
            try:
                values, X = lobpcg(op, X, largest=True, tol=abs_tol, maxiter=chunk)
            except ProductBudgetExhausted:
                return values, X
        if op.recorded:
            theta, residuals = rayleigh_ritz(op.inputs, op.outputs, k)
            if _converged(theta, residuals, k, tol) or (
                    op.budget is None and op.products > 20 * op.shape[0]):  # no budget: a cap
                return values, X
        elif chunk > 1:
            return values, X
        else:
            theta = np.asarray(values)
        scale = np.min(np.abs(theta)) if theta.size else 0.0
        abs_tol = max(tol * scale, np.finfo(np.float64).eps * max(np.max(np.abs(theta)), 1.0))
        left = (op.budget - op.products) // k if op.budget is not None else 10 * op.shape[0]
        chunk = _LOBPCG_CHUNK if op.recorded else max(1, left)


def _dense(op, k):
    """Small operators: all ``dim`` products (identity columns), then the exact spectrum."""
    try:
        op.matmat(np.eye(op.shape[0]))
    except ProductBudgetExhausted:
        pass
    return None, None


def _converged(values, residuals, k, tol) -> bool:
    return (len(values) == k and bool(np.all(np.isfinite(values)))
            and bool(np.all(residuals <= tol * np.abs(values))))


def top_eigenpairs(op: SymmetricTorchOperator, k: int = 1, *, tol: float = 1e-3,
                   solver: str = "auto", seed: int = 0) -> dict:
    r"""Largest ``k`` (algebraic) eigenvalues of the symmetric ``op``, with honest residuals.

    ``op.budget`` caps the products (``None``: unlimited); ``op`` should record its products
    (``record_bytes``) or leave ``k`` products of budget for the explicit residuals. Operators
    with ``dim <= max(2k + 1, 8)`` (or ``< 5 k`` for LOBPCG) are solved densely.

    Returns dict: ``values`` (descending, ``k`` floats; NaN where nothing is known),
    ``residuals`` (``||H v_i - theta_i v_i||``), ``converged`` (``residual_i <= tol
    |theta_i|`` for all ``i``), ``hvps`` (products used), ``iterations`` (= ``hvps``),
    ``solver`` (``"eigsh"``, ``"lobpcg"`` or ``"dense"``), ``block`` (block solver: finds
    eigenvalues of multiplicity up to ``k``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if solver == "auto":
        solver = "eigsh" if k == 1 else "lobpcg"
    dim = op.shape[0]
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters {dim}")
    start = np.random.default_rng(int(seed)).standard_normal((dim, k))
    if dim <= max(2 * k + 1, 8) or (solver == "lobpcg" and dim < 5 * k):
        used = "dense"
        values, vectors = _dense(op, k)
    elif solver == "eigsh":
        used = "eigsh"
        values, vectors = _eigsh(op, k, tol, start)
    else:
        used = "lobpcg"
        values, vectors = _lobpcg(op, k, tol, start)
    values, residuals = _estimate(op, k, values, vectors)
    values = np.concatenate([values, np.full(k - len(values), np.nan)])
    residuals = np.concatenate([residuals, np.full(k - len(residuals), np.inf)])
    return {"values": [float(v) for v in values], "residuals": [float(r) for r in residuals],
            "converged": _converged(values, residuals, k, tol), "hvps": op.products,
            "iterations": op.products, "solver": used, "block": used in ("lobpcg", "dense")}
