"""The oracle's independent half: finite differences of the plain first-order gradient, on every
case of the table, for funchess's Hessian and for the double-backward oracle itself (which could
share a wrong double-backward rule with torch, as it did for weight norm)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import funchess
from funchess.testing import (
    check_hessian,
    check_hvp,
    finite_difference_hessian,
    finite_difference_hvp,
    finite_difference_tolerance,
    reference_hessian,
    reference_hvp,
)

from cases import Case

D = torch.float64


def _directions(params: dict[str, torch.Tensor], constant: dict[str, torch.Tensor] | None, n: int = 3) -> list[Any]:
    """Random directions that leave the entries torch treats as constants alone."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        v = {k: torch.randn(p.shape, generator=gen, dtype=D).to(p) for k, p in params.items()}
        for k, mask in (constant or {}).items():
            v[k] = v[k].masked_fill(mask, 0.0)
        out.append(v)
    return out


def _matrix_product(M: torch.Tensor) -> Any:
    return lambda v, *_: funchess.unravel(M @ funchess.ravel(v), v)


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hessian_agrees_with_finite_differences(case64: Case, mode: str) -> None:
    f, params = case64.functional()
    M = funchess.to_matrix(funchess.hessian(f, mode=mode)(params, case64.inputs, case64.targets))
    check_hvp(f, params, case64.inputs, case64.targets, hvp_fn=_matrix_product(M),
              tangents=_directions(params, case64.constant))


def test_oracle_agrees_with_finite_differences(case64: Case) -> None:
    f, params = case64.functional()

    def oracle(v: Any, p: Any, x: Any, y: Any) -> Any:
        return reference_hvp(lambda q: f(q, x, y), (p,), (v,))

    check_hvp(f, params, case64.inputs, case64.targets, hvp_fn=oracle, tangents=_directions(params, case64.constant))


# ----------------------------------------------------------------------------- check_hvp itself


def _cubic(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return (p["w"] ** 3).sum() * p["b"].sum() + torch.sin(p["w"]).sum()


def _point() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(4, generator=gen, dtype=D), "b": torch.randn(2, generator=gen, dtype=D)}


