r"""Statistics of a sweep's results table: pure functions, no files, no training.

Everything here takes the rows that :mod:`reflora_analysis.sweep` writes (``results.json``:
one dict per run) and, for the speed comparison, the runs' training-loss curves. The rules
below are the comparison protocol; :func:`compare` records them in its ``protocol`` output.

Intervals
    :func:`t_interval`: mean, sample standard deviation ``s`` (``ddof=1``) and the two-sided
    Student t interval ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` (``c = 0.95`` by default).
    Needs ``n >= 2`` finite values (``ValueError`` otherwise).

Learning-rate selection (:func:`select_lr`)
    Per method, on the *validation* metric: for each lr, the mean over the selection seeds.
    An lr is eligible only when every selection seed has a finished run with a finite
    metric at that lr (a diverged seed disqualifies the lr). The best eligible mean wins
    (``max`` or ``min``, see :func:`metric_direction`); exact ties go to the smaller lr.

Report (:func:`compare`)
    At the chosen lr, on the report seeds and the report split (``test``; see ``report_split``):
    mean, std and t interval over the seeds whose run finished with a finite metric (the
    others are counted in ``n_failed`` and named in ``notes``, never imputed).

Paired difference to the baseline (``lora``)
    ``d_s = metric(method, seed s) - metric(baseline, seed s)`` over the report seeds where
    both are finite; mean and t interval of ``d``. ``verdict`` is ``better`` / ``worse`` only
    when the interval excludes zero (in the metric's good / bad direction), else
    ``not separated`` (also when fewer than 2 pairs exist).

Speed
    * smoothed training loss at step ``t``: the mean of the last ``k`` logged losses up to
      ``t`` (fewer at the start), ``k = smooth_window(steps) = max(1, steps // 10)``; the
      smoothed *final* loss is its value at the last step;
    * target, per seed: the baseline's smoothed final loss (at the baseline's chosen lr);
      ``steps to target`` of a run: the first step at which its smoothed loss is ``<=`` the
      target of the same seed (the baseline itself reaches it by the last step), ``inf`` if
      never (censored);
    * censoring: a censored run's true time is ``> steps``; the interval is computed with
      such runs set to ``steps + 1``, so with ``steps_censored > 0`` the mean and interval
      are lower bounds (Markdown shows them with ``>=``), not a valid interval;
    * area under the training-loss curve, ``auc_loss``: mean loss over steps ``0..steps``
      (a diverged run's is ``inf``); mean with interval, and the paired difference to the
      baseline with its interval.
    Only runs that finished are used; diverged or failed runs at the chosen lr are counted
    in ``n_failed``.

Layout
    :mod:`.primitives` (intervals, verdicts, metric direction, smoothing, lr selection),
    :mod:`.comparison` (:func:`compare`, the protocol on a table), :mod:`.markdown`
    (:func:`summary_markdown`). Every public name is importable from here.
"""

from __future__ import annotations

from .comparison import SUMMARY_COLUMNS, compare
from .markdown import summary_markdown
from .primitives import (METRIC_PREFERENCE, NAN, Interval, bare_metric, default_metric,
                         metric_direction, paired_t_interval, select_lr, smooth_window,
                         steps_to_reach, t_interval, trailing_mean, verdict)

__all__ = [
    "Interval",
    "t_interval",
    "paired_t_interval",
    "verdict",
    "metric_direction",
    "bare_metric",
    "default_metric",
    "smooth_window",
    "trailing_mean",
    "steps_to_reach",
    "select_lr",
    "compare",
    "summary_markdown",
    "SUMMARY_COLUMNS",
]
