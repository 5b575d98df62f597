"""Shared machinery of the probes: exact state restoration, HVPs, flat vectors.

Every probe must leave the model exactly as it found it: parameter values (bit for bit),
``.grad`` tensors (the same objects, same values, or ``None``), ``requires_grad`` flags and
the train/eval mode of every submodule. :func:`preserved_state` does this for all probes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

LossClosure = Callable[[], Tensor]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a probe differentiates: those of ``model`` that require grad."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad; nothing "
                         "to probe (for a PEFT model, the LoRA parameters must be trainable)")
    return params


@contextlib.contextmanager
def preserved_state(model: nn.Module | None, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Restore, on exit, every parameter's value, ``.grad``, ``requires_grad`` and module modes.

    Values are restored with ``copy_`` into the original storage (views such as
    ``LoraPair.A`` stay valid); a parameter whose ``.data`` was swapped for another tensor
    (the delta-W landscape does this) gets its original tensor object back.
    """
    all_params = list(model.parameters()) if model is not None else []
    seen = {id(p) for p in all_params}
    all_params += [p for p in params if id(p) not in seen]
    saved = []
    for p in all_params:
        g = p.grad
        saved.append((p, p.data, p.data.clone(), p.requires_grad, g,
                       None if g is None else g.detach().clone()))
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data_obj, value, req, g, g_value in saved:
                if (p.data.data_ptr() != data_obj.data_ptr() or p.shape != data_obj.shape
                        or p.data.stride() != data_obj.stride()):
                    p.data = data_obj
                data_obj.copy_(value)
                p.requires_grad_(req)
                if g is None:
                    p.grad = None
                else:
                    g.copy_(g_value)
                    p.grad = g
        for m, mode in modes:
            m.training = mode


def math_attention():
    """Context that forces the math SDPA backend: double backward through the fused CPU
    kernels fails (``PROBES.md``), the math backend supports it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class _NoBar:
    """Stand-in for a disabled tqdm bar."""

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "hvp"):
    """A tqdm bar on ``sys.stderr`` (looked up now, so redirections apply) when ``enabled``,
    else a no-op stand-in; closed (and, ``leave=False``, erased) on exit."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def flatten(tensors: Sequence[Tensor], dtype=torch.float64) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(vec[i:i + n].view_as(p).to(p.dtype))
        i += n
    return out


def evaluate_loss(loss_closure: LossClosure) -> Tensor:
    loss = loss_closure()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_closure must return a scalar tensor, got "
                         f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
    if not torch.isfinite(loss):
        raise ValueError(f"loss_closure returned a non-finite loss ({loss.item()}); cannot probe")
    return loss.reshape(())


