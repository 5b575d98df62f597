r"""LoRA-Pro: the equivalent gradient (``BASELINES.md`` section 4).

Wang, Liang, Zhang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025
(arXiv 2407.18242). Written from the formula sheet (read from mrflogs/LoRA-Pro), not the code.

With ``W = W0 + s A B^T``, ``grad_A = s G B``, ``grad_B = s G^T A``, ``P_A = A (A^T A)^+ A^T``:

    ghat_A = (1/s^2) (I - P_A) grad_A (B^T B)^+ - A X,
    ghat_B = (1/s^2) grad_B (A^T A)^+ + B X^T,

for any r x r ``X``; the step ``A <- A - eta ghat_A``, ``B <- B - eta ghat_B`` moves W to first
order by ``-eta g~`` with the *equivalent gradient*

    g~ = s (ghat_A B^T + A ghat_B^T) = P_A G + (I - P_A) G P_B,

the projection of G onto the tangent space of rank-r matrices at ``A B^T``. ``X`` ("sylvester",
default) solves ``(A^T A) X + X (B^T B) = -(1/s^2) (A^T A)^+ grad_B^T B``, the minimiser of
``||ghat_A - grad_A||^2 + ||ghat_B - grad_B||^2``; both Grams are symmetric PSD, so with
``A^T A = Q1 diag(l1) Q1^T``, ``B^T B = Q2 diag(l2) Q2^T``,
``X = Q1 [(Q1^T C Q2)_ij / (l1_i + l2_j)] Q2^T`` (:func:`sylvester_psd`). ``x_mode="zero"``: X = 0.
``(I - P_A) Y`` is formed as ``Y - A [(A^T A)^+ (A^T Y)]``, never the m x m projector.

Modes (selected by the base optimizer in :func:`reflora_analysis.methods.build_optimizer`):

- SGD (``optimizer="sgd"``): ``ghat`` is written into ``.grad``; the base SGD steps.
- "full" AdamW (``optimizer="adamw"``), as released: Adam moments of ``g~`` (with X = 0) kept
  at full size m x n, ``D = mhat / (sqrt(vhat) + eps)`` treated as the full gradient, mapped
  back with the Sylvester X (``grad_A = s D B``, ``grad_B = s D^T A``), and a plain SGD outer
  step with decoupled weight decay, taken by the transform (LoRA ``.grad`` cleared so AdamW only
  trains the other parameters). **State: 2 m n numbers per layer** (as many as full
  fine-tuning's Adam), compute O(m n r).

Invariance: first-order GL(r) (``g~`` depends on ``A B^T`` only); the O(eta^2) term is
invariant only under orthogonal ``P``.

Differences from the official code: ``s`` is the adapter's own scaling (the code hard-codes
s = 2); pseudo-inverses of the Grams instead of ``pinv(Gram + 1e-8 I)``; the eigh closed form
of the Sylvester equation instead of a complex ``eig``; moments in the parameter dtype promoted
to float32 (the code uses bf16 products); the "symmetry" X mode and the older per-factor
"efficient" AdamW mode are not offered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..theory import symmetrize
from .base import (LayerStateTransform, check_betas, check_number, internal_sgd_step,
                   make_base_optimizer)

__all__ = ["sylvester_psd", "gram_spectrum", "equivalent_factor_gradients", "equivalent_gradient",
           "LoraProTransform"]

X_MODES = ("sylvester", "zero")


def sylvester_psd(X1: Tensor, X2: Tensor, C: Tensor) -> Tensor:
    r"""Solve ``X1 X + X X2 = C`` for symmetric PSD ``X1``, ``X2`` (``(..., r, r)``) by two ``eigh``.

    Entries with ``l1_i + l2_j = 0`` (both Grams singular along that pair) are set to 0.
    """
    return _sylvester_from_spectra(gram_spectrum(X1), gram_spectrum(X2), C)


def gram_spectrum(X: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetrized Gram: the one factorization LoRA-Pro needs per Gram (its
    pseudo-inverse and the Sylvester solve both read it; computed once, batched over layers)."""
    return torch.linalg.eigh(symmetrize(X))


