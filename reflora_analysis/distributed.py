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

Sharded frozen base (FSDP2, ``--fsdp``)
---------------------------------------
When the frozen base does not fit one device, ``reflora-analysis train ... --fsdp`` under
``torchrun`` (:func:`init_from_env` with ``fsdp=True``) shards it with FSDP2
(``torch.distributed.fsdp.fully_shard``, :func:`shard_frozen_base`): one FSDP unit per
transformer block (the classes a Hugging Face model lists in ``_no_split_modules``, else the
elements of its outermost ``nn.ModuleList``s) and one for the remaining frozen weights
(embeddings, final norm, LM head), each rank storing ``1/k`` of every frozen weight and
all-gathering a block's weights only while that block runs (forward, and again in backward,
where the frozen weights are needed for the gradient with respect to the activations). Every
parameter with ``requires_grad`` (the LoRA factors, DoRA magnitudes) is passed as FSDP's
``ignored_params``: it stays a whole, plain tensor on every rank, and its gradient is averaged
by :meth:`DistributedContext.average_gradients` before ``optimizer.step()`` exactly as above.
So the refactorer runs unchanged on whole ``A``, ``B``, ``grad_A``, ``grad_B`` (THEORY.md
F3/F4). Because a sharded block's forward is a collective, every rank runs every forward pass:
``task.evaluate()`` runs on all ranks (rank 0 alone writes), and probes are refused under
``--fsdp`` (they run on rank 0 alone). Tested with 2 gloo processes on CPU against one
process on the combined batch (``tests/test_distributed.py``). ``--resume`` needs nothing
more: a checkpoint holds the trainable tensors and buffers (FSDP2 shards neither), the
optimizer and transform state and the RNG; rank 0 writes it, every rank loads it; a 2-rank run
stopped and resumed matches an uninterrupted one (``tests/test_fsdp_resume.py``).

Memory per GPU, 8 GPUs, LoRA r = 16 on q, k, v, o, gate, up, down (fp32 LoRA factors, as
PEFT keeps adapters over a bf16 base), AdamW:

=========================================  ===============  ================
                                           LLaMA-7B         LLaMA-2-70B
=========================================  ===============  ================
bf16 base weights, whole (what DDP holds)  13.5 GB          138 GB
bf16 base weights sharded, ``/8``          1.68 GB          17.2 GB
one gathered block (x2 with prefetch)      0.40 GB (0.81)   1.71 GB (3.42)
gathered root unit (embeddings + head)     0.52 GB          1.05 GB
LoRA factors (40.0 M / 207 M parameters)   0.16 GB          0.83 GB
+ their gradients + AdamW's two moments    0.64 GB in all   3.31 GB in all
=========================================  ===============  ================

So the weights, gradients and optimizer state take about 3.7 GB per rank for 7B (against
14.1 GB unsharded) and about 25 GB for 70B (against 141 GB, which fits no single GPU).
The frozen base has no gradient and no optimizer state; the only optimizer state is
AdamW's two moments of the LoRA factors (RefLoRA adds ``r x r`` matrices per layer and
temporaries no larger than the factors). Activations are not sharded: they scale with each
rank's share of the batch, ``b = batch / 8`` sequences of ``s`` tokens; the usual 16-bit
estimate of ``34 s b h + 5 a s^2 b`` bytes per layer (Korthikanti et al., 2022; eager
attention) gives about 3.6 GB (7B) and 18 GB (70B) per 512-token sequence, which
activation checkpointing cuts to about one layer's worth plus the block inputs.

Sharding the LoRA factors themselves would pay off only for much larger ranks: RefLoRA
needs only the ``r x r`` Grams ``A^T A``, ``B^T B`` and ``A^T grad_A``-type products, and
for row-sharded factors each is the sum of the ranks' local Grams (one ``O(r^2)``
all-reduce per layer), after which every rank factors the same ``r x r`` systems and
applies ``S`` to its own rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "init_from_env", "wrap_ddp", "shard_batch", "is_main_process",
           "shard_frozen_base", "prepare_fsdp"]

