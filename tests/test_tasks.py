"""Tests of ``reflora_analysis.tasks``: the registry, the mf picture, exact smoothness
constants, determinism, trainable-parameter hygiene, loss decrease, bad inputs."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reflora_analysis import theory
from reflora_analysis.methods import build_optimizer
from reflora_analysis.tasks import available_tasks, make_task
from reflora_analysis.tasks.base import resolve_device
from reflora_analysis.tasks.data import (load_commonsense_json, load_labelled_texts, load_vader_lexicon,
                                         split_indices, vader_lexicon_path)
from reflora_analysis.tasks.llm import build_prompt, extract_answer
from reflora_analysis.tasks.nlu import epoch_batch_indices
from reflora_analysis.tasks.text import ByteTokenizer

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
SINGLE_LAYER = ["mf", "sensing", "lowrank-regression"]
HF_TASKS = ["seq-cls", "causal-lm"]  # fast tiny models; nlu-minilm has its own test


def _transformers_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_hf = pytest.mark.skipif(not _transformers_available(), reason="needs transformers and peft")


@pytest.fixture(scope="module")
def hf_quick_tasks():
    """One quick build per tiny HF task (building imports transformers: do it once)."""
    return {name: make_task(name, seed=0, quick=True) for name in HF_TASKS}


# ---------------------------------------------------------------------------- registry


def test_registry_lists_every_task():
    corpora = ["movies", "tweets", "amazon", "nyt"]
    assert available_tasks() == (["mf", "sensing", "lowrank-regression", "nlu-minilm", "seq-cls",
                                  "causal-lm"] + [f"vader-{c}" for c in corpora]
                                 + [f"vader-{c}-reg" for c in corpora] + ["lm-vader-movies"])


def test_task_summaries_match_the_sentence_module():
    from reflora_analysis.tasks import describe_tasks
    sentences = pytest.importorskip("reflora_analysis.tasks.sentences")
    summaries = describe_tasks()
    assert set(summaries) == set(available_tasks())
    for name, text in sentences.VADER_TASK_SUMMARIES.items():
        assert summaries[name] == text, name


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*mf.*causal-lm"):
        make_task("nope")


# ---------------------------------------------------------------------------- mf picture


def _sgd_curve(lr: float, method: str, steps: int = 100) -> list[float]:
    """Full-batch SGD on the default mf task through ``theory.preconditioned_step``:
    S = I (LoRA) or S = S*(A, B) (RefLoRA, F3). Stops at the first non-finite loss."""
    task = make_task("mf", seed=0)
    pair = task.pairs[0]
    losses = []
    for step in range(steps + 1):
        W = (task.W0 + pair.A @ pair.B.T).requires_grad_(True)
        loss = task.loss_in_W(W)
        losses.append(loss.item())
        if step == steps or not math.isfinite(losses[-1]):
            break
        (G,) = torch.autograd.grad(loss, W)
        S = (torch.eye(pair.rank, dtype=G.dtype) if method == "lora"
             else theory.optimal_preconditioner(pair.A, pair.B))
        A_next, B_next = theory.preconditioned_step(pair.A, pair.B, G, lr, S)
        pair.A.copy_(A_next)
        pair.B.copy_(B_next)
    return losses


def test_mf_paper_picture_at_default_step():
    lr = make_task("mf").default_lr["sgd"]
    lora, reflora = _sgd_curve(lr, "lora"), _sgd_curve(lr, "reflora")
    initial = lora[0]
    assert reflora[0] == initial
    # Thresholds are the claim; measured margins are wide (RefLoRA ~1e-6 x, LoRA ~0.37 x).
    assert min(reflora) < 1e-3 * initial
    assert all(math.isfinite(v) for v in lora) and min(lora) > 1e-1 * initial


def test_mf_paper_picture_at_three_times_the_step():
    lr = 3 * make_task("mf").default_lr["sgd"]
    lora, reflora = _sgd_curve(lr, "lora"), _sgd_curve(lr, "reflora")
    initial = lora[0]
    assert any(not math.isfinite(v) or v > initial for v in lora), "LoRA should diverge at 3x the step"
    assert all(math.isfinite(v) for v in reflora)
    assert reflora[-1] < 1e-3 * initial


def test_mf_picture_through_build_optimizer():
    results = {}
    for method in ("lora", "reflora"):
        task = make_task("mf", seed=0)
        optimizer, transform = build_optimizer(method, task.model, pairs=task.pairs,
                                               optimizer="sgd", lr=task.default_lr["sgd"])
        losses = []
        for step in range(101):
            loss = task.loss(task.batch(step))
            losses.append(loss.item())
            if step == 100:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results[method] = losses
    initial = results["lora"][0]
    assert min(results["reflora"]) < 1e-3 * initial
    assert min(results["lora"]) > 1e-1 * initial


# ---------------------------------------------------------------------------- single-layer maths


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_single_layer_gradients_match_loss_in_W(name):
    """grad_A = G B and grad_B = G^T A with G = grad l(W0 + A B^T) (THEORY.md section 1)."""
    task = make_task(name, seed=3)
    pair = task.pairs[0]
    assert len(task.pairs) == 1 and pair.shape == tuple(task.W0.shape)
    task.loss(task.batch(0)).backward()
    W = (task.W0 + pair.A @ pair.B.T).requires_grad_(True)
    (G,) = torch.autograd.grad(task.loss_in_W(W), W)
    torch.testing.assert_close(pair.grad_A, G @ pair.B, rtol=1e-10, atol=1e-12)  # float64 round-off
    torch.testing.assert_close(pair.grad_B, G.T @ pair.A, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,sizes", [
    ("mf", dict(m=5, n=4, rank=2, target_rank=2)),
    ("sensing", dict(m=5, n=4, rank=2, target_rank=2, measurements=30)),
    ("lowrank-regression", dict(m=5, n=4, rank=2, target_rank=2, samples=40)),
])
def test_smoothness_is_the_exact_top_hessian_eigenvalue(name, sizes):
    task = make_task(name, seed=1, **sizes)
    W = task.W0.clone()
    H = torch.autograd.functional.hessian(lambda w: task.loss_in_W(w.reshape(W.shape)), W.reshape(-1))
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert task.smoothness == pytest.approx(top, rel=1e-9)  # both exact in float64


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.05, 3.0))
def test_regression_loss_is_quadratic_with_curvature_at_most_L(seed, t):
    """l(W + t D) - l(W) - t <G, D> = t^2/2 <D, H D> <= t^2 L/2 ||D||^2 for every direction D (F8)."""
    task = make_task("lowrank-regression", seed=seed % 7, m=6, n=5, rank=2, target_rank=2, samples=30)
    gen = torch.Generator().manual_seed(seed)
    W = task.W0 + torch.randn(task.W0.shape, generator=gen, dtype=torch.float64)
    D = torch.randn(task.W0.shape, generator=gen, dtype=torch.float64)
    Wg = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(task.loss_in_W(Wg), Wg)
    curvature = float(task.loss_in_W(W + t * D) - task.loss_in_W(W) - t * (G * D).sum())
    assert curvature >= -1e-9
    assert curvature <= 0.5 * t**2 * task.smoothness * float(D.square().sum()) * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_single_layer_tasks_decrease_loss_with_sgd_and_adamw(name):
    for opt_name, opt_cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        task = make_task(name, seed=0)
        kwargs = {"weight_decay": 0.0} if opt_name == "adamw" else {}
        optimizer = opt_cls(task.trainable_parameters(), lr=task.default_lr[opt_name], **kwargs)
        first = task.loss(task.batch(0)).item()
        for step in range(30):
            loss = task.loss(task.batch(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert task.loss(task.batch(30)).item() < first, (name, opt_name)


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_single_layer_evaluate_and_config(name):
    task = make_task(name, seed=2)
    metrics = task.evaluate()
    assert "relative_error" in metrics and all(math.isfinite(v) for v in metrics.values())
    assert json.loads(json.dumps(task.config))["seed"] == 2
    assert task.describe()


def test_mf_relative_error_reaches_zero_at_the_target():
    task = make_task("mf", seed=0, rank=4, target_rank=4)
    U, s, Vh = torch.linalg.svd(task.model().detach() * 0 + _mf_target(task))
    task.pairs[0].A.copy_(U[:, :4] * s[:4])
    task.pairs[0].B.copy_(Vh[:4].T)
    assert task.evaluate()["relative_error"] < 1e-12


def _mf_target(task) -> torch.Tensor:
    """Y recovered from the loss: l(W) = 1/2||W - Y||^2 has gradient W - Y, so Y = -grad l(0)."""
    W = torch.zeros_like(task.W0, requires_grad=True)
    (G,) = torch.autograd.grad(task.loss_in_W(W), W)
    return -G


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_single_layer_builds_are_seeded(name):
    a, b, c = make_task(name, seed=5), make_task(name, seed=5), make_task(name, seed=6)
    torch.testing.assert_close(a.pairs[0].A, b.pairs[0].A, rtol=0, atol=0)
    assert a.loss(a.batch(0)).item() == b.loss(b.batch(0)).item()
    assert not torch.equal(a.pairs[0].A, c.pairs[0].A)


@needs_hf
@pytest.mark.parametrize("name", HF_TASKS)
def test_hf_batches_are_pure_functions_of_seed_and_step(name, hf_quick_tasks):
    task = hf_quick_tasks[name]
    b3, b3_again, b4 = task.batch(3), task.batch(3), task.batch(4)
    for key in b3:
        assert torch.equal(b3[key], b3_again[key])
    assert any(b3[k].shape != b4[k].shape or not torch.equal(b3[k], b4[k]) for k in b3)
    fresh = make_task(name, seed=0, quick=True)
    for key in b3:
        assert torch.equal(fresh.batch(3)[key], b3[key])
    assert json.loads(json.dumps(task.config))["task"] == name
    # Same seed, same initial parameters: identical loss on the same batch.
    assert fresh.loss(b3).item() == pytest.approx(task.loss(b3).item(), rel=0, abs=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 100))
def test_epoch_batches_cover_each_example_once_per_epoch(n, batch_size, seed):
    positions = []
    for step in range(math.ceil(2 * n / batch_size) + 1):
        positions += epoch_batch_indices(n, batch_size, seed, step)
    assert sorted(positions[:n]) == list(range(n))
    assert sorted(positions[n:2 * n]) == list(range(n))
    assert epoch_batch_indices(n, batch_size, seed, 2) == epoch_batch_indices(n, batch_size, seed, 2)


# ---------------------------------------------------------------------------- HF tasks


def _classifier_of(task) -> torch.nn.Linear:
    """The final ``Linear`` producing the logits of a seq-cls task."""
    heads = [m for n, m in task.model.named_modules()
             if n.endswith("classifier") and isinstance(m, torch.nn.Linear)]
    assert len(heads) == 1, heads
    return heads[0]


def _check_accuracy_of_constant_heads(task, head: torch.nn.Linear, held_labels: list[int]) -> None:
    """With the head's weight zeroed, every logit row equals its bias, so the model predicts
    class ``argmax(bias)`` for every example whatever the encoder does: ``evaluate`` must then
    report the hand-counted share of held-out labels equal to that class, and the exact
    cross-entropy of the constant logits."""
    with torch.no_grad():
        head.weight.zero_()
        for favoured in (0, 1):
            bias = torch.zeros_like(head.bias)
            bias[favoured] = 1.0
            head.bias.copy_(bias)
            metrics = task.evaluate()
            hits = sum(label == favoured for label in held_labels)
            assert metrics["accuracy"] == hits / len(held_labels)  # exact: a ratio of small integers
            per_label = -torch.log_softmax(bias.double(), 0)
            expected_loss = sum(float(per_label[label]) for label in held_labels) / len(held_labels)
            assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)  # float32 logits


def _lora_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if "lora_" in n}


@needs_hf
@pytest.mark.parametrize("name,head_words", [("seq-cls", ("classifier", "pooler")), ("causal-lm", ())])
def test_only_lora_and_head_are_trainable(name, head_words, hf_quick_tasks):
    task = hf_quick_tasks[name]
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    lora = _lora_names(task.model)
    assert lora and lora <= trainable
    extra = trainable - lora
    assert all(any(w in n for w in head_words) for n in extra), extra
    pair_params = {id(p) for pair in task.pairs for p in pair.params}
    lora_params = {id(p) for n, p in task.model.named_parameters() if "lora_" in n}
    assert pair_params == lora_params


@needs_hf
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("name", HF_TASKS)
def test_hf_tasks_overfit_one_batch_at_the_default_step(name, optimizer_name):
    # A fresh build, not the shared fixture: training here must not leak into other tests.
    task = make_task(name, seed=0, quick=True)
    batch = task.batch(0)
    lr = task.default_lr[optimizer_name]
    optimizer = (torch.optim.SGD(task.trainable_parameters(), lr=lr) if optimizer_name == "sgd"
                 else torch.optim.AdamW(task.trainable_parameters(), lr=lr, weight_decay=0.0))
    first = task.loss(batch).item()
    assert math.isfinite(first)
    for _ in range(8):
        loss = task.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task.loss(batch).item() < first


@needs_hf
def test_causal_lm_loss_only_on_response_tokens(hf_quick_tasks):
    task = hf_quick_tasks["causal-lm"]
    b = task.batch(0)
    labelled = b["labels"] != -100
    assert labelled.any()
    # Every labelled position is a real token and lies after the prompt (the response + EOS).
    assert torch.equal(b["input_ids"][labelled], b["labels"][labelled])
    assert (b["attention_mask"][labelled] == 1).all()
    assert (labelled.sum(1) < b["attention_mask"].sum(1)).all()


@needs_hf
def test_target_modules_from_a_command_line_string():
    task = make_task("causal-lm", quick=True, target_modules="q_proj, v_proj")
    assert len(task.pairs) == 4  # 2 layers x (q_proj, v_proj)
    assert all(("q_proj" in p.name or "v_proj" in p.name) for p in task.pairs)


_FAMILIES = [("true", "false"), ("solution1", "solution2"), ("answer1", "answer2", "answer3", "answer4", "answer5"),
             ("ending1", "ending2", "ending3", "ending4"), ("option1", "option2")]


def _scripted_replies(records) -> list[str]:
    """Row i's generated text by ``i % 4``: 0 the gold answer; 1 the gold answer upper-cased
    (extraction is case-insensitive); 2 a wrong answer of the gold's family before the gold
    (the first match counts, so wrong); 3 no answer at all (wrong)."""
    replies = []
    for i, ex in enumerate(records):
        wrong = next(a for family in _FAMILIES if ex.answer in family for a in family if a != ex.answer)
        replies.append([f"the correct answer is {ex.answer}", f"The correct answer is {ex.answer.upper()}",
                        f"the correct answer is {wrong}, not {ex.answer}", "i do not know"][i % 4])
    return replies


@needs_hf
def test_causal_lm_accuracy_is_the_hand_count_of_a_scripted_generator():
    """``evaluate`` on fixed generations: accuracy must equal the count of rows whose scripted
    reply holds the gold answer, counted here without the task's extraction code."""
    fixture = DATA / "commonsense_fixture.json"
    task = make_task("causal-lm", seed=0, quick=True, data_path=fixture, eval_data_path=fixture,
                     eval_examples=6, eval_batch_size=4, max_new_tokens=48)
    assert task.config["held_out_records"] == 6
    held = load_commonsense_json(fixture)[:6]
    replies = _scripted_replies(held)
    tokenizer, served = ByteTokenizer(), []

    def scripted_generate(*, input_ids, attention_mask, max_new_tokens, **_):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n_pad = mask.index(1)
            assert mask == [0] * n_pad + [1] * (len(mask) - n_pad), "prompts must be left-padded"
            prompt_ids = tokenizer.encode(build_prompt(held[len(served)]))[-task.config["max_length"]:]
            assert ids[n_pad:] == prompt_ids, "row order must follow the held-out records"
            served.append(tokenizer.encode(replies[len(served)], add_bos=False)[:max_new_tokens])
        width = max(len(r) for r in served[-len(input_ids):])
        new = torch.full((len(input_ids), width), tokenizer.eos_token_id, dtype=torch.long)
        for row, reply in enumerate(served[-len(input_ids):]):
            new[row, :len(reply)] = torch.tensor(reply)
        return torch.cat([input_ids, new], dim=1)

    task.model.generate = scripted_generate  # instance attribute shadows PeftModel.generate
    expected = sum(i % 4 in (0, 1) for i in range(len(held))) / len(held)  # rows 0, 1, 4, 5 of 6
    assert task.evaluate()["accuracy"] == expected  # exact: a ratio of small integers
    assert len(served) == 6  # two chunks (4 + 2), every record generated once


