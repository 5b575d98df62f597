"""RefTrainer: methods of the registry trained through ``transformers.Trainer`` (offline, CPU).

A tiny random LLaMA with PEFT LoRA on q/v projections; a handful of steps per method.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from reflora_analysis.hf_trainer import RefTrainer  # noqa: E402
from reflora_analysis.methods import build_optimizer  # noqa: E402

torch.set_num_threads(1)
SEQ, VOCAB, N = 8, 32, 4


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=SEQ)
    base = LlamaForCausalLM(config)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))


def _dataset():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)}
            for row in ids]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=3,
                learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                logging_steps=1, lr_scheduler_type="constant", seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("method,optim,hparams", [
    ("reflora", "adamw_torch", {"warmup_steps": 1}),
    ("lora+", "adamw_torch", {"ratio": 16}),
    ("lora-rite", "adamw_torch", {"skip": None}),
    ("scaledgd", "sgd", {}),
])
def test_ref_trainer_trains_a_tiny_llama(tmp_path, method, optim, hparams):
    model = _model()
    before = _lora(model)
    trainer = RefTrainer(model=model, args=_args(tmp_path, optim=optim), train_dataset=_dataset(),
                         lora_method=method, lora_hparams=hparams)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    after = _lora(model)
    moved = {n: float((after[n] - before[n]).norm()) for n in before}
    # PEFT starts at lora_B = 0: after 3 steps both factors of every layer have moved
    assert all(v > 0 for v in moved.values()), moved
    if method in ("reflora", "lora-rite"):
        assert trainer.lora_transform is not None and trainer.lora_transform.step_count == 3


def test_ref_trainer_step_equals_build_optimizer_step(tmp_path):
    """One Trainer step with RefLoRA + SGD equals our own loop's step on the same batch."""
    model = _model(seed=1)
    with torch.no_grad():  # a generic point, so RefLoRA's preconditioner is not degenerate
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    twin = copy.deepcopy(model)
    start = _lora(model)
    trainer = RefTrainer(model=model, args=_args(tmp_path, optim="sgd", max_steps=1,
                                                 max_grad_norm=0.0),
                         train_dataset=_dataset(), lora_method="reflora")
    trainer.train()

    opt, transform = build_optimizer("reflora", twin, optimizer="sgd", lr=1e-2)
    batch = {k: torch.stack([row[k] for row in _dataset()]) for k in ("input_ids", "labels",
                                                                    "attention_mask")}
    twin.train()
    twin(**batch).loss.backward()
    opt.step()
    ours, theirs = _lora(twin), _lora(model)
    for n in ours:
        step = float((ours[n] - start[n]).norm())
        assert step > 1e-6, n  # the step is real, so the comparison below can fail
        # Both runs do the same float32 ops on the same 4 rows in one thread: measured bitwise
        # equal (difference 0.0 for seeds 1-3). 1e-6 of the step admits only float32-eps-level
        # noise in the gradient reductions; a wrong lr, a missed transform or another batch
        # changes the step by O(step).
        tol = 1e-6 * step
        assert float((theirs[n] - ours[n]).norm()) <= tol, (n, tol)
    assert transform.step_count == 1 and trainer.lora_transform.step_count == 1


def test_ref_trainer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="valid methods"):
        RefTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(),
                   lora_method="qlora")
    with pytest.raises(ValueError, match="supports optim"):
        RefTrainer(model=_model(), args=_args(tmp_path, optim="adafactor"),
                   train_dataset=_dataset(), lora_method="reflora")
    with pytest.raises(ValueError, match="unknown lora_hparams"):
        RefTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(),
                   lora_method="reflora", lora_hparams={"warmup": 3})
