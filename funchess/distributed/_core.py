"""The few helpers of funchess's core (below the public API) that this package borrows, in one
place: when they move, only the imports below change. Everything else here builds on the public
API, `funchess._tree` and `funchess._errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .._checks import call_label as call_label  # "funchess.name(f, opt=...)", options past their defaults
from .._checks import check_reduction as check_reduction  # reduction must be "mean" or "sum"
from .._compose import RandomState
from .._data import DATA_FIX
from .._data import normaliser_of as normaliser_of  # W(inputs, targets, n): what a batch's mean divides by
from .._memory import format_bytes as format_bytes  # 1536 -> "1.5 KiB"

__all__ = ["call_label", "check_reduction", "format_bytes", "no_random", "normaliser_of"]


@contextlib.contextmanager
def no_random(call: str, device: torch.device, check: bool = True) -> Iterator[None]:
    """randomness="error": raise (as the data-set functions do) if the block drew random numbers."""
    if not check:
        yield
        return
    with RandomState(device).guard(call, DATA_FIX):
        yield
