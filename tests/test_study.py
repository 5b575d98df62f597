"""The study report (reflora_analysis.study) on two tiny real sweeps.

``mf`` runs the two-stage protocol (``tune_then_test``) with a test split added to the task
(test metric = 2 x validation metric, as in test_sweep); ``sensing`` runs one stage
(``run_sweep`` + ``summarize``, no test split: reported on validation). A few SGD steps each.
Table numbers are checked against hand computations on the results table, intervals against
:mod:`reflora_analysis.stats` on the same numbers.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest

from reflora_analysis import stats, study, sweep
from reflora_analysis.io import read_json

STEPS = 6
METHODS = ["lora", "reflora"]
LRS = [0.003, 0.01]
TUNE, TEST = [0, 1, 2], [0, 1, 2, 3, 4]
COMMON = dict(optimizer="sgd", progress=False)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """(mf folder, sensing folder), both finished and summarised."""
    root = tmp_path_factory.mktemp("study")
    import reflora_analysis.tasks as tasks
    real = tasks.make_task

    def with_test_split(*args, **kw):
        task = real(*args, **kw)
        task.evaluate_split = lambda split: {"relative_error": task.evaluate()["relative_error"]
                                             * (1.0 if split == "validation" else 2.0)}
        return task
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "make_task", with_test_split)
        sweep.tune_then_test("mf", METHODS, LRS, TUNE, TEST, STEPS, root / "mf", **COMMON)
    sweep.run_sweep("sensing", METHODS, [0.01], TUNE, STEPS, root / "sensing", **COMMON)
    sweep.summarize(root / "sensing")
    return root / "mf", root / "sensing"


@pytest.fixture(scope="module")
def report(sweeps, tmp_path_factory):
    """The report written through the command line; returns (out dir, study.json)."""
    out = tmp_path_factory.mktemp("report") / "study"
    argv = [str(sweeps[0]), str(sweeps[1]), "--out", str(out), "--title", "Tiny study",
            "--ema", "0.5", "--wall-time-s", "12.5"]
    assert study.command(argv) == 0
    return out, read_json(out / "study.json")


def _chosen_values(folder, method, column):
    """``column`` per report seed of ``method`` at its chosen lr, from the raw results table."""
    protocol = read_json(folder / "protocol.json")
    lr, seeds = protocol["selection"]["chosen_lr"][method], protocol["report"]["seeds"]
    rows = {r["seed"]: r for r in sweep.load_results(folder) if r["method"] == method and r["lr"] == lr}
    return [rows[s][column] for s in seeds]


def test_figures_are_written_as_png_and_pdf(report):
    out, record = report
    for task in ("mf", "sensing"):
        for name in ("loss_curves", "lr_sensitivity"):
            png, pdf = out / f"{name}_{task}.png", out / f"{name}_{task}.pdf"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
            assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
            assert record["files"]["figures"][f"{name}_{task}"]["png"] == png.name
    captions = {k: v["caption"] for k, v in record["files"]["figures"].items()}
    assert "interquartile range" in captions["loss_curves_mf"] and "EMA" in captions["loss_curves_mf"]
    assert "95% t interval" in captions["lr_sensitivity_mf"]


def test_loss_figure_options_and_bad_input(sweeps, tmp_path):
    paths = study.loss_curves_figure(sweeps[0], tmp_path / "loss.png", band="minmax", log_y=True)
    assert "min-max range" in paths["caption"] and "EMA" not in paths["caption"]
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "loss.pdf").is_file()
    paths = study.lr_sensitivity_figure(sweeps[1], tmp_path / "lr", band="minmax")
    assert "min-max range" in paths["caption"]
    with pytest.raises(ValueError, match="ema"):
        study.loss_curves_figure(sweeps[0], tmp_path / "x", ema=1.0)
    with pytest.raises(ValueError, match="band"):
        study.loss_curves_figure(sweeps[0], tmp_path / "x", band="sd")


def test_paper_table_rows_columns_and_average(sweeps, tmp_path):
    markdown, rows = study.paper_table(sweeps, out_dir=tmp_path)
    assert [r["method"] for r in rows] == ["lora", "reflora"]  # one row per method, baseline first
    header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
    assert header[0] == "Method" and header[-1] == "Average" and len(header) == 4
    assert header[1].startswith("mf: test relative_error")
    assert header[2].startswith("sensing: validation relative_error")
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 1 + len(rows)
    for r in rows:
        mf = statistics.fmean(_chosen_values(sweeps[0], r["method"], "test_relative_error"))
        se = statistics.fmean(_chosen_values(sweeps[1], r["method"], "val_relative_error"))
        assert r["mf:mean"] == pytest.approx(mf, rel=1e-9)
        assert r["sensing:mean"] == pytest.approx(se, rel=1e-9)
        assert r["average"] == pytest.approx((mf + se) / 2, rel=1e-9)
        assert r["mf:std"] == pytest.approx(statistics.stdev(
            _chosen_values(sweeps[0], r["method"], "test_relative_error")), rel=1e-9)
    assert (tmp_path / "paper_table.md").read_text() == markdown
    csv_header = (tmp_path / "paper_table.csv").read_text().splitlines()[0].split(",")
    assert csv_header == list(rows[0]) and "mf:diff_ci_low" in csv_header
    assert "different metrics or splits" in markdown  # test on mf, validation on sensing


def test_table_interval_matches_stats(sweeps):
    _, rows = study.paper_table(sweeps)
    ref = next(r for r in rows if r["method"] == "reflora")
    for folder, task, column in ((sweeps[0], "mf", "test_relative_error"),
                                 (sweeps[1], "sensing", "val_relative_error")):
        d = stats.paired_t_interval(_chosen_values(folder, "reflora", column),
                                    _chosen_values(folder, "lora", column))
        assert ref[f"{task}:diff"] == pytest.approx(d.mean, rel=1e-9)
        assert ref[f"{task}:diff_ci_low"] == pytest.approx(d.low, rel=1e-9)
        assert ref[f"{task}:diff_ci_high"] == pytest.approx(d.high, rel=1e-9)
        assert ref[f"{task}:verdict"] == stats.verdict(d, "min")
        assert ref[f"{task}:n_pairs"] == d.n
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["mf:verdict"] == "baseline" and lora["mf:diff"] == 0


_SENTENCE = re.compile(r"RefLoRA vs LoRA on (\S+): .*? difference ([^ ]+) \[([^,]+), ([^\]]+)\] "
                       r"\(95% CI, (\d+) paired seeds\): (better|worse|not separated)\.")


def test_sentences_state_the_interval_and_a_verdict_that_agrees_with_it(sweeps, report):
    _, rows = study.paper_table(sweeps)
    ref = next(r for r in rows if r["method"] == "reflora")
    sentences = study.study_sentences(sweeps)
    found = {}
    for s in sentences:
        m = _SENTENCE.match(s)
        if m:
            task, _, low, high, n, verdict = m.groups()
            low, high = float(low), float(high)  # rounding keeps the sign
            assert (verdict != "not separated") == (low > 0 or high < 0), s
            if verdict != "not separated":  # relative error: lower is better
                assert verdict == ("better" if high < 0 else "worse"), s
            assert verdict == ref[f"{task}:verdict"] and int(n) == ref[f"{task}:n_pairs"]
            found[task] = s
    assert set(found) == {"mf", "sensing"}
    assert any(s.startswith("Over 2 task(s), RefLoRA vs LoRA:") for s in sentences)
    readme = (report[0] / "README.md").read_text()
    assert readme.startswith("# Tiny study") and all(s.split("\n")[0] in readme for s in found.values())
    assert "no test split" in readme  # sensing's caveat, from the protocol


def test_speed_table_reuses_the_summary(sweeps):
    markdown, rows = study.speed_table(sweeps[0])
    assert [r["method"] for r in rows] == ["lora", "reflora"]
    chosen = read_json(sweeps[0] / "protocol.json")["selection"]["chosen_lr"]
    summary = {r["method"]: r for r in sweep.summarize(
        sweeps[0], write=False, report_seeds=TEST, selection_seeds=TUNE, chosen_lrs=chosen)["rows"]}
    for r in rows:
        for key in ("steps_to_target_mean", "steps_censored", "auc_mean", "auc_diff_ci_low"):
            assert json.dumps(r[key]) == json.dumps(summary[r["method"]][key])
    auc = stats.paired_t_interval(_chosen_values(sweeps[0], "reflora", "auc_loss"),
                                  _chosen_values(sweeps[0], "lora", "auc_loss"))
    assert rows[1]["auc_diff_mean"] == pytest.approx(auc.mean, rel=1e-9)
    assert rows[1]["auc_diff_ci_high"] == pytest.approx(auc.high, rel=1e-9)
    assert "| LoRA |" in markdown and "| RefLoRA |" in markdown


def test_study_json_records_parameters_machine_and_command(sweeps, report):
    out, record = report
    assert record["title"] == "Tiny study" and record["wall_time_s"] == 12.5
    assert record["command"].startswith("python -m reflora_analysis.study ")
    assert "--ema 0.5" in record["command"] and str(sweeps[1]) in record["command"]
    assert {"platform", "cpu", "cores", "torch"} <= set(record["machine"])
    mf, se = record["sweeps"]
    assert mf["task"] == "mf" and mf["settings"]["steps"] == STEPS and mf["protocol"] == "tune_then_test"
    protocol = read_json(sweeps[0] / "protocol.json")
    assert mf["selection"]["chosen_lr"] == protocol["selection"]["chosen_lr"]
    assert mf["report"]["seeds"] == TEST and mf["report"]["split"] == "test"
    assert se["report"]["split"] == "validation" and se["runs"] == len(METHODS) * len(TUNE)
    for name in record["files"]["tables"]:
        assert (out / name).is_file()


def test_missing_or_unfinished_sweep_is_a_clear_value_error(sweeps, tmp_path, capsys):
    with pytest.raises(ValueError, match="no sweep folder"):
        study.load_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a finished sweep folder.*sweep.json"):
        study.paper_table([tmp_path / "empty"])
    with pytest.raises(ValueError, match="non-empty list"):
        study.paper_table([])
    # a run of the report stage without its result (killed, or still running)
    broken = tmp_path / "broken"
    shutil.copytree(sweeps[0], broken)
    lr = read_json(broken / "protocol.json")["selection"]["chosen_lr"]["reflora"]
    run = sweep.run_id("mf", "reflora", "sgd", lr, 4)  # seed 4: a test seed only
    (broken / "runs" / run / "result.json").unlink()
    with pytest.raises(ValueError, match=f"unfinished.*{run}"):
        study.load_sweep(broken)
    # ... and one whose table records a failed run
    failed = tmp_path / "failed"
    shutil.copytree(sweeps[1], failed)
    table = read_json(failed / "results.json")
    table["rows"][0]["status"] = "failed"
    (failed / "results.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="unfinished.*failed"):
        study.load_sweep(failed)
    # no protocol yet (the sweep was never summarised)
    (failed / "protocol.json").unlink()
    with pytest.raises(ValueError, match="protocol.json"):
        study.load_sweep(failed)
    assert study.command([str(broken), "--out", str(tmp_path / "r"), "--title", "t"]) == 2
    assert "reflora-analysis: error:" in capsys.readouterr().err
    assert not (tmp_path / "r" / "study.json").exists()
