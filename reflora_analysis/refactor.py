r"""RefLoRA as optimizer hooks: the stateful layer on top of :mod:`reflora_analysis.theory`.

A :class:`PairTransform` changes LoRA gradients before, or LoRA weights (and optimizer
moments) after, every step of any ``torch.optim.Optimizer``. It is attached through the
optimizer's own extension points (``register_step_pre_hook``, ``register_step_post_hook``,
``register_state_dict_post_hook``, ``register_load_state_dict_pre_hook``), keeps its state in
itself (never in ``optimizer.state[p]``, which AdamW fills lazily only while it is empty) and
saves that state inside ``optimizer.state_dict()`` under the key :data:`STATE_DICT_KEY`.

:class:`Refactorer` is the core transform (``THEORY.md`` sections 2-7, ``BASELINES.md`` s. 6):

========== ============================================================ ==============
method     what it does                                                  when
========== ============================================================ ==============
reflora    grad_A <- grad_A S*^{-1}, grad_B <- grad_B S*  (F1, F3)        before the step
reflora-s  A <- A / sqrt(c), B <- sqrt(c) B, c = ||A||/||B|| (F7);        after the step
           Adam/momentum moments rescaled to the new coordinates
balance    (A, B) <- (A P, B P^{-1}), P = S*^{1/2}: balanced, same A B^T  after the step
           (F4, F5); moments untouched
========== ============================================================ ==============

Notation is the paper's (A: m x r = PEFT ``lora_B.weight``, B: n x r = PEFT
``lora_A.weight.T``); the storage mapping lives only in :mod:`reflora_analysis.pairs`.

The engine is batched: pairs are grouped by (rank, dtype, device) with
:func:`~reflora_analysis.pairs.group_pairs`; the Grams of a group are written into one
``(L, r, r)`` buffer and every ``r x r`` factorization of the group is one batched call of
:func:`~reflora_analysis.theory.geometric_mean_and_inverse` (``S*`` and ``S*^{-1}`` from one
Cholesky + ``eigh``). :func:`reference_preconditioners` and
:func:`reference_pre_step` keep the per-layer algorithm of the reference code (a Python
loop, two eigendecompositions per layer) as the baseline of tests and benchmarks.

Example::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    refactorer = Refactorer(model, method="reflora", warmup_steps=100).attach(opt)
    loss.backward(); opt.step()        # gradients preconditioned inside opt.step()
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from . import theory
from .pairs import LoraPair, find_lora_pairs, group_pairs

__all__ = [
    "STATE_DICT_KEY",
    "VALID_METHODS",
    "NonFiniteGradientError",
    "PairTransform",
    "Refactorer",
    "check_finite_grads",
    "is_active_step",
    "reference_preconditioners",
    "reference_pre_step",
]

STATE_DICT_KEY = "reflora_analysis"
"""Key under which attached transforms store their state in ``optimizer.state_dict()``.

