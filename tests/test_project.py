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
