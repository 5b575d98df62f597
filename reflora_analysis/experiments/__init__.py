r"""The experiments behind the notebooks: each returns plain data and writes it to disk.

One module per notebook, each holding the notebook's :class:`~.notebook.NotebookSpec`
(``SPEC``: its parameters, its quick preset, its derived arguments), ``setup`` and
``experiment`` (what the notebook calls) and the experiment functions themselves:

========  ====================  ===========================================================
notebook  module                what it measures
========  ====================  ===========================================================
01        :mod:`.mf`            loss and balance vs iteration on mf
02        :mod:`.bounds`        loss and the F8 bounds vs step size; their tightness
03        :mod:`.consistency`   consistency score of every method; balance over training
04        :mod:`.sharpness`     top Hessian eigenvalue and trace; 1-D / 2-D loss slices
05        :mod:`.convergence`   encoder study on the VADER sentence tasks (tuned lr, test seeds)
06        :mod:`.overhead`      time per training step (round-robin), peak memory
07        :mod:`.causal_lm`     causal-LM study: SmolLM2 (LLaMA) on ``lm-vader-movies``
========  ====================  ===========================================================

Shared parts: :mod:`.common` (the sweep skeleton :func:`sweep_runs`, :func:`train_records`,
:func:`write_data`), :mod:`.notebook` (parameters, quick presets, :class:`NotebookRun`),
:mod:`.provenance` (``params.json``: versions, machine, output folders) and
:mod:`.timing` (:func:`round_robin`, the one step timer). A notebook is::

    run = mf.setup(globals())      # parameters cell -> quick preset -> params.json
    data = mf.experiment(run)      # the experiment, data written next to the figures
    P.publish_mf(data, run.out)    # the figures

and everything a figure shows can also be computed without Jupyter::

    >>> from reflora_analysis import experiments as ex
    >>> data = ex.run_mf_comparison(["lora", "reflora"], steps=50, out_dir="out")  # doctest: +SKIP

Outputs are written atomically (:mod:`reflora_analysis.io`); non-finite numbers (a
diverged run) are stored as the strings ``"NaN"``/``"Infinity"`` so every JSON file is standard.
"""

from __future__ import annotations

from . import (bounds, causal_lm, common, consistency, convergence, mf, notebook,  # noqa: F401
               overhead, provenance, sharpness, timing)
from .bounds import bound_scan_experiment, bound_tightness_experiment
from .common import REFACTOR_METHODS, sweep_runs, train_records, write_data
from .consistency import balance_trajectories, consistency_experiment
from .causal_lm import causal_lm_study
from .convergence import real_model_convergence, run_study
from .mf import run_mf_comparison
from .notebook import NotebookRun, NotebookSpec, Preset, at_least, at_most, fill, first, options_for_task
from .overhead import interleaved_step_times, measure_overhead, overhead_experiment
from .provenance import machine_info, package_versions, repository_root, resolve_out_dir, setup_notebook
from .sharpness import landscape_experiment, sharpness_over_training
from .timing import round_robin

__all__ = [
    "setup_notebook",
    "machine_info",
    "package_versions",
    "repository_root",
    "resolve_out_dir",
    "train_records",
    "sweep_runs",
    "write_data",
    "round_robin",
    "REFACTOR_METHODS",
    "NOTEBOOKS",
    "NotebookSpec",
    "NotebookRun",
    "Preset",
    "at_most",
    "at_least",
    "first",
    "fill",
    "options_for_task",
    "run_mf_comparison",
    "bound_scan_experiment",
    "bound_tightness_experiment",
    "consistency_experiment",
    "balance_trajectories",
    "sharpness_over_training",
    "landscape_experiment",
    "real_model_convergence",
    "run_study",
    "causal_lm_study",
    "measure_overhead",
    "interleaved_step_times",
    "overhead_experiment",
]

#: notebook stem -> its experiment module (``SPEC``, ``setup``, ``experiment``)
NOTEBOOKS = {module.SPEC.notebook: module
             for module in (mf, bounds, consistency, sharpness, convergence, overhead, causal_lm)}