Its value is a dict ``{transform.state_key: transform.state_dict()}``, so several
transforms can share one optimizer."""

VALID_METHODS = ("reflora", "reflora-s", "balance")

# Adam-like state entries and the power of the gradient scale they carry: a coordinate
# change that multiplies a gradient by p multiplies these entries by p ** power.
_MOMENT_POWERS = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def is_active_step(step: int, warmup_steps: int = 0, interval: int = 1) -> bool:
    """The schedule of every :class:`PairTransform`: step ``k`` is transformed when
    ``k >= warmup_steps`` and ``(k - warmup_steps) % interval == 0``."""
    k = step - warmup_steps
    return k >= 0 and k % interval == 0


class NonFiniteGradientError(ValueError):
    """A LoRA gradient holds NaN or Inf; the message names the step and the layer."""


def _stored_grads(pairs: Sequence[LoraPair]) -> list[tuple[str, str, Tensor]]:
    out = []
    for pair in pairs:
        for factor, param in (("A", pair.a), ("B", pair.b)):
            if param.grad is not None:
                out.append((pair.name, factor, param.grad))
    return out


def check_finite_grads(pairs: Sequence[LoraPair], step: int | None = None) -> None:
    """Raise :class:`NonFiniteGradientError` if any LoRA gradient holds NaN or Inf.

    One fused norm over all gradients and a single host read decide the common case;
    only when that norm is not finite (NaN/Inf, or a finite gradient whose norm overflows)
    are the tensors inspected one by one to name the first bad layer. Pairs whose
    gradients are ``None`` are skipped.
    """
    grads = _stored_grads(pairs)
    if not grads:
        return
    norms = torch._foreach_norm([g for _, _, g in grads])
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return
    for name, factor, g in grads:
        if not bool(torch.isfinite(g).all()):
            where = "" if step is None else f" at step {step}"
            raise NonFiniteGradientError(
                f"non-finite (NaN/Inf) gradient of LoRA factor {factor} in layer '{name}'{where}; "
                "lower the learning rate, clip gradients, or skip this batch"
            )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class PairTransform:
    """Base of every transform of LoRA gradients/weights around an optimizer step.

    Parameters
    ----------
    model_or_pairs : nn.Module | list of (A, B) | list of LoraPair
        Resolved with :func:`~reflora_analysis.pairs.find_lora_pairs`.
    warmup_steps : int
        The first ``warmup_steps`` optimizer steps are left untouched (plain LoRA).
    interval : int
        After warm-up, act on every ``interval``-th step only.
    check_finite : bool
        Raise :class:`NonFiniteGradientError` before a step whose LoRA gradients hold
        NaN/Inf (the step is then not taken).

    Step ``k`` (0-based, counted by :attr:`step_count`) is *active* when
    ``k >= warmup_steps`` and ``(k - warmup_steps) % interval == 0``. Subclasses override
    :meth:`pre_step` (gradients, in place) and/or :meth:`post_step` (weights, moments);
    both run only on active steps. :attr:`step_count` increases after every step taken
    while attached.
    """

    def __init__(self, model_or_pairs, *, warmup_steps: int = 0, interval: int = 1,
                 check_finite: bool = True):
        self.pairs: list[LoraPair] = find_lora_pairs(model_or_pairs)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.interval = _check_int("interval", interval, 1)
        self.check_finite = bool(check_finite)
        self.step_count = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list = []

    # -- identity used inside optimizer.state_dict() -------------------------------------
    @property
    def state_key(self) -> str:
        """Name of this transform's entry under :data:`STATE_DICT_KEY`."""
        return type(self).__name__

    # -- schedule -------------------------------------------------------------------------
    def is_active(self) -> bool:
        """Whether the coming step (index :attr:`step_count`) is transformed."""
        return is_active_step(self.step_count, self.warmup_steps, self.interval)

    # -- hooks to override ----------------------------------------------------------------
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Modify LoRA gradients in place before the optimizer step (active steps only)."""

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Modify LoRA weights / optimizer state after the step (active steps only)."""

    # -- attach / detach ------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "PairTransform":
        """Register the step and state-dict hooks on ``optimizer``; returns ``self``."""
        if self._optimizer is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already attached to an optimizer; call detach() first"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for pair in self.pairs:
            for factor, param in (("A", pair.a), ("B", pair.b)):
                if id(param) not in optimized:
                    raise ValueError(
                        f"LoRA factor {factor} of layer '{pair.name}' is not among the parameters "
                        f"of this {type(optimizer).__name__}; build the optimizer over all LoRA "
                        "parameters before attaching"
                    )
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
            optimizer.register_state_dict_post_hook(self._save_hook),
            optimizer.register_load_state_dict_pre_hook(self._load_hook),
        ]
        self._optimizer = optimizer
        return self

    def detach(self) -> None:
        """Remove every hook; the optimizer behaves as if never attached. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizer = None

    def _pre_step_checks_finite(self) -> bool:
        """True where :meth:`pre_step` checks finiteness itself (fused with its own pass)."""
        return False

    @torch.no_grad()
    def _pre_hook(self, optimizer, args, kwargs):
        active = self.is_active()
        if self.check_finite and not (active and self._pre_step_checks_finite()):
            check_finite_grads(self.pairs, self.step_count)
        if active:
            self.pre_step(optimizer)
        return None

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs):
        if self.is_active():
            self.post_step(optimizer)
        self.step_count += 1

    def _save_hook(self, optimizer, state_dict):
        state_dict.setdefault(STATE_DICT_KEY, {})[self.state_key] = self.state_dict()
        return state_dict

    def _load_hook(self, optimizer, state_dict):
        saved = state_dict.get(STATE_DICT_KEY)
        if saved is not None and self.state_key in saved:
            self.load_state_dict(saved[self.state_key])
        return state_dict

    # -- state ----------------------------------------------------------------------------
    def _pair_shapes(self) -> list[list[int]]:
        return [[*p.shape, p.rank] for p in self.pairs]

    def state_dict(self) -> dict:
        """Plain-Python state: step counter, schedule and the layer shapes (for checks)."""
        return {
            "step_count": self.step_count,
            "warmup_steps": self.warmup_steps,
            "interval": self.interval,
            "pair_shapes": self._pair_shapes(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if the layers do not match."""
        if not isinstance(state, dict) or "step_count" not in state:
            raise ValueError(f"not a {type(self).__name__} state dict: {state!r:.200}")
        shapes = state.get("pair_shapes")
        if shapes is not None and [list(s) for s in shapes] != self._pair_shapes():
            raise ValueError(
                f"state dict is for {len(shapes)} LoRA layers of other shapes (m, n, r) than this "
                f"{type(self).__name__}'s {len(self.pairs)}; was it saved from another model?"
            )
        self.step_count = _check_int("step_count", state["step_count"], 0)
        self.warmup_steps = _check_int("warmup_steps", state.get("warmup_steps", self.warmup_steps), 0)
        self.interval = _check_int("interval", state.get("interval", self.interval), 1)


