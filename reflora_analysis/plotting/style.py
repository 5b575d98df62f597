r"""One colour, label and marker per method, and the project's matplotlib style.

Colours follow the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies); see :mod:`reflora_analysis.plotting` for why each method has its colour.
"""

from __future__ import annotations

import zlib

import matplotlib.pyplot as plt

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "METHOD_MARKERS", "STEP_LINESTYLES",
           "COLUMN_WIDTH", "method_color", "method_label", "method_marker", "apply_style"]

METHOD_COLORS: dict[str, str] = {
    "lora": "#000000",
    "lora+": "#8c8c8c",
    "scaledgd": "#9b59b6",
    "lora-rite": "#009E73",
    "lora-pro": "#0072B2",
    "reflora": "#D55E00",
    "reflora-s": "#E69F00",
    "balance": "#56B4E9",
    # the baselines that change the model: DoRA in Okabe-Ito's reddish purple, full
    # fine-tuning (the reference row) in a dark wine far from every LoRA method's hue
    "dora": "#CC79A7",
    "balora": "#8C564B",
    "full": "#882255",
}

METHOD_LABELS: dict[str, str] = {
    "lora": "LoRA",
    "lora+": "LoRA+",
    "scaledgd": "ScaledGD",
    "lora-rite": "LoRA-RITE",
    "lora-pro": "LoRA-Pro",
    "reflora": "RefLoRA",
    "reflora-s": "RefLoRA-S",
    "balance": "Balance (geometric mean)",
    "balora": "BaLoRA",
    "dora": "DoRA",
    "full": "Full FT",
}

METHOD_MARKERS: dict[str, str] = {
    "lora": "o", "lora+": "v", "scaledgd": "s", "lora-rite": "D",
    "lora-pro": "^", "reflora": "*", "reflora-s": "P", "balance": "X",
    "dora": "h", "full": "p", "balora": "d",
}

#: line styles for the first, second, ... step size of one method (paper: solid, dash-dot)
STEP_LINESTYLES: tuple[str, ...] = ("-", "-.", ":", "--")

#: one column of a two-column paper, inches
COLUMN_WIDTH = 3.4

# colours for names outside the registry (a user's own method): stable per name
_EXTRA_COLORS = ("#7f3c8d", "#a5aa99", "#11a579", "#e73f74", "#3969ac", "#80ba5a")


def method_color(name: str) -> str:
    """The colour of method ``name`` (same in every figure).

    Registered methods get :data:`METHOD_COLORS`; any other name gets a colour chosen
    by a stable hash of the name (CRC32), so it too is the same in every figure.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"method name must be a non-empty str, got {name!r}")
    key = name.lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)]


def method_label(name: str) -> str:
    """Display name of method ``name`` (``"reflora-s"`` -> ``"RefLoRA-S"``)."""
    return METHOD_LABELS.get(name.lower(), name)


def method_marker(name: str) -> str:
    """Marker of method ``name`` (for scatter plots and black-and-white prints)."""
    return METHOD_MARKERS.get(name.lower(), "o")


def apply_style() -> None:
    """Set the project's matplotlib style: 8 pt text, thin grid, no top/right spines.

    Sized for a figure one column wide (:data:`COLUMN_WIDTH`); saved at 200 dpi so the
    PNG is sharp on a repository page. Idempotent.
    """
    plt.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 200,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.03,
        "font.size": 8,
        "axes.titlesize": 8.5,
        "axes.labelsize": 8,
        "legend.fontsize": 7,
        "legend.framealpha": 0.85,
        "legend.handlelength": 2.2,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "lines.linewidth": 1.4,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linewidth": 0.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # TrueType: text stays selectable / searchable in the PDF
        "svg.hashsalt": "reflora-analysis",
        "path.simplify": True,
    })
