"""``KEY=VALUE`` on every command line: one parser (:mod:`reflora_analysis.keyvalue`).

``train`` / ``probe`` ``--set`` and ``--hparam``, ``sweep --set`` / ``--hparam`` and
``figures --param`` read values the same way; before, ``sweep`` read ``skip=none`` as the
string ``"none"`` and ``figures`` read ``-p flag=true`` as the string ``"true"``.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora_analysis import cli, figures
from reflora_analysis.keyvalue import KeyValueError, parse_key_value
from reflora_analysis.sweep import commandline


@pytest.mark.parametrize("text, value", [
    ("skip=None", None), ("skip=none", None), ("skip=NULL", None), ("use_dora=True", True),
    ("use_dora=false", False), ("steps=50", 50), ("lr=1e-3", 1e-3), ("lr=-0.5", -0.5),
    ("betas=[0.9, 0.99]", [0.9, 0.99]), ("flags=[true, null]", [True, None]),
    ("pair=(1, 2)", (1, 2)), ("task='mf'", "mf"), ("task=mf", "mf"),
    ("target_modules=q_proj,v_proj", "q_proj,v_proj"), ("name= padded ", "padded"),
    ("formula=a=b", "a=b"), (" key =3", 3)])
def test_values_read_as_words_python_literals_json_else_strings(text, value):
    key, parsed = parse_key_value(text)
    assert key == text.split("=")[0].strip()
    assert parsed == value and type(parsed) is type(value)


def test_json_only_numbers_are_read():
    assert math.isnan(parse_key_value("x=NaN")[1])
    assert parse_key_value("x=Infinity")[1] == math.inf


@pytest.mark.parametrize("text", ["novalue", "=3", " =3", ""])
def test_text_without_a_key_is_one_clear_value_error(text):
    with pytest.raises(ValueError, match=r"^expected KEY=VALUE, got ") as excinfo:
        parse_key_value(text)
    assert isinstance(excinfo.value, argparse.ArgumentTypeError)  # argparse names the option
    assert "\n" not in str(excinfo.value)


_SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
            | st.floats(allow_nan=False, allow_infinity=False))
_VALUES = _SCALARS | st.lists(_SCALARS, max_size=4)


@settings(max_examples=200, deadline=None)
@given(key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_:]{0,12}", fullmatch=True), value=_VALUES,
       spelling=st.sampled_from(["python", "json"]))
def test_python_and_json_spellings_round_trip(key, value, spelling):
    # a value written by Python's repr or by JSON reads back as itself (floats exactly: both
    # spell the shortest round-tripping decimal)
    text = repr(value) if spelling == "python" else json.dumps(value)
    assert parse_key_value(f"{key}={text}") == (key, value)


def _type_of(parser: argparse.ArgumentParser, dest: str):
    return next(a.type for a in parser._actions if a.dest == dest)


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("parser, dest", [
    (lambda: _subparser("train"), "settings"), (lambda: _subparser("train"), "hparams"),
    (lambda: _subparser("probe"), "settings"), (lambda: _subparser("probe"), "hparams"),
    (lambda: _subparser("sweep"), "settings"), (lambda: _subparser("sweep"), "hparams"),
    (figures._build_parser, "param")])
def test_every_command_line_uses_the_one_parser(parser, dest):
    assert _type_of(parser(), dest) is parse_key_value


def test_sweep_and_figures_read_none_and_true_as_train_does():
    sweep = argparse.ArgumentParser()
    commandline.add_arguments(sweep)
    args = sweep.parse_args(["--task", "mf", "--methods", "lora", "--lrs", "0.1", "--seeds", "0",
                             "--steps", "2", "--out", "x", "--hparam", "lora-rite:skip=none"])
    assert args.hparams == [("lora-rite:skip", None)]
    args = figures._build_parser().parse_args(["-p", "flag=true", "-p", "task=mf"])
    assert args.param == [("flag", True), ("task", "mf")]


def test_bad_setting_on_the_command_line_is_one_line(capsys, tmp_path):
    status = cli.main(["train", "--task", "mf", "--method", "lora", "--steps", "1", "--out",
                       str(tmp_path / "run.jsonl"), "--hparam", "damping"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0] == "reflora-analysis: error: argument --hparam: expected KEY=VALUE, got 'damping'"


def test_key_value_error_is_both_kinds():
    assert issubclass(KeyValueError, ValueError) and issubclass(KeyValueError, argparse.ArgumentTypeError)
