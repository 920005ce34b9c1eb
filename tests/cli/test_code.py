"""Budgets the source keeps: short functions and classes, one place that knows which kind
of model repository it holds, no import hidden inside a function to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "mnist_pipeline"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def test_no_function_over_60_lines_and_no_class_over_200() -> None:
    too_long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1
        > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)
    ]
    assert too_long == []


def test_only_the_repository_factory_asks_which_kind_it_holds() -> None:
    """repository.open_repository picks the folder's or the bucket's files; every caller
    then holds a Repository (storage.py's ModelRepository asks only to print itself)."""
    asking = {
        name
        for name, tree in trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "is_s3"
    }
    assert asking == {"repository.py", "storage.py"}


def test_the_package_imports_itself_at_the_top_of_modules_only() -> None:
    """The CLI imports stages lazily (torch stays out of the client image); anywhere else a
    function-local import of the package would hide an import cycle."""
    hidden = [
        f"{name}:{node.lineno}"
        for name, tree in trees().items()
        if name != "cli.py"
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_pipeline")
    ]
    assert hidden == []
