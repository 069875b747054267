"""The oracle itself: closed forms, finite differences, and assertions that do fail when they should."""

from __future__ import annotations

import pytest
import torch

import funchess
from funchess.testing import (
    TOLERANCES,
    assert_hessian_close,
    check_hessian,
    finite_difference_hessian,
    reference_hessian,
    reference_hvp,
    tolerance,
)

D = torch.float64


def test_reference_hessian_closed_form_linear_least_squares() -> None:
    # f(W) = ||X W^T - Y||^2 / n  =>  H[(i,j),(k,l)] = 2/n * delta_ik * (X^T X)_jl
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 3, generator=gen, dtype=D), torch.randn(6, 2, generator=gen, dtype=D)
    W = torch.randn(2, 3, generator=gen, dtype=D)
    f = lambda W: ((X @ W.T - Y) ** 2).sum() / 6  # noqa: E731
    H = reference_hessian(f, W)
    expected = torch.einsum("ik,jl->ijkl", torch.eye(2, dtype=D), 2 / 6 * X.T @ X)
    torch.testing.assert_close(H, expected, rtol=1e-12, atol=1e-12)


def test_reference_agrees_with_finite_differences() -> None:
    gen = torch.Generator().manual_seed(1)
    p = {"a": torch.randn(3, generator=gen, dtype=D), "b": torch.randn(2, 2, generator=gen, dtype=D)}
    f = lambda p: (torch.tanh(p["b"] @ p["a"][:2]).sum() * p["a"].exp().sum())  # noqa: E731
    assert_hessian_close(reference_hessian(f, p), finite_difference_hessian(f, p), rtol=1e-6, atol=1e-7)
    check_hessian(f, p)
    check_hessian(f, p, hessian_fn=lambda p: reference_hessian(f, p))


def test_check_hessian_catches_a_wrong_hessian() -> None:
    x = torch.randn(3, dtype=D)
    f = lambda x: (x**3).sum()  # noqa: E731
    with pytest.raises(AssertionError, match=r"check_hessian vs finite differences: block <root>: 1 of 9 entries out of tolerance"):
        check_hessian(f, x, hessian_fn=lambda x: torch.diag(6 * x) + torch.eye(3, dtype=D)[0:1].T @ torch.eye(3, dtype=D)[2:3])


def test_assert_hessian_close_fails_and_names_the_block() -> None:
    H = {"a": {"a": torch.eye(2, dtype=D), "b": torch.zeros(2, 1, dtype=D)}, "b": {"a": torch.zeros(1, 2, dtype=D), "b": torch.ones(1, 1, dtype=D)}}
    bad = {"a": dict(H["a"]), "b": dict(H["b"])}
    bad["b"]["a"] = torch.tensor([[0.0, 1e-6]], dtype=D)
    with pytest.raises(AssertionError, match=r"block \['b'\]\['a'\]: 1 of 2 entries out of tolerance; worst at \(0, 1\)"):
        assert_hessian_close(bad, H)
    assert_hessian_close(bad, H, atol=1e-5)  # passes with a looser tolerance
    with pytest.raises(AssertionError, match=r"structures differ"):
        assert_hessian_close({"a": H["a"]}, H)
    with pytest.raises(AssertionError, match=r"NaNs in different places"):
        assert_hessian_close({"x": torch.tensor([float("nan")])}, {"x": torch.tensor([0.0])})


def test_tolerance_table() -> None:
    assert tolerance(torch.float64) == TOLERANCES[torch.float64]
    assert tolerance(torch.float32)[0] > tolerance(torch.float64)[0]
    assert tolerance(torch.bfloat16)[0] >= tolerance(torch.float16)[0]


def test_reference_hvp_matches_reference_hessian() -> None:
    gen = torch.Generator().manual_seed(2)
    p = {"w": torch.randn(2, 3, generator=gen, dtype=D), "b": torch.randn(3, generator=gen, dtype=D)}
    v = {"w": torch.randn(2, 3, generator=gen, dtype=D), "b": torch.randn(3, generator=gen, dtype=D)}
    f = lambda p: (torch.sigmoid(p["w"] * p["b"]) ** 2).sum()  # noqa: E731
    M = funchess.to_matrix(reference_hessian(f, p))
    hv = reference_hvp(f, (p,), (v,))
    torch.testing.assert_close(funchess.ravel(hv), M @ funchess.ravel(v))


def test_reference_handles_unused_and_constant_gradient() -> None:
    p = {"lin": torch.randn(3, dtype=D), "unused": torch.randn(2, dtype=D)}
    f = lambda p: (2 * p["lin"]).sum()  # noqa: E731  (gradient constant: Hessian zero)
    M = funchess.to_matrix(reference_hessian(f, p))
    assert M.shape == (5, 5) and not M.any()
