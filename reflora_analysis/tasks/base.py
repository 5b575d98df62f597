r"""The :class:`Task` record every experiment runs on, and the checks shared by all tasks.

A task bundles a model whose only trainable tensors are LoRA factors (plus, for
classifiers, a small head), the training loss, a deterministic batch schedule and a
held-out evaluation. Everything numeric follows ``THEORY.md``: ``W = W0 + A B^T`` with
A (m x r) and B (n x r); ``pairs`` come from :func:`reflora_analysis.pairs.find_lora_pairs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..pairs import LoraPair, find_lora_pairs

__all__ = ["Task", "TaskOptions", "adapter_pairs", "adapter_phrase", "batch_generator",
           "resolve_device", "resolve_target_modules", "unfreeze_all"]


@dataclass(eq=False)
class Task:
    """One optimisation problem with LoRA factors, as ``train.run`` and the probes see it.

    Attributes
    ----------
    name : str
        Registry name (``"mf"``, ``"nlu-minilm"``, ...).
    model : nn.Module
        LoRA factors require grad; everything else is frozen except a classification head
        where the task has one. Built with ``full_finetune=True`` (the ``full`` method's
        option, :meth:`TaskOptions.adapter`): no LoRA layers, every parameter requires grad.
    pairs : list[LoraPair]
        The model's LoRA pairs in paper notation (``find_lora_pairs``); empty under
        ``full_finetune`` (so the probes that need pairs refuse the task in ``Probe.check``).
    loss : Callable[[batch], Tensor]
        Scalar training loss of ``model`` on a batch.
    batch : Callable[[int], batch]
        The batch of a given step; a pure function of ``(config["seed"], step)``, so a
        resumed run sees the same batches.
    evaluate : Callable[[], dict[str, float]]
        Held-out metrics (``accuracy``, ``relative_error``, ...); leaves the model's
        train/eval mode as found.
    default_lr : dict[str, float]
        Documented step size per base optimizer, keys ``"sgd"`` and ``"adamw"``.
    smoothness : float | None
        ``L``, the Lipschitz constant of ``grad l`` in ``W`` (single-layer tasks), else None.
    loss_in_W : Callable[[Tensor], Tensor] | None
        Single-layer tasks: ``l(W)`` for the full ``m x n`` weight, so ``G = grad l(W0 + A B^T)``.
    W0 : Tensor | None
        The frozen base weight of single-layer tasks (zeros for ``mf``).
    config : dict
        Every setting (JSON-able), seed included; recorded in run outputs.
    description : str
        One paragraph for the README's task table.
    """

    name: str
    model: nn.Module
    pairs: list[LoraPair]
    loss: Callable[[Any], Tensor]
    batch: Callable[[int], Any]
    evaluate: Callable[[], dict[str, float]]
    default_lr: dict[str, float]
    smoothness: float | None = None
    loss_in_W: Callable[[Tensor], Tensor] | None = None
    W0: Tensor | None = None
    config: dict = field(default_factory=dict)
    description: str = ""

    def describe(self) -> str:
        """One paragraph: what the task is, its data, its defaults."""
        return self.description

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should receive (LoRA factors and any head)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def __repr__(self) -> str:
        return f"Task({self.name!r}, pairs={len(self.pairs)}, default_lr={self.default_lr})"


class TaskOptions:
    """Validated overrides of one task: known keys only, typed, with clear messages.

    ``defaults`` maps each accepted key to its default value; ``quick_defaults`` replaces
    some of them when ``quick=True`` (same code path, smaller settings).
    """

    def __init__(self, task: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                 quick: bool = False, quick_defaults: Mapping[str, Any] | None = None):
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"task {task!r}: unknown override(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(sorted(defaults))}"
            )
        self.task = task
        self.values = dict(defaults)
        if quick and quick_defaults:
            self.values.update(quick_defaults)
        self.values.update(overrides)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def positive_int(self, key: str, minimum: int = 1) -> int:
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"task {self.task!r}: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    def positive_float(self, key: str, allow_zero: bool = False) -> float:
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"task {self.task!r}: {key} must be a number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"task {self.task!r}: {key} must be {bound}, got {value!r}")
        return float(value)

    def fraction(self, key: str) -> float:
        value = self.positive_float(key)
        if not value < 1:
            raise ValueError(f"task {self.task!r}: {key} must lie in (0, 1), got {value!r}")
        return value

    def existing_path(self, key: str) -> str | None:
        value = self.values[key]
        if value is None:
            return None
        path = os.path.expanduser(os.fspath(value))
        if not os.path.exists(path):
            raise FileNotFoundError(f"task {self.task!r}: {key} {path!r} does not exist")
        return path

    def checkpoint_dir(self, key: str = "model_path") -> str | None:
        """An existing local Hugging Face checkpoint directory (one holding ``config.json``),
        or None; checked here so a wrong directory is not reported by a tokenizer backend."""
        path = self.existing_path(key)
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            why = "no config.json" if os.path.isdir(path) else "a file, not a directory"
            raise ValueError(f"task {self.task!r}: {key} {path!r} is not a Hugging Face checkpoint "
                             f"directory ({why})")
        return path

    def boolean(self, key: str) -> bool:
        """A true/false setting (``--set use_dora=true``); 0/1 or a string are refused, so a
        typo never silently means False."""
        value = self.values[key]
        if not isinstance(value, bool):
            raise ValueError(f"task {self.task!r}: {key} must be true or false, got {value!r}")
        return value

    def adapter(self) -> str:
        """What is trained: ``"full"`` (``full_finetune=True``: the model's own weights, every
        one, no LoRA layers), ``"dora"`` (``use_dora=True``: PEFT DoRA layers) or ``"lora"``.

        A task without one of the two keys reads it as false; both true is one ``ValueError``
        (full fine-tuning attaches no adapter that could be DoRA).
        """
        full, dora = (key in self.values and self.boolean(key) for key in ("full_finetune", "use_dora"))
        if full and dora:
            raise ValueError(f"task {self.task!r}: full_finetune=true trains the model's own weights "
                             "without LoRA layers, so use_dora=true cannot apply; drop one of them")
        return "full" if full else "dora" if dora else "lora"

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.values[key]
        if value not in options:
            raise ValueError(f"task {self.task!r}: {key} must be one of {', '.join(options)}, got {value!r}")
        return value

    def dtype(self, key: str = "dtype") -> torch.dtype:
        name = self.choice(key, ("float32", "float64", "bfloat16"))
        return getattr(torch, name)

    def to_config(self) -> dict:
        """JSON-able copy of the settings (paths as strings)."""
        out = {}
        for key, value in self.values.items():
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def adapter_pairs(model: nn.Module, opts: TaskOptions) -> list[LoraPair]:
    """The model's LoRA pairs (``find_lora_pairs``), or ``[]`` when ``opts`` asks for full
    fine-tuning (:meth:`TaskOptions.adapter`), whose model has no LoRA layers."""
    return [] if opts.adapter() == "full" else find_lora_pairs(model)


def adapter_phrase(opts: TaskOptions, where: str) -> str:
    """How the task trains, for its description: ``"PEFT LoRA r=8 on <where>"`` (``DoRA``
    with ``use_dora``) or, under ``full_finetune``, ``"full fine-tuning (every weight
    trained, no LoRA layers)"``."""
    kind = opts.adapter()
    if kind == "full":
        return "full fine-tuning (every weight trained, no LoRA layers)"
    return f"PEFT {'DoRA' if kind == 'dora' else 'LoRA'} r={opts['lora_r']} on {where}"


def unfreeze_all(model: nn.Module) -> nn.Module:
    """``model`` with every parameter set to require grad (full fine-tuning)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, index, stream)`` (index: a step or an
    epoch): resume-safe sampling."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    # Distinct prime multipliers keep (seed, index, stream) triples from colliding in practice.
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + stream * 104_729) % (2**63))


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked.

    The package's one implementation: ``train`` imports it from here (tasks sit below
    train and never import it).

    Raises
    ------
    ValueError
        A malformed device string; CUDA asked for on a machine without it (the message
        names the torch build); a CUDA index beyond the visible devices; any other device
        type.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r} (use 'cpu', 'cuda' or 'cuda:N')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "without CUDA support" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available on this "
                             f"machine (torch {torch.__version__} built {built}); use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r} (use 'cpu', 'cuda' or 'cuda:N')")
    return dev


def resolve_target_modules(value, default):
    """PEFT ``target_modules``: ``None`` -> ``default``; ``"q_proj,v_proj"`` (as a command line
    gives it) -> a list of names; any other string is PEFT's full-match regex; a list as is."""
    if value is None:
        return default
    if isinstance(value, str) and "," in value:
        return [name.strip() for name in value.split(",") if name.strip()]
    return value
