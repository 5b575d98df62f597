"""``reflora-analysis probe`` builds the model as ``train`` does: with the task options the
method sets (``MethodSpec.task_options``: ``dora`` -> ``use_dora``, ``full`` ->
``full_finetune``), and, with a checkpoint, the checkpoint's model or one clear line.

Before, ``probe`` ignored the method's options: a DoRA or full fine-tuning checkpoint could
not be probed at all (``checkpoint does not match the model's trainable parameters``), and
``--method full`` on a LoRA model failed deep inside the method (``pass the nn.Module``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from reflora_analysis import cli

torch.set_num_threads(1)


needs_hf = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("peft", "transformers")),
    reason="needs transformers and peft")


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments):
    lines = err.strip().splitlines()
    assert status == 2, err
    assert lines and lines[-1].startswith("reflora-analysis: error: "), err
    assert all(not line.startswith("reflora-analysis: error") for line in lines[:-1]), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{method: checkpoint path}`` of one-step seq-cls (quick) runs of lora and dora."""
    root = tmp_path_factory.mktemp("probe-ckpt")
    paths = {}
    for method in ("lora", "dora"):
        out = root / f"{method}.jsonl"
        status = cli.main(["train", "--task", "seq-cls", "--quick", "--method", method,
                           "--steps", "1", "--checkpoint-every", "1", "--out", str(out),
                           "--no-progress"])
        assert status == 0
        paths[method] = str(out.with_suffix(".ckpt.pt"))
    return paths


@needs_hf
@pytest.mark.filterwarnings("ignore:reflora. singular")
def test_a_dora_checkpoint_is_probed_on_its_dora_model(checkpoints, capsys):
    status, out, err = run_cli(capsys, "probe", "--task", "seq-cls", "--quick", "--probe",
                               "balance", "--checkpoint", checkpoints["dora"], "--json")
    assert status == 0, err
    values = json.loads(out)
    assert values["method"] == "dora" and values["step"] == 1
    assert values["balance/gap_max"] >= 0  # a number: the probe ran on the loaded weights


@needs_hf
def test_the_method_options_are_applied_without_a_checkpoint(capsys, monkeypatch):
    import reflora_analysis.tasks as tasks
    built = []
    real = tasks.make_task

    def recording(*args, **kw):
        built.append(kw)
        return real(*args, **kw)
    monkeypatch.setattr(tasks, "make_task", recording)
    status, _, err = run_cli(capsys, "probe", "--task", "seq-cls", "--quick", "--probe",
                             "health", "--method", "dora", "--json")
    assert status == 0, err
    assert [kw.get("use_dora") for kw in built] == [True]


@needs_hf
@pytest.mark.parametrize("method, key", [("full", "full_finetune"), ("dora", "use_dora")])
def test_a_method_that_needs_another_model_than_the_checkpoints_is_refused(checkpoints, capsys,
                                                                           method, key):
    status, _, err = run_cli(capsys, "probe", "--task", "seq-cls", "--quick", "--probe",
                             "balance", "--checkpoint", checkpoints["lora"], "--method", method)
    assert_one_line_error(status, err, checkpoints["lora"], f"{key}=false",
                          f"--method {method} asks for {key}=true", "drop --checkpoint")


@needs_hf
def test_a_set_that_changes_the_checkpoints_model_is_refused(checkpoints, capsys):
    status, _, err = run_cli(capsys, "probe", "--task", "seq-cls", "--quick", "--probe",
                             "balance", "--checkpoint", checkpoints["lora"], "--set",
                             "use_dora=true")
    assert_one_line_error(status, err, "use_dora=false", "--set use_dora asks for use_dora=true")


def test_a_method_option_the_task_lacks_names_the_method_and_the_option(capsys):
    status, _, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "balance",
                             "--method", "full")
    assert_one_line_error(status, err, "--method full sets the task option full_finetune=true",
                          "unknown override(s) 'full_finetune'")


def test_a_set_that_contradicts_the_method_is_refused_as_train_refuses_it(capsys, tmp_path):
    argv = ["--task", "mf", "--method", "dora", "--set", "use_dora=false"]
    status, _, err = run_cli(capsys, "probe", "--probe", "balance", *argv)
    assert_one_line_error(status, err, "--set use_dora=false: contradicts --method dora")
    train_status, _, train_err = run_cli(capsys, "train", *argv, "--steps", "1", "--out",
                                         str(tmp_path / "run.jsonl"))
    assert train_status == 2 and train_err.strip() == err.strip()
    assert not any(tmp_path.iterdir())
