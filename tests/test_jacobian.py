"""jacrev/jacfwd: torch.func's output format, chunking, has_aux, argnums; hessian's tree product."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd as torch_jacfwd
from torch.func import jacrev as torch_jacrev

import funchess
from funchess.testing import assert_hessian_close, reference_hessian

D = torch.float64


def _f(p: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = torch.tanh(x @ p["w"] + p["b"])
    return {"out": h, "norm": (h**2).sum(-1)}


@pytest.fixture
def problem() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    p = {"w": torch.randn(3, 4, generator=gen, dtype=D), "b": torch.randn(4, generator=gen, dtype=D)}
    return p, torch.randn(5, 3, generator=gen, dtype=D)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
@pytest.mark.parametrize("ours, theirs", [(funchess.jacrev, torch_jacrev), (funchess.jacfwd, torch_jacfwd)])
def test_jacobians_match_torch_func(problem, chunk_size, ours, theirs) -> None:  # type: ignore[no-untyped-def]
    p, x = problem
    assert_hessian_close(ours(_f, chunk_size=chunk_size)(p, x), theirs(_f)(p, x))


@pytest.mark.parametrize("ours", [funchess.jacrev, funchess.jacfwd])
def test_jacobian_argnums_tuple_and_aux(problem, ours) -> None:  # type: ignore[no-untyped-def]
    p, x = problem

    def g(p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.tanh(x @ p["w"] + p["b"])
        return out, out.detach().sum()

    J, aux = ours(g, argnums=(0, 1), has_aux=True, chunk_size=4)(p, x)
    ref = torch_jacrev(lambda p, x: g(p, x)[0], argnums=(0, 1))(p, x)
    assert_hessian_close(J, ref)
    assert torch.equal(aux, g(p, x)[1])


@pytest.mark.parametrize("outer, inner", [(funchess.jacfwd, funchess.jacrev), (funchess.jacrev, funchess.jacrev), (funchess.jacfwd, funchess.jacfwd)])
def test_composed_jacobians_are_the_hessian(problem, outer, inner) -> None:  # type: ignore[no-untyped-def]
    p, x = problem

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (_f(p, x)["norm"] ** 2).mean()

    H = outer(inner(loss), chunk_size=5)(p, x)
    assert_hessian_close(H, reference_hessian(loss, p, x))
    assert_hessian_close(H, funchess.hessian(loss)(p, x))


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hessian_several_argnums_tree_product(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"u": torch.randn(2, generator=gen, dtype=D), "v": torch.randn(2, 2, generator=gen, dtype=D)}
    b = torch.randn(3, generator=gen, dtype=D)

    def f(a: dict[str, torch.Tensor], b: torch.Tensor, c: float) -> torch.Tensor:
        return (torch.sin(a["v"] @ a["u"]).sum() * b.exp().sum() + (a["u"] ** 3).sum()) * c

    H = funchess.hessian(f, argnums=(0, 1), mode=mode, chunk_size=2)(a, b, 2.0)
    assert H[0]["u"][1].shape == (2, 3)  # tree product: H[i][leaf_a][j][leaf_b]
    assert H[1][0]["v"].shape == (3, 2, 2)
    assert_hessian_close(H, reference_hessian(f, a, b, 2.0, argnums=(0, 1)))
    assert_hessian_close(H, torch.func.hessian(f, argnums=(0, 1))(a, b, 2.0))


def test_hessian_of_tensor_and_tuple_arguments() -> None:
    x = torch.randn(2, 3, dtype=D)
    H = funchess.hessian(lambda x: (x.sin() ** 2).sum())(x)
    assert H.shape == (2, 3, 2, 3)
    assert_hessian_close(H, reference_hessian(lambda x: (x.sin() ** 2).sum(), x))
    t = (torch.randn(2, dtype=D), torch.randn(1, dtype=D))
    g = lambda t: (t[0] ** 2).sum() * t[1].sum() ** 3  # noqa: E731
    Ht = funchess.hessian(g)(t)
    assert Ht[0][1].shape == (2, 1)
    assert_hessian_close(Ht, reference_hessian(g, t))


def test_has_aux_hessian_and_hvp() -> None:
    x = torch.randn(4, dtype=D)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = x.exp()
        return y.sum() * x.sum(), {"y": y}

    H, aux = funchess.hessian(f, has_aux=True)(x)
    assert_hessian_close(H, reference_hessian(lambda x: f(x)[0], x))
    assert torch.equal(aux["y"], x.exp())
    v = torch.randn(4, dtype=D)
    hv, aux2 = funchess.hvp(f, has_aux=True)(x, v)
    torch.testing.assert_close(hv, H @ v)
    assert torch.equal(aux2["y"], x.exp())


def test_hvp_of_a_tuple_of_primals_returns_a_tuple() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    f = lambda x, y: (x.sin().sum() * y.cos().sum()) ** 2  # noqa: E731
    vx, vy = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    hx, hy = funchess.hvp(lambda xy: f(*xy))((x, y), (vx, vy))
    H = funchess.to_matrix(funchess.hessian(f, argnums=(0, 1))(x, y))
    torch.testing.assert_close(torch.cat([hx, hy]), H @ torch.cat([vx, vy]))


def test_kwargs_pass_through() -> None:
    x = torch.randn(3, dtype=D)
    H = funchess.hessian(lambda x, *, scale: scale * (x**4).sum())(x, scale=2.0)
    torch.testing.assert_close(H, torch.diag(24.0 * x**2))


def test_deprecated_immediate_hvp_and_vhp_warn_and_agree() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    f = lambda x, y: (x.sin().sum() * y.cos().sum()) ** 2  # noqa: E731
    vx, vy = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    with pytest.warns(FutureWarning, match=r"funchess\.hvp\(f, primals, tangents\) is deprecated .* use funchess\.hvp\(f\)\(params, v, \*data\)") as record:
        hx, hy = funchess.hvp(f, (x, y), (vx, vy))
    assert record[0].filename == __file__  # the warning points at the caller's line
    expected = funchess.hvp(lambda xy: f(*xy))((x, y), (vx, vy))
    torch.testing.assert_close(hx, expected[0])
    torch.testing.assert_close(hy, expected[1])
    with pytest.warns(FutureWarning, match=r"funchess\.vhp\(f, primals, tangents\) is deprecated"):
        (vh,) = (funchess.vhp(lambda x: f(x, y), (x,), (vx,)),)
    torch.testing.assert_close(vh, funchess.hvp(lambda x: f(x, y))(x, vx))
