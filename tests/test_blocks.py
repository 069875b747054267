"""Selected blocks, symmetry and the exact diagonal, against the oracle."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import funchess
from funchess import InvalidArgumentError
from funchess.testing import assert_hessian_close, reference_hessian

from cases import CASES, Case


def _setup(case: Case) -> tuple[Any, dict[str, torch.Tensor], Any]:
    f, params = case.functional()
    return f, params, case.reference()


CHOSEN = ["mlp_ce", "conv", "layernorm", "attention_sdpa", "gru", "tied", "batchnorm_train"]


@pytest.mark.parametrize("name", CHOSEN)
@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_diagonal_blocks_and_exact_diagonal(name: str, mode: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    case = CASES[name](torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params, ref = _setup(case)
    H = funchess.hessian(f, blocks="diagonal", mode=mode, chunk_size=5)(params, case.inputs, case.targets)
    assert list(H) == list(params) and all(list(H[a]) == [a] for a in H)
    assert_hessian_close(H, {a: {a: ref[a][a]} for a in params})
    d = funchess.hessian_diagonal(f, mode=mode, chunk_size=3)(params, case.inputs, case.targets)
    expected = {a: torch.diagonal(ref[a][a].reshape(params[a].numel(), -1)).reshape(params[a].shape) for a in params}
    assert_hessian_close(d, expected)
    snap.assert_unchanged()


def test_full_hessian_mirrors_are_exact_transposes() -> None:
    f, params, ref = _setup(CASES["mlp_ce"](torch.float64, "cpu"))
    case = CASES["mlp_ce"](torch.float64, "cpu")
    H = funchess.hessian(f)(params, case.inputs, case.targets)
    for i, a in enumerate(params):
        for b in list(params)[i + 1 :]:  # off-diagonal blocks are mirrored by copy: exact transposes
            n_a, n_b = params[a].numel(), params[b].numel()
            assert torch.equal(H[b][a].reshape(n_b, n_a), H[a][b].reshape(n_a, n_b).T)
    assert_hessian_close(H, ref)


def test_pairs_patterns_and_transposed_views() -> None:
    case = CASES["mlp_ce"](torch.float64, "cpu")
    f, params, ref = _setup(case)
    H = funchess.hessian(f, blocks=[("0.*", "4.bias"), ("4.bias", "2.weight")])(params, case.inputs, case.targets)
    assert {a: list(H[a]) for a in H} == {"0.weight": ["4.bias"], "0.bias": ["4.bias"], "4.bias": ["2.weight"]}
    for a in H:
        for b in H[a]:
            assert H[a][b].shape == params[a].shape + params[b].shape
            assert_hessian_close(H[a][b], ref[a][b])
    # a sub-Hessian: every block among the matching parameters, which converts to a matrix
    by_group = funchess.hessian(f, blocks=["2.*", "4.*"])(params, case.inputs, case.targets)
    assert {a: list(by_group[a]) for a in by_group} == {"2.weight": ["2.weight", "2.bias"], "2.bias": ["2.weight", "2.bias"], "4.weight": ["4.weight", "4.bias"], "4.bias": ["4.weight", "4.bias"]}
    sub = funchess.hessian(f, blocks=["[24].*"])(params, case.inputs, case.targets)
    assert list(sub) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    names = list(sub)
    expected = torch.cat([torch.cat([ref[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names])
    torch.testing.assert_close(funchess.to_matrix(sub), expected, rtol=1e-9, atol=1e-12)
    both = funchess.hessian(f, blocks=[("0.bias", "2.bias"), ("2.bias", "0.bias")])(params, case.inputs, case.targets)
    assert torch.equal(both["2.bias"]["0.bias"], both["0.bias"]["2.bias"].T)  # computed once, mirrored


def test_bad_block_selections() -> None:
    case = CASES["mlp_mse"](torch.float64, "cpu")
    f, params = case.functional(params=None)
    args = (params, case.inputs, case.targets)
    with pytest.raises(InvalidArgumentError, match=r"funchess\.hessian\(f, blocks=\['encoder\.\*'\]\)\(\.\.\.\): block pattern 'encoder\.\*' matches no parameter; expected one of '0\.weight', '0\.bias', '2\.weight', '2\.bias'\. .*glob patterns"):
        funchess.hessian(f, blocks=["encoder.*"])(*args)
    with pytest.raises(InvalidArgumentError, match=r"block pattern '0\.wieght' matches no parameter.*Did you mean '0\.weight'"):
        funchess.hessian(f, blocks=[("0.wieght", "2.bias")])(*args)
    with pytest.raises(InvalidArgumentError, match=r"expected blocks= to be None, 'diagonal' or a non-empty list of patterns / pattern pairs, got 'diag'"):
        funchess.hessian(f, blocks="diag")(*args)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"expected each item of blocks= to be a pattern or a \(pattern, pattern\) pair, got \('a', 'b', 'c'\)"):
        funchess.hessian(f, blocks=[("a", "b", "c")])(*args)  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match=r"funchess\.hessian_diagonal\(f, blocks='head'\)\(\.\.\.\): block pattern 'head' matches no parameter"):
        funchess.hessian_diagonal(f, blocks="head")(*args)


def test_selected_diagonal_is_keyed_by_name() -> None:
    case = CASES["mlp_mse"](torch.float64, "cpu")
    f, params, ref = _setup(case)
    d = funchess.hessian_diagonal(f, blocks=["2.*"])(params, case.inputs, case.targets)
    assert list(d) == ["2.weight", "2.bias"]
    torch.testing.assert_close(d["2.bias"], torch.diagonal(ref["2.bias"]["2.bias"]))


@st.composite
def selections(draw: st.DrawFn) -> dict[str, Any]:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 4), min_size=depth + 1, max_size=depth + 1))
    torch.manual_seed(draw(st.integers(0, 1000)))
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    f, params = funchess.functional(model, F.mse_loss)
    names = list(params)
    pairs = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names)), min_size=1, max_size=5))
    batch = draw(st.integers(1, 4))
    x, y = torch.randn(batch, widths[0], dtype=torch.float64), torch.randn(batch, widths[-1], dtype=torch.float64)
    return {"f": f, "params": params, "pairs": pairs, "x": x, "y": y, "chunk": draw(st.integers(1, 9)),
            "mode": draw(st.sampled_from(["rev-rev", "fwd-rev"]))}


@given(selections())
def test_random_selections_equal_the_oracle(s: dict[str, Any]) -> None:
    f, p, x, y = s["f"], s["params"], s["x"], s["y"]
    ref = reference_hessian(f, p, x, y)
    H = funchess.hessian(f, blocks=s["pairs"], mode=s["mode"], chunk_size=s["chunk"])(p, x, y)
    assert {(a, b) for a in H for b in H[a]} == set(s["pairs"])
    for a in H:
        for b in H[a]:
            assert_hessian_close(H[a][b], ref[a][b])
    d = funchess.hessian_diagonal(f, mode=s["mode"], chunk_size=s["chunk"])(p, x, y)
    for a in p:
        torch.testing.assert_close(d[a].reshape(-1), torch.diagonal(ref[a][a].reshape(p[a].numel(), -1)), rtol=1e-9, atol=1e-12)


def test_blocks_and_diagonal_compose_with_vmap() -> None:
    case = CASES["mlp_mse"](torch.float64, "cpu")
    f, params = case.functional(params=None)
    one = lambda p, xi, yi: f(p, xi[None], yi[None])
    per = torch.func.vmap(funchess.hessian_diagonal(one), in_dims=(None, 0, 0))(params, case.inputs, case.targets)
    blk = torch.func.vmap(funchess.hessian(one, blocks="diagonal"), in_dims=(None, 0, 0))(params, case.inputs, case.targets)
    for i in range(case.inputs.shape[0]):
        ref = reference_hessian(one, params, case.inputs[i], case.targets[i])
        for a in params:
            n = params[a].numel()
            torch.testing.assert_close(per[a][i].reshape(-1), torch.diagonal(ref[a][a].reshape(n, n)), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(blk[a][a][i], ref[a][a], rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(r0=st.integers(0, 300), rows=st.integers(1, 1200), gap=st.integers(0, 100), cols=st.integers(1, 1200))
def test_tiled_mirror_equals_the_transpose(r0: int, rows: int, gap: int, cols: int) -> None:
    """The dense sink's mirror copy spans several 512 x 512 tiles (and ragged edges) on large blocks,
    which the case table's small models never reach."""
    from funchess._engine import _mirror

    c0 = r0 + rows + gap
    n = c0 + cols
    M = torch.randn(n, n, dtype=torch.float64)
    expected = M.clone()
    expected[c0:n, r0 : r0 + rows] = M[r0 : r0 + rows, c0:n].T
    _mirror(M, r0, r0 + rows, c0, n)
    assert torch.equal(M, expected)
