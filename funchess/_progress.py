"""Progress bars (tqdm, an optional dependency): one way to ask for them, one error without it.

`progress=True` always shows a bar, `None` only when standard error is a terminal (so logs and CI
output get no carriage-return spam), `False` never. A bar that stops early (a solver that
converged) is closed where it stopped; it never claims a total it did not reach.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from ._errors import UnsupportedError


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm(call: str, progress: bool | None) -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise UnsupportedError(
            f"{call}: progress={progress!r} needs tqdm, which is not installed ({exc}). Install it "
            f"(pip install tqdm, or pip install 'funchess[progress]'), or pass progress=False."
        ) from exc
    return tqdm


def wanted(progress: bool | None) -> bool:
    """Whether a bar is shown: always with True, on a terminal with None, never with False."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def bar(call: str, progress: bool | None, *, total: int | None, desc: str, unit: str) -> Any:
    """A bar with `update(n)` and `close()`; a do-nothing one when no bar is wanted."""
    if not wanted(progress):
        return _NoBar()
    tqdm = _tqdm(call, progress)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def iterate(call: str, data: Iterable[Any], progress: bool | None, *, total: int | None, desc: str, unit: str) -> Iterable[Any]:
    """`data`, advancing a bar per item when one is wanted."""
    if not wanted(progress):
        return data
    tqdm = _tqdm(call, progress)
    return tqdm(data, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)  # type: ignore[no-any-return]
