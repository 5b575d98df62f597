"""The size limits of docs/ARCHITECTURE.md: a reader sees each function in one screen.

No function in ``reflora_analysis/`` has more than 60 lines of code (docstring, blank and
comment-only lines excluded), no class more than 200, no module more than 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reflora_analysis"
LIMITS = {"function": 60, "class": 200, "module": 600}


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    body = getattr(node, "body", [])
    docstring = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        docstring = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in docstring and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        rel = path.relative_to(package.parent)
        if len(lines) > LIMITS["module"]:
            found.append(f"{rel}: module of {len(lines)} lines")
        for node in ast.walk(ast.parse(source)):
            kind = ("function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    else "class" if isinstance(node, ast.ClassDef) else None)
            if kind and _code_lines(node, lines) > LIMITS[kind]:
                found.append(f"{rel}:{node.lineno}: {kind} {node.name} has "
                             f"{_code_lines(node, lines)} lines of code")
    return found


def test_no_function_class_or_module_over_its_limit():
    assert violations() == []


def test_the_checker_catches_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(60))  # + the def line: 61
    (pkg / "long.py").write_text(f'def f():\n    """doc\n\n    more doc\n    """\n    # why\n{body}\n')
    (pkg / "short.py").write_text("def g():\n" + "\n".join(f"    y{i} = {i}" for i in range(59)) + "\n")
    assert [v.split(": ")[1] for v in violations(pkg)] == ["function f has 61 lines of code"]
