r"""What a notebook declares, how ``quick`` shrinks it, and the run its setup cell prepares.

Every experiment module (:mod:`.mf` for ``01``, ...) holds one :class:`NotebookSpec`:

* ``parameters``: the notebook's parameters cell, same names and defaults (a test checks
  that the two agree);
* ``quick``: a :class:`Preset`, the one place that decides what ``quick=True`` means for
  that notebook: rules such as ``steps=at_most(40)`` or ``seeds=first(1)``. A rule only
  ever makes a setting smaller or fills in a missing one, so explicit small values
  (``-p steps=3``) are kept;
* ``derive``: the arguments computed from the parameters (04's settings for the real
  model, 05's task options): no notebook computes anything.

The notebook's setup cell is ``run = <module>.setup(globals())``: it reads the parameters
from the notebook's namespace, applies the preset (to the parameters, then to the derived
arguments), writes ``params.json`` with the arguments as used (``parameters``; ``derived``;
``quick_preset``: every value the preset changed, ``{"given", "used"}``) and returns a
:class:`NotebookRun` that the experiment reads its arguments from. ``quick=True`` also
reaches :func:`reflora_analysis.tasks.make_task` through the experiments, which then builds
each task with its own small settings (e.g. ``nlu-minilm``: batch 8, 16 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .provenance import setup_notebook

__all__ = ["Rule", "Preset", "at_most", "at_least", "first", "fill", "options_for_task",
           "NotebookSpec", "NotebookRun"]


@dataclass(frozen=True)
class Rule:
    """One quick-preset rule: ``rule(value, args) -> value`` (``args``: every argument)."""

    kind: str
    value: Any
    task_key: str | None = None

    def __call__(self, current: Any, args: Mapping[str, Any]) -> Any:
        if self.kind == "options":
            mine = self.value.get(args.get(self.task_key), {})
            return {**mine, **dict(current or {})}  # explicit options win
        if current is None:
            return self.value if self.kind == "fill" else None
        if self.kind == "at_most":
            return min(current, self.value)
        if self.kind == "at_least":
            return max(current, self.value)
        if self.kind == "first":
            return list(current)[:self.value]
        return current  # fill: a given value is kept

    def __repr__(self) -> str:
        if self.kind == "options":
            return f"options_for_task({self.task_key!r}, {self.value!r})"
        return f"{self.kind}({self.value!r})"


def at_most(n) -> Rule:
    """Quick: the value, capped at ``n``."""
    return Rule("at_most", n)


def at_least(n) -> Rule:
    """Quick: the value, raised to at least ``n`` (e.g. a probe interval)."""
    return Rule("at_least", n)


def first(n: int) -> Rule:
    """Quick: the first ``n`` items of a list (seeds)."""
    return Rule("first", int(n))


def fill(value) -> Rule:
    """Quick: ``value`` where the parameter is ``None``; a given value is kept."""
    return Rule("fill", value)


def options_for_task(task_key: str, options: Mapping[str, Mapping[str, Any]]) -> Rule:
    """Quick: task options ``options[args[task_key]]`` under the ones already set."""
    return Rule("options", {k: dict(v) for k, v in options.items()}, task_key)


class Preset(Mapping[str, Rule]):
    """The quick settings of one notebook: ``{argument name: Rule}``."""

    def __init__(self, **rules: Rule):
        for name, rule in rules.items():
            if not isinstance(rule, Rule):
                raise TypeError(f"preset rule {name!r} must be a Rule (at_most, first, ...), "
                                f"got {rule!r}")
        self._rules = dict(rules)

    def __getitem__(self, name: str) -> Rule:
        return self._rules[name]

    def __iter__(self):
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return "Preset(" + ", ".join(f"{k}={r!r}" for k, r in self._rules.items()) + ")"

    def apply(self, values: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> dict:
        """``values`` with every rule whose name is in ``values`` applied (``context``: other
        arguments a rule may read, e.g. the task name)."""
        args = {**dict(context or {}), **values}
        return {k: self._rules[k](v, args) if k in self._rules else v for k, v in values.items()}


@dataclass(frozen=True)
class NotebookRun:
    """The prepared run of one notebook: where it writes and the arguments it uses."""

    notebook: str
    out: Path
    parameters: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)
    quick_changes: dict[str, dict] = field(default_factory=dict)

    @property
    def args(self) -> dict[str, Any]:
        """Parameters (after the quick preset) and derived arguments together."""
        return {**self.parameters, **self.derived}

    def __getitem__(self, name: str) -> Any:
        return self.args[name]


@dataclass(frozen=True)
class NotebookSpec:
    """A notebook's parameters (names and defaults), quick preset and derived arguments."""

    notebook: str
    parameters: Mapping[str, Any]
    quick: Preset = field(default_factory=Preset)
    derive: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None

    def __post_init__(self):
        missing = {"quick", "device", "seeds", "out_dir"} - set(self.parameters)
        if missing:
            raise ValueError(f"{self.notebook}: parameters lack {sorted(missing)}")

    def parameters_from(self, namespace: Mapping[str, Any] | None = None,
                        **overrides) -> dict[str, Any]:
        """The parameters: defaults, then ``namespace`` (a notebook's ``globals()``: every
        parameter must be there), then ``overrides`` (unknown names are refused)."""
        unknown = sorted(set(overrides) - set(self.parameters))
        if unknown:
            raise ValueError(f"{self.notebook} has no parameter {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(self.parameters)}")
        params = dict(self.parameters)
        if namespace is not None:
            absent = [name for name in self.parameters if name not in namespace]
            if absent:
                raise ValueError(f"{self.notebook}: the parameters cell lacks {absent}")
            params.update({name: namespace[name] for name in self.parameters})
        params.update(overrides)
        return params

    def resolve(self, params: Mapping[str, Any]) -> tuple[dict, dict, dict]:
        """``(parameters, derived, changes)`` as used: the quick preset (when ``quick``)
        applied to the parameters, the derived arguments computed from them, the preset
        applied to those too; ``changes``: ``{name: {"given", "used"}}`` of the preset."""
        given = dict(params)
        quick = bool(given.get("quick"))
        used = self.quick.apply(given) if quick else dict(given)
        derived_given = dict(self.derive(used)) if self.derive else {}
        derived = self.quick.apply(derived_given, context=used) if quick else derived_given
        changes = {k: {"given": before[k], "used": after[k]}
                   for before, after in ((given, used), (derived_given, derived))
                   for k in after if after[k] != before[k]}
        return used, derived, changes

    def setup(self, namespace: Mapping[str, Any] | None = None, /, **overrides) -> NotebookRun:
        """Resolve the arguments (:meth:`resolve`), prepare the output folder and write
        ``params.json`` (:func:`~.provenance.setup_notebook`); return the :class:`NotebookRun`."""
        used, derived, changes = self.resolve(self.parameters_from(namespace, **overrides))
        recorded = {k: v for k, v in used.items() if k != "out_dir"}
        out = setup_notebook(used["out_dir"], recorded, seeds=used["seeds"],
                             device=used["device"], notebook=self.notebook,
                             extra={"derived": derived, "quick_preset": changes})
        return NotebookRun(self.notebook, out, used, derived, changes)
