"""GGUF loading (``tasks.gguf_model``), the instruction fine-tuning helpers (``tasks.instruct``)
and the ``lm-vader`` task (``tasks.lm_sentences``), through ``reflora_analysis.tasks.gguf_model``.

A tiny LLaMA GGUF is written here with ``gguf.GGUFWriter`` from a seeded random
``LlamaForCausalLM`` (hidden 16, 2 layers, 4 heads / 2 KV heads, FFN 32), with llama.cpp's
tensor names and llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``permute``), a
byte-level BPE ("gpt2") tokenizer in the ``tokenizer.ggml.*`` fields (3 control tokens, the 256
byte symbols, 5 merges) and a ChatML chat template. Loading it must give back the reference
model exactly: the same tensors in Hugging Face layout (so transformers undid the permutation)
and the same logits. The real SmolLM2 check runs only when its cache already exists.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from reflora_analysis.tasks import gguf_model  # noqa: E402
from reflora_analysis.tasks.gguf_model import (  # noqa: E402
    LLAMA_LORA_TARGETS, answer_accuracy, answer_scores, build_instruction_example, chat_prompt,
    collate_examples, load_gguf_causal_lm)
from reflora_analysis.tasks.text import ByteTokenizer  # noqa: E402

HEADS, KV_HEADS, HIDDEN, LAYERS, FFN, CONTEXT = 4, 2, 16, 2, 32, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py) applied to q/k rows when writing a GGUF."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return SPECIALS + list(bytes_to_unicode().values()) + ["".join(m.split(" ")) for m in MERGES]


def write_tiny_gguf(path: Path, seed: int = 0):
    """Write the tiny LLaMA GGUF; return the reference (HF-layout) model it came from."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokens = _vocab()
    # eps 2**-17 and theta 1e4 are exact in float32, the GGUF's type for them
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=CONTEXT, rms_norm_eps=2.0 ** -17, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(2.0 ** -17)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    n_normal = len(tokens) - len(SPECIALS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * n_normal)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, tensor in ref.state_dict().items():
        value = tensor.detach().numpy().astype(np.float32)
        if name in top:
            w.add_tensor(top[name], value)
            continue
        _, _, layer, *rest = name.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            value = _llama_cpp_permute(value, HEADS, HEADS)
        elif module == "self_attn.k_proj":
            value = _llama_cpp_permute(value, HEADS, KV_HEADS)
        w.add_tensor(f"blk.{layer}.{HF_TO_GGUF[module]}.weight", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    ref = write_tiny_gguf(path)
    return path, ref


@pytest.fixture(scope="module")
def tiny_loaded(tiny, tmp_path_factory):
    path, _ = tiny
    return load_gguf_causal_lm(path, cache_root=tmp_path_factory.mktemp("cache"))


def test_tiny_gguf_loads_as_the_written_llama(tiny, tiny_loaded):
    from transformers import LlamaForCausalLM
    _, ref = tiny
    model, tokenizer, info = tiny_loaded
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == \
        (HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, len(_vocab()), CONTEXT)
    assert cfg.rms_norm_eps == 2.0 ** -17 and cfg.tie_word_embeddings is False
    assert getattr(cfg, "quantization_config", None) is None
    # The GGUF holds llama.cpp-permuted q/k rows; the loaded tensors are the HF-layout originals.
    loaded, original = model.state_dict(), ref.state_dict()
    assert set(loaded) == set(original)
    for name, value in original.items():
        assert torch.equal(loaded[name], value), name
    ids = torch.tensor([[5, 40, 41, 42, 200, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref(ids).logits)
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    assert info["architecture"].startswith("LlamaForCausalLM (2 layers, hidden 16, 4 heads / 2 KV heads")
    # tokenizer from the GGUF metadata: byte-level BPE with the written merges, ChatML specials
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    text = "the cat is here"
    enc = tokenizer(text)["input_ids"]
    assert tokenizer.decode(enc) == text
    assert tokenizer.convert_tokens_to_ids("he") in enc and tokenizer.convert_tokens_to_ids("is") in enc
    prompt = chat_prompt(tokenizer, "hi")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(prompt)["input_ids"][0] == 1  # <|im_start|> kept whole


def test_cache_is_written_once_and_reused(tiny, tmp_path, monkeypatch):
    path, ref = tiny
    reads = []
    original = gguf_model._read_gguf
    monkeypatch.setattr(gguf_model, "_read_gguf", lambda p, *a: reads.append(p) or original(p, *a))
    first, _, info1 = load_gguf_causal_lm(path, cache_root=tmp_path)
    assert len(reads) == 1
    cached = Path(info1["cache"])
    assert cached.parent == tmp_path / "models" and (cached / "model.safetensors").is_file()
    assert (cached / gguf_model._MARKER).is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    second, _, info2 = load_gguf_causal_lm(path, cache_root=tmp_path, dtype=torch.bfloat16)
    assert len(reads) == 1, "second load dequantised again instead of using the cache"
    assert info2["cache"] == info1["cache"] and next(second.parameters()).dtype == torch.bfloat16
    for name, value in ref.state_dict().items():
        assert torch.equal(second.state_dict()[name], value.to(torch.bfloat16)), name
    # cache=False reads the file every time and writes nothing
    empty = tmp_path / "unused"
    load_gguf_causal_lm(path, cache=False, cache_root=empty)
    assert len(reads) == 2 and not empty.exists()


def test_incomplete_cache_dir_is_not_trusted(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    _, _, info = load_gguf_causal_lm(path, cache_root=tmp_path)
    cached = Path(info["cache"])
    (cached / gguf_model._MARKER).unlink()  # as if a copy had been interrupted
    reads = []
    original = gguf_model._read_gguf
    monkeypatch.setattr(gguf_model, "_read_gguf", lambda p, *a: reads.append(p) or original(p, *a))
    load_gguf_causal_lm(path, cache_root=tmp_path)
    assert len(reads) == 1 and (cached / gguf_model._MARKER).is_file()


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf_causal_lm(tmp_path / "absent.gguf", cache_root=tmp_path)


def test_instruction_example_masks_the_prompt(tiny_loaded):
    _, tokenizer, _ = tiny_loaded
    prompt, answer = chat_prompt(tokenizer, "is the cat here?"), "yes"
    ex = build_instruction_example(tokenizer, prompt, answer)
    p_ids = tokenizer(prompt)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["input_ids"].tolist() == p_ids + a_ids
    assert ex["labels"].tolist() == [-100] * len(p_ids) + a_ids
    assert ex["attention_mask"].tolist() == [1] * (len(p_ids) + len(a_ids))
    no_eos = build_instruction_example(tokenizer, prompt, answer, add_eos=False)
    assert no_eos["labels"].tolist() == [-100] * len(p_ids) + a_ids[:-1]
    # max_length cuts the prompt from the left; the answer survives whole
    cut = build_instruction_example(tokenizer, prompt, answer, max_length=len(a_ids) + 3)
    assert cut["input_ids"].tolist() == p_ids[-3:] + a_ids
    assert cut["labels"].tolist() == [-100] * 3 + a_ids


def test_instruction_example_byte_tokenizer_and_collate():
    tok = ByteTokenizer()
    ex = build_instruction_example(tok, "Q: ok?\nA:", " no")
    prompt = [tok.bos_token_id] + [b + 4 for b in b"Q: ok?\nA:"]
    answer = [b + 4 for b in b" no"] + [tok.eos_token_id]
    assert ex["input_ids"].tolist() == prompt + answer
    assert ex["labels"].tolist() == [-100] * len(prompt) + answer
    short = build_instruction_example(tok, "x", "y")
    batch = collate_examples([ex, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(prompt) + len(answer))
    width = len(prompt) + len(answer)
    assert batch["labels"][1].tolist() == [-100, -100, ord("y") + 4, tok.eos_token_id] + [-100] * (width - 4)
    assert batch["input_ids"][1].tolist()[4:] == [tok.pad_token_id] * (width - 4)
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * (width - 4)
    with pytest.raises(ValueError, match="max_length"):
        build_instruction_example(tok, "x", "y", max_length=1)


class _FavouriteTokenLM(torch.nn.Module):
    """Logits that are the same at every position: token ``favourite`` gets +5, EOS 0, rest 0."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 5.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_answer_accuracy_with_controlled_logits():
    tok = ByteTokenizer()
    model = _FavouriteTokenLM(tok.vocab_size, ord("a") + tok.offset)
    prompts = ["first: ", "second: ", "third: "]
    assert answer_accuracy(model, tok, prompts, ["b", "a"], [1, "a", 1]) == 1.0
    assert answer_accuracy(model, tok, prompts, ["b", "a"], ["b", 0, "a"]) == pytest.approx(1 / 3)
    # per-prompt candidate lists; a longer answer pays for each token (sums, not means)
    assert answer_accuracy(model, tok, prompts[:2], [["aa", "a"], ["c", "aaa"]], ["a", "aaa"]) == 1.0
    logp = torch.log_softmax(model.bias.detach(), -1)
    a, b, eos = logp[ord("a") + 4].item(), logp[ord("b") + 4].item(), logp[tok.eos_token_id].item()
    assert answer_scores(model, tok, prompts[:1], ["a", "bb"])[0] == pytest.approx([a, 2 * b], abs=1e-5)
    with_eos = answer_scores(model, tok, prompts[:1], ["a", "b"], add_eos=True)
    assert with_eos[0] == pytest.approx([a + eos, b + eos], abs=1e-5)
    with pytest.raises(ValueError, match="not among"):
        answer_accuracy(model, tok, prompts[:1], ["a", "b"], ["c"])


@pytest.mark.parametrize("add_eos,cands", [
    (False, ["the", "is it", "here and there"]),  # different lengths: exercises right padding
    (True, ["the", "is it", "here and there"]),
    (False, ["is", "a", "x"]),  # single tokens: one forward per prompt
])
def test_answer_scores_match_unbatched_likelihoods(tiny_loaded, add_eos, cands):
    model, tokenizer, _ = tiny_loaded
    prompts = [chat_prompt(tokenizer, q) for q in ("is the sky blue?", "a?", "x")]
    scores = answer_scores(model, tokenizer, prompts, cands, batch_size=4, add_eos=add_eos)
    model.eval()
    expected = []
    for p in prompts:
        row = []
        for c in cands:
            p_ids = tokenizer(p)["input_ids"]
            a_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * add_eos
            ids = torch.tensor([p_ids + a_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            row.append(sum(logp[len(p_ids) + k - 1, t].item() for k, t in enumerate(a_ids)))
        expected.append(row)
    assert np.allclose(scores, expected, atol=1e-4)
    best = [int(np.argmax(r)) for r in expected]
    worst = [int(np.argmin(r)) for r in expected]
    assert answer_accuracy(model, tokenizer, prompts, cands, best, add_eos=add_eos) == 1.0
    assert answer_accuracy(model, tokenizer, prompts, cands, worst, add_eos=add_eos) == 0.0


def test_lora_on_llama_targets_trains_on_the_answer(tiny):
    peft = pytest.importorskip("peft")
    path, _ = tiny
    model, tokenizer, _ = load_gguf_causal_lm(path, cache=False)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_LORA_TARGETS,
                                                      init_lora_weights=False))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(names) == 2 * len(LLAMA_LORA_TARGETS) * LAYERS
    batch = collate_examples([build_instruction_example(tokenizer, chat_prompt(tokenizer, q), a)
                              for q, a in (("is the cat here?", "yes"), ("a?", "no it is not"))],
                             tokenizer.pad_token_id)
    out = lora(**batch)
    # transformers' loss (shifted labels, -100 ignored) = mean NLL of the answer tokens
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    manual = -(logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum() / keep.sum()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_smollm2_answers_paris_when_cached():
    """The real model (only when its dequantised cache already exists: no download in tests)."""
    try:
        root = gguf_model._default_cache_root()
    except ImportError:
        pytest.skip("reflora_analysis.assets not available")
    target = root / "models" / f"{gguf_model.SMOLLM2.name}-Q4_1-{gguf_model.SMOLLM2.wheel_sha256[:16]}"
    if not gguf_model._ready(target):
        pytest.skip(f"SmolLM2 not cached at {target} (run load_smollm2() once, online)")
    model, tokenizer, info = gguf_model.load_smollm2()
    assert info["parameters"] == 134_515_008
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    enc = tokenizer(chat_prompt(tokenizer, "What is the capital of France?"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _fake_sentences(monkeypatch, n: int = 60):
    from reflora_analysis.tasks import sentence_data
    texts = [f"sentence {i} is {'good' if i % 3 == 0 else 'bad' if i % 3 == 1 else 'meh'}" for i in range(n)]
    means = [2.0 if i % 3 == 0 else -2.0 if i % 3 == 1 else 0.1 for i in range(n)]
    fake = sentence_data.SentenceExamples([f"id{i}" for i in range(n)], texts, means, 0)
    # where the sentence tasks (and lm-vader, which shares their splits) read the corpus
    monkeypatch.setattr(sentence_data, "sentence_examples", lambda corpus, **kw: fake)
    return fake


def test_lm_vader_task_on_the_tiny_gguf(tiny, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from reflora_analysis.tasks import sentences
    path, _ = tiny
    monkeypatch.setenv("REFLORA_ANALYSIS_CACHE", str(tmp_path))
    fake = _fake_sentences(monkeypatch)
    task = gguf_model.make_lm_vader_movies(model_path=str(path), seed=1, batch_size=4, eval_batch_size=7)
    assert len(task.pairs) == len(LLAMA_LORA_TARGETS) * LAYERS
    cfg = task.config
    assert cfg["model_info"]["architecture"].startswith("LlamaForCausalLM")
    # the binary vader splits: neutral (i % 3 == 2) dropped, 40 left, 10 % / 10 % / 80 %
    assert cfg["splits"] == {"train": 32, "validation": 4, "test": 4}
    strata = [2 if (p := sentences.polarity(m)) is None else p for m in fake.means]
    expected = sentences.stratified_split(strata, 0.1, 0.1, 0)
    assert cfg["splits"]["validation"] == sum(strata[i] != 2 for i in expected["validation"])
    b = task.batch(0)
    for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
        answer = [t for t, y in zip(ids, labels) if y != -100]
        assert answer[-1] == 2 and labels[0] == -100  # <|im_end|> closes every answer
    assert torch.equal(task.batch(3)["input_ids"], task.batch(3)["input_ids"])  # deterministic
    metrics = task.evaluate()
    assert set(metrics) == {"accuracy", "f1_macro", "loss", "test_accuracy", "test_f1_macro", "test_loss"}
    fixed = task.batch(0)
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    before = task.loss(fixed).item()
    for step in range(15):
        opt.zero_grad()
        task.loss(task.batch(step)).backward()
        opt.step()
    assert task.loss(fixed).item() < before
    with pytest.raises(ValueError, match="unknown override"):
        gguf_model.make_lm_vader_movies(model_path=str(path), rank=3)


def test_load_causal_lm_rejects_other_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="a .gguf file"):
        gguf_model.load_causal_lm(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="config.json"):
        gguf_model.load_causal_lm(tmp_path)


def test_causal_lm_takes_a_gguf_file_and_records_the_model(tiny, tmp_path, monkeypatch):
    """``--model`` / ``model_path`` of the causal-LM path: a .gguf file loads through the same
    loader as SmolLM2, and the task config (hence run.meta.json) names the model used."""
    pytest.importorskip("peft")
    from reflora_analysis.tasks import make_task
    path, _ = tiny
    monkeypatch.setenv("REFLORA_ANALYSIS_CACHE", str(tmp_path))
    task = make_task("causal-lm", model_path=str(path), quick=True)
    assert len(task.pairs) > 0 and "LlamaForCausalLM" in type(task.model.base_model.model).__name__
    assert "tiny-llama" in task.config["model"] and "parameters" in task.config["model"]
    loss = task.loss(task.batch(0))
    assert torch.isfinite(loss) and loss.item() > 0
