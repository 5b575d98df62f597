r"""``lm-vader-<corpus>``: the binary VADER sentence polarity asked of a causal LM as a chat
instruction (:func:`make_lm_vader`; registered: ``lm-vader-movies``, :func:`make_lm_vader_movies`).

Data
    Exactly the binary ``vader-<corpus>`` task's examples (:func:`.sentence_data.task_data`:
    the same sentences in the same splits and order, the same ``split_digest``, the same
    data options: ``threshold``, ``split_seed``, ``val_fraction``, ``test_fraction``,
    ``train_examples``, ``eval_examples``).

Examples and loss
    The sentence in :data:`POLARITY_INSTRUCTION`, in the tokenizer's chat template
    (:func:`polarity_prompt`), answered ``positive`` / ``negative`` + EOS
    (:data:`POLARITY_CANDIDATES`, index = label); loss = mean cross-entropy over the answer
    tokens (:func:`.instruct.build_instruction_example`, :func:`.instruct.answer_loss`; the
    prompt cut from the left beyond ``max_length``).

Model
    SmolLM2-135M-Instruct by default (:func:`.gguf_model.load_smollm2`); ``model_path`` = a
    ``.gguf`` file or a local HF checkpoint directory instead (:func:`.gguf_model.load_causal_lm`).
    PEFT LoRA r = 8, alpha = 16, no dropout, on :data:`.gguf_model.LLAMA_LORA_TARGETS` (210
    pairs on SmolLM2's 30 layers); everything else frozen. ``use_dora=True`` (the ``dora``
    method): DoRA layers; ``full_finetune=True`` (the ``full`` method): no LoRA, every weight
    trained. Batches of 8 from per-epoch
    permutations seeded by ``(seed, epoch)``.

Evaluation (the :class:`.sentence_tasks.SentenceTask` contract)
    ``evaluate()``: validation ``accuracy``, ``f1_macro`` and ``loss`` (cross-entropy of the
    two candidates' likelihoods renormalised, :func:`.sentence_tasks.binary_metrics` on the
    log-likelihoods), by comparing the total log-likelihood of ``negative`` and ``positive``
    after the prompt (:func:`.instruct.answer_scores`, no EOS), plus the same on the test split
    as ``test_*``. ``quick=True``: batch 4, the first 256 training and 64 validation / test
    examples (stratified prefixes).

    Zero-shot, SmolLM2-135M-Instruct (Q4_1) says ``positive`` to every one of the first 24
    validation sentences (accuracy 0.5 on the first 64): all the accuracy a run shows comes
    from the fine-tuning. Cost: a forward/backward of a batch of 4 (~90 tokens) takes tens of
    seconds on two CPU cores; runs beyond ``quick`` want a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .base import TaskOptions, adapter_pairs, adapter_phrase, resolve_device, resolve_target_modules
from .gguf_model import KNOWN_MODELS, LLAMA_LORA_TARGETS, load_causal_lm
from .instruct import answer_loss, answer_scores, build_instruction_example, chat_prompt, collate_examples, \
    padding_token_id
from .llm import attach_lora
from .nlu import epoch_batch_indices, seeded
from .sentence_data import SPLITS, TaskData, check_split_options, data_source, label_rule, task_data
from .sentence_tasks import SentenceTask, binary_metrics, validation_then_test

__all__ = ["POLARITY_CANDIDATES", "POLARITY_INSTRUCTION", "LM_VADER_DEFAULTS", "LM_VADER_QUICK",
           "LM_VADER_DEFAULT_LR", "polarity_prompt", "make_lm_vader", "make_lm_vader_movies"]

POLARITY_CANDIDATES = ("negative", "positive")  # index = polarity label (0 negative, 1 positive)
POLARITY_INSTRUCTION = ("Is the sentiment of this {what} positive or negative?\n\n{text}\n\n"
                        "Answer with one word: positive or negative.")
_WHAT = {"movies": "movie review snippet", "tweets": "tweet", "amazon": "product review sentence",
         "nyt": "newspaper editorial sentence"}

LM_VADER_DEFAULTS: dict[str, Any] = dict(
    model_path=None, lora_r=8, lora_alpha=16.0, target_modules=None, init_lora_weights=True,
    use_dora=False, full_finetune=False, batch_size=8, eval_batch_size=32, max_length=128, threshold=0.5, split_seed=0,
    val_fraction=0.1, test_fraction=0.1, train_examples=None, eval_examples=None, evaluate_test=True,
    dtype="float32")
LM_VADER_QUICK: dict[str, Any] = dict(batch_size=4, train_examples=256, eval_examples=64)
# AdamW 3e-4 as LLM-Adapters' LoRA runs (causal-lm's pretrained default); SGD untuned.
LM_VADER_DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-4}


def polarity_prompt(tokenizer, text: str, corpus: str = "movies") -> str:
    """The instruction for one sentence, in the tokenizer's chat template (:func:`chat_prompt`)."""
    return chat_prompt(tokenizer, POLARITY_INSTRUCTION.format(what=_WHAT.get(corpus, "sentence"), text=text))


def _model_spec(opts: TaskOptions):
    """``model_path``: None, a known short name (:data:`KNOWN_MODELS`) or an existing path."""
    spec = opts["model_path"]
    if spec is not None and not (isinstance(spec, str) and spec.lower() in KNOWN_MODELS):
        spec = opts.existing_path("model_path")
    return spec


