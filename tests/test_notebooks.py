"""Notebooks, the papermill runner (``reflora_analysis.figures``) and the figure helpers.

The expensive test executes all seven notebooks through the runner with tiny parameters
(``TINY``) into ``tmp_path`` and checks every file each one promises: PNG + PDF figures,
the plotted data with finite numbers and one series per method, ``params.json`` (the
arguments as used) and ``index.md``. The rest is cheap: stored notebooks have no outputs,
exactly one ``parameters`` cell of literals (the same as their experiment module's) and no
logic elsewhere (setup, one experiment, one plot); the runner refuses unknown parameters and wrong types;
a failing notebook leaves the previous figures in place (issue 7); a Jupyter kernel starts
and runs a notebook's first cell; ``jupyter lab --version`` runs.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")

from reflora_analysis import figures, plotting  # noqa: E402

NOTEBOOKS = figures.NOTEBOOK_DIR
STEMS = ["01_matrix_factorization", "02_upper_bounds", "03_consistency_balance",
         "04_sharpness_landscape", "05_real_model_convergence", "06_overhead",
         "07_causal_lm_study"]
REQUIRED_PARAMETERS = {"quick", "device", "seeds", "steps", "out_dir"}

# Tiny settings: every code path of every notebook, in ~1-2 minutes on one core.
TINY = {
    "01_matrix_factorization": {"steps": 4, "seeds": [0]},
    "02_upper_bounds": {"steps": 3, "n_etas": 6, "iterates": [0, 2]},
    "03_consistency_balance": {"seeds": [0], "steps": 3, "n_reparam": 2,
                               "consistency_tasks": ["mf"], "real_task": None},
    "04_sharpness_landscape": {"steps": 4, "probe_every": 2, "trace_samples": 3,
                               "real_task": None, "n_points": 5, "n_grid": 3},
    "05_real_model_convergence": {"steps": 1, "seeds": [0, 1], "methods": ["lora", "reflora"],
                                  "tasks": ["vader-movies"], "lrs": [1e-3, 1e-2],
                                  "eval_examples": 8, "max_length": 8},
    "06_overhead": {"steps": 2, "warmup": 1, "repeats": 1, "methods": ["lora", "reflora-s"],
                    "task": "mf", "optimizer": "sgd", "isolate": False},
    # model_path: a tiny random LLaMA checkpoint, written by the ``executed`` fixture
    "07_causal_lm_study": {"steps": 1, "eval_examples": 2},
}


def _methods():
    from reflora_analysis.methods import available_methods
    return set(available_methods())


# --- stored notebooks ----------------------------------------------------------------

def test_the_seven_notebooks_exist():
    assert figures.available_notebooks() == STEMS


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_committed_without_outputs_with_one_literal_parameters_cell(stem):
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{stem}: a code cell has stored outputs"
            assert cell.execution_count is None, f"{stem}: a code cell has an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{stem}: expected exactly one 'parameters' cell, got {len(tagged)}"
    names = set()
    for node in ast.parse(tagged[0].source).body:
        # literals only: papermill injects values, it does not recompute expressions
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        ast.literal_eval(node.value)
        names.add(node.targets[0].id)
    assert REQUIRED_PARAMETERS <= names, f"{stem}: missing {REQUIRED_PARAMETERS - names}"
    assert set(figures.notebook_parameters(stem)) == names  # papermill sees them all


# Outside the parameters cell a notebook only calls: setup, one experiment, one plot/publish.
LOGIC_NODES = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.FunctionDef,
               ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.With, ast.AsyncWith, ast.Try,
               ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Match,
               *([ast.TryStar] if hasattr(ast, "TryStar") else []))
MAX_CODE_CELLS = 4  # parameters, setup, experiment, figures


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_holds_no_logic_outside_its_parameters_cell(stem):
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) <= MAX_CODE_CELLS, f"{stem}: {len(code)} code cells (at most {MAX_CODE_CELLS})"
    for index, cell in enumerate(code):
        if "parameters" in cell.metadata.get("tags", []):
            continue
        tree = ast.parse(cell.source)
        logic = sorted({type(n).__name__ for n in ast.walk(tree) if isinstance(n, LOGIC_NODES)})
        assert not logic, f"{stem}, code cell {index}: {logic} belong in the experiment module"
        called = [getattr(n.func, "attr", getattr(n.func, "id", "")) for n in ast.walk(tree)
                  if isinstance(n, ast.Call)]
        writes = [name for name in called if name == "open" or "write" in name.lower()
                  or name.startswith("save")]
        assert not writes, f"{stem}, code cell {index}: writes files itself ({writes})"


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_parameters_are_its_experiment_modules(stem):
    """The parameters cell and the experiment module's SPEC declare the same names and
    defaults, and the setup cell hands the parameters to that module."""
    from reflora_analysis import experiments as ex

    module = ex.NOTEBOOKS[stem]
    assert figures.notebook_parameters(stem) == dict(module.SPEC.parameters)
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    short = module.__name__.rsplit(".", 1)[1]
    assert f"{short}.setup(globals())" in sources and f"{short}.experiment(run)" in sources


# --- runner: arguments ---------------------------------------------------------------

def test_runner_refuses_unknown_parameter_names_and_wrong_types(tmp_path):
    with pytest.raises(figures.NotebookParameterError, match=r"no parameter 'stepz'.*valid: .*steps"):
        figures.run_notebooks(["01"], out=tmp_path, params_override={"stepz": 3}, progress=False)
    with pytest.raises(figures.NotebookParameterError, match=r"'steps' must be int"):
        figures.run_notebooks(["01"], out=tmp_path, params_override={"steps": "3"}, progress=False)
    with pytest.raises(figures.NotebookParameterError, match=r"'quick' must be bool"):
        figures.check_parameters("01_matrix_factorization", {"quick": 1})
    with pytest.raises(ValueError, match=r"unknown notebook 'nope'; valid: 01_matrix"):
        figures.run_notebooks(["nope"], out=tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) after a bad argument"


def test_notebook_names_resolve():
    assert figures.resolve_notebook("05") == "05_real_model_convergence"
    assert figures.resolve_notebook("6") == "06_overhead"
    assert figures.resolve_notebook("upper_bounds") == "02_upper_bounds"
    assert figures.resolve_notebook("notebooks/04_sharpness_landscape.ipynb") == "04_sharpness_landscape"


def test_cli_bad_arguments_exit_2_with_one_line(capsys, tmp_path):
    assert figures.main(["--only", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown notebook 'nope'" in err[0] and "Traceback" not in err[0]
    assert figures.main(["--only", "01", "-p", "bogus=1", "--out", str(tmp_path)]) == 2
    assert "no parameter 'bogus'" in capsys.readouterr().err
    assert figures.main(["--device", "tpu", "--out", str(tmp_path)]) == 2


def test_missing_papermill_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "papermill", None)  # import papermill -> ImportError
    with pytest.raises(figures.MissingExtraError, match=r"reflora-analysis\[notebooks\]"):
        figures.run_notebooks(["01"], out=tmp_path, progress=False)
    assert figures.main(["--only", "01", "--out", str(tmp_path)]) == 2
    assert "pip install 'reflora-analysis[notebooks]'" in capsys.readouterr().err


@pytest.fixture
def no_execution(monkeypatch):
    """Replace the papermill execution by a recorder: what each notebook would have run with."""
    calls = {}

    def record(stem, notebook_dir, out, params, log_output):
        calls[stem] = dict(params)
        return {"dir": str(Path(out) / stem), "parameters": params, "status": "ok",
                "seconds": 0.0, "figures": []}

    monkeypatch.setattr(figures, "_execute_one", record)
    return calls


@pytest.mark.parametrize("param, why", [
    ("steps=5.5", "'steps' must be int"), ("steps=-5", "'steps' must be > 0"),
    ("steps=0", "'steps' must be > 0"), ("seeds=[0,-1]", "'seeds' must be a non-empty list of integers >= 0"),
    ("lr_multipliers=[0.0]", "numbers > 0")])
def test_cli_refuses_out_of_range_parameters_before_running(no_execution, capsys, tmp_path,
                                                             param, why):
    assert figures.main(["--only", "01", "-p", param, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reflora-analysis: error: notebook 01_matrix")
    assert why in err[0]
    assert no_execution == {} and not (tmp_path / "f").exists()


def test_parameter_rule_follows_the_defaults(no_execution, tmp_path):
    # a float parameter takes an int; a warm-up may be 0; a zero default (damping) stays >= 0
    figures.check_parameters("02_upper_bounds", {"eta_max": 2, "n_etas": 3})
    figures.check_parameters("05_real_model_convergence", {"refactor_warmup": 0})
    figures.check_parameters("03_consistency_balance", {"damping": 1e-3})
    for stem, bad in [("05_real_model_convergence", {"refactor_warmup": -1}),
                      ("03_consistency_balance", {"damping": -1e-3}),
                      ("02_upper_bounds", {"eta_min": 0.0})]:
        with pytest.raises(figures.NotebookParameterError, match=next(iter(bad))):
            figures.check_parameters(stem, bad)
    assert "must be > 0" in " ".join(figures._build_parser().format_help().split())


def test_a_parameter_goes_to_the_selected_notebooks_that_declare_it(no_execution, capsys, tmp_path):
    out = tmp_path / "f"
    assert figures.main(["--only", "01", "--only", "02", "-p", "n_etas=3", "-p", "steps=4",
                         "--out", str(out)]) == 0
    assert no_execution["02_upper_bounds"]["n_etas"] == 3
    assert "n_etas" not in no_execution["01_matrix_factorization"]
    assert no_execution["01_matrix_factorization"]["steps"] == no_execution["02_upper_bounds"]["steps"] == 4
    capsys.readouterr()
    # a name no selected notebook declares is refused, naming them and the valid names
    assert figures.main(["--only", "01", "--only", "02", "-p", "n_etaz=3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'n_etaz'" in err[0]
    assert "01_matrix_factorization, 02_upper_bounds" in err[0] and "n_etas" in err[0]
    # a parameter of a notebook that is not selected is not accepted either
    with pytest.raises(figures.NotebookParameterError, match="no parameter 'n_etas'"):
        figures.run_notebooks(["01"], out=out, params_override={"n_etas": 3}, progress=False)


def test_index_records_the_package_version(tmp_path):
    from reflora_analysis import __version__
    index = figures.write_index(tmp_path, stems=["01_matrix_factorization"]).read_text()
    assert f"reflora-analysis {__version__}" in index


# --- runner: a failing notebook keeps the previous figures (issue 7) -----------------

def _toy_notebook(directory: Path) -> None:
    """A two-cell notebook: writes a PNG, then fails when asked to."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        'quick = False\ndevice = "cpu"\nseeds = [0]\nsteps = 1\nout_dir = "out"\nfail = False')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import pathlib, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from reflora_analysis.plotting import save_figure\n"
        "fig, ax = plt.subplots(); ax.plot([0, steps], [0, 1])\n"
        "save_figure(fig, pathlib.Path(out_dir) / 'toy', {'caption': f'steps={steps}'})\n"
        "if fail:\n    raise RuntimeError('asked to fail')\n")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    directory.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, directory / "01_toy.ipynb")


