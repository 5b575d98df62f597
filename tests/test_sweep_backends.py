"""Sweep backends (reflora_analysis.sweep.backends): local and Ray write the same results table.

The Ray test starts a local Ray with 2 CPUs in a module fixture (and shuts it down), runs a
tiny ``mf`` grid through ``reflora-analysis sweep --backend ray`` and the same grid with the
local backend, and compares the two ``results.csv`` tables. Ray is an optional extra
(``reflora-analysis[ray]``, part of ``[all]``); without it the Ray tests are skipped (the
one-line refusal of ``--backend ray`` is checked either way). Ray's own startup can fail on
an overloaded machine (its raylet gives the Python metrics agent a fixed 15 s); the fixture
then skips, saying so, and the driver's side of :class:`RayBackend` is still checked against
a stand-in for Ray (:class:`FakeRay`).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

from reflora_analysis import sweep
from reflora_analysis.sweep import backends

STEPS = 6
GRID = dict(methods=["lora", "reflora"], lrs=[0.01], seeds=[0, 1])
COMMON = dict(optimizer="sgd", progress=False, checkpoint_every=2)
#: measured on one machine, the columns that differ by backend (nothing else may)
MACHINE_COLUMNS = {"wall_time_s"}


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--task", "mf", "--methods", ",".join(GRID["methods"]), "--lrs", "0.01",
            "--seeds", "0,1", "--steps", str(STEPS), "--optimizer", "sgd", "--checkpoint-every", "2",
            "--no-progress", "--out", str(out), *extra]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_same_table(a: list[dict], b: list[dict]) -> None:
    """Same run ids in the same order, same statuses and text, and numbers equal to a relative
    1e-9: the table stores 10 significant digits, and the same run on another process (1 torch
    thread under Ray, this process's threads locally) may round its last digit differently."""
    assert [r["run_id"] for r in a] == [r["run_id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - MACHINE_COLUMNS:
            try:
                x, y = float(ra[key]), float(rb[key])
            except ValueError:
                assert ra[key] == rb[key], (ra["run_id"], key)
                continue
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9), (
                ra["run_id"], key, x, y)


class RecordingBackend:
    """Runs in this process, recording the run ids it was given."""

    name = "recording"

    def __init__(self):
        self.ran: list[str] = []

    def run(self, execute, specs, *, jobs, on_done):
        for spec in specs:
            self.ran.append(spec["run_id"])
            execute(spec)
            on_done(spec)


def test_the_backend_in_use_runs_the_grid(tmp_path):
    recording = RecordingBackend()
    with backends.use_backend(recording):
        rows = sweep.run_sweep("mf", GRID["methods"], [0.01], [0], STEPS, tmp_path / "a", **COMMON)
    assert recording.ran == [r["run_id"] for r in rows] and len(rows) == 2
    assert all(r["status"] == "finished" for r in rows)
    assert isinstance(backends.current_backend(), backends.LocalBackend)  # the context ended
    # an explicit backend wins over the context; a finished grid runs nothing again
    with backends.use_backend(RecordingBackend()):
        again = RecordingBackend()
        sweep.run_sweep("mf", GRID["methods"], [0.01], [0, 1], STEPS, tmp_path / "a",
                        backend=again, **COMMON)
    assert again.ran == [r.replace("__s0", "__s1") for r in recording.ran]


def test_bad_backend_requests_are_one_line_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown sweep backend 'dask'; valid: local, ray"):
        backends.make_backend("dask")
    with pytest.raises(ValueError, match="--address .* needs --backend ray"):
        backends.make_backend("local", address="auto")
    assert sweep.main(_argv(tmp_path / "x", "--address", "auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --backend ray" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written

    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    assert sweep.main(_argv(tmp_path / "y", "--backend", "ray")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'reflora-analysis[ray]'" in err, err


def test_a_ray_node_without_the_run_folder_says_so(tmp_path):
    spec = {"run_dir": str(tmp_path / "runs" / "missing"), "run_id": "missing"}
    with pytest.raises(RuntimeError, match="is not visible on Ray node .*shares"):
        backends._run_on_ray_worker(lambda s: "finished", spec, 1)


class FakeRef:
    """An object reference: hashable by identity, as Ray's are."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args


class FakeRay:
    """The slice of Ray's API that :class:`RayBackend` uses, running each task when it is
    waited for (in this process), and recording what was asked: it checks the driver's side
    (resources, the in-flight limit, init/shutdown) where a real Ray cannot start."""

    def __init__(self):
        self.initialised, self.init_calls, self.shutdowns = False, [], 0
        self.in_flight, self.most_in_flight, self.options = 0, 0, []

    def is_initialized(self):
        return self.initialised

    def init(self, address=None):
        self.initialised = True
        self.init_calls.append(address)

    def shutdown(self):
        self.initialised = False
        self.shutdowns += 1

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **resources):
                fake.options.append(resources)
                return self

            def remote(self, *args):
                fake.in_flight += 1
                fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                return FakeRef(fn, args)
        return Task()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        self.in_flight -= 1
        return ref.fn(*ref.args)

    def cancel(self, ref, force=False):
        pass


def test_ray_backend_driver_side_with_a_stand_in_for_ray(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is the optional extra reflora-analysis[ray]")
    backend = backends.RayBackend("ray://head:10001", max_in_flight=1)
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    rows = sweep.run_sweep("mf", GRID["methods"], [0.01], [0], STEPS, tmp_path / "r",
                           backend=backend, **COMMON)
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert fake.init_calls == ["ray://head:10001"] and fake.shutdowns == 1  # it started Ray
    assert fake.most_in_flight == 1
    assert fake.options == [{"num_cpus": 1, "num_gpus": 0}] * 2


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra reflora-analysis[ray]")
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # Ray's own startup, before any code of ours runs
            ray.shutdown()
            if attempt == 2:
                # the raylet allows its Python metrics agent a fixed 15 s to start (Ray issue
                # 65983); on an overloaded machine the agent misses it three times in a row
                pytest.skip(f"a local Ray did not start on this machine (3 tries): {exc}")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_and_local_backends_write_the_same_table(local_ray, tmp_path, capsys):
    local = tmp_path / "local"
    sweep.run_sweep("mf", GRID["methods"], GRID["lrs"], GRID["seeds"], STEPS, local,
                    backend="local", **COMMON)
    on_ray = tmp_path / "ray"
    assert sweep.main(_argv(on_ray, "--backend", "ray", "--baseline", "none")) == 0
    assert "4 runs" in capsys.readouterr().err
    assert local_ray.is_initialized()  # a Ray the caller started is left running
    a, b = _read_csv(local / "results.csv"), _read_csv(on_ray / "results.csv")
    assert len(a) == 4 and {r["status"] for r in a} == {"finished"}
    assert_same_table(a, b)


class RecordingRemote:
    """A backend that runs elsewhere (as Ray's does) and only records what it was given."""

    name, runs_here = "recording", False

    def __init__(self):
        self.specs = []

    def run(self, execute, specs, *, jobs, on_done):
        self.specs = list(specs)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_remote_backend_may_use_a_device_the_driver_lacks(tmp_path):
    # a CPU-only Ray head driving GPU workers: the up-front task check builds on the CPU
    remote = RecordingRemote()
    sweep.run_sweep("mf", ["lora"], [0.01], [0], STEPS, tmp_path / "remote", backend=remote,
                    device="cuda", **COMMON)
    assert [s["device"] for s in remote.specs] == ["cuda"]
    # run here, the same sweep is refused at once, naming the device
    with pytest.raises((ValueError, RuntimeError), match="(?i)cuda"):
        sweep.run_sweep("mf", ["lora"], [0.01], [0], STEPS, tmp_path / "local",
                        backend="local", device="cuda", **COMMON)
