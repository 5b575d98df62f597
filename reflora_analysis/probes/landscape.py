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

Two views along and across training (:class:`Snapshot`: a copy of the trainable state):

:func:`interpolation`
    The loss along the straight line between two states (two checkpoints, or two methods'
    solutions), ``t`` beyond ``[0, 1]`` too. Default ``space="delta-w"``: per layer
    ``s [(1 - t) A_0 B_0^T + t A_1 B_1^T]`` (and ``(1 - t) h_0 + t h_1`` for other trainable
    tensors, e.g. a head). This path depends on the two functions only: refactoring either
    endpoint (any ``P`` in GL(r)) leaves it unchanged, whereas the factor-space line
    ``((1 - t) A_0 + t A_1)((1 - t) B_0 + t B_1)^T`` (``space="factors"``) changes with the
    factorizations and can show a barrier between two identical functions (``PROBES.md``).
:func:`trajectory_pca` and :func:`plane_loss_grid`
    Several methods' trajectories on one plane: PCA of every snapshot's ``delta W`` (all
    layers, ``s A B^T``, plus the other trainable tensors), GL(r)-invariant for the same
    reason, computed from the snapshots' Gram matrix (``<A_i B_i^T, A_j B_j^T> =
    tr(A_i^T A_j B_j^T B_i)``: ``r x r`` products, never an ``m x n`` vector per snapshot)
    with ``numpy.linalg.svd``; the explained variance of each axis is returned. The loss is
    then evaluated on a grid over the plane (mean + ``a d_1 + b d_2``), each point realised
    exactly as a weighted sum of the snapshots' products.

Both realise a combination ``sum_k w_k s A_k B_k^T`` by substituting widened factors
``[w_1 A_1, ..., w_K A_K]`` and ``[B_1, ..., B_K]`` for the model's own
(:func:`~._util.substituted_parameters`: the parameters are never written), so the model's
adapters must compute ``A B^T`` by matrix products (PEFT Linear LoRA, plain ``A @ B.T``).

At the usual ``B = 0`` start (a zero factor) every factor-space normalisation gives a flat
slice (the zero factor's direction is zero, so the product stays 0): it is detected,
warned about and flagged (``flat_start``), as is any slice that is numerically constant
(``flat``). Parameters, grads, ``requires_grad`` and modes are restored exactly.
Cost: ``n_points`` (1-D) or ``n_points^2`` (2-D) forward passes, plus one backward for
``"update"``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..pairs import NoLoraLayersError, find_lora_pairs
from ._util import (LossClosure, _augment, evaluate_loss, gradient_in_W, math_attention,
                    preserved_state, progress_bar, substituted_parameters,
                    trainable_parameters)

__all__ = ["loss_landscape", "FlatSliceWarning", "NORMALIZATIONS", "Snapshot", "snapshot",
           "interpolation", "trajectory_pca", "plane_loss_grid", "INTERPOLATION_SPACES"]

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


# ---------------------------------------------------------------- views across training

INTERPOLATION_SPACES = ("delta-w", "factors")
F64 = torch.float64


@dataclass(frozen=True)
class Snapshot:
    """A copy of a LoRA model's trainable state.

    ``factors[l] = (A, B)``: pair ``l``'s factors in paper orientation (m x r, n x r), float64
    copies; ``scalings[l]``: its ``s``; ``others``: float64 copies of the other trainable
    tensors (e.g. a classifier head) in ``model.parameters()`` order; ``step``: a label.
    """

    factors: tuple
    scalings: tuple
    others: tuple = ()
    step: int = -1

    def delta_w(self) -> list[Tensor]:
        """``s A B^T`` per layer (m x n, float64)."""
        return [s * (A @ B.T) for (A, B), s in zip(self.factors, self.scalings)]


def _other_trainables(model: nn.Module, pairs) -> list[Tensor]:
    factor_ids = {id(t) for pr in pairs for t in pr.params}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]


