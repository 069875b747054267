"""The worked examples run as a user runs them, `python examples/NAME.py --quick`, and check their
own numbers (against the nested loop, the dense Hessian, retraining); a failed check exits
non-zero. All of them start at once, each in its own process with one thread, so the file costs
about the slowest example rather than their sum.

A new example needs no edit here: every `examples/*.py` runs with `--quick` and must exit 0;
an entry in `EXAMPLES` adds arguments and the lines its output must contain. An example that
imports an optional package (`OPTIONAL`, e.g. laplace-torch) skips, naming it, where that
package is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
#: run by other tests: tests/test_project.py, tests/test_laplace.py
SKIP = {"quickstart.py", "laplace_regression_classification.py"}

#: script -> (arguments after --quick, strings its output must contain). `{tmp}` is a fresh folder.
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "hessian_of_a_loss.py": ([], ["matches the nested loop", "matches the torch.autograd.functional.hessian"]),
    "per_sample_hessians.py": ([], ["== the batch Hessian", "per_sample_hvp == H_i @ v"]),
    "loss_landscape_spectrum.py": (["--out", "{tmp}/spectrum.png"], ["dense check: top", "wrote"]),
    "influence_functions.py": ([], ["converged True", "correlation"]),
    "memory_planner.py": ([], ["funchess.hessian refuses", "exact trace"]),
}


#: top-level packages an example may need beyond funchess's `test` extra: missing means skip
OPTIONAL = {"laplace", "curvlinops", "backpack"}


def missing_optional(name: str) -> list[str]:
    """The optional packages `examples/name` imports that are not installed."""
    tree = ast.parse((ROOT / "examples" / name).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    return sorted(m for m in imported & OPTIONAL if importlib.util.find_spec(m) is None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    tmp = tmp_path_factory.mktemp("examples")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:funchess,error::FutureWarning"  # the current API only
    procs = {}
    for name in SCRIPTS:
        if name in SKIP or missing_optional(name):
            continue
        extra = [a.replace("{tmp}", str(tmp)) for a in EXAMPLES.get(name, ([], []))[0]]
        procs[name] = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / name), "--quick", *extra],
            cwd=tmp,  # whatever an example writes lands there
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    yield results


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s not in SKIP])
def test_example_runs_and_its_checks_pass(name: str, runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    if missing := missing_optional(name):
        pytest.skip(f"examples/{name} needs {', '.join(missing)}, not installed")
    run = runs[name]
    assert run.returncode == 0, f"examples/{name} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    for expected in EXAMPLES.get(name, ([], []))[1]:
        assert expected in run.stdout, f"examples/{name}: {expected!r} not in its output:\n{run.stdout}"
    assert "Warning" not in run.stderr, f"examples/{name} warned:\n{run.stderr}"


def test_the_spectrum_example_writes_its_picture(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["loss_landscape_spectrum.py"].stdout
    picture = Path(out.split("wrote ", 1)[1].split()[0])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_names_only_existing_examples() -> None:
    assert set(EXAMPLES) <= set(SCRIPTS), set(EXAMPLES) - set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_uses_only_public_names_and_says_how_to_run_it(name: str) -> None:
    source = (ROOT / "examples" / name).read_text()
    tree = ast.parse(source)
    private = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("funchess._"))
        or (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and ast.unparse(node.value).startswith("funchess"))
    ]
    assert not private, f"examples/{name} uses private names: {private}"
    doc = ast.get_docstring(tree) or ""
    assert f"python examples/{name}" in doc, f"examples/{name}: its docstring should say how to run it"
