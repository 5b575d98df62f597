"""Data-parallel training across processes (``torchrun``; gloo on CPU, NCCL on GPU).

How it fits the refactoring
---------------------------
Every rank holds the full (replicated) LoRA factors and computes the gradient of its shard
of the batch. The gradients are averaged across ranks *before* ``optimizer.step()``, so the
method's transform (its optimizer step pre-hook, e.g. the RefLoRA refactoring, which reads
``A``, ``B``, ``grad_A``, ``grad_B``) sees the same reduced gradients and the same weights on
every rank and applies the identical transformation; parameters stay bit-identical across
ranks without any extra communication. Two equivalent ways get there:

* :func:`reflora_analysis.train.run` run under ``torchrun`` (this module's
  :class:`DistributedContext`) shards ``task.batch(step)`` by rank along dim 0 and calls
  :meth:`DistributedContext.average_gradients` (one flat all-reduce per dtype/device) after
  ``backward``. This works for every task, including tasks whose ``loss`` does not call
  ``model.forward`` (a ``DistributedDataParallel`` wrapper would not see those).
* :func:`wrap_ddp` wraps a model in ``DistributedDataParallel``; DDP averages gradients
  *during* ``backward`` (bucketed all-reduce in its autograd hooks), so by the time
  ``optimizer.step()`` runs its pre-hooks the gradients are already reduced. This is tested
  in ``tests/test_distributed.py`` (the pre-hook sees the cross-rank mean).

Requirements: the task's loss must be an example-indexed loss along dim 0 of the batch
tensors, with a batch size divisible by the world size; full-batch objectives such as
``mf`` or ``sensing`` have no example dimension and should be run in one process.
Averaging the ``k`` shard gradients weights every shard equally,
``g = (1/k) sum_j grad l_j``, which equals the full-batch gradient only when each shard's
loss is a mean over the same number of terms:

* exact for per-example-mean losses with equal shards: ``nlu-minilm`` and ``seq-cls``
  (cross-entropy averaged over the ``batch_size / k`` examples of each shard);
* approximate for ``causal-lm``, whose loss is token-weighted (the mean over the shard's
  *response tokens*): with ``T_j`` response tokens in shard ``j`` the full-batch gradient is
  ``sum_j (T_j / T) grad l_j`` (``T = sum_j T_j``), so DDP reweights a shard by
  ``(T / k) / T_j``. The two agree only when every shard holds the same number of response
  tokens; otherwise the step uses a differently weighted average of the same per-token
  gradients, not the single-process one. The refactoring itself is unaffected: every rank
  still sees the same reduced gradient.

Running on several GPUs::

    torchrun --standalone --nproc_per_node 4 -m reflora_analysis.cli train \\
        --task causal-lm --model /path/to/llama --data /path/to/commonsense_170k.json \\
        --method reflora --optimizer adamw --device cuda --out run.jsonl

Each rank uses ``cuda:LOCAL_RANK``; rank 0 writes the JSON lines, the metadata and the
checkpoints; a resume loads the same checkpoint on every rank. Hugging Face ``Trainer``
users launch with ``accelerate launch`` or ``torchrun`` as usual; the Trainer wraps the model
in DDP, so the refactoring hook again sees reduced gradients.

FSDP (not implemented)
----------------------
Under FSDP each rank holds a shard of every flattened parameter, so ``A`` and ``B`` are
split across ranks. RefLoRA only needs the ``r x r`` Grams ``A^T A``, ``B^T B`` and the
``r x r`` products ``A^T grad_A``-type terms (THEORY.md F3/F4): each rank would compute the
partial Grams of its rows, ``all_reduce`` them (``O(r^2)`` per layer, negligible next to the
gradient reduce-scatter), factor the ``r x r`` systems locally (identical on every rank)
and apply ``S`` to its own rows. This needs the LoRA factors sharded by rows (``A`` by ``m``,
``B`` by ``n``), which FSDP's flat-parameter sharding does not guarantee; a correct
implementation would keep LoRA parameters in their own FSDP unit with
``use_orig_params=True`` and reduce the Grams with a process group per unit. Until then,
LoRA factors are small enough to replicate: use DDP, or FSDP with the LoRA parameters
excluded from sharding (``ignored_states``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "init_from_env", "wrap_ddp", "shard_batch", "is_main_process"]


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous slice along dim 0 of every tensor in ``batch``.

    ``batch`` may be a tensor or a (nested) dict / list / tuple of tensors; non-tensors are
    returned unchanged. Raises ``ValueError`` if a tensor's dim 0 is not divisible by
    ``world_size`` (unequal shards would weight examples unequally in the averaged gradient).
    """
    if world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        size = batch.shape[0]
        if size % world_size:
            raise ValueError(f"batch dim 0 has {size} examples, not divisible by world size {world_size}")
        per = size // world_size
        return batch[rank * per:(rank + 1) * per]
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world_size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    return batch


@dataclass(frozen=True)
class DistributedContext:
    """Rank and world size of this process, and the few collectives the loop needs.

    ``DistributedContext.current()`` is the single-process context ``(0, 1)`` unless
    ``torch.distributed`` has been initialised (e.g. by :func:`init_from_env`).
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DistributedContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, runs probes and evaluation."""
        return self.rank == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (any picklable object; identity in one process)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def shard(self, batch: Any) -> Any:
        return shard_batch(batch, self.rank, self.world_size)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Cross-rank mean of a tensor (identity in one process)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace every ``p.grad`` by its mean over ranks (one all-reduce per dtype/device).

        Parameters without a gradient on this rank contribute zeros, so every rank takes
        part in the same collectives.
        """
        if self.world_size == 1:
            return
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for plist in groups.values():
            for p in plist:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in plist])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for p in plist:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n


def init_from_env(backend: str | None = None) -> DistributedContext:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment variables.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Returns the
    single-process context when ``WORLD_SIZE`` is unset or 1. On CUDA, selects
    ``cuda:LOCAL_RANK`` as the current device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistributedContext.current()


def is_main_process() -> bool:
    """True in rank 0 (or when not distributed): the process that writes files."""
    return DistributedContext.current().is_main


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` (device taken from its parameters).

    Frozen parameters are ignored by DDP (it only reduces ``requires_grad`` ones). Use the
    returned module for the forward pass; keep building the optimizer and the method's
    transform from the *unwrapped* model (the same parameter objects), so LoRA pair
    discovery sees the original module names.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("wrap_ddp needs torch.distributed to be initialised (run under torchrun "
                         "and call init_from_env() first)")
    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
