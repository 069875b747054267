"""Hypothesis properties on random MLPs: the fast paths equal the oracle and each other."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import funchess
from funchess.testing import assert_hessian_close, reference_hessian

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "elu": nn.ELU}


@st.composite
def problems(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float64,)) -> dict[str, Any]:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 5), min_size=depth + 1, max_size=depth + 1))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    batch = draw(st.integers(1, 5))
    loss = draw(st.sampled_from(["mse", "ce"]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[act]()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    x = torch.randn(batch, widths[0], dtype=dtype)
    if loss == "ce":
        y: torch.Tensor = torch.randint(0, widths[-1], (batch,))
        loss_fn = F.cross_entropy
    else:
        y = torch.randn(batch, widths[-1], dtype=dtype)
        loss_fn = F.mse_loss
    f, params = funchess.functional(model, loss_fn)
    n = sum(p.numel() for p in params.values())
    chunk = draw(st.one_of(st.none(), st.integers(1, n + 3)))
    return {"f": f, "params": params, "x": x, "y": y, "n": n, "chunk": chunk, "dtype": dtype}


@given(problems(dtypes=(torch.float64, torch.float32)), st.sampled_from(["auto", "rev-rev", "fwd-rev"]))
def test_hessian_equals_oracle(pr: dict[str, Any], mode: str) -> None:
    H = funchess.hessian(pr["f"], mode=mode, chunk_size=pr["chunk"])(pr["params"], pr["x"], pr["y"])
    p64 = {k: v.double() for k, v in pr["params"].items()}
    y64 = pr["y"] if pr["y"].dtype == torch.long else pr["y"].double()
    ref = reference_hessian(pr["f"], p64, pr["x"].double(), y64)
    H64 = {a: {b: H[a][b].double() for b in H[a]} for a in H}
    if pr["dtype"] == torch.float64:
        assert_hessian_close(H64, ref)
    else:  # float32 arithmetic against the float64 oracle: float32's tolerance
        assert_hessian_close(H64, ref, rtol=1e-4, atol=1e-5)


@given(problems())
def test_symmetry_and_adjoint_identity(pr: dict[str, Any]) -> None:
    f, p, x, y = pr["f"], pr["params"], pr["x"], pr["y"]
    M = funchess.to_matrix(funchess.hessian(f, chunk_size=pr["chunk"])(p, x, y))
    torch.testing.assert_close(M, M.T, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(pr["n"])
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in p.items()}
    w = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in p.items()}
    loss = lambda q: f(q, x, y)  # noqa: E731
    hv = funchess.ravel(funchess.hvp(loss)(p, v))
    hw = funchess.ravel(funchess.hvp(loss)(p, w))
    rv, rw = funchess.ravel(v), funchess.ravel(w)
    torch.testing.assert_close(hv @ rw, rv @ hw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hv, M @ rv, rtol=1e-9, atol=1e-12)


@given(problems(), st.integers(1, 4))
def test_chunked_equals_unchunked_and_modes_agree(pr: dict[str, Any], chunk: int) -> None:
    f, p, x, y = pr["f"], pr["params"], pr["x"], pr["y"]
    whole = funchess.hessian(f, chunk_size=pr["n"])(p, x, y)
    for mode in ("rev-rev", "fwd-rev"):
        assert_hessian_close(funchess.hessian(f, mode=mode, chunk_size=chunk)(p, x, y), whole)


@given(problems())
def test_vmap_equals_loop_for_per_sample_hessians(pr: dict[str, Any]) -> None:
    f, p, x, y = pr["f"], pr["params"], pr["x"], pr["y"]
    one = lambda q, xi, yi: f(q, xi[None], yi[None])  # noqa: E731
    batched = torch.func.vmap(funchess.hessian(one, chunk_size=pr["chunk"]), in_dims=(None, 0, 0))(p, x, y)
    for i in range(x.shape[0]):
        looped = funchess.hessian(one)(p, x[i], y[i])
        assert_hessian_close({a: {b: batched[a][b][i] for b in p} for a in p}, looped)


@given(problems())
def test_hvp_vmapped_over_tangents_equals_loop(pr: dict[str, Any]) -> None:
    f, p, x, y = pr["f"], pr["params"], pr["x"], pr["y"]
    loss = lambda q: f(q, x, y)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    V = {k: torch.randn((3, *t.shape), generator=gen, dtype=t.dtype) for k, t in p.items()}
    for mode in ("rev-rev", "fwd-rev"):
        batched = torch.func.vmap(funchess.hvp(loss, mode=mode), in_dims=(None, 0))(p, V)
        for i in range(3):
            looped = funchess.hvp(loss, mode=mode)(p, {k: t[i] for k, t in V.items()})
            assert_hessian_close({k: t[i] for k, t in batched.items()}, looped)


@given(problems())
def test_grad_of_hessian_trace_composes(pr: dict[str, Any]) -> None:
    # third derivatives through funchess.hessian under torch.func.grad, against nested autograd
    f, p, x, y = pr["f"], pr["params"], pr["x"], pr["y"]
    trace = lambda q: torch.diagonal(funchess.to_matrix(funchess.hessian(f)(q, x, y))).sum()  # noqa: E731
    g = torch.func.grad(trace)(p)
    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    ref_t = torch.diagonal(funchess.to_matrix(reference_hessian_graph(f, leaves, x, y))).sum()
    if ref_t.requires_grad:
        ref = torch.autograd.grad(ref_t, list(leaves.values()), allow_unused=True)
    else:  # the Hessian does not depend on the parameters (e.g. a linear model with MSE)
        ref = (None,) * len(leaves)
    for t, r in zip(g.values(), ref):
        torch.testing.assert_close(t, torch.zeros_like(t) if r is None else r, rtol=1e-8, atol=1e-10)


def reference_hessian_graph(f: Any, leaves: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
    """Nested double backward keeping the graph (so a third derivative can be taken)."""
    loss = f(leaves, x, y)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.cat([(torch.zeros_like(t) if r is None else r).reshape(-1) for t, r in zip(leaves.values(), torch.autograd.grad(flat[i], list(leaves.values()), create_graph=True, allow_unused=True))]) for i in range(flat.numel())]
    return funchess.from_matrix(torch.stack(rows), leaves)