# --------------------------------------------------------------------------------------
# Batched r x r engine
# --------------------------------------------------------------------------------------


class _PairGroup:
    """Pairs sharing (rank, dtype, device): buffers for their Grams and right-multiplies.

    ``strategy="loop"`` writes each layer's Gram with one ``mm(out=...)`` into the group's
    ``(L, r, r)`` buffer and right-multiplies each gradient through a reused workspace, then
    ``copy_`` (no per-step allocation for float32 parameters). ``strategy="stack"`` stacks
    same-shape factors and uses one ``bmm`` per shape (fewer kernel launches: the better
    choice on a GPU, where per-layer launches dominate; on a CPU the stacking copies cost
    more than they save).
    """

    def __init__(self, pairs: list[LoraPair], strategy: str):
        self.pairs = pairs
        first = pairs[0].a
        self.rank = pairs[0].rank
        self.dtype = first.dtype
        self.device = first.device
        self.compute_dtype = torch.promote_types(self.dtype, torch.float32)
        self.strategy = strategy
        L, r = len(pairs), self.rank
        self.grams = torch.empty(2, L, r, r, dtype=self.compute_dtype, device=self.device)
        self._workspace: dict[tuple, Tensor] = {}
        # same-shape index lists for the stack strategy: factor views by paper shape
        self._shape_index: dict[tuple, list[int]] = {}
        for i, p in enumerate(pairs):
            self._shape_index.setdefault(("A", *p.A.shape), []).append(i)
            self._shape_index.setdefault(("B", *p.B.shape), []).append(i)
        self._index_tensors = {
            key: torch.tensor(idx, dtype=torch.long, device=self.device)
            for key, idx in self._shape_index.items()
        }

    def _upcast(self, t: Tensor) -> Tensor:
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def _buffer(self, shape, tag: str) -> Tensor:
        key = (tag, *shape)
        buf = self._workspace.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=self.compute_dtype, device=self.device)
            self._workspace[key] = buf
        return buf

    def compute_grams(self) -> tuple[Tensor, Tensor]:
        """``X_l = A_l^T A_l`` and ``Y_l = B_l^T B_l`` for every layer, ``(L, r, r)`` each."""
        X, Y = self.grams[0], self.grams[1]
        if self.strategy == "stack":
            for (side, *_), idx in self._shape_index.items():
                views = [self._upcast(self.pairs[i].A if side == "A" else self.pairs[i].B)
                         for i in idx]
                F = torch.stack(views)
                target = X if side == "A" else Y
                target.index_copy_(0, self._index_tensors[(side, *_)], F.mT @ F)
            return X, Y
        for i, p in enumerate(self.pairs):
            A, B = self._upcast(p.A), self._upcast(p.B)
            torch.mm(A.mT, A, out=X[i])
            torch.mm(B.mT, B, out=Y[i])
        return X, Y

    def right_multiply_grads(self, right_A: Tensor, right_B: Tensor, write_back: str = "copy",
                             sums: list | None = None) -> None:
        """``grad_A <- grad_A right_A[l]`` and ``grad_B <- grad_B right_B[l]`` for every layer.

        ``right_*``: ``(L, r, r)`` in the compute dtype. ``write_back="copy"`` writes the
        products into the existing ``.grad`` tensors with ``copy_`` (in the parameter dtype);
        ``"rebind"`` sets ``param.grad`` to the new product instead (no copy pass; gradients
        that are views, e.g. DDP bucket views, are still copied into). When ``sums`` is a
        list, the sum of every product is appended (a cheap finiteness witness: NaN/Inf in a
        gradient makes its product's sum non-finite).
        """
        if self.strategy == "stack":
            self._right_multiply_grads_stacked(right_A, right_B, sums)
            return
        for i, p in enumerate(self.pairs):
            self._right_multiply_one(p.a, right_A[i], False, write_back, sums)
            self._right_multiply_one(p.b, right_B[i], p.b_transposed, write_back, sums)

    def _right_multiply_grads_stacked(self, right_A, right_B, sums) -> None:
        for (side, *shape), idx in self._shape_index.items():
            grads = [self.pairs[i].grad_A if side == "A" else self.pairs[i].grad_B for i in idx]
            keep = [j for j, g in enumerate(grads) if g is not None]
            if not keep:
                continue
            grads = [grads[j] for j in keep]
            index = self._index_tensors[(side, *shape)]
            if len(keep) != len(idx):
                index = index[keep]
            R = (right_A if side == "A" else right_B).index_select(0, index)
            out = torch.stack([self._upcast(g) for g in grads]) @ R
            if sums is not None:
                sums.append(out.sum())
            torch._foreach_copy_(grads, list(out.unbind(0)))

    def _right_multiply_one(self, param, R: Tensor, left: bool, write_back: str,
                            sums: list | None) -> None:
        """Paper-view ``grad R`` for one factor; ``left``: storage is the transpose, so the
        product is ``R^T grad_stored`` on the storage itself (contiguous write back)."""
        grad = param.grad
        if grad is None:
            return
        x = self._upcast(grad)
        rebind = write_back == "rebind" and grad._base is None
        if not rebind and x is grad and grad.is_contiguous():
            out = self._buffer(grad.shape, "grad")
            torch.mm(R.mT, x, out=out) if left else torch.mm(x, R, out=out)
        else:
            out = R.mT @ x if left else x @ R
        if sums is not None:
            sums.append(out.sum())
        if rebind:
            param.grad = out if out.dtype == grad.dtype else out.to(grad.dtype)
        else:
            grad.copy_(out)

    def right_multiply_factors(self, right_A: Tensor, right_B: Tensor) -> None:
        """``A <- A right_A[l]``, ``B <- B right_B[l]`` (weights, in place, parameter dtype)."""
        for i, p in enumerate(self.pairs):
            A = p.a.data
            A.copy_(self._upcast(A) @ right_A[i])
            b = p.b.data
            if p.b_transposed:  # stored B^T: (B R)^T = R^T B^T
                b.copy_(right_B[i].mT @ self._upcast(b))
            else:
                b.copy_(self._upcast(b) @ right_B[i])


