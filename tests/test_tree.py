"""ravel/unravel and the block <-> matrix views: one stable ordering everywhere."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given

import funchess

shapes = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


def _params(shape_list: list[tuple[int, ...]], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(shape_list))
    # reverse-alphabetical names: the order must be insertion order, never sorted
    return {f"p{9 - i}": torch.randn(s, generator=gen, dtype=dtype) for i, s in enumerate(shape_list)}


@given(shapes)
def test_ravel_unravel_round_trip(shape_list: list[tuple[int, ...]]) -> None:
    p = _params(shape_list)
    flat = funchess.ravel(p)
    assert flat.shape == (sum(t.numel() for t in p.values()),)
    back = funchess.unravel(flat, p)
    assert list(back) == list(p)
    for k in p:
        assert torch.equal(back[k], p[k])
    # insertion order, not sorted order
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in p.values()]))


@given(shapes)
def test_from_matrix_to_matrix_round_trip(shape_list: list[tuple[int, ...]]) -> None:
    p = _params(shape_list)
    n = sum(t.numel() for t in p.values())
    M = torch.randn(n, n, dtype=torch.float64)
    H = funchess.from_matrix(M, p)
    for a in p:
        for b in p:
            assert H[a][b].shape == p[a].shape + p[b].shape
    assert torch.equal(funchess.to_matrix(H), M)
    # a copy of the blocks (no shared base) converts too
    H2 = {a: {b: H[a][b].clone() for b in p} for a in p}
    assert torch.equal(funchess.to_matrix(H2), M)


def test_to_matrix_is_zero_copy_for_funchess_hessians() -> None:
    p = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    H = funchess.hessian(lambda q: (q["w"].sin() * q["b"]).sum())(p)
    M = funchess.to_matrix(H)
    assert M.data_ptr() == H["w"]["w"].data_ptr()
    assert torch.equal(M[:6, 6:].reshape(3, 2, 2), H["w"]["b"])


def test_unravel_keeps_batch_dimensions() -> None:
    p = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    V = torch.arange(2 * 9.0).reshape(2, 9)
    out = funchess.unravel(V, p)
    assert out["w"].shape == (2, 2, 3) and out["b"].shape == (2, 3)
    assert torch.equal(out["b"][1], torch.tensor([15.0, 16.0, 17.0]))


def test_tuple_and_nested_trees() -> None:
    tree = (torch.ones(2), {"z": torch.zeros(1), "a": (torch.full((2,), 2.0),)})
    flat = funchess.ravel(tree)
    assert flat.tolist() == [1.0, 1.0, 0.0, 2.0, 2.0]
    back = funchess.unravel(flat, tree)
    assert torch.equal(back[1]["a"][0], tree[1]["a"][0])


def test_mixed_dtypes_promote_and_restore() -> None:
    p = {"a": torch.ones(2, dtype=torch.float32), "b": torch.ones(1, dtype=torch.float64)}
    flat = funchess.ravel(p)
    assert flat.dtype == torch.float64
    back = funchess.unravel(flat, p)
    assert back["a"].dtype == torch.float32 and back["b"].dtype == torch.float64


def test_hessian_rows_follow_ravel_order() -> None:
    # f = sum_i c_i x_i^2 / 2 over the raveled vector: H = diag(c), so the ordering is visible
    p = {"z": torch.zeros(2, dtype=torch.float64), "a": torch.zeros(3, dtype=torch.float64)}
    c = torch.arange(1.0, 6.0, dtype=torch.float64)
    M = funchess.to_matrix(funchess.hessian(lambda q: (c * funchess.ravel(q) ** 2).sum() / 2)(p))
    assert torch.equal(M, torch.diag(c))
