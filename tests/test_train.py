"""train.run: JSON lines, determinism, divergence handling, checkpoints never poisoned.

Everything runs on the ``mf`` task (full batch, float64, ~2 ms per step), so the whole file
takes a few seconds on one core.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from reflora_analysis.checkpoint import first_nonfinite, load_checkpoint
from reflora_analysis.io import read_json_lines
from reflora_analysis.refactor import STATE_DICT_KEY
from reflora_analysis.tasks import make_task
from reflora_analysis.train import (TrainingDiverged, checkpoint_path, meta_path, resolve_device,
                                    run)

torch.set_num_threads(1)


def lora_weights(task) -> list[torch.Tensor]:
    return [p.detach().clone() for pair in task.pairs for p in pair.params]


def test_json_lines_start_at_initial_point_with_required_keys(tmp_path):
    out = tmp_path / "run.jsonl"
    reference = make_task("mf", seed=0)
    initial_loss = reference.loss(reference.batch(0)).item()
    records = run("mf", "reflora", steps=6, out=out, progress=False)
    lines = read_json_lines(out)
    assert lines == json.loads(json.dumps(records))  # the file holds exactly what run returned
    assert [r["step"] for r in lines] == list(range(7))
    for r in lines:
        assert {"step", "loss", "lr", "time", "method", "optimizer"} <= set(r)
        assert r["method"] == "reflora" and r["lr"] == make_task("mf").default_lr["sgd"]
    # step 0 is the point before any update: the task's own loss at its initialisation
    assert lines[0]["loss"] == initial_loss
    assert lines[-1]["loss"] < lines[0]["loss"]
    times = [r["time"] for r in lines]
    assert times == sorted(times)
    # evaluate() runs at the first and last step only (eval_every=0)
    assert [r["step"] for r in lines if "eval/relative_error" in r] == [0, 6]
    meta = json.loads(meta_path(out).read_text())
    assert meta["status"] == "completed" and meta["method"] == "reflora" and meta["task"] == "mf"
    assert meta["task_config"]["m"] == 30 and "torch" in meta["versions"]


def test_log_every_keeps_first_and_last_step():
    records = run("mf", "lora", steps=7, log_every=3, progress=False)
    assert [r["step"] for r in records] == [0, 3, 6, 7]


def test_lines_are_on_disk_when_the_run_stops_partway(tmp_path):
    out = tmp_path / "run.jsonl"

    def stop_at_step_4(ctx):  # a probe that dies, like a process interrupted mid-run
        if ctx.step == 4:
            raise KeyboardInterrupt
        return {"probe/step": float(ctx.step)}

    with pytest.raises(KeyboardInterrupt):
        run("mf", "lora", steps=20, out=out, probes=[stop_at_step_4], probe_every=1, progress=False)
    lines = read_json_lines(out)
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert [r["probe/step"] for r in lines] == [0.0, 1.0, 2.0, 3.0]
    assert json.loads(meta_path(out).read_text())["status"] == "failed"


def test_same_seed_same_run_other_seed_other_run():
    def losses_and_weights(seed, method="reflora-s", optimizer="adamw"):
        task = make_task("mf", seed=seed)
        records = run(task, method, optimizer=optimizer, steps=15, seed=seed, progress=False)
        return [r["loss"] for r in records], lora_weights(task)

    losses_a, weights_a = losses_and_weights(0)
    losses_b, weights_b = losses_and_weights(0)
    assert losses_a == losses_b  # bit-identical on CPU, not merely close
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    losses_c, _ = losses_and_weights(1)
    assert losses_c != losses_a


def _files(out) -> dict:
    """Bytes of a run's log, meta and checkpoint (None for a missing one)."""
    return {p.name: (p.read_bytes() if p.exists() else None)
            for p in (out, meta_path(out), checkpoint_path(out))}


