r"""Figure files: PNG + PDF written atomically and reproducibly, and the ``figures.json``
manifest that :mod:`reflora_analysis.figures` turns into ``figures/index.md``.

:func:`save_figure` writes ``<stem>.png`` and ``<stem>.pdf`` atomically (temporary file +
rename, :mod:`reflora_analysis.io`) with PDF metadata that do not depend on the wall clock
(``SOURCE_DATE_EPOCH`` when set, otherwise no creation date), so the same data give
byte-identical PDFs. :func:`publish` saves, closes and shows a figure; :func:`publish_markdown`
does the same for a Markdown table.
"""

from __future__ import annotations

import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["save_figure", "show", "publish", "publish_markdown"]

def _pdf_metadata(metadata: Mapping[str, Any]) -> dict:
    """PDF info dictionary independent of the wall clock.

    ``CreationDate`` is ``SOURCE_DATE_EPOCH`` (reproducible-builds convention) when set,
    otherwise omitted, so two runs on the same data give the same bytes.
    """
    info = {"Creator": "reflora-analysis", "Producer": f"matplotlib {matplotlib.__version__}"}
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        info["CreationDate"] = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    else:
        info["CreationDate"] = None
    info["ModDate"] = None
    if "title" in metadata:
        info["Title"] = str(metadata["title"])
    return info


def save_figure(fig, path_stem, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``fig`` to ``<path_stem>.png`` and ``<path_stem>.pdf`` atomically.

    Parameters
    ----------
    fig : matplotlib Figure.
    path_stem : path without suffix, e.g. ``figures/01_matrix_factorization/mf_loss``;
        its directory is created if missing.
    metadata : JSON-able description recorded in ``figures.json`` next to the files
        (e.g. ``{"caption": ..., "data": "mf_loss.csv"}``); ``"title"`` also goes into
        the PDF's info dictionary.

    Returns ``{"png": path, "pdf": path}``. Each file is rendered into memory first and
    then renamed into place, so a crash never leaves a half-written figure and a
    previous figure of the same name survives any failure.
    """
    metadata = dict(metadata or {})
    stem = Path(path_stem)
    if stem.suffix in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in ("png", "pdf"):
        buffer = io.BytesIO()
        if fmt == "pdf":
            fig.savefig(buffer, format="pdf", metadata=_pdf_metadata(metadata))
        else:
            fig.savefig(buffer, format="png", metadata={"Software": None})
        target = stem.with_suffix(f".{fmt}")
        atomic_write_bytes(target, buffer.getvalue())
        out[fmt] = str(target)
    manifest_path = stem.parent / "figures.json"
    manifest = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
    manifest[stem.name] = {"png": stem.name + ".png", "pdf": stem.name + ".pdf", **metadata}
    atomic_write_json(manifest_path, dict(sorted(manifest.items())))
    return out


def show(paths: Mapping[str, str] | Sequence[Mapping[str, str]]) -> None:
    """Display saved PNGs inline when running under IPython (no-op otherwise).

    The runner uses the non-interactive Agg backend, so the executed notebook shows the
    files exactly as written to disk.
    """
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    items = [paths] if isinstance(paths, Mapping) else list(paths)
    for item in items:
        display(Image(filename=item["png"]))


def publish(fig, path_stem, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """:func:`save_figure`, close ``fig``, then :func:`show` the saved PNG (in a notebook).

    Closing first keeps JupyterLab's inline backend from drawing the figure a second time;
    what the notebook shows is exactly the file on disk.
    """
    paths = save_figure(fig, path_stem, metadata)
    plt.close(fig)
    show(paths)
    return paths


def publish_markdown(text: str, path) -> str:
    """Write ``text`` to ``path`` (atomically) and display it as Markdown under IPython."""
    atomic_write_text(Path(path), text)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        return text
    if get_ipython() is not None:
        display(Markdown(text))
    return text