def test_finite_difference_hvp_matches_the_closed_form() -> None:
    p = _point()
    v = {"w": torch.ones(4, dtype=D), "b": torch.zeros(2, dtype=D)}
    w, b = p["w"], p["b"]
    hv = finite_difference_hvp(_cubic, (p,), (v,))
    expected_w = 6 * w * b.sum() - torch.sin(w)
    expected_b = (3 * w**2).sum().expand(2)
    torch.testing.assert_close(hv["w"], expected_w, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(hv["b"], expected_b, rtol=1e-8, atol=1e-8)
    zero = finite_difference_hvp(_cubic, (p,), ({"w": torch.zeros(4, dtype=D), "b": torch.zeros(2, dtype=D)},))
    assert not zero["w"].any() and not zero["b"].any()
    # several primals: a tuple back, like reference_hvp
    two = finite_difference_hvp(lambda a, c: (a * c).pow(2).sum(), (w, b[:1].expand(4)), (torch.ones(4, dtype=D), torch.zeros(4, dtype=D)))
    assert isinstance(two, tuple) and len(two) == 2


def test_check_hvp_passes_on_funchess_and_the_oracle() -> None:
    p = _point()
    check_hvp(_cubic, p)  # default: funchess.hvp
    check_hvp(_cubic, p, hvp_fn=lambda v, q: reference_hvp(_cubic, (q,), (v,)))
    # argnums and extra arguments
    x = torch.randn(3, dtype=D)
    g = lambda a, b, x: (torch.tanh(a * x.sum()) * b).sum()  # noqa: E731
    check_hvp(g, p["w"], p["w"].flip(0), x, argnums=(0, 1))
    check_hvp(g, p["w"], p["w"].flip(0), x, argnums=1, num_directions=1)


def test_check_hvp_catches_a_small_error_in_float64() -> None:
    p = _point()
    M = funchess.to_matrix(reference_hessian(_cubic, p))
    wrong = M.clone()
    wrong[1, 4] += 1e-6 * M.abs().max()
    with pytest.raises(AssertionError, match=r"check_hvp vs finite differences, direction 0: block \['(w|b)'\]: 1 of \d entries out of tolerance"):
        check_hvp(_cubic, p, hvp_fn=_matrix_product(wrong), num_directions=1)


def test_check_hvp_catches_torchs_weight_norm_double_backward() -> None:
    # plain autograd's double backward of the fused weight norm, without the oracle's fix
    v, g = torch.randn(3, 4, dtype=D), torch.rand(3, 1, dtype=D) + 0.5
    x = torch.randn(5, 4, dtype=D)
    f = lambda v, g: torch.tanh(x @ torch._weight_norm(v, g, 0).T).pow(2).sum()  # noqa: E731

    def torch_double_backward(t: Any, v: torch.Tensor, g: torch.Tensor) -> Any:
        v, g = v.clone().requires_grad_(), g.clone().requires_grad_()
        grads = torch.autograd.grad(f(v, g), (v, g), create_graph=True)
        return torch.autograd.grad(grads, (v, g), grad_outputs=t)

    with pytest.raises(AssertionError, match=r"check_hvp vs finite differences, direction 0: block \[\d\]"):
        check_hvp(f, v, g, argnums=(0, 1), hvp_fn=torch_double_backward, num_directions=1)
    check_hvp(f, v, g, argnums=(0, 1))  # funchess
    check_hvp(f, v, g, argnums=(0, 1), hvp_fn=lambda t, v, g: reference_hvp(f, (v, g), t))  # the oracle


def test_check_hvp_honours_given_directions_and_zero() -> None:
    p = _point()
    zero = {"w": torch.zeros(4, dtype=D), "b": torch.zeros(2, dtype=D)}
    check_hvp(_cubic, p, tangents=[zero])
    with pytest.raises(AssertionError, match=r"direction 0: block \['w'\]"):
        check_hvp(_cubic, p, tangents=[zero], hvp_fn=lambda v, q: {"w": torch.ones(4, dtype=D), "b": v["b"]})


def test_check_hvp_in_float32_says_use_float64() -> None:
    p = {k: t.float() for k, t in _point().items()}
    check_hvp(_cubic, p)  # right, within float32's tolerance
    M = funchess.to_matrix(reference_hessian(_cubic, p))
    wrong = M.clone()
    wrong[0, 0] += 0.05 * M.abs().max()
    with pytest.raises(AssertionError, match=r"The check ran in torch.float32.*use float64 for a tight check"):
        check_hvp(_cubic, p, hvp_fn=_matrix_product(wrong), num_directions=1)


# ----------------------------------------------------------------------------- check_hessian's tolerance


def test_check_hessian_tolerance_follows_the_dtype() -> None:
    assert finite_difference_tolerance(D) == (1e-6, 1e-6)
    assert finite_difference_tolerance(torch.float32) == (1e-2, 1e-2)
    assert finite_difference_tolerance(torch.bfloat16) == (5e-2, 5e-2)
    # the README's quick start, in float32: 320 of 1,024 entries failed with the fixed tolerance
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
    check_hessian(lambda p: f(p, x, y), params)


def test_check_hessian_in_float32_says_use_float64() -> None:
    x = torch.randn(4)
    f = lambda x: (x**3).sum()  # noqa: E731
    with pytest.raises(AssertionError, match=r"check_hessian vs finite differences: block <root>: 1 of 16 .* The check ran in torch.float32.*use float64 for a tight check \(e.g. `model.double\(\)`"):
        check_hessian(f, x, hessian_fn=lambda x: torch.diag(6 * x) + 0.5 * torch.eye(4)[0:1].T @ torch.eye(4)[3:4])
    # explicit tolerances still win; float64 needs no hint
    with pytest.raises(AssertionError, match=r"float32"):
        check_hessian(f, x, rtol=1e-9, atol=1e-9)
    with pytest.raises(AssertionError) as info:
        check_hessian(f, x.double(), hessian_fn=lambda x: torch.diag(6 * x) + 1e-3)
    assert "float64" not in str(info.value)
    H = finite_difference_hessian(f, x.double())
    torch.testing.assert_close(H, torch.diag(6 * x.double()), rtol=1e-8, atol=1e-8)
