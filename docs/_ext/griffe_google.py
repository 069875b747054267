"""A griffe extension: read funchess's Google-style docstrings the way the doctests read them.

Two habits of the source that griffe's Google parser does not share, normalised before parsing
so that the docstrings stay as they are:

- `Example:` (singular) opens the doctest examples; griffe knows only `Examples:` and would
  render the `>>>` lines as Markdown text (where `H["w"]["b"]` reads as a link reference).
- `Args:` entries may document several parameters at once (`f, argnums, has_aux: as in
  funchess.hessian.`); each name gets its own entry, so griffe can check every name against the
  signature and show its type.
- `Returns:` is prose that may contain a colon (`` `(f, params)`: ... ``), which griffe would
  read as "type: description"; the function's return annotation is put in front, so the colon
  stays in the text.
- A module constant documented by `#:` comments above it (Sphinx's habit) gets them as its
  docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+)(\s*(?:\([^)]*\))?:\s.*|\s*(?:\([^)]*\))?:)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def normalise(text: str) -> str:
    """The docstring with `Example:` renamed and grouped `Args:` entries split."""
    lines = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", text, flags=re.M).split("\n")
    out: list[str] = []
    i, section = 0, None  # section: the indentation of the current Args header
    while i < len(lines):
        line = lines[i]
        header = _HEADER.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        grouped = _GROUPED.match(line) if section is not None else None
        if grouped:
            body = []  # the entry's continuation lines, indented deeper than its name
            while i + 1 < len(lines) and (not lines[i + 1].strip() or _indent(lines[i + 1]) > _indent(line)):
                i += 1
                body.append(lines[i])
            trailing = 0
            while body and not body[-1].strip():
                body.pop()
                trailing += 1
            for name in re.split(r",\s*", grouped.group(2)):
                out.extend([f"{grouped.group(1)}{name}{grouped.group(3)}", *body])
            out.extend([""] * trailing)  # the blank line that ends the section stays
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


def annotate_returns(text: str, annotation: str) -> str:
    """Put `annotation: ` before the first line of the `Returns:` section when that line has a
    colon of its own."""
    lines = text.split("\n")
    for i, line in enumerate(lines[:-1]):
        if re.match(r"^\s*Returns:\s*$", line):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and ":" in lines[j]:
                indent = len(lines[j]) - len(lines[j].lstrip())
                lines[j] = f"{lines[j][:indent]}{annotation}: {lines[j][indent:]}"
            break
    return "\n".join(lines)


def comment_docstring(source: list[str], lineno: int) -> str:
    """The `#:` comment lines right above line `lineno` (1-based), joined."""
    lines: list[str] = []
    i = min(lineno, len(source) + 1) - 2
    while i >= 0 and source[i].lstrip().startswith("#:"):
        lines.insert(0, source[i].lstrip()[2:].strip())
        i -= 1
    return "\n".join(lines)


class GoogleHabits(griffe.Extension):
    """Normalise every docstring as soon as griffe has read it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute and obj.lineno and obj.parent is not None and obj.parent.is_module:
            text = comment_docstring(obj.parent.lines, obj.lineno)
            if text:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)
            returns = getattr(obj, "returns", None) if obj.is_function else None
            if returns is not None:
                obj.docstring.value = annotate_returns(obj.docstring.value, str(returns))
