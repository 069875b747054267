"""Memory planning: estimate what a Hessian call needs before anything large is allocated.

The estimate has three parts:

- the output (`N*N` entries for the full Hessian, the chosen blocks, or `N` for the diagonal);
- the graph kept while the chunks run: the forward's saved activations plus the first backward
  built with `create_graph` (about `3 A`, `A` the bytes autograd saves in one forward), plus a
  fixed 8 MiB for the allocator's and Python's own temporaries;
- per row of a vectorised pass: the double backward's intermediates (about `2 A`, calibrated on
  MLPs and conv nets; tests/test_memory.py checks measured peaks against the plan) plus the basis
  row and the result row.

`A` is measured, not guessed: one forward runs under `torch.autograd.graph.saved_tensors_hooks`
that add up the bytes of every saved tensor (the same probe counts the FLOPs of its matrix products
and convolutions, from which `funchess.hessian` chooses how to group the rows). The budget is
`max_memory` or, by default, 80 % of the free memory of the device (`MemAvailable` on CPU,
`torch.cuda.mem_get_info` on CUDA).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ._errors import InvalidArgumentError, MemoryBudgetError

_GRAPH_FACTOR = 3.0
_ROW_FACTOR = 2.0
DEFAULT_FRACTION = 0.8
_PLAN_FRACTION = 0.95
_OVERHEAD = 8 * 2**20  # the allocator's and Python's own temporaries, measured on CPU
#: The one chunk policy. A vectorised pass computes at most `MAX_CHUNK` rows (vectors) and at most
#: `PASS_ENTRIES` result entries when nothing better is known; the planner picks larger or smaller
#: chunks from measured costs where it runs (benchmarks/RESULTS.md has the measurements).
MAX_CHUNK = 256
PASS_ENTRIES = 1 << 23
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def format_bytes(n: float) -> str:
    """`1536` -> `'1.5 KiB'`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def parse_bytes(call: str, value: int | float | str) -> int:
    """`4 * 2**30`, `"4GiB"`, `"500 MB"` -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidArgumentError(
        f"{call}: expected max_memory to be a positive number of bytes or a size like '4GiB' or "
        f"'500MB', got {value!r}."
    )


def default_chunk(rows: int, width: int) -> int:
    """Rows (or vectors) per vectorised pass when nothing is measured: at most `MAX_CHUNK`, and at
    most `PASS_ENTRIES` result entries for rows of `width` entries."""
    return max(1, min(rows, MAX_CHUNK, PASS_ENTRIES // max(width, 1)))


def budget_of(call: str, max_memory: int | float | str | None) -> tuple[int | None, str]:
    """`(bytes or None for the default, how the budget was set)` for error messages."""
    if max_memory is None:
        return None, "80% of the device's free memory"
    return parse_bytes(call, max_memory), f"max_memory={max_memory!r}"


def default_budget(device: torch.device) -> int:
    """80 % of the free memory of `device`."""
    return int(DEFAULT_FRACTION * available_bytes(device))


def available_bytes(device: torch.device | str) -> int:
    """Free memory on `device`: the CUDA allocator's view, or `MemAvailable` for the CPU (the
    physical pages available, or 2**62 where the system does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + reserved_unused)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 2**62


@dataclass(frozen=True)
class Probe:
    """What one evaluation of the function costs: the bytes autograd saves for backward, and the
    floating-point operations of its matrix products and convolutions."""

    saved_bytes: int
    flops: int
    conv_flops: int


def _conv_flops(x: Tensor, w: Tensor, *args: Any, out: Tensor) -> int:
    transposed = bool(args[4]) if len(args) > 4 else False  # (bias, stride, padding, dilation, transposed, ...)
    per_element = w.numel() // max(w.shape[0], 1)  # multiply-adds per output (per input if transposed)
    return 2 * (x if transposed else out).numel() * per_element


_aten = torch.ops.aten
_FLOPS: dict[Any, Callable[..., int]] = {
    _aten.mm: lambda a, b, out: 2 * a.shape[0] * a.shape[1] * b.shape[1],
    _aten.addmm: lambda c, a, b, *r, out: 2 * a.shape[0] * a.shape[1] * b.shape[1],
    _aten.bmm: lambda a, b, out: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
    _aten.baddbmm: lambda c, a, b, *r, out: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
    _aten.convolution: _conv_flops,
}


class _CountFlops(TorchDispatchMode):
    """Counts the FLOPs of the matrix products and convolutions every operator lowers to (a lean
    `torch.utils.flop_counter.FlopCounterMode`, with a fraction of its overhead)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = self.conv_flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        rule = _FLOPS.get(func.overloadpacket)
        if rule is not None:
            n = rule(*args, out=out)
            self.flops += n
            if func.overloadpacket is _aten.convolution:
                self.conv_flops += n
        return out


def measure(fn: Callable[[], Any]) -> Probe:
    """Run `fn()` once with grad on, adding up the bytes of every tensor autograd saves and counting
    the FLOPs of its matrix products and convolutions."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    counter = _CountFlops()
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        fn()
    return Probe(total, counter.flops, counter.conv_flops)


