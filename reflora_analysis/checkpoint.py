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

A run's files
-------------
:class:`RunLog` owns the three files of a run at ``out``: the JSON lines (``run.jsonl``,
one flushed line per logged step), the metadata (``run.meta.json``: identity, versions,
status, summary; rewritten atomically at start and end) and the checkpoint path
(``run.ckpt.pt``, :func:`checkpoint_path`). It refuses to replace an earlier run's files
(:meth:`RunLog.refuse_to_replace`, every rank alike), truncates the lines after a
checkpoint on resume (:meth:`RunLog.truncate`) and keeps the records in memory (also when
``out`` is None). Under ``torch.distributed`` only rank 0 writes.
"""

from __future__ import annotations

import platform
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import DistributedContext
from .io import (JsonLinesWriter, atomic_save_torch, atomic_write_json, to_jsonable,
                 truncate_json_lines)

__all__ = [
    "FORMAT_VERSION",
    "PoisonedCheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "trainable_state",
    "load_trainable_state",
    "first_nonfinite",
    "first_nonfinite_tensor",
    "save_checkpoint",
    "load_checkpoint",
    "restore_training_state",
    "checkpoint_path",
    "meta_path",
    "RunLog",
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


def first_nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first tensor of ``{name: tensor}`` holding NaN/Inf, else None.

    The common (finite) case costs one host-device sync in all: the per-tensor flags are
    reduced on the device first; only a failure is searched tensor by tensor.
    """
    if not tensors:
        return None
    flags = [torch.isfinite(t).all() for t in tensors.values()]
    if len({f.device for f in flags}) == 1:
        finite = bool(torch.stack(flags).all())
    else:  # a model spread over several devices: one sync per tensor
        finite = all(bool(f) for f in flags)
    if finite:
        return None
    return next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)


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


