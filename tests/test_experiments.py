"""The experiments package: the shared sweep skeleton, quick presets, params.json, the timer.

Fast: the skeleton and the timer run with stubs (or a few steps of ``mf``), the presets
are checked on every notebook's :class:`~reflora_analysis.experiments.NotebookSpec` without
training anything. The notebooks themselves run in ``tests/test_notebooks.py``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from reflora_analysis import experiments as ex
from reflora_analysis.experiments import common, timing
from reflora_analysis.experiments import (bounds, causal_lm, consistency, convergence, mf, overhead,
                                         sharpness)
from reflora_analysis.experiments.notebook import Preset, Rule

ROOT = Path(__file__).resolve().parents[1]
OLD_PUBLIC = ["setup_notebook", "machine_info", "package_versions", "repository_root",
              "resolve_out_dir", "train_records", "run_mf_comparison", "bound_scan_experiment",
              "bound_tightness_experiment", "consistency_experiment", "balance_trajectories",
              "sharpness_over_training", "landscape_experiment", "real_model_convergence",
              "measure_overhead", "interleaved_step_times", "overhead_experiment",
              "REFACTOR_METHODS"]


def test_every_former_public_name_is_still_exported():
    missing = [name for name in OLD_PUBLIC if not hasattr(ex, name)]
    assert not missing
    assert set(ex.__all__) <= set(dir(ex))


def test_one_experiment_module_per_notebook():
    stems = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(ex.NOTEBOOKS) == stems
    for stem, module in ex.NOTEBOOKS.items():
        assert module.SPEC.notebook == stem
        assert callable(module.setup) and callable(module.experiment)


# --- the sweep skeleton ----------------------------------------------------------------------

class _FakeTask:
    def __init__(self, name, seed, options):
        self.name, self.seed, self.options = name, seed, options
        self.config = {"seed": seed, **options}
        self.default_lr = {"sgd": 0.5, "adamw": 0.01}


@pytest.fixture
def fake_training(monkeypatch):
    """make_task and train_records replaced: what each run was built and trained with."""
    calls = []

    def make_task(name, *, seed, device, quick, **options):
        calls.append(("task", name, seed, device, quick, options))
        return _FakeTask(name, seed, options)

    def train_records(task, method, *, steps, seed, lr, probes, **kw):
        calls.append(("train", method, seed, lr, len(probes), kw))
        records = [{"step": s, "loss": 1.0 / (s + 1), "lr": lr, "probe/x": 2 * s}
                   for s in range(steps + 1)]
        status = "diverged" if method == "bad" else "ok"
        return {"status": status, "message": "boom" if status != "ok" else "", "records": records}

    import reflora_analysis.tasks as tasks
    monkeypatch.setattr(tasks, "make_task", make_task)
    monkeypatch.setattr(common, "train_records", train_records)
    return calls


def test_sweep_runs_loops_seeds_multipliers_methods_and_collects(fake_training):
    swept = ex.sweep_runs(["lora", "bad"], task="mf", steps=2, seeds=[0, 3], quick=True,
                          task_options={"eval_examples": 8, "model_path": None},
                          lr_multipliers=[1.0, 2.0], probe_every=1,
                          collect=common.series_of({"loss": "loss", "x": "probe/x"}))
    order = [(r["seed"], r["multiplier"], r["method"]) for r in swept.runs]
    assert order == [(s, k, m) for s in (0, 3) for k in (1.0, 2.0) for m in ("lora", "bad")]
    first = swept.runs[0]
    assert first["step"] == [0, 1, 2] and first["x"] == [0.0, 2.0, 4.0]
    assert first["loss"] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [r["lr"] for r in swept.runs[:4]] == [0.5, 0.5, 1.0, 1.0]  # default lr x k
    assert swept.base_lr == 0.5 and swept.task_config == {"seed": 3, "eval_examples": 8}
    assert {r["status"] for r in swept.runs if r["method"] == "bad"} == {"diverged"}
    builds = [c for c in fake_training if c[0] == "task"]
    assert len(builds) == 8, "a fresh task for every run"
    assert all(c[4] is True and c[5] == {"eval_examples": 8} for c in builds)  # None dropped
    trains = [c for c in fake_training if c[0] == "train"]
    assert all(c[5] == {"probe_every": 1, "device": "cpu", "optimizer": "sgd"} for c in trains)


def test_sweep_runs_builds_fresh_probes_per_run(fake_training):
    built = []

    def probes():
        built.append(object())
        return [built[-1]]

    ex.sweep_runs(["lora"], task="mf", steps=1, seeds=[0, 1], probes=probes,
                  collect=common.series_of({}))
    assert len(built) == 2
    assert [c[4] for c in fake_training if c[0] == "train"] == [1, 1]


def test_report_failures_prints_the_runs_that_are_not_ok(capsys):
    runs = [{"method": "a", "status": "ok"}, {"method": "b", "status": "diverged"}]
    assert common.report_failures(runs, "{method}: {status}") == ["b: diverged"]
    assert capsys.readouterr().out == "b: diverged\n"


def test_write_data_writes_long_csv_and_strict_json(tmp_path):
    runs = [{"method": "lora", "seed": 0, "step": [0, 1], "loss": [1.0, math.inf]},
            {"method": "reflora", "seed": 0, "step": [0, 1, 2], "loss": [1.0, 0.5]}]
    table = common.long_table(runs, ["method", "seed"], ["step", "loss"], names=["t", "l"])
    common.write_data(tmp_path, "data", {"runs": runs}, {"table": table})
    with open(tmp_path / "table.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["method", "seed", "t", "l"] and len(rows) == 1 + 2 + 2  # zip: shortest
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads((tmp_path / "data.json").read_text(), parse_constant=refuse)
    assert isinstance(data["runs"][0]["loss"][1], str)  # non-finite stored as a string
    common.write_data(None, "data", {})  # no folder: nothing to do


def test_train_records_and_the_skeleton_on_a_real_task():
    swept = ex.sweep_runs(["lora", "reflora"], task="mf", steps=3, seeds=[0],
                          probes="balance", probe_every=1,
                          collect=common.balance_series(only_probed=True))
    assert [r["method"] for r in swept.runs] == ["lora", "reflora"]
    for r in swept.runs:
        assert r["status"] == "ok" and r["step"] == [0, 1, 2, 3]
        assert all(math.isfinite(v) for v in r["loss"] + r["balance_gap"])


def test_refactor_warmup_reaches_only_the_refactoring_methods(monkeypatch):
    seen = {}

    def fake_run(task, method, **kw):
        seen[method] = kw.get("warmup_steps")
        return [{"step": 0, "loss": 1.0}]

    import reflora_analysis.train as train
    monkeypatch.setattr(train, "run", fake_run)
    for method in ("lora", "reflora", "reflora-s", "balance"):
        common.train_records("mf", method, steps=1, refactor_warmup=4)
    assert seen == {"lora": None, "reflora": 4, "reflora-s": 4, "balance": 4}


# --- quick presets: one place, recorded as used ----------------------------------------------

def test_rules_only_shrink_or_fill():
    args = {"task": "nlu-minilm"}
    assert ex.at_most(40)(100, args) == 40 and ex.at_most(40)(3, args) == 3
    assert ex.at_least(10)(2, args) == 10 and ex.at_least(10)(20, args) == 20
    assert ex.first(1)([4, 5], args) == [4] and ex.fill(64)(None, args) == 64
    assert ex.fill(64)(16, args) == 16
    rule = ex.options_for_task("task", {"nlu-minilm": {"eval_examples": 64, "batch_size": 4}})
    assert rule({"batch_size": 2}, args) == {"eval_examples": 64, "batch_size": 2}
    assert rule({}, {"task": "mf"}) == {}
    with pytest.raises(TypeError, match="must be a Rule"):
        Preset(steps=lambda v, a: v)
    assert isinstance(mf.SPEC.quick["seeds"], Rule)


@pytest.mark.parametrize("module, given, used", [
    (mf, {}, {"seeds": [0]}),
    (bounds, {}, {"steps": 40, "n_etas": 40, "seed": 0}),
    (bounds, {"steps": 3, "seeds": [5]}, {"steps": 3, "seed": 5}),  # explicit small values kept
    (consistency, {}, {"seeds": [0, 1], "real_steps": 3, "n_reparam": 4,
                       "real_refactor_warmup": 1, "balance_seeds": [0], "real_seeds": [0],
                       "spread_steps": 20, "spread_reparam": 2,
                       "real_methods": ["lora", "reflora", "balance", "balora"],
                       "real_task_options": {"eval_examples": 16, "evaluate_test": False}}),
    (consistency, {"real_task": "seq-cls"}, {"real_task_options": {}}),
    (sharpness, {}, {"steps": 100, "probe_every": 20, "real_steps": 4, "real_probe_every": 4,
                     "trace_samples": 10, "real_trace_samples": 5, "real_tol": 0.01,
                     "real_max_iter": 6, "n_points": 31, "n_grid": 31, "real_n_points": 7,
                     "real_n_grid": 9, "real_layer_stride": 12, "real_layer_max_iter": 4,
                     "real_task_options": {
                         "batch_size": 4, "max_length": 32, "train_examples": 64,
                         "eval_examples": 16, "evaluate_test": False}}),
    (sharpness, {"probe_every": 2}, {"probe_every": 10}),
    (convergence, {}, {"tasks": convergence.VADER_TASKS, "methods": ["lora", "reflora"],
                       "lrs": [1e-3, 3e-3], "seeds": [0, 1], "test_seeds": [0, 1], "steps": 4,
                       "demonstration": True, "hparams": {"reflora:warmup_steps": 1},
                       "task_options": {"quick": True, "batch_size": 8, "max_length": 16,
                                        "eval_examples": 16, "evaluate_test": False}}),
    (convergence, {"eval_examples": 8, "methods": ["dora", "balance", "lora"]},
     {"eval_examples": 8, "methods": ["dora", "balance"], "hparams": {"balance:warmup_steps": 1}}),
    (causal_lm, {}, {"task": "lm-vader-movies", "methods": ["lora", "reflora"], "lrs": [1e-3],
                     "seeds": [0, 1], "test_seeds": [0, 1], "steps": 2, "demonstration": True,
                     "task_options": {"quick": True, "batch_size": 1, "max_length": 32,
                                      "eval_examples": 2, "evaluate_test": False}}),
    (overhead, {}, {"steps": 20, "warmup": 3, "repeats": 2, "seed": 0, "task": "vader-movies"}),
])
def test_quick_presets(module, given, used):
    params = module.SPEC.parameters_from(**given, quick=True)
    parameters, derived, changes = module.SPEC.resolve(params)
    args = {**parameters, **derived}
    assert {k: args[k] for k in used} == used
    for name, change in changes.items():
        assert change["used"] == args[name] and change["given"] != change["used"]


def test_full_mode_uses_the_parameters_as_given():
    params = sharpness.SPEC.parameters_from()
    parameters, derived, changes = sharpness.SPEC.resolve(params)
    assert parameters == params and changes == {}
    assert derived == {"seed": 0, "real_trace_samples": 15, "real_tol": 0.01,
                       "real_max_iter": None, "real_n_points": 21, "real_n_grid": 15,
                       "real_layer_stride": 1, "real_layer_max_iter": 20,
                       "real_task_options": {}}


def test_setup_records_the_arguments_used_not_the_literals(tmp_path):
    namespace = {**bounds.SPEC.parameters, "quick": True, "out_dir": str(tmp_path),
                 "unrelated": object()}  # a notebook's globals(): other names are ignored
    run = bounds.setup(namespace)
    assert run.out == tmp_path and run["steps"] == 40 and run["seed"] == 0
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["notebook"] == "02_upper_bounds"
    assert params["parameters"]["steps"] == 40 and params["parameters"]["n_etas"] == 40
    assert "out_dir" not in params["parameters"]
    small_real = {"train_examples": 64, "eval_examples": 16, "evaluate_test": False}
    assert params["derived"] == {"seed": 0, "real_task_options": small_real}
    assert params["quick_preset"] == {"steps": {"given": 100, "used": 40},
                                      "n_etas": {"given": 80, "used": 40},
                                      "real_steps": {"given": 10, "used": 3},
                                      "real_refactor_warmup": {"given": 3, "used": 1},
                                      "real_points": {"given": 5, "used": 3},
                                      "real_task_options": {"given": {}, "used": small_real}}
    assert params["seeds"] == [0] and params["versions"]["torch"]


def test_setup_refuses_missing_and_unknown_parameters(tmp_path):
    with pytest.raises(ValueError, match="parameters cell lacks"):
        mf.setup({"quick": True})
    with pytest.raises(ValueError, match="no parameter 'stepz'"):
        mf.setup(stepz=3, out_dir=str(tmp_path))


def test_experiment_passes_the_run_arguments(tmp_path, monkeypatch):
    seen = {}

    def fake(methods, **kw):
        seen.update(kw, methods=methods)
        return {"runs": []}

    monkeypatch.setattr(mf, "run_mf_comparison", fake)
    run = mf.setup(quick=True, steps=7, out_dir=str(tmp_path))
    mf.experiment(run)
    assert seen["seeds"] == [0] and seen["steps"] == 7 and seen["quick"] is True
    assert seen["out_dir"] == tmp_path and seen["methods"] is None


# --- the one timer ---------------------------------------------------------------------------

def test_round_robin_rotates_counts_and_times_only_the_timed_turns():
    calls, hooks = [], []
    ticks = iter(range(10_000))
    times = ex.round_robin({"a": lambda i: calls.append(("a", i)),
                            "b": lambda i: calls.append(("b", i))},
                           rounds=3, per_turn=2, warmup=1, clock=lambda: float(next(ticks)),
                           before_turn=lambda n, timed: hooks.append((n, timed)))
    assert calls[:2] == [("a", 0), ("b", 0)]  # warm-up: one untimed step each
    turns = [c[0] for c in calls[2::2]]
    assert turns == ["a", "b", "b", "a", "a", "b"]  # order rotated from round to round
    assert [i for n, i in calls if n == "a"] == [0, 1, 2, 3, 4, 5, 6]
    assert hooks[:2] == [("a", False), ("b", False)] and all(t for _, t in hooks[2:])
    assert len(times["a"].rounds) == 3 and all(len(r) == 2 for r in times["a"].rounds)
    assert times["a"].seconds == [1.0] * 6 and times["a"].median() == 1.0
    with pytest.raises(ValueError, match="per_turn >= 1"):
        ex.round_robin({"a": print}, rounds=1, per_turn=0)


def test_round_robin_times_optimizer_step_with_its_hooks():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    ticks = iter(range(10_000))

    def step(i):
        p.grad = torch.ones(3)
        opt.step()

    times = ex.round_robin({"sgd": step}, rounds=2, clock=lambda: float(next(ticks)),
                           time_optimizer=True)
    # clock reads per step: start, pre-hook, post-hook, end
    assert times["sgd"].seconds == [3.0, 3.0] and times["sgd"].optimizer_seconds == [1.0, 1.0]


def test_the_step_timer_exists_once():
    """Only timing.py reads a clock in the experiments; the benchmarks time with it."""
    for path in (ROOT / "reflora_analysis" / "experiments").glob("*.py"):
        text = path.read_text()
        if path.name != "timing.py":
            assert "perf_counter" not in text and "process_time" not in text, path.name
    for name in ("training_overhead.py", "refactor_overhead.py"):
        tree = ast.parse((ROOT / "benchmarks" / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "round_robin" in imported, name
        assert "perf_counter" not in (ROOT / "benchmarks" / name).read_text(), name


@pytest.fixture
def stub_train(monkeypatch):
    """train.build_run / train.train_step replaced by recorders."""
    import reflora_analysis.train as train
    built, stepped = [], []

    class Result:
        def __init__(self, step):
            self.step, self.loss, self.error = step, 0.5, None

    def build_run(config, task=None):
        built.append((config, task))
        return {"method": config.method, "task": task}

    def train_step(run, step):
        stepped.append((run["method"], step))
        return Result(step)

    monkeypatch.setattr(train, "build_run", build_run)
    monkeypatch.setattr(train, "train_step", train_step)
    return built, stepped


def test_overhead_times_train_step_round_robin_on_one_task(stub_train):
    built, stepped = stub_train
    times = ex.interleaved_step_times(["lora", "reflora"], task="mf", optimizer="sgd",
                                      steps=3, warmup=2)
    assert set(times) == {"lora", "reflora"} and all(len(v) == 3 for v in times.values())
    assert built[0][1] is built[1][1], "one task (one model) shared by every method"
    assert [c.method for c, _ in built] == ["lora", "reflora"]
    assert all(c.steps > 4 and c.optimizer == "sgd" for c, _ in built)  # no end step timed
    assert sorted(s for m, s in stepped if m == "lora") == [0, 1, 2, 3, 4]


def test_measure_overhead_uses_train_step(stub_train):
    _, stepped = stub_train
    result = ex.measure_overhead("lora", task="mf", optimizer="sgd", steps=3, warmup=1)
    assert stepped == [("lora", i) for i in range(4)]
    assert len(result["seconds_all"]) == 3 and result["final_loss"] == 0.5
    assert result["peak_memory_mb"] >= 0 and "RSS" in result["memory_kind"]


def test_run_step_raises_a_diverged_step(monkeypatch):
    import reflora_analysis.train as train

    class Bad:
        error = train.TrainingDiverged("loss is nan", step=0)

    monkeypatch.setattr(train, "train_step", lambda run, step: Bad())
    with pytest.raises(train.TrainingDiverged):
        timing.run_step(object(), 0)


def test_interleaved_step_times_on_the_real_training_step():
    times = ex.interleaved_step_times(["lora", "reflora-s"], task="mf", optimizer="sgd",
                                      steps=2, warmup=1)
    assert all(len(v) == 2 and all(s > 0 for s in v) for v in times.values())


# --- notebooks 05 and 07: the studies (sweep + protocol + report) ---------------------------

@pytest.mark.parametrize("module", [convergence, causal_lm])
def test_study_notebooks_full_mode_meets_the_protocol(module):
    """The defaults are the issue's protocol: >= 5 lrs over >= two decades, >= 3 tuning and
    >= 5 test seeds, LoRA first (the baseline); a model path reaches every run's task."""
    from reflora_analysis import sweep
    params = module.SPEC.parameters_from(model_path="/models/deberta-v3-base")
    parameters, derived, changes = module.SPEC.resolve(params)
    assert changes == {} and derived["demonstration"] is False
    lrs = parameters["lrs"]
    assert len(set(lrs)) >= 5 and max(lrs) / min(lrs) >= 100
    assert len(parameters["seeds"]) >= sweep.MIN_TUNE_SEEDS
    assert len(parameters["test_seeds"]) >= sweep.MIN_TEST_SEEDS
    assert parameters["methods"][0] == "lora"
    assert derived["task_options"]["model_path"] == "/models/deberta-v3-base"
    assert derived["task_options"]["quick"] is False
    # fewer seeds than the protocol's minimums: labelled a demonstration outside quick mode too
    assert module.SPEC.resolve(module.SPEC.parameters_from(seeds=[0, 1]))[1]["demonstration"]


