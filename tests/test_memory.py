"""The memory planner: estimates, budgets, and the error raised before a large allocation.

Peak memory is measured in a fresh subprocess from the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs) because tracemalloc does not see torch's allocations. Linux only.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import funchess
from funchess import InvalidArgumentError, MemoryBudgetError

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

PROBE = textwrap.dedent(
    """
    import gc, json, sys
    import torch, torch.nn.functional as F
    import funchess
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    kind, batch, budget, call = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(50, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
        x = torch.randn(batch, 50)
    elif kind == "deep":
        layers = [torch.nn.Linear(30, 32)]
        for _ in range(4):
            layers += [torch.nn.Tanh(), torch.nn.Linear(32, 32)]
        model = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(32, 10))
        x = torch.randn(batch, 30)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10))
        x = torch.randn(batch, 3, 16, 16)
    y = torch.randint(0, 10, (batch,))
    f, p = funchess.functional(model, F.cross_entropy)
    funchess.hessian(lambda w: (w ** 3).sum())(torch.randn(3))  # load kernels before measuring
    gc.collect()
    kw = {} if budget == "none" else {"max_memory": budget}
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    error = None
    if call == "diagonal":
        plan = funchess.plan_hessian(f, diagonal=True, **kw)(p, x, y)
        funchess.hessian_diagonal(f, **kw)(p, x, y)
    else:
        plan = funchess.plan_hessian(f, **kw)(p, x, y)
        try:
            funchess.hessian(f, **kw)(p, x, y)
        except funchess.MemoryBudgetError as e:
            error = str(e)
    print(json.dumps({"estimate": plan.peak_bytes, "output": plan.output_bytes, "budget": plan.budget_bytes,
                      "chunk": plan.chunk_size, "measured": status("VmHWM") - base, "error": error}))
    """
)


def _measure(kind: str, batch: int, budget: str, call: str = "hessian") -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, kind, str(batch), budget, call], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@linux_only
@pytest.mark.parametrize("kind, batch, budget", [("mlp", 512, "300MiB"), ("conv", 64, "650MiB"), ("deep", 256, "160MiB"), ("mlp", 128, "none")])
def test_measured_peak_within_budget_and_near_estimate(kind: str, batch: int, budget: str) -> None:
    r = _measure(kind, batch, budget)
    measured, estimate = int(r["measured"]), int(r["estimate"])  # type: ignore[call-overload]
    assert r["error"] is None
    assert measured <= int(r["budget"]), r  # type: ignore[call-overload]
    assert estimate / 1.75 <= measured <= 1.5 * estimate, r
    if budget != "none":
        assert int(r["chunk"]) < 256, r  # type: ignore[call-overload]  # the budget really constrained the chunk


@linux_only
def test_diagonal_memory_is_order_n() -> None:
    r = _measure("mlp", 128, "none", call="diagonal")
    n = 50 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert int(r["output"]) == n * 4  # type: ignore[call-overload]
    measured, estimate = int(r["measured"]), int(r["estimate"])  # type: ignore[call-overload]
    assert measured < 0.75 * n * n * 4, r  # below the dense Hessian alone (249 MiB): no N x N buffer
    assert estimate / 1.75 <= measured <= 1.5 * estimate, r


@linux_only
def test_too_big_raises_before_allocating() -> None:
    r = _measure("mlp", 128, "100MiB")
    assert r["error"] is not None
    assert "needs" in str(r["error"]) and "max_memory='100MiB'" in str(r["error"])
    assert int(r["measured"]) < 40 * 2**20, r  # type: ignore[call-overload]  # the 249 MiB output was never allocated


def test_too_big_message_names_the_need_and_the_fixes() -> None:
    with pytest.raises(MemoryBudgetError, match=r"funchess\.hessian\(f, max_memory='1GiB'\)\(\.\.\.\): the Hessian of 50,000 parameters needs 9\.\d GiB on cpu \(output 9\.3 GiB .*\) of a budget of 1\.0 GiB; expected it to fit the budget \(max_memory='1GiB'\)\. Compute fewer blocks .*funchess\.hessian_diagonal.*funchess\.hvp.*a device with more memory"):
        funchess.hessian(lambda w: (w**3).sum(), max_memory="1GiB")(torch.zeros(50_000))
    # the diagonal of the same function fits easily (its plan; computing it is tested elsewhere)
    assert funchess.plan_hessian(lambda w: (w**3).sum(), diagonal=True, max_memory="1GiB")(torch.ones(50_000)).fits


def test_plan_is_honest_about_sizes() -> None:
    p = {"a": torch.zeros(300), "b": torch.zeros(20, 10, dtype=torch.float64)}
    f = lambda q: (q["a"].sum() * q["b"].sum()) ** 2
    plan = funchess.plan_hessian(f, max_memory="2GiB")(p)
    assert plan.output_bytes == 500 * 500 * 8  # promoted to float64
    assert plan.budget_bytes == 2 * 2**30
    assert 1 <= plan.chunk_size <= 256 and plan.fits
    assert plan.peak_bytes == plan.output_bytes + plan.graph_bytes + plan.chunk_size * plan.row_bytes
    sel = funchess.plan_hessian(f, blocks=[("a", "b")])(p)
    assert sel.output_bytes == 300 * 200 * 8
    diag = funchess.plan_hessian(f, diagonal=True)(p)
    assert diag.output_bytes == 500 * 8
    assert "needs" in str(plan) and "budget of 2.0 GiB" in str(plan)
    small = funchess.plan_hessian(f, max_memory=10_000)(p)
    assert not small.fits


@pytest.mark.parametrize("value, expected", [("4GiB", 4 * 2**30), ("500MB", 500 * 10**6), ("1.5 KiB", 1536), (1234, 1234), ("2g", 2 * 2**30)])
def test_max_memory_strings(value: object, expected: int) -> None:
    plan = funchess.plan_hessian(lambda w: w.sum(), max_memory=value)(torch.zeros(3))  # type: ignore[arg-type]
    assert plan.budget_bytes == expected


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", -1, 0, True])
def test_bad_max_memory(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected max_memory to be a positive number of bytes or a size like '4GiB' or '500MB', got"):
        funchess.hessian(lambda w: w.sum(), max_memory=bad)  # type: ignore[arg-type]


def test_explicit_chunk_size_is_used_and_results_agree() -> None:
    p = torch.randn(40, dtype=torch.float64)
    f = lambda w: (w.sin() ** 3).sum() * w.sum()
    assert funchess.plan_hessian(f, chunk_size=7)(p).chunk_size == 7
    torch.testing.assert_close(funchess.hessian(f, chunk_size=7)(p), funchess.hessian(f, chunk_size="auto")(p))
    torch.testing.assert_close(funchess.hessian(f, chunk_size=None)(p), funchess.hessian(f, max_memory="50MB")(p))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("kind, batch, budget", [("mlp", 512, "300MiB"), ("conv", 64, "650MiB"), ("mlp", 128, None)])
def test_cuda_peak_within_budget_and_near_estimate(kind: str, batch: int, budget: str | None) -> None:
    """On CUDA the allocator's own high-water mark is the measure (torch.cuda.max_memory_allocated)."""
    import torch.nn.functional as F

    from funchess.testing import assert_hessian_close

    dev = torch.device("cuda")
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(50, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
        x = torch.randn(batch, 50)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10))
        x = torch.randn(batch, 3, 16, 16)
    y = torch.randint(0, 10, (batch,))
    f_cpu, p_cpu = funchess.functional(copy.deepcopy(model), F.cross_entropy)
    f, p = funchess.functional(model.to(dev), F.cross_entropy)
    x_cpu, y_cpu, x, y = x, y, x.to(dev), y.to(dev)
    kw = {} if budget is None else {"max_memory": budget}
    funchess.hessian(lambda w: (w**3).sum())(torch.randn(3, device=dev))  # load kernels first
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    plan = funchess.plan_hessian(f, **kw)(p, x, y)
    H = funchess.hessian(f, **kw)(p, x, y)
    torch.cuda.synchronize(dev)
    measured = torch.cuda.max_memory_allocated(dev) - base
    assert measured <= plan.budget_bytes, (measured, plan)
    assert plan.peak_bytes / 1.75 <= measured <= 1.5 * plan.peak_bytes, (measured, plan)
    if budget is not None:
        assert plan.chunk_size < 256, plan  # the budget really constrained the chunk
    on_cpu = {a: {b: t.cpu() for b, t in row.items()} for a, row in H.items()}
    assert_hessian_close(on_cpu, funchess.hessian(f_cpu)(p_cpu, x_cpu, y_cpu), rtol=1e-3, atol=1e-5)
