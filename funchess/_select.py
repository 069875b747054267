"""Which Hessian blocks to compute: `blocks=` names and glob patterns -> leaf pairs."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import Literal, Union

from ._errors import InvalidArgumentError

Pair = tuple[int, int]
#: None (every block), "diagonal" (block-diagonal), or a list whose items are a pattern `p`
#: (all blocks among the parameters matching `p`) or a pair `(p, q)` (blocks `H[a][b]`, `a`
#: matching `p`, `b` matching `q`). Patterns are parameter names or `fnmatch` globs.
Blocks = Union[None, Literal["diagonal"], Sequence[Union[str, tuple[str, str]]]]  # noqa: UP007 (runtime alias, Python 3.10)


def _match(call: str, pattern: object, names: Sequence[str]) -> list[int]:
    if not isinstance(pattern, str):
        raise InvalidArgumentError(
            f"{call}: expected block patterns to be strings (parameter names or globs), got "
            f"{type(pattern).__name__}. Pass e.g. blocks=['encoder.*'] or [('0.*', '2.*')]."
        )
    hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        close = difflib.get_close_matches(pattern, list(names), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        shown = ", ".join(map(repr, names[:6])) + (", ..." if len(names) > 6 else "")
        raise InvalidArgumentError(
            f"{call}: block pattern {pattern!r} matches no parameter; expected one of {shown}.{hint} "
            f"Use parameter names (dict keys joined by '.') or glob patterns."
        )
    return hits


def resolve_blocks(call: str, blocks: Blocks, names: Sequence[str]) -> tuple[set[Pair], list[Pair] | None]:
    """`(unordered pairs to compute, ordered pairs to return or None for the full Hessian)`."""
    n = len(names)
    if blocks is None:
        return {(i, j) for i in range(n) for j in range(i, n)}, None
    if blocks == "diagonal":
        wanted = [(i, i) for i in range(n)]
    elif isinstance(blocks, (list, tuple)) and blocks:
        chosen: set[Pair] = set()
        for item in blocks:
            if isinstance(item, tuple) and len(item) == 2:
                rows, cols = _match(call, item[0], names), _match(call, item[1], names)
            elif isinstance(item, str):
                rows = cols = _match(call, item, names)
            else:
                raise InvalidArgumentError(
                    f"{call}: expected each item of blocks= to be a pattern or a (pattern, "
                    f"pattern) pair, got {item!r}. Pass e.g. blocks=['head.*', ('encoder.*', 'head.*')]."
                )
            chosen.update((a, b) for a in rows for b in cols)
        wanted = sorted(chosen)
    else:
        raise InvalidArgumentError(
            f"{call}: expected blocks= to be None, 'diagonal' or a non-empty list of patterns / "
            f"pattern pairs, got {blocks!r}. Pass e.g. blocks='diagonal' or blocks=['encoder.*']."
        )
    return {(min(a, b), max(a, b)) for a, b in wanted}, wanted


def resolve_leaves(call: str, patterns: str | Sequence[str] | None, names: Sequence[str]) -> list[int]:
    """Leaf indices matching `patterns` (all leaves for None), in leaf order."""
    if patterns is None:
        return list(range(len(names)))
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats:
        raise InvalidArgumentError(
            f"{call}: expected at least one pattern in blocks=, got an empty list. Pass None for all "
            f"parameters."
        )
    return sorted({i for p in pats for i in _match(call, p, names)})