def _trace(X: Tensor) -> Tensor:
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def _singular_grams(X: Tensor, Y: Tensor, rel_tol: float) -> Tensor:
    """Per layer: ``X`` or ``Y`` zero, not positive definite, or with
    ``min diag(chol)^2 <= rel_tol * max diag(chol)^2`` (the cheap condition proxy a Cholesky
    gives). ``(L,)`` bool, computed without a host read. Used by "balance", which projects
    only layers whose Grams are both regular ("reflora" reads the F10 mask of
    :func:`~reflora_analysis.theory.geometric_mean_and_inverse` instead)."""
    bad = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for G in (X, Y):
        L, info = torch.linalg.cholesky_ex(theory.symmetrize(G))
        diag = L.diagonal(dim1=-2, dim2=-1).abs().square()
        bad |= (info != 0) | (diag.amin(-1) <= rel_tol * diag.amax(-1)) | (diag.amax(-1) <= 0)
        bad |= ~torch.isfinite(diag).all(-1)
    return bad


class Refactorer(PairTransform):
    r"""RefLoRA, RefLoRA-S or balanced projection attached to any optimizer.

    Parameters
    ----------
    model_or_pairs : nn.Module | list of (A, B) | list of LoraPair
        A PEFT model (Linear and Embedding LoRA layers, every active adapter) or explicit
        pairs in paper orientation, A (m x r), B (n x r).
    method : {"reflora", "reflora-s", "balance"}
        ``"reflora"`` (pre-step, F1/F3): with ``S = S* = (A^T A)^{-1} # (B^T B)``
        computed from the current weights,

            grad_A <- grad_A S^{-1},     grad_B <- grad_B S.

        With SGD this is exactly the step on the optimally refactored pair (GL(r)
        invariant, F6); with Adam/AdamW the preconditioned gradients feed unchanged Adam
        (as the reference code does; not invariant, THEORY.md section 7). Weights and
        optimizer state are untouched.

        ``"reflora-s"`` (post-step, F7): ``c = ||A||_F / ||B||_F``, ``p = sqrt(c)``,

            A <- A / p,   B <- p B      (same A B^T; afterwards ||A||_F = ||B||_F, s* = 1).

        The loss in the new coordinates is ``f(A', B') = l((p A')(B'/p)^T)``, so its
        gradients are ``p grad_A`` and ``grad_B / p``. Optimizer moments that average
        gradients therefore become ``m_A <- p m_A``, ``m_B <- m_B / p`` (``exp_avg``,
        ``momentum_buffer``) and those averaging squared gradients ``v_A <- c v_A``,
        ``v_B <- v_B / c`` (``exp_avg_sq``, ``max_exp_avg_sq``); other state is left
        alone. Layers with ``A = 0`` or ``B = 0`` are skipped. One extra rescale
        happens before the first active step (the reference code's initial call); it
        also rescales the gradients already computed, so that step sees consistent
        coordinates.

        ``"balance"`` (post-step, F4/F5): ``(A, B) <- (A P, B P^{-1})`` with the SPD
        ``P = S*^{1/2}`` (Gram form, chosen over BaLoRA's thin SVD ``U S^{1/2}, V S^{1/2}``:
        same balanced product, O((m+n) r^2), and ``P`` is continuous in (A, B), so no
        sign/order flips of singular vectors between steps). Afterwards
        ``A^T A = B^T B`` and ``A B^T`` is unchanged. As with "reflora-s", the first
        active step is preceded by one projection (gradients transformed with it,
        ``grad_A P^{-1}``, ``grad_B P``), so that with SGD the weight trajectory equals
        "reflora"'s exactly (at a balanced point ``S* = I``). **With Adam/AdamW the
        moments are not transformed** (as BaLoRA): a full-matrix change of
        coordinates cannot be carried by Adam's elementwise second moments, so after a
        projection the stored moments no longer match the refactored coordinates
        (THEORY.md section 7). Layers whose Grams are singular (e.g. a zero factor at the
        PEFT start) are not projected (projecting would kill the other factor).
    warmup_steps, interval : int
        See :class:`PairTransform`. The PEFT start (``lora_B = 0``, i.e. A = 0) makes
        ``A^T A = 0``: RefLoRA's update of A is then (almost) zero and it cannot leave that
        point by itself (THEORY.md section 6), so use ``warmup_steps`` > 0 there.
    damping : float
        Relative damping of the Grams (``theory.relative_damping``): ``X + dI``, ``Y + dI``
        with ``d = damping (tr X + tr Y) / (2r)``. The default 0 keeps RefLoRA exactly
        GL(r)-invariant (F6); any d > 0 breaks invariance at order d. Grams that are
        near-singular after this damping get extra damping (F10) and one
        :class:`~reflora_analysis.theory.DegenerateGramWarning` per refactorer naming the
        layers (with d > 0 also layers with a zero factor, which RefLoRA cannot leave);
        results are always finite (F10).
    strategy : {"auto", "loop", "stack"}
        How the per-layer ``(m x r) x (r x r)`` products are issued (see ``_PairGroup``);
        ``"auto"`` is "stack" on accelerators and "loop" on CPU. Results are identical.
    write_back : {"copy", "rebind"}
        "reflora" only: ``"copy"`` writes the preconditioned gradients into the existing
        ``.grad`` tensors (``grad.copy_``; identity of ``.grad`` kept); ``"rebind"`` sets
        ``param.grad`` to the new tensor, as the reference code does, which saves one
        memory pass (measured in ``benchmarks/refactor_overhead.py``); gradients that are
        views (DDP ``gradient_as_bucket_view``) are still copied into.
    check_finite : bool
        See :class:`PairTransform`. On active "reflora" steps the check is fused into the
        gradient products (the sum of each product is a finiteness witness), so it costs no
        extra pass over the gradients; when it fires, gradients may already be
        preconditioned: zero them and skip the batch. The check guards against NaN/Inf
        gradients (a diverged step) and is not part of the method (plain optimizers do
        none): ``check_finite=False`` gives the bare cost of the method. On a tiny model
        the check is a visible share of the hook (one witness sum per gradient for
        "reflora"; a fused norm and a host read for "reflora-s" and "balance").

    Notes
    -----
    Grams and products are computed in ``promote_types(dtype, float32)`` and written back
    in the parameter dtype (bf16/fp16 parameters work); the ``r x r`` factorizations run
    in float64 (tiny): ``S*`` and ``S*^{-1}`` from one batched Cholesky + ``eigh`` per group
    (:func:`~reflora_analysis.theory.geometric_mean_and_inverse`, no explicit inverse). Host
    reads per step ("reflora"): two per group in that function (its non-finite and
    degenerate checks; ``torch.linalg.eigh`` synchronises on CUDA anyway), one per group for
    the warning (reading the same degenerate mask) until the warning has been given, and one
    for the fused finite check. "reflora-s" rescales weights, gradients and moments with
    ``torch._foreach_mul_`` and per-layer 0-d scales, without host reads. Buffers (Grams,
    one workspace per gradient shape) are allocated once; nothing grows with the steps.

    Cost per step, "reflora": two Grams and two gradient products per layer,
    ``4 (m + n) r^2`` flops, plus one batched Cholesky + ``eigh`` per group
    (``benchmarks/refactor_overhead.py``; results in ``benchmarks/RESULTS.md``).
    "reflora-s": ``O((m + n) r)``. "balance": ``4 (m + n) r^2`` plus r x r work.

    Examples
    --------
    ::

        opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-4)
        refactorer = Refactorer(peft_model, "reflora", warmup_steps=100).attach(opt)
        torch.save(opt.state_dict(), "opt.pt")   # carries refactorer.state_dict()
    """

    def __init__(self, model_or_pairs, method: str = "reflora", *, warmup_steps: int = 0,
                 interval: int = 1, damping: float = 0.0, strategy: str = "auto",
                 write_back: str = "copy", check_finite: bool = True):
        if method not in VALID_METHODS:
            raise ValueError(f"unknown refactoring method {method!r}; valid methods: "
                             + ", ".join(VALID_METHODS))
        if strategy not in ("auto", "loop", "stack"):
            raise ValueError(f"unknown strategy {strategy!r}; valid: auto, loop, stack")
        if write_back not in ("copy", "rebind"):
            raise ValueError(f"unknown write_back {write_back!r}; valid: copy, rebind")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
                or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite float >= 0, got {damping!r}")
        super().__init__(model_or_pairs, warmup_steps=warmup_steps, interval=interval,
                         check_finite=check_finite)
        self.method = method
        self.damping = float(damping)
        self.write_back = write_back
        self.initialized = False  # reflora-s / balance: initial transform done
        self._warned = False
        self._groups = [
            _PairGroup(g, ("stack" if g[0].a.device.type != "cpu" else "loop")
                       if strategy == "auto" else strategy)
            for g in group_pairs(self.pairs).values()
        ]

    # -- r x r maths ----------------------------------------------------------------------
    def _warn_once(self, group: _PairGroup, bad: Tensor, what: str) -> None:
        if self._warned:
            return
        self._warned = True
        names = [group.pairs[i].name for i in bad.nonzero().flatten().tolist()]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"{self.method}: singular or near-singular LoRA Gram matrix in {shown or 'a layer'} "
            f"at step {self.step_count} (e.g. the lora_B = 0 start); {what} (THEORY.md F10). "
            "Consider warmup_steps or a balanced initialisation. Shown once.",
            theory.DegenerateGramWarning, stacklevel=4,
        )

    def _singular_tol(self, group: _PairGroup) -> float:
        """Relative eigenvalue floor under which a Gram counts as singular: the damping, or
        the round-off of Grams accumulated in the compute dtype, whichever is larger."""
        return max(self.damping, 10 * group.rank * torch.finfo(group.compute_dtype).eps)

    def preconditioners(self, group: _PairGroup) -> tuple[Tensor, Tensor]:
        """``S*`` and ``S*^{-1}`` for every layer of ``group``, ``(L, r, r)``, float64.

        Both come from one batched Cholesky + ``eigh``
        (:func:`~reflora_analysis.theory.geometric_mean_and_inverse`); its F10 mask, i.e.
        the layers that needed extra damping, names the layers of the one-time warning.
        """
        X, Y = group.compute_grams()
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        # the warning is ours (once, with layer names), so theory's own is switched off
        S, S_inv, singular = theory.geometric_mean_and_inverse(
            X64, Y64, damping=self.damping, singular_rtol=self._singular_tol(group), warn=False)
        if not self._warned:  # one host read per group and step, until the warning is given
            if self.damping > 0:
                # user damping makes a zero Gram (the lora_B = 0 start) regular, yet RefLoRA
                # still cannot leave that point (THEORY.md section 6): warn about it too
                singular = singular | (_trace(X64) <= 0) | (_trace(Y64) <= 0)
            if bool(singular.any()):
                self._warn_once(group, singular, "damping keeps the result finite")
        return S, S_inv

    def _balancing_maps(self, group: _PairGroup) -> tuple[Tensor, Tensor]:
        """``P = S*^{1/2}`` and ``P^{-1}`` per layer (identity where the Grams are singular)."""
        X, Y = group.compute_grams()
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        bad = _singular_grams(X64, Y64, self._singular_tol(group))
        with warnings.catch_warnings():
            # no damping: it would leave A^T A - B^T B ~ damping; singular layers (the only
            # ones that need it) are not projected at all
            warnings.simplefilter("ignore", theory.DegenerateGramWarning)
            S = theory.geometric_mean(X64, Y64)
        evals, evecs = torch.linalg.eigh(S)
        root = evals.clamp_min(torch.finfo(S.dtype).tiny).sqrt().unsqueeze(-2)
        P = (evecs * root) @ evecs.mT
        P_inv = (evecs / root) @ evecs.mT
        eye = torch.eye(group.rank, dtype=S.dtype, device=S.device)
        keep = bad[:, None, None]
        P, P_inv = torch.where(keep, eye, P), torch.where(keep, eye, P_inv)
        if not self._warned and bool(bad.any()):
            self._warn_once(group, bad, "those layers are not projected")
        return theory.symmetrize(P), theory.symmetrize(P_inv)

    def _scalar_maps(self, group: _PairGroup) -> tuple[Tensor, Tensor]:
        """``1/p`` and ``p`` per layer, ``p = sqrt(||A||_F / ||B||_F)`` (1 for zero factors)."""
        # stored tensors: same Frobenius norms as the paper views, contiguous reductions
        norm_A = torch.stack(torch._foreach_norm([p.a for p in group.pairs])).to(torch.float64)
        norm_B = torch.stack(torch._foreach_norm([p.b for p in group.pairs])).to(torch.float64)
        ok = (norm_A > 0) & (norm_B > 0) & torch.isfinite(norm_A) & torch.isfinite(norm_B)
        c = torch.where(ok, norm_A / torch.where(ok, norm_B, torch.ones_like(norm_B)),
                        torch.ones_like(norm_A))
        p = c.sqrt()
        return 1.0 / p, p

    # -- reflora-s rescale ----------------------------------------------------------------
    def _rescale_scalar(self, group: _PairGroup, optimizer, with_grads: bool) -> None:
        """RefLoRA-S on one group: ``A <- A / p``, ``B <- p B`` and, in the new coordinates,
        gradients ``x p`` / ``x 1/p`` and moments ``x p^k`` / ``x p^-k`` (``k`` from
        ``_MOMENT_POWERS``), all as ``torch._foreach_mul_`` calls with per-layer 0-d scales
        (no host read, no per-tensor Python arithmetic)."""
        inv_p, p = self._scalar_maps(group)
        # (factor, power) -> per-layer scale: power k for gradients (k = 1) and moments
        # (k = 1, 2); the weights themselves move by the inverse (k = -1)
        scale = {("A", 1): p, ("B", 1): inv_p, ("A", 2): p ** 2, ("B", 2): inv_p ** 2,
                 ("A", -1): inv_p, ("B", -1): p}
        cast: dict[tuple, tuple[Tensor, ...]] = {}
        buckets: dict[torch.dtype, tuple[list, list]] = {}

        def add(t: Tensor, side: str, power: int, i: int) -> None:
            key = (side, power, t.dtype)
            if key not in cast:
                cast[key] = scale[(side, power)].to(t.dtype).unbind(0)
            tensors, scalars = buckets.setdefault(t.dtype, ([], []))
            tensors.append(t)
            scalars.append(cast[key][i])

        state = optimizer.state if optimizer is not None else {}
        for i, pair in enumerate(group.pairs):
            for side, param in (("A", pair.a), ("B", pair.b)):
                add(param.data, side, -1, i)  # .data: also valid outside no_grad
                if with_grads and param.grad is not None:
                    add(param.grad, side, 1, i)
                moments = state.get(param)
                if not moments:
                    continue
                for key, power in _MOMENT_POWERS.items():
                    t = moments.get(key)
                    if isinstance(t, Tensor) and t.is_floating_point() and t.shape == param.shape:
                        add(t, side, power, i)
        for tensors, scalars in buckets.values():
            torch._foreach_mul_(tensors, scalars)

    # -- the three methods ----------------------------------------------------------------
    def _pre_step_checks_finite(self) -> bool:
        return self.method == "reflora"

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        if self.method == "reflora":
            sums: list | None = [] if self.check_finite else None
            for group in self._groups:
                S, S_inv = self.preconditioners(group)
                cd = group.compute_dtype
                group.right_multiply_grads(S_inv.to(cd), S.to(cd), self.write_back, sums)
            if sums and not bool(torch.isfinite(torch.stack([x.float() for x in sums])).all()):
                # NaN/Inf in a gradient (or a product that overflowed): name the layer
                check_finite_grads(self.pairs, self.step_count)
            return
        if not self.initialized:
            # the reference code's initial call, before step 1, in consistent coordinates
            self._transform_weights(optimizer, with_grads=True)
            self.initialized = True

    @torch.no_grad()
    def post_step(self, optimizer) -> None:
        if self.method != "reflora":
            self._transform_weights(optimizer, with_grads=False)

    # no_grad also when called directly: the norms of the parameters must not record a graph
    @torch.no_grad()
    def _transform_weights(self, optimizer, with_grads: bool) -> None:
        for group in self._groups:
            if self.method == "reflora-s":
                self._rescale_scalar(group, optimizer, with_grads)
            else:  # balance: A' = A P, B' = B P^{-1}; moments deliberately untouched
                P, P_inv = self._balancing_maps(group)
                cd = group.compute_dtype
                group.right_multiply_factors(P.to(cd), P_inv.to(cd))
                if with_grads:
                    group.right_multiply_grads(P_inv.to(cd), P.to(cd))

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(method=self.method, damping=self.damping, initialized=self.initialized,
                     warned=self._warned)
        return state

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("method", self.method) != self.method:
            raise ValueError(f"state dict was saved by method {state['method']!r}, this "
                             f"Refactorer uses {self.method!r}")
        super().load_state_dict(state)
        damping = state.get("damping", self.damping)
        if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"state dict has an invalid damping {damping!r}")
        self.damping = float(damping)
        self.initialized = bool(state.get("initialized", self.initialized))
        self._warned = bool(state.get("warned", self._warned))

    def __repr__(self) -> str:
        return (f"Refactorer(method={self.method!r}, layers={len(self.pairs)}, "
                f"warmup_steps={self.warmup_steps}, interval={self.interval}, "
                f"damping={self.damping}, step_count={self.step_count})")


