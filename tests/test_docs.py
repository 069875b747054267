"""The documentation: the site builds with warnings as errors, documents every public name, and
every Python snippet on it (and in the README) runs.

The build needs the `docs` extra (MkDocs, mkdocstrings, Material), which the `test` extra pulls
in; without it the build tests skip and say so. The snippets need only funchess.
"""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import funchess
import funchess.testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(module, reason="the docs tools: pip install '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's notice about MkDocs 2, not ours
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out), "--config-file", "mkdocs.yml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    return out


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    import yaml

    def pages(nav: str | list[object] | dict[str, object]) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        items = list(nav.values()) if isinstance(nav, dict) else nav
        return [page for item in items for page in pages(item)]  # type: ignore[arg-type]

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    for page in pages(nav):
        stem = page.removesuffix(".md").removesuffix("index").rstrip("/")
        assert (site / stem / "index.html").is_file(), f"{page} was not built"
    listed = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed <= set(pages(nav)), f"pages missing from the nav in mkdocs.yml: {sorted(listed - set(pages(nav)))}"


def _integrations() -> list[str]:
    """`funchess.integrations.X.NAME` for every name in the `__all__` of each adapter, read from
    the source (importing an adapter needs its optional package)."""
    names = []
    for path in sorted((ROOT / "funchess" / "integrations").glob("[!_]*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names += [f"funchess.integrations.{path.stem}.{n}" for n in ast.literal_eval(node.value)]
    return names


def test_every_public_name_has_an_entry_in_the_api_reference(site: Path) -> None:
    text = "".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    names = [f"funchess.{n}" for n in funchess.__all__ if n != "testing"]
    names += [f"funchess.testing.{n}" for n in funchess.testing.__all__]
    names += _integrations()
    missing = [name for name in names if f'id="{name}"' not in text]
    assert not missing, f"not documented in the API reference: {missing}"


def test_the_benchmark_results_and_their_plot_are_on_the_site(site: Path) -> None:
    page = (site / "benchmarks" / "index.html").read_text()
    first_heading = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()[0].lstrip("# ")
    assert html.escape(first_heading) in page
    for picture in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (site / "benchmarks" / picture.name).read_bytes() == picture.read_bytes()


def test_every_example_is_on_the_examples_page(site: Path) -> None:
    page = (site / "examples" / "index.html").read_text()
    for script in (ROOT / "examples").glob("*.py"):
        assert f'id="{script.stem}"' in page, f"examples/{script.name} is not on the examples page"


# ----------------------------------------------------------------------------- snippets

SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *DOCS.rglob("*.md")])


def python_blocks(text: str) -> list[str]:
    """The ```python blocks, except those right after a `<!-- not run ... -->` line (fragments
    that need the reader's own model, data or an optional package)."""
    blocks = re.finditer(r"^(?:(<!-- not run[^\n]*-->)\n)?```python\n(.*?)^```", text, flags=re.S | re.M)
    return [m.group(2) for m in blocks if m.group(1) is None]


@pytest.mark.parametrize("source", [s for s in SOURCES if python_blocks((ROOT / s).read_text())])
def test_every_python_snippet_runs(source: str) -> None:
    """The blocks of one page run in order in one namespace, as a reader would paste them."""
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    torch.manual_seed(0)
    for i, code in enumerate(python_blocks((ROOT / source).read_text())):
        try:
            exec(compile(code, f"{source} (python block {i + 1})", "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(f"{source}, python block {i + 1} failed: {error!r}\n{code}") from error