#: whether this process's training shards the frozen base (set by ``init_from_env(fsdp=True)``);
#: a property of the launch, like the process group itself, not of a run's identity (an FSDP
#: run's checkpoint holds the same whole LoRA factors as a data-parallel run's)
_LAUNCH = {"fsdp": False}


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
    ``torch.distributed`` has been initialised (e.g. by :func:`init_from_env`). ``fsdp``:
    the frozen base is sharded across the ranks (:func:`shard_frozen_base`), so every rank
    must run every forward pass.
    """

    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @classmethod
    def current(cls) -> "DistributedContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), fsdp=_LAUNCH["fsdp"])
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


def init_from_env(backend: str | None = None, *, fsdp: bool = False) -> DistributedContext:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment variables.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Returns the
    single-process context when ``WORLD_SIZE`` is unset or 1. On CUDA, selects
    ``cuda:LOCAL_RANK`` as the current device. ``fsdp``: training in this process shards the
    frozen base (:func:`prepare_fsdp`); needs ``WORLD_SIZE >= 2`` (``ValueError`` otherwise).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world_size <= 1:
        raise ValueError("--fsdp shards the frozen base across torchrun processes, but WORLD_SIZE "
                         "is 1; launch with torchrun --nproc_per_node N (N >= 2) or drop --fsdp")
    _LAUNCH["fsdp"] = bool(fsdp)
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


# ---- FSDP2: the frozen base sharded, the LoRA factors whole -------------------------------

def _base_root(model: nn.Module) -> nn.Module:
    """The outermost submodule whose *class* lists ``_no_split_modules`` (a Hugging Face
    ``PreTrainedModel``: the module whose forward every path calls, ``generate`` included),
    else ``model``. The class is asked, not the instance: ``PeftModel`` forwards unknown
    attributes to the model it wraps, but its own forward is skipped by ``generate``."""
    for module in model.modules():
        if getattr(type(module), "_no_split_modules", None):
            return module
    return model


def _transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """The units to shard one by one, outermost first: modules of the classes in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), else the elements of the outermost
    ``nn.ModuleList``s (the layers of a plain-torch stack)."""
    names = set(getattr(type(root), "_no_split_modules", None) or ())
    if names:
        return [m for m in root.modules() if type(m).__name__ in names]
    blocks, inside = [], set()
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            blocks.extend(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def _has_frozen(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def shard_frozen_base(model: nn.Module, mesh=None) -> list[nn.Module]:
    """Shard ``model``'s frozen parameters with FSDP2; trainable ones stay whole on every rank.

    ``fully_shard`` is applied to each transformer block holding frozen weights (innermost
    first, as FSDP2 requires), then to the base root (:func:`_base_root`: the remaining
    frozen weights), all with ``ignored_params`` = every parameter with ``requires_grad``,
    so the LoRA factors are neither sharded nor reduced by FSDP (the training loop averages
    their gradients: :meth:`DistributedContext.average_gradients`). ``mesh``: a 1-D
    ``DeviceMesh`` over all ranks on the parameters' device type by default. Returns the
    sharded modules, root last. ``ValueError`` when ``torch.distributed`` is not initialised
    or the model has no frozen parameter (nothing to shard: use plain data parallelism).
    """
    if not _has_frozen(model):
        raise ValueError("--fsdp shards the frozen base model, but this model has no frozen "
                         "parameters; run without --fsdp (plain data parallelism)")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_frozen_base needs torch.distributed to be initialised (run under "
                         "torchrun and call init_from_env(fsdp=True) first)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    trainable = {p for p in model.parameters() if p.requires_grad}
    root = _base_root(model)
    units = [b for b in _transformer_blocks(root) if b is not root and _has_frozen(b)]
    for block in reversed(units):  # innermost first: a nested unit must exist before its parent
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(root, mesh=mesh, ignored_params=trainable)
    return [*units, root]


def prepare_fsdp(task, probes=()) -> list[nn.Module]:
    """What ``train.build_run`` does under ``--fsdp``: refuse probes (rank 0 runs them alone,
    but a sharded forward needs every rank), then :func:`shard_frozen_base` on ``task.model``."""
    if probes:
        raise ValueError("probes run on rank 0 alone and cannot run on a base model sharded with "
                         "--fsdp; drop --probe, or probe a checkpoint without --fsdp")
    return shard_frozen_base(task.model)