def snapshot(model: nn.Module, pairs=None, step: int = -1) -> Snapshot:
    """The current trainable state of ``model`` (``pairs``: its LoRA pairs, default
    ``find_lora_pairs(model)``) as a :class:`Snapshot`; nothing is shared with the model."""
    pairs = find_lora_pairs(model if pairs is None else pairs)
    factors = tuple((pr.A.detach().to(F64).clone(), pr.B.detach().to(F64).clone())
                    for pr in pairs)
    others = tuple(p.detach().to(F64).clone() for p in _other_trainables(model, pairs))
    return Snapshot(factors, tuple(float(pr.scaling) for pr in pairs), others, int(step))


def _check_snapshots(snaps: Sequence[Snapshot], pairs, others) -> None:
    """``ValueError`` unless every snapshot has the model's layers, shapes and scalings."""
    for snap in snaps:
        if not isinstance(snap, Snapshot):
            raise ValueError(f"expected Snapshot objects, got {type(snap).__name__}")
        ok = (len(snap.factors) == len(pairs) and len(snap.others) == len(others)
              and all(A.shape == (pr.shape[0], pr.rank) and B.shape == (pr.shape[1], pr.rank)
                      and s == float(pr.scaling)
                      for (A, B), s, pr in zip(snap.factors, snap.scalings, pairs))
              and all(h.shape == p.shape for h, p in zip(snap.others, others)))
        if not ok:
            raise ValueError(f"snapshot (step {snap.step}) does not match the model: "
                             f"{len(snap.factors)} LoRA layers and {len(snap.others)} other "
                             f"tensors against {len(pairs)} and {len(others)}, or other shapes "
                             "or scalings")


def _replacements(pairs, others, point) -> dict[int, Tensor]:
    """Tensors that make the model compute ``W0 + sum_k w_k s A_k B_k^T`` per layer and
    ``sum_k w_k h_k`` for the other trainables, ``point = [(w_k, snapshot_k)]``: the widened
    factors ``[w_1 A_1, ..., w_K A_K]`` and ``[B_1, ..., B_K]`` (zero weights dropped, so a
    single snapshot of weight 1 is realised exactly)."""
    used = [(float(w), snap) for w, snap in point if w != 0]
    if not used:
        raise ValueError("every weight of the combination is 0")
    out = {}
    for i, pr in enumerate(pairs):
        A = torch.cat([w * snap.factors[i][0] for w, snap in used], dim=1)
        B = torch.cat([snap.factors[i][1] for _, snap in used], dim=1)
        out[id(pr.a)] = A.to(pr.a.device, pr.a.dtype)
        out[id(pr.b)] = (B.T if pr.b_transposed else B).to(pr.b.device, pr.b.dtype)
    for i, p in enumerate(others):
        out[id(p)] = sum(w * snap.others[i] for w, snap in used).to(p.device, p.dtype)
    return out


def _losses(model: nn.Module, loss_closure: LossClosure, pairs, points,
            progress: bool = False) -> np.ndarray:
    """The loss at each combination of snapshots in ``points`` (see :func:`_replacements`),
    in eval mode without autograd; non-finite losses are kept (far from the basin the loss
    may overflow). The model is restored exactly (its parameters are never written)."""
    others = _other_trainables(model, pairs)
    _check_snapshots({id(s): s for pt in points for _, s in pt}.values(), pairs, others)
    out = []
    with preserved_state(model, [t for pr in pairs for t in pr.params]), \
            progress_bar(progress, len(points), "landscape", unit="loss") as bar:
        model.eval()  # dropout would make the landscape random
        with torch.no_grad():
            for point in points:
                with substituted_parameters(model, _replacements(pairs, others, point)):
                    loss = loss_closure()
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("loss_closure must return a scalar tensor")
                out.append(float(loss))
                bar.update(1)
    return np.asarray(out, dtype=np.float64)


