"""The benchmark's machinery in-process: the oracle check flags wrong answers, the nested loop
extrapolates from a subset of rows, memory is measured, plans skip what does not fit, and the
demo's plotting helpers place their labels sensibly. Nothing here times anything."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import funchess
from funchess._bench import Result, Settings, plan, settings_from
from funchess._bench_methods import TOLERANCE, check, find_method
from funchess._bench_report import markdown, status_text
from funchess._demo import _spread, _symlog_ticks
from funchess._measure import PeakMemory
from funchess._models import PROBLEMS, make_problem


@pytest.fixture(scope="module")
def tiny() -> funchess._models.Problem:
    return make_problem("mlp-tiny", torch.float64)


def _hessian(problem: funchess._models.Problem) -> torch.Tensor:
    f, params = problem.function()
    return funchess.to_matrix(funchess.hessian(f)(params, problem.inputs, problem.targets))


def test_check_passes_exact_answers_and_flags_wrong_ones(tiny: funchess._models.Problem) -> None:
    method = find_method("hessian", "funchess.hessian")
    M = _hessian(tiny)
    assert check(method, tiny, M) < 1e-12
    wrong = M.clone()
    wrong[5:9, 40:44] += 1e-3 * M.abs().max()  # a small error in one off-diagonal block
    assert check(method, tiny, wrong) > TOLERANCE["float64"]
    assert check(method, tiny, M * 1.01) == pytest.approx(0.01, rel=1e-6)
    assert check(method, tiny, torch.full_like(M, float("nan"))) == float("inf")


def test_nested_loop_extrapolates_from_a_subset_of_rows(tiny: funchess._models.Problem) -> None:
    method = find_method("hessian", "nested loop (autograd.grad)")
    H, rows, setup_s, rows_s = method.build(tiny, None)(1e-9)  # a tiny budget: stop after one row
    assert rows == 1 and setup_s >= 0 and rows_s >= 0
    assert check(method, tiny, H, rows) < 1e-12  # the computed rows are right
    H_all, rows_all, _, _ = method.build(tiny, None)(0.0)  # no budget: every row
    assert rows_all == tiny.num_params
    torch.testing.assert_close(H_all, _hessian(tiny), rtol=1e-12, atol=1e-14)


def test_wrong_answers_are_shown_in_the_table(tiny: funchess._models.Problem) -> None:
    from funchess._bench import ProblemInfo

    info = ProblemInfo("mlp-tiny", "mlp", tiny.description, tiny.num_params, tiny.batch_size, 100, 1e6)
    rows = [
        Result("hessian", "mlp-tiny", "float64", "funchess.hessian", "cpu", "ok", n=83, time=0.01, times=[0.01],
               peak_memory=1000, error=1e-15, tolerance=1e-8),
        Result("hessian", "mlp-tiny", "float64", "torch.func.hessian", "cpu", "WRONG", n=83, time=0.02,
               times=[0.02], peak_memory=2000, error=0.8, tolerance=1e-8),
        Result("hessian", "mlp-tiny", "float64", "curvlinops H @ I", "cpu", "not installed",
               message="needs curvlinops: pip install funchess[bench]"),
    ]
    meta = {"quick": True, "device": "cpu", "matmul_gflops": {"float64": 10.0},
            "machine": {"processor": "cpu", "cpu_count": 2, "torch_threads": 1, "torch": "x", "python": "3",
                        "date": "today"}}
    md = markdown(rows, {"mlp-tiny": info}, meta)
    assert "**WRONG** (rel. error 8.0e-01)" in md
    assert "| `torch.func.hessian` | 20 ms | 2.00 |" in md
    assert "2.00x WRONG" in md  # the headline keeps the flag too
    assert "not installed: needs curvlinops" in md
    assert status_text(rows[0]) == "✓"


def test_peak_memory_sees_an_allocation() -> None:
    with PeakMemory("cpu") as mem:
        x = torch.ones(32 << 20, dtype=torch.float32)  # 128 MiB, touched
        del x
    assert mem.peak >= 100 << 20


def _args(**kw: object) -> argparse.Namespace:
    base = dict(quick=True, device="cpu", dtype=None, problems=None, sections=None, methods=None, min_time=None,
                time_limit=None, max_memory=None, threads=None, out=Path("unused"), no_progress=True, large=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_plans_follow_the_options() -> None:
    quick = plan(settings_from(_args()))
    assert ("hessian", "mlp-2k", "float64") in quick and all(p in PROBLEMS for _, p, _ in quick)
    only = plan(settings_from(_args(problems="mlp-tiny,cnn-tiny", dtype="float32", sections="hessian,hvp")))
    assert only == [("hessian", "mlp-tiny", "float32"), ("hessian", "cnn-tiny", "float32"),
                    ("hvp", "mlp-tiny", "float32"), ("hvp", "cnn-tiny", "float32")]
    full = settings_from(_args(quick=False, max_memory=2.0))
    assert isinstance(full, Settings) and full.max_memory == 2 * 2**30 and full.time_limit == 60
    assert {s for s, _, _ in plan(full)} == {"hessian", "hvp", "diagonal", "per-sample"}
    assert not any(p in ("cnn-5k", "transformer-9k") for _, p, _ in plan(full))
    large = plan(settings_from(_args(quick=False, large=True)))
    assert set(plan(full)) < set(large) and ("hessian", "transformer-9k", "float32") in large


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=20), st.floats(1, 30))
def test_block_labels_are_spread_apart_inside_the_axis(centres: list[float], gap: float) -> None:
    centres = sorted(centres)
    total = max(centres) + 1
    pos = _spread(centres, gap, -0.5, total)
    fits = min(gap, (total + 0.5) / max(len(centres) - 1, 1))
    assert all(b - a >= fits * (1 - 1e-9) for a, b in zip(pos, pos[1:], strict=False))
    assert pos[0] >= -0.5 - 1e-9 and pos[-1] <= total + 1e-9
    assert all(abs(p - c) <= (len(centres) + 1) * fits for p, c in zip(pos, centres, strict=True))  # near their block


def test_symlog_ticks_are_few_and_cover_the_range() -> None:
    ticks = _symlog_ticks(-1e-3, 5.0, 1e-7)
    assert 0.0 in ticks and len(ticks) <= 11
    assert min(ticks) >= -1e-3 and max(ticks) <= 5.0
    assert ticks == sorted(ticks)
