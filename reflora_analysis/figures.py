r"""Regenerate every figure: run the notebooks with papermill, index what they wrote.

``reflora-analysis figures [--quick] [--only NAME] [--device cpu|cuda] [--out figures/]``
(also ``python -m reflora_analysis.figures ...``) executes ``notebooks/NN_*.ipynb`` one
after the other, each into ``<out>/<notebook-stem>/`` next to its figures, data and
``params.json``, then writes ``<out>/index.md`` listing every figure.

Guarantees
----------
* **Parameters are checked before anything runs.** Papermill only warns about a parameter
  the notebook does not declare; here a name no selected notebook declares, or a value
  that does not fit the notebook's default (:data:`PARAMETER_RULE`: ``steps="10"``,
  ``steps=5.5``, ``steps=-5``), is an error naming the notebook, the parameter and the
  valid names (``papermill.inspect_notebook``). A ``{param: value}`` override goes to
  every selected notebook that declares ``param`` (``--only 01 --only 02 -p n_etas=3``
  sets ``n_etas`` of ``02`` only).
* **A failed notebook never destroys the previous figures.** Each notebook executes into a
  fresh temporary directory under ``<out>``; only on success is it swapped in place of
  ``<out>/<stem>`` (two renames on one filesystem). On failure the previous directory is
  untouched, the executed notebook with the traceback is kept in a temporary directory
  whose path is printed, and the runner goes on with the next notebook.
* **Exit status.** :func:`main` returns 0 when every notebook ran, 1 when any failed (each
  named with its cell index, exception name and message), 2 on bad arguments or a missing
  optional dependency (the message names the extra: ``pip install
  'reflora-analysis[notebooks]'``).

Each notebook runs in its own Jupyter kernel (``kernel_name="python3"``, the interpreter of
the caller's environment), with ``MPLBACKEND=Agg`` and the torch/OpenMP thread count set
through the environment (``--threads``; default: all cores).

Timing on a 2-core CPU: ``--quick`` for the first six notebooks, one at a time, took 288 s
(about 5 minutes, kernel start-ups included) on an idle machine, and up to 3x longer while
other processes load the cores; ``05`` and ``07`` have since become the encoder and
causal-LM studies (their quick modes: pipeline demonstrations, see :data:`EXPECTED_MINUTES`).
The full mode is dominated by ``05`` (4 tasks x 2 methods x 5 lrs x 3 seeds + 2 test seeds x
60 steps of MiniLM: hours on 2 CPU cores) and ``07`` (SmolLM2-135M: a GPU job). The
per-notebook values of :data:`EXPECTED_MINUTES` are relative costs, not guarantees.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .keyvalue import parse_key_value

__all__ = [
    "NOTEBOOK_DIR",
    "EXPECTED_MINUTES",
    "QUICK_MINUTES_2_CORES",
    "PARAMETER_RULE",
    "SERIAL_NOTEBOOKS",
    "NotebookParameterError",
    "MissingExtraError",
    "available_notebooks",
    "resolve_notebook",
    "notebook_parameters",
    "check_parameters",
    "run_notebooks",
    "write_index",
    "main",
]

#: ``notebooks/`` of the source tree this module belongs to
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

#: wall-clock minutes per notebook on the 2-core CPU this was developed on (Intel Xeon,
#: torch 2.13 CPU), measured 2026-11-28: quick one notebook at a time on an idle machine,
#: full with other load. ``05`` and ``07`` (2026-12-02): quick estimated from the CPU time
#: of a run on a heavily loaded machine (wall time there was several times longer); ``05``
#: full from the committed vader-movies study (77 min per task); ``07`` full is a GPU job
#: (None: not measured). GPU: not yet measured.
EXPECTED_MINUTES: dict[str, dict[str, float | None]] = {
    "01_matrix_factorization": {"quick": 0.3, "full_cpu": 0.75, "full_gpu": None},
    "02_upper_bounds": {"quick": 0.2, "full_cpu": 0.35, "full_gpu": None},
    "03_consistency_balance": {"quick": 0.4, "full_cpu": 4.5, "full_gpu": None},
    "04_sharpness_landscape": {"quick": 0.55, "full_cpu": 4.0, "full_gpu": None},
    "05_real_model_convergence": {"quick": 1.5, "full_cpu": 300.0, "full_gpu": None},
    "06_overhead": {"quick": 0.9, "full_cpu": 3.0, "full_gpu": None},
    "07_causal_lm_study": {"quick": 2.5, "full_cpu": None, "full_gpu": None},
}

#: wall-clock minutes of ``reflora-analysis figures --quick`` (all six notebooks, one at a
#: time, kernel start-ups included) on 2 idle CPU cores: 288 s measured; ``--help`` says it
QUICK_MINUTES_2_CORES = 5

#: notebooks that measure time or memory: never run next to another notebook
SERIAL_NOTEBOOKS = frozenset({"06_overhead"})

EXTRA_HINT = "pip install 'reflora-analysis[notebooks]'"


#: how an override is checked against the notebook's default (:func:`check_parameters`;
#: also printed by ``--help``)
PARAMETER_RULE = (
    "each value must fit the notebook's default: same type (an int parameter takes only "
    "integers; a float one takes any number); a number whose default is > 0 must be > 0 "
    "(except warm-up lengths, names ending in 'warmup', which may be 0) and one whose "
    "default is 0 must be >= 0; a list whose default is a non-empty list of numbers must be "
    "a non-empty list of such numbers, each checked by the same rule")


class NotebookParameterError(ValueError):
    """A parameter override the notebook does not declare, or that does not fit its default."""


class MissingExtraError(ImportError):
    """An optional dependency of the notebooks extra is not installed."""


_ERROR_PREFIX = "reflora-analysis: error: "  # the CLI's one-line error format


def _import_papermill():
    try:
        import papermill  # noqa: F401
    except ImportError as exc:  # exercised by monkeypatching in tests
        raise MissingExtraError(
            f"running the notebooks needs papermill ({exc.name or 'papermill'} is not "
            f"installed): {EXTRA_HINT}") from None
    return papermill


def _check_kernel() -> None:
    """The notebooks run in the ``python3`` kernel, i.e. ipykernel in this environment."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        raise MissingExtraError(f"running the notebooks needs jupyter_client: {EXTRA_HINT}") from None
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise MissingExtraError("no 'python3' Jupyter kernel (ipykernel is not installed in "
                                f"this environment): {EXTRA_HINT}") from None


