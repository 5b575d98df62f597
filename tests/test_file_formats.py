"""What every output file promises a reader: standard JSON, and stable data files.

* Strict JSON parsers (jq, JavaScript, ``json.loads`` rejecting ``NaN``) read every
  ``.json`` and ``.jsonl`` file, including the line of a diverged run; our readers turn the
  encoded non-finite values back into floats and still read older files with bare ``NaN``.
* Data files (CSV/JSON beside figures) round floats to a fixed number of significant digits,
  so a result recomputed with another summation order (threads, BLAS) is the same file.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora_analysis import io as rio


def strict_loads(text: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


NONFINITE = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf}


def test_non_finite_values_are_standard_json_and_read_back(tmp_path):
    record = {"step": 3, "loss": math.nan, "grad": [1.5, math.inf, -math.inf],
              "t": torch.tensor(float("nan")), "arr": np.array([np.inf, 2.0])}
    with rio.JsonLinesWriter(tmp_path / "run.jsonl") as log:
        log.write(record)
    rio.atomic_write_json(tmp_path / "meta.json", record)
    for path in (tmp_path / "run.jsonl", tmp_path / "meta.json"):
        text = path.read_text()
        strict_loads(text.splitlines()[0] if path.suffix == ".jsonl" else text)  # no NaN/Infinity
    (back,) = rio.read_json_lines(tmp_path / "run.jsonl")
    meta = rio.read_json(tmp_path / "meta.json")
    for got in (back, meta):
        assert math.isnan(got["loss"]) and math.isnan(got["t"])
        assert got["grad"] == [1.5, math.inf, -math.inf] and got["arr"] == [math.inf, 2.0]
        assert got["step"] == 3


def test_old_files_with_bare_nan_still_read(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"step": 0, "loss": NaN}\n{"step": 1, "loss": Infinity}\n')
    a, b = rio.read_json_lines(old)
    assert math.isnan(a["loss"]) and b["loss"] == math.inf
    (tmp_path / "old.json").write_text('{"x": -Infinity}')
    assert rio.read_json(tmp_path / "old.json") == {"x": -math.inf}


def test_truncation_on_resume_keeps_the_encoding(tmp_path):
    path = tmp_path / "run.jsonl"
    with rio.JsonLinesWriter(path) as log:
        for step, loss in enumerate([1.0, math.nan, 2.0]):
            log.write({"step": step, "loss": loss})
    kept = rio.truncate_json_lines(path, lambda r: r["step"] < 2)
    assert [r["step"] for r in kept] == [0, 1]
    for line in path.read_text().splitlines():
        strict_loads(line)


def test_training_logs_keep_full_precision(tmp_path):
    # resume is checked bit for bit against the log: the log must not round
    value = 0.1 + 0.2  # 0.30000000000000004
    with rio.JsonLinesWriter(tmp_path / "run.jsonl") as log:
        log.write({"loss": value})
    assert rio.read_json_lines(tmp_path / "run.jsonl")[0]["loss"] == value


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
       .filter(lambda x: x == 0 or abs(x) > 1e-300))
def test_rounding_keeps_ten_significant_digits(x):
    y = rio.round_significant(x)
    # half a unit in the 10th significant digit, plus float conversion slack
    assert abs(y - x) <= 5.000001e-10 * abs(x)
    assert rio.round_significant(y) == y  # idempotent: a rewrite of a rewrite is the same file


def test_last_bit_noise_gives_the_same_data_file(tmp_path):
    """Values a few ulps apart (another summation order) give the same file.

    Only a 10-digit rounding boundary between the two values can separate them: a relative
    window of ~1e-15 out of ~1e-10 per decade of mantissa, so among 2,000 seeded values about
    0.02 are expected to differ; we allow 1.
    """
    rng = np.random.default_rng(0)
    values = rng.uniform(-3, 3, 2000) * 10.0 ** rng.integers(-12, 12, 2000)
    noisy = [math.nextafter(math.nextafter(v, math.inf), math.inf) for v in values]
    rio.write_csv_atomic(tmp_path / "a.csv", ["v"], [[v] for v in values])
    rio.write_csv_atomic(tmp_path / "b.csv", ["v"], [[v] for v in noisy])
    a, b = (tmp_path / "a.csv").read_text().splitlines(), (tmp_path / "b.csv").read_text().splitlines()
    assert sum(x != y for x, y in zip(a, b)) <= 1


def test_the_measured_noise_pair_gives_one_file(tmp_path):
    rio.atomic_write_json(tmp_path / "a.json", {"acc": 0.9953811833033339})
    rio.atomic_write_json(tmp_path / "b.json", {"acc": 0.995381183303334})
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_csv_rounds_floats_and_leaves_ints_strings_and_nonfinite(tmp_path):
    rio.write_csv_atomic(tmp_path / "t.csv", ["i", "s", "f", "t", "n"],
                         [[np.int64(3), "lora", 1 / 3, torch.tensor(2 / 3, dtype=torch.float64),
                           math.nan]])
    header, row = (tmp_path / "t.csv").read_text().splitlines()
    assert row == "3,lora,0.3333333333,0.6666666667,nan"


@pytest.mark.parametrize("digits", [None, 6])
def test_digits_can_be_chosen(tmp_path, digits):
    rio.atomic_write_json(tmp_path / "x.json", {"v": math.pi}, digits=digits)
    got = rio.read_json(tmp_path / "x.json")["v"]
    assert got == (math.pi if digits is None else 3.14159)
