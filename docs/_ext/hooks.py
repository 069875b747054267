"""MkDocs hooks: pages made from files that live outside `docs/`, and an API reference that
cannot miss a public name.

- `<!-- include: PATH -->` in a page is replaced by the file at PATH (from the repository root);
  `shift=N` demotes its headings by N levels (outside code fences), `code=LANG` shows it as a
  code block instead. The benchmark results, the changelog and the examples stay in one place.
- `<!-- funchess:unplaced -->` becomes one `::: funchess.NAME` entry for every public name of
  `funchess` and `funchess.testing` that no page of the reference documents yet, so a new name
  is on the site the day it lands (and the reference's "More" page says where it belongs).
- `<!-- funchess:summary -->` becomes a table of every public name with the first line of its
  docstring, linked to its entry.
- `<!-- funchess:examples -->` becomes one section per script in `examples/`: its docstring
  (what it shows, how to run it) and its source, so the page never lags the scripts.
- The pictures under `benchmarks/results/` are published under `benchmarks/` in the site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
_INCLUDE = re.compile(r"<!--\s*include:\s*(\S+)((?:\s+\w+=\S+)*)\s*-->")
_UNPLACED = "<!-- funchess:unplaced -->"
_SUMMARY = "<!-- funchess:summary -->"
_EXAMPLES = "<!-- funchess:examples -->"
_DIRECTIVE = re.compile(r"^::: (funchess(?:\.testing)?\.\w+)\s*$", re.M)


def _shift_headings(text: str, levels: int) -> str:
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _include(match: re.Match[str]) -> str:
    path = ROOT / match.group(1)
    options = dict(opt.split("=", 1) for opt in match.group(2).split())
    text = path.read_text(encoding="utf-8")
    if "code" in options:
        return f"```{options['code']}\n{text.rstrip()}\n```"
    return _shift_headings(text, int(options.get("shift", 0)))


def public_names() -> list[str]:
    """Every public name of the package and its oracle, as `module.name`."""
    import funchess
    import funchess.testing

    names = [f"funchess.{n}" for n in funchess.__all__ if n != "testing"]
    return names + [f"funchess.testing.{n}" for n in funchess.testing.__all__]


def documented_names(reference: Path) -> set[str]:
    """The names that have a `::: name` entry on a page of the API reference."""
    return {m for page in reference.glob("*.md") for m in _DIRECTIVE.findall(page.read_text(encoding="utf-8"))}


def _summary_line(name: str) -> str:
    import importlib
    import inspect

    module_name, _, attr = name.rpartition(".")
    module = importlib.import_module(module_name)
    obj = getattr(module, attr)
    if callable(obj) or inspect.ismodule(obj):
        doc = obj.__doc__ or ""
    else:  # a constant: its `#:` comment lines
        source = inspect.getsource(module).splitlines()
        at = next(i for i, line in enumerate(source) if re.match(rf"{attr}\b", line))
        above: list[str] = []
        for line in reversed(source[:at]):
            if not line.startswith("#:"):
                break
            above.insert(0, line[2:].strip())
        doc = " ".join(above)
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return " ".join(first.split()).replace("|", "\\|")


def summary_table() -> str:
    rows = [f"| [`{name}`][{name}] | {_summary_line(name)} |" for name in public_names()]
    return "\n".join(["| name | what it is |", "|---|---|", *rows])


def example_sections() -> str:
    """A section per example script (anchor: the file's stem): the docstring's title in bold, the
    rest of it as text, the source folded below."""
    import ast

    sections = []
    scripts = sorted((ROOT / "examples").glob("*.py"), key=lambda p: (p.stem != "quickstart", p.name))
    for script in scripts:
        source = script.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source)) or script.stem
        title, _, body = doc.partition("\n\n")
        body = re.sub(r"^Run: (.*)$", r"Run: `\1`", body, flags=re.M)  # `[--quick]` is no link
        code = "\n".join("    " + line if line else "" for line in ["```python", *source.rstrip().splitlines(), "```"])
        sections.append(
            f"## {script.name} {{#{script.stem}}}\n\n**{' '.join(title.split())}**\n\n{body.strip()}\n\n"
            f'??? example "The source: examples/{script.name}"\n\n{code}\n'
        )
    return "\n".join(sections)


def on_files(files: Files, config: Any) -> Files:
    for picture in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{picture.name}", abs_src_path=str(picture)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    markdown = _INCLUDE.sub(_include, markdown)
    if _EXAMPLES in markdown:
        markdown = markdown.replace(_EXAMPLES, example_sections())
    if _SUMMARY in markdown:
        markdown = markdown.replace(_SUMMARY, summary_table())
    if _UNPLACED in markdown:
        placed = documented_names(Path(config["docs_dir"]) / "reference")
        missing = [name for name in public_names() if name not in placed]
        entries = "\n\n".join(f"::: {name}" for name in missing)
        markdown = markdown.replace(_UNPLACED, entries or "Every public name has its place on the pages above.")
    return markdown