@pytest.mark.parametrize("left_over", ["log", "meta", "checkpoint"])
def test_an_existing_run_is_never_replaced_silently(tmp_path, left_over):
    out = tmp_path / "run.jsonl"
    run("mf", "lora", steps=5, out=out, checkpoint_every=5, progress=False)
    keep = {"log": out, "meta": meta_path(out), "checkpoint": checkpoint_path(out)}[left_over]
    for path in (out, meta_path(out), checkpoint_path(out)):
        if path != keep:
            path.unlink()
    before = _files(out)
    with pytest.raises(FileExistsError) as info:
        run("mf", "lora", steps=2, out=out, progress=False)
    message = str(info.value)
    assert "\n" not in message and str(keep) in message
    assert "--resume" in message and "--overwrite" in message
    assert _files(out) == before  # nothing touched


def test_overwrite_replaces_the_log_meta_and_checkpoint(tmp_path):
    out = tmp_path / "run.jsonl"
    run("mf", "lora", steps=5, out=out, checkpoint_every=5, progress=False)
    assert checkpoint_path(out).exists()
    run("mf", "lora", steps=2, out=out, progress=False, overwrite=True)
    assert [r["step"] for r in read_json_lines(out)] == [0, 1, 2]
    assert json.loads(meta_path(out).read_text())["steps"] == 2
    # the old run's checkpoint is gone: a later --resume cannot continue the replaced run
    assert not checkpoint_path(out).exists()
    with pytest.raises(ValueError, match="exclude each other"):
        run("mf", "lora", steps=2, out=out, progress=False, overwrite=True, resume=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be > 0"),
    (dict(steps=-3), "steps must be > 0"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=3, lr=0.0), "lr must be a finite number > 0"),
    (dict(steps=3, lr=-1e-3), "lr must be a finite number > 0"),
    (dict(steps=3, lr=float("nan")), "lr must be a finite number > 0"),
    (dict(steps=3, optimizer="adam"), "unknown optimizer 'adam'"),
    (dict(steps=3, checkpoint_every=2), "need out="),
    (dict(steps=3, probes=[lambda ctx: {}]), "probe_every"),
    (dict(steps=3, device="tpu"), "device"),
])
def test_bad_arguments_fail_with_one_clear_message(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        run("mf", "lora", progress=False, **kwargs)


def test_unknown_task_and_method_list_the_valid_names():
    with pytest.raises(ValueError, match="valid: .*mf"):
        run("nope", "lora", steps=1, progress=False)
    with pytest.raises(ValueError, match="valid.*reflora"):
        run("mf", "nope", steps=1, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run("mf", "lora", steps=1, device="cuda", progress=False)


def _mf_with_fault(kind: str, at_step: int):
    """``mf`` whose loss (kind="loss") or gradient of A (kind="grad") is NaN at one step."""
    task = make_task("mf", seed=0)
    base_loss, pair = task.loss, task.pairs[0]

    def loss(step):
        value = base_loss(None)
        if step != at_step:
            return value
        if kind == "loss":
            return value * float("nan")
        poisoned = pair.a.clone()
        poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
        return value + 0.0 * poisoned.sum()  # value unchanged, dl/dA becomes NaN

    return dataclasses.replace(task, batch=lambda step: step, loss=loss)


def test_nan_loss_stops_naming_the_step_and_keeps_the_lines(tmp_path):
    out = tmp_path / "run.jsonl"
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3") as info:
        run(_mf_with_fault("loss", 3), "reflora", steps=10, out=out, checkpoint_every=1, progress=False)
    assert info.value.step == 3 and info.value.what == "loss"
    lines = read_json_lines(out)
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert math.isnan(lines[-1]["loss"]) and lines[-1]["nonfinite"] == "loss"
    assert lines[-1]["skipped"] is False
    assert json.loads(meta_path(out).read_text())["status"] == "diverged"


def test_nan_gradient_stops_naming_step_and_layer():
    task = _mf_with_fault("grad", 2)
    before_step_2 = []
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient at step 2 in layer mf\.W\.A") as info:
        run(task, "lora", steps=10, progress=False,
            probes=[lambda ctx: before_step_2.append(lora_weights(task)) or {}], probe_every=1)
    assert info.value.layer == "mf.W.A" and info.value.what == "gradient"
    # the optimizer never stepped with the NaN gradient: weights are those before step 2
    assert all(torch.equal(a, b) for a, b in zip(lora_weights(task), before_step_2[-1]))


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_skip_nonfinite_skips_that_update_and_continues(kind):
    task = _mf_with_fault(kind, 2)
    seen = {}
    records = run(task, "reflora", optimizer="adamw", steps=6, skip_nonfinite=True, progress=False,
                  probes=[lambda ctx: seen.__setitem__(ctx.step, lora_weights(task)) or {}],
                  probe_every=1)
    assert [r["step"] for r in records] == list(range(7))
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    # the skipped step left the weights alone; every other step moved them
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 2)


def test_divergence_never_writes_a_poisoned_checkpoint(tmp_path):
    # plain LoRA at 3x the default SGD step diverges on mf (the paper's picture)
    out = tmp_path / "run.jsonl"
    with pytest.raises(TrainingDiverged) as info:
        run("mf", "lora", lr=0.03, steps=200, out=out, checkpoint_every=1, progress=False)
    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt["step"] <= info.value.step
    assert first_nonfinite({k: ckpt[k] for k in ("trainable", "optimizer")}) is None


def test_probe_values_are_logged_every_k_steps():
    records = run("mf", "reflora", steps=6, probes="balance", probe_every=3, progress=False)
    probed = [r["step"] for r in records if "balance/gap_max" in r]
    assert probed == [0, 3, 6]
    assert all(isinstance(r["balance/gap_max"], float) for r in records if "balance/gap_max" in r)


@pytest.mark.parametrize("probes", [["balance"], ["balance,consistency"],
                                    ("balance", "consistency"),
                                    ["balance", lambda ctx: {"mine/step": float(ctx.step)}]])
def test_probes_may_be_given_by_name(probes):
    records = run("mf", "reflora", steps=4, probes=probes, probe_every=2, progress=False)
    probed = [r for r in records if "balance/gap_max" in r]
    assert [r["step"] for r in probed] == [0, 2, 4]
    names = {k.split("/")[0] for r in probed for k in r if "/" in k and not k.startswith("eval/")}
    expected = {n.strip() for p in probes if isinstance(p, str) for n in p.split(",")}
    assert expected <= names
    if callable(probes[-1]):
        assert [r["mine/step"] for r in probed] == [0.0, 2.0, 4.0]


def test_an_unknown_probe_name_lists_the_valid_ones(tmp_path):
    from reflora_analysis.probes import available_probes
    valid = ", ".join(available_probes())
    with pytest.raises(ValueError, match=f"unknown probe 'x'; valid: {valid}"):
        run("mf", "reflora", steps=2, probes=["balance", "x"], probe_every=1, progress=False,
            out=tmp_path / "run.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_probe_the_task_cannot_run_fails_before_step_0(tmp_path):
    """bound needs task.loss_in_W or a model: the run stops before any probe runs or any file is written."""
    task = dataclasses.replace(make_task("mf", seed=0), loss_in_W=None, model=None,
                               name="mf-no-loss-in-W")
    calls = []
    out = tmp_path / "run.jsonl"
    with pytest.raises(ValueError, match=r"probe 'bound' cannot run on task 'mf-no-loss-in-W': "
                                         r"it needs a single-layer task with loss_in_W"):
        run(task, "reflora", steps=3, out=out, probe_every=1, progress=False,
            probes=[lambda ctx: calls.append(ctx.step) or {}, "balance", "bound"])
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_meta_records_the_package_version(tmp_path):
    import reflora_analysis
    out = tmp_path / "run.jsonl"
    seen = []

    def read_meta(ctx):  # the meta written at the start, while the run is going
        seen.append(json.loads(meta_path(out).read_text()))
        return {}

    run("mf", "lora", steps=2, out=out, probes=[read_meta], probe_every=2, progress=False)
    final = json.loads(meta_path(out).read_text())
    assert seen[0]["status"] == "running" and final["status"] == "completed"
    for meta in (seen[0], final):
        assert meta["reflora_analysis_version"] == reflora_analysis.__version__


class _FakeTerminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        import io
        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


@pytest.mark.parametrize("progress", [True, False])
def test_sharpness_probe_shows_its_progress_when_asked(monkeypatch, progress):
    import sys
    fake = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    run("mf", "reflora", steps=1, probes="sharpness", probe_every=1, progress=progress)
    shown = fake.buffer.getvalue()
    assert ("sharpness: Lanczos" in shown and "sharpness: trace" in shown) is progress
    assert ("hvp" in shown) is progress


def test_dtype_casts_the_model():
    task = make_task("mf", seed=0)
    records = run(task, "reflora", steps=3, dtype=torch.float32, progress=False)
    assert all(p.dtype == torch.float32 for p in task.model.parameters())
    assert math.isfinite(records[-1]["loss"])


def test_a_model_without_lora_layers_is_a_clear_error():
    from reflora_analysis.pairs import NoLoraLayersError
    task = dataclasses.replace(make_task("mf"), model=torch.nn.Linear(3, 3), pairs=[])
    with pytest.raises(NoLoraLayersError, match="no trainable LoRA layers"):
        run(task, "reflora", steps=2, progress=False)


def test_bf16_autocast_changes_the_arithmetic_but_trains():
    # autocast only lowers float32 ops, so the model is cast to float32 first
    plain = run(make_task("mf"), "reflora", steps=5, dtype=torch.float32, progress=False)
    autocast = run(make_task("mf"), "reflora", steps=5, dtype=torch.float32, autocast_bf16=True,
                   progress=False)
    assert all(math.isfinite(r["loss"]) for r in autocast)
    # bf16 keeps ~3 significant digits: the losses differ, but by well under 1% at step 0
    assert autocast[0]["loss"] != plain[0]["loss"]
    assert abs(autocast[0]["loss"] - plain[0]["loss"]) < 1e-2 * plain[0]["loss"]


# ---------------------------------------------------------------- probes see the step taken

def test_probes_follow_the_transform_schedule():
    """During warm-up / between interval steps the update is plain LoRA's; the consistency and
    bound probes must measure that step, not a fresh transform's (which would be in warm-up)."""
    steps = 6
    records = run("mf", "reflora", steps=steps, probes="consistency,bound", probe_every=1,
                  warmup_steps=2, interval=2, progress=False)
    active = {t: t >= 2 and (t - 2) % 2 == 0 for t in range(steps + 1)}
    for r in records:
        t = r["step"]
        if active[t]:  # RefLoRA (damping 0) is exactly invariant: round-off ~1e-15 (F6)
            assert r["consistency/score"] < 1e-8, t
        else:  # LoRA's step changes by O(1) over factorizations with cond(P) <= 4
            assert r["consistency/score"] > 1e-2, t
        if t < steps:
            # the bound's next loss is the loss the run reaches one update later; the two
            # differ by round-off of W + dW vs W0 + A+ B+^T (float64, ~1e-15 relative)
            assert r["bound/next_loss"] == pytest.approx(records[t + 1]["loss"], rel=1e-10), t
        assert r["consistency/method_active"] == r["bound/method_active"] == float(active[t])


def test_resume_restores_the_transform_schedule_from_the_optimizer_state(tmp_path):
    """The checkpoint keeps the transform's state once, inside the optimizer state dict; a
    resume whose transform restarted its step counter would extend the warm-up (plain LoRA
    steps) and change the losses after the checkpoint."""
    steps, hp = 8, dict(warmup_steps=6, interval=1)
    reference = run("mf", "reflora", steps=steps, progress=False, **hp)
    out = tmp_path / "run.jsonl"

    def crash_at_7(ctx):
        if ctx.step == 7:
            raise RuntimeError("simulated crash")
        return {}

    with pytest.raises(RuntimeError, match="simulated crash"):
        run("mf", "reflora", steps=steps, out=out, checkpoint_every=5, probes=[crash_at_7],
            probe_every=1, progress=False, **hp)
    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt["step"] == 5 and "transform" not in ckpt
    assert ckpt["optimizer"][STATE_DICT_KEY]["Refactorer"]["step_count"] == 5
    resumed = run("mf", "reflora", steps=steps, out=out, checkpoint_every=5, resume=True,
                  progress=False, **hp)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_an_old_format_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run.jsonl"
    run("mf", "reflora", steps=2, out=out, checkpoint_every=1, progress=False)
    ckpt = load_checkpoint(checkpoint_path(out))
    ckpt["format"] = 1
    torch.save(ckpt, checkpoint_path(out))
    with pytest.raises(ValueError, match="has format 1, this reflora-analysis reads format 2"):
        run("mf", "reflora", steps=3, out=out, checkpoint_every=1, resume=True, progress=False)


def test_a_detached_transform_cannot_be_checkpointed(tmp_path):
    from reflora_analysis.checkpoint import save_checkpoint
    from reflora_analysis.methods import build_optimizer
    task = make_task("mf")
    opt, transform = build_optimizer("reflora", task.model, pairs=task.pairs, lr=0.01)
    transform.detach()
    with pytest.raises(ValueError, match="not attached to this optimizer"):
        save_checkpoint(tmp_path / "x.ckpt.pt", step=0, model=task.model, optimizer=opt,
                        transform=transform)


def test_optimizer_name_is_normalised_like_build_optimizer():
    records = run("mf", "lora", optimizer=" SGD ", steps=1, progress=False)
    assert records[0]["optimizer"] == "sgd"
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 'x'"):
        run("mf", "lora", lr="x", steps=1, progress=False)


# ---------------------------------------------------------------- the public parts of the loop

from reflora_analysis.config import RunConfig  # noqa: E402
from reflora_analysis.train import RunLog, build_run, fit, restore_checkpoint, train_step  # noqa: E402


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith("/seconds")}
            for r in records]


