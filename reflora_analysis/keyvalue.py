"""``KEY=VALUE`` settings of the command lines, read one way everywhere.

:func:`parse_key_value` is the ``argparse`` type of ``train`` / ``probe`` ``--set`` and
``--hparam``, ``sweep --set`` / ``--hparam`` and ``figures --param``. The value is read as

1. ``none`` / ``null``, ``true``, ``false`` in any case -> ``None``, ``True``, ``False``
   (JSON's spelling and Python's, so ``skip=None`` works as written);
2. a Python literal (:func:`ast.literal_eval`): ``3``, ``0.5``, ``1e-3``, ``[0.9, 0.99]``,
   ``(1, 2)``, ``'text'``; note that a bare ``0,1`` is the tuple ``(0, 1)``;
3. JSON (:func:`json.loads`), for what only JSON spells: ``[true, null]``, ``NaN``,
   ``Infinity``;
4. else the text itself: a bare word is a string (``task=mf``,
   ``target_modules=q_proj,v_proj``).

Text without ``=`` or with an empty key is one :class:`KeyValueError`: ``expected
KEY=VALUE, got 'novalue'`` (argparse prefixes the option's name).

This module imports nothing of the package (the command lines load it before torch).
"""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any

__all__ = ["KeyValueError", "parse_key_value", "parse_value"]

#: words read as Python's None / True / False, in any case
_WORDS = {"none": None, "null": None, "true": True, "false": False}


class KeyValueError(ValueError, argparse.ArgumentTypeError):
    """Text that is not ``KEY=VALUE``: a ``ValueError``, and to ``argparse`` a bad value of
    the option (its message shown after the option's name)."""


def parse_value(raw: str) -> Any:
    """The value of ``KEY=VALUE`` (module docstring: words, Python literal, JSON, string)."""
    text = raw.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass  # not a Python literal: JSON, else the text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        return text


def parse_key_value(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``("key", value)``: the key stripped, the value by
    :func:`parse_value`; :class:`KeyValueError` without ``=`` or with an empty key."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise KeyValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(raw)