def load_checkpoint(path, *, identity: dict | None = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (safe ``weights_only`` loader).

    Raises ``FileNotFoundError`` if missing and ``ValueError`` if unreadable or of another
    format; the message is one line, ``not a reflora-analysis checkpoint: PATH (why)`` for a
    file that is not one (a text or JSON file, another program's ``torch.save`` file).
    With ``identity`` (a run's :meth:`~reflora_analysis.config.RunConfig.identity`), a
    checkpoint written by a different run is refused too (``ValueError`` naming the keys
    that differ).
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
    if identity is not None:
        saved = ckpt.get("identity") or {}
        if to_jsonable(saved) != to_jsonable(identity):
            diff = [k for k in identity if to_jsonable(saved.get(k)) != to_jsonable(identity[k])]
            raise ValueError(f"checkpoint {path} was written by a different run "
                             f"(differs in: {', '.join(diff)}); use another --out or drop --resume")
    return ckpt


def restore_training_state(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of :func:`save_checkpoint`: trainable weights, buffers, the optimizer state
    (which restores an attached transform through its state-dict hook) and every RNG."""
    load_trainable_state(model, ckpt["trainable"])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in ckpt["buffers"].items():
            if name in buffers:
                buffers[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"])


# ---- a run's files ------------------------------------------------------------------------

def checkpoint_path(out) -> Path:
    """``run.jsonl`` -> ``run.ckpt.pt`` (the latest checkpoint of that run)."""
    return Path(out).with_suffix(".ckpt.pt")


def meta_path(out) -> Path:
    """``run.jsonl`` -> ``run.meta.json`` (config, versions, status and summary)."""
    return Path(out).with_suffix(".meta.json")


def _versions() -> dict[str, str]:
    from . import __version__
    versions = {"reflora_analysis": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
    for name in ("peft", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


class RunLog:
    """The JSON lines, metadata and checkpoint path of one run at ``out`` (module docstring).

    ``out=None`` keeps the records in memory only. Use: :meth:`prepare` (before anything is
    built: the directory, the refusal), :meth:`truncate` (on resume), :meth:`open` (writes
    the ``running`` meta), :meth:`append` per logged step, :meth:`close` (final meta).
    ``records`` holds every logged record of the run (on resume: the kept lines first).
    """

    def __init__(self, out=None, *, dist: DistributedContext | None = None):
        self.path = None if out is None else Path(out)
        self.dist = dist if dist is not None else DistributedContext.current()
        self.records: list[dict] = []
        self._writer: JsonLinesWriter | None = None
        self._meta: dict = {}
        self._tail: dict = {}

    @property
    def meta_path(self) -> Path | None:
        return None if self.path is None else meta_path(self.path)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.path is None else checkpoint_path(self.path)

    @property
    def writes(self) -> bool:
        """Whether this process writes the files (a path is set and this is rank 0)."""
        return self.path is not None and self.dist.is_main

    def existing(self) -> list[Path]:
        """The files of a previous run at ``out``: its log, meta and checkpoint, those that exist."""
        if self.path is None:
            return []
        return [p for p in (self.path, self.meta_path, self.checkpoint_path) if p.exists()]

    def refuse_to_replace(self) -> None:
        """``FileExistsError`` (every rank alike) if a previous run's files are at ``out``.

        Rank 0 looks, then tells the other ranks, so all of them raise (or none) even when
        they reach this point at different times."""
        found = self.existing() if self.dist.is_main else []
        message = None
        if found:
            message = (f"{found[0]} already exists (a previous run); pass --resume to continue it "
                       f"or --overwrite to replace it (train.run: resume=True / overwrite=True)")
        message = self.dist.broadcast(message)
        if message is not None:
            raise FileExistsError(message)

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Create ``out``'s directory (``ValueError`` if impossible) and, unless ``resume`` or
        ``overwrite``, refuse an earlier run's files. Writes no file."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create output directory {self.path.parent}: "
                             f"{err.strerror}") from None
        if not resume and not overwrite:
            self.refuse_to_replace()

    def truncate(self, step: int) -> list[dict]:
        """Keep the lines before ``step`` (a resume re-runs the rest); returns them."""
        if self.writes and self.path.exists():
            self.records = truncate_json_lines(self.path, lambda r: r.get("step", -1) < step)
        return self.records

    def open(self, config, *, start: int = 0, overwrite: bool = False) -> None:
        """Start writing for the resolved ``config`` (a :class:`~reflora_analysis.config.RunConfig`).

        A fresh run (``start == 0``) removes the old log, and with ``overwrite`` the old
        checkpoint (a later resume must not pick it up); the ``running`` meta is written.
        """
        from . import __version__
        self._meta = {**config.identity(), "steps": config.steps}
        self._tail = {"reflora_analysis_version": __version__, "versions": _versions(),
                      "device": config.device}
        if not self.writes:
            return
        if start == 0:
            for path in [self.path] + ([self.checkpoint_path] if overwrite else []):
                path.unlink(missing_ok=True)
        self._writer = JsonLinesWriter(self.path)
        atomic_write_json(self.meta_path, {**self._meta, "status": "running", **self._tail})

    def append(self, record: dict) -> None:
        """Keep ``record`` and, on rank 0 with a path, append it as one flushed JSON line."""
        self.records.append(record)
        if self._writer is not None:
            self._writer.write(record)

    def close(self, status: str, error: str | None = None, *, skipped: int = 0,
              elapsed: float = 0.0) -> None:
        """Close the lines and write the final meta: ``status`` (``completed``, ``diverged``,
        ``failed``), ``error``, skipped steps, the last logged step, loss and evaluation."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = next((r for r in reversed(self.records) if "loss" in r), {})
        atomic_write_json(self.meta_path, {
            **self._meta, "status": status, "error": error, **self._tail,
            "skipped_steps": skipped, "final_step": final.get("step"),
            "final_loss": final.get("loss"), "elapsed": elapsed,
            "final_eval": {k: v for k, v in final.items() if k.startswith("eval/")}})