def test_build_run_builds_without_training_or_writing(tmp_path):
    config = RunConfig("mf", "reflora", 4, out=tmp_path / "run.jsonl", probes="balance",
                       probe_every=2, hparams={"warmup_steps": 1})
    run_ = build_run(config)
    assert run_.config.resolved and run_.config.lr == run_.task.default_lr["sgd"]
    assert run_.config.identity()["hparams"] == {"warmup_steps": 1}
    assert run_.transform is not None and run_.transform.step_count == 0
    assert (run_.start, run_.skipped, run_.elapsed) == (0, 0, 0.0)
    assert [type(p).__name__ for p in run_.probes] == ["BalanceProbe"]
    assert {id(p) for p in run_.params} == {id(p) for pair in run_.task.pairs for p in pair.params}
    assert list(tmp_path.iterdir()) == []
    # a built task is used as given: several runs may share it (one optimizer each)
    task = make_task("mf", seed=0)
    a, b = build_run(RunConfig(task, "lora", 2), task), build_run(RunConfig("mf", "reflora", 2), task)
    assert a.task is task and b.task is task and a.optimizer is not b.optimizer


def test_train_step_is_the_loops_step():
    """Stepping a built run reproduces run()'s losses and weights bit for bit, so a timing
    that calls train_step measures exactly what training does."""
    reference_task = make_task("mf", seed=0)
    reference = run(reference_task, "reflora", optimizer="adamw", steps=5, progress=False)
    run_ = build_run(RunConfig("mf", "reflora", 5, optimizer="adamw"))
    results = [train_step(run_, t) for t in range(6)]
    assert [r.loss for r in results] == [r["loss"] for r in reference]
    assert [r.updated for r in results] == [True] * 5 + [False]  # the end step only evaluates
    assert all(r.problem is None and r.error is None and r.seconds > 0 for r in results)
    assert all(torch.equal(a, b) for a, b in zip(lora_weights(run_.task), lora_weights(reference_task)))
    assert run_.transform.step_count == 5


