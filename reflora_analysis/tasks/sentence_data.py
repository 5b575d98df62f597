r"""The VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014): reading, labels, splits.

Data only, no model: the tasks built on it are in :mod:`.sentence_tasks` (MiniLM encoder)
and :mod:`.lm_sentences` (causal LM); :mod:`.sentences` is the public face of both.

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

Labels
    Binary polarity (:func:`polarity`): label 1 if ``mean > t``, 0 if ``mean < -t``;
    near-neutral ``|mean| <= t`` is dropped. ``t = 0.5`` (:data:`DEFAULT_THRESHOLD`), for
    every corpus: (i) the cut of ``nlu-minilm``'s lexicon labels, on the same rating scale;
    (ii) the median standard error of a sentence's mean rating is 0.15 to 0.19 per corpus
    (sd ~0.7-0.8, 15 or more raters), so ``|mean| > 0.5`` is a sign the raters agree on
    beyond rater noise, while ``t = 0`` would label sentences rated 0.05 by chance. It drops
    5 % of the movie snippets (SST-2 likewise drops its neutral band), 20 % of tweets and
    Amazon sentences, and 46 % of the mostly neutral NYT sentences.
    Regression: every example (neutral ones included), target ``mean / 4`` in [-1, 1].

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
    subsets are prefixes. :func:`task_data` gives one task's examples, class counts and
    ``split_digest`` (a fingerprint of the ids in each split).

Offline with nothing cached, reading a corpus raises
:class:`reflora_analysis.assets.AssetUnavailable` whose message is one line with the
command that fetches the sdist on a connected machine.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from ..assets import ASSETS, extract_member, fetch_asset
from .base import TaskOptions

__all__ = ["CORPORA", "SPLITS", "DEFAULT_THRESHOLD", "Corpus", "SentenceExamples", "TaskData",
           "load_vader_sentences", "vader_sentences_path", "sentence_examples", "polarity",
           "stratified_split", "label_rule", "data_source", "check_split_options", "task_data"]

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


# ----------------------------------------------------------------------------- reading


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


def label_rule(regression: bool, threshold: float) -> str:
    """The label rule in words, as recorded in a task's config."""
    if regression:
        return "target = mean human rating / 4 in [-1, 1], every sentence"
    t = threshold
    return f"1 if mean human rating > {t:g}, 0 if < -{t:g}, |mean| <= {t:g} dropped"


def data_source(corpus: str) -> str:
    """Where ``corpus`` comes from: the pinned sdist (with its sha256) and the member file."""
    asset = ASSETS[ASSET]
    return (f"{asset.dist}=={asset.version} sdist (sha256 {asset.sha256}), "
            f"{INNER_ARCHIVE}:{CORPORA[corpus].file}")


# ----------------------------------------------------------------------------- one task's data

STRATUM_NAMES = {0: "negative", 1: "positive", 2: "neutral"}


def check_split_options(opts: TaskOptions) -> None:
    """Check the data options every VADER sentence task shares: ``threshold`` in [0, 4),
    ``val_fraction`` and ``test_fraction`` in (0, 1) with a sum < 1, ``split_seed`` >= 0,
    ``train_examples`` / ``eval_examples`` None or >= 1, ``evaluate_test`` True or False."""
    name = opts.task
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


@dataclass
class TaskData:
    """The examples of one task (:func:`task_data`).

    ``summary[split]``: ``{"size", "negative", "positive"[, "neutral", "target_mean",
    "target_std"]}`` of the whole split; ``texts[split]`` / ``targets[split]``: the examples
    used, in order (a prefix of the split under ``train_examples`` / ``eval_examples``);
    targets are the label 0/1, or ``mean / 4`` for regression; ``used[split]``: how many;
    ``digest``: sha256 (16 hex digits) of the ``split<TAB>id`` lines of every split.
    """

    examples: SentenceExamples
    summary: dict[str, dict[str, Any]]
    texts: dict[str, list[str]]
    targets: dict[str, list]
    used: dict[str, int]
    digest: str


def _strata(means: Sequence[float], threshold: float) -> list[int]:
    return [2 if (p := polarity(m, threshold)) is None else p for m in means]


def _split_summary(split: dict[str, list[int]], strata: list[int], means: list[float],
                   regression: bool) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict] = {}
    for s, idx in split.items():
        row: dict[str, Any] = {"size": len(idx)}
        for code in ((0, 1, 2) if regression else (0, 1)):
            row[STRATUM_NAMES[code]] = sum(strata[i] == code for i in idx)
        if regression and idx:
            targets = torch.tensor([means[i] / 4 for i in idx], dtype=torch.float64)
            row["target_mean"] = round(float(targets.mean()), 4)
            row["target_std"] = round(float(targets.std()), 4) if len(idx) > 1 else 0.0
        summary[s] = row
    return summary


def task_data(corpus: str, regression: bool, opts: TaskOptions, download: bool = True) -> TaskData:
    """Texts and targets per split, and the split summary, for one task's options (checked by
    :func:`check_split_options`): stratified at ``threshold`` by ``split_seed``, the neutral
    stratum dropped unless ``regression``. A split left empty is a ``ValueError``."""
    data = sentence_examples(corpus, download=download)
    t = float(opts["threshold"])
    strata = _strata(data.means, t)
    split = stratified_split(strata, float(opts["val_fraction"]), float(opts["test_fraction"]),
                             int(opts["split_seed"]))
    if not regression:
        split = {s: [i for i in idx if strata[i] != 2] for s, idx in split.items()}
    summary = _split_summary(split, strata, data.means, regression)
    sizes = {s: summary[s]["size"] for s in SPLITS}
    if not all(sizes.values()):
        raise ValueError(f"VADER {corpus}: a split is empty at threshold {t:g} (sizes {sizes})")
    limits = {"train": opts["train_examples"], "validation": opts["eval_examples"], "test": opts["eval_examples"]}
    used = {s: idx[:limits[s]] if limits[s] is not None else idx for s, idx in split.items()}
    texts = {s: [data.texts[i] for i in idx] for s, idx in used.items()}
    targets = {s: ([data.means[i] / 4 for i in idx] if regression else [strata[i] for i in idx])
               for s, idx in used.items()}
    digest = hashlib.sha256("\n".join(f"{s}\t{data.ids[i]}" for s in SPLITS for i in split[s]).encode())
    return TaskData(examples=data, summary=summary, texts=texts, targets=targets,
                    used={s: len(idx) for s, idx in used.items()}, digest=digest.hexdigest()[:16])
