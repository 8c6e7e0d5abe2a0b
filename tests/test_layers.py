"""The package's layers hold: each module imports only its own layer and the ones below, there is no
import circle (imports under TYPE_CHECKING and inside functions count), and every module imports.

Layers, bottom up: the base modules (lorad/*.py), engine, library, report, daemon, cli.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import lorad

PACKAGE = Path(lorad.__file__).parent
MIGRATIONS = PACKAGE.parent / "migrations"  # installed as lorad._migrations
LAYERS = ("base", "engine", "library", "report", "daemon", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    if path.is_relative_to(MIGRATIONS):
        parts = ("lorad", "_migrations", *path.relative_to(MIGRATIONS).with_suffix("").parts)
    else:
        parts = ("lorad", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *MIGRATIONS.rglob("*.py")]
    return {_module_name(p): p for p in sorted(files)}


SOURCES = _sources()


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "__main__":
        return "cli"  # `python -m lorad` runs the CLI
    if len(parts) > 1 and parts[1] == "_migrations":
        return "library"  # Alembic's environment: the library's database
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return "base"


def _target(name: str) -> str:
    """The lorad module an import names: the module itself, or the package it comes from."""
    while name not in SOURCES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    return imports_in(SOURCES[module].read_text(), module)


def imports_in(source: str, module: str) -> set[str]:
    """Every lorad module the source of `module` imports, wherever the import stands (top level, a
    function, or an `if TYPE_CHECKING:` block)."""
    tree = ast.parse(source, module)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorad"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import (lorad imports absolutely)"
            if node.module and node.module.split(".")[0] == "lorad":
                # `from lorad.library import folders` names a module; `from lorad.x import f` a name
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in SOURCES else node.module
                          for a in node.names}  # fmt: skip
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SOURCES:
            found.add(node.value)  # a module run by name (`python -m lorad.x`) is a dependency too
    return {_target(name) for name in found} - {module}


GRAPH = {module: imports_of(module) for module in SOURCES}


def test_the_layers_are_where_the_design_says():
    assert {layer_of(m) for m in SOURCES} == set(LAYERS)
    assert layer_of("lorad.engine.reduce.svd") == "engine"
    assert layer_of("lorad.library.db.models") == "library"
    assert layer_of("lorad.daemon.control.server") == "daemon"
    assert layer_of("lorad.errors") == "base"
    # A layer's __init__ imports nothing: importing one module loads only what that module needs
    # (the daemon never loads torch through lorad.engine, the reduction child not the daemon).
    for package in ("lorad.engine", "lorad.library", "lorad.report", "lorad.daemon", "lorad.cli"):
        assert GRAPH[package] == set(), package


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_a_module_imports_only_its_layer_and_the_ones_below(module):
    upward = sorted(t for t in GRAPH[module] if RANK[layer_of(t)] > RANK[layer_of(module)])
    assert upward == [], f"{module} ({layer_of(module)}) imports a layer above it: {upward}"


def test_the_check_sees_an_upward_import():
    """The rule above fails on what it is meant to catch: an engine module importing the library,
    even for type checking only, even inside a function, or running a daemon module by name."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lorad.library.store import Store\n"
              "def f():\n    from lorad.daemon import worker\n"
              "CHILD = [sys.executable, '-m', 'lorad.daemon._reduce_child']\n")  # fmt: skip
    found = imports_in(source, "lorad.engine.probe")
    assert found == {"lorad.library.store", "lorad.daemon.worker", "lorad.daemon._reduce_child"}
    assert all(RANK[layer_of(m)] > RANK["engine"] for m in found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _cycles(GRAPH) == []


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_module_of_a_layer_imports(layer):
    # lorad.__main__ runs the CLI and exits; the Alembic scripts run only inside Alembic.
    runnable = ("lorad.__main__", "lorad._migrations.")
    for module in sorted(m for m in SOURCES if layer_of(m) == layer and not m.startswith(runnable)):
        importlib.import_module(module)


def test_the_daemon_side_never_loads_torch():
    """The daemon holds no torch (nor a CUDA context) while idle: no module of the library, the
    report or the daemon may load it at import; the reduction child loads it inside its job."""
    modules = sorted(m for m in SOURCES if layer_of(m) in ("base", "library", "report", "daemon")
                     and not m.startswith("lorad._migrations"))  # fmt: skip
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
