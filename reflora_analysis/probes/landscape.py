r"""1-D and 2-D slices of the loss around the current (LoRA) parameters.

``loss_landscape`` evaluates ``l(theta + a d1)`` (1-D) or ``l(theta + a d1 + b d2)`` (2-D) on a
symmetric grid ``a, b in extent * {-h..h} / h`` (``n_points = 2h + 1``: the centre is a grid
point exactly and the grid is exactly symmetric). Directions are ``"random"`` (Gaussian,
seeded) or ``"update"`` (the negative gradient: the SGD update direction), then normalised:

``"filter"``
    Li et al. 2018, literally: each dim-0 slice of each direction tensor is scaled to the
    norm of the same slice of the parameter; 1-D parameters (biases, norms) get a zero
    direction. For LoRA this is invariant to ``(c A, B / c)`` but *not* to a per-rank rescale
    ``(A C, B C^{-1})``, which leaves the function unchanged (``PROBES.md``: 745x change).
``"rank"``
    Per rank component: column j of ``dA`` (= column j of PEFT ``lora_B``) is scaled to
    ``||A[:, j]||`` and column j of ``dB`` (= row j of PEFT ``lora_A``) to ``||B[:, j]||``, so the
    slice is invariant to every diagonal ``C``. Trainable non-LoRA parameters: filter.
``"delta-w"``
    Directions live in the product space: per layer a direction ``D`` (m x n; Gaussian, or
    ``-G`` for ``"update"``) scaled to ``||D||_F = ||A B^T||_F``, and the slice is the loss with
    the adapter's product replaced by ``A B^T + a D1 + b D2`` -- realised exactly by temporarily
    widening the factors to ``[A, a D1 + b D2]`` and ``[B, I_n]``. ``D`` is drawn in W-space and
    never sees the factorization, so the slice is invariant to all of GL(r). Non-LoRA trainable
    parameters are held fixed. Needs adapters that compute ``A B^T`` by matrix products
    (PEFT Linear LoRA, plain ``A @ B.T``).

At the usual ``B = 0`` start (a zero factor) every factor-space normalisation gives a flat
slice (the zero factor's direction is zero, so the product stays 0): it is detected,
warned about and flagged (``flat_start``), as is any slice that is numerically constant
(``flat``). Parameters, grads, ``requires_grad`` and modes are restored exactly.
Cost: ``n_points`` (1-D) or ``n_points^2`` (2-D) forward passes, plus one backward for
``"update"``.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..pairs import NoLoraLayersError, find_lora_pairs
from ._util import (LossClosure, _augment, evaluate_loss, gradient_in_W, math_attention,
                    preserved_state, trainable_parameters)

__all__ = ["loss_landscape", "FlatSliceWarning", "NORMALIZATIONS"]

NORMALIZATIONS = ("filter", "rank", "delta-w")


class FlatSliceWarning(UserWarning):
    """The slice is flat, typically because a LoRA factor is zero (the B = 0 start)."""


def symmetric_grid(extent: float, n_points: int) -> np.ndarray:
    """``extent * k / h`` for ``k = -h..h``: exactly symmetric, exactly 0 in the middle."""
    if not isinstance(n_points, int) or n_points < 3 or n_points % 2 == 0:
        raise ValueError(f"n_points must be an odd integer >= 3 (the centre is a grid point), "
                         f"got {n_points!r}")
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent!r}")
    h = n_points // 2
    k = np.arange(-h, h + 1, dtype=np.float64)
    return extent * k / h


def _filter_normalise(d: Tensor, p: Tensor) -> Tensor:
    if p.dim() <= 1:
        return torch.zeros_like(d)
    dims = tuple(range(1, p.dim()))
    p_norm = p.norm(dim=dims, keepdim=True)
    d_norm = d.norm(dim=dims, keepdim=True)
    return d * p_norm / torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm))


def _column_normalise(d: Tensor, x: Tensor) -> Tensor:
    """Scale each column of ``d`` to the norm of the same column of ``x`` (both k x r)."""
    d_norm = d.norm(dim=0, keepdim=True)
    safe = torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm))
    return d * x.norm(dim=0, keepdim=True) / safe


def _factor_direction(kind, params, pairs, normalization, gen, grads):
    """Direction per trainable parameter (storage orientation) for filter / rank modes."""
    raw = []
    for i, p in enumerate(params):
        if kind == "random":
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            raw.append(d.to(p.device, p.dtype))
        else:
            raw.append(-grads[i].detach().clone())
    pair_of = {}
    if normalization == "rank":
        for pr in pairs:
            pair_of[id(pr.a)] = (pr, "a")
            pair_of[id(pr.b)] = (pr, "b")
    out = []
    for p, d in zip(params, raw):
        entry = pair_of.get(id(p))
        if entry is None:
            out.append(_filter_normalise(d, p.detach()))
            continue
        pr, which = entry
        if which == "a" or not pr.b_transposed:  # stored as m x r or n x r: columns are ranks
            out.append(_column_normalise(d, p.detach()))
        else:  # PEFT lora_A: r x n, rank components are rows
            out.append(_column_normalise(d.T, p.detach().T).T)
    return out


def _delta_w_direction(kind, pairs, gen, G_list, products):
    dirs = []
    for pr, G, M in zip(pairs, G_list, products):
        m, n = pr.shape
        D = (torch.randn(m, n, generator=gen, dtype=torch.float64).to(M.device, M.dtype)
             if kind == "random" else -G.to(M.dtype))
        dirs.append(D)
    norms = [float(M.norm()) for M in products]
    zero_product = all(nm == 0 for nm in norms)
    scaled = []
    for D, nm in zip(dirs, norms):
        target = 1.0 if zero_product else nm
        dn = float(D.norm())
        scaled.append(D * (target / dn) if dn > 0 else D)
    return scaled, zero_product


def _check_slice(dims: int, directions, normalization: str) -> tuple[str, ...]:
    """The slice's directions as a tuple of ``dims`` names; ``ValueError`` on bad input."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid: "
                         f"{', '.join(NORMALIZATIONS)}")
    if isinstance(directions, str):
        directions = (directions,) * dims
    directions = tuple(directions)
    if len(directions) != dims or any(d not in ("random", "update") for d in directions):
        raise ValueError(f"directions must be {dims} of 'random'/'update', got {directions!r}")
    return directions


