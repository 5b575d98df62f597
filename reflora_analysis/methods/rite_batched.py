r"""LoRA-RITE for many layers at once: the layout and batched kernels of :mod:`.lora_rite`.

The formulas are those of ``BASELINES.md`` section 3 (restated in :mod:`.lora_rite`); only
the bookkeeping differs from a per-layer loop. Everything that depends on the layers is
planned once, when the transform is built:

- :class:`RiteClass`: the layers sharing (rank r, dtype, device)
  (:func:`~reflora_analysis.pairs.group_pairs`). It owns every ``r x r`` quantity of its
  layers, both factors in one ``(2, L, r, r)`` tensor (index 0: the A side, 1: the B side):
  the second moments ``V`` and escaped masses ``rho`` (state), and per step the QR factors
  ``R``, their pseudo-inverses, the transports ``P`` and the preconditioners. So each ``r x r``
  step (pseudo-inverse, ``P V P^T``, ``eigh``, ...) is one batched call per class.
- :class:`RiteGroup`: inside a class, the layers of one shape (m, n, storage of B). Its
  tall ``m x r`` / ``n x r`` work (QR, unmagnified gradients, transports, first moments,
  directions) is one batched call per group on a stacked copy of the factors and
  gradients; the group keeps the bases ``U`` and first moments ``M`` of its layers stacked.

Stacking or looping (``strategy``): stacking copies the factors and gradients (4 tall
tensors per layer) into ``(k, m, r)`` batches, then every tall step is one call for the
group. On a CPU a large factor is arithmetic-bound (its QR and products dwarf a call's
dispatch) and the copy is pure overhead, so "auto" gives each layer whose factors have
``max(m, n) r >= STACK_MAX_NUMEL`` (2^16, the threshold of :mod:`.gram`) a group of its
own, where the "stack" is a view (no copy); the ``r x r`` work stays batched over the class.
Measured for issue 15 (``pre_step``, loop time / stack time, 2-core EPYC, one thread,
float32, two runs): 8 x 688 x 256 r 16 (11 k elements): 1.36, 1.28; 8 x 1024^2 r 16 (16 k):
1.05, 1.16; 8 x 2048^2 r 16 (33 k): 0.98, 1.05; 8 x 4096^2 r 16 (66 k): 0.77, 0.85;
8 x 4096^2 r 32: 0.91, 0.79; 4 x 11008 x 4096 r 32 (LLaMA-7B MLP): 0.84, 0.89. On
accelerators (dispatch-bound, copies cheap) every group is stacked.

Per-step tensors (stacks, ``Gbar``, ...) are allocated by the step and dropped after it,
as the per-layer code's temporaries were; only the state persists (a persistent workspace
would count as method state, whose target is "no more than the LoRA parameters"). No
function here reads a tensor value on the host.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..pairs import LoraPair, group_pairs
from ..theory import symmetrize
from .gram import STACK_MAX_NUMEL

__all__ = ["RiteClass", "RiteGroup", "make_rite_classes", "triangular_pinv", "second_moment",
           "escaped_mass", "preconditioner", "STRATEGIES"]

STRATEGIES = ("auto", "stack", "loop")


def triangular_pinv(R: Tensor) -> Tensor:
    r"""``R^+`` of a batch of upper-triangular ``(..., r, r)`` QR factors, without a host read.

    ``torch.linalg.pinv`` zeroes the singular values below ``rtol sigma_max``,
    ``rtol = r eps``. Where ``cond_F(R) = ||R||_F ||R^{-1}||_F < 1 / rtol`` (so
    ``cond_2 <= cond_F`` keeps every singular value above that floor) ``R^+ = R^{-1}``,
    computed by one triangular solve (O(r^3 / 3), no SVD). The rest (rank-deficient R, e.g.
    the zero R of PEFT's ``A = 0`` start, or a non-finite solve) gets ``pinv`` itself: it is
    applied to ``R`` masked to zero where the solve is used, and the SVD of a zero matrix
    costs almost nothing (LAPACK returns early), so no branch on the host is needed.
    """
    r = R.shape[-1]
    eye = torch.eye(r, dtype=R.dtype, device=R.device)
    inv = torch.linalg.solve_triangular(R, eye, upper=True)
    cond = torch.linalg.matrix_norm(R) * torch.linalg.matrix_norm(inv)
    solved = (cond * (r * torch.finfo(R.dtype).eps) < 1.0)[..., None, None]  # False for NaN
    return torch.where(solved, inv, torch.linalg.pinv(torch.where(solved, 0.0, R)))


def second_moment(V_old: Tensor, P: Tensor, gram: Tensor, beta2_hat: float) -> Tensor:
    r"""Step 5: ``sym(beta2_hat P V_old P^T + (1 - beta2_hat) gram)``, ``gram = Gbar^T Gbar / m``.

    All ``(..., r, r)``.
    """
    moved = torch.matmul(torch.matmul(P, V_old), P.mT).mul_(beta2_hat)
    return symmetrize(moved.add_(gram, alpha=1.0 - beta2_hat))


def escaped_mass(V_old: Tensor, P: Tensor) -> Tensor:
    r"""Step 6: ``min([max_i(lambda_i(V_old) - lambda_i(P V_old P^T))]_+, [tr V_old - tr P V_old P^T]_+)``.

    ``V_old, P``: ``(..., r, r)``; returns ``(...)`` (eigenvalues ascending).
    """
    moved = symmetrize(P @ V_old @ P.mT)
    by_eig = (torch.linalg.eigvalsh(symmetrize(V_old)) - torch.linalg.eigvalsh(moved)).amax(-1)
    trace = lambda X: X.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    return torch.minimum(by_eig.clamp_min(0.0), (trace(V_old) - trace(moved)).clamp_min(0.0))


def preconditioner(V: Tensor, rho: Tensor, eps: float) -> Tensor:
    r"""Step 7's ``K = E diag(1 / (sqrt(lambda + rho) + eps)) E^T``, ``(lambda, E) = eigh(V)``.

    ``V``: ``(..., r, r)`` symmetric PSD (negative round-off eigenvalues clamped to 0),
    ``rho``: ``(...)``. ``Sbar = Gbar K`` (the per-layer code computed
    ``((Gbar E) * scale) E^T``: the same product, associated otherwise).
    """
    evals, evecs = torch.linalg.eigh(V)
    scale = evals.clamp_min(0.0).add_(rho.unsqueeze(-1)).sqrt_().add_(eps).reciprocal_()
    return torch.matmul(evecs * scale.unsqueeze(-2), evecs.mT)


class RiteGroup:
    """The layers of one shape in a :class:`RiteClass`: stacked tall work and state.

    ``rows``: the layers' rows in the class's ``(2, L, ...)`` tensors. State: ``U`` (the
    previous step's QR bases ``[U_A (k, m, r), U_B (k, n, r)]``, zero before the first step)
    and ``M`` (the first moments, same shapes). Inputs and outputs are in storage layout
    (PEFT keeps ``B^T``: ``b_transposed``), the maths in paper orientation.
    """

    def __init__(self, pairs: list[LoraPair], start: int, dtype: torch.dtype):
        self.pairs, self.k = pairs, len(pairs)
        (self.m, self.n), self.r = pairs[0].shape, pairs[0].rank
        self.rows = slice(start, start + self.k)
        self.b_transposed, self.dtype = pairs[0].b_transposed, dtype
        self.params = ([p.a for p in pairs], [p.b for p in pairs])
        self.U = self.zero_state(bases=True)
        self.M = self.zero_state()
        self.missing: list[int] = []  # this step's positions without gradients (rare)

    def zero_state(self, bases: bool = False) -> list[Tensor]:
        """Zero ``[A side (k, m, r), B side (k, n, r)]``; ``bases``: in the column-major
        layout ``torch.linalg.qr`` returns, so that a loaded state multiplies exactly as a
        computed one (BLAS sums in an order that depends on the layout)."""
        device = self.params[0][0].device
        if bases:
            return [torch.zeros(self.k, self.r, d, dtype=self.dtype, device=device).mT
                    for d in (self.m, self.n)]
        return [torch.zeros(self.k, d, self.r, dtype=self.dtype, device=device)
                for d in (self.m, self.n)]

    def _stack(self, tensors: list[Tensor], side: int) -> Tensor:
        """``(k, ...)`` paper-orientation batch of ``tensors`` (storage layout; a view when k = 1)."""
        t = tensors[0].unsqueeze(0) if self.k == 1 else torch.stack(tensors)
        t = t if t.dtype == self.dtype else t.to(self.dtype)
        return t.mT if side == 1 and self.b_transposed else t

    def _grads(self, side: int) -> list[Tensor]:
        grads = [p.grad for p in self.params[side]]
        for j in self.missing:  # the rare step with a layer lacking gradients: zeros
            grads[j] = torch.zeros_like(self.params[side][j])
        return grads

    def factorize(self) -> tuple[Tensor, Tensor]:
        """Step 1: thin QR of every factor; keeps ``U`` for this step, returns ``R_A, R_B``."""
        self._U_new, R = [], []
        for side in (0, 1):
            U, Rs = torch.linalg.qr(self._stack(self.params[side], side))
            self._U_new.append(U)
            R.append(Rs)
        return R[0], R[1]

    def unmagnify(self, R_pinv: list[Tensor]) -> list[Tensor]:
        """Step 2: ``Gbar_A = grad_A R_B^+``, ``Gbar_B = grad_B R_A^+`` (kept); returns their
        Frobenius norms ``(k,)`` per side. ``R_pinv``: ``[R_A^+, R_B^+]`` of the group."""
        self._Gbar = [torch.bmm(self._stack(self._grads(side), side), R_pinv[1 - side])
                      for side in (0, 1)]
        return [torch.linalg.vector_norm(G, dim=(1, 2)) for G in self._Gbar]

    def transport_and_grams(self) -> tuple[list[Tensor], list[Tensor]]:
        """Steps 4-5 inputs: ``P_A = U_B^T U_B_old``, ``P_B = U_A^T U_A_old`` and the Grams
        ``Gbar^T Gbar``, each ``(k, r, r)`` per side."""
        P = [torch.bmm(self._U_new[1 - side].mT, self.U[1 - side]) for side in (0, 1)]
        return P, [torch.bmm(G.mT, G) for G in self._Gbar]

    def moments(self, K: Tensor, P: Tensor, beta1_hat: float, cap: float) -> None:
        """Steps 7-9: ``M = beta1_hat M_old P^T + (1 - beta1_hat) nan_to_num(Gbar K)``, then
        the cap ``M / max(1, RMS(M) / cap)``. ``K, P``: ``(2, k, r, r)``."""
        M_new = []
        for side in (0, 1):
            S = torch.bmm(self._Gbar[side], K[side]).nan_to_num_(0.0, 0.0, 0.0)
            M = S.baddbmm_(self.M[side], P[side].mT, beta=1.0 - beta1_hat, alpha=beta1_hat)
            if cap > 0:
                rms = torch.linalg.vector_norm(M, dim=(1, 2)) / math.sqrt(M.shape[1] * self.r)
                excess = rms / cap  # where(): a NaN RMS leaves M as it is
                M = M / torch.where(excess > 1.0, excess, 1.0)[:, None, None]
            M_new.append(M)
        self._M_new = M_new

    def directions(self, R_pinv: list[Tensor]) -> list[Tensor]:
        """Step 10's ``M_A (R_B^+)^T`` and ``M_B (R_A^+)^T``, stacked in storage layout."""
        D_A = torch.bmm(self._M_new[0], R_pinv[1].mT)
        if self.b_transposed:  # (M_B R_A^+T)^T = R_A^+ M_B^T: PEFT's (r, n) layout directly
            return [D_A, torch.bmm(R_pinv[0], self._M_new[1].mT)]
        return [D_A, torch.bmm(self._M_new[1], R_pinv[0].mT)]

    def commit(self) -> None:
        """Make this step's bases and moments the state (layers without gradients keep theirs)."""
        for new, old in ((self._U_new, self.U), (self._M_new, self.M)):
            for side in (0, 1):
                if self.missing:
                    new[side][self.missing] = old[side][self.missing]
                old[side] = new[side]
        self._U_new = self._M_new = self._Gbar = None


class RiteClass:
    """The layers sharing (rank, dtype, device): their ``r x r`` state and maths, batched.

    ``V``: ``(2, L, r, r)`` second moments and ``rho``: ``(2, L)`` escaped masses (index 0:
    factor A, 1: factor B), rows ordered group by group (:attr:`groups`), in the compute
    dtype ``promote_types(dtype, float32)``.
    """

    def __init__(self, pairs: list[LoraPair], strategy: str):
        self.rank, self.device = pairs[0].rank, pairs[0].a.device
        self.dtype = torch.promote_types(pairs[0].a.dtype, torch.float32)
        self.groups: list[RiteGroup] = []
        for members in _shape_groups(pairs, strategy, self.device):
            start = sum(g.k for g in self.groups)
            self.groups.append(RiteGroup(members, start, self.dtype))
        self.pairs = [p for g in self.groups for p in g.pairs]  # class row order
        L, r = len(self.pairs), self.rank
        self.V = torch.zeros(2, L, r, r, dtype=self.dtype, device=self.device)
        self.rho = torch.zeros(2, L, dtype=self.dtype, device=self.device)
        rows = torch.tensor([[p.shape[0] for p in self.pairs], [p.shape[1] for p in self.pairs]],
                            dtype=self.dtype, device=self.device)
        self.inv_rows = rows.reciprocal()  # (2, L): 1/m (A side), 1/n (B side)
        self.inv_sqrt_size = (rows * r).rsqrt()  # RMS = ||Gbar||_F / sqrt(m r)
        self.sizes = [g.k for g in self.groups]

    def _per_group(self, X: Tensor) -> list[Tensor]:
        """``(2, L, ...)`` -> per group ``(2, k, ...)`` views."""
        return list(X.split(self.sizes, dim=1))

    def _join(self, parts: list[list[Tensor]]) -> Tensor:
        """Per group ``[A-side (k, ...), B-side (k, ...)]`` -> ``(2, L, ...)``."""
        flat = [p[0] for p in parts] + [p[1] for p in parts]
        return torch.cat(flat).view(2, len(self.pairs), *flat[0].shape[1:])

    def unmagnify(self) -> Tensor:
        """Steps 1-2 for every layer; returns the ``(2, L)`` norms ``||Gbar||_F``."""
        R_pinv = triangular_pinv(self._join([g.factorize() for g in self.groups]))
        self._R_pinv = self._per_group(R_pinv)
        return self._join([g.unmagnify(Rp) for g, Rp in zip(self.groups, self._R_pinv)])

    def update(self, scale: Tensor | None, skipped: Tensor | None, beta1_hat: float,
               beta2_hat: float, eps: float, cap: float, escaped: bool,
               moment_fn: Callable = second_moment) -> list[list[Tensor]]:
        """Steps 3-10 after the guards' decision; returns per group the directions
        ``[D_A, D_B]`` (stacked, storage layout) and makes the new state current."""
        P_parts, gram_parts = [], []
        for g in self.groups:
            P_g, gram_g = g.transport_and_grams()
            P_parts.append(P_g)
            gram_parts.append(gram_g)
        P = self._join(P_parts)
        scale = None if scale is None else scale.to(self.device)
        gram = self._guarded(self._join(gram_parts), self.inv_rows,
                             None if scale is None else scale.square(), skipped)
        rho = self.rho
        if escaped:
            rho = beta2_hat * (rho + escaped_mass(self.V, P))
        V = moment_fn(self.V, P, gram, beta2_hat)
        K = self._guarded(preconditioner(V, rho, eps), None, scale, skipped)
        out = []
        for g, K_g, P_g, Rp in zip(self.groups, self._per_group(K), self._per_group(P),
                                   self._R_pinv):
            g.moments(K_g, P_g, beta1_hat, cap)
            out.append(g.directions(Rp))
        self._commit(V, rho)
        return out

    @staticmethod
    def _guarded(X: Tensor, weight: Tensor | None, scale: Tensor | None,
                 skipped: Tensor | None) -> Tensor:
        """Step 3 applied to an ``r x r`` product of ``Gbar`` (``(2, L, r, r)``) rather than
        to the tall ``Gbar`` itself (two full passes over it saved): ``X weight scale``, or
        0 where ``skipped``. So the Gram ``Gbar^T Gbar / m`` gets ``scale^2`` and the
        preconditioner ``K`` of ``Sbar = Gbar K`` gets ``scale``; a skipped factor's
        ``Sbar = Gbar 0`` is 0 (NaN if ``Gbar`` is not finite, which the ``nan_to_num`` of
        step 7 turns into 0 as it does for the per-layer code's zeroed ``Gbar``)."""
        if weight is not None:
            X = X * (weight if scale is None else weight * scale)[..., None, None]
        elif scale is not None:
            X = X * scale
        if skipped is not None:
            X = torch.where(skipped[..., None, None], 0.0, X)
        return X

    def _commit(self, V: Tensor, rho: Tensor) -> None:
        keep = [g.rows.start + j for g in self.groups for j in g.missing]
        if keep:  # layers without gradients this step keep their whole state
            V, rho = V.clone(), rho.clone()
            V[:, keep], rho[:, keep] = self.V[:, keep], self.rho[:, keep]
        self.V, self.rho = V, rho
        for g in self.groups:
            g.commit()
        self._R_pinv = None


def _shape_groups(pairs: list[LoraPair], strategy: str, device: torch.device
                  ) -> list[list[LoraPair]]:
    """Pairs of one class split by (m, n, B storage); with "loop", or "auto" on a CPU for
    factors of ``max(m, n) r >= STACK_MAX_NUMEL`` elements, one pair per group."""
    members: dict[tuple, list[LoraPair]] = {}
    for i, p in enumerate(pairs):
        m, n = p.shape
        alone = strategy == "loop" or (strategy == "auto" and device.type == "cpu"
                                       and max(m, n) * p.rank >= STACK_MAX_NUMEL)
        members.setdefault((m, n, p.b_transposed, i if alone else -1), []).append(p)
    return list(members.values())


def make_rite_classes(pairs: list[LoraPair], strategy: str = "auto") -> list[RiteClass]:
    """One :class:`RiteClass` per (rank, dtype, device) of ``pairs``; ``strategy`` "auto",
    "stack" (every shape group batched) or "loop" (one layer per group)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"lora-rite strategy must be one of {', '.join(STRATEGIES)}, "
                         f"got {strategy!r}")
    return [RiteClass(members, strategy) for members in group_pairs(pairs).values()]