def available_notebooks(notebook_dir: str | os.PathLike | None = None) -> list[str]:
    """Stems of the notebooks, in order (``["01_matrix_factorization", ...]``)."""
    directory = Path(notebook_dir) if notebook_dir is not None else NOTEBOOK_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"notebook directory {directory} does not exist")
    return sorted(p.stem for p in directory.glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(name: str, notebook_dir=None) -> str:
    """The notebook stem meant by ``name``: the stem, its number (``"05"``, ``"5"``), its
    title part (``"overhead"``) or the file name. Unknown -> ``ValueError`` listing valid.
    """
    valid = available_notebooks(notebook_dir)
    key = str(name).strip()
    key = key[:-len(".ipynb")] if key.endswith(".ipynb") else key
    key = Path(key).name
    for stem in valid:
        number, _, title = stem.partition("_")
        if key in (stem, number, title) or (key.isdigit() and int(key) == int(number)):
            return stem
    raise ValueError(f"unknown notebook {name!r}; valid: {', '.join(valid)}")


def notebook_parameters(stem: str, notebook_dir=None) -> dict[str, Any]:
    """``{name: default}`` of the notebook's ``parameters`` cell (``papermill.inspect_notebook``).

    Defaults are Python literals (the notebooks' convention); they are evaluated with
    :func:`ast.literal_eval` to check the types of overrides.
    """
    pm = _import_papermill()
    directory = Path(notebook_dir) if notebook_dir is not None else NOTEBOOK_DIR
    info = pm.inspect_notebook(str(directory / f"{stem}.ipynb"))
    params = {}
    for name, spec in info.items():
        try:
            params[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            params[name] = spec["default"]
    return params


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_ok(default: Any, value: Any) -> bool:
    """Is ``value`` of the type the notebook's default ``default`` has?"""
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int)  # 5.5 (or 5.0) where an integer count is expected: no
    if isinstance(default, float):
        return _is_number(value)  # 3 where 3.0 is expected is fine
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _number_problem(name: str, default: Any, value: Any) -> str | None:
    """What is wrong with ``value`` where a number, ``default``, is expected
    (:data:`PARAMETER_RULE`), or None."""
    if isinstance(default, int) and not isinstance(value, int) or not _is_number(value):
        kind = "an integer" if isinstance(default, int) else "a number"
        return f"must be {kind} like its default {default!r}, got {type(value).__name__} {value!r}"
    if default > 0 and name.endswith("warmup"):
        if not value >= 0:
            return f"must be >= 0 (a warm-up length), got {value!r}"
    elif default > 0 and not value > 0:
        return f"must be > 0 like its default {default!r}, got {value!r}"
    elif default == 0 and not value >= 0:
        return f"must be >= 0 like its default {default!r}, got {value!r}"
    return None


def _value_problem(name: str, default: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the notebook's ``default`` (:data:`PARAMETER_RULE`), or None."""
    if not _type_ok(default, value):
        return (f"must be {type(default).__name__} like its default {default!r}, "
                f"got {type(value).__name__} {value!r}")
    if value is None or default is None:
        return None
    if _is_number(default):
        return _number_problem(name, default, value)
    if isinstance(default, (list, tuple)) and default and all(map(_is_number, default)):
        # items are held to the weakest bound among the default's items: [0, 1, 2] allows 0
        weakest = min(default, key=lambda d: (d > 0, d))
        if not all(isinstance(d, int) for d in default):
            weakest = float(weakest)
        if not value or any(_number_problem(name, weakest, item) for item in value):
            kind = "integers" if isinstance(weakest, int) else "numbers"
            if name.endswith("warmup") and weakest > 0 or weakest == 0:
                kind += " >= 0"
            elif weakest > 0:
                kind += " > 0"
            return f"must be a non-empty list of {kind} like its default {list(default)!r}, got {value!r}"
    return None


def check_parameters(stem: str, overrides: Mapping[str, Any], notebook_dir=None, *,
                     declared: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`NotebookParameterError` on a name the notebook does not declare or a
    value that does not fit the declared default (:data:`PARAMETER_RULE`).

    ``declared``: the notebook's ``{name: default}`` if already read
    (:func:`notebook_parameters`).
    """
    declared = notebook_parameters(stem, notebook_dir) if declared is None else declared
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"notebook {stem} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(declared))}")
    for name, value in overrides.items():
        problem = _value_problem(name, declared[name], value)
        if problem is not None:
            raise NotebookParameterError(f"notebook {stem}: parameter {name!r} {problem}")


def _split_overrides(stems: Sequence[str], params_override, notebook_dir,
                     declared: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Per-notebook overrides from either ``{param: value}`` (each selected notebook that
    declares ``param``; a name none of them declares is an error) or
    ``{notebook: {param: value}}`` (checked per notebook by :func:`check_parameters`)."""
    per_nb: dict[str, dict] = {s: {} for s in stems}
    if not params_override:
        return per_nb
    if not isinstance(params_override, Mapping):
        raise TypeError(f"params_override must be a dict, got {type(params_override).__name__}")
    valid = available_notebooks(notebook_dir)
    nested = all(isinstance(v, Mapping) for v in params_override.values())
    if nested:
        for key, values in params_override.items():
            stem = resolve_notebook(key, notebook_dir)
            if stem in per_nb:
                per_nb[stem].update(values)
            elif stem not in valid:  # pragma: no cover - resolve_notebook raised already
                raise ValueError(f"unknown notebook {key!r}")
        return per_nb
    unknown = sorted(n for n in params_override if not any(n in declared[s] for s in stems))
    if unknown:
        names = ", ".join(map(repr, unknown))
        union = sorted(set().union(*(declared[s] for s in stems)))
        where = (f"notebook {stems[0]} has no parameter {names}" if len(stems) == 1 else
                 f"no selected notebook ({', '.join(stems)}) has a parameter {names}")
        raise NotebookParameterError(f"{where}; valid: {', '.join(union)}")
    for stem in stems:
        per_nb[stem].update({n: v for n, v in params_override.items() if n in declared[stem]})
    return per_nb


def _swap_in(new_dir: Path, target: Path) -> None:
    """Replace ``target`` by ``new_dir`` (same filesystem): rename old away, rename new in,
    delete old. A reader sees the old or the new directory, never a mixture."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    try:
        os.replace(new_dir, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_index(out: str | os.PathLike, stems: Sequence[str] | None = None,
                status: Mapping[str, dict] | None = None, notebook_dir=None) -> Path:
    """Write ``<out>/index.md``: every figure (relative link), its notebook, the notebook's
    parameters and seeds, and the status of the last run (``stems``: default every notebook;
    :func:`reflora_analysis.plotting.index.write_index`). Written atomically."""
    from .plotting.index import write_index as write

    return write(out, list(stems) if stems is not None else available_notebooks(notebook_dir),
                 status)


def run_notebooks(names: Sequence[str] | str | None = None, quick: bool = False,
                  device: str = "cpu", out: str | os.PathLike = "figures",
                  params_override: Mapping[str, Any] | None = None, *,
                  notebook_dir: str | os.PathLike | None = None, threads: int | None = None,
                  progress: bool = True, write_index_md: bool = True,
                  log_output: bool = False, jobs: int = 1) -> dict[str, dict]:
    """Execute notebooks with papermill into ``<out>/<stem>/``; return a per-notebook report.

    Parameters
    ----------
    names : notebook names (see :func:`resolve_notebook`); ``None`` runs all.
    quick, device : passed to every notebook as the ``quick`` and ``device`` parameters.
    out : directory of the figures; each notebook writes ``<out>/<stem>/``.
    params_override : ``{param: value}`` for every selected notebook that declares
        ``param``, or ``{notebook: {param: value}}``; checked by :func:`check_parameters`
        before anything runs (a name no selected notebook declares, a wrong type or an
        out-of-range value, :data:`PARAMETER_RULE`, raise :class:`NotebookParameterError`).
    threads : torch/OpenMP threads per kernel (environment ``OMP_NUM_THREADS``,
        ``MKL_NUM_THREADS``, ``REFLORA_NUM_THREADS``); default leaves torch's default.
    jobs : notebooks executed at the same time (worker processes, never threads:
        papermill's ``cwd`` is process-wide), each with ``threads`` (default: cores // jobs)
        threads. :data:`SERIAL_NOTEBOOKS` (the overhead measurement) always run afterwards,
        alone, with ``threads`` (default: torch's default, all cores).

    Returns ``{stem: {"status": "ok"|"failed", "seconds": float, "dir": str,
    "figures": [png paths], "error": {"cell_index", "ename", "evalue", "notebook"}}}``.
    A failing notebook does not stop the others and leaves its previous ``<out>/<stem>``
    in place.
    """
    _import_papermill()
    _check_kernel()
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    notebook_dir = Path(notebook_dir) if notebook_dir is not None else NOTEBOOK_DIR
    stems = _select(names, notebook_dir)
    declared = {stem: notebook_parameters(stem, notebook_dir) for stem in stems}
    overrides = _split_overrides(stems, params_override, notebook_dir, declared)
    for stem in stems:  # everything is checked before anything runs
        check_parameters(stem, {"quick": quick, "device": device, **overrides[stem]},
                         notebook_dir, declared=declared[stem])
    params = {stem: {"quick": bool(quick), "device": device, **overrides[stem]} for stem in stems}

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MPLBACKEND"] = "Agg"  # inherited by the kernels
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from tqdm.auto import tqdm

    args = {s: (s, str(notebook_dir), str(out), params[s], log_output) for s in stems}
    bar = tqdm(total=len(stems), desc="notebooks", unit="nb", disable=not progress,
               file=sys.stderr)
    report = _execute_all(args, int(jobs), threads, bar)
    bar.close()
    report = {s: report[s] for s in stems}
    if write_index_md:
        write_index(out, available_notebooks(notebook_dir), report, notebook_dir)
    return report


def _select(names, notebook_dir: Path) -> list[str]:
    """The notebook stems meant by ``names`` (``None``: all), in order, without repeats."""
    if names is None:
        stems = available_notebooks(notebook_dir)
    else:
        names = [names] if isinstance(names, str) else list(names)
        stems = list(dict.fromkeys(resolve_notebook(n, notebook_dir) for n in names))
    if not stems:
        raise ValueError(f"no notebooks found in {notebook_dir}")
    return stems


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFLORA_NUM_THREADS")


def _set_threads(n: int | None, saved: Mapping[str, str | None]) -> None:
    """Threads of the kernels started next (environment); ``None``: as ``saved``."""
    for var in _THREAD_VARS:
        if n is not None:
            os.environ[var] = str(int(n))
        elif saved[var] is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved[var]


def _execute_all(args: Mapping[str, tuple], jobs: int, threads: int | None, bar) -> dict[str, dict]:
    """Run every notebook (:func:`_execute_one`): with ``jobs > 1`` the others in worker
    processes first, each with ``threads`` (default cores // jobs), then
    :data:`SERIAL_NOTEBOOKS` alone with ``threads`` (default: torch's)."""
    report: dict[str, dict] = {}
    parallel = [s for s in args if s not in SERIAL_NOTEBOOKS] if jobs > 1 else []
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    try:
        if parallel:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            _set_threads(threads if threads is not None else max(1, (os.cpu_count() or 1) // jobs),
                         saved)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_execute_one, *args[s]): s for s in parallel}
                for fut in as_completed(futures):
                    report[futures[fut]] = fut.result()
                    bar.set_postfix_str(futures[fut])
                    bar.update(1)
        _set_threads(threads, saved)
        for stem in (s for s in args if s not in parallel):
            bar.set_postfix_str(stem)
            report[stem] = _execute_one(*args[stem])
            bar.update(1)
    finally:
        _set_threads(None, saved)
    return report


def _execute_one(stem: str, notebook_dir: str, out: str, params: dict,
                 log_output: bool) -> dict[str, Any]:
    """Execute one notebook into a fresh directory and swap it in on success (see module doc).

    Top-level (picklable) so that ``jobs > 1`` can run it in a worker process.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out, notebook_dir = Path(out), Path(notebook_dir)
    target = out / stem
    work = Path(tempfile.mkdtemp(prefix=f".{stem}.running-", dir=out))
    run_dir = work / stem
    run_dir.mkdir()
    params = {**params, "out_dir": str(run_dir)}
    executed = run_dir / f"{stem}.ipynb"
    start = time.perf_counter()
    entry: dict[str, Any] = {"dir": str(target), "parameters": params}
    try:
        pm.execute_notebook(str(notebook_dir / f"{stem}.ipynb"), str(executed),
                            parameters=params, kernel_name="python3",
                            progress_bar=False, log_output=log_output,
                            cwd=str(notebook_dir))
    except PapermillExecutionError as exc:
        entry.update(status="failed", error={"cell_index": exc.cell_index,
                                             "ename": exc.ename, "evalue": exc.evalue})
    except Exception as exc:  # kernel died, bad notebook file, ...
        text = str(exc)
        entry.update(status="failed", error={"cell_index": None, "ename": type(exc).__name__,
                                             "evalue": text.splitlines()[0] if text else ""})
    else:
        entry["status"] = "ok"
    entry["seconds"] = time.perf_counter() - start
    if entry["status"] == "ok":
        _swap_in(run_dir, target)
        shutil.rmtree(work, ignore_errors=True)
        entry["figures"] = sorted(str(p) for p in target.glob("*.png"))
    else:
        keep = Path(tempfile.mkdtemp(prefix=f"reflora-failed-{stem}-"))
        if executed.exists():
            shutil.copy2(executed, keep / executed.name)
        entry["error"]["notebook"] = str(keep / executed.name)
        shutil.rmtree(work, ignore_errors=True)
        entry["figures"] = sorted(str(p) for p in target.glob("*.png")) if target.exists() else []
        entry["kept_previous"] = target.exists()
    return entry


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflora-analysis figures",
        description="Run the notebooks with papermill and regenerate figures/ and figures/index.md.",
        epilog=f"Parameters (-p) are checked before anything runs: {PARAMETER_RULE}. A "
               "parameter goes to each selected notebook that declares it; one that no "
               "selected notebook declares is refused.")
    parser.add_argument("--quick", action="store_true",
                        help="small settings: all seven notebooks in about "
                             f"{QUICK_MINUTES_2_CORES} minutes on 2 CPU cores")
    parser.add_argument("--only", action="append", metavar="NAME", default=None,
                        help="run only this notebook (stem, number or title; repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default="figures", help="output directory (default figures/)")
    parser.add_argument("--param", "-p", action="append", type=parse_key_value, default=[],
                        metavar="NAME=VALUE",
                        help="override a notebook parameter (a Python literal, JSON, "
                             "none/true/false, else a string), e.g. -p steps=50; "
                             "see the rule below")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per notebook kernel (default: all cores; "
                             "with --jobs N: cores / N)")
    parser.add_argument("--jobs", "-j", type=int, default=1,
                        help="notebooks run at the same time (default 1); the overhead "
                             "notebook always runs alone, last")
    parser.add_argument("--notebooks", default=None, metavar="DIR",
                        help="directory of the notebooks (default: the package's notebooks/)")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    parser.add_argument("--log-output", action="store_true",
                        help="echo the notebooks' output while they run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``reflora-analysis figures`` entry point; returns the exit status (see module doc)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            for stem in available_notebooks(args.notebooks):
                print(stem)
            return 0
        overrides = dict(args.param)
        if args.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                print(f"{_ERROR_PREFIX}--device cuda asked for, but no CUDA device is available",
                      file=sys.stderr)
                return 2
        started = time.perf_counter()
        report = run_notebooks(args.only, quick=args.quick, device=args.device, out=args.out,
                               params_override=overrides or None, threads=args.threads,
                               log_output=args.log_output, notebook_dir=args.notebooks,
                               jobs=args.jobs)
    except (MissingExtraError, NotebookParameterError, ValueError, TypeError,
            FileNotFoundError) as exc:
        print(f"{_ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    failed = [s for s, r in report.items() if r["status"] != "ok"]
    for stem, r in report.items():
        if r["status"] == "ok":
            print(f"ok      {stem:30s} {r['seconds']:7.1f} s  {len(r['figures'])} figures -> {r['dir']}")
        else:
            e = r["error"]
            where = (f"cell {e['cell_index']} of the executed notebook"
                     if e.get("cell_index") is not None else "kernel")
            prev = ("previous figures left in place" if r.get("kept_previous")
                    else "no previous figures")
            print(f"FAILED  {stem:30s} {r['seconds']:7.1f} s  at {where}: {e['ename']}: "
                  f"{e['evalue']} ({prev}; executed notebook: {e.get('notebook')})")
    print(f"total {total:.1f} s; index: {Path(args.out) / 'index.md'}")
    if failed:
        print(f"{_ERROR_PREFIX}{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
