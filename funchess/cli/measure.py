"""Measuring for the command line: peak memory (RSS on CPU, the CUDA allocator on GPU), wall time,
the machine's matmul rate, and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PeakMemory", "sync", "matmul_gflops", "machine", "fmt_bytes", "fmt_seconds", "available_memory"]


def _status_kib(field: str) -> int | None:
    """A `Vm*` field of /proc/self/status in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """The process's peak resident set size in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def _rss() -> int:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _peak_rss()


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory used above a baseline while the block runs.

    On CPU: the process's peak resident set size (RSS) minus its RSS at entry; the peak is reset
    at entry where Linux allows (else the process's all-time peak counts, which is why the
    benchmark runs each method in a fresh process). On CUDA: the caching allocator's peak
    allocated bytes minus those allocated at entry.

    Example:
        >>> import torch
        >>> with PeakMemory("cpu") as mem:
        ...     x = torch.ones(1 << 20)
        >>> mem.peak >= 0
        True
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak = 0
        self.total = 0
        self.what = "CUDA allocator" if self.device.type == "cuda" else "RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            self._base = _rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total = torch.cuda.max_memory_allocated(self.device)
        else:
            self.total = _peak_rss()
        self.peak = max(0, self.total - self._base)


def available_memory(device: torch.device | str) -> int:
    """Bytes that can be allocated now: free CUDA memory, or MemAvailable from /proc/meminfo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * int(os.sysconf("SC_PAGE_SIZE")) if pages else 8 << 30


def timeit(fn: Callable[[], Any], device: torch.device | str, *, min_time: float, max_reps: int) -> list[float]:
    """Wall times of repeated calls: at least one, more until `min_time` seconds or `max_reps`."""
    times: list[float] = []
    while not times or (sum(times) < min_time and len(times) < max_reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_gflops(dtype: torch.dtype, device: torch.device | str, *, n: int | None = None, min_time: float = 1.0) -> float:
    """This machine's peak dense matmul rate in GFLOP/s: the fastest of repeated `n x n` products
    (the fastest, not the median: this is the physical limit, and other load only slows it)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    a @ b  # warm-up
    times = timeit(lambda: a @ b, dev, min_time=min_time, max_reps=50)
    return 2 * n**3 / min(times) / 1e9


def machine(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):  # platforms without it
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: `fmt_bytes(3 << 20) == '3.0 MiB'`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_seconds(t: float) -> str:
    """Seconds with a sensible unit: `fmt_seconds(0.0123) == '12.3 ms'`."""
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.3g} ms"
    return f"{t:.3g} s"


@dataclass
class Stopwatch:
    """Accumulated wall time of named phases (for the demo's summary)."""

    phases: dict[str, float]

    def __init__(self) -> None:
        self.phases = {}

    def time(self, name: str, fn: Callable[[], Any], device: torch.device | str) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
        return out
