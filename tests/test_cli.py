"""The ``reflora-analysis`` command: happy paths, and bad input -> status 2 and one line.

Most cases call ``cli.main(argv)`` in-process (fast), bad input included; one runs the
installed console script as a real subprocess (entry point, exit status, output file) to
check what a user sees end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from reflora_analysis import cli
from reflora_analysis.keyvalue import parse_key_value
from reflora_analysis.io import read_json_lines

torch.set_num_threads(1)


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, expected_status, pattern):
    assert status == expected_status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("reflora-analysis: error: "), lines[0]
    assert "Traceback" not in err
    assert pattern.lower() in lines[0].lower(), lines[0]


def test_train_writes_json_lines(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    status, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--steps", "5",
                             "--out", str(out), "--probe", "balance", "--probe-every", "5",
                             "--no-progress")
    assert status == 0, err
    records = read_json_lines(out)
    assert [r["step"] for r in records] == list(range(6))
    assert "balance/gap_max" in records[0] and "balance/gap_max" in records[5]
    assert "balance/gap_max" not in records[1]
    assert records[0]["lr"] == 0.01  # mf's documented default SGD step


def test_train_overrides_hparams_and_resume(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    base = ["train", "--task", "mf", "--set", "b_scale=0.5", "--method", "reflora", "--optimizer",
            "adamw", "--lr", "0.01", "--hparam", "warmup_steps=2", "--out", str(out),
            "--checkpoint-every", "2", "--no-progress"]
    assert run_cli(capsys, *base, "--steps", "4")[0] == 0
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["task_config"]["b_scale"] == 0.5 and meta["hparams"] == {"warmup_steps": 2}
    status, _, err = run_cli(capsys, *base, "--steps", "6", "--resume")  # extend the run
    assert status == 0, err
    assert "resuming" in err and "at step 4" in err
    assert [r["step"] for r in read_json_lines(out)] == list(range(7))


def test_listing_commands(capsys):
    status, out, _ = run_cli(capsys, "methods")
    assert status == 0 and "reflora-s" in out and "lora-rite" in out
    status, out, _ = run_cli(capsys, "tasks")
    assert status == 0 and "mf" in out and "causal-lm" in out


def test_figures_delegates_its_arguments(capsys):
    figures = pytest.importorskip("reflora_analysis.figures")
    status, out, _ = run_cli(capsys, "figures", "--list")
    assert status == 0
    assert out.split() == list(figures.available_notebooks())


def test_probe_command_at_initial_point_and_checkpoint(tmp_path, capsys):
    status, out, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "balance", "--json")
    assert status == 0, err
    initial = json.loads(out)
    assert initial["step"] == 0 and "balance/gap_max" in initial
    run_out = tmp_path / "run.jsonl"
    assert run_cli(capsys, "train", "--task", "mf", "--method", "balance", "--steps", "20",
                   "--out", str(run_out), "--checkpoint-every", "10", "--no-progress")[0] == 0
    status, out, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "balance",
                               "--checkpoint", str(run_out.with_suffix(".ckpt.pt")))
    assert status == 0, err
    table = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert table["step"] == "20"
    # the "balance" method makes A^T A = B^T B; its trained weights were loaded: the gap,
    # ~1 at the unbalanced initialisation, is ~1e-15 after training (1e-8: float64 round-off)
    assert initial["balance/gap_max"] > 0.9 and float(table["balance/gap_max"]) < 1e-8


TRAIN = ["train", "--task", "mf", "--method", "lora", "--steps", "3", "--out"]

BAD_INPUTS = [
    # (argv after the common prefix or full argv, expected status, fragment of the message)
    (["train", "--task", "nope", "--method", "lora", "--steps", "3", "--out", "{out}"], 2,
     "unknown task 'nope'; valid: mf"),
    (["train", "--task", "mf", "--method", "nope", "--steps", "3", "--out", "{out}"], 2,
     "unknown method 'nope'; valid: lora"),
    (TRAIN + ["{out}", "--lr", "0"], 2, "--lr: must be a finite number > 0"),
    (TRAIN + ["{out}", "--lr", "-0.1"], 2, "--lr: must be a finite number > 0"),
    (TRAIN + ["{out}", "--lr", "fast"], 2, "--lr: expected a number"),
    (["train", "--task", "mf", "--method", "lora", "--steps", "0", "--out", "{out}"], 2,
     "--steps: must be >= 1"),
    (["train", "--task", "mf", "--method", "lora", "--steps", "-5", "--out", "{out}"], 2,
     "--steps: must be >= 1"),
    (TRAIN + ["{out}", "--model", "/no/such/model"], 2, "no such file or directory: /no/such/model"),
    (TRAIN + ["{out}", "--data", "/no/such/data.json"], 2, "no such file or directory"),
    (TRAIN + ["{out}", "--probe", "balance,magic", "--probe-every", "1"], 2,
     "unknown probe 'magic'; valid: balance"),
    (TRAIN + ["{out}", "--probe", "balance"], 2, "--probe needs --probe-every"),
    (TRAIN + ["{out}", "--optimizer", "adam"], 2, "invalid choice: 'adam'"),
    (TRAIN + ["{out}", "--set", "colour=blue"], 2, "unknown override(s) 'colour'"),
    (TRAIN + ["{out}", "--set", "novalue"], 2, "expected key=value"),
    (TRAIN + ["{out}", "--hparam", "bogus=1"], 2, "bogus"),
    (TRAIN + [__file__ + "/run.jsonl"], 2, "cannot create output directory"),
    (["train", "--method", "lora", "--steps", "3", "--out", "{out}"], 2, "--task"),
    (["fly"], 2, "invalid choice: 'fly'"),
    (["probe", "--task", "mf", "--probe", "balance", "--checkpoint", "/no/ckpt.pt"], 2,
     "no such file or directory"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((TRAIN + ["{out}", "--device", "cuda"], 2, "CUDA is not available"))


@pytest.mark.parametrize("argv, status, message", BAD_INPUTS,
                         ids=[" ".join(a[-3:]) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, argv, status, message):
    argv = [a.replace("{out}", str(tmp_path / "run.jsonl")) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, status, message)


def test_a_diverging_run_is_one_line_naming_the_step(tmp_path, capsys):
    """Not bad input: status 1, one line naming the first non-finite step.

    What is machine-independent here is the mechanism, not the last bits: plain LoRA at 3x
    mf's step size sits past its stability limit (curvature ||B||_2^2 ~ 170 > 2 / 0.03), and
    the loss of a quartic problem then grows super-exponentially until it overflows. Whether
    the overflow shows as Inf or as NaN (Inf - Inf), and at exactly which step, depends on the
    BLAS and the CPU; so we assert the message's form, that every logged step before it is
    finite, and the growth that explains it.
    """
    import re

    out = tmp_path / "run.jsonl"
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "lora", "--lr", "0.03",
                           "--steps", "50", "--out", str(out), "--no-progress")
    assert_one_line_error(code, err, 1, "at step")
    match = re.search(r"loss is (nan|inf|-inf) at step (\d+) \(lora, sgd, lr=0\.03\)", err)
    assert match, err
    step = int(match.group(2))
    assert 1 <= step <= 50
    lines = read_json_lines(out)
    finite = [r["loss"] for r in lines if r["step"] < step]
    assert [r["step"] for r in lines][:step] == list(range(step))
    assert all(v == v and abs(v) != float("inf") for v in finite)
    # super-exponential growth before the overflow: each of the last 3 finite losses is more
    # than 10x the previous one (measured ratios ~1e4..1e184), and far above the start
    assert all(b > 10 * a for a, b in zip(finite[-4:], finite[-3:])), finite
    assert finite[-1] > 1e6 * finite[0]


def test_a_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
    import reflora_analysis.tasks as tasks

    def needs_peft(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    monkeypatch.setattr(tasks, "make_task", needs_peft)
    code, _, err = run_cli(capsys, *TRAIN, str(tmp_path / "run.jsonl"))
    assert_one_line_error(code, err, 2, "pip install 'reflora-analysis[hf]'")


def test_a_model_without_lora_layers_is_one_line(tmp_path, capsys, monkeypatch):
    import dataclasses

    import reflora_analysis.tasks as tasks
    real_make_task = tasks.make_task

    def no_lora_task(*args, **kwargs):  # e.g. --model pointing at a checkpoint without adapters
        return dataclasses.replace(real_make_task("mf"), model=torch.nn.Linear(3, 3), pairs=[])

    monkeypatch.setattr(tasks, "make_task", no_lora_task)
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--steps", "2",
                           "--out", str(tmp_path / "run.jsonl"))
    assert_one_line_error(code, err, 2, "no trainable LoRA layers")


def test_debug_flag_reraises(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        cli.main(["--debug", "train", "--task", "nope", "--method", "lora", "--steps", "1",
                  "--out", str(tmp_path / "r.jsonl")])


def _console_script() -> list[str]:
    exe = shutil.which("reflora-analysis")
    return [exe] if exe else [sys.executable, "-m", "reflora_analysis.cli"]


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path):
    """One subprocess (each pays a ~3 s torch import); bad input is covered in-process above."""
    out = tmp_path / "run.jsonl"
    good = subprocess.run(_console_script() + ["train", "--task", "mf", "--method", "reflora-s",
                                                "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr, good.stderr
    assert [r["step"] for r in read_json_lines(out)] == [0, 1, 2, 3]


def test_probe_command_honours_the_runs_warmup(capsys):
    # Inside RefLoRA's warm-up the step taken is plain LoRA's, so the consistency probe
    # must score LoRA (clearly non-zero spread), and after it RefLoRA (~1e-15).
    def consistency(*extra):
        status, out, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "consistency",
                                   "--method", "reflora", "--json", *extra)
        assert status == 0, err
        return json.loads(out)

    inside = consistency("--step", "2", "--hparam", "warmup_steps=5")
    after = consistency("--step", "5", "--hparam", "warmup_steps=5")
    assert inside["consistency/method_active"] == 0 and after["consistency/method_active"] == 1
    # tolerances: LoRA's spread on mf is O(1); RefLoRA's is float64 round-off (F6)
    assert inside["consistency/score"] > 1e-2 and after["consistency/score"] < 1e-8


# --- issue "Tried as a new user would" ---------------------------------------------------

def test_train_refuses_to_replace_an_earlier_run_unless_told(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    first = ["train", "--task", "mf", "--method", "lora", "--steps", "2", "--out", str(out),
             "--no-progress"]
    assert run_cli(capsys, *first)[0] == 0
    before = out.read_text()
    # a second run into the same --out: refused, one line naming both ways out, log untouched
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--steps", "3",
                           "--out", str(out), "--no-progress")
    assert_one_line_error(code, err, 2, "--resume")
    assert "--overwrite" in err and str(out) in err
    assert out.read_text() == before
    # both flags at once: refused by the parser, before anything runs
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--steps", "3",
                           "--out", str(out), "--resume", "--overwrite")
    assert_one_line_error(code, err, 2, "--overwrite")
    assert out.read_text() == before
    # --overwrite replaces it with the new run
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--steps", "3",
                           "--out", str(out), "--overwrite", "--no-progress")
    assert code == 0, err
    records = read_json_lines(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert {r["method"] for r in records} == {"reflora"}


def _probe_json(capsys, *argv):
    status, out, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "bound", "--json", *argv)
    assert status == 0, err
    values = json.loads(out)
    values.pop("bound/seconds")
    return values, err


def test_probe_defaults_to_the_method_lr_and_hparams_of_the_checkpoint(tmp_path, capsys):
    run_out = tmp_path / "run.jsonl"
    assert run_cli(capsys, "train", "--task", "mf", "--method", "reflora", "--lr", "0.005",
                   "--hparam", "warmup_steps=10", "--steps", "4", "--checkpoint-every", "4",
                   "--out", str(run_out), "--no-progress")[0] == 0
    ckpt = str(run_out.with_suffix(".ckpt.pt"))
    # at the checkpoint's step 4 the run was inside its 10-step warm-up: a plain LoRA step
    at_ckpt, _ = _probe_json(capsys, "--checkpoint", ckpt)
    assert (at_ckpt["method"], at_ckpt["optimizer"], at_ckpt["lr"]) == ("reflora", "sgd", 0.005)
    assert at_ckpt["step"] == 4 and at_ckpt["bound/method_active"] == 0
    # after the warm-up the reflora step is bounded, exactly as when everything is spelled out
    default, err = _probe_json(capsys, "--checkpoint", ckpt, "--step", "10")
    assert default["bound/method_active"] == 1 and "note" not in err
    explicit, _ = _probe_json(capsys, "--checkpoint", ckpt, "--step", "10", "--method", "reflora",
                              "--lr", "0.005", "--hparam", "warmup_steps=10")
    assert explicit == default
    # an explicit --method still wins, and says that it differs from the checkpoint's
    lora, err = _probe_json(capsys, "--checkpoint", ckpt, "--step", "10", "--method", "lora")
    assert lora["method"] == "lora" and lora["lr"] == 0.005
    assert "trained with 'reflora'" in err
    assert lora["bound/next_loss"] != default["bound/next_loss"]


@pytest.mark.parametrize("kind", ["text", "json", "foreign torch file"])
def test_probe_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, kind):
    path = tmp_path / f"wrong.{kind.split()[0]}"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "json":
        path.write_text(json.dumps({"step": 3, "loss": 1.0}))
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    code, _, err = run_cli(capsys, "probe", "--task", "mf", "--probe", "balance",
                           "--checkpoint", str(path))
    assert_one_line_error(code, err, 2, f"not a reflora-analysis checkpoint: {path} (")
    assert "weights_only" not in err and len(err) < 300, err


@pytest.mark.parametrize("text, value", [
    ("skip=None", None), ("skip=none", None), ("skip=null", None), ("use_dora=True", True),
    ("use_dora=false", False), ("lr=1e-3", 1e-3), ("betas=[0.9, 0.99]", [0.9, 0.99]),
    ("target_modules=q_proj,v_proj", "q_proj,v_proj")])
def test_key_value_settings_read_none_true_false_as_python_writes_them(text, value):
    assert parse_key_value(text) == (text.split("=")[0], value)


def test_lora_rite_skip_can_be_disabled_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    code, _, err = run_cli(capsys, "train", "--task", "mf", "--method", "lora-rite", "--steps", "2",
                           "--hparam", "skip=None", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert json.loads(out.with_suffix(".meta.json").read_text())["hparams"] == {"skip": None}


def test_listings_have_a_header_row(capsys):
    from reflora_analysis.methods import available_methods
    from reflora_analysis.tasks import available_tasks
    status, out, _ = run_cli(capsys, "methods")
    lines = out.strip().splitlines()
    assert status == 0 and lines[0].split() == ["METHOD", "INVARIANCE", "PAPER"]
    assert [line.split()[0] for line in lines[1:]] == available_methods()
    status, out, _ = run_cli(capsys, "tasks")
    lines = out.strip().splitlines()
    assert status == 0 and lines[0].split() == ["TASK", "SUMMARY"]
    assert [line.split()[0] for line in lines[1:]] == available_tasks()


def test_figures_help_states_the_measured_quick_time(capsys):
    status, out, _ = run_cli(capsys, "figures", "--help")
    assert status == 0
    text = " ".join(out.split())  # argparse wraps the help text
    assert "about 5 minutes on 2 CPU cores" in text
    assert "2.5 min" not in text


def _pyproject_version() -> str:
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    project = text[text.index("[project]"):]
    return re.search(r'(?m)^version\s*=\s*"([^"]+)"', project).group(1)


def test_version_flag(capsys):
    import reflora_analysis
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out.strip() == f"reflora-analysis {reflora_analysis.__version__}"
    assert reflora_analysis.__version__ == _pyproject_version()


def test_license_and_citation_metadata():
    from pathlib import Path

    import reflora_analysis
    root = Path(__file__).resolve().parents[1]
    license_text = (root / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the reflora-analysis authors" in license_text
    text = (root / "CITATION.cff").read_text()
    try:
        import yaml
    except ImportError:  # a light check of the same fields
        fields = dict(re.findall(r'(?m)^([a-z-]+):\s*"?([^"\n]*)"?\s*$', text))
        assert fields["cff-version"] == "1.2.0" and fields["version"] == reflora_analysis.__version__
        assert "2505.18877" in text and "Giannakis" in text
        return
    cff = yaml.safe_load(text)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == reflora_analysis.__version__ and cff["license"] == "MIT"
    paper = next(r for r in cff["references"] if "RefLoRA" in r["title"])
    assert [a["family-names"] for a in paper["authors"]] == ["Zhang", "Li", "Giannakis"]
    assert paper["year"] == 2025 and "NeurIPS 2025" in paper["collection-title"]
    assert any("2505.18877" in i["value"] for i in paper["identifiers"])


def _hf_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _hf_available(), reason="needs transformers and peft")
@pytest.mark.filterwarnings("ignore:reflora. singular")  # PEFT's zero start, expected here
def test_dora_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "dora.jsonl"
    code, _, err = run_cli(capsys, "train", "--task", "seq-cls", "--quick", "--set", "use_dora=true",
                           "--method", "reflora", "--hparam", "warmup_steps=1", "--steps", "2",
                           "--out", str(out), "--no-progress")
    assert code == 0, err
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["task_config"]["use_dora"] is True
    assert [r["step"] for r in read_json_lines(out)] == [0, 1, 2]


# ----------------------------------------------------- sweep, study, fetch (real evidence)

def test_sweep_and_study_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ["sweep", "--task", "mf", "--methods", "lora,reflora", "--lrs", "0.003,0.01",
            "--seeds", "0,1", "--steps", "4", "--optimizer", "sgd", "--out", str(out),
            "--no-progress"]
    status, _, err = run_cli(capsys, *grid)
    assert status == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert run_cli(capsys, *grid)[0] == 0  # resumed: a finished run is never re-run
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps


def test_sweep_and_study_refuse_bad_input_in_one_line(tmp_path, capsys):
    status, _, err = run_cli(capsys, "sweep", "--task", "mf", "--methods", "lora,nope",
                             "--lrs", "0.01", "--seeds", "0,1", "--steps", "2",
                             "--out", str(tmp_path / "s"))
    assert_one_line_error(status, err, 2, "unknown method 'nope'")
    status, _, err = run_cli(capsys, "study", str(tmp_path / "missing"), "--out",
                             str(tmp_path / "report"), "--title", "t")
    assert_one_line_error(status, err, 2, "missing")


def test_fetch_offline_with_nothing_cached_says_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REFLORA_ANALYSIS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("REFLORA_ANALYSIS_OFFLINE", "1")
    status, _, err = run_cli(capsys, "fetch", "vaderSentiment")
    assert_one_line_error(status, err, 1, "pip download")
