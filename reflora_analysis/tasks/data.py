r"""Data loading for the text tasks: VADER lexicon, GLUE-style files, LLM-Adapters JSON.

Everything here is offline and deterministic: a split depends only on its seed.

VADER lexicon (``vaderSentiment/vader_lexicon.txt``, Hutto & Gilbert, ICWSM 2014)
    7,520 entries (words, emoticons, slang; 7,506 distinct tokens, 14 listed twice), each
    with the mean and standard deviation of 10 human ratings on [-4, 4] and the ratings
    themselves. Labels derived here (binary polarity, :func:`load_vader_lexicon`): ``1``
    (positive) when the token's mean rating is >= +0.5, ``0`` (negative) when <= -0.5;
    the 703 near-neutral tokens (``|mean| < 0.5``) are dropped, leaving 6,803 examples
    (2,988 positive, 3,815 negative).

GLUE-style local data (``data_path``)
    - a ``.tsv``/``.csv`` file with a header holding ``sentence`` (or ``text``,
      ``sentence1`` [+ ``sentence2``], ``question`` [+ ``sentence``]) and ``label``; a
      held-out split is drawn from it;
    - a directory with ``train.tsv`` and ``dev.tsv`` (the GLUE download layout; ``dev``
      is the held-out set);
    - a directory written by ``datasets.Dataset.save_to_disk`` /
      ``DatasetDict.save_to_disk`` (needs the ``datasets`` package; splits ``train`` and
      ``validation`` when it is a ``DatasetDict``).

    Labels: non-negative integers are kept as they are; any other values are class names,
    encoded as their index in the sorted distinct names **of the training split**. A
    held-out file (``dev.tsv``, the ``validation`` split) is encoded with the training
    split's mapping, never on its own, so a class keeps its number even when the held-out
    file lacks some classes; a held-out label absent from the training split is a
    ``ValueError`` naming it.

LLM-Adapters commonsense JSON (``commonsense_170k.json`` and each benchmark's ``test.json``)
    a JSON list of objects with ``instruction``, ``input``, ``output`` and ``answer``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

__all__ = ["LabelledTexts", "vader_lexicon_path", "load_vader_lexicon",
           "load_labelled_texts", "split_indices", "load_commonsense_json", "CommonsenseExample"]

Text = Union[str, tuple[str, str]]
VADER_THRESHOLD = 0.5


@dataclass
class LabelledTexts:
    """Texts (a string or a sentence pair) with integer labels ``0 .. num_labels - 1``."""

    texts: list[Text]
    labels: list[int]
    source: str
    label_rule: str = ""
    label_names: list[str] | None = None  # string classes: label i is label_names[i]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        if not self.texts:
            raise ValueError(f"{self.source}: no examples")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names is not None else max(self.labels) + 1

    def subset(self, indices: Sequence[int]) -> "LabelledTexts":
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                             self.source, self.label_rule, self.label_names)


def split_indices(n: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of ``range(n)`` cut into ``(train, held_out)``; held-out gets
    ``round(fraction * n)`` items, at least one of each when ``n >= 2``."""
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(1, round(held_out_fraction * n)), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


def vader_lexicon_path() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    try:
        import vaderSentiment
    except ImportError:
        raise ImportError("the VADER lexicon needs the 'vaderSentiment' package "
                          "(pip install vaderSentiment, or reflora-analysis[hf])") from None
    path = Path(vaderSentiment.__file__).resolve().parent / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vader_lexicon.txt not found in the vaderSentiment package at {path}")
    return path


def load_vader_lexicon(path: str | os.PathLike | None = None,
                       threshold: float = VADER_THRESHOLD) -> LabelledTexts:
    """Binary polarity examples from the VADER lexicon.

    Each line is ``token<TAB>mean<TAB>std<TAB>[10 ratings]``. Label 1 if
    ``mean >= threshold``, 0 if ``mean <= -threshold``; ``|mean| < threshold`` is dropped.
    The text of an example is the token itself; a token listed more than once is one
    example whose mean is the average of its entries' means.
    """
    if threshold <= 0:
        raise ValueError(f"VADER threshold must be > 0, got {threshold}")
    path = Path(path) if path is not None else vader_lexicon_path()
    ratings: dict[str, list[float]] = {}  # token -> mean rating of each of its entries
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'token<TAB>mean<TAB>...', got {line[:60]!r}")
            try:
                mean = float(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: mean rating {parts[1]!r} is not a number") from None
            ratings.setdefault(parts[0], []).append(mean)
    texts, labels = [], []
    for token, means in ratings.items():
        # A token listed twice (14 in the shipped file) gets the mean of its entries' means,
        # i.e. of all its ratings: one example per token, so no token straddles the split.
        mean = sum(means) / len(means)
        if mean >= threshold:
            texts.append(token); labels.append(1)
        elif mean <= -threshold:
            texts.append(token); labels.append(0)
    rule = (f"VADER lexicon token polarity: 1 if mean human rating >= {threshold:g}, "
            f"0 if <= -{threshold:g}, near-neutral dropped")
    return LabelledTexts(texts, labels, source=str(path), label_rule=rule)


_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                 ("premise", "hypothesis"), ("sentence", None), ("text", None))