@pytest.mark.parametrize("skip", [False, True])
def test_train_step_applies_the_nonfinite_policy_without_raising(skip):
    task = _mf_with_fault("grad", 1)
    run_ = build_run(RunConfig(task, "lora", 4, skip_nonfinite=skip))
    train_step(run_, 0)
    before = lora_weights(task)
    result = train_step(run_, 1)
    assert not result.updated and result.problem.what == "gradient"
    assert result.problem.layer == "mf.W.A" and "step 1" in str(result.problem)
    assert all(torch.equal(a, b) for a, b in zip(lora_weights(task), before))
    assert result.fields() == {"nonfinite": "gradient", "skipped": skip}
    assert (result.error is None) is skip and run_.skipped == int(skip)


def test_fit_of_a_config_is_run():
    by_keywords = run("mf", "balance", steps=4, probes="balance", probe_every=2, progress=False)
    by_config = fit(RunConfig("mf", "balance", 4, probes="balance", probe_every=2, progress=False))
    assert _without_time(by_config) == _without_time(by_keywords)


def test_run_log_refuses_keeps_truncates_and_closes(tmp_path):
    out = tmp_path / "sub" / "run.jsonl"
    log = RunLog(out)
    log.prepare()  # creates the directory, writes nothing
    assert out.parent.is_dir() and log.existing() == []
    run_ = build_run(RunConfig("mf", "lora", 3, out=out))
    log.open(run_.config)
    for step in range(3):
        log.append({"step": step, "loss": 1.0 / (step + 1)})
    assert read_json_lines(out) == log.records
    assert json.loads(meta_path(out).read_text())["status"] == "running"
    log.close("completed", skipped=0, elapsed=1.5)
    meta = json.loads(meta_path(out).read_text())
    assert (meta["status"], meta["final_step"], meta["elapsed"]) == ("completed", 2, 1.5)
    assert meta["task"] == "mf" and meta["world_size"] == 1
    with pytest.raises(FileExistsError, match="run.jsonl already exists .*--resume.*--overwrite"):
        RunLog(out).prepare()
    RunLog(out).prepare(resume=True)  # continuing is allowed
    again = RunLog(out)
    assert [r["step"] for r in again.truncate(2)] == [0, 1] == [r["step"] for r in read_json_lines(out)]
    memory = RunLog(None)
    memory.prepare()
    memory.append({"step": 0})
    assert memory.records == [{"step": 0}] and memory.checkpoint_path is None