def test_answer_extraction_takes_the_first_answer_of_the_gold_family():
    assert extract_answer("the correct answer is option2 or option1", "option2") == "option2"
    assert extract_answer("Answer3 surely; answer1", "answer1") == "answer3"
    assert extract_answer("false, not true", "true") == "false"
    assert extract_answer("solution2", "solution1") == "solution2"
    assert extract_answer("no idea", "ending4") is None
    assert extract_answer("it is Paris", "paris") == "paris"


@needs_hf
def test_seq_cls_reads_a_glue_tsv(tmp_path):
    task = make_task("seq-cls", seed=0, quick=True, data_path=DATA / "glue_sst2_fixture.tsv",
                     held_out_fraction=0.25, batch_size=4)
    assert task.config["train_examples"] == 6 and task.config["held_out_examples"] == 2
    _, held_idx = split_indices(8, 0.25, 0)
    held_labels = [[1, 0, 1, 0, 1, 0, 1, 0][i] for i in held_idx]  # the fixture's label column
    _check_accuracy_of_constant_heads(task, _classifier_of(task), held_labels)
    glue_dir = tmp_path / "SST-2"
    glue_dir.mkdir()
    text = (DATA / "glue_sst2_fixture.tsv").read_text()
    (glue_dir / "train.tsv").write_text(text)
    (glue_dir / "dev.tsv").write_text(text)
    train, held = load_labelled_texts(glue_dir)
    assert len(train) == len(held) == 8 and held.labels[:2] == [1, 0]