# --------------------------------------------------------------------------------------
# Per-layer reference (the reference code's algorithm): baseline for tests and benchmarks
# --------------------------------------------------------------------------------------


def _reference_geometric_mean(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(S, S^{-1})`` with ``S = X^{-1} # Y``, by the reference code's two eigendecompositions.

    Only for the per-layer baseline: it needs the factor ``A`` (see
    :func:`reference_preconditioners`); this helper takes the Grams for tests.
    """
    y, V = torch.linalg.eigh(theory.symmetrize(Y))
    sigma = y.clamp_min(0).sqrt()
    R_gram = (V * sigma.unsqueeze(-2)).mT @ X @ (V * sigma.unsqueeze(-2))
    return _reference_from_eigh(sigma, V, R_gram)


def _reference_from_eigh(sigma: Tensor, V: Tensor, R_gram: Tensor) -> tuple[Tensor, Tensor]:
    # Y = V diag(sigma^2) V^T and R^T R = diag(sigma) V^T X V diag(sigma) = W diag(mu^2) W^T
    # give S^{-1} = V diag(1/sigma) W diag(mu) W^T diag(1/sigma) V^T (the SPD T with
    # T Y T = X) and S = V diag(sigma) W diag(1/mu) W^T diag(sigma) V^T. The reference code
    # adds eps = finfo(dtype).eps to sigma and mu before dividing; so do we.
    eps = torch.finfo(sigma.dtype).eps
    mu_sq, W = torch.linalg.eigh(theory.symmetrize(R_gram))
    mu = mu_sq.clamp_min(0).sqrt()
    left_inv = (V / (sigma + eps).unsqueeze(-2)) @ W
    S_inv = (left_inv * mu.unsqueeze(-2)) @ left_inv.mT
    left = (V * sigma.unsqueeze(-2)) @ W
    S = (left / (mu + eps).unsqueeze(-2)) @ left.mT
    return S, S_inv


def reference_preconditioners(pairs) -> list[tuple[Tensor, Tensor]]:
    r"""``(S*, S*^{-1})`` per layer: the reference code's algorithm, a Python loop.

    Per layer, in ``promote_types(dtype, float32)``: the eigendecomposition
    ``B^T B = V diag(sigma^2) V^T`` (PEFT: ``lora_A lora_A^T``); ``R = A V diag(sigma)``
    (an extra ``m x r`` product); the eigendecomposition ``R^T R = W diag(mu^2) W^T``; then

        S*^{-1} = V diag(1/sigma) W diag(mu) W^T diag(1/sigma) V^T,
        S*      = V diag(sigma) W diag(1/mu) W^T diag(sigma) V^T,

    which is ``X^{-1} # Y`` with ``X = A^T A``, ``Y = B^T B`` (F3). Two eigendecompositions
    and three ``O(k r^2)`` products per layer (``B^T B``, ``R``, ``R^T R``), against the
    batched engine's two Grams and one batched Cholesky + eigh per group. The batched
    :class:`Refactorer` must agree with this to 1e-5 relative in float32.
    """
    out = []
    for pair in find_lora_pairs(pairs):
        cd = torch.promote_types(pair.A.dtype, torch.float32)
        A, B = pair.A.to(cd), pair.B.to(cd)
        y, V = torch.linalg.eigh(B.mT @ B)
        sigma = y.clamp_min(0).sqrt()
        R = A @ (V * sigma)
        out.append(_reference_from_eigh(sigma, V, R.mT @ R))
    return out


def reference_pre_step(pairs) -> None:
    """The reference RefLoRA pre-step hook: per layer ``grad_A S^{-1}``, ``grad_B S``.

    Like the reference code it rebinds ``.grad`` to the new products (no ``copy_``).
    """
    pairs = find_lora_pairs(pairs)
    for pair, (S, S_inv) in zip(pairs, reference_preconditioners(pairs)):
        if pair.a.grad is not None:
            pair.a.grad = (pair.a.grad.to(S.dtype) @ S_inv).to(pair.a.dtype)
        if pair.b.grad is not None:
            g = pair.b.grad.to(S.dtype)
            new = S @ g if pair.b_transposed else g @ S  # stored B^T: (grad_B S)^T = S grad_B^T
            pair.b.grad = new.to(pair.b.dtype)
