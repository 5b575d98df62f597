r"""One figure style and one colour per method, shared by every notebook.

Every figure of the project goes through this module so that a method has the same
colour (and label) in every figure, figures are readable at one column width
(3.4 in, 8 pt text) and files are written atomically and reproducibly.

Colours follow the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies). Their assignment mirrors the paper's figures where it can, so a reader
can put ours next to theirs: LoRA black and RefLoRA red as in the paper's
matrix-factorization figure, ScaledGD purple, LoRA-RITE green.

========== ============ =============================================
method     colour       why
========== ============ =============================================
lora       black        paper, matrix factorization figure
lora+      grey         a LoRA variant: close to LoRA's black
scaledgd   purple       paper, matrix factorization figure
lora-rite  green        paper, GLUE loss curves
lora-pro   blue         distinct from every other
reflora    vermillion   paper (red)
reflora-s  orange       paper, matrix factorization (orange/red)
balance    sky blue     balanced projection (BaLoRA); distinct
========== ============ =============================================

Step sizes within one method are told apart by line style (:data:`STEP_LINESTYLES`),
as the paper does (solid for eta, dash-dot for 3 eta).

Files: :func:`save_figure` writes ``<stem>.png`` and ``<stem>.pdf`` atomically (temporary
file + rename, :mod:`reflora_analysis.io`) with PDF metadata that do not depend on the
wall clock (``SOURCE_DATE_EPOCH`` when set, otherwise no creation date), so the same data
give byte-identical PDFs. It also records the figure in ``figures.json`` next to it, the
manifest that :mod:`reflora_analysis.figures` turns into ``figures/index.md``.

The per-figure plotting functions (``plot_*``) take the plain data returned by
:mod:`reflora_analysis.experiments` and return the matplotlib figure. One module per
notebook (:mod:`.mf` 01, :mod:`.bounds` 02, :mod:`.consistency` 03, :mod:`.sharpness` 04,
:mod:`.convergence` 05 and 07, :mod:`.overhead` 06), each with a ``publish_*`` function that
writes that notebook's figures (captions included): the notebook's last call.
Shared: :mod:`.style` (colours, labels, matplotlib style), :mod:`.files` (atomic,
reproducible files; ``figures.json``), :mod:`.lines` (median lines with bands).
"""

from __future__ import annotations

from .bounds import plot_bound_scan, plot_bound_tightness, publish_bounds
from .consistency import (consistency_markdown, consistency_summary, plot_balance_trajectories,
                          plot_consistency, publish_consistency_balance)
from .convergence import publish_causal_lm, publish_convergence, publish_study
from .files import publish, publish_markdown, save_figure, show
from .lines import finite_or_nan
from .mf import plot_mf_balance, plot_mf_loss, publish_mf
from .overhead import plot_overhead, publish_overhead
from .sharpness import plot_landscape, plot_sharpness, publish_sharpness_landscape
from .style import (COLUMN_WIDTH, METHOD_COLORS, METHOD_LABELS, METHOD_MARKERS, STEP_LINESTYLES,
                    apply_style, method_color, method_label, method_marker)

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "METHOD_MARKERS",
    "STEP_LINESTYLES",
    "COLUMN_WIDTH",
    "method_color",
    "method_label",
    "method_marker",
    "apply_style",
    "show",
    "publish",
    "publish_markdown",
    "save_figure",
    "finite_or_nan",
    "plot_mf_loss",
    "plot_mf_balance",
    "publish_mf",
    "plot_bound_scan",
    "plot_bound_tightness",
    "publish_bounds",
    "plot_consistency",
    "consistency_summary",
    "consistency_markdown",
    "plot_balance_trajectories",
    "publish_consistency_balance",
    "plot_sharpness",
    "plot_landscape",
    "publish_sharpness_landscape",
    "publish_study",
    "publish_convergence",
    "publish_causal_lm",
    "plot_overhead",
    "publish_overhead",
]