def _write_glue_dir(directory: Path, train: list[tuple[str, str]], dev: list[tuple[str, str]]) -> Path:
    directory.mkdir()
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        (directory / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return directory


def test_held_out_string_labels_use_the_training_encoding(tmp_path):
    # Sorted training names: neg -> 0, pos -> 1. A dev file holding only 'pos', encoded on
    # its own, would call it 0: the held-out label of a 'pos' example must stay 1.
    glue = _write_glue_dir(tmp_path / "task", train=[("good", "pos"), ("bad", "neg"), ("fine", "pos")],
                           dev=[("great", "pos"), ("nice", "pos")])
    train, held = load_labelled_texts(glue)
    assert train.labels == [1, 0, 1]
    assert held.labels == [1, 1]
    assert train.label_names == held.label_names == ["neg", "pos"]
    assert held.num_labels == train.num_labels == 2


def test_held_out_label_absent_from_training_is_named(tmp_path):
    strings = _write_glue_dir(tmp_path / "strings", train=[("good", "pos"), ("bad", "neg")],
                              dev=[("meh", "neutral"), ("good", "pos")])
    with pytest.raises(ValueError, match=r"dev\.tsv: held-out label\(s\) 'neutral' never occur in the training split"):
        load_labelled_texts(strings)
    ints = _write_glue_dir(tmp_path / "ints", train=[("good", "1"), ("bad", "0")], dev=[("meh", "2")])
    with pytest.raises(ValueError, match=r"held-out label\(s\) 2 never occur"):
        load_labelled_texts(ints)
    mixed = _write_glue_dir(tmp_path / "mixed", train=[("good", "1"), ("bad", "0")], dev=[("meh", "pos")])
    with pytest.raises(ValueError, match=r"held-out label 'pos' is not a non-negative integer"):
        load_labelled_texts(mixed)


@needs_hf
def test_seq_cls_on_a_glue_directory_scores_held_out_labels_in_the_training_encoding(tmp_path):
    glue = _write_glue_dir(tmp_path / "task", train=[("good", "pos"), ("bad", "neg"), ("fine", "pos"), ("awful", "neg")],
                           dev=[("great", "pos"), ("nice", "pos"), ("ok", "pos")])
    task = make_task("seq-cls", seed=0, quick=True, data_path=glue, batch_size=2)
    assert task.config["num_labels"] == 2
    # Always predicting 'pos' (index 1 in the training encoding) is right on every dev row.
    _check_accuracy_of_constant_heads(task, _classifier_of(task), [1, 1, 1])


def test_vader_labels_follow_the_documented_rule():
    data = load_vader_lexicon()
    entries: dict[str, list[float]] = {}
    with open(vader_lexicon_path(), encoding="utf-8") as fh:
        for line in fh:
            token, mean = line.split("\t")[:2]
            entries.setdefault(token, []).append(float(mean))
    means = {token: sum(v) / len(v) for token, v in entries.items()}  # duplicates pooled
    assert len(set(data.texts)) == len(data.texts)  # one example per token
    assert len(data) == sum(abs(m) >= 0.5 for m in means.values())
    for text, label in zip(data.texts, data.labels):
        assert (label == 1 and means[text] >= 0.5) or (label == 0 and means[text] <= -0.5)


def test_commonsense_json_layout_is_validated(tmp_path):
    records = load_commonsense_json(DATA / "commonsense_fixture.json")
    assert len(records) == 12 and records[0].answer == "true"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    with pytest.raises(ValueError, match="lacks answer"):
        load_commonsense_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_commonsense_json(bad)


@needs_hf
def test_nlu_minilm_trains_offline_and_its_loss_goes_down():
    """Real pretrained MiniLM + VADER, quick mode: AdamW steps lower the training loss."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    task = make_task("nlu-minilm", seed=0, quick=True)
    assert len(task.pairs) == 36  # 6 layers x (q, k, v, attn-out, ffn-in, ffn-out)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable - _lora_names(task.model) == {"base_model.model.head.weight", "base_model.model.head.bias"}
    probe_batches = [task.batch(s) for s in range(4)]

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(task.loss(b).item() for b in probe_batches) / len(probe_batches)

    before = probe_loss()
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=task.default_lr["adamw"], weight_decay=0.0)
    for step in range(20):
        loss = task.loss(task.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert probe_loss() < before
    vader = load_vader_lexicon()
    _, held_idx = split_indices(len(vader), 0.2, 0)
    held_labels = [vader.labels[i] for i in held_idx[:256]]  # quick mode: the first 256 held-out
    _check_accuracy_of_constant_heads(task, task.model.base_model.model.head, held_labels)


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("overrides,message", [
    (dict(m=-3), "m must be an integer >= 1"),
    (dict(rank=50), "rank=50 exceeds min"),
    (dict(condition=0.5), "condition must be >= 1"),
    (dict(sigma_max=0), "sigma_max must be > 0"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(colour="red"), "unknown override.*'colour'.*valid:"),
])
def test_bad_matrix_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_task("mf", **overrides)


def test_bad_seed_and_device():
    with pytest.raises(ValueError, match="seed must be"):
        make_task("mf", seed=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_task("mf", device="cuda")
    with pytest.raises(ValueError, match="invalid device"):
        make_task("mf", device="toaster")


def test_resolve_device_rejects_what_it_cannot_place():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device\\(s\\) visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def _package_imports(source: Path) -> set[str]:
    """Absolute names of the ``reflora_analysis`` modules a file under ``reflora_analysis/tasks/`` imports."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = {0: [], 1: ["reflora_analysis", "tasks"], 2: ["reflora_analysis"]}[node.level]
            module = ".".join(base + ([node.module] if node.module else []))
            # "from .. import train" names the module in the alias, not in node.module
            found |= {module} if node.module else {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "reflora_analysis"}


def test_tasks_import_only_lower_layers():
    """docs/ARCHITECTURE.md: arrows point down (train -> tasks -> refactor -> pairs -> theory);
    a task module importing train, cli, figures, methods or probes would close a cycle."""
    lower = {"reflora_analysis.pairs", "reflora_analysis.theory", "reflora_analysis.refactor",
             "reflora_analysis.assets"}
    tasks_dir = Path(make_task.__code__.co_filename).parent
    for source in sorted(tasks_dir.glob("*.py")):
        for module in _package_imports(source):
            assert module in lower or module.startswith("reflora_analysis.tasks"), f"{source.name} imports {module}"


def test_device_is_honoured():
    task = make_task("sensing", device="cpu")
    assert all(p.device.type == "cpu" for p in task.model.parameters())
    assert task.config["device"] == "cpu"


@needs_hf
@pytest.mark.parametrize("name,key", [("seq-cls", "data_path"), ("seq-cls", "model_path"),
                                      ("causal-lm", "data_path"), ("causal-lm", "model_path"),
                                      ("nlu-minilm", "model_path")])
def test_missing_paths_raise_file_not_found(name, key):
    with pytest.raises(FileNotFoundError, match=f"{key} .*/no/such/path.*does not exist"):
        make_task(name, quick=True, **{key: "/no/such/path"})


@needs_hf
@pytest.mark.parametrize("name", ["seq-cls", "causal-lm", "nlu-minilm"])
def test_model_path_without_config_json_is_named(name, tmp_path):
    # A directory that exists but is no checkpoint used to surface as a tokenizer-backend error.
    with pytest.raises(ValueError, match=r"model_path .* is not a Hugging Face checkpoint directory \(no config\.json\)"):
        make_task(name, quick=True, model_path=tmp_path)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a Hugging Face checkpoint directory \(a file, not a directory\)"):
        make_task(name, quick=True, model_path=stray)


@needs_hf
def test_bad_text_task_overrides(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        make_task("seq-cls", batch_size=0)
    with pytest.raises(ValueError, match="held_out_fraction must lie in"):
        make_task("seq-cls", held_out_fraction=1.5)
    with pytest.raises(ValueError, match="unknown override"):
        make_task("causal-lm", learning_rate=1.0)
    bad = tmp_path / "x.tsv"
    bad.write_text("words\tscore\nhi\t1\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        make_task("seq-cls", data_path=bad)
    with pytest.raises(ValueError, match="step must be >= 0"):
        make_task("mf").batch(-1)


# ---------------------------------------------------------------------------- user checkpoints


def _save_word_tokenizer(directory: Path) -> int:
    """A word-level tokenizer built in code (no download), saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"] + sorted(set(
        "the correct answer is true false option1 option2 solution1 solution2 answer1 answer2 "
        "a truly wonderful film boring and far too long".split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(directory)
    return len(words)


@needs_hf
def test_causal_lm_loads_a_local_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    vocab = _save_word_tokenizer(tmp_path)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    task = make_task("causal-lm", quick=True, model_path=tmp_path, data_path=DATA / "commonsense_fixture.json",
                     eval_examples=2, max_new_tokens=4)
    assert len(task.pairs) == 7  # one layer: q, k, v, o, gate, up, down
    assert task.default_lr["adamw"] == 3e-4  # the pretrained-checkpoint default
    assert math.isfinite(task.loss(task.batch(0)).item())
    # Batched, left-padded evaluation must count what one-prompt-at-a-time greedy decoding
    # (no padding at all) produces: an independent recount on the same fixed model.
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    records = load_commonsense_json(DATA / "commonsense_fixture.json")
    _, held_idx = split_indices(len(records), 0.2, 0)
    correct = 0
    with torch.no_grad():
        for ex in [records[i] for i in held_idx][:2]:
            ids = torch.tensor([tokenizer(build_prompt(ex))["input_ids"]])
            out = task.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                      do_sample=False, pad_token_id=2, eos_token_id=2)
            text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
            correct += extract_answer(text, ex.answer) == ex.answer
    assert task.evaluate()["accuracy"] == correct / 2


@needs_hf
def test_seq_cls_loads_a_local_checkpoint(tmp_path):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    vocab = _save_word_tokenizer(tmp_path)
    config = DebertaV2Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, num_labels=2, pad_token_id=0)
    DebertaV2ForSequenceClassification(config).save_pretrained(tmp_path)
    task = make_task("seq-cls", quick=True, model_path=tmp_path, data_path=DATA / "glue_sst2_fixture.tsv",
                     held_out_fraction=0.25, batch_size=4)
    assert len(task.pairs) == 6  # one layer: query/key/value_proj, attention out, FFN in, FFN out
    assert math.isfinite(task.loss(task.batch(0)).item())
    _, held_idx = split_indices(8, 0.25, 0)
    _check_accuracy_of_constant_heads(task, _classifier_of(task), [[1, 0, 1, 0, 1, 0, 1, 0][i] for i in held_idx])


@needs_hf
def test_sentence_task_takes_a_local_deberta_encoder(tmp_path):
    """`model_path` takes any local encoder: DeBERTa-v2 has no pooler switch (BERT's
    add_pooling_layer), and LoRA lands on its query_proj/key_proj/value_proj layers."""
    from transformers import DebertaV2Config, DebertaV2Model
    vocab = _save_word_tokenizer(tmp_path)
    config = DebertaV2Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, pad_token_id=0)
    DebertaV2Model(config).save_pretrained(tmp_path)
    task = make_task("vader-movies", quick=True, model_path=tmp_path, eval_examples=8)
    assert len(task.pairs) == 6 and any("query_proj" in p.name for p in task.pairs)
    assert math.isfinite(task.loss(task.batch(0)).item())


# ---------------------------------------------------------------------------- DoRA (use_dora)


@needs_hf
@pytest.mark.parametrize("name", HF_TASKS)
def test_use_dora_builds_a_dora_model_whose_pairs_are_found(name):
    from reflora_analysis.methods.base import uses_dora
    from reflora_analysis.pairs import find_lora_pairs
    task = make_task(name, seed=0, quick=True, use_dora=True)
    assert task.config["use_dora"] is True and "DoRA" in task.description
    assert uses_dora(task.model)
    magnitudes = {n: p for n, p in task.model.named_parameters() if "lora_magnitude_vector" in n}
    # one trainable magnitude vector per adapted layer, and the same LoRA pairs as without DoRA
    assert len(magnitudes) == len(task.pairs) > 0
    assert all(p.requires_grad and p.dim() == 1 for p in magnitudes.values())
    plain = make_task(name, seed=0, quick=True)
    assert plain.config["use_dora"] is False and not uses_dora(plain.model)
    assert [p.name for p in find_lora_pairs(task.model)] == [p.name for p in plain.pairs]


@needs_hf
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method, hparams", [("lora", {}), ("reflora", {"warmup_steps": 1})])
def test_a_dora_run_trains_at_the_default_step(method, hparams):
    import dataclasses

    from reflora_analysis.train import run
    # causal-lm: no head, so the adapters (factors + magnitudes) are all that trains; one
    # fixed batch, so the loss is comparable across steps
    task = make_task("causal-lm", seed=0, quick=True, use_dora=True)
    batch = task.batch(0)
    task = dataclasses.replace(task, batch=lambda step: batch, evaluate=lambda: {})
    magnitudes = {n: p.detach().clone() for n, p in task.model.named_parameters()
                  if "lora_magnitude_vector" in n}
    records = run(task, method, steps=4, progress=False, **hparams)
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every step lowers it
    after = dict(task.model.named_parameters())
    assert any(not torch.equal(after[n], m) for n, m in magnitudes.items()), "magnitudes never moved"


@needs_hf
def test_use_dora_must_be_a_boolean():
    with pytest.raises(ValueError, match="use_dora must be true or false, got 'yes'"):
        make_task("seq-cls", quick=True, use_dora="yes")
    with pytest.raises(ValueError, match="use_dora must be true or false, got 1"):
        make_task("causal-lm", quick=True, use_dora=1)


@needs_hf
def test_a_lora_target_the_model_lacks_is_one_line_naming_the_task():
    # causal-lm and lm-vader share tasks.llm.attach_lora: its error names the task
    with pytest.raises(ValueError, match=r"^task 'causal-lm': PEFT could not place LoRA layers .*"
                                         r"pass target_modules="):
        make_task("causal-lm", target_modules=["nope_proj"])
