"""The project around the code: types, the quick-start example, the public surface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error::DeprecationWarning:funchess")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_quickstart_example_runs_and_checks_against_the_loop() -> None:
    out = _run("examples/quickstart.py")
    assert out.returncode == 0, out.stderr
    assert "matches the nested loop" in out.stdout


def test_mypy_strict_passes() -> None:
    pytest.importorskip("mypy")
    out = _run("-m", "mypy", "--no-error-summary", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_public_name_is_documented_with_an_example() -> None:
    import funchess.testing

    for module in (funchess, funchess.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, (dict, str, int, float)) or obj is None:
                continue
            doc = obj.__doc__ or ""
            assert "Example" in doc or ">>>" in doc, f"{module.__name__}.{name} has no example"


def _core_imports() -> dict[str, set[tuple[str, str]]]:
    """For every core module: the `(module, name)` pairs it imports from sibling core modules."""
    import ast

    out: dict[str, set[tuple[str, str]]] = {}
    for path in (ROOT / "funchess").glob("*.py"):
        names: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.update((node.module or "", a.name) for a in node.names)
        out[path.stem] = names
    return out


def test_the_core_is_layered_without_cycles_or_private_crossings() -> None:
    imports = _core_imports()
    graph = {m: {mod for mod, _ in names if mod in imports} for m, names in imports.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, n])}"
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    crossings = {(m, mod, name) for m, names in imports.items() for mod, name in names if name.startswith("_") and not name.startswith("__")}
    assert not crossings, f"private names imported across modules: {sorted(crossings)}"
    assert not any(mod == "cli" or mod.startswith("cli.") for names in imports.values() for mod, _ in names), "the core imports the CLI"


def test_no_core_module_is_longer_than_it_can_be_read_in_a_sitting() -> None:
    long = {p.name: n for p in (ROOT / "funchess").glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