def test_a_study_checks_every_task_before_the_first_run(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        convergence.real_model_convergence(["vader-movies", "nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        convergence.run_study([], ["lora"], lrs=[1e-3], seeds=[0], test_seeds=[0, 1], steps=1,
                              out_dir=tmp_path)
    with pytest.raises(ValueError, match="one task name"):
        causal_lm.causal_lm_study(["lm-vader-movies"], out_dir=tmp_path)
    assert not (tmp_path / "sweeps").exists()


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _check_study_folder(out: Path, task: str, data: dict, n_runs: int) -> None:
    """What notebooks 05 / 07 promise: the sweep, the paper-layout table, the per-task
    figures (captions labelled as a demonstration), the summary and the report."""
    folder = out / "sweeps" / task
    assert data["sweep_dirs"] == [f"sweeps/{task}"]  # relative: the folder may be moved
    readme = (out / "README.md").read_text()
    assert f"`sweeps/{task}`" in readme and str(out) not in readme
    assert json.loads((out / "study_data.json").read_text())["chosen_lr"] == data["chosen_lr"]
    results = _read_rows(folder / "results.csv")
    assert len(results) == n_runs and {r["status"] for r in results} == {"finished"}
    protocol = json.loads((folder / "protocol.json").read_text())
    assert protocol["demonstration"] is True
    assert set(protocol["selection"]["chosen_lr"]) == {"lora", "reflora"}
    assert all(lr in data["lrs"] for lr in protocol["selection"]["chosen_lr"].values())
    table = _read_rows(out / "paper_table.csv")
    assert [r["method"] for r in table] == ["lora", "reflora"]
    for r in table:  # one task: the Average column is that task's mean, a test accuracy
        assert r[f"{task}:split"] == "test" and r[f"{task}:metric"] == "accuracy"
        assert 0.0 <= float(r[f"{task}:mean"]) <= 1.0 and float(r["average"]) == float(r[f"{task}:mean"])
    assert "Average" in (out / "paper_table.md").read_text()
    manifest = json.loads((out / "figures.json").read_text())
    for stem in (f"loss_curves_{task}", f"lr_sensitivity_{task}"):
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.pdf").exists()
        assert manifest[stem]["caption"].startswith("Pipeline demonstration")
    summary = _read_rows(out / "study_summary.csv")
    assert [(r["task"], r["method"]) for r in summary] == [(task, "lora"), (task, "reflora")]
    assert readme.startswith("# PIPELINE DEMONSTRATION")


def test_encoder_study_on_a_tiny_grid_writes_table_curves_and_report(tmp_path):
    """Notebook 05's three calls on the real vader-movies data and MiniLM, tiny settings:
    2 methods x 2 lrs x 2 seeds, 1 step. A second call re-runs nothing (resumable)."""
    pytest.importorskip("peft")
    from reflora_analysis import plotting
    run = convergence.setup(quick=True, tasks=["vader-movies"], lrs=[1e-3, 1e-2], steps=1,
                            eval_examples=8, max_length=8, out_dir=str(tmp_path))
    data = convergence.experiment(run)
    plotting.publish_convergence(data, run.out)
    _check_study_folder(tmp_path, "vader-movies", data, n_runs=8)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("sweeps/*/runs/*/result.json")}
    again = convergence.experiment(run)
    assert again["chosen_lr"] == data["chosen_lr"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a finished run was re-run"


def test_causal_lm_study_on_a_tiny_random_llama(tmp_path):
    """Notebook 07's three calls with a tiny random LLaMA checkpoint instead of SmolLM2 (no
    540 MB cache needed) on the real lm-vader-movies sentences; the runs record the model."""
    pytest.importorskip("peft")
    from reflora_analysis import plotting
    from tiny_llama import tiny_llama_checkpoint  # tests/tiny_llama.py
    checkpoint = tiny_llama_checkpoint(tmp_path / "tiny-llama")
    run = causal_lm.setup(quick=True, model_path=str(checkpoint), out_dir=str(tmp_path / "out"))
    data = causal_lm.experiment(run)
    plotting.publish_causal_lm(data, run.out)
    _check_study_folder(tmp_path / "out", "lm-vader-movies", data, n_runs=4)
    metas = sorted((tmp_path / "out" / "sweeps").glob("*/runs/*/run.meta.json"))
    assert len(metas) == 4
    model = json.loads(metas[0].read_text())["task_config"]["model_info"]
    assert model["name"] == "tiny-llama" and model["parameters"] > 0
