"""A demonstration study's figures say so in their titles, not only in their captions.

Notebooks 05 and 07 in quick mode (or with fewer seeds than the protocol's minimums) are
pipeline demonstrations: :func:`reflora_analysis.plotting.convergence.publish_study` passes
:func:`~reflora_analysis.plotting.convergence.demonstration_title_note` to
:func:`reflora_analysis.study.write_study_report`, which puts it on the last line of every
figure's title. A real study's titles are unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from reflora_analysis import study, sweep
from reflora_analysis.plotting.convergence import demonstration_title_note

torch.set_num_threads(1)

QUICK = "quick: pipeline demonstration, not evidence"


@pytest.mark.parametrize("data, note", [
    ({"demonstration": True, "task_options": {"quick": True, "batch_size": 8}}, QUICK),
    ({"demonstration": True, "task_options": {"quick": False}},
     "pipeline demonstration (fewer seeds than the protocol needs), not evidence"),
    ({"demonstration": True}, "pipeline demonstration (fewer seeds than the protocol needs), "
                              "not evidence"),
    ({"demonstration": False, "task_options": {"quick": False}}, None),
    ({}, None)])
def test_the_note_says_quick_demonstration_or_nothing(data, note):
    assert demonstration_title_note(data) == note


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A finished one-stage sweep: mf, lora and reflora, 2 seeds, 3 SGD steps."""
    out = tmp_path_factory.mktemp("titles") / "sweep"
    sweep.run_sweep("mf", ["lora", "reflora"], [0.01], [0, 1], 3, out, optimizer="sgd",
                    progress=False)
    sweep.summarize(out)
    return out


@pytest.fixture
def drawn_titles(monkeypatch):
    """The axes titles of the figures the study saves, in order."""
    titles = []
    real = study.save_figure

    def recording(fig, path_stem, metadata=None):
        titles.append(fig.axes[0].get_title())
        return real(fig, path_stem, metadata=metadata)
    monkeypatch.setattr(study, "save_figure", recording)
    return titles


def test_every_figure_title_ends_with_the_note(folder, tmp_path, drawn_titles):
    record = study.write_study_report([folder], tmp_path / "report", title="t", title_note=QUICK)
    assert len(drawn_titles) == 2  # loss curves and lr sensitivity
    assert all(t.splitlines()[-1] == f"({QUICK})" for t in drawn_titles), drawn_titles
    manifest = json.loads((tmp_path / "report" / "figures.json").read_text())
    assert set(manifest) == set(record["files"]["figures"])
    assert all(entry["title"].endswith(f" ({QUICK})") for entry in manifest.values())
    assert record["parameters"]["title_note"] == QUICK


def test_a_real_study_keeps_its_two_line_titles(folder, tmp_path, drawn_titles):
    study.write_study_report([folder], tmp_path / "report", title="t")
    assert [len(t.splitlines()) for t in drawn_titles] == [2, 2]
    assert not any("demonstration" in t for t in drawn_titles)
