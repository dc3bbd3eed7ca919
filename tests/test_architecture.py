"""The layers of docs/ARCHITECTURE.md hold: import-linter's contract (pyproject.toml) is kept by the code as
it is, and broken by an upward import (shown on a copy of the tree with one added)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def packages() -> list[str]:
    """The packages of the layers (import-linter's root packages in pyproject.toml)."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    linter = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(linter), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_the_layers_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    for name in packages():
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    # The bottom layer reaching up to a door:
    with (tmp_path / "vocabulary" / "audio.py").open("a") as f:
        f.write("\nfrom transports.common import close_quietly  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "vocabulary.audio -> transports.common" in result.stdout


def test_every_module_the_server_imports_is_installed_by_serve():
    """`serve` installs requirements-serve.lock, without the test tools: every third-party module the layers
    import must come from a distribution in it (jsonschema, once reached only through a test tool, did not)."""
    import ast
    import importlib.metadata
    import re

    pinned = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
        for line in (REPO / "requirements-serve.lock").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    own = set(packages()) | {"tests", "fakes", "bench"}
    providers = importlib.metadata.packages_distributions()
    missing: dict[str, str] = {}
    for package in packages():
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in own or top in sys.stdlib_module_names:
                        continue
                    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(top, [])}
                    if not dists & pinned:
                        missing[top] = str(path.relative_to(REPO))
    assert not missing, f"imported by the server but not installed by `serve`: {missing}"
