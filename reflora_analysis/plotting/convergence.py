r"""Figures and tables of notebooks 05 (encoder study) and 07 (causal-LM study), in the
paper's form, from their finished sweep folders.

:func:`publish_study` hands the study data of :func:`reflora_analysis.experiments.convergence.run_study`
to :func:`reflora_analysis.study.write_study_report`, which writes per task
``loss_curves_<task>`` (training loss vs step at each method's chosen lr, median and
interquartile band over the test seeds) and ``lr_sensitivity_<task>`` (validation metric vs
lr, mean and 95 % t band over the tuning seeds), ``speed_<task>.md/.csv``,
``paper_table.md/.csv`` (methods x tasks, mean ± std, paired Δ to LoRA with its interval, an
Average column), ``study.json`` and ``README.md`` (what the numbers show, generated from
them). The figures are recorded in ``figures.json`` (captions) like every other notebook's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping

__all__ = ["publish_study", "publish_convergence", "publish_causal_lm", "demonstration_title_note"]

_DEMONSTRATION_NOTE = ("pipeline demonstration (quick mode or fewer seeds than the protocol's "
                       "minimums): the numbers decide nothing")


def demonstration_title_note(data: Mapping[str, Any]) -> str | None:
    """The last line of a study figure's title (in parentheses) when ``data`` (``run_study``'s
    result) is a demonstration: ``quick: pipeline demonstration, not evidence`` in quick mode
    (``task_options["quick"]``), ``pipeline demonstration (fewer seeds than the protocol
    needs), not evidence`` otherwise; None for a study whose numbers count."""
    if not data.get("demonstration"):
        return None
    if (data.get("task_options") or {}).get("quick"):
        return "quick: pipeline demonstration, not evidence"
    return "pipeline demonstration (fewer seeds than the protocol needs), not evidence"


def publish_study(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Write the study report of ``data`` (``run_study``'s result; its ``sweep_dirs`` are
    relative to ``out``) into ``out``; returns ``{figure stem: {"png", "pdf", "caption"}}``.
    A demonstration's figure titles (:func:`demonstration_title_note`) and captions say so."""
    from ..study import write_study_report  # on use: study imports this package's style

    if not data.get("sweep_dirs"):
        raise ValueError("the study data lists no sweep folders (sweep_dirs); run the experiment first")
    out = Path(out).resolve()
    missing = [d for d in data["sweep_dirs"] if not (out / d).is_dir()]
    if missing:
        raise ValueError(f"no sweep folder {missing[0]!r} under {out}; publish into the "
                         "experiment's out_dir")
    # run from out: the report names its sweep folders relative to itself (a notebook runs in
    # a temporary folder that is renamed into figures/ afterwards)
    with contextlib.chdir(out):
        study = write_study_report(data["sweep_dirs"], out, title=data["title"],
                                   wall_time_s=data.get("wall_time_s"), command=data.get("command"),
                                   title_note=demonstration_title_note(data))
    figures = study["files"]["figures"]
    if data.get("demonstration"):
        _label_demonstration(Path(out), figures)
    return figures


def _label_demonstration(out: Path, figures: dict[str, dict]) -> None:
    """Prefix every caption (returned and in ``figures.json``) with the demonstration note."""
    from ..io import atomic_write_json, read_json

    manifest_path = out / "figures.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    for stem, entry in figures.items():
        entry["caption"] = f"{_DEMONSTRATION_NOTE.capitalize()}. {entry['caption']}"
        if stem in manifest:
            manifest[stem]["caption"] = entry["caption"]
    if manifest:
        atomic_write_json(manifest_path, manifest)


def publish_convergence(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 05's figures and tables into ``out`` (:func:`publish_study`)."""
    return publish_study(data, out)


def publish_causal_lm(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 07's figures and tables into ``out`` (:func:`publish_study`)."""
    return publish_study(data, out)
