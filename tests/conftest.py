"""Shared test configuration: the hypothesis profile and the count of fuzzed cases.

Hypothesis profiles
    ``ci`` (loaded by default): no deadline (the machines are shared and slow), derandomized
    so every run draws the same examples and CI is reproducible, and ``print_blob`` so a
    failure prints the ``@reproduce_failure`` line. ``dev`` draws fresh random examples;
    select it with ``HYPOTHESIS_PROFILE=dev``. Tests set their own ``max_examples``.

Fuzzed-case count (issue 7)
    Every ``@given`` test body call is counted (generation, replay and shrinking alike) by
    wrapping ``test.hypothesis.inner_test``, the documented re-assignable hook for plugins
    (hypothesis issue 1257). The count travels in the test report's ``user_properties``, so
    it also adds up under ``pytest -n`` (xdist), and the terminal summary prints the total.
    Nothing needs to be imported by test files: any ``@given`` test under ``tests/`` counts.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_FUZZ_KEY = "hypothesis_cases"
_fuzz_totals = {"cases": 0, "tests": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    handle = getattr(getattr(item, "obj", None), "hypothesis", None)
    if handle is None:
        yield
        return
    original = handle.inner_test
    calls = [0]

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    handle.inner_test = counted
    try:
        yield
    finally:
        handle.inner_test = original
        item.user_properties.append((_FUZZ_KEY, calls[0]))


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == _FUZZ_KEY:
            _fuzz_totals["cases"] += int(value)
            _fuzz_totals["tests"] += 1


def pytest_terminal_summary(terminalreporter):
    if _fuzz_totals["tests"]:
        tests = _fuzz_totals["tests"]
        terminalreporter.write_line(
            f"hypothesis: {_fuzz_totals['cases']} fuzzed cases in {tests} property "
            f"test{'s' if tests != 1 else ''} (profile {settings.get_current_profile_name()})"
        )