def _pinv_from_spectrum(spectrum: tuple[Tensor, Tensor]) -> Tensor:
    """:func:`~.base.gram_pinv` from the spectrum ``(evals, evecs)`` of the symmetrized Gram."""
    evals, evecs = spectrum
    tol = evals.shape[-1] * torch.finfo(evals.dtype).eps * evals.abs().amax(-1, keepdim=True)
    inv = torch.where(evals > tol, 1.0 / torch.where(evals > tol, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    return (evecs * inv.unsqueeze(-2)) @ evecs.mT


def _sylvester_from_spectra(s1: tuple[Tensor, Tensor], s2: tuple[Tensor, Tensor],
                            C: Tensor) -> Tensor:
    """:func:`sylvester_psd` from the spectra of ``X1`` and ``X2`` (``(..., r, r)`` batches)."""
    (l1, Q1), (l2, Q2) = s1, s2
    denom = l1.clamp_min(0.0)[..., :, None] + l2.clamp_min(0.0)[..., None, :]
    peak = denom.abs().amax((-2, -1), keepdim=True)
    tol = torch.finfo(denom.dtype).eps * peak.clamp_min(torch.finfo(denom.dtype).tiny)
    ok = denom > tol
    core = torch.where(ok, (Q1.mT @ C @ Q2) / torch.where(ok, denom, torch.ones_like(denom)),
                       torch.zeros_like(denom))
    return Q1 @ core @ Q2.mT


def equivalent_factor_gradients(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor,
                                scaling: float = 1.0, x_mode: str = "sylvester", *,
                                spectra: tuple | None = None) -> tuple[Tensor, Tensor]:
    r"""``(ghat_A, ghat_B)`` of the module docstring. A, grad_A: m x r; B, grad_B: n x r.

    ``spectra``: the :func:`gram_spectrum` of ``A^T A`` and ``B^T B`` when already known
    (the transform computes them once per step, batched over layers)."""
    if x_mode not in X_MODES:
        raise ValueError(f"unknown x_mode {x_mode!r}; choose one of {', '.join(X_MODES)}")
    dtype = torch.promote_types(A.dtype, torch.float32)
    A, B, grad_A, grad_B = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    if spectra is None:
        spectra = (gram_spectrum(A.mT @ A), gram_spectrum(B.mT @ B))
    XA_inv, XB_inv = _pinv_from_spectrum(spectra[0]), _pinv_from_spectrum(spectra[1])
    inv_s2 = 1.0 / scaling**2
    out_of_span = grad_A - A @ (XA_inv @ (A.mT @ grad_A))  # (I - P_A) grad_A
    ghat_A = inv_s2 * out_of_span @ XB_inv
    ghat_B = inv_s2 * grad_B @ XA_inv
    if x_mode == "sylvester":
        X = _sylvester_from_spectra(spectra[0], spectra[1], -inv_s2 * XA_inv @ (grad_B.mT @ B))
        ghat_A = ghat_A - A @ X
        ghat_B = ghat_B + B @ X.mT
    return ghat_A, ghat_B


def equivalent_gradient(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor,
                        scaling: float = 1.0, *, spectra: tuple | None = None) -> Tensor:
    r"""``g~ = s (ghat_A B^T + A ghat_B^T) = P_A G + (I - P_A) G P_B`` (m x n), from the factor grads."""
    ghat_A, ghat_B = equivalent_factor_gradients(A, B, grad_A, grad_B, scaling, "zero",
                                                 spectra=spectra)
    A, B = A.to(ghat_A.dtype), B.to(ghat_A.dtype)
    g = ghat_A @ B.mT
    g.addmm_(A, ghat_B.mT)  # the sum accumulated inside the second GEMM: one m x n pass less
    return g if scaling == 1.0 else g.mul_(scaling)


class LoraProTransform(LayerStateTransform):
    """LoRA-Pro as a step pre-hook.

    Parameters
    ----------
    model_or_pairs : PEFT model or list of (A, B) / LoraPair.
    mode : "sgd" | "full"
        "sgd": write ``ghat`` into ``.grad`` (any base SGD). "full": full-size Adam moments of
        ``g~`` and an internal SGD outer step (see the module docstring; 2 m n state per layer).
    x_mode : "sylvester" | "zero"
    betas, eps, weight_decay : the "full" mode's Adam settings (defaults (0.9, 0.999), 1e-8, 0);
        checked in both modes (one-line ``TypeError``/``ValueError`` naming the parameter),
        used only by "full".
    """

    state_key, step_attr, layers_attr, label = "lora_pro", "pro_step", "moments", "LoRA-Pro"
    phase = "pre"
    layers_field = "moments"

    def __init__(self, model_or_pairs, *, mode: str = "sgd", x_mode: str = "sylvester",
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if mode not in ("sgd", "full"):
            raise ValueError(f"LoRA-Pro mode must be 'sgd' or 'full', got {mode!r}")
        if x_mode not in X_MODES:
            raise ValueError(f"unknown x_mode {x_mode!r}; choose one of {', '.join(X_MODES)}")
        betas = check_betas(betas, "lora-pro betas")
        eps = check_number("lora-pro eps", eps)
        weight_decay = check_number("lora-pro weight_decay", weight_decay)
        super().__init__(model_or_pairs)
        self.mode, self.x_mode = mode, x_mode
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.pro_step = 0
        self.moments: list[dict | None] = [None] * len(self.pairs)

    @torch.no_grad()
    def pre_step(self, optimizer) -> None:
        if self.mode == "full":
            self.pro_step += 1
        live = [(i, p) for i, p in enumerate(self.pairs)
                if p.grad_A is not None and p.grad_B is not None]
        spectra = _batched_spectra([p for _, p in live])
        if self.mode == "sgd":
            for (_, pair), spec in zip(live, spectra):
                ghat_A, ghat_B = equivalent_factor_gradients(
                    pair.A, pair.B, pair.grad_A, pair.grad_B, pair.scaling, self.x_mode,
                    spectra=spec)
                pair.grad_A.copy_(ghat_A)
                pair.grad_B.copy_(ghat_B)
            return
        for (i, pair), spec in zip(live, spectra):
            # layer by layer: its m x n temporaries stay in cache through the Adam passes
            # (measured: a _foreach_ Adam over all layers streams them from memory, slower on CPU)
            s = pair.scaling
            g = equivalent_gradient(pair.A, pair.B, pair.grad_A, pair.grad_B, s, spectra=spec)
            D = self._adam_direction(i, g)
            A, B = pair.A.to(D.dtype), pair.B.to(D.dtype)
            # s (D B) rather than (s D) B: the scale on the m x r product, not the m x n one
            ghat_A, ghat_B = equivalent_factor_gradients(
                A, B, (D @ B).mul_(s), (D.mT @ A).mul_(s), s, self.x_mode, spectra=spec)
            internal_sgd_step(optimizer, pair.a, ghat_A, self.weight_decay)
            internal_sgd_step(optimizer, pair.b, ghat_B.mT if pair.b_transposed else ghat_B,
                              self.weight_decay)

    def _adam_direction(self, i: int, g: Tensor) -> Tensor:
        """``mhat / (sqrt(vhat) + eps)`` of the full-size moments of ``g~`` (m x n)."""
        st = self.moments[i]
        if st is None:
            st = self.moments[i] = {"exp_avg": torch.zeros_like(g), "exp_avg_sq": torch.zeros_like(g)}
        beta1, beta2 = self.betas
        st["exp_avg"].mul_(beta1).add_(g, alpha=1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        k = self.pro_step
        denom = (st["exp_avg_sq"] / (1.0 - beta2**k)).sqrt_().add_(self.eps)
        return (st["exp_avg"] / (1.0 - beta1**k)).div_(denom)  # in place: no extra m x n buffers


def _batched_spectra(pairs) -> list[tuple]:
    """Per pair, the :func:`gram_spectrum` of ``A^T A`` and of ``B^T B`` (compute dtype), from
    one batched ``eigh`` per (rank, dtype, device) and factor instead of one call per Gram."""
    out: list = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for j, p in enumerate(pairs):
        groups.setdefault((p.rank, p.A.dtype, p.A.device), []).append(j)
    for idx in groups.values():
        per_side = []
        for side in ("A", "B"):
            grams = []
            for j in idx:
                F = getattr(pairs[j], side)
                F = F.to(torch.promote_types(F.dtype, torch.float32))
                grams.append(F.mT @ F)
            evals, evecs = gram_spectrum(torch.stack(grams))
            per_side.append(list(zip(evals.unbind(0), evecs.unbind(0))))
        for j, spec_A, spec_B in zip(idx, *per_side):
            out[j] = (spec_A, spec_B)
    return out


def build_lora_pro(tr, optimizer: str, lr: float, weight_decay: float, base_kwargs: dict, *,
                   x_mode: str = "sylvester", betas=(0.9, 0.999), eps: float = 1e-8):
    """SGD: ``ghat`` in ``.grad``; AdamW: the "full" mode with 2 m n moments per layer.

    ``betas`` and ``eps`` are validated whatever the optimizer (the SGD mode has no moments
    and does not use them).
    """
    mode = "sgd" if optimizer == "sgd" else "full"
    transform = LoraProTransform(tr.pairs, mode=mode, x_mode=x_mode, betas=betas, eps=eps,
                                 weight_decay=weight_decay if mode == "full" else 0.0)
    opt = make_base_optimizer(optimizer, [{"params": tr.lora_params + tr.others}], lr=lr,
                              weight_decay=weight_decay, base_kwargs=base_kwargs)
    return opt, transform.attach(opt)
