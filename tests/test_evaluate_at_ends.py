"""``evaluate_at_ends``: ``train.run`` / ``RunConfig`` may skip ``task.evaluate()`` at the
first and last step; the sweep does (it evaluates every split itself after training, and
nothing reads the log's ``eval/`` values), and its results table keeps every number.

Before, every sweep run evaluated the validation split at step 0 and at the end inside
``train.run`` and then again in ``sweep.evaluate_splits``: wasted work on real models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from reflora_analysis import sweep, train
from reflora_analysis.config import RunConfig
from reflora_analysis.io import read_json_lines

torch.set_num_threads(1)

STEPS = 4


def _eval_steps(records) -> list[int]:
    return [r["step"] for r in records if any(k.startswith("eval/") for k in r)]


def test_train_evaluates_at_both_ends_by_default():
    assert RunConfig("mf", "lora", steps=2).evaluate_at_ends is True
    records = train.run("mf", "lora", steps=STEPS, progress=False)
    assert _eval_steps(records) == [0, STEPS]


def test_without_the_ends_nothing_is_evaluated_and_the_losses_are_the_same():
    kept = train.run("mf", "reflora", steps=STEPS, progress=False)
    skipped = train.run("mf", "reflora", steps=STEPS, progress=False, evaluate_at_ends=False)
    assert _eval_steps(skipped) == []
    # evaluation touches no weight and no random state: the same run, bit for bit (CPU)
    assert [r["loss"] for r in skipped] == [r["loss"] for r in kept]
    assert [r["step"] for r in skipped] == list(range(STEPS + 1))


def test_eval_every_still_applies_without_the_ends():
    records = train.run("mf", "lora", steps=STEPS, progress=False, eval_every=2,
                        evaluate_at_ends=False)
    assert _eval_steps(records) == [0, 2, 4]  # multiples of eval_every, ends included as such
    records = train.run("mf", "lora", steps=3, progress=False, eval_every=2,
                        evaluate_at_ends=False)
    assert _eval_steps(records) == [0, 2]  # the last step (3) is not a multiple: not evaluated


def test_sweep_runs_log_no_evaluation_and_the_table_keeps_every_number(tmp_path):
    rows = sweep.run_sweep("mf", ["lora"], [0.01], [0, 1], STEPS, tmp_path / "sweep",
                           optimizer="sgd", progress=False)
    assert len(rows) == 2
    for row in rows:
        run_dir = tmp_path / "sweep" / row["run_dir"]
        records = list(read_json_lines(run_dir / "run.jsonl"))
        assert _eval_steps(records) == [] and len(records) == STEPS + 1
        assert json.loads((run_dir / "run.meta.json").read_text())["final_eval"] == {}
        # the numbers the table, the figures and the speed columns show
        assert row["status"] == "finished" and math.isfinite(row["val_relative_error"])
        assert math.isfinite(row["auc_loss"]) and math.isfinite(row["smoothed_final_loss"])
        assert row["auc_loss"] == pytest.approx(math.fsum(r["loss"] for r in records) / len(records),
                                                rel=1e-9)  # the table rounds to 10 digits
