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


def test_readme_example_runs_and_refactors(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    # warmup_steps=100 in the README: 103 batches so that three refactored steps run.
    namespace = {"path": str(tmp_path), "loader": [batch] * 103}
    exec(compile(_example_block(), str(README), "exec"), namespace)
    refactorer, model = namespace["refactorer"], namespace["model"]
    assert refactorer.step_count == 103
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    # PEFT starts lora_B at 0; the warm-up steps must have moved it and nothing may be NaN.
    assert lora_b and all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora_b)
