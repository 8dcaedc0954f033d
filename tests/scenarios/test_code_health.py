"""The structure and style the project keeps: imports point down, ruff is clean, mypy passes.

These run the same tools a developer runs by hand, on the checkout under test, so a pull that
adds an upward import, an unformatted file or a type error fails the suite, not a review.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The tool installed beside this Python (the test extra installs them)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_imports_point_down_the_layers() -> None:
    result = run(tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The same checker, on a two-layer package with one import pointing up, reports it."""
    package = tmp_path / "house"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    for folder in (package, package / "low", package / "high"):
        (folder / "__init__.py").write_text("")
    (package / "high" / "room.py").write_text("from house.low import cellar\n")
    (package / "low" / "cellar.py").write_text("from house.high import room  # points up\n")
    (tmp_path / ".importlinter").write_text(
        textwrap.dedent("""\
        [importlinter]
        root_package = house

        [importlinter:contract:layers]
        name = Layers
        type = layers
        layers =
            house.high
            house.low
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run(tool("lint-imports"), "--no-cache", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "house.low.cellar -> house.high.room" in result.stdout


def test_ruff_lint_and_format_are_clean() -> None:
    lint = run(tool("ruff"), "check", "batchcap", "tests")
    assert lint.returncode == 0, lint.stdout[-3000:]
    formatted = run(tool("ruff"), "format", "--check", "batchcap", "tests")
    assert formatted.returncode == 0, formatted.stdout[-3000:] + "\nrun: ruff format batchcap tests"


@pytest.mark.slow
def test_the_package_type_checks() -> None:
    result = run(tool("mypy"))  # files and settings: [tool.mypy] in pyproject.toml
    assert result.returncode == 0, result.stdout[-4000:]


def test_no_function_level_import_of_batchcap_outside_the_cli() -> None:
    """An import inside a function may defer a heavy library, never dodge a circle between our modules."""
    import ast

    found = []
    for path in sorted((REPO / "batchcap").rglob("*.py")):
        if path.relative_to(REPO / "batchcap").as_posix() in ("cli.py", "__init__.py"):
            continue  # the click layer and the package root defer the library: --help and import stay fast
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("batchcap"):
                        found.append(f"{path.relative_to(REPO)}:{inner.lineno} {inner.module}")
    assert not found, found