def probe(h: Callable[..., Any], leaves: list[Tensor], rebuild: Callable[[list[Tensor]], tuple[Any, ...]]) -> Probe:
    """`measure` one evaluation of `h` at the point whose differentiated leaves are `leaves`."""
    fresh = [leaf.detach().requires_grad_(True) for leaf in leaves]
    return measure(lambda: h(*rebuild(fresh)))


@dataclass(frozen=True)
class MemoryPlan:
    """What a Hessian computation needs, estimated before it allocates anything large.

    Attributes:
        output_bytes: the result (all blocks, the chosen blocks, or the diagonal).
        graph_bytes: the forward and first-backward graph kept while the chunks run.
        row_bytes: the working set of one row in a vectorised pass.
        chunk_size: rows per pass (the largest that fits the budget, at most 256, when planned).
        peak_bytes: `output_bytes + graph_bytes + chunk_size * row_bytes`.
        budget_bytes: `max_memory`, or 80 % of the device's free memory.
        device: where the computation runs.

    Example:
        >>> import torch, funchess
        >>> plan = funchess.plan_hessian(lambda w: (w.sin() ** 2).sum())(torch.zeros(1000))
        >>> plan.output_bytes == 1000 * 1000 * 4
        True
        >>> plan.fits
        True
    """

    output_bytes: int
    graph_bytes: int
    row_bytes: int
    chunk_size: int
    peak_bytes: int
    budget_bytes: int
    device: str

    @property
    def fits(self) -> bool:
        """Whether `peak_bytes` fits the budget."""
        return self.peak_bytes <= self.budget_bytes

    def __str__(self) -> str:
        return (
            f"needs {format_bytes(self.peak_bytes)} on {self.device} (output "
            f"{format_bytes(self.output_bytes)} + graph {format_bytes(self.graph_bytes)} + "
            f"{self.chunk_size} rows x {format_bytes(self.row_bytes)}) of a budget of "
            f"{format_bytes(self.budget_bytes)}"
        )


def make_plan(
    *,
    output_bytes: int,
    saved: int,
    max_width: int,
    max_rows: int,
    itemsize: int,
    chunk_size: int | None,
    budget: int,
    device: torch.device,
    joint: bool = False,
) -> MemoryPlan:
    """`joint`: every row is a basis vector and a result row over all parameters (`max_width`
    entries each) and about `A` of intermediates (calibrated on small MLPs); otherwise a
    basis row of `max_rows` entries, a result row plus its copy, and `2 A`."""
    graph = int(_GRAPH_FACTOR * saved) + _OVERHEAD
    if joint:
        row = int(math.ceil(saved + 2 * max_width * itemsize))
    else:
        row = int(math.ceil(_ROW_FACTOR * saved + (2 * max_width + max_rows) * itemsize))
    if chunk_size is None:  # plan against 95 %: the allocator's own slack must fit too
        room = int(_PLAN_FRACTION * budget) - output_bytes - graph
        chunk = max(1, min(MAX_CHUNK, max_rows, room // max(row, 1)))
    else:
        chunk = chunk_size
    return MemoryPlan(output_bytes, graph, row, int(chunk), output_bytes + graph + int(chunk) * row, budget, str(device))


_HESSIAN_FIXES = (
    "Compute fewer blocks (blocks='diagonal' or blocks=['layer.*']), only the diagonal "
    "(funchess.hessian_diagonal), use matrix-free products (funchess.hvp, funchess.HessianOperator)"
)


def too_big(call: str, what: str, plan: MemoryPlan, budget_from: str, fixes: str = _HESSIAN_FIXES) -> MemoryBudgetError:
    """The sized error for a plan that does not fit; `fixes` names the cheaper alternatives."""
    error = MemoryBudgetError(
        f"{call}: {what} {plan}; expected it to fit the budget ({budget_from}). {fixes}, pass a "
        f"larger max_memory, or use a device with more memory."
    )
    error.plan = plan
    return error


def check_fits(
    call: str, what: str, nbytes: int, device: torch.device, budget: int | None, budget_from: str, fixes: str
) -> None:
    """Raise a sized MemoryBudgetError before allocating `nbytes` for `what` when it does not fit
    the budget (`budget` bytes, or by default 80 % of the device's free memory)."""
    limit = budget if budget is not None else default_budget(device)
    if nbytes <= limit:
        return
    plan = MemoryPlan(nbytes, 0, 0, 0, nbytes, limit, str(device))
    error = MemoryBudgetError(
        f"{call}: {what} needs {format_bytes(nbytes)} on {device} of a budget of {format_bytes(limit)}; "
        f"expected it to fit the budget ({budget_from}). {fixes}, pass a larger max_memory, or use a "
        f"device with more memory."
    )
    error.plan = plan
    raise error
