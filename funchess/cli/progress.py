"""Progress bars for the command line: drawn only on a terminal, closed honestly.

A bar is drawn when it is asked for (no `--no-progress`) and its stream (stderr) is a terminal:
a log file or a pipe gets no carriage-return redraws. A bar counts the items it was given; when
the loop ends early (an error, Ctrl-C) it is closed where it stopped, never filled up to a total
it did not reach. tqdm is imported only when a bar is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

__all__ = ["Bar", "drawn"]


def drawn(enabled: bool, stream: IO[str] | None = None) -> bool:
    """Whether a bar is drawn: asked for, and `stream` (default: stderr) is a terminal.

    Example:
        >>> import io
        >>> drawn(True, io.StringIO())  # a file or a pipe: no bar
        False
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(enabled and isatty is not None and isatty())


class Bar:
    """A progress bar over `items` (a tqdm bar when drawn, else silent), used as a context manager.

    `write` prints a line above a drawn bar (or plainly, through `print_fn`, when there is none);
    `note` sets the text after the counts.

    Example:
        >>> import io
        >>> with Bar(range(3), desc="steps", enabled=True, stream=io.StringIO()) as bar:
        ...     total = sum(bar)
        >>> total, bar.done
        (3, 3)
    """

    def __init__(self, items: Iterable[Any], *, desc: str, enabled: bool, unit: str = "it",
                 stream: IO[str] | None = None, leave: bool = True,
                 print_fn: Callable[[str], None] = print) -> None:
        self._items = items
        self._print = print_fn
        self.done = 0
        self._tqdm: Any = None
        if drawn(enabled, stream):
            from tqdm import tqdm

            total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream or sys.stderr,
                              dynamic_ncols=True)

    def __iter__(self) -> Iterator[Any]:
        for item in self._items:
            yield item
            self.done += 1
            if self._tqdm is not None:
                self._tqdm.update(1)

    def describe(self, text: str) -> None:
        """Set the bar's description (what it is working on now)."""
        if self._tqdm is not None:
            self._tqdm.set_description(text, refresh=False)

    def note(self, text: str) -> None:
        """Set the text after the counts (e.g. the current loss)."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)

    def write(self, line: str) -> None:
        """Print `line` to stdout without breaking a drawn bar."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=sys.stdout)
        else:
            self._print(line)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
