"""GGN, GGN-vector products, per-sample GGN and empirical Fisher against brute-force references."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funchess
from funchess.testing import assert_hessian_close, reference_ggn, reference_hessian

from cases import CASES, Case, mlp_ce, mlp_mse

pytestmark = pytest.mark.usefixtures("one_thread")

GGN_CASES = ["mlp_mse", "mlp_ce", "conv", "layernorm", "batchnorm_eval", "embedding", "attention_sdpa", "selected"]


def _setup(case: Case) -> tuple[Any, dict[str, torch.Tensor]]:
    return case.functional()


def _reference(case: Case, f: Any, params: dict[str, torch.Tensor], x: Any, y: Any) -> Any:
    return reference_ggn(lambda p, x: f.output(p, x), lambda z: case.loss_fn(z, y), params, x)


@pytest.mark.parametrize("name", GGN_CASES)
def test_ggn_matches_brute_force_jt_h_j(name: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    case = CASES[name](torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = _setup(case)
    G = funchess.ggn(f)(params, case.inputs, case.targets)
    assert_hessian_close(G, _reference(case, f, params, case.inputs, case.targets), msg=name)
    M = funchess.to_matrix(G)
    torch.testing.assert_close(M, M.T, rtol=1e-9, atol=1e-12)
    snap.assert_unchanged()


def test_ggn_equals_the_hessian_for_a_model_linear_in_its_parameters() -> None:
    torch.manual_seed(0)
    features = torch.randn(9, 4, dtype=torch.float64)

    def out(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        phi = torch.cat([x, torch.tanh(x) ** 2], 1)  # nonlinear in the data, linear in p
        return phi @ p["w"].T + p["b"]

    params = {"w": torch.randn(3, 8, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    y = torch.randn(9, 3, dtype=torch.float64)
    loss = lambda p, x, y: F.mse_loss(out(p, x), y)  # noqa: E731
    G = funchess.ggn(out, loss_fn=F.mse_loss)(params, features, y)
    H = reference_hessian(loss, params, features, y)
    assert_hessian_close(G, H)
    assert_hessian_close(funchess.hessian(loss)(params, features, y), G)


def test_ggn_with_more_outputs_than_parameters() -> None:
    model = nn.Linear(2, 3).double()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(20, 2, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)  # M = 60 > N = 9
    G = funchess.ggn(f, chunk_size=7)(params, x, y)
    expected = reference_ggn(lambda p, x: f.output(p, x), lambda z: F.mse_loss(z, y), params, x)
    assert_hessian_close(G, expected)


@pytest.mark.parametrize("name", ["mlp_ce", "conv", "layernorm"])
def test_ggn_vp_is_the_ggn_times_v(name: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    gen = torch.Generator().manual_seed(1)
    vs = [{k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()} for _ in range(3)]
    M = funchess.to_matrix(funchess.ggn(f)(params, case.inputs, case.targets))
    gvp = funchess.ggn_vp(f)
    for v in vs:
        got = funchess.ravel(gvp(params, v, case.inputs, case.targets))
        torch.testing.assert_close(got, M @ funchess.ravel(v), rtol=1e-9, atol=1e-11)
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    batched = torch.func.vmap(lambda v: gvp(params, v, case.inputs, case.targets))(stacked)
    for j, v in enumerate(vs):
        torch.testing.assert_close(funchess.ravel({k: batched[k][j] for k in params}), M @ funchess.ravel(v), rtol=1e-9, atol=1e-11)


def test_ggn_of_cross_entropy_is_positive_semidefinite() -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = _setup(case)
    M = funchess.to_matrix(funchess.ggn(f)(params, case.inputs, case.targets))
    assert torch.linalg.eigvalsh(M).min() > -1e-10


@pytest.mark.parametrize("name", ["mlp_ce", "conv", "embedding", "batchnorm_eval"])
def test_per_sample_ggn_matches_reference_loop(name: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    G = funchess.per_sample_ggn(f, sample_chunk_size=3)(params, case.inputs, case.targets)
    B = case.targets.shape[0]
    for i in range(B):
        x, y = case.inputs[i : i + 1], case.targets[i : i + 1]
        assert_hessian_close({a: {b: G[a][b][i] for b in G[a]} for a in G}, _reference(case, f, params, x, y))
    mean = funchess.to_matrix(G, batch_dims=1).mean(0)
    torch.testing.assert_close(mean, funchess.to_matrix(funchess.ggn(f)(params, case.inputs, case.targets)), rtol=1e-9, atol=1e-12)


def test_per_sample_ggn_writes_into_a_reused_out_buffer() -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = _setup(case)
    fn = funchess.per_sample_ggn(f, sample_chunk_size=4)
    expected = funchess.to_matrix(fn(params, case.inputs, case.targets), batch_dims=1)
    buffer = torch.full_like(expected, float("nan"))
    G = fn(params, case.inputs, case.targets, out=buffer)
    assert funchess.to_matrix(G, batch_dims=1).data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)
    with pytest.raises(funchess.StructureError, match=r"funchess\.per_sample_ggn\(f, sample_chunk_size=4\)\(params, inputs, targets\): expected out to be a contiguous Tensor of shape .* got shape \(1, 2, 3\)"):
        fn(params, case.inputs, case.targets, out=torch.empty(1, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_is_the_mean_or_sum_of_gradient_outer_products(reduction: str) -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = case.functional(functools.partial(F.cross_entropy, reduction=reduction), params=None)
    grads = []
    for i in range(case.targets.shape[0]):
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        loss = f(leaves, case.inputs[i : i + 1], case.targets[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()))]))
    g = torch.stack(grads)
    expected = g.T @ g / (len(grads) if reduction == "mean" else 1)
    for chunk in (None, 2):
        F_ = funchess.empirical_fisher(f, reduction=reduction, sample_chunk_size=chunk)(params, case.inputs, case.targets)  # type: ignore[arg-type]
        torch.testing.assert_close(funchess.to_matrix(F_), expected, rtol=1e-10, atol=1e-12)


def test_dropout_is_refused_by_default_and_allowed_with_one_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.ggn\(f\)\(params, inputs, targets\): f draws random numbers"):
        funchess.ggn(f)(params, x, y)
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.ggn_vp\(f\)\(params, v, inputs, targets\): f draws random numbers"):
        funchess.ggn_vp(f)(params, params, x, y)
    G = funchess.to_matrix(funchess.ggn(f, randomness="same")(params, x, y))
    torch.testing.assert_close(G, G.T, rtol=1e-9, atol=1e-12)  # one mask for J and its transpose


def test_errors_are_pinned() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    with pytest.raises(
        funchess.InvalidArgumentError,
        match=r"funchess\.ggn\(f\): the GGN needs the model output and the loss separately; .* got no loss\. "
        r"Pass loss_fn=",
    ):
        funchess.ggn(lambda p, x: x)
    model_only, _ = case.functional(None, params=None)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.ggn_vp\(f\): the GGN needs .* got no loss"):
        funchess.ggn_vp(model_only)
    with pytest.raises(funchess.OutputError, match=r"loss_fn must return a scalar floating-point Tensor, got shape \(7, 3\).*Reduce the loss"):
        funchess.ggn(f, loss_fn=functools.partial(F.mse_loss, reduction="none"))(params, case.inputs, case.targets)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected reduction to be 'mean' or 'sum' .* got 'avg'"):
        funchess.empirical_fisher(f, reduction="avg")  # type: ignore[arg-type]