def test_restore_checkpoint_moves_a_built_run_to_its_checkpoint(tmp_path):
    out = tmp_path / "run.jsonl"
    run("mf", "reflora", steps=4, out=out, checkpoint_every=2, progress=False)
    config = RunConfig("mf", "reflora", 6, out=out, checkpoint_every=2, resume=True)
    run_, log = build_run(config), RunLog(out)
    assert restore_checkpoint(run_, log) == 4 == run_.start
    assert run_.transform.step_count == 4 and run_.elapsed > 0
    assert [r["step"] for r in log.records] == [0, 1, 2, 3]
    other = build_run(RunConfig("mf", "lora", 6, out=out, resume=True))
    with pytest.raises(ValueError, match="written by a different run .*differs in: method"):
        restore_checkpoint(other, RunLog(out))
    fresh = build_run(RunConfig("mf", "reflora", 6, out=tmp_path / "none.jsonl", resume=True))
    assert restore_checkpoint(fresh, RunLog(tmp_path / "none.jsonl")) == 0


def test_a_checkpoint_written_before_run_config_resumes(tmp_path):
    """The identity a checkpoint stores kept its keys and values: a checkpoint whose identity
    is the dict train.run wrote before RunConfig existed continues, bit for bit."""
    reference = run("mf", "reflora", steps=6, progress=False)
    out = tmp_path / "run.jsonl"

    def crash_at_5(ctx):
        if ctx.step == 5:
            raise RuntimeError("simulated crash")
        return {}

    with pytest.raises(RuntimeError):
        run("mf", "reflora", steps=6, out=out, checkpoint_every=4, probes=[crash_at_5],
            probe_every=1, progress=False)
    ckpt = load_checkpoint(checkpoint_path(out))
    task = make_task("mf", seed=0)
    ckpt["identity"] = {"task": "mf", "task_config": task.config, "method": "reflora",
                        "optimizer": "sgd", "lr": 0.01, "seed": 0, "hparams": {}, "dtype": None,
                        "autocast_bf16": False, "world_size": 1}
    torch.save(ckpt, checkpoint_path(out))
    resumed = run("mf", "reflora", steps=6, out=out, checkpoint_every=4, resume=True, progress=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