def test_failing_notebook_leaves_previous_figures_and_exits_nonzero(tmp_path, capsys):
    nbdir, out = tmp_path / "nbs", tmp_path / "figs"
    _toy_notebook(nbdir)
    report = figures.run_notebooks(None, out=out, notebook_dir=nbdir, progress=False)
    assert report["01_toy"]["status"] == "ok"
    png = out / "01_toy" / "toy.png"
    before = png.read_bytes()
    assert (out / "01_toy" / "01_toy.ipynb").exists(), "executed notebook kept next to figures"
    assert "01_toy/toy.png" in (out / "index.md").read_text()

    report = figures.run_notebooks(None, out=out, notebook_dir=nbdir, progress=False,
                                   params_override={"fail": True, "steps": 5})
    entry = report["01_toy"]
    assert entry["status"] == "failed" and entry["kept_previous"]
    assert entry["error"]["ename"] == "RuntimeError" and "asked to fail" in entry["error"]["evalue"]
    # index in the executed notebook: parameters (0), papermill's injected parameters (1), body (2)
    assert entry["error"]["cell_index"] == 2
    assert png.read_bytes() == before, "the previous figure must survive a failed run"
    assert json.loads((out / "01_toy" / "figures.json").read_text())["toy"]["caption"] == "steps=1"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary dirs cleaned up"
    assert "Last run failed" in (out / "index.md").read_text()

    code = figures.main(["--notebooks", str(nbdir), "--out", str(out), "-p", "fail=True"])
    captured = capsys.readouterr()
    assert code == 1
    assert "01_toy" in captured.err and "RuntimeError: asked to fail" in captured.out
    assert "previous figures left in place" in captured.out


