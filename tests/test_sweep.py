"""Sweeps (reflora_analysis.sweep) and the comparison statistics (reflora_analysis.stats).

Training tests use the ``mf`` task with a handful of SGD steps; one module-scoped sweep is
copied by the tests that modify a sweep folder. Statistics are checked against hand
computations (formulas written out here, scipy only for the t quantile).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
from scipy import stats as st

from reflora_analysis import stats, sweep, train
from reflora_analysis.io import read_json

STEPS = 6
CKPT = 2
METHODS = ["lora", "reflora"]
LRS = [0.005, 0.01]
SEEDS = [0, 1, 2]
COMMON = dict(optimizer="sgd", progress=False, checkpoint_every=CKPT)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _strip(rows, drop=("wall_time_s",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def assert_tables_equal(a, b, drop=("wall_time_s",)):
    a, b = _strip(a, drop), _strip(b, drop)
    assert [r["run_id"] for r in a] == [r["run_id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        diff = {k: (ra[k], rb[k]) for k in ra if not _same(ra[k], rb[k])}
        assert not diff, f"{ra['run_id']}: {diff}"


class CountingRun:
    """Stands in for ``train.run``: records each call's run folder and resume flag."""

    def __init__(self, monkeypatch, interrupt_call: int | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.real = train.run
        self.interrupt_call = interrupt_call
        monkeypatch.setattr(train, "run", self)

    def __call__(self, task, method, **kw):
        self.calls.append((kw["out"].parent.name, kw["resume"]))
        if self.interrupt_call is not None and len(self.calls) == self.interrupt_call:
            loss = task.loss

            def interrupted(batch, _loss=loss):
                raise KeyboardInterrupt  # "Ctrl-C" in the middle of this run

            # interrupt after the checkpoint at step CKPT: a real mid-run kill
            real_batch = task.batch

            def batch(t):
                if t == CKPT + 1:
                    task.loss = interrupted
                return real_batch(t)
            task.batch = batch
        return self.real(task, method, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished sweep: lora and reflora x 2 lrs x 3 seeds on mf."""
    out = tmp_path_factory.mktemp("sweep") / "base"
    rows = sweep.run_sweep("mf", METHODS, LRS, SEEDS, STEPS, out, **COMMON)
    return out, rows


@pytest.fixture
def copy_of_base(base, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(base[0], out)
    return out


# ---- run ids and the table ------------------------------------------------------------------

def test_run_ids_are_deterministic_and_readable():
    assert sweep.run_id("mf", "lora", "adamw", 0.05, 0) == "mf__lora__adamw__lr0.05__s0"
    assert sweep.run_id("mf", "reflora", "sgd", 1e-4, 12) == "mf__reflora__sgd__lr0.0001__s12"
    assert sweep.run_id("mf", "lora", "sgd", 0.01, 3) == sweep.run_id("mf", "lora", "sgd", 0.010, 3)
    assert sweep.run_id("mf", "lora", "sgd", 0.01, 3) != sweep.run_id("mf", "lora", "sgd", 0.02, 3)


def test_table_has_one_row_per_run_with_the_columns(base):
    out, rows = base
    assert len(rows) == len(METHODS) * len(LRS) * len(SEEDS)
    expected_ids = sorted(sweep.run_id("mf", m, "sgd", lr, s) for m in METHODS for lr in LRS for s in SEEDS)
    assert sorted(r["run_id"] for r in rows) == expected_ids
    for column in sweep.RESULT_COLUMNS + ["val_relative_error", "val_loss", "test_relative_error"]:
        assert all(column in r for r in rows), column
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == STEPS and r["final_step"] == STEPS
        assert (out / r["run_dir"] / "run.jsonl").is_file()
        curve = sweep.load_curves(out, [r])[r["run_id"]]
        assert len(curve) == STEPS + 1
        assert r["final_loss"] == pytest.approx(curve[-1], rel=1e-9)
        assert r["auc_loss"] == pytest.approx(sum(curve) / len(curve), rel=1e-9)
        k = stats.smooth_window(STEPS)
        assert r["smooth_window"] == k
        assert r["smoothed_final_loss"] == pytest.approx(sum(curve[-k:]) / k, rel=1e-9)
        assert r["val_relative_error"] > 0 and math.isnan(r["test_relative_error"])  # mf: no test split
    # the files hold the same table
    assert_tables_equal(sweep.load_results(out), rows, drop=())
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:len(sweep.RESULT_COLUMNS)] == sweep.RESULT_COLUMNS
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 1
    assert read_json(out / "sweep.json")["steps"] == STEPS


# ---- resume ------------------------------------------------------------------------------------

def test_rerun_of_a_finished_sweep_runs_nothing(copy_of_base, base, monkeypatch):
    counter = CountingRun(monkeypatch)
    rows = sweep.run_sweep("mf", METHODS, LRS, SEEDS, STEPS, copy_of_base, **COMMON)
    assert counter.calls == []
    assert_tables_equal(rows, base[1], drop=())


def test_resume_reruns_only_the_deleted_and_the_unfinished_run(copy_of_base, base, monkeypatch):
    out = copy_of_base
    deleted = sweep.run_id("mf", "lora", "sgd", 0.01, 1)
    unfinished = sweep.run_id("mf", "reflora", "sgd", 0.005, 2)
    shutil.rmtree(out / "runs" / deleted)
    meta_file = out / "runs" / unfinished / "run.meta.json"
    meta = json.loads(meta_file.read_text())
    meta["status"] = "running"  # as a killed process leaves it
    meta_file.write_text(json.dumps(meta))
    counter = CountingRun(monkeypatch)
    rows = sweep.run_sweep("mf", METHODS, LRS, SEEDS, STEPS, out, **COMMON)
    assert sorted(counter.calls) == sorted([(deleted, False), (unfinished, True)])
    assert_tables_equal(rows, base[1])
    assert_tables_equal(sweep.load_results(out), base[1])


def test_a_killed_sweep_keeps_its_finished_runs(base, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    grid = dict(methods=["lora"], lrs=LRS, seeds=SEEDS[:2])  # 4 runs
    counter = CountingRun(monkeypatch, interrupt_call=3)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep("mf", grid["methods"], grid["lrs"], grid["seeds"], STEPS, out, **COMMON)
    kept = sweep.load_results(out)
    assert len(kept) == 2 and all(r["status"] == "finished" for r in kept)
    third = counter.calls[2][0]
    assert not (out / "runs" / third / "result.json").exists()

    counter = CountingRun(monkeypatch)
    rows = sweep.run_sweep("mf", grid["methods"], grid["lrs"], grid["seeds"], STEPS, out, **COMMON)
    assert len(counter.calls) == 2
    assert counter.calls[0] == (third, True)  # resumed from its checkpoint
    expected = [r for r in base[1] if r["method"] == "lora" and r["seed"] in grid["seeds"]]
    assert_tables_equal(rows, expected)


def test_two_jobs_give_the_same_table(base, tmp_path):
    out = tmp_path / "jobs2"
    rows = sweep.run_sweep("mf", ["lora", "reflora"], [0.01], [1], STEPS, out, jobs=2, **COMMON)
    expected = [r for r in base[1] if r["lr"] == 0.01 and r["seed"] == 1]
    assert_tables_equal(rows, expected)


def test_a_diverging_run_is_recorded_not_raised(tmp_path):
    rows = sweep.run_sweep("mf", ["lora"], [0.03], [0], 15, tmp_path / "div", **COMMON)
    (row,) = rows
    assert row["status"] == "diverged"
    assert row["message"]
    assert not math.isfinite(row["smoothed_final_loss"]) and not math.isfinite(row["auc_loss"])
    (again,) = sweep.load_results(tmp_path / "div")
    assert again["status"] == "diverged" and not math.isfinite(again["auc_loss"])


def test_tasks_with_a_test_split_fill_the_test_columns(tmp_path, monkeypatch):
    """The adapter asks ``evaluate_split("validation")`` / ``("test")`` when a task has it."""
    import reflora_analysis.tasks as tasks
    real = tasks.make_task

    def with_splits(*args, **kw):
        task = real(*args, **kw)
        task.evaluate_split = lambda split: {"relative_error": task.evaluate()["relative_error"]
                                             * (1.0 if split == "validation" else 2.0)}
        return task
    monkeypatch.setattr(tasks, "make_task", with_splits)
    rows = sweep.run_sweep("mf", ["lora"], [0.01], [0, 1], STEPS, tmp_path / "splits", **COMMON)
    for r in rows:
        assert r["test_relative_error"] == pytest.approx(2 * r["val_relative_error"])
        assert "val_loss" not in r  # only what evaluate_split reports
    summary = sweep.summarize(tmp_path / "splits", baseline=None)
    assert summary["protocol"]["report"]["split"] == "test"
    assert summary["rows"][0]["mean"] == pytest.approx(statistics.fmean(r["test_relative_error"] for r in rows))


def test_evaluate_splits_adapter():
    from types import SimpleNamespace
    plain = SimpleNamespace(evaluate=lambda: {"accuracy": 0.5})
    assert sweep.evaluate_splits(plain) == {"validation": {"accuracy": 0.5}, "test": None}
    split = SimpleNamespace(evaluate=lambda: {}, evaluate_split=lambda s: {"accuracy": len(s)})
    assert sweep.evaluate_splits(split) == {"validation": {"accuracy": 10.0}, "test": {"accuracy": 4.0}}
    none = SimpleNamespace(evaluate=lambda: {"accuracy": 0.5}, evaluate_split=None)
    assert sweep.evaluate_splits(none)["test"] is None


def test_hyperparameters_apply_to_every_method_or_one():
    per = sweep._method_hparams(["lora", "reflora"], "sgd", {"reflora:damping": 1e-6, "momentum": 0.9})
    assert per == {"lora": {"momentum": 0.9}, "reflora": {"damping": 1e-6, "momentum": 0.9}}


def test_command_line(copy_of_base, monkeypatch, capsys):
    counter = CountingRun(monkeypatch)
    argv = ["--task", "mf", "--methods", "lora,reflora", "--lrs", "0.005,0.01", "--seeds", "0,1,2",
            "--steps", str(STEPS), "--out", str(copy_of_base), "--optimizer", "sgd",
            "--checkpoint-every", str(CKPT), "--no-progress"]
    assert sweep.main(argv) == 0
    assert counter.calls == []  # everything was done already
    out, err = capsys.readouterr()
    assert out.startswith("# mf: lora, reflora") and "| reflora |" in out
    assert "12 runs" in err
    assert (copy_of_base / "summary.csv").is_file() and (copy_of_base / "protocol.json").is_file()
    assert sweep.main(argv[:5] + ["0.01,0"] + argv[6:]) == 2
    assert "must be finite numbers > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a list of numbers
        sweep.main(argv[:5] + ["0.1,x"] + argv[6:])


# ---- two-stage protocol ----------------------------------------------------------------------

def test_tune_then_test_reuses_overlapping_seeds_and_reports(copy_of_base, base, monkeypatch):
    out = copy_of_base
    counter = CountingRun(monkeypatch)
    summary = sweep.tune_then_test("mf", METHODS, LRS, SEEDS, [0, 1, 2, 3, 4], STEPS, out, **COMMON)
    # stage 1 is the base sweep (done); stage 2 only adds seeds 3 and 4 at the chosen lrs
    chosen = summary["protocol"]["selection"]["chosen_lr"]
    assert sorted(counter.calls) == sorted(
        (sweep.run_id("mf", m, "sgd", chosen[m], s), False) for m in METHODS for s in (3, 4))
    # the chosen lr is the best mean validation relative error (lower is better) on seeds 0..2
    for m in METHODS:
        means = {lr: statistics.fmean(r["val_relative_error"] for r in base[1]
                                      if r["method"] == m and r["lr"] == lr) for lr in LRS}
        assert chosen[m] == min(means, key=means.get)
    by_method = {r["method"]: r for r in summary["rows"]}
    assert by_method["lora"]["verdict"] == "baseline"
    assert by_method["reflora"]["verdict"] in ("better", "worse", "not separated")
    assert by_method["reflora"]["n"] == 5 and by_method["reflora"]["n_pairs"] == 5
    assert summary["protocol"]["report"]["seeds"] == [0, 1, 2, 3, 4]
    assert summary["protocol"]["report"]["split"] == "validation"  # mf has no test split
    assert "no test split" in summary["protocol"]["report"]["warning"]
    protocol = read_json(out / "protocol.json")
    assert protocol["grid"]["tune_seeds"] == SEEDS and protocol["grid"]["reused_seeds"] == SEEDS
    assert protocol["selection"]["chosen_lr"] == chosen
    assert (out / "summary.md").read_text().startswith("# mf")
    assert (out / "summary.csv").read_text().splitlines()[0].split(",") == stats.SUMMARY_COLUMNS
    # resumable: a second call runs nothing and gives the same summary
    counter = CountingRun(monkeypatch)
    again = sweep.tune_then_test("mf", METHODS, LRS, SEEDS, [0, 1, 2, 3, 4], STEPS, out, **COMMON)
    assert counter.calls == []
    assert json.dumps(again["rows"]) == json.dumps(summary["rows"])


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(task="nope"), "unknown task"),
    (dict(methods=["lora", "nope"]), "unknown method"),
    (dict(methods=[]), "methods is empty"),
    (dict(lrs=[]), "lrs is empty"),
    (dict(lrs=[0.01, 0.0]), "> 0"),
    (dict(lrs=[-0.1]), "> 0"),
    (dict(lrs=[float("nan")]), "> 0"),
    (dict(seeds=[]), "seeds is empty"),
    (dict(seeds=[-1]), "seeds must be"),
    (dict(steps=0), "steps must be"),
    (dict(jobs=0), "jobs must be"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(hparams={"warmup_steps": 2}), "scope it"),
    (dict(hparams={"lora-pro:damping": 2}), "not swept"),
])
def test_bad_input_is_a_clear_value_error(tmp_path, monkeypatch, kwargs, match):
    counter = CountingRun(monkeypatch)
    args = dict(task="mf", methods=["lora", "reflora"], lrs=[0.01], seeds=[0, 1], steps=3,
                out_dir=tmp_path / "bad", jobs=1, optimizer="sgd")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(args.pop("task"), args.pop("methods"), args.pop("lrs"), args.pop("seeds"),
                        args.pop("steps"), args.pop("out_dir"), progress=False, **args)
    assert counter.calls == []


def test_bad_protocol_input(tmp_path, monkeypatch):
    counter = CountingRun(monkeypatch)
    with pytest.raises(ValueError, match="at least 3 distinct tune seeds"):
        sweep.tune_then_test("mf", METHODS, LRS, [0, 1], [0, 1, 2, 3, 4], 3, tmp_path, **COMMON)
    with pytest.raises(ValueError, match="at least 5 distinct test seeds"):
        sweep.tune_then_test("mf", METHODS, LRS, [0, 1, 2], [0, 1, 2, 3], 3, tmp_path, **COMMON)
    with pytest.raises(ValueError, match="baseline"):
        sweep.tune_then_test("mf", ["reflora"], LRS, [0, 1, 2], [0, 1, 2, 3, 4], 3, tmp_path, **COMMON)
    assert counter.calls == []


def test_a_folder_of_another_sweep_is_refused(copy_of_base, monkeypatch):
    counter = CountingRun(monkeypatch)
    with pytest.raises(ValueError, match="other settings"):
        sweep.run_sweep("mf", METHODS, LRS, SEEDS, STEPS + 1, copy_of_base, **COMMON)
    assert counter.calls == []


# ---- statistics against hand computations -------------------------------------------------------

def test_t_interval_by_hand():
    iv = stats.t_interval([1, 2, 3, 4])
    s = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3)
    half = st.t.ppf(0.975, 3) * s / math.sqrt(4)
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.std == pytest.approx(s, rel=1e-12)
    assert iv.half_width == pytest.approx(half, rel=1e-12)
    assert (iv.low, iv.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert half == pytest.approx(2.0542, abs=1e-4)  # t_{0.975,3} = 3.1824, s = 1.2910
    ninety = stats.t_interval([1, 2, 3, 4], confidence=0.9)
    assert ninety.half_width == pytest.approx(st.t.ppf(0.95, 3) * s / 2, rel=1e-12)


def test_paired_interval_and_verdict_by_hand():
    d = stats.paired_t_interval([3, 5, 4], [1, 2, 2])  # differences 2, 3, 2
    mean, s = 7 / 3, math.sqrt(((2 - 7 / 3) ** 2 * 2 + (3 - 7 / 3) ** 2) / 2)
    half = st.t.ppf(0.975, 2) * s / math.sqrt(3)
    assert d.mean == pytest.approx(mean) and d.half_width == pytest.approx(half)
    assert d.low > 0
    assert stats.verdict(d, "max") == "better"
    assert stats.verdict(d, "min") == "worse"
    wide = stats.paired_t_interval([1, 3, 2], [2, 1, 2])  # -1, 2, 0: interval holds 0
    assert stats.verdict(wide, "max") == "not separated"


def test_statistics_refuse_too_few_values():
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        stats.t_interval([1.0, math.inf])
    with pytest.raises(ValueError, match="confidence"):
        stats.t_interval([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="direction"):
        stats.metric_direction("accuracy", "up")


def test_metric_direction_from_names():
    assert stats.metric_direction("accuracy") == "max"
    assert stats.metric_direction("val_relative_error") == "min"
    assert stats.metric_direction("test_loss") == "min"
    assert stats.metric_direction("loss", "max") == "max"


def test_steps_to_reach_by_hand():
    losses = [10, 8, 6, 4, 2]  # trailing means (window 2): 10, 9, 7, 5, 3
    assert stats.trailing_mean(losses, 2) == [10, 9, 7, 5, 3]
    assert stats.steps_to_reach(losses, 5.0, 2) == 3
    assert stats.steps_to_reach(losses, 9.5, 2) == 1
    assert stats.steps_to_reach(losses, 1.0, 2) == math.inf
    assert stats.steps_to_reach([10, math.nan, 1], 5.0, 1) == 2
    assert stats.smooth_window(6) == 1 and stats.smooth_window(250) == 25


# A hand-made table: baseline lora (one lr) and "new" (two lrs; the better-looking lr 0.2
# diverged on seed 2, so it is not eligible); steps 4, so the smoothing window is 1.
LORA_CURVES = {0: [4, 3, 2, 1.5, 1.0], 1: [4, 3, 2, 1.5, 1.2], 2: [4, 3, 2.5, 2, 1.4]}
NEW_CURVES = {0: [4, 2, 1, 0.5, 0.4], 1: [4, 2, 1.1, 0.9, 0.8], 2: [4, 3, 2, 1.8, 1.6]}


def _hand_rows():
    rows, curves = [], {}

    def add(method, lr, seed, status, val, test, curve):
        rid = f"{method}-{lr}-{seed}"
        finite = status == "finished"
        rows.append({"run_id": rid, "task": "toy", "optimizer": "sgd", "steps": 4, "method": method,
                     "lr": lr, "seed": seed, "status": status, "val_accuracy": val,
                     "test_accuracy": test,
                     "smoothed_final_loss": curve[-1] if finite else math.inf,
                     "auc_loss": sum(curve) / len(curve) if finite else math.inf})
        curves[rid] = curve

    for s, (val, test) in enumerate([(0.60, 0.50), (0.62, 0.55), (0.64, 0.60)]):
        add("lora", 0.1, s, "finished", val, test, LORA_CURVES[s])
    for s, (val, test) in enumerate([(0.70, 0.60), (0.70, 0.66), (0.70, 0.69)]):
        add("new", 0.1, s, "finished", val, test, NEW_CURVES[s])
    add("new", 0.2, 0, "finished", 0.9, 0.9, NEW_CURVES[0])
    add("new", 0.2, 1, "finished", 0.9, 0.9, NEW_CURVES[1])
    add("new", 0.2, 2, "diverged", math.nan, math.nan, [4, math.inf])
    return rows, curves


def test_select_lr_by_hand():
    rows, _ = _hand_rows()
    sel = stats.select_lr(rows, "new", "val_accuracy", "max", [0, 1, 2])
    assert sel["lr"] == 0.1 and sel["value"] == pytest.approx(0.70)
    per = {p["lr"]: p for p in sel["per_lr"]}
    assert not per[0.2]["eligible"] and "diverged" in per[0.2]["reason"]
    # on seeds 0 and 1 alone lr 0.2 is eligible and wins (0.9 > 0.7)
    assert stats.select_lr(rows, "new", "val_accuracy", "max", [0, 1])["lr"] == 0.2
    # lower is better: lr 0.1 (0.70) beats 0.2 (0.9) on seeds 0, 1
    assert stats.select_lr(rows, "new", "val_accuracy", "min", [0, 1])["lr"] == 0.1


def test_compare_by_hand():
    rows, curves = _hand_rows()
    summary = stats.compare(rows, curves=curves, metric="accuracy", baseline="lora")
    lora, new = summary["rows"]
    t2 = st.t.ppf(0.975, 2)
    # test accuracy at the chosen lr (0.1 for both)
    assert new["chosen_lr"] == 0.1 and lora["chosen_lr"] == 0.1
    assert summary["protocol"]["report"]["split"] == "test"
    vals = [0.60, 0.66, 0.69]
    m, s = sum(vals) / 3, statistics.stdev(vals)
    assert new["mean"] == pytest.approx(m) and new["std"] == pytest.approx(s)
    assert (new["ci_low"], new["ci_high"]) == pytest.approx((m - t2 * s / math.sqrt(3), m + t2 * s / math.sqrt(3)))
    # paired differences 0.10, 0.11, 0.09: mean 0.10, sd 0.01
    half = t2 * 0.01 / math.sqrt(3)
    assert new["diff_vs_baseline"] == pytest.approx(0.10)
    assert (new["diff_ci_low"], new["diff_ci_high"]) == pytest.approx((0.10 - half, 0.10 + half))
    assert new["verdict"] == "better" and new["n_pairs"] == 3
    assert lora["verdict"] == "baseline"
    # speed: targets are lora's final losses 1.0, 1.2, 1.4 (window 1); "new" reaches them at
    # steps 2, 2 and never (censored -> steps + 1 = 5); lora itself at step 4 each time
    assert new["steps_censored"] == 1
    steps_vals = [2, 2, 5]
    assert new["steps_to_target_mean"] == pytest.approx(3.0)
    sd = statistics.stdev(steps_vals)  # sqrt(3)
    assert new["steps_to_target_ci_high"] == pytest.approx(3 + t2 * sd / math.sqrt(3))
    assert new["steps_diff_mean"] == pytest.approx(-1.0)  # [-2, -2, 1]
    assert new["steps_diff_ci_low"] == pytest.approx(-1 - t2 * math.sqrt(3) / math.sqrt(3))
    assert lora["steps_to_target_mean"] == pytest.approx(4.0) and lora["steps_censored"] == 0
    assert "censored" not in lora["notes"] and "never reached" in new["notes"]
    # AUC = mean loss over steps 0..4
    auc_new = [sum(NEW_CURVES[s]) / 5 for s in range(3)]
    auc_lora = [sum(LORA_CURVES[s]) / 5 for s in range(3)]
    d = [a - b for a, b in zip(auc_new, auc_lora)]
    assert new["auc_mean"] == pytest.approx(statistics.fmean(auc_new))
    assert new["auc_diff_mean"] == pytest.approx(statistics.fmean(d))
    assert new["auc_diff_ci_high"] == pytest.approx(statistics.fmean(d) + t2 * statistics.stdev(d) / math.sqrt(3))
    # the Markdown page marks censored means as lower bounds
    md = stats.summary_markdown(summary)
    assert "| new | 0.1 |" in md and "≥ 3" in md and "better" in md


def test_compare_refuses_one_report_seed_and_unknown_names():
    rows, curves = _hand_rows()
    with pytest.raises(ValueError, match="at least 2 report seeds"):
        stats.compare(rows, curves=curves, report_seeds=[0])
    with pytest.raises(ValueError, match="baseline"):
        stats.compare(rows, baseline="lora-pro")
    with pytest.raises(ValueError, match="unknown metric"):
        stats.compare(rows, metric="bleu")