class HessianOperator:
    """Hessian-vector products of ``loss_closure`` w.r.t. ``params`` on flat float64 vectors.

    By default each product recomputes the forward pass (no graph is kept between products,
    so memory stays at one double-backward; ``recompute_forward=False`` keeps one
    differentiable gradient graph instead, like PyHessian: one backward per product, more
    memory) under the math attention backend, and counts itself in
    ``hvps``. Vectors are float64; they are cast to the parameter dtype for the product, so the
    Lanczos recurrences stay float64 whatever the model's dtype.
    :meth:`as_linear_operator` wraps it for ``scipy.sparse.linalg`` (``eigsh``, ``lobpcg``).
    """

    def __init__(self, loss_closure: LossClosure, params: Sequence[Tensor],
                 recompute_forward: bool = True, progress=None):
        self.progress = progress  # anything with update(n) (a tqdm bar), ticked per product
        self.recompute_forward = recompute_forward
        self._kept = None
        self.loss_closure = loss_closure
        self.params = list(params)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.hvps = 0

    def _grads(self, create_graph: bool):
        with math_attention():
            loss = evaluate_loss(self.loss_closure)
            try:
                grads = torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                            allow_unused=True)
            except RuntimeError as exc:  # e.g. a fused kernel without double backward
                raise RuntimeError(f"Hessian-vector product failed: {exc}. If the model uses a "
                                   "fused attention kernel, load it with attn_implementation="
                                   "'eager'") from exc
        return loss, grads

    def gradient(self) -> Tensor:
        _, grads = self._grads(create_graph=False)
        return flatten([torch.zeros_like(p) if g is None else g
                        for p, g in zip(self.params, grads)])

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        if self.recompute_forward:
            _, grads = self._grads(create_graph=True)
        else:  # one graph kept for all products (PyHessian's choice): faster, more memory
            if self._kept is None:
                self._kept = self._grads(create_graph=True)[1]
            grads = self._kept
        vs = unflatten(v.to(self.device), self.params)
        used = [(g, vi) for g, vi in zip(grads, vs) if g is not None and g.requires_grad]
        if not used:  # the loss is (locally) linear in the parameters
            if self.progress is not None:
                self.progress.update(1)
            return torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        try:
            hv = torch.autograd.grad([g for g, _ in used], self.params,
                                     grad_outputs=[vi for _, vi in used], allow_unused=True,
                                     retain_graph=not self.recompute_forward)
        except RuntimeError as exc:  # double backward through a fused kernel
            raise RuntimeError(
                f"Hessian-vector product failed in double backward: {exc}. The probes run the "
                "forward under the math attention backend; a model with another fused kernel "
                "needs attn_implementation='eager'") from exc
        if self.progress is not None:
            self.progress.update(1)
        return flatten([torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv)])

    def as_linear_operator(self, budget: int | None = None,
                           record_bytes: int = 0) -> "SymmetricTorchOperator":
        """This Hessian as a float64 ``scipy.sparse.linalg.LinearOperator`` on numpy vectors
        (each product is one :meth:`matvec`, counted in ``hvps`` as well)."""
        return SymmetricTorchOperator(self.matvec, self.dim, self.device, budget=budget,
                                      record_bytes=record_bytes)


class SolverStopped(RuntimeError):
    """Raised through a scipy solver to stop it; its recorded products are used instead."""


class ProductBudgetExhausted(SolverStopped):
    """Raised by :class:`SymmetricTorchOperator` when a solver asks for more products than
    its ``budget``."""


class SymmetricTorchOperator(LinearOperator):
    """A symmetric ``scipy.sparse.linalg.LinearOperator`` (float64, ``dim x dim``) over a torch
    matrix-vector product ``matvec(v: Tensor (dim,)) -> Tensor (dim,)``.

    Counts its products in ``products``; refuses (:class:`ProductBudgetExhausted`) the product
    after ``budget`` of them; records every ``(v, H v)`` pair in ``inputs``/``outputs`` while
    they fit in ``record_bytes`` (then ``recorded`` turns ``False`` and the records are
    dropped), so a Rayleigh-Ritz step can reuse them without new products. ``monitor()``, if
    set, runs after each recorded product and may raise :class:`SolverStopped` (e.g. when the
    recorded products already meet a convergence criterion).
    """

    def __init__(self, matvec: Callable[[Tensor], Tensor], dim: int, device=None,
                 budget: int | None = None, record_bytes: int = 0):
        super().__init__(dtype=np.float64, shape=(int(dim), int(dim)))
        self._torch_matvec = matvec
        self.device = device
        self.budget = budget
        self.products = 0
        self.recorded = 16 * int(dim) <= record_bytes
        self._record_bytes = record_bytes
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.monitor: Callable[[], None] | None = None

    def _matvec(self, x):
        if self.budget is not None and self.products >= self.budget:
            raise ProductBudgetExhausted(f"{self.budget} products used")
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1))
        v = torch.from_numpy(x).to(self.device)
        hv = self._torch_matvec(v).detach().to(torch.float64).cpu().numpy().reshape(-1)
        self.products += 1
        if self.recorded:
            if 16 * x.size * (len(self.inputs) + 1) <= self._record_bytes:
                self.inputs.append(x.copy())
                self.outputs.append(hv.copy())
                if self.monitor is not None:
                    self.monitor()
            else:  # too large to keep: the caller pays explicit products for residuals
                self.recorded = False
                self.inputs.clear()
                self.outputs.clear()
        return hv

    def _matmat(self, X):
        return np.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], axis=1)

    def _adjoint(self):
        return self  # a Hessian is symmetric