def _interpolation_grid(n_points: int, t_range: Sequence[float]) -> np.ndarray:
    """``n_points`` evenly spaced values over ``t_range`` plus 0 and 1 exactly."""
    if not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    lo, hi = (float(x) for x in t_range)
    if not (lo <= 0.0 and hi >= 1.0):
        raise ValueError(f"t_range must contain [0, 1], got {tuple(t_range)!r}")
    ts = np.linspace(lo, hi, n_points)
    close = 1e-9 * (hi - lo)
    ts[np.abs(ts) < close], ts[np.abs(ts - 1.0) < close] = 0.0, 1.0
    return np.union1d(ts, [0.0, 1.0])


def _blend(start: Snapshot, end: Snapshot, t: float) -> Snapshot:
    """The factor-space point ``((1-t) A_0 + t A_1, (1-t) B_0 + t B_1)`` (and the others)."""
    factors = tuple(((1 - t) * A0 + t * A1, (1 - t) * B0 + t * B1)
                    for (A0, B0), (A1, B1) in zip(start.factors, end.factors))
    others = tuple((1 - t) * h0 + t * h1 for h0, h1 in zip(start.others, end.others))
    return Snapshot(factors, start.scalings, others)


def interpolation(model: nn.Module, loss_closure: LossClosure, start: Snapshot, end: Snapshot,
                  *, pairs=None, space: str = "delta-w", n_points: int = 31,
                  t_range: Sequence[float] = (-0.25, 1.25), progress: bool = False) -> dict:
    r"""The loss along the line from ``start`` (t = 0) to ``end`` (t = 1), two
    :class:`Snapshot` of ``model`` (checkpoints, or two methods' solutions).

    ``space="delta-w"`` (default): per layer ``W0 + s [(1-t) A_0 B_0^T + t A_1 B_1^T]``, a
    path that depends on the two functions only (invariant to refactoring either endpoint,
    module docstring); ``"factors"``: ``W0 + s ((1-t) A_0 + t A_1)((1-t) B_0 + t B_1)^T``,
    which is not. Other trainable tensors move linearly in both. ``t``: ``n_points`` values
    over ``t_range`` plus 0 and 1 exactly, where the endpoints' own losses are realised
    bit for bit.

    Returns ``{"t", "loss", "space", "start_loss", "end_loss", "barrier", "evaluations"}``;
    ``barrier = max_{0 <= t <= 1} loss(t) - ((1-t) loss(0) + t loss(1))`` (0 when the loss
    along the segment stays below the chord). ``model`` is restored exactly.
    """
    if space not in INTERPOLATION_SPACES:
        raise ValueError(f"unknown space {space!r}; valid: {', '.join(INTERPOLATION_SPACES)}")
    ts = _interpolation_grid(n_points, t_range)
    pairs = find_lora_pairs(model if pairs is None else pairs)
    if space == "delta-w":
        points = [[(1.0 - t, start), (t, end)] for t in ts]
    else:
        points = [[(1.0, _blend(start, end, t))] for t in ts]
    loss = _losses(model, loss_closure, pairs, points, progress=progress)
    l0, l1 = float(loss[ts == 0.0][0]), float(loss[ts == 1.0][0])
    inside = (ts >= 0) & (ts <= 1)
    chord = (1 - ts[inside]) * l0 + ts[inside] * l1
    return {"t": ts, "loss": loss, "space": space, "start_loss": l0, "end_loss": l1,
            "barrier": float(np.max(loss[inside] - chord)), "evaluations": len(ts)}