def _causal_lm_with_lora(model_spec, opts: TaskOptions, seed: int):
    """``(PEFT model, tokenizer, model info, LoRA targets)``: :func:`load_causal_lm` in
    ``opts``' dtype with eager attention, every weight frozen, then PEFT LoRA (no dropout) on
    ``target_modules`` (default :data:`LLAMA_LORA_TARGETS`), initialised under ``seed``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    targets = resolve_target_modules(opts["target_modules"], LLAMA_LORA_TARGETS)
    base, tokenizer, info = load_causal_lm(model_spec, dtype=opts.dtype(), attn_implementation="eager")
    with seeded(seed):
        model = attach_lora(base, opts, targets)
    return model, tokenizer, info, targets


def _describe(name: str, corpus: str, opts: TaskOptions, data: TaskData, info: dict, targets,
              n_pairs: int) -> tuple[dict[str, Any], str]:
    """The task's config entries (beyond task, seed and device) and its description."""
    sizes = {s: data.summary[s]["size"] for s in SPLITS}
    config = {**opts.to_config(), "corpus": corpus, "model_info": info,
              "objective": "instruction (answer tokens only)", "data_source": data_source(corpus),
              "label_rule": label_rule(False, float(opts["threshold"])),
              "splits": sizes, "split_digest": data.digest, "examples_used": data.used,
              "instruction": POLARITY_INSTRUCTION, "candidates": list(POLARITY_CANDIDATES),
              "lora_pairs": n_pairs}
    where = targets if isinstance(targets, str) else ", ".join(targets)
    desc = (f"{info['name']} ({info['source']}; {info['parameters']:,} parameters) + {adapter_phrase(opts, where)}; "
            f"VADER {corpus} polarity as chat instructions, answer 'positive'/'negative' (loss on the answer); "
            f"splits {' / '.join(f'{sizes[s]:,}' for s in SPLITS)} as vader-{corpus}. "
            "Metric: accuracy of the higher-likelihood answer; evaluate() = validation, test_* = test.")
    return config, desc


def make_lm_vader(corpus: str = "movies", *, seed: int = 0, device="cpu", quick: bool = False,
                  name: str | None = None, **overrides) -> SentenceTask:
    r"""``lm-vader-<corpus>``: the binary VADER sentence polarity of ``vader-<corpus>`` (same
    splits) phrased as instructions for a causal LM (module docstring). ``overrides``:
    :data:`LM_VADER_DEFAULTS`' keys; ``quick`` applies :data:`LM_VADER_QUICK`."""
    name = name or f"lm-vader-{corpus}"
    opts = TaskOptions(name, LM_VADER_DEFAULTS, overrides, quick, LM_VADER_QUICK)
    check_split_options(opts)
    max_length = opts.positive_int("max_length", 8)
    batch_size, eval_batch_size = opts.positive_int("batch_size"), opts.positive_int("eval_batch_size")
    model_spec = _model_spec(opts)
    data = task_data(corpus, False, opts)
    dev = resolve_device(device)
    model, tokenizer, info, targets = _causal_lm_with_lora(model_spec, opts, seed)
    model.to(dev)
    pairs = adapter_pairs(model, opts)
    pad = padding_token_id(tokenizer)
    prompts = {s: [polarity_prompt(tokenizer, text, corpus) for text in data.texts[s]] for s in SPLITS}
    gold = {s: torch.tensor(data.targets[s], dtype=torch.long) for s in SPLITS}
    train_examples = [build_instruction_example(tokenizer, p, POLARITY_CANDIDATES[int(y)], max_length=max_length)
                      for p, y in zip(prompts["train"], gold["train"])]

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = [train_examples[i] for i in epoch_batch_indices(len(train_examples), batch_size, seed, step)]
        return {k: v.to(dev) for k, v in collate_examples(rows, pad).items()}

    def loss(b: dict[str, Tensor]) -> Tensor:
        return answer_loss(model, b)

    def evaluate_split(s: str) -> dict[str, float]:
        if s not in prompts:
            raise ValueError(f"split must be one of train, validation, test, got {s!r}")
        if not prompts[s]:
            raise ValueError(f"task {name!r}: the {s} split is empty")
        scores = answer_scores(model, tokenizer, prompts[s], list(POLARITY_CANDIDATES),
                               batch_size=eval_batch_size, max_length=max_length)
        return binary_metrics(torch.tensor(scores, dtype=torch.float32), gold[s])

    extra, desc = _describe(name, corpus, opts, data, info, targets, len(pairs))
    config = {"task": name, "seed": seed, "device": str(dev), **extra}
    return SentenceTask(name=name, model=model, pairs=pairs, loss=loss, batch=batch,
                        evaluate=validation_then_test(evaluate_split, opts["evaluate_test"] and bool(prompts["test"])),
                        default_lr=dict(LM_VADER_DEFAULT_LR), config=config, description=desc,
                        evaluate_split=evaluate_split)


def make_lm_vader_movies(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``lm-vader-movies``: :func:`make_lm_vader` on the Rotten Tomatoes snippets."""
    return make_lm_vader("movies", seed=seed, device=device, quick=quick, **overrides)