def _slice_pairs(model, pairs, normalization: str) -> list:
    if pairs is not None:
        return find_lora_pairs(pairs)
    try:
        return find_lora_pairs(model)
    except NoLoraLayersError:
        if normalization != "filter":  # rank / delta-w need to know the factors
            raise
        return []  # filter normalisation of a plain model: no LoRA-specific checks


def _factor_space_setter(model, loss_closure, params, pairs, directions, normalization, gen):
    """``(set_point, flat_start)`` for directions in factor space (filter / rank modes).

    ``set_point(offsets)`` writes ``theta0 + sum_k offsets[k] d_k`` into the parameters; a zero
    factor (the PEFT ``B = 0`` start) keeps the product, hence the slice, flat: warned.
    """
    zero = [pr.name for pr in pairs if float(pr.A.abs().max()) == 0 or float(pr.B.abs().max()) == 0]
    if zero:
        warnings.warn(f"LoRA factor is zero in {len(zero)} layer(s) (e.g. {zero[0]}: the "
                      f"B = 0 start); a {normalization!r} slice keeps the product at 0 and "
                      "is flat there. Use normalization='delta-w'.", FlatSliceWarning,
                      stacklevel=3)
    grads = None
    if "update" in directions:
        with math_attention(), torch.enable_grad():
            grads = torch.autograd.grad(evaluate_loss(loss_closure), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    dirs = [_factor_direction(kind, params, pairs, normalization, gen, grads) for kind in directions]
    base = [p.detach().clone() for p in params]

    def set_point(offsets):
        for i, p in enumerate(params):
            val = base[i]
            for c, d in zip(offsets, dirs):
                val = val + c * d[i]
            p.data.copy_(val)
    return set_point, bool(zero)


def _delta_w_setter(model, loss_closure, pairs, directions, gen):
    """``(set_point, False)`` for directions in product space: ``W0 + A B^T + sum_k c_k D_k``
    (GL(r)-invariant), realised by widening each pair (``_augment``) under ``no_grad``."""
    G_list = (gradient_in_W(model, loss_closure, pairs) if "update" in directions
              else [None] * len(pairs))
    products = [(pr.A @ pr.B.T).detach() for pr in pairs]
    dirs = []
    for kind in directions:
        d, zero_product = _delta_w_direction(kind, pairs, gen, G_list, products)
        dirs.append(d)
    if zero_product:
        warnings.warn("every LoRA product A B^T is 0 (the B = 0 start): delta-W directions "
                      "are normalised to unit Frobenius norm per layer instead",
                      FlatSliceWarning, stacklevel=3)
    originals = [(pr.a.data, pr.b.data) for pr in pairs]

    def set_point(offsets):
        for k, pr in enumerate(pairs):
            pr.a.data, pr.b.data = originals[k]
            if all(c == 0 for c in offsets):
                continue  # the centre: the unmodified model, bit for bit
            m, n = pr.shape
            extra = sum(c * d[k] for c, d in zip(offsets, dirs))
            _augment(pr, extra, torch.eye(n, dtype=extra.dtype, device=extra.device))
    return set_point, False


def loss_landscape(model: nn.Module, loss_closure: LossClosure, *, dims: int = 1,
                   directions: Sequence[str] | str = "random", normalization: str = "filter",
                   extent: float = 1.0, n_points: int = 21, seed: int = 0,
                   pairs=None) -> dict:
    r"""Loss on a 1-D or 2-D slice through the current parameters; see the module docstring.

    Parameters
    ----------
    model : nn.Module
        Its ``requires_grad`` parameters are perturbed (filter / rank modes).
    loss_closure : callable () -> scalar tensor
    dims : 1 or 2
    directions : "random" | "update" | sequence of ``dims`` of them
    normalization : "filter" | "rank" | "delta-w"
    extent : float
        Grid half-width (in units of the normalised direction).
    n_points : odd int
        Points per axis.
    pairs : list of LoraPair, optional
        Defaults to ``find_lora_pairs(model)`` (needed for rank and delta-w modes).

    Returns
    -------
    dict with ``grid`` (n_points,), ``loss`` ((n_points,) or (n_points, n_points), indexed
    ``[i]`` / ``[i, j]`` for ``grid[i]`` (first direction) and ``grid[j]`` (second)),
    ``centre_loss``, ``seed``, ``normalization``, ``directions``, ``extent``, ``flat``,
    ``flat_start``, ``evaluations``, ``seconds``.
    """
    directions = _check_slice(dims, directions, normalization)
    grid = symmetric_grid(float(extent), n_points)
    params = trainable_parameters(model)
    pairs = _slice_pairs(model, pairs, normalization)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    evaluations = 0
    with preserved_state(model, [t for pr in pairs for t in pr.params] + params):
        model.eval()
        with torch.no_grad():
            centre = float(evaluate_loss(loss_closure))
        if normalization in ("filter", "rank"):
            set_point, flat_start = _factor_space_setter(model, loss_closure, params, pairs,
                                                          directions, normalization, gen)
        else:
            set_point, flat_start = _delta_w_setter(model, loss_closure, pairs, directions, gen)

        def value(offsets):
            nonlocal evaluations
            set_point(offsets)
            evaluations += 1
            with torch.no_grad(), math_attention():
                return float(evaluate_loss(loss_closure))

        if dims == 1:
            loss = np.array([value((a,)) for a in grid])
        else:
            loss = np.array([[value((a, b)) for b in grid] for a in grid])
    spread = float(np.nanmax(loss) - np.nanmin(loss))
    flat = spread <= 1e-12 * max(1.0, abs(centre))
    if flat and not flat_start:
        warnings.warn("the loss slice is numerically constant", FlatSliceWarning, stacklevel=2)
    return {"grid": grid, "loss": loss, "centre_loss": centre, "seed": int(seed),
            "normalization": normalization, "directions": list(directions),
            "extent": float(extent), "dims": dims, "flat": bool(flat), "flat_start": flat_start,
            "evaluations": evaluations, "seconds": time.perf_counter() - start}
