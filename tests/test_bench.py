"""The benchmark's machinery in-process: the oracle check flags wrong answers, the nested loop
extrapolates from a subset of rows, memory is measured, plans skip what does not fit, and the
demo's picture helpers compute what they draw. Nothing here times anything."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import funchess
from funchess.cli.bench import Settings, plan, settings_from
from funchess.cli.measure import PeakMemory
from funchess.cli.methods import TOLERANCE, block_starts, check, find_method
from funchess.cli.models import PROBLEMS, Problem, make_problem
from funchess.cli.pictures import block_norms, symlog_ticks, zoom_block
from funchess.cli.report import ProblemInfo, Result, markdown, status_text


@pytest.fixture(scope="module")
def tiny() -> Problem:
    return make_problem("mlp-tiny", torch.float64)


def _hessian(problem: Problem) -> torch.Tensor:
    f, params = problem.function()
    return funchess.to_matrix(funchess.hessian(f)(params, problem.inputs, problem.targets))


def test_check_passes_exact_answers_and_flags_wrong_ones(tiny: Problem) -> None:
    method = find_method("hessian", "funchess.hessian")
    M = _hessian(tiny)
    assert check(method, tiny, M) < 1e-12
    wrong = M.clone()
    wrong[5:9, 40:44] += 1e-3 * M.abs().max()  # a small error in one off-diagonal block
    assert check(method, tiny, wrong) > TOLERANCE["float64"]
    assert check(method, tiny, M * 1.01) == pytest.approx(0.01, rel=1e-6)
    assert check(method, tiny, torch.full_like(M, float("nan"))) == float("inf")


@pytest.mark.parametrize(("section", "name"), [
    ("ggn-diagonal", "funchess.ggn_diagonal"),
    ("per-sample-diagonal", "funchess.per_sample_hessian_diagonal"),
    ("per-sample-ggn-diagonal", "funchess.per_sample_ggn_diagonal"),
])
def test_the_diagonal_sections_check_against_the_oracle(tiny: Problem, section: str, name: str) -> None:
    method = find_method(section, name)
    d = method.output(method.build(tiny, None)())
    assert check(method, tiny, d) < 1e-12
    assert check(method, tiny, d * 1.01) == pytest.approx(0.01, rel=1e-6)
    # the other curvature's diagonal in its place is flagged (Hessian for GGN and back)
    other = {"ggn-diagonal": ("diagonal", "funchess.hessian_diagonal"),
             "per-sample-diagonal": ("per-sample-ggn-diagonal", "funchess.per_sample_ggn_diagonal"),
             "per-sample-ggn-diagonal": ("per-sample-diagonal", "funchess.per_sample_hessian_diagonal")}[section]
    twin = find_method(*other)
    assert check(method, tiny, twin.output(twin.build(tiny, None)())) > 1e-2


def test_nested_loop_extrapolates_from_a_subset_of_rows(tiny: Problem) -> None:
    method = find_method("hessian", "nested loop (autograd.grad)")
    H, rows, setup_s, rows_s = method.build(tiny, None)(1e-9)  # a tiny budget: stop after one row
    assert rows == 1 and setup_s >= 0 and rows_s >= 0
    assert check(method, tiny, H, rows) < 1e-12  # the computed rows are right
    H_all, rows_all, _, _ = method.build(tiny, None)(0.0)  # no budget: every row
    assert rows_all == tiny.num_params
    torch.testing.assert_close(H_all, _hessian(tiny), rtol=1e-12, atol=1e-14)


def test_wrong_answers_are_shown_in_the_table(tiny: Problem) -> None:
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
    assert {s for s, _, _ in plan(full)} == {"hessian", "hvp", "diagonal", "ggn-diagonal", "per-sample", "per-sample-diagonal",
                                              "per-sample-ggn-diagonal"}
    assert not any(p in ("cnn-5k", "transformer-9k") for _, p, _ in plan(full))
    large = plan(settings_from(_args(quick=False, large=True)))
    assert set(plan(full)) < set(large) and ("hessian", "transformer-9k", "float32") in large


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 2**16))
def test_block_norms_are_the_frobenius_norms_of_the_parameter_blocks(sizes: list[int], seed: int) -> None:
    n = sum(sizes)
    M = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = {f"p{i}": torch.zeros(s) for i, s in enumerate(sizes)}
    starts = block_starts(params)
    assert starts[-1] == n
    norms = block_norms(M, sizes)
    for i in range(len(sizes)):
        for j in range(len(sizes)):
            block = M[starts[i] : starts[i + 1], starts[j] : starts[j + 1]]
            assert float(norms[i, j]) == pytest.approx(float(torch.linalg.matrix_norm(block)), rel=1e-12)
    assert float(norms.pow(2).sum()) == pytest.approx(float(M.pow(2).sum()), rel=1e-12)
    z = zoom_block(norms, sizes)  # every block is small here: the largest diagonal norm wins
    assert float(norms[z, z]) == float(norms.diagonal().max())


def test_zoom_prefers_blocks_small_enough_to_show_entry_by_entry() -> None:
    norms = torch.diag(torch.tensor([1.0, 5.0, 3.0]))
    assert zoom_block(norms, [10, 1000, 100]) == 2  # the 1000-row block is too big to read
    assert zoom_block(norms, [500, 1000, 300]) == 1  # none is small: the largest, cut to its corner


def test_symlog_ticks_are_few_and_cover_the_range() -> None:
    ticks = symlog_ticks(-1e-3, 5.0, 1e-7)
    assert 0.0 in ticks and len(ticks) <= 11
    assert min(ticks) >= -1e-3 and max(ticks) <= 5.0
    assert ticks == sorted(ticks)
