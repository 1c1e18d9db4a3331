"""The package layout says where code runs, and the imports keep it true: what tritonserver's stubs load
(lookalike.serving) imports nothing of the operator's tooling, and the stubs import only lookalike.serving."""

import ast
from pathlib import Path

from tests.conftest import ROOT

TOOLING = ("lookalike.indexing", "lookalike.server", "lookalike.quality", "lookalike.cli", "lookalike_export", "loadtest")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offenders(paths, forbidden) -> list[str]:
    return sorted(f"{p.relative_to(ROOT)}: {name}" for p in paths for name in imported_modules(p)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_serving_imports_none_of_the_operators_tooling():
    files = sorted((ROOT / "lookalike" / "serving").rglob("*.py"))
    assert len(files) > 10
    assert offenders(files, TOOLING) == []


def test_the_model_stubs_import_only_the_serving_package():
    files = sorted((ROOT / "model_repository").rglob("model.py"))
    assert len(files) >= 4
    lookalike = {name for p in files for name in imported_modules(p) if name.startswith("lookalike.")}
    assert lookalike and all(name.startswith("lookalike.serving") for name in lookalike), sorted(lookalike)


def test_no_package_relative_imports_hide_a_cross_package_edge():
    relative = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in (ROOT / "lookalike").rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []
