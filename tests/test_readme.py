"""The README's worked example runs as written, on a real (tiny, random) checkpoint path."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_block() -> str:
    text = README.read_text()
    section = text[text.index("## RefLoRA on your PEFT model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_under_ten_lines():
    lines = [line for line in _example_block().splitlines() if line.strip()]
    assert len(lines) < 10, lines


def _run_example(code: str, path: str, batch: dict, n_batches: int) -> dict:
    torch.manual_seed(0)  # PEFT draws lora_A at random: both runs must start identically
    namespace = {"path": path, "loader": [batch] * n_batches}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_readme_example_runs_and_refactors(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    code = _example_block()
    # warmup_steps=100 in the README: 103 batches, so that three refactored steps run.
    ours = _run_example(code, str(tmp_path), batch, 103)
    assert ours["refactorer"].step_count == 103
    # Twin run without the refactorer: identical up to step 100, different afterwards.
    attach_line = next(line for line in code.splitlines() if "Refactorer(" in line and "=" in line)
    plain = _run_example(code.replace(attach_line, "refactorer = None"), str(tmp_path), batch, 103)
    lora_b = {n: p for n, p in ours["model"].named_parameters() if "lora_B" in n}
    lora_b_plain = {n: p for n, p in plain["model"].named_parameters() if "lora_B" in n}
    assert lora_b and lora_b.keys() == lora_b_plain.keys()
    # PEFT starts lora_B at 0; the warm-up must have moved it and nothing may be NaN.
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora_b.values())
    # The three refactored steps changed the trajectory (a no-op hook would leave it equal).
    assert any(not torch.equal(lora_b[n], lora_b_plain[n]) for n in lora_b)
