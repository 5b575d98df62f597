"""Notebooks write to the repository's figures/, whichever folder they are executed from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflora_analysis import experiments as ex
from reflora_analysis.experiments import provenance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a kernel started from another folder
    monkeypatch.delenv("REFLORA_ANALYSIS_FIGURES", raising=False)
    return tmp_path


def test_default_and_relative_out_dirs_resolve_from_the_repository(elsewhere):
    assert ex.repository_root() == ROOT
    expected = ROOT / "figures" / "01_matrix_factorization"
    assert ex.resolve_out_dir(None, "01_matrix_factorization") == expected
    assert ex.resolve_out_dir("figures/01_matrix_factorization", None) == expected
    # the old notebooks' default, written relative to notebooks/, means the same folder
    assert ex.resolve_out_dir("../figures/01_matrix_factorization", None) == expected
    assert not str(ex.resolve_out_dir(None, "01_matrix_factorization")).startswith(str(elsewhere))


def test_absolute_out_dir_and_environment_override(elsewhere, monkeypatch):
    assert ex.resolve_out_dir(elsewhere / "mine", "01") == elsewhere / "mine"
    monkeypatch.setenv("REFLORA_ANALYSIS_FIGURES", str(elsewhere / "figs"))
    assert ex.resolve_out_dir(None, "02_upper_bounds") == elsewhere / "figs" / "02_upper_bounds"


def test_an_installed_package_without_a_checkout_asks_for_an_absolute_path(elsewhere, monkeypatch):
    # resolve_out_dir looks the checkout up in the module that defines both
    monkeypatch.setattr(provenance, "repository_root", lambda: None)
    with pytest.raises(ValueError, match="absolute path"):
        ex.resolve_out_dir(None, "01")
    with pytest.raises(ValueError, match="absolute path"):
        ex.resolve_out_dir("figures/01", None)


def test_setup_notebook_writes_params_where_resolved(elsewhere, monkeypatch):
    monkeypatch.setenv("REFLORA_ANALYSIS_FIGURES", str(elsewhere / "figs"))
    out = ex.setup_notebook(None, {"steps": 3}, seeds=[0], notebook="01_matrix_factorization")
    assert out == elsewhere / "figs" / "01_matrix_factorization"
    assert json.loads((out / "params.json").read_text())["parameters"] == {"steps": 3}


def test_no_notebook_defaults_to_a_path_relative_to_its_working_folder():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        (params,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        line = next(l for l in "".join(params["source"]).splitlines() if l.startswith("out_dir"))
        assert line.split("=", 1)[1].split("#")[0].strip() == "None", path.name
