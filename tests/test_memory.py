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
from funchess.testing import assert_hessian_close, reference_hessian

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
    if call == "diagonal":  # the block engine's plan: a plain function (no module-aware sweep)
        g = lambda q, a, b: f(q, a, b)
        plan = funchess.plan_hessian(g, diagonal=True, **kw)(p, x, y)
        funchess.hessian_diagonal(g, **kw)(p, x, y)
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
@pytest.mark.parametrize(
    "kind, batch, budget",
    [("mlp", 512, "300MiB"), ("conv", 64, "650MiB"), ("deep", 256, "160MiB"), ("mlp", 128, "none"), ("deep", 1, "none"), ("deep", 2, "none")],
)  # ("deep", 1 or 2): few samples make it a joint pass over all 5,546 rows at once
def test_measured_peak_within_budget_and_near_estimate(kind: str, batch: int, budget: str) -> None:
    r = _measure(kind, batch, budget)
    measured, estimate = int(r["measured"]), int(r["estimate"])  # type: ignore[call-overload]
    assert r["error"] is None
    assert measured <= int(r["budget"]), r  # type: ignore[call-overload]
    assert estimate / 1.75 <= measured <= 1.5 * estimate, r
    if budget != "none":
        assert int(r["chunk"]) < 256, r  # type: ignore[call-overload]  # the budget really constrained the chunk
    if batch <= 2:
        assert int(r["chunk"]) == 5546, r  # type: ignore[call-overload]


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
    assert plan.chunk_size == 500 and plan.fits  # a small model: all rows in one joint pass
    assert plan.peak_bytes == plan.output_bytes + plan.graph_bytes + plan.chunk_size * plan.row_bytes
    sel = funchess.plan_hessian(f, blocks=[("a", "b")])(p)
    assert sel.output_bytes == 300 * 200 * 8
    diag = funchess.plan_hessian(f, diagonal=True)(p)
    assert diag.output_bytes == 500 * 8
    assert "needs" in str(plan) and "budget of 2.0 GiB" in str(plan)
    small = funchess.plan_hessian(f, max_memory=10_000)(p)
    assert not small.fits
    H = funchess.hessian(f)(p)  # the one matrix has the promoted dtype, as planned
    assert funchess.to_matrix(H).dtype == torch.float64 and H["a"]["a"].dtype == torch.float64


@pytest.mark.parametrize("value, expected", [("4GiB", 4 * 2**30), ("500MB", 500 * 10**6), ("1.5 KiB", 1536), (1234, 1234), ("2g", 2 * 2**30)])
def test_max_memory_strings(value: object, expected: int) -> None:
    plan = funchess.plan_hessian(lambda w: w.sum(), max_memory=value)(torch.zeros(3))  # type: ignore[arg-type]
    assert plan.budget_bytes == expected


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", -1, 0, True])
def test_bad_max_memory(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected max_memory to be a positive number of bytes or a size like '4GiB' or '500MB', got"):
        funchess.hessian(lambda w: w.sum(), max_memory=bad)  # type: ignore[arg-type]


def _flop_counter_total(fn: object) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()  # type: ignore[operator]
    return int(counter.get_total_flops())


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv-transposed-grouped", "attention"])
def test_probe_counts_flops_like_torch_flop_counter(kind: str) -> None:
    """The planner's lean FLOP count equals torch.utils.flop_counter's on matrix products and
    convolutions (transposed and grouped included), and the saved bytes are positive."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    if kind == "mlp":
        model: torch.nn.Module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    elif kind == "conv":
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(6, 2, 3))
    elif kind == "conv-transposed-grouped":
        model = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), torch.nn.Tanh(), torch.nn.Conv2d(6, 3, 1, groups=3))
    else:
        model = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        x = torch.randn(3, 5, 8)
    f, params = funchess.functional(model, lambda out, _: out[0].pow(2).sum() if isinstance(out, tuple) else out.pow(2).sum())
    args = (x, x, x) if kind == "attention" else (x,)
    loss = (lambda p: f(p, args, None)) if kind == "attention" else (lambda p: f(p, x, None))
    leaves = list(params.values())
    cost = funchess._memory.probe(loss, leaves, lambda ls: (dict(zip(params, ls)),))
    assert cost.flops == _flop_counter_total(lambda: loss(params)) > 0
    assert (cost.conv_flops > 0) == kind.startswith("conv")
    assert cost.saved_bytes > 0


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


def _runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bool]]:
    """Spy on the engine: how each Hessian call ran (joint or per-leaf, rerouting on or off)."""
    from funchess import _hessian
    from funchess._safe_ops import SecondOrderSafe

    calls: list[dict[str, bool]] = []
    engine_run = _hessian.engine_run

    def spy(*args: object, **kwargs: object) -> object:
        active = any(isinstance(m, SecondOrderSafe) for m in torch.overrides._get_current_function_mode_stack())
        calls.append({"joint": bool(kwargs.get("joint")), "rerouted": active})
        return engine_run(*args, **kwargs)

    monkeypatch.setattr(_hessian, "engine_run", spy)
    return calls


def test_planner_picks_the_joint_pass_only_where_it_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    from funchess.cli.models import make_problem

    calls = _runs(monkeypatch)
    small = make_problem("mlp-500")
    f, p = small.function()
    funchess.hessian(f)(p, small.inputs[:1], small.targets[:1])  # 499 params, one sample
    conv = make_problem("cnn-2k")
    g, q = conv.function()
    funchess.hessian(g)(q, conv.inputs[:16], conv.targets[:16])  # convolutions over 16 samples
    funchess.hessian(lambda w: (w.sin() ** 2).sum())(torch.randn(30))  # one leaf: nothing to join
    torch.func.vmap(funchess.hessian(f), in_dims=(None, 0, 0))(p, small.inputs[:2, None], small.targets[:2, None])  # no probe under vmap
    assert [c["joint"] for c in calls] == [True, False, False, False]


def test_rerouting_is_skipped_only_when_the_probe_met_no_rerouted_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _runs(monkeypatch)
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    normed = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)).double()
    for model in (plain, normed):
        f, p = funchess.functional(model, torch.nn.functional.mse_loss)
        for chunk_size in ("auto", 3):
            H = funchess.hessian(f, chunk_size=chunk_size)(p, x, y)
            assert_hessian_close(H, reference_hessian(f, p, x, y))
    funchess.hessian(lambda w: (w.sin() ** 2).sum(), chunk_size=3)(torch.randn(5))  # not probed: rerouted
    # plain: probed both times (a small model is a joint candidate), so no rerouting; LayerNorm: always
    assert [c["rerouted"] for c in calls] == [False, False, True, True, True]


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_joint_pass_with_aux_and_mixed_dtypes(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _runs(monkeypatch)
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float32)}
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(x @ q["w"] + q["b"].double())
        return (z**2).sum() * z.sum(), z

    H, aux = funchess.hessian(f, has_aux=True, mode=mode, chunk_size=5)(p)  # passes split inside leaves
    assert [c["joint"] for c in calls] == [True]
    assert torch.equal(aux, f(p)[1])
    assert funchess.to_matrix(H).dtype == torch.float64
    # the float32 leaf's gradient, and so its rows and columns, carry float32 rounding
    assert_hessian_close(H, reference_hessian(lambda q: f(q)[0], p), rtol=1e-5, atol=1e-5)
