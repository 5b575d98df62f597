"""VADER human-rated sentences (tasks/sentences.py): parsing, labels, splits, the tasks.

Parsing is checked on a tiny sdist-shaped tarball built here. The rest uses the real
``vaderSentiment==3.3.2`` sdist, fetched once through the package index by
``assets.fetch_asset`` into the user cache; without index access those tests are skipped
with the one-line reason (and fail under ``CI``, which has access).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from reflora_analysis import assets
from reflora_analysis.assets import AssetUnavailable
from reflora_analysis.tasks import sentences as S

pytest.importorskip("peft")
pytest.importorskip("transformers")

T = S.DEFAULT_THRESHOLD
BINARY = ["vader-movies", "vader-tweets", "vader-amazon", "vader-nyt"]
# Rows of each *_GroundTruth.txt, and how many have mean > 0 / < 0 / = 0 (movies: the README's
# 10,605 snippets, 5,242 positive, 5,326 negative, 37 neutral; the others as the files hold them).
DOCUMENTED = {"movies": (10_605, 5_242, 5_326, 37), "tweets": (4_200, 2_897, 1_299, 4),
              "amazon": (3_708, 2_128, 1_482, 98), "nyt": (5_190, 2_204, 2_742, 244)}


# ------------------------------------------------------------------ fixture tarball


FIXTURE_ROWS = {
    "movies": [("1", "2.26666666667", "A splendid film ."), ("2", "-0.6", "Effective but too tepid biopic"),
               ("3", "0.3", "It is a film ."), ("4", "1.0", "Twice said."), ("5", "-0.2", "Twice said.")],
    "tweets": [("1", "2.726315789", "So lucky."), ("2", "-3.1", "Ugh. I hate hate hate it.")],
    "amazon": [("1_1", "-0.9", "no picture."), ("1_2", "0", "repost.")],
    "nyt": [("1_1", "0.4", "Events include sprinting."), ("1_2", "1.5", "A holiday celebration.")],
}


def _tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_fixture_sdist(folder: Path, rows=FIXTURE_ROWS) -> Path:
    """An sdist-shaped archive: ``vaderSentiment-0.0.1/additional_resources/hutto_ICWSM_2014.tar.gz``
    holding the four GroundTruth files (CRLF line ends, a BOM on one, as in the real ones)."""
    inner = {}
    for corpus, corpus_rows in rows.items():
        text = "\r\n".join("\t".join(r) for r in corpus_rows)
        data = text.encode("utf-8")
        inner[f"hutto_ICWSM_2014/{S.CORPORA[corpus].file}"] = (b"\xef\xbb\xbf" + data) if corpus == "amazon" else data
    path = folder / "vaderSentiment-0.0.1.tar.gz"
    path.write_bytes(_tar_gz_bytes({
        "vaderSentiment-0.0.1/setup.py": b"",
        "vaderSentiment-0.0.1/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_gz_bytes(inner)}))
    return path


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(assets.OFFLINE_ENV, raising=False)
    return tmp_path / "cache"


def test_parsing_on_a_fixture_tarball(tmp_cache, tmp_path):
    sdist = build_fixture_sdist(tmp_path)
    for corpus, rows in FIXTURE_ROWS.items():
        got = S.load_vader_sentences(corpus, archive=sdist)
        assert got == [(i, text, float(mean)) for i, mean, text in rows]  # BOM and CR stripped
    path = S.vader_sentences_path("movies", archive=sdist)
    assert path.is_relative_to(tmp_cache / "extracted")
    merged = S.sentence_examples("movies", archive=sdist)
    assert merged.texts.count("Twice said.") == 1 and merged.merged_rows == 1
    assert merged.means[merged.texts.index("Twice said.")] == pytest.approx(0.4)
    assert [S.polarity(m) for m in merged.means] == [1, 0, None, None]
    with pytest.raises(ValueError, match="unknown VADER corpus 'imdb'"):
        S.load_vader_sentences("imdb", archive=sdist)


@pytest.mark.parametrize("bad,message", [("7\tnot-a-number\tx", "is not a number"),
                                         ("7\t5.5\tx", "outside \\[-4, 4\\]"), ("7\t1.0", "expected 'ID")])
def test_malformed_rows_are_named_with_their_line(tmp_cache, tmp_path, bad, message):
    rows = dict(FIXTURE_ROWS, tweets=[("1", "1.0", "fine"), tuple(bad.split("\t"))])
    sdist = build_fixture_sdist(tmp_path, rows)
    with pytest.raises(ValueError, match=f":2: .*{message}"):
        S.load_vader_sentences("tweets", archive=sdist)


def test_polarity_rule_is_strict():
    assert [S.polarity(m, 0.5) for m in (0.51, 0.5, 0.0, -0.5, -0.51)] == [1, None, None, None, 0]
    assert [S.polarity(m, 0.0) for m in (0.01, 0.0, -0.01)] == [1, None, 0]


def test_stratified_split_property():
    strata = [0] * 37 + [1] * 15 + [2] * 3 + [0] * 8
    a = S.stratified_split(strata, 0.1, 0.2, seed=4)
    assert a == S.stratified_split(strata, 0.1, 0.2, seed=4)
    assert a != S.stratified_split(strata, 0.1, 0.2, seed=5)
    assert sorted(i for s in S.SPLITS for i in a[s]) == list(range(len(strata)))
    counts = Counter(strata)
    for s, frac in (("validation", 0.1), ("test", 0.2)):
        for c, n in counts.items():
            assert sum(strata[i] == c for i in a[s]) == math.floor(frac * n + 0.5)
    with pytest.raises(ValueError, match="must lie in"):
        S.stratified_split(strata, 0.6, 0.5, seed=0)


def test_offline_without_cache_is_one_clear_line(tmp_cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                                        "the requirement vaderSentiment==3.3.2 (from versions: none)")
    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(AssetUnavailable) as info:
        S.make_vader_movies(quick=True)
    message = str(info.value)
    assert "\n" not in message
    assert "pip download --no-deps --no-binary :all: --dest DIR vaderSentiment==3.3.2" in message
    assert "vaderSentiment-3.3.2.tar.gz" in message and str(tmp_cache) in message
    with pytest.raises(AssetUnavailable):
        S.describe_splits("vader-movies")  # download=False: never runs pip


# ------------------------------------------------------------------ the real data


@pytest.fixture(scope="module")
def real_sdist() -> Path:
    try:
        return assets.fetch_asset("vaderSentiment")
    except AssetUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def raw_rows(corpus: str) -> list[list[str]]:
    """The GroundTruth file read independently of the module: ``[id, mean, text]`` per row."""
    text = S.vader_sentences_path(corpus).read_text(encoding="utf-8-sig")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def pooled_means(corpus: str) -> dict[str, float]:
    by_text = defaultdict(list)
    for _, mean, text in raw_rows(corpus):
        by_text[text.strip()].append(float(mean))
    return {t: sum(v) / len(v) for t, v in by_text.items()}


def test_real_sdist_is_the_pinned_one(real_sdist):
    assert assets.sha256_of(real_sdist) == assets.ASSETS["vaderSentiment"].sha256
    assert real_sdist.name == "vaderSentiment-3.3.2.tar.gz"


@pytest.mark.parametrize("corpus", list(S.CORPORA))
def test_counts_per_corpus(real_sdist, corpus):
    rows = S.load_vader_sentences(corpus)
    n, pos, neg, zero = DOCUMENTED[corpus]
    assert len(rows) == n == S.CORPORA[corpus].rows == len(raw_rows(corpus))
    means = [m for _, _, m in rows]
    assert (sum(m > 0 for m in means), sum(m < 0 for m in means), sum(m == 0 for m in means)) == (pos, neg, zero)
    assert len({i for i, _, _ in rows}) == n  # ids are unique
    assert all(-4 <= m <= 4 for m in means)


@pytest.mark.parametrize("corpus", list(S.CORPORA))
def test_binary_labels_follow_the_sign_rule(real_sdist, corpus):
    means = pooled_means(corpus)
    examples = S.task_examples(f"vader-{corpus}")
    labelled = {text: label for split in S.SPLITS for text, label in examples[split]}
    assert set(labelled) == {t for t, m in means.items() if abs(m) > T}
    for text, label in labelled.items():
        assert label == int(means[text] > T)
    # a few rows looked up in the file: the first positive, negative and near-neutral one
    rows = raw_rows(corpus)
    first = {kind: next(r for r in rows if kind(float(r[1]))) for kind in
             (lambda m: m > 1, lambda m: m < -1, lambda m: abs(m) < 0.2)}
    (pos, neg, neutral) = first.values()
    assert labelled[pos[2].strip()] == 1 and labelled[neg[2].strip()] == 0
    assert neutral[2].strip() not in labelled


def test_known_movie_rows(real_sdist):
    rows = {i: (text, mean) for i, text, mean in S.load_vader_sentences("movies")}
    assert rows["1"][0].startswith("The Rock is destined to be the 21st Century's new")
    assert rows["3"] == ("Effective but too tepid biopic", pytest.approx(-0.6))
    labelled = {t: y for s in S.SPLITS for t, y in S.task_examples("vader-movies")[s]}
    assert labelled[rows["1"][0]] == int(rows["1"][1] > T) == 1
    assert labelled[rows["3"][0]] == 0


@pytest.mark.parametrize("name", BINARY + ["vader-movies-reg"])
def test_splits_are_stratified_disjoint_covering_and_fixed(real_sdist, name):
    regression = S.VADER_TASKS[name][2]
    corpus = S.VADER_TASKS[name][1]
    means = pooled_means(corpus)
    examples = S.task_examples(name)
    texts = {s: [t for t, _ in examples[s]] for s in S.SPLITS}
    for s in S.SPLITS:
        assert len(set(texts[s])) == len(texts[s])
    assert not (set(texts["train"]) & set(texts["validation"]) or set(texts["train"]) & set(texts["test"])
                or set(texts["validation"]) & set(texts["test"]))
    kept = {t for t, m in means.items() if regression or abs(m) > T}
    assert set().union(*texts.values()) == kept
    n = len(kept)
    sizes = {s: len(texts[s]) for s in S.SPLITS}
    assert abs(sizes["validation"] - 0.1 * n) <= 2 and abs(sizes["test"] - 0.1 * n) <= 2
    stratum = {t: S.polarity(m, T) for t, m in means.items()}
    classes = Counter(stratum[t] for t in kept)
    for s in S.SPLITS:
        got = Counter(stratum[t] for t in texts[s])
        for c, count in classes.items():
            assert abs(got[c] - sizes[s] * count / n) <= 1, (s, c, got[c], sizes[s] * count / n)
    # deterministic, and set by split_seed alone (task_examples takes no training seed)
    assert S.task_examples(name) == examples
    other = S.task_examples(name, split_seed=1)
    assert {t for t, _ in other["test"]} != set(texts["test"])
    # summary == the counted classes; the quick prefixes are stratified too
    summary = S.describe_splits(name)
    assert {s: summary[s]["size"] for s in S.SPLITS} == sizes
    quick = S.task_examples(name, quick=True)
    assert [len(quick[s]) for s in S.SPLITS] == [256, 128, 128]
    for s in S.SPLITS:
        assert [t for t, _ in quick[s]] == texts[s][:len(quick[s])]
        got = Counter(stratum[t] for t, _ in quick[s])
        for c, count in Counter(stratum[t] for t in texts[s]).items():
            assert abs(got[c] - len(quick[s]) * count / sizes[s]) <= 2


def test_split_sizes_table_matches_the_data(real_sdist):
    for name, table in S.SPLIT_SIZES.items():
        got = S.describe_splits(name)
        assert {s: {k: v for k, v in got[s].items() if not k.startswith("target")} for s in S.SPLITS} == table
    assert set(S.SPLIT_SIZES) == set(S.VADER_TASKS)


@pytest.mark.parametrize("name", ["vader-movies-reg", "vader-nyt-reg"])
def test_regression_targets_are_the_mean_over_four(real_sdist, name):
    means = pooled_means(S.VADER_TASKS[name][1])
    examples = S.task_examples(name)
    for s in S.SPLITS:
        for text, target in examples[s]:
            assert -1 <= target <= 1 and target == pytest.approx(means[text] / 4)


def test_bad_options_are_named(real_sdist):
    with pytest.raises(ValueError, match="unknown override.*'colour'"):
        S.make_vader_movies(colour="red")
    with pytest.raises(ValueError, match="threshold must be < 4"):
        S.describe_splits("vader-movies", threshold=4)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        S.describe_splits("vader-movies", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="evaluate_test must be True or False"):
        S.describe_splits("vader-movies", evaluate_test=1)
    with pytest.raises(ValueError, match="unknown VADER task"):
        S.describe_splits("vader-imdb")


# ------------------------------------------------------------------ the tasks (model)


def _head(task):
    return task.model.base_model.model.head


@pytest.mark.parametrize("name", ["vader-movies", "vader-tweets-reg"])
def test_quick_task_trains_at_the_default_lr(real_sdist, name):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = S.VADER_TASKS[name][0](seed=0, quick=True)
    assert len(task.pairs) == 36
    lora = {n for n, p in task.model.named_parameters() if "lora_" in n}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable - lora == {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert _head(task).out_features == (1 if name.endswith("-reg") else 2)
    probe = [task.batch(s) for s in range(2)]

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(task.loss(b).item() for b in probe) / len(probe)

    before = probe_loss()
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=task.default_lr["adamw"], weight_decay=0.0)
    for step in range(12):
        loss = task.loss(task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < before
    b = task.batch(0)
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 32


def test_splits_do_not_depend_on_the_training_seed(real_sdist):
    a = S.make_vader_tweets(seed=0, quick=True)
    b = S.make_vader_tweets(seed=5, quick=True)
    assert a.config["split_digest"] == b.config["split_digest"]
    assert a.config["splits"] == b.config["splits"] == S.describe_splits("vader-tweets")
    assert a.config["split_seed"] == 0 and a.config["threshold"] == T
    assert not torch.equal(_head(a).weight, _head(b).weight)  # the training seed does act


@pytest.mark.parametrize("name", ["vader-amazon", "vader-nyt-reg"])
def test_evaluate_contract_and_hand_counted_metrics(real_sdist, name):
    regression = name.endswith("-reg")
    task = S.VADER_TASKS[name][0](seed=0, quick=True, eval_examples=32)
    metrics = task.evaluate()
    base = {"pearson", "spearman", "loss"} if regression else {"accuracy", "f1_macro", "loss"}
    assert set(metrics) == base | {f"test_{k}" for k in base}
    assert task.evaluate_split("validation") == {k: metrics[k] for k in base}
    assert task.evaluate_split("test") == {k: metrics[f"test_{k}"] for k in base}
    with pytest.raises(ValueError, match="split must be one of"):
        task.evaluate_split("dev")
    task.model.train()
    task.evaluate()
    assert task.model.training  # mode left as found

    # A constant head: the metrics are a hand count over the task's own examples.
    head = _head(task)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.25]) if regression else torch.tensor([0.0, 1.0]))
    examples = S.task_examples(name, quick=True, eval_examples=32)
    for split in ("validation", "test"):
        got = task.evaluate_split(split)
        targets = [y for _, y in examples[split]]
        if regression:
            assert math.isnan(got["pearson"]) and math.isnan(got["spearman"])
            assert got["loss"] == pytest.approx(sum((0.25 - y) ** 2 for y in targets) / len(targets), rel=1e-5)
        else:
            pos, neg = sum(targets), len(targets) - sum(targets)
            assert got["accuracy"] == pos / len(targets)
            assert got["f1_macro"] == pytest.approx((2 * pos / (2 * pos + neg)) / 2)
            expected = (pos * math.log1p(math.exp(-1)) + neg * math.log1p(math.e)) / len(targets)
            assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert task.config["examples_used"] == {"train": 256, "validation": 32, "test": 32}
    assert task.config["splits"] == S.describe_splits(name)

    no_test = S.VADER_TASKS[name][0](seed=0, quick=True, eval_examples=8, evaluate_test=False)
    assert set(no_test.evaluate()) == base
