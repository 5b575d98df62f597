"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

A checkpoint is a plain dict of state dicts (nanoGPT style), saved with
:func:`reflora_analysis.io.atomic_save_torch` (temporary file in the same directory, fsync,
``os.replace``), so the file on disk is always the last *complete* checkpoint:

========== ================================================================================
key        content
========== ================================================================================
format     :data:`FORMAT_VERSION`
step       number of optimizer updates applied (the state is *before* iteration ``step``)
elapsed    wall seconds of training so far (the ``time`` column continues from it)
identity   the run's config (task, method, optimizer, lr, seed, hparams); a resume with a
           different identity is refused
trainable  ``{name: tensor}`` for every parameter with ``requires_grad`` (the LoRA factors,
           plus any trainable head)
buffers    ``{name: tensor}`` of the model's buffers (running statistics, if any)
optimizer  ``optimizer.state_dict()``: moments, AdamW step counts, and the state of the
           method's :class:`~reflora_analysis.refactor.PairTransform`, which its state-dict
           hooks store under :data:`~reflora_analysis.refactor.STATE_DICT_KEY` (and
           ``optimizer.load_state_dict`` restores); it is stored once, there (format 1 also
           kept a separate ``transform`` copy, which doubled e.g. LoRA-Pro's 2mn moments)
rng        torch CPU, every CUDA device, numpy's and Python's global generators
extra      small JSON-able run counters (e.g. skipped steps)
========== ================================================================================

Before writing, every floating tensor is checked to be finite: a diverged state raises
:class:`PoisonedCheckpointError` and the previous checkpoint stays in place.

RNG states are stored as tensors and plain tuples so that ``torch.load(weights_only=True)``
(the safe loader, no arbitrary pickle) reads them back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .io import atomic_save_torch

__all__ = [
    "FORMAT_VERSION",
    "PoisonedCheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "trainable_state",
    "load_trainable_state",
    "first_nonfinite",
    "save_checkpoint",
    "load_checkpoint",
]

FORMAT_VERSION = 2


class PoisonedCheckpointError(RuntimeError):
    """The state to be saved holds NaN or Inf; the previous checkpoint was kept."""


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global generator a training step may draw from."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda_states):
            raise ValueError("checkpoint holds CUDA RNG states for "
                             f"{len(cuda_states)} device(s) but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all(cuda_states)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require grad (detached, same storage dtype)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into ``model`` in place (exact bits, no re-init).

    Raises ``ValueError`` when the names differ (another model, or a different LoRA config).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError("checkpoint does not match the model's trainable parameters: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            saved = state[name]
            if saved.shape != p.shape:
                raise ValueError(f"checkpoint parameter {name!r} has shape {tuple(saved.shape)}, "
                                 f"model has {tuple(p.shape)}")
            p.copy_(saved)


def first_nonfinite(obj: Any, prefix: str = "") -> str | None:
    """Path (``"optimizer.state.3.exp_avg"``) of the first floating tensor with NaN/Inf, else None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            if not bool(torch.isfinite(obj).all()):
                return prefix or "<tensor>"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    transform=None, identity: dict | None = None, elapsed: float = 0.0,
                    rng: dict | None = None, extra: dict | None = None) -> dict:
    """Write a complete checkpoint to ``path`` atomically and return it.

    ``rng`` defaults to a snapshot taken now. Raises :class:`PoisonedCheckpointError`
    (naming the offending entry) without touching ``path`` if any state is non-finite.
    ``transform``, if given, must be attached to ``optimizer``: its state is saved inside the
    optimizer's state dict (``ValueError`` otherwise, since it would be lost).
    """
    optimizer_state = optimizer.state_dict()
    if transform is not None:
        from .refactor import STATE_DICT_KEY
        if transform.state_key not in optimizer_state.get(STATE_DICT_KEY, {}):
            raise ValueError(f"{type(transform).__name__} is not attached to this optimizer, so "
                             "its state would not be saved; attach it before checkpointing")
    ckpt = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "elapsed": float(elapsed),
        "identity": identity or {},
        "trainable": trainable_state(model),
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "optimizer": optimizer_state,
        "rng": rng if rng is not None else capture_rng_state(),
        "extra": extra or {},
    }
    bad = first_nonfinite({k: ckpt[k] for k in ("trainable", "optimizer")})
    if bad is not None:
        raise PoisonedCheckpointError(
            f"refusing to write checkpoint at step {step}: {bad} holds NaN/Inf; the previous "
            f"checkpoint at {path} is kept")
    atomic_save_torch(path, ckpt)
    return ckpt


def _why_unreadable(path: Path, exc: Exception) -> str:
    """A short reason why ``torch.load`` could not read ``path`` (never torch's long
    ``weights_only`` explanation)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return f"cannot read checkpoint: {err.strerror or err}"
    if not head:
        return "cannot read checkpoint: the file is empty"
    # torch.save writes a zip archive (PK\x03\x04); the legacy format starts with a pickle
    # protocol opcode (\x80)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        return "cannot read checkpoint: not a file written by torch.save"
    if "weights_only" in str(exc) or type(exc).__name__ == "UnpicklingError":
        return ("cannot read checkpoint: a torch.save file holding objects other than tensors "
                "and plain containers, which the safe loader refuses")
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]  # its first sentence
    first = first if len(first) <= 120 else first[:117] + "..."
    return f"cannot read checkpoint: {type(exc).__name__}{': ' + first if first else ''}"


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (safe ``weights_only`` loader).

    Raises ``FileNotFoundError`` if missing and ``ValueError`` if unreadable or of another
    format; the message is one line, ``not a reflora-analysis checkpoint: PATH (why)`` for a
    file that is not one (a text or JSON file, another program's ``torch.save`` file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"not a reflora-analysis checkpoint: {path} "
                         f"({_why_unreadable(path, exc)})") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"not a reflora-analysis checkpoint: {path} (a torch.save file holding "
                         f"a {type(ckpt).__name__}, not a checkpoint dict)")
    if not isinstance(ckpt.get("format"), int) or isinstance(ckpt.get("format"), bool):
        raise ValueError(f"not a reflora-analysis checkpoint: {path} (a torch.save dict without "
                         f"an integer 'format' entry; this reflora-analysis writes format "
                         f"{FORMAT_VERSION})")
    if ckpt["format"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {ckpt['format']}, this reflora-analysis "
                         f"reads format {FORMAT_VERSION} only; rerun without --resume (or with "
                         "another --out), or resume with the version that wrote it")
    missing = [k for k in ("step", "trainable") if k not in ckpt]
    if missing:
        raise ValueError(f"not a reflora-analysis checkpoint: {path} (format {ckpt['format']} "
                         f"but no {', '.join(map(repr, missing))} entry)")
    return ckpt