def _widened(pair, extra_A: Tensor, extra_B: Tensor) -> tuple[Tensor, Tensor]:
    """New tensors ``[A, extra_A]`` (m x (r+k)) and ``[B, extra_B]`` (n x (r+k)) in paper
    orientation, laid out as the pair stores its factors (``b`` as ``B^T`` when
    ``b_transposed``), so that an adapter using them computes ``A B^T + extra_A extra_B^T``.
    The pair's parameters are not touched."""
    a, b = pair.a, pair.b
    a_new = torch.cat([a.detach(), extra_A.to(a.dtype)], dim=1)
    if pair.b_transposed:
        b_new = torch.cat([b.detach(), extra_B.T.to(b.dtype)], dim=0)
    else:
        b_new = torch.cat([b.detach(), extra_B.to(b.dtype)], dim=1)
    return a_new, b_new


def _augment(pair, extra_A: Tensor, extra_B: Tensor) -> None:
    """Set the pair's stored factors to ``[A, extra_A]`` (m x (r+k)) and ``[B, extra_B]``
    (n x (r+k)) in paper orientation, so the adapter computes ``A B^T + extra_A extra_B^T``.

    This swaps the parameters' ``.data`` for tensors of another shape: use it only for
    forward passes under ``torch.no_grad()`` (:func:`loss_landscape`) and restore with
    :func:`preserved_state`. A forward pass *with* autograd through a parameter whose shape
    changed fails whenever an older graph through that parameter is still alive (its
    gradient accumulator, reused by every new graph, keeps the old shape); differentiate
    through :func:`substituted_parameters` instead, as :func:`gradient_in_W` does.
    """
    a_new, b_new = _widened(pair, extra_A, extra_B)
    pair.a.data, pair.b.data = a_new, b_new


def parameter_owners(model: nn.Module,
                     params: Sequence[Tensor]) -> list[tuple[nn.Module, str, Tensor]]:
    """``(module, attribute, parameter)`` for every slot of ``model`` holding one of ``params``
    (a parameter shared by several modules appears once per module)."""
    wanted = {id(p) for p in params}
    return [(module, name, p) for module in model.modules()
            for name, p in module._parameters.items() if p is not None and id(p) in wanted]


@contextlib.contextmanager
def substituted_parameters(model: nn.Module, replacements: dict[int, Tensor]) -> Iterator[None]:
    """Inside the block, ``model`` uses ``replacements[id(p)]`` wherever it holds parameter
    ``p`` (any shape, any tensor); the original parameter objects are put back on exit.

    Unlike a ``.data`` swap, the parameters themselves (values, shapes, ``.grad``, autograd
    history) are never touched, so graphs built before or after the block are unaffected and
    a graph built inside it differentiates the replacement tensors, which are fresh leaves.
    ``KeyError`` if a replacement is given for a tensor the model does not hold.
    """
    holders = {id(p) for p in model.parameters()}
    missing = [k for k in replacements if k not in holders]
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) to substitute are not parameters of the model")
    slots = parameter_owners(model, [p for p in model.parameters() if id(p) in replacements])
    try:
        for module, name, p in slots:
            module._parameters[name] = replacements[id(p)]
        yield
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