def _snapshot_gram(snaps: Sequence[Snapshot]) -> np.ndarray:
    r"""``K_ij = sum_l s^2 <A_i B_i^T, A_j B_j^T>_F + sum_o <h_i, h_j>``, the inner products of
    the snapshots' ``delta W`` (and other trainables), from ``r x r`` products:
    ``<A_i B_i^T, A_j B_j^T> = sum_{pq} (A_i^T A_j)_{pq} (B_i^T B_j)_{pq}``."""
    n = len(snaps)
    K = torch.zeros(n, n, dtype=F64)
    for i in range(len(snaps[0].factors)):
        A = torch.stack([s.factors[i][0] for s in snaps])
        B = torch.stack([s.factors[i][1] for s in snaps])
        scale = torch.tensor([s.scalings[i] for s in snaps], dtype=F64)
        AtA = torch.einsum("imp,jmq->ijpq", A, A)
        BtB = torch.einsum("inp,jnq->ijpq", B, B)
        K += torch.einsum("ijpq,ijpq->ij", AtA, BtB) * scale[:, None] * scale[None, :]
    for o in range(len(snaps[0].others)):
        H = torch.stack([s.others[o].reshape(-1) for s in snaps])
        K += H @ H.T
    return K.numpy()


def trajectory_pca(trajectories: Mapping[str, Sequence[Snapshot]], anchor=None,
                   rtol: float = 1e-10) -> dict:
    r"""PCA of several trajectories' ``delta W`` (module docstring), all snapshots pooled.

    With ``X`` the N snapshots' vectors (rows), centred ``X_c = X - mean``, the Gram
    ``K_c = X_c X_c^T = U diag(sigma^2) U^T`` (:func:`numpy.linalg.svd`, ``hermitian=True``)
    gives the coordinates ``X_c v_k = sigma_k u_k`` and the directions
    ``v_k = X_c^T u_k / sigma_k = sum_i (u_k[i] / sigma_k) x_i`` (``u_k`` sums to 0), so a point
    ``mean + a v_1 + b v_2`` of the plane is ``sum_i w_i x_i`` with
    ``w_i = 1/N + a u_1[i]/sigma_1 + b u_2[i]/sigma_2``. An axis with ``sigma_k^2 <= rtol
    sigma_1^2`` (fewer than 2 independent directions) gets coordinates and weights 0.
    Signs: the last snapshot of the first trajectory has non-negative coordinates.

    ``anchor = (name, index)``: the plane is moved parallel to itself so that it passes
    through that snapshot (e.g. the best solution, so its basin is on the plane; points
    ``x_anchor + a v_1 + b v_2``, ``w = e_anchor + a u_1/sigma_1 + b u_2/sigma_2``) and the
    coordinates are measured from it; ``None``: through the mean.

    Returns ``{"coords": {name: (n_i, 2) array}, "steps": {name: [step]}, "explained_variance":
    [r_1, r_2]`` (fractions of the total variance), ``"total_variance"`` (mean squared distance
    to the mean), ``"weights"`` (N x 2), ``"origin"`` (N: the weights of the plane's origin),
    ``"anchor"``, ``"snapshots"`` (the N pooled, in order)}.
    """
    names = list(trajectories)
    snaps = [s for name in names for s in trajectories[name]]
    if len(snaps) < 3:
        raise ValueError(f"trajectory_pca needs at least 3 snapshots, got {len(snaps)}")
    if any(len(trajectories[name]) == 0 for name in names):
        raise ValueError("every trajectory needs at least one snapshot")
    for s in snaps[1:]:
        ok = (len(s.factors) == len(snaps[0].factors) and len(s.others) == len(snaps[0].others)
              and all(a.shape == b.shape for x, y in zip(s.factors, snaps[0].factors)
                      for a, b in zip(x, y)))
        if not ok:
            raise ValueError("the snapshots do not all come from the same model")
    n = len(snaps)
    centre = np.eye(n) - 1.0 / n
    Kc = centre @ _snapshot_gram(snaps) @ centre
    U, sig2, _ = np.linalg.svd(0.5 * (Kc + Kc.T), hermitian=True)
    total = float(sig2.sum())
    coords, weights, explained = np.zeros((n, 2)), np.zeros((n, 2)), [0.0, 0.0]
    last_of_first = len(trajectories[names[0]]) - 1
    for k in range(min(2, n)):
        if not (sig2[0] > 0 and sig2[k] > rtol * sig2[0]):
            continue
        u = U[:, k] - U[:, k].mean()
        u = -u if u[last_of_first] < 0 else u
        sigma = math.sqrt(sig2[k])
        coords[:, k], weights[:, k], explained[k] = sigma * u, u / sigma, sig2[k] / total
    origin = np.full(n, 1.0 / n)
    if anchor is not None:
        name, index = anchor
        if name not in trajectories or not -len(trajectories[name]) <= index < len(trajectories[name]):
            raise ValueError(f"anchor {anchor!r} names no snapshot of the trajectories")
        j = names.index(name)
        row = sum(len(trajectories[m]) for m in names[:j]) + index % len(trajectories[name])
        coords = coords - coords[row]
        origin = np.eye(n)[row]
    out_coords, out_steps, i = {}, {}, 0
    for name in names:
        k = len(trajectories[name])
        out_coords[name], i = coords[i:i + k], i + k
        out_steps[name] = [s.step for s in trajectories[name]]
    return {"coords": out_coords, "steps": out_steps, "explained_variance": explained,
            "total_variance": total / n, "weights": weights, "origin": origin,
            "anchor": None if anchor is None else list(anchor), "snapshots": snaps}


