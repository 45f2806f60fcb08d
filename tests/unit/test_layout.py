# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The package's shape (docs/design.md): imports run one way and at the top, the core never imports the world,
and modules and classes stay small enough to read at a glance."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "attndb_peft"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
#: The application layer: commands that put the core and the world together.
APPLICATION = {"attndb_peft.cli", "attndb_peft.cli_args", "attndb_peft.demo", "attndb_peft.__main__"}
MAX_MODULE_LINES, MAX_CLASS_LINES = 650, 350


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """The package modules a `from ... import ...` names (a name may be a submodule)."""
    if node.level == 0:
        if not (node.module or "").startswith("attndb_peft"):
            return []
        base = node.module
    else:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    known = {_name(p) for p in MODULES}
    names = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return names or [base]


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """`(package modules imported at module level, lines of package imports inside functions or classes)`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module, is_package = _name(path), path.name == "__init__.py"
    top: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            top.update(_target(module, node, is_package))
        elif isinstance(node, ast.Import):
            top.update(a.name for a in node.names if a.name.startswith("attndb_peft"))
    nested = [
        node.lineno
        for outer in ast.walk(tree)
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for node in ast.walk(outer)
        if (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("attndb_peft")))
        or (isinstance(node, ast.Import) and any(a.name.startswith("attndb_peft") for a in node.names))
    ]
    return top - {module}, nested


GRAPH = {_name(p): _imports(p) for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_no_function_local_imports_of_the_package(path):
    assert _imports(path)[1] == [], f"{_name(path)}: package imports inside functions at lines {_imports(path)[1]}"


def test_imports_have_no_circles():
    graph = {module: {t for t in top if t in GRAPH} for module, (top, _) in GRAPH.items()}
    # a package's __init__ re-exporting its modules is not a circle: a module importing its own package is
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_core_never_imports_the_world():
    for module, (top, _) in GRAPH.items():
        if module.startswith("attndb_peft.world") or module in APPLICATION:
            continue
        assert not any(t.startswith("attndb_peft.world") for t in top), module


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_modules_and_classes_read_at_a_glance(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{_name(path)}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{_name(path)}.{node.name}: {length} lines"


def test_every_error_the_package_raises_on_purpose_is_one_family():
    """`except attndb_peft.AttnDBError` catches every exception class the package defines, each either a usage
    error (exit 2) or a run error (exit 1)."""
    import importlib
    import inspect

    import attndb_peft
    from attndb_peft.errors import AttnDBError, RunError, UsageError

    found = set()
    for module in sorted(set(GRAPH) - {"attndb_peft.__main__"}):  # importing __main__ runs the CLI
        for _, obj in inspect.getmembers(importlib.import_module(module), inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("attndb_peft"):
                found.add(obj)
    assert len(found) >= 12  # the family and the ten classes of the modules that raise them
    for cls in found:
        assert issubclass(cls, AttnDBError), cls
        assert issubclass(cls, UsageError) != issubclass(cls, RunError) or cls is AttnDBError, cls
        assert cls.exit_code == (2 if issubclass(cls, UsageError) else 1), cls
    assert attndb_peft.AttnDBError is AttnDBError and attndb_peft.UsageError is UsageError