def _from_rows(rows: list[dict], source: str,
               training: "LabelledTexts | None" = None) -> LabelledTexts:
    """Texts and encoded labels of ``rows``; ``training`` is the training split when
    ``rows`` are a held-out split, whose labels must then use the training encoding."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    columns = set(rows[0])
    if "label" not in columns:
        raise ValueError(f"{source}: no 'label' column (columns: {', '.join(sorted(columns))})")
    for first, second in _TEXT_COLUMNS:
        if first in columns and (second is None or second in columns):
            break
    else:
        raise ValueError(f"{source}: no text column; expected one of 'sentence', 'text', "
                         f"'sentence1'+'sentence2', 'question'+'sentence' (found {', '.join(sorted(columns))})")
    texts, raw = [], []
    for row in rows:
        texts.append(str(row[first]) if second is None else (str(row[first]), str(row[second])))
        raw.append(row["label"])
    if training is None:
        labels, names = _encode_training_labels(raw, source)
        rule = f"'label' column of {source}"
    else:
        labels, names = _encode_held_out_labels(raw, source, training), training.label_names
        rule = training.label_rule
    return LabelledTexts(texts, labels, source=source, label_rule=rule, label_names=names)


def _as_label_ints(raw: list) -> list[int] | None:
    """``raw`` as non-negative integers, or None when some value is not one."""
    try:
        ints = [int(v) for v in raw]
    except (TypeError, ValueError):
        return None
    return ints if min(ints) >= 0 else None


def _encode_training_labels(raw: list, source: str) -> tuple[list[int], list[str] | None]:
    """``(labels, names)``: non-negative integer labels are kept (``names`` None); otherwise
    the sorted distinct strings are the class names, ``names[i]`` encoded as ``i``."""
    ints = _as_label_ints(raw)
    if ints is not None:
        return ints, None
    names = sorted({str(v) for v in raw})
    if len(names) > 1000:
        raise ValueError(f"{source}: 'label' column has {len(names)} distinct non-integer values")
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in raw], names


def _encode_held_out_labels(raw: list, source: str, training: "LabelledTexts") -> list[int]:
    """Held-out labels in the training split's encoding, so label ``i`` means the same class
    in both splits (encoding each file on its own would renumber a subset of the classes)."""
    if training.label_names is None:
        ints = _as_label_ints(raw)
        known = set(training.labels)
        if ints is None:
            bad = next(v for v in raw if _as_label_ints([v]) is None)
            raise ValueError(f"{source}: held-out label {bad!r} is not a non-negative integer, "
                             f"but the training labels ({training.source}) are integers")
        unseen = sorted(set(ints) - known)
        if unseen:
            raise ValueError(f"{source}: held-out label(s) {', '.join(map(repr, unseen))} never occur in "
                             f"the training split ({training.source}; labels {sorted(known)})")
        return ints
    index = {name: i for i, name in enumerate(training.label_names)}
    unseen = sorted({str(v) for v in raw} - set(index))
    if unseen:
        raise ValueError(f"{source}: held-out label(s) {', '.join(map(repr, unseen))} never occur in "
                         f"the training split ({training.source}; labels {', '.join(map(repr, training.label_names))})")
    return [index[str(v)] for v in raw]


def _read_table(path: Path, training: LabelledTexts | None = None) -> LabelledTexts:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL))
    return _from_rows(rows, str(path), training)


def _read_saved_dataset(path: Path) -> tuple[LabelledTexts, LabelledTexts | None]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} looks like a saved Hugging Face dataset; loading it needs the "
                          "'datasets' package (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        held = next((ds[s] for s in ("validation", "validation_matched", "dev", "test") if s in ds), None)
        train = _from_rows(list(ds["train"]), f"{path}[train]")
        return train, (_from_rows(list(held), f"{path}[held-out]", train) if held is not None else None)
    return _from_rows(list(ds), str(path)), None


def load_labelled_texts(path: str | os.PathLike) -> tuple[LabelledTexts, LabelledTexts | None]:
    """``(train, held_out or None)`` from a local GLUE-style file or directory (module docstring)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() not in (".tsv", ".csv"):
            raise ValueError(f"data path {str(path)!r}: expected a .tsv or .csv file, a GLUE task "
                             "directory (train.tsv, dev.tsv) or a saved 'datasets' directory")
        return _read_table(path), None
    if (path / "train.tsv").is_file():
        dev = path / "dev.tsv"
        train = _read_table(path / "train.tsv")  # first: its label encoding is the reference
        return train, (_read_table(dev, train) if dev.is_file() else None)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file() \
            or (path / "state.json").is_file():
        return _read_saved_dataset(path)
    raise ValueError(f"data path {str(path)!r}: directory has neither train.tsv nor a saved 'datasets' layout")


@dataclass(frozen=True)
class CommonsenseExample:
    """One LLM-Adapters record: the prompt parts, the target response and the gold answer."""

    instruction: str
    input: str
    output: str
    answer: str


def load_commonsense_json(path: str | os.PathLike) -> list[CommonsenseExample]:
    """Records of an LLM-Adapters JSON file (a list of ``{instruction, input, output, answer}``).

    ``input`` may be missing or empty (as in ``commonsense_170k.json``); ``instruction``,
    ``output`` and ``answer`` are required.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(f"commonsense data file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is not an object")
        missing = [k for k in ("instruction", "output", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(missing)} "
                             "(LLM-Adapters layout: instruction, input, output, answer)")
        out.append(CommonsenseExample(str(rec["instruction"]), str(rec.get("input") or ""),
                                      str(rec["output"]), str(rec["answer"])))
    return out
