"""Layers point one way (issue 11, item 7): exceptions live in errors.py, conformance does not
import testing, context and report reach into checks/ only for the torch-free catalogue, and
the human renderers share render.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bncheck"


def _imports(module: str) -> set[str]:
    """The bncheck modules ``module`` imports (at any depth of the file), as dotted names."""
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    package = module.rsplit(".", 1)[0] if "." in module else ""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("bncheck"):
                    found.add(node.module.removeprefix("bncheck").lstrip("."))
                continue
            base = (
                package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
            )
            parts = [*filter(None, base), *([node.module] if node.module else [])]
            target = ".".join(parts)
            if node.module is None:
                found.update(f"{target}.{a.name}".lstrip(".") for a in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("bncheck").lstrip(".")
                for a in node.names
                if a.name.startswith("bncheck")
            )
    return found


def test_conformance_does_not_import_testing() -> None:
    assert "testing" not in _imports("conformance")


@pytest.mark.parametrize("module", ["context", "report", "render", "errors", "diagnosis"])
def test_core_modules_reach_into_checks_only_for_the_catalogue(module: str) -> None:
    assert {m for m in _imports(module) if m.startswith("checks")} <= {"checks.catalogue"}


def test_failures_are_defined_in_errors_and_re_exported() -> None:
    from bncheck import conformance, errors, testing

    assert testing.BNCheckFailure is errors.BNCheckFailure
    assert testing.ConformanceFailure is errors.ConformanceFailure
    assert conformance.ConformanceFailure is errors.ConformanceFailure
    assert issubclass(errors.ConformanceFailure, AssertionError)
    assert f"{testing.BNCheckFailure.__module__}.BNCheckFailure" == "bncheck.testing.BNCheckFailure"
    import pickle

    failure = pickle.loads(pickle.dumps(errors.ConformanceFailure("x")))
    assert type(failure) is errors.ConformanceFailure


@pytest.mark.parametrize("module", ["engine", "report", "testing", "conformance", "render"])
def test_no_second_first_line_helper(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not names & {"first_line", "_first_line"}


@pytest.mark.parametrize("module", ["report", "testing", "plugin"])
def test_human_renderers_use_the_shared_render_module(module: str) -> None:
    assert "render" in _imports(module)
    source = (PACKAGE / f"{module}.py").read_text()
    assert "tabulate(" not in source  # tables are built in render.py