def _plane_axis(values: np.ndarray, n_grid: int, margin: float) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # a degenerate axis (direction 0): the loss is constant along it
        lo, hi = -1.0, 1.0
    pad = margin * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n_grid)


def plane_loss_grid(model: nn.Module, loss_closure: LossClosure, pca: dict, *, pairs=None,
                    n_grid: int = 31, margin: float = 0.25, progress: bool = False) -> dict:
    r"""The loss on an ``n_grid x n_grid`` grid over the plane of :func:`trajectory_pca`.

    Axis ``k`` covers the trajectories' coordinates widened by ``margin`` times their range
    on each side; the point ``(a, b)`` is ``origin + a v_1 + b v_2`` (in ``delta W`` and the
    other trainables; the origin is the mean or the anchor), realised exactly as ``sum_i w_i(a, b)`` times the snapshots' products.
    The trajectories' own points generally lie off the plane (their distance to it is what
    the unexplained variance measures), so their true losses are returned too.

    Returns ``{"a", "b"`` (n_grid,), ``"loss"`` (n_grid, n_grid), indexed ``[i, j]`` for
    ``a[i], b[j]``, ``"point_loss"``: ``{name: [loss at each snapshot]}``, ``"evaluations",
    "seconds"}``. ``model`` is restored exactly.
    """
    if not isinstance(n_grid, int) or n_grid < 3:
        raise ValueError(f"n_grid must be an integer >= 3, got {n_grid!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    start = time.perf_counter()
    pairs = find_lora_pairs(model if pairs is None else pairs)
    snaps, W = pca["snapshots"], pca["weights"]
    pooled = np.concatenate(list(pca["coords"].values()))
    a, b = (_plane_axis(pooled[:, k], n_grid, margin) for k in (0, 1))
    base = pca["origin"]
    points = [list(zip(base + x * W[:, 0] + y * W[:, 1], snaps)) for x in a for y in b]
    points += [[(1.0, s)] for s in snaps]
    loss = _losses(model, loss_closure, pairs, points, progress=progress)
    grid, own = loss[: n_grid * n_grid].reshape(n_grid, n_grid), loss[n_grid * n_grid:]
    point_loss, i = {}, 0
    for name, c in pca["coords"].items():
        point_loss[name], i = [float(v) for v in own[i:i + len(c)]], i + len(c)
    return {"a": a, "b": b, "loss": grid, "point_loss": point_loss, "evaluations": len(points),
            "seconds": time.perf_counter() - start}
