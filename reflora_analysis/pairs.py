r"""LoRA pairs: the one place that maps how factors are stored to the paper's notation.

PEFT stores ``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r) with
``delta W = scaling * lora_B @ lora_A``. The paper writes ``W = W0 + A B^T``. The map
(``THEORY.md`` section 1) is

    A := lora_B.weight        (m = out, shape m x r)
    B := lora_A.weight^T      (n = in,  shape n x r)

and ``scaling`` folds into ``G``. Embedding LoRA (``lora_embedding_A``: r x vocab,
``lora_embedding_B``: dim x r) uses the same map; its ``A B^T`` is the transpose of
PEFT's delta, which leaves every statement of THEORY.md unchanged (they are symmetric
under ``(A, B, G) -> (B, A, G^T)`` with ``S -> S^{-1}``).

Plain-torch models pass ``(A, B)`` parameters already in paper orientation.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["LoraPair", "find_lora_pairs", "group_pairs", "NoLoraLayersError"]


class NoLoraLayersError(ValueError):
    """The model (or list) holds no trainable LoRA pair."""


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One LoRA layer's factors, viewed in paper notation.

    ``a`` holds A (m x r) as stored; ``b`` holds B, stored as ``B^T`` (r x n) when
    ``b_transposed`` (PEFT) or as B (n x r) otherwise. ``A``, ``B``, ``grad_A`` and
    ``grad_B`` are views, so in-place writes (``pair.B.copy_(x)``) reach the parameters.
    """

    name: str
    a: nn.Parameter
    b: nn.Parameter
    scaling: float = 1.0
    b_transposed: bool = True

    @property
    def A(self) -> Tensor:
        return self.a.data

    @property
    def B(self) -> Tensor:
        return self.b.data.T if self.b_transposed else self.b.data

    @property
    def grad_A(self) -> Tensor | None:
        return self.a.grad

    @property
    def grad_B(self) -> Tensor | None:
        g = self.b.grad
        if g is None:
            return None
        return g.T if self.b_transposed else g

    @property
    def params(self) -> tuple[nn.Parameter, nn.Parameter]:
        return (self.a, self.b)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the adapted weight in paper orientation."""
        return (self.a.shape[0], self.B.shape[0])

    def product(self) -> Tensor:
        """``s A B^T`` (m x n): the adapter's contribution to the weight."""
        return self.scaling * (self.A @ self.B.T)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"LoraPair({self.name!r}, m={m}, n={n}, r={self.rank}, dtype={self.a.dtype})"


def _explicit_pair(i: int, item, scaling: float = 1.0) -> LoraPair:
    if isinstance(item, LoraPair):
        return item
    try:
        A, B = item
    except (TypeError, ValueError):
        raise ValueError(f"pair {i}: expected an (A, B) tuple of parameters, got {type(item).__name__}") from None
    for label, t in (("A", A), ("B", B)):
        if not isinstance(t, Tensor):
            raise ValueError(f"pair {i}: {label} must be a torch tensor/parameter, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"pair {i}: {label} must be 2-D, got shape {tuple(t.shape)}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"pair {i}: A (m x r) and B (n x r) must share the rank r; got A {tuple(A.shape)} "
            f"and B {tuple(B.shape)} (pass B as n x r, not r x n)"
        )
    r = A.shape[1]
    if r > min(A.shape[0], B.shape[0]):
        raise ValueError(
            f"pair {i}: rank r={r} exceeds min(m, n)={min(A.shape[0], B.shape[0])}, so A^T A or "
            "B^T B is never invertible and the refactoring is undefined"
        )
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(f"pair {i}: A and B must share dtype and device, got {A.dtype}/{A.device} "
                         f"and {B.dtype}/{B.device}")
    return LoraPair(name=f"pair{i}", a=A, b=B, scaling=scaling, b_transposed=False)


def _peft_pairs(model: nn.Module, adapter: str | None) -> list[LoraPair] | None:
    """Pairs of a PEFT model, or None when ``model`` contains no PEFT LoRA layer."""
    if "peft" not in sys.modules:  # no PEFT model can exist before peft is imported
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is an optional extra; plain models never need it
        return None
    pairs: list[LoraPair] = []
    found_layer = False
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        found_layer = True
        adapters = [adapter] if adapter is not None else list(module.active_adapters)
        for name in adapters:
            if name in module.lora_A:
                lora_a, lora_b = module.lora_A[name], module.lora_B[name]
                if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
                    raise ValueError(
                        f"unsupported LoRA layer type {type(module).__name__} at '{module_name}' "
                        f"(its factors are {type(lora_a).__name__}); only Linear and Embedding "
                        "LoRA layers can be refactored"
                    )
                a, b = lora_b.weight, lora_a.weight
            elif name in getattr(module, "lora_embedding_A", {}):
                a, b = module.lora_embedding_B[name], module.lora_embedding_A[name]
            else:
                continue
            if not (a.requires_grad and b.requires_grad):
                continue
            pairs.append(LoraPair(name=f"{module_name}[{name}]", a=a, b=b,
                                  scaling=float(module.scaling[name]), b_transposed=True))
    if not found_layer:
        return None
    return pairs


def find_lora_pairs(model_or_pairs, adapter: str | None = None) -> list[LoraPair]:
    """Every trainable LoRA pair of a PEFT model, or explicit ``(A, B)`` pairs checked.

    Parameters
    ----------
    model_or_pairs : nn.Module | Sequence[(A, B)] | Sequence[LoraPair]
        A PEFT model (Linear and Embedding LoRA layers, every active adapter), or pairs
        in paper orientation: A (m x r), B (n x r).
    adapter : str, optional
        Restrict a PEFT model to this adapter instead of the active ones.

    Raises
    ------
    NoLoraLayersError
        When nothing trainable is found.
    ValueError
        Unsupported LoRA layer type (named), mismatched ranks or non-2-D factors.
    """
    if isinstance(model_or_pairs, nn.Module):
        pairs = _peft_pairs(model_or_pairs, adapter)
        if not pairs:
            raise NoLoraLayersError(
                f"no trainable LoRA layers found in {type(model_or_pairs).__name__}"
                + ("" if pairs is not None else
                   " (wrap it with peft.get_peft_model, or pass explicit (A, B) parameter pairs)")
            )
        return pairs
    if isinstance(model_or_pairs, (str, bytes)) or not isinstance(model_or_pairs, Iterable):
        raise TypeError(
            "expected a PEFT model or a list of (A, B) parameter pairs, got "
            f"{type(model_or_pairs).__name__}"
        )
    pairs = [_explicit_pair(i, item) for i, item in enumerate(model_or_pairs)]
    if not pairs:
        raise NoLoraLayersError("no LoRA pairs given (the list is empty)")
    return pairs


def group_pairs(pairs: Sequence[LoraPair]) -> dict[tuple, list[LoraPair]]:
    """Pairs grouped by ``(rank, dtype, device)``: each group's r x r maths is one batched call."""
    groups: dict[tuple, list[LoraPair]] = defaultdict(list)
    for p in pairs:
        groups[(p.rank, p.a.dtype, p.a.device)].append(p)
    return dict(groups)
