"""Tests of ``reflora_analysis.tasks``: the registry, the mf picture, exact smoothness
constants, determinism, trainable-parameter hygiene, loss decrease, bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reflora_analysis import theory
from reflora_analysis.tasks import available_tasks, make_task
from reflora_analysis.tasks.data import load_commonsense_json, load_labelled_texts, load_vader_lexicon, vader_lexicon_path
from reflora_analysis.tasks.llm import extract_answer
from reflora_analysis.tasks.nlu import epoch_batch_indices

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
    assert available_tasks() == ["mf", "sensing", "lowrank-regression", "nlu-minilm", "seq-cls", "causal-lm"]


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


def test_mf_picture_through_build_optimizer_if_available():
    methods = pytest.importorskip("reflora_analysis.methods")
    if not hasattr(methods, "build_optimizer"):
        pytest.skip("methods.build_optimizer not available yet")
    results = {}
    for method in ("lora", "reflora"):
        task = make_task("mf", seed=0)
        optimizer, transform = methods.build_optimizer(method, task.model, pairs=task.pairs,
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


def test_mf_runs_fast():
    import time
    start = time.perf_counter()
    _sgd_curve(make_task("mf").default_lr["sgd"], "reflora")
    assert time.perf_counter() - start < 5.0  # the brief asks for well under 1 s; 5 s tolerates a loaded CI core


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
@pytest.mark.parametrize("name", HF_TASKS)
def test_hf_tasks_overfit_one_batch_with_adamw(name, hf_quick_tasks):
    task = make_task(name, seed=0, quick=True)
    batch = task.batch(0)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=task.default_lr["adamw"], weight_decay=0.0)
    first = task.loss(batch).item()
    assert math.isfinite(first)
    for _ in range(8):
        loss = task.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task.loss(batch).item() < first


@needs_hf
def test_hf_tasks_decrease_loss_with_sgd():
    task = make_task("seq-cls", seed=0, quick=True)
    batch = task.batch(0)
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=task.default_lr["sgd"])
    first = task.loss(batch).item()
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


@needs_hf
def test_causal_lm_evaluates_on_the_fixture():
    task = make_task("causal-lm", seed=0, quick=True, data_path=DATA / "commonsense_fixture.json",
                     eval_data_path=DATA / "commonsense_fixture.json", eval_examples=6, max_new_tokens=8)
    metrics = task.evaluate()
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert task.config["held_out_records"] == 6
    assert math.isfinite(task.loss(task.batch(0)).item())


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
    assert 0.0 <= task.evaluate()["accuracy"] <= 1.0
    glue_dir = tmp_path / "SST-2"
    glue_dir.mkdir()
    text = (DATA / "glue_sst2_fixture.tsv").read_text()
    (glue_dir / "train.tsv").write_text(text)
    (glue_dir / "dev.tsv").write_text(text)
    train, held = load_labelled_texts(glue_dir)
    assert len(train) == len(held) == 8 and held.labels[:2] == [1, 0]


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
    assert 0.0 <= task.evaluate()["accuracy"] <= 1.0


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
    assert 0.0 <= task.evaluate()["accuracy"] <= 1.0


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
    assert 0.0 <= task.evaluate()["accuracy"] <= 1.0