# --- Jupyter ----------------------------------------------------------------------------

def test_kernel_starts_and_runs_the_first_cell_of_a_notebook():
    from jupyter_client import KernelManager

    nb = nbformat.read(NOTEBOOKS / f"{STEMS[0]}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(NOTEBOOKS))
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(first.source + "\nprint(sorted(dir()))", timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def test_jupyter_lab_runs():
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--version"] if jupyter.exists() else [sys.executable, "-m", "jupyterlab", "--version"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()[0].isdigit()


# --- plotting helpers --------------------------------------------------------------------

def test_one_distinct_colour_per_method_and_stable_for_others():
    methods = _methods()
    assert methods <= set(plotting.METHOD_COLORS)
    colours = [plotting.method_color(m) for m in methods]
    assert len(set(colours)) == len(colours)
    assert plotting.method_color("my-method") == plotting.method_color("my-method")
    with pytest.raises(TypeError):
        plotting.method_color("")


def test_save_figure_is_byte_stable_with_source_date_epoch(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    plotting.apply_style()
    blobs = []
    for i in range(2):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [1, 4, 9], color=plotting.method_color("reflora"))
        paths = plotting.save_figure(fig, tmp_path / f"f{i}", {"caption": "c", "title": "t"})
        plt.close(fig)
        blobs.append((Path(paths["png"]).read_bytes(), Path(paths["pdf"]).read_bytes()))
    assert blobs[0] == blobs[1]
    assert b"CreationDate" in blobs[0][1] and b"20231114" in blobs[0][1]
    manifest = json.loads((tmp_path / "figures.json").read_text())
    assert set(manifest) == {"f0", "f1"} and manifest["f0"]["caption"] == "c"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- the seven notebooks, executed with tiny parameters ------------------------------------

def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _finite(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _check_series(path: Path, column: str, methods: set[str], *, key: str = "method",
                  require_all_finite: bool = False) -> list[dict]:
    rows = _read_csv(path)
    assert rows, f"{path.name} is empty"
    seen = {r[key] for r in rows}
    assert seen == methods, f"{path.name}: series {sorted(seen)} != methods {sorted(methods)}"
    for m in methods:
        vals = [r[column] for r in rows if r[key] == m]
        ok = [_finite(v) for v in vals]
        assert all(ok) if require_all_finite else any(ok), f"{path.name}: {m} {column} not finite"
    return rows


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from tiny_llama import tiny_llama_checkpoint  # tests/tiny_llama.py: no SmolLM2 cache needed
    out = tmp_path_factory.mktemp("figures")
    model = tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
    tiny = {**TINY, "07_causal_lm_study": {**TINY["07_causal_lm_study"], "model_path": str(model)}}
    # two worker processes (the parallel path of the runner); 06 runs alone afterwards
    report = figures.run_notebooks(None, quick=True, out=out, params_override=tiny,
                                   progress=False, threads=1, jobs=2)
    failed = {s: r["error"] for s, r in report.items() if r["status"] != "ok"}
    assert not failed, f"notebooks failed: {failed}"
    return out, report


@pytest.mark.slow
def test_every_notebook_writes_figures_data_and_params(executed):
    out, report = executed
    # notebooks 01/03 default to every optimizer of the factors: dora/full change the model
    from reflora_analysis.methods.registry import optimizer_methods
    methods = set(optimizer_methods())
    expected_pngs = {
        "01_matrix_factorization": {"mf_loss", "mf_balance"},
        "02_upper_bounds": {"bounds_vs_step_size", "bound_tightness"},
        "03_consistency_balance": {"consistency", "balance_trajectories"},
        "04_sharpness_landscape": {"sharpness", "landscape"},
        "05_real_model_convergence": {"loss_curves_vader-movies", "lr_sensitivity_vader-movies"},
        "06_overhead": {"overhead"},
        "07_causal_lm_study": {"loss_curves_lm-vader-movies", "lr_sensitivity_lm-vader-movies"},
    }
    for stem, stems in expected_pngs.items():
        d = out / stem
        for name in stems:
            for ext in ("png", "pdf"):
                f = d / f"{name}.{ext}"
                assert f.exists() and f.stat().st_size > 1000, f"{stem}: missing {f.name}"
        params = json.loads((d / "params.json").read_text())
        assert params["parameters"]["quick"] is True
        assert params["seeds"] and params["versions"]["torch"] and params["machine"]["cpu_count"]
        assert (d / f"{stem}.ipynb").exists(), f"{stem}: executed notebook not kept"
    # params.json records the arguments used (after the quick preset), not the literals
    params = json.loads((out / "04_sharpness_landscape" / "params.json").read_text())
    assert params["parameters"]["probe_every"] == 10 and params["parameters"]["steps"] == 4
    assert params["quick_preset"]["probe_every"] == {"given": 2, "used": 10}
    assert params["derived"]["real_trace_samples"] == 3
    assert (out / "03_consistency_balance" / "consistency_table.md").read_text().startswith("| method")

    # one series per method, finite numbers
    rows = _check_series(out / "01_matrix_factorization" / "mf_runs.csv", "loss", methods)
    assert {float(r["lr"]) for r in rows} == {0.01, 0.03}
    for stem_file, col in (("02_upper_bounds/bound_scan.csv", "U_relaxed"),
                           ("02_upper_bounds/bound_tightness.csv", "U_exact")):
        _check_series(out / stem_file, col, {"lora", "reflora"}, require_all_finite=True)
    cons = _check_series(out / "03_consistency_balance" / "consistency.csv", "score", methods,
                         require_all_finite=True)
    score = {r["method"]: float(r["score"]) for r in cons}
    assert score["reflora"] < 1e-10 < 1e-3 < score["lora"]  # F6 shows through the notebook
    _check_series(out / "03_consistency_balance" / "balance_mf.csv", "balance_gap", methods,
                  require_all_finite=True)
    sharp_methods = set(figures.notebook_parameters("04_sharpness_landscape")["methods"])
    assert {"lora", "reflora"} <= sharp_methods
    _check_series(out / "04_sharpness_landscape" / "sharpness.csv", "top_eigenvalue",
                  sharp_methods, require_all_finite=True)
    _check_series(out / "04_sharpness_landscape" / "landscape_1d.csv", "loss",
                  sharp_methods, require_all_finite=True)
    for stem, task, n_runs in (("05_real_model_convergence", "vader-movies", 8),
                               ("07_causal_lm_study", "lm-vader-movies", 4)):
        runs = _check_series(out / stem / "sweeps" / task / "results.csv", "val_accuracy",
                             {"lora", "reflora"}, require_all_finite=True)
        assert len(runs) == n_runs and {r["seed"] for r in runs} == {"0", "1"}
        table = _check_series(out / stem / "paper_table.csv", f"{task}:mean", {"lora", "reflora"},
                              require_all_finite=True)
        assert all(0.0 <= float(r[f"{task}:mean"]) <= 1.0 for r in table)
        assert "PIPELINE DEMONSTRATION" in (out / stem / "README.md").read_text()
    ovh = _check_series(out / "06_overhead" / "overhead.csv", "seconds_per_step",
                        {"lora", "reflora-s"}, require_all_finite=True)
    assert all(float(r["seconds_per_step"]) > 0 for r in ovh)


@pytest.mark.slow
def test_index_lists_every_figure_with_parameters(executed):
    out, _ = executed
    index = (out / "index.md").read_text()
    pngs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png"))
    assert len(pngs) >= 9
    for rel in pngs:
        assert f"]({rel})" in index, f"index.md does not link {rel}"
    assert "`quick=True`" in index and "seeds:" in index
