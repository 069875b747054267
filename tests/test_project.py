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


def _imports() -> dict[str, set[tuple[str, str]]]:
    """For every module of the package (subpackages included, dotted names relative to `funchess`,
    "" for the package itself): the `(module, name)` pairs it imports from funchess, at the top or
    inside functions (a deferred import is still a dependency)."""
    import ast

    out: dict[str, set[tuple[str, str]]] = {}
    root = ROOT / "funchess"
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]
        name = ".".join(package if parts[-1] == "__init__" else parts)
        names: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names.update((target, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "funchess":
                names.update((node.module.partition(".")[2], a.name) for a in node.names)
        out[name] = names
    return out


def _package_of(module: str) -> str:
    return module.rpartition(".")[0]


def test_the_package_is_layered_without_cycles_or_private_crossings() -> None:
    imports = _imports()

    def dependency(target: str, name: str) -> str | None:
        full = f"{target}.{name}" if target else name
        return full if full in imports else target if target in imports else None

    graph = {m: {d for t, n in names if (d := dependency(t, n)) not in (None, m)} for m, names in imports.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, n])}"
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(imports):
        if m not in state:
            visit(m, [m])

    def crossing(m: str, target: str, name: str) -> bool:
        """A private name taken from another module, unless both sit in the same subpackage."""
        if not name.startswith("_") or name.startswith("__") or (f"{target}.{name}" if target else name) in imports:
            return False
        home = _package_of(m)
        return not (home and (target == home or _package_of(target) == home))

    crossings = sorted((m, t, n) for m, names in imports.items() for t, n in names if crossing(m, t, n))
    assert not crossings, f"private names imported across modules: {crossings}"
    upper = ("cli", "distributed", "integrations")
    for m, names in imports.items():
        layer = m.split(".")[0]
        for t, _ in names:
            top = t.split(".")[0]
            if top in upper and top != layer and m not in ("", "__main__"):
                pytest.fail(f"{m} imports {t}: the core and the layers above it only import downward")


def test_no_core_module_is_longer_than_it_can_be_read_in_a_sitting() -> None:
    long = {p.name: n for p in (ROOT / "funchess").glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
