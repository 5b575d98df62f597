r"""Single-layer tasks: ``W = W0 + A B^T`` with one LoRA pair and a loss known in closed form.

All three tasks expose ``loss_in_W`` (``l`` as a function of the full ``m x n`` weight) and
its exact smoothness constant ``L`` (``THEORY.md`` F8 needs it), use full-batch gradients
(``batch(step)`` returns ``None``, so SGD is deterministic) and default to float64.

``mf`` — matrix factorization, the paper's first experiment
-----------------------------------------------------------
    l(W) = 1/2 ||W - Y||_F^2,   W = A B^T   (W0 = 0),   L = 1.

Default problem (chosen so that the paper's figure, reference
``paper-matrix-factorization-loss.png``, appears with plain full-batch SGD):

- sizes m = 30, n = 20, factor rank r = 4;
- target ``Y = U diag(s) V^T`` of rank 4, ``U``, ``V`` orthonormal (QR of Gaussians),
  singular values ``s`` evenly spaced from ``sigma_max = 12`` down to ``12 / 1.5 = 8``
  (condition number 1.5), so ``1/2 ||Y||_F^2 ~ 205`` is the initial loss scale;
- unbalanced initialisation, entries i.i.d. Gaussian: ``A ~ 0.01 N(0, 1)`` (the output
  side nearly zero, as PEFT's zero ``lora_B``) and ``B ~ 2 N(0, 1)``, so
  ``||B||_2^2 ~ 4 (sqrt(20) + 2)^2 ~ 170`` while ``||A||_2^2 ~ 1e-3``;
- default SGD step size ``eta = 0.01`` (the paper's).

Why the picture appears: plain LoRA's weight update is ``-eta (A A^T G + G B B^T)``; its
curvature is about ``||A||_2^2 + ||B||_2^2 ~ 170``, so ``eta = 0.01`` sits just inside the
stability limit ``2 / 170`` and ``3 eta = 0.03`` is far beyond it (LoRA diverges), while
the directions of ``Y`` outside ``col(B)`` are fitted at the slow rate ``eta ||A||^2``
(LoRA stays above 0.1 x its initial loss for 100 steps). RefLoRA's update
``-eta ((M M^T)^{1/2} G + G (M^T M)^{1/2})`` (F6) depends on ``M = A B^T`` alone, whose
curvature is about ``2 sigma_1(Y) = 24``: both step sizes are stable and the loss drops
below 1e-3 x its initial value within 100 steps (seeds 0..4 checked). Measured, seed 0,
float64, full-batch SGD (``tests/test_tasks.py`` asserts the claims, not these numbers):

    method    eta     l_0     l_50        l_100       first t with l_t < 1e-3 l_0
    LoRA      0.01    204.9   117.9       75.35       never (min 0.37 l_0)
    RefLoRA   0.01    204.9   5.011       1.93e-4     63
    LoRA      0.03    204.9   diverged: 337, 1.38e3, ... 8.8e278 at t = 10, inf at t = 11
    RefLoRA   0.03    204.9   1.34e-8     1.59e-20    22

``sensing`` — matrix sensing from Gaussian measurements
-------------------------------------------------------
    y_i = <X_i, W*>,  X_i with i.i.d. N(0, 1) entries,  i = 1..N,
    l(W) = 1/(2N) sum_i (<X_i, W> - y_i)^2,   W = A B^T   (W0 = 0).

With ``𝒳`` the N x (m n) matrix of vectorised measurements, ``L = lambda_max(𝒳^T 𝒳) / N``,
computed exactly (one symmetric eigendecomposition of ``𝒳 𝒳^T / N`` or ``𝒳^T 𝒳 / N``,
whichever is smaller). Defaults: m = 20, n = 15, r = 3, rank-3 ``W*`` with singular values
from 3 down to 1.5, N = 400 measurements (about 3.8 r (m + n)), initialisation as ``mf``
(``A ~ 0.01 N(0,1)``, ``B ~ 1 N(0,1)``). ``evaluate`` reports ``||W - W*||_F / ||W*||_F``.

``lowrank-regression`` — adapting a frozen W0 on least squares
--------------------------------------------------------------
    targets  Y = X W*^T + noise,  W* = W0 + Delta,  rank(Delta) = r*,
    l(W) = 1/(2N) ||X W^T - Y||_F^2,   W = W0 + A B^T,   W, W0 in R^{m x n},

with inputs ``X`` (N x n) in rows (the ``nn.Linear`` orientation: outputs ``X W^T``). The
Hessian of ``l`` in ``W`` is ``(X^T X / N) (x) I_m``, so ``L = lambda_max(X^T X) / N``
exactly. Defaults: m = 24, n = 16, r = r* = 4, N = 256 training and 256 held-out inputs
with covariance eigenvalues spread log-uniformly over ``input_condition = 10``,
``W0 ~ N(0, 1/n)``, ``Delta`` with singular values from 2 down to 1, no noise, init
``A ~ 0.01 N(0,1)``, ``B ~ 0.5 N(0,1)``. ``evaluate`` reports the held-out loss and
``||W - W*||_F / ||Delta||_F``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..pairs import find_lora_pairs
from .base import Task, TaskOptions, resolve_device

__all__ = ["FactorModel", "make_mf", "make_sensing", "make_lowrank_regression"]


class FactorModel(nn.Module):
    """``W = W0 + A B^T`` with ``A`` (m x r) and ``B`` (n x r) trainable, ``W0`` a frozen buffer."""

    def __init__(self, W0: Tensor, A: Tensor, B: Tensor):
        super().__init__()
        self.register_buffer("W0", W0)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)

    def forward(self) -> Tensor:
        return self.W0 + self.A @ self.B.T


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def _low_rank(m: int, n: int, rank: int, sigma_max: float, condition: float,
              gen: torch.Generator) -> Tensor:
    """``U diag(s) V^T`` with ``s`` evenly spaced from ``sigma_max`` to ``sigma_max / condition``."""
    U = _orthonormal(m, rank, gen)
    V = _orthonormal(n, rank, gen)
    s = torch.linspace(sigma_max, sigma_max / condition, rank, dtype=torch.float64)
    return (U * s) @ V.T


def _common_options(opts: TaskOptions) -> tuple[int, int, int, int]:
    m, n = opts.positive_int("m"), opts.positive_int("n")
    rank, target_rank = opts.positive_int("rank"), opts.positive_int("target_rank")
    for key, value in (("rank", rank), ("target_rank", target_rank)):
        if value > min(m, n):
            raise ValueError(f"task {opts.task!r}: {key}={value} exceeds min(m, n)={min(m, n)}")
    opts.positive_float("sigma_max")
    if opts.positive_float("condition") < 1:
        raise ValueError(f"task {opts.task!r}: condition must be >= 1, got {opts['condition']!r}")
    opts.positive_float("a_scale", allow_zero=True)
    opts.positive_float("b_scale", allow_zero=True)
    return m, n, rank, target_rank


def _init_factors(m: int, n: int, rank: int, opts: TaskOptions, gen: torch.Generator):
    A = opts["a_scale"] * torch.randn(m, rank, generator=gen, dtype=torch.float64)
    B = opts["b_scale"] * torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return A, B


def _build(name: str, opts: TaskOptions, seed: int, device, W0: Tensor, A: Tensor, B: Tensor,
           loss_in_W, evaluate_in_W, smoothness: float, default_lr: dict, description: str,
           tensors: dict) -> Task:
    dev = resolve_device(device)
    dtype = opts.dtype()
    model = FactorModel(W0.to(dev, dtype), A.to(dev, dtype), B.to(dev, dtype))
    moved = {k: v.to(dev, dtype) for k, v in tensors.items()}
    pairs = find_lora_pairs([(model.A, model.B)])
    pairs = [type(p)(name=f"{name}.W", a=p.a, b=p.b, scaling=1.0, b_transposed=False) for p in pairs]

    def l_of_W(W: Tensor) -> Tensor:
        return loss_in_W(W, moved)

    def loss(batch=None) -> Tensor:
        return l_of_W(model())

    def batch(step: int):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return None  # full batch: every step sees all the data

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in evaluate_in_W(model(), moved).items()}

    config = {"task": name, "seed": seed, "device": str(dev), **opts.to_config(),
              "smoothness": smoothness}
    return Task(name=name, model=model, pairs=pairs, loss=loss, batch=batch, evaluate=evaluate,
                default_lr=dict(default_lr), smoothness=smoothness, loss_in_W=l_of_W,
                W0=model.W0, config=config, description=description)


MF_DEFAULTS = dict(m=30, n=20, rank=4, target_rank=4, sigma_max=12.0, condition=1.5,
                   a_scale=0.01, b_scale=2.0, dtype="float64")
MF_DEFAULT_LR = {"sgd": 0.01, "adamw": 0.05}


def _relative_error(W, target):
    """``||W - target||_F / ||target||_F``, the recovery metric of the single-layer tasks."""
    return torch.linalg.matrix_norm(W - target) / torch.linalg.matrix_norm(target)


def make_mf(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """``min 1/2 ||A B^T - Y||_F^2`` (the paper's matrix factorization); see the module docstring.

    ``quick`` changes nothing: the default problem already runs 100 SGD steps in well
    under a second.
    """
    opts = TaskOptions("mf", MF_DEFAULTS, overrides)
    m, n, rank, target_rank = _common_options(opts)
    gen = torch.Generator().manual_seed(seed)
    Y = _low_rank(m, n, target_rank, opts["sigma_max"], opts["condition"], gen)
    A, B = _init_factors(m, n, rank, opts, gen)

    def loss_in_W(W, t):
        return 0.5 * (W - t["Y"]).square().sum()

    def evaluate_in_W(W, t):
        return {"relative_error": _relative_error(W, t["Y"]),
                "loss": loss_in_W(W, t)}

    desc = (f"Matrix factorization 1/2||A B^T - Y||_F^2 (paper Fig. 1): m={m}, n={n}, r={rank}, "
            f"Y of rank {target_rank} with singular values {opts['sigma_max']:g}..."
            f"{opts['sigma_max'] / opts['condition']:g}, unbalanced init A~{opts['a_scale']:g}N(0,1), "
            f"B~{opts['b_scale']:g}N(0,1); full batch, L=1. Metric: ||W-Y||_F/||Y||_F.")
    return _build("mf", opts, seed, device, torch.zeros(m, n, dtype=torch.float64), A, B,
                  loss_in_W, evaluate_in_W, 1.0, MF_DEFAULT_LR, desc, {"Y": Y})


SENSING_DEFAULTS = dict(m=20, n=15, rank=3, target_rank=3, sigma_max=3.0, condition=2.0,
                        measurements=400, a_scale=0.01, b_scale=1.0, dtype="float64")
SENSING_DEFAULT_LR = {"sgd": 0.1, "adamw": 0.05}


def make_sensing(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """Matrix sensing ``1/(2N) sum_i (<X_i, A B^T> - y_i)^2``; see the module docstring."""
    opts = TaskOptions("sensing", SENSING_DEFAULTS, overrides)
    m, n, rank, target_rank = _common_options(opts)
    N = opts.positive_int("measurements")
    gen = torch.Generator().manual_seed(seed)
    W_star = _low_rank(m, n, target_rank, opts["sigma_max"], opts["condition"], gen)
    X = torch.randn(N, m, n, generator=gen, dtype=torch.float64)
    y = torch.einsum("kij,ij->k", X, W_star)
    flat = X.reshape(N, m * n)
    gram = flat @ flat.T if N <= m * n else flat.T @ flat  # same nonzero spectrum
    smoothness = float(torch.linalg.eigvalsh(gram / N)[-1])
    A, B = _init_factors(m, n, rank, opts, gen)

    def loss_in_W(W, t):
        residual = torch.einsum("kij,ij->k", t["X"], W) - t["y"]
        return 0.5 * residual.square().mean()

    def evaluate_in_W(W, t):
        return {"relative_error": _relative_error(W, t["W_star"]),
                "loss": loss_in_W(W, t)}

    desc = (f"Matrix sensing from N={N} Gaussian measurements y_i=<X_i, W*>, W* of rank {target_rank} "
            f"({m}x{n}, singular values {opts['sigma_max']:g}...{opts['sigma_max'] / opts['condition']:g}); "
            f"loss 1/(2N) sum (<X_i, A B^T> - y_i)^2, r={rank}, L=lambda_max(X^T X)/N={smoothness:.4g} exactly. "
            "Metric: ||W-W*||_F/||W*||_F.")
    return _build("sensing", opts, seed, device, torch.zeros(m, n, dtype=torch.float64), A, B,
                  loss_in_W, evaluate_in_W, smoothness, SENSING_DEFAULT_LR, desc,
                  {"X": X, "y": y, "W_star": W_star})


REGRESSION_DEFAULTS = dict(m=24, n=16, rank=4, target_rank=4, sigma_max=2.0, condition=2.0,
                           samples=256, test_samples=256, input_condition=10.0, noise_std=0.0,
                           a_scale=0.01, b_scale=0.5, dtype="float64")
REGRESSION_DEFAULT_LR = {"sgd": 0.2, "adamw": 0.05}


def _inputs(N: int, n: int, input_condition: float, gen: torch.Generator) -> Tensor:
    """Rows ~ N(0, Sigma), Sigma's eigenvalues log-uniform on [1/input_condition, 1], random basis."""
    Q = _orthonormal(n, n, gen)
    scales = torch.logspace(0, -math.log10(input_condition), n, dtype=torch.float64).sqrt()
    return (torch.randn(N, n, generator=gen, dtype=torch.float64) * scales) @ Q.T


def make_lowrank_regression(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """Least squares ``1/(2N) ||X (W0 + A B^T)^T - Y||_F^2`` with a frozen ``W0``; see the module docstring."""
    opts = TaskOptions("lowrank-regression", REGRESSION_DEFAULTS, overrides)
    m, n, rank, target_rank = _common_options(opts)
    N, N_test = opts.positive_int("samples"), opts.positive_int("test_samples")
    if opts.positive_float("input_condition") < 1:
        raise ValueError(f"task 'lowrank-regression': input_condition must be >= 1, got {opts['input_condition']!r}")
    noise_std = opts.positive_float("noise_std", allow_zero=True)
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    delta = _low_rank(m, n, target_rank, opts["sigma_max"], opts["condition"], gen)
    W_star = W0 + delta
    X = _inputs(N, n, opts["input_condition"], gen)
    X_test = _inputs(N_test, n, opts["input_condition"], gen)
    Y = X @ W_star.T + noise_std * torch.randn(N, m, generator=gen, dtype=torch.float64)
    Y_test = X_test @ W_star.T + noise_std * torch.randn(N_test, m, generator=gen, dtype=torch.float64)
    smoothness = float(torch.linalg.eigvalsh(X.T @ X / N)[-1])
    A, B = _init_factors(m, n, rank, opts, gen)

    def loss_in_W(W, t):
        return 0.5 * (t["X"] @ W.T - t["Y"]).square().sum() / t["X"].shape[0]

    def evaluate_in_W(W, t):
        test = 0.5 * (t["X_test"] @ W.T - t["Y_test"]).square().sum() / t["X_test"].shape[0]
        rel = torch.linalg.matrix_norm(W - t["W_star"]) / torch.linalg.matrix_norm(t["delta"])
        return {"test_loss": test, "relative_error": rel, "loss": loss_in_W(W, t)}

    desc = (f"Low-rank adaptation of a frozen W0 ({m}x{n}) by least squares 1/(2N)||X W^T - Y||_F^2, "
            f"W = W0 + A B^T, target W0 + Delta with rank(Delta)={target_rank}, N={N} inputs "
            f"(covariance condition {opts['input_condition']:g}), r={rank}; L=lambda_max(X^T X)/N="
            f"{smoothness:.4g} exactly. Metrics: held-out loss, ||W-W*||_F/||Delta||_F.")
    return _build("lowrank-regression", opts, seed, device, W0, A, B, loss_in_W, evaluate_in_W,
                  smoothness, REGRESSION_DEFAULT_LR, desc,
                  {"X": X, "Y": Y, "X_test": X_test, "Y_test": Y_test, "W_star": W_star, "delta": delta})