def gradient_in_W(model: nn.Module | None, loss_closure: LossClosure, pairs,
                  max_width: int = 8192) -> list[Tensor]:
    r"""``G = s * dl/dW`` (m x n, paper orientation, scaling folded in) for each LoRA pair.

    Works on any model whose adapter computes ``s * A B^T`` by matrix products (PEFT Linear
    LoRA, plain ``A @ B.T``): the model's factors are temporarily replaced by widened copies
    ``[A, 0]`` and ``[B, I_n]`` (:func:`substituted_parameters`), which leaves the function
    unchanged, and the gradient of the extra columns of ``A`` is ``s G B_extra = s G``. The
    parameters themselves are never modified, so this is safe while other autograd graphs
    through them are alive (e.g. the training step's). When ``model`` is ``None`` or does not
    hold the pairs' parameters (a loss over free tensors), their ``.data`` is widened in place
    instead, which needs that no graph through them be alive. Everything is restored exactly.
    """
    for p in pairs:
        if p.shape[1] > max_width:
            raise ValueError(f"layer {p.name} has n = {p.shape[1]} > {max_width} inputs; "
                             "gradient_in_W widens B by an n x n identity and refuses this size")
    ranks = [p.rank for p in pairs]
    factors = [t for p in pairs for t in p.params]
    held = {id(p) for p in model.parameters()} if model is not None else set()
    substitute = all(id(t) in held for t in factors)
    with preserved_state(model, factors):
        if model is not None:
            model.eval()  # dropout would make G random; the mode is restored on exit
        widened = []
        for p in pairs:
            m, n = p.shape
            widened.append(_widened(p, torch.zeros(m, n, dtype=p.a.dtype, device=p.a.device),
                                    torch.eye(n, dtype=p.a.dtype, device=p.a.device)))
        if substitute:
            targets = [a_new.requires_grad_(True) for a_new, _ in widened]
            replacements = {}
            for p, (a_new, b_new) in zip(pairs, widened):
                replacements[id(p.a)], replacements[id(p.b)] = a_new, b_new
            swap = substituted_parameters(model, replacements)
        else:
            for p, (a_new, b_new) in zip(pairs, widened):
                p.a.data, p.b.data = a_new, b_new
            targets = [p.a for p in pairs]
            swap = contextlib.nullcontext()
        with swap, math_attention(), torch.enable_grad():
            loss = evaluate_loss(loss_closure)
            try:
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
            except RuntimeError as exc:
                if substitute or "invalid gradient" not in str(exc):
                    raise
                raise RuntimeError(
                    f"gradient_in_W: {exc}. The LoRA factors are not parameters of the model "
                    "passed, so they were widened in place, which fails while an autograd graph "
                    "through them is alive; pass the model that holds them (or free that graph)"
                ) from exc
        del loss
        out = []
        for p, r, g in zip(pairs, ranks, grads):
            if g is None:
                raise ValueError(f"the loss does not depend on LoRA pair {p.name}")
            out.append(g[:, r:].detach().clone())
    return out


#: Hyper-parameters that describe a transform's *schedule* (which optimizer steps it acts on),
#: not the step itself; a probe that simulates one step gets the schedule through
#: ``ProbeContext.active`` instead.
SCHEDULE_HPARAMS = ("warmup_steps", "interval")


def canonical_method(method) -> str:
    """The registry name of ``method`` (``" LoRA "`` -> ``"lora"``); ``ValueError`` if unknown."""
    from ..methods import get_method  # the registry resolves names in one place

    return get_method(method).name


def step_method(method, hparams: dict | None = None, active: bool = True) -> tuple[str, dict]:
    """``(method, hparams)`` of the one SGD step a probe simulates at a training step.

    During a transform's warm-up or between its ``interval`` steps (``active=False``) the
    optimizer takes a plain LoRA step, so the step is ``("lora", {})``. Otherwise the method's
    own hyper-parameters are kept (``methods.METHODS[name].hparams``) without the schedule
    ones (:data:`SCHEDULE_HPARAMS`) and without the base optimizer's keywords (``momentum``,
    ``betas`` of AdamW...): the probes simulate one SGD step of the method.
    """
    from ..methods import METHODS

    name = canonical_method(method)
    if not active:
        return "lora", {}
    own = METHODS[name].hparams
    return name, {k: v for k, v in (hparams or {}).items()
                  if k in own and k not in SCHEDULE_HPARAMS}


def loss_and_grad_in_W(loss_fn_W: Callable[[Tensor], Tensor], W: Tensor) -> tuple[float, Tensor]:
    """``(l(W), dl/dW)`` for a loss given as a function of the full weight ``W`` (m x n)."""
    Wv = W.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn_W(Wv)
        (G,) = torch.autograd.grad(loss, Wv)
    return float(loss.detach()), G.detach()
