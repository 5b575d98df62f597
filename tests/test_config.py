"""RunConfig: normalisation, one clear error per bad option, the run identity, immutability.

Nothing here trains: configs are built and resolved against the ``mf`` task (a few ms).
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from reflora_analysis import cli
from reflora_analysis.config import (ConfigError, ConfigTypeError, FrozenDict, OptimizerConfig,
                                     RunConfig)
from reflora_analysis.methods import METHODS
from reflora_analysis.probes import available_probes
from reflora_analysis.tasks import available_tasks, make_task


def mf():
    return make_task("mf", seed=0)


# ---- normalisation --------------------------------------------------------------------------

def test_defaults_and_normalisation(tmp_path):
    probe = lambda ctx: {}  # noqa: E731
    config = RunConfig("mf", " RefLoRA ", 5, optimizer=" AdamW ", lr=1,
                       probes=["balance, consistency", probe], probe_every=2, dtype="float32",
                       out=str(tmp_path / "run.jsonl"), hparams={"warmup_steps": 2},
                       task_options={"b_scale": 0.5}, progress=0)
    assert (config.task, config.method, config.optimizer) == ("mf", "reflora", "adamw")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.probes == ("balance", "consistency", probe)
    assert config.dtype is torch.float32 and config.device == "cpu"
    assert config.out == tmp_path / "run.jsonl" and isinstance(config.out, Path)
    assert isinstance(config.hparams, FrozenDict) and config.hparams == {"warmup_steps": 2}
    assert isinstance(config.task_options, FrozenDict) and config.progress is False
    plain = RunConfig("mf", "lora", 3)
    assert (plain.optimizer, plain.lr, plain.seed, plain.probes, plain.out) == ("sgd", None, 0, (), None)
    assert plain.log_every == 1 and plain.world_size == 1 and plain.hparams == {}


def test_an_empty_probe_spec_is_no_probe():
    assert RunConfig("mf", "lora", 1, probes="").probes == ()
    assert RunConfig("mf", "lora", 1, probes=None).probes == ()


def test_a_task_object_is_kept_as_given():
    task = mf()
    assert RunConfig(task, "lora", 1).task is task


def test_hparams_accept_the_method_and_base_optimizer_keywords_of_the_registry():
    from reflora_analysis.methods.base import BASE_OPTIMIZER_KWARGS
    for method, spec in METHODS.items():
        for optimizer, base in BASE_OPTIMIZER_KWARGS.items():
            names = set(spec.hparams) | set(base)
            # values are the method's to check when it is built; names are checked here
            RunConfig("mf", method, 1, optimizer=optimizer, hparams=dict.fromkeys(names, 0))


# ---- one clear error per bad option ---------------------------------------------------------

BAD = [
    (dict(task="nope"), ValueError, f"unknown task 'nope'; valid: {', '.join(available_tasks())}"),
    (dict(task=3), TypeError, "task must be a task name or a Task, got int"),
    (dict(method="nope"), ValueError, "unknown method 'nope'; valid: lora, lora+"),
    (dict(method=None), ValueError, "unknown method None"),
    (dict(optimizer="adam"), ValueError, "unknown optimizer 'adam'; valid: sgd, adamw"),
    (dict(lr=0), ValueError, "lr must be a finite number > 0, got 0"),
    (dict(lr=-1e-3), ValueError, "lr must be a finite number > 0, got -0.001"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0, got nan"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number > 0, got inf"),
    (dict(lr="x"), ValueError, "lr must be a finite number > 0, got 'x'"),
    (dict(lr=True), ValueError, "lr must be a finite number > 0, got True"),
    (dict(steps=0), ValueError, "steps must be > 0, got 0"),
    (dict(steps=2.5), TypeError, "steps must be an integer, got float"),
    (dict(steps=True), TypeError, "steps must be an integer, got bool"),
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(log_every=0), ValueError, "log_every must be > 0, got 0"),
    (dict(eval_every=-2), ValueError, "eval_every must be >= 0, got -2"),
    (dict(checkpoint_every=2), ValueError, "checkpoint_every/resume need out="),
    (dict(resume=True), ValueError, "checkpoint_every/resume need out="),
    (dict(resume=True, overwrite=True, out="r.jsonl"), ValueError,
     "resume and overwrite exclude each other"),
    (dict(hparams={"bogus": 1}), ValueError,
     "unknown hyper-parameter(s) 'bogus' for method 'lora' with optimizer 'sgd'; valid: "
     "momentum, nesterov, weight_decay"),
    (dict(hparams={"warmup_steps": 1}), ValueError, "unknown hyper-parameter(s) 'warmup_steps'"),
    (dict(hparams=[("damping", 0.0)]), TypeError, "hparams must be a mapping"),
    (dict(probes=["balance", "x"], probe_every=1), ValueError,
     f"unknown probe 'x'; valid: {', '.join(available_probes())}"),
    (dict(probes=3, probe_every=1), TypeError, "probes must be probe names"),
    (dict(probes=[3], probe_every=1), TypeError, "a probe must be a name, a Probe or a callable"),
    (dict(probes="balance"), ValueError, "probes were given but probe_every is 0"),
    (dict(device="tpu"), ValueError, "invalid device 'tpu'"),
    (dict(device="mps"), ValueError, "unsupported device 'mps'"),
    (dict(dtype=torch.int64), ValueError, "dtype must be a floating torch dtype"),
    (dict(dtype="float31"), ValueError, "dtype must be a floating torch dtype"),
    (dict(task_options=[1]), TypeError, "task_options must be a mapping"),
]


@pytest.mark.parametrize("changes, kind, message", BAD, ids=[str(c) for c, _, _ in BAD])
def test_each_bad_option_is_one_clear_error(changes, kind, message):
    fields = {"task": "mf", "method": "lora", "steps": 3, **changes}
    with pytest.raises(kind) as info:
        RunConfig(**fields)
    assert isinstance(info.value, ConfigError)
    text = str(info.value)
    assert message in text and "\n" not in text
    option = info.value.option
    assert option in {"task", "method", "optimizer", "lr", "steps", "seed", "log_every",
                      "eval_every", "out", "overwrite", "hparams", "probes", "probe_every",
                      "device", "dtype", "task_options"}


def test_task_options_only_with_a_task_name():
    with pytest.raises(ConfigError, match="task_overrides only apply when task is given by name"):
        RunConfig(mf(), "lora", 1, task_options={"b_scale": 0.5})


def test_the_cli_spelling_of_the_same_errors():
    cases = [(dict(lr=0.0), "--lr: must be a finite number > 0, got 0.0"),
             (dict(steps=0), "--steps: must be >= 1, got 0"),
             (dict(log_every=0), "--log-every: must be >= 1, got 0"),
             (dict(probes="balance"), "--probe needs --probe-every K"),
             (dict(method="nope"), "unknown method 'nope'; valid: lora")]
    for changes, cli_text in cases:
        with pytest.raises(ConfigError) as info:
            RunConfig(**{"task": "mf", "method": "lora", "steps": 3, **changes})
        assert info.value.cli.startswith(cli_text), info.value.cli


def test_unknown_names_carry_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        RunConfig("mf", "nope", 1)
    assert info.value.valid == list(METHODS) and info.value.value == "nope"
    with pytest.raises(ConfigError) as info:
        RunConfig("mf", "reflora", 1, hparams={"warmup": 1, "damping": 0.0})
    assert info.value.value == ["warmup"] and "warmup_steps" in info.value.valid


# ---- from the command line ------------------------------------------------------------------

def _parse(*argv):
    return cli.build_parser().parse_args(["train", "--task", "mf", "--method", "reflora",
                                          "--steps", "4", "--out", "run.jsonl", *argv])


def test_from_cli_maps_every_train_option():
    args = _parse("--optimizer", "adamw", "--lr", "0.02", "--seed", "3", "--hparam",
                  "warmup_steps=2", "--weight-decay", "0.1", "--set", "b_scale=0.5", "--probe",
                  "balance", "--probe-every", "2", "--log-every", "2", "--eval-every", "3",
                  "--checkpoint-every", "4", "--resume", "--skip-nonfinite", "--bf16",
                  "--no-progress", "--quick")
    config = RunConfig.from_cli(args)
    assert (config.task, config.method, config.optimizer, config.lr, config.steps, config.seed) == \
        ("mf", "reflora", "adamw", 0.02, 4, 3)
    assert config.hparams == {"warmup_steps": 2, "weight_decay": 0.1}
    assert config.task_options == {"b_scale": 0.5} and config.quick
    assert config.probes == ("balance",) and config.probe_every == 2
    assert (config.log_every, config.eval_every, config.checkpoint_every) == (2, 3, 4)
    assert config.resume and not config.overwrite and config.skip_nonfinite
    assert config.autocast_bf16 and not config.progress and config.out == Path("run.jsonl")
    assert RunConfig.from_cli(_parse(), seed=7).seed == 7  # changes replace fields


def test_from_cli_raises_in_the_command_lines_words():
    with pytest.raises(ConfigError, match="^--lr: must be a finite number > 0, got 0.0$"):
        RunConfig.from_cli(_parse("--lr", "0"))
    with pytest.raises(ConfigError, match="^--probe needs --probe-every K$"):
        RunConfig.from_cli(_parse("--probe", "balance"))


# ---- resolution and the identity ------------------------------------------------------------

def test_resolve_fills_in_the_task_and_its_default_lr():
    task = mf()
    config = RunConfig("mf", "reflora", 5)
    with pytest.raises(ValueError, match="needs the built task"):
        config.identity()
    assert not config.resolved
    resolved = config.resolve(task, world_size=2)
    assert resolved.resolved and resolved.task is task and resolved.world_size == 2
    assert resolved.lr == task.default_lr["sgd"] and config.lr is None  # the original unchanged
    assert RunConfig("mf", "reflora", 5, lr=0.5).resolve(task).lr == 0.5
    no_default = dataclasses.replace(task, default_lr={})
    with pytest.raises(ValueError, match="task 'mf' has no default lr for 'sgd'; pass lr"):
        config.resolve(no_default)


def test_identity_is_what_checkpoints_store():
    task = mf()
    identity = RunConfig("mf", "reflora", 5, hparams={"warmup_steps": 2, "damping": 0.0}).resolve(
        task).identity()
    # the keys and values train.run wrote before RunConfig existed: old checkpoints resume
    assert identity == {"task": "mf", "task_config": task.config, "method": "reflora",
                        "optimizer": "sgd", "lr": task.default_lr["sgd"], "seed": 0,
                        "hparams": {"damping": 0.0, "warmup_steps": 2}, "dtype": None,
                        "autocast_bf16": False, "world_size": 1}
    assert list(identity["hparams"]) == ["damping", "warmup_steps"]  # sorted
    assert RunConfig(task, "lora", 1, dtype=torch.float32, lr=0.1).identity()["dtype"] == "torch.float32"


def test_identity_is_stable_across_equal_configs_and_differs_otherwise(tmp_path):
    task = mf()

    def config(**changes):
        fields = dict(task="mf", method="reflora", steps=5, hparams={"warmup_steps": 2})
        return RunConfig(**{**fields, **changes}).resolve(task)

    base = config()
    assert config().identity() == base.identity()
    assert config().fingerprint() == base.fingerprint() and len(base.fingerprint()) == 16
    # what does not change the trajectory is not part of the identity
    for same in (dict(steps=50), dict(probes="balance", probe_every=1), dict(progress=False),
                 dict(out=tmp_path / "r.jsonl", checkpoint_every=2), dict(log_every=3)):
        assert config(**same).fingerprint() == base.fingerprint(), same
    different = [dict(method="balance"), dict(optimizer="adamw"), dict(lr=0.5), dict(seed=1),
                 dict(hparams={"warmup_steps": 3}), dict(dtype=torch.float32),
                 dict(autocast_bf16=True)]
    prints = {config(**d).fingerprint() for d in different}
    assert len(prints) == len(different) and base.fingerprint() not in prints
    assert base.resolve(task, world_size=2).fingerprint() != base.fingerprint()
    other_task = make_task("mf", seed=0, b_scale=0.5)
    assert config().resolve(other_task).fingerprint() != base.fingerprint()


# ---- immutable ------------------------------------------------------------------------------

def test_a_config_is_frozen():
    config = RunConfig("mf", "reflora", 5, hparams={"warmup_steps": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1
    with pytest.raises(TypeError, match="read-only"):
        config.hparams["warmup_steps"] = 0
    with pytest.raises(TypeError, match="read-only"):
        config.task_options.update(b_scale=1.0)
    assert config.hparams == {"warmup_steps": 2}
    assert hash(config) == hash(RunConfig("mf", "reflora", 5, hparams={"warmup_steps": 2}))
    assert config == RunConfig("mf", " reflora", 5, hparams={"warmup_steps": 2})
    assert pickle.loads(pickle.dumps(config)) == config
    # a changed config is validated again
    assert dataclasses.replace(config, lr=0.5).lr == 0.5
    with pytest.raises(ConfigError, match="lr must be"):
        dataclasses.replace(config, lr=-1.0)


# ---- the method part alone ------------------------------------------------------------------

def test_optimizer_config_applies_the_same_rules():
    config = OptimizerConfig(" LoRA-RITE", "AdamW", 1e-3, {"skip": None, "betas": (0.9, 0.99)})
    assert (config.method, config.optimizer, config.lr) == ("lora-rite", "adamw", 1e-3)
    assert OptimizerConfig("reflora").lr is None
    with pytest.raises(ConfigError, match="unknown method 'qlora'; valid: lora"):
        OptimizerConfig("qlora")
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        OptimizerConfig("lora", "sgd", 0.0)
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        OptimizerConfig("lora", "sgd", 0.1, {"betas": (0.9, 0.9)})  # an AdamW keyword


def test_config_error_is_also_a_type_error_for_wrong_types():
    with pytest.raises(ConfigTypeError):
        RunConfig("mf", "lora", 2.0)
