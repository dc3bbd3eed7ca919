"""List the private names of Pipecat that Atlas's own code uses, and where.

A private name here is one with a single leading underscore that Pipecat's source defines (a method, or an
attribute it sets or reads). Counted:
- in a class derived from a Pipecat class: such a name it reads, sets, calls on `self`/`super()`, or
  overrides, when a Pipecat class in its ancestry defines it;
- anywhere else: `something._name` where Pipecat defines `_name` and no class of Atlas does;
- `x.__class__ = ...`: swapping the class of a live object (Pipecat's own objects, here).

Run: `python scripts/pipecat_privates.py [paths...]` (default: the application's packages); prints one
line per use and the totals. tests/test_compat.py runs it to check that every use is in compat/.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def application_packages() -> list[str]:
    """The packages of the layers (import-linter's root packages in pyproject.toml)."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _names_in_source(path: Path) -> set[str]:
    names: set[str] = set()
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
            names.add(node.name)
    return names


_PIPECAT_ROOT = Path(importlib.util.find_spec("pipecat").origin).parent
_pipecat_all: set[str] | None = None
_file_names: dict[Path, set[str]] = {}


def pipecat_names() -> set[str]:
    global _pipecat_all
    if _pipecat_all is None:
        _pipecat_all = set()
        for path in _PIPECAT_ROOT.rglob("*.py"):
            _pipecat_all |= _names_in_source(path)
    return _pipecat_all


def _pipecat_ancestry_names(cls: type) -> set[str]:
    names: set[str] = set()
    for base in cls.__mro__[1:]:
        module = sys.modules.get(base.__module__)
        path = Path(getattr(module, "__file__", "") or "")
        if _PIPECAT_ROOT in path.parents:
            if path not in _file_names:
                _file_names[path] = _names_in_source(path)
            names |= _file_names[path]
    return names


def _own_names(files: list[Path]) -> set[str]:
    """Private names Atlas's own non-Pipecat classes define (so `obj._x` on one of ours is not counted)."""
    names: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                names.add(node.name)
    return names


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def uses(paths: list[Path]) -> list[tuple[str, int, str]]:
    """(file, line, what) for every use of a Pipecat private in the given files."""
    files = [p for p in paths if p.suffix == ".py"]
    pipecat = pipecat_names()
    ours = _own_names(files)
    found: list[tuple[str, int, str]] = []
    for path in files:
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text())
        module = importlib.import_module(_module_name(path))
        in_pipecat_class: set[int] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            cls = getattr(module, node.name, None)
            if not inspect.isclass(cls):
                continue
            inherited = _pipecat_ancestry_names(cls)
            if not inherited:
                continue
            for sub in ast.walk(node):
                in_pipecat_class.add(id(sub))
                name = None
                if isinstance(sub, ast.Attribute) and _private(sub.attr):
                    name = sub.attr
                elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(sub.name):
                    name = sub.name
                if name and name in inherited:
                    found.append((rel, sub.lineno, f"{node.name}: {name}"))
        for node in ast.walk(tree):
            if id(node) in in_pipecat_class:
                continue
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and node.attr in pipecat
                and node.attr not in ours
            ):
                found.append((rel, node.lineno, node.attr))
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets
            ):
                found.append((rel, node.lineno, "__class__ swap"))
        for node in ast.walk(tree):
            if (
                id(node) in in_pipecat_class
                and isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets)
            ):
                found.append((rel, node.lineno, "__class__ swap"))
    return sorted(set(found))


def default_files() -> list[Path]:
    return sorted(p for pkg in application_packages() if (REPO / pkg).is_dir() for p in (REPO / pkg).rglob("*.py"))


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    files = [Path(a).resolve() for a in argv] or default_files()
    found = uses(files)
    for rel, line, what in found:
        print(f"{rel}:{line}: {what}")
    names = {what.split(": ")[-1] for _, _, what in found}
    print(f"{len(found)} uses of {len(names)} private names in {len({f for f, _, _ in found})} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
