"""One rule at every entry: randomness, batch statistics, the loss's normaliser, non-finite
operators, user errors that look like torch's, and every operator with every spectral tool."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import funchess
from funchess.testing import assert_hessian_close, reference_hessian, reference_hvp

from cases import batchnorm_train, mlp_ce

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def _dropout_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double().train()
    return model, torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)


def _entries(f: Any, params: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Every batch-level entry point, called with the defaults (randomness="error")."""
    v = {k: torch.ones_like(p) for k, p in params.items()}
    return {
        "hessian": lambda: funchess.hessian(f)(params, x, y),
        "hessian rev-rev": lambda: funchess.hessian(f, mode="rev-rev", chunk_size=3)(params, x, y),
        "hessian blocks": lambda: funchess.hessian(f, blocks="diagonal")(params, x, y),
        "hessian_diagonal": lambda: funchess.hessian_diagonal(f)(params, x, y),
        "plan_hessian": lambda: funchess.plan_hessian(f)(params, x, y),
        "hvp": lambda: funchess.hvp(f)(params, v, x, y),
        "ggn": lambda: funchess.ggn(f)(params, x, y),
        "ggn_vp": lambda: funchess.ggn_vp(f)(params, v, x, y),
        "HessianOperator": lambda: funchess.HessianOperator(f, params, x, y) @ v,
        "GGNOperator": lambda: funchess.GGNOperator(f, params, x, y) @ v,
        "dataset_hessian": lambda: funchess.dataset_hessian(f)(params, [(x, y)]),
        "dataset_hvp": lambda: funchess.dataset_hvp(f)(params, v, [(x, y)]),
        "DatasetOperator": lambda: funchess.DatasetOperator(f, params, [(x, y)]) @ v,
        "per_sample_grad": lambda: funchess.per_sample_grad(f)(params, x, y),
        "per_sample_hessian": lambda: funchess.per_sample_hessian(f)(params, x, y),
    }


@pytest.mark.parametrize("entry", list(_entries(None, {}, torch.zeros(1), torch.zeros(1))))
def test_dropout_in_train_mode_is_refused_everywhere_without_drawing(entry: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    model, x, y = _dropout_model()
    snap = snapshot(model)
    f, params = funchess.functional(model, F.mse_loss)
    state = torch.get_rng_state()
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.\w+\(.*f draws random numbers \(e\.g\. dropout in train mode\) with randomness='error'; expected a deterministic function\. Call model\.eval\(\), or pass randomness="):
        _entries(f, params, x, y)[entry]()
    snap.assert_unchanged()
    if entry not in ("per_sample_grad", "per_sample_hessian", "hessian rev-rev"):  # vmap refuses before drawing
        assert torch.equal(torch.get_rng_state(), state), "a refused call must leave the generator as it was"


def test_randomness_same_is_the_hessian_of_one_mask() -> None:
    model, x, y = _dropout_model()
    f, params = funchess.functional(model, F.mse_loss)
    for mode in ("rev-rev", "fwd-rev"):
        for chunk in ("auto", 2):
            torch.manual_seed(7)
            H = funchess.hessian(f, mode=mode, chunk_size=chunk, randomness="same")(params, x, y)
            torch.manual_seed(7)  # the oracle's single forward draws the same mask
            assert_hessian_close(H, reference_hessian(f, params, x, y), msg=f"{mode} {chunk}")
    torch.manual_seed(7)
    d = funchess.hessian_diagonal(f, randomness="same")(params, x, y)
    torch.manual_seed(7)
    expected = reference_hessian(f, params, x, y)
    assert_hessian_close(d, {k: expected[k][k].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape) for k, p in params.items()})
    torch.manual_seed(7)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    torch.manual_seed(7)
    hv = funchess.hvp(f, randomness="same")(params, v, x, y)
    torch.manual_seed(7)
    assert_hessian_close(hv, reference_hvp(lambda p: f(p, x, y), (params,), (v,)))


def test_an_operator_with_randomness_same_is_one_fixed_linear_map() -> None:
    model, x, y = _dropout_model()
    f, params = funchess.functional(model, F.mse_loss)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=D) for k, p in params.items()}
    for op in (funchess.HessianOperator(f, params, x, y, randomness="same"), funchess.GGNOperator(f, params, x, y, randomness="same")):
        first = funchess.ravel(op @ v)
        torch.testing.assert_close(funchess.ravel(op @ v), first, rtol=0, atol=0)  # the same mask every product
        M = op.as_matrix()
        torch.testing.assert_close(M, M.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(M @ funchess.ravel(v), first, rtol=1e-10, atol=1e-12)
    top = funchess.eigsh(funchess.HessianOperator(f, params, x, y, randomness="same"), k=2, generator=torch.Generator().manual_seed(1))
    assert top.converged


def test_batch_statistics_are_refused_by_default_and_allowed_when_asked(snapshot) -> None:  # type: ignore[no-untyped-def]
    case = batchnorm_train(D, "cpu")
    snap = snapshot(case.model)
    f, params = funchess.functional(case.model, case.loss_fn)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    for call in (
        lambda: funchess.hessian(f)(params, case.inputs, case.targets),
        lambda: funchess.hvp(f)(params, v, case.inputs, case.targets),
        lambda: funchess.ggn(f)(params, case.inputs, case.targets),
        lambda: funchess.HessianOperator(f, params, case.inputs, case.targets),
        lambda: funchess.dataset_hessian(f)(params, [(case.inputs, case.targets)]),
    ):
        with pytest.raises(funchess.InvalidArgumentError, match=r"the model has BatchNorm1d '1' in train mode; it normalises with the batch's statistics.*call model\.eval\(\), or pass funchess\.functional\(model, loss_fn, batch_norm='batch'\)"):
            call()
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.per_sample_hessian\(f\)\(params, \.\.\.\): the model has BatchNorm1d '1' in train mode; its batch statistics couple the samples"):
        funchess.per_sample_hessian(funchess.functional(case.model, case.loss_fn, batch_norm="batch")[0])(params, case.inputs, case.targets)
    f, params = case.functional()  # batch_norm="batch"
    assert_hessian_close(funchess.hessian(f)(params, case.inputs, case.targets), case.reference())
    snap.assert_unchanged()


@pytest.mark.parametrize("loss", [
    functools.partial(F.cross_entropy, weight=torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=D)),
    functools.partial(F.cross_entropy, ignore_index=1),
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=D), ignore_index=3),
    functools.partial(F.nll_loss, weight=torch.tensor([0.5, 1.5, 1.0, 2.0], dtype=D)),
], ids=["weight", "ignore_index", "module", "nll"])
def test_data_sets_weight_batches_by_the_loss_normaliser(loss: Any) -> None:
    case = mlp_ce(D, "cpu")  # 9 samples, 4 classes
    model = case.model if not isinstance(loss, functools.partial) or loss.func is not F.nll_loss else nn.Sequential(case.model, nn.LogSoftmax(-1))
    f, params = funchess.functional(model, loss)
    x, y = case.inputs, case.targets
    batches = [(x[:4], y[:4]), (x[4:6], y[4:6]), (x[6:], y[6:])]
    expected = reference_hessian(f, params, x, y)  # the mean loss of the concatenated data
    assert_hessian_close(funchess.dataset_hessian(f)(params, batches), expected)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    assert_hessian_close(funchess.dataset_hvp(f)(params, v, batches), reference_hvp(lambda p: f(p, x, y), (params,), (v,)))
    assert_hessian_close(funchess.DatasetOperator(f, params, batches).as_matrix(), funchess.to_matrix(expected))


def test_operators_refuse_non_finite_products_and_solvers_non_finite_right_hand_sides() -> None:
    A = torch.eye(4, dtype=D)
    A[1, 1] = float("nan")
    op = funchess.DenseOperator(A)
    with pytest.raises(funchess.OutputError, match=r"funchess\.eigsh\(op, k=1, which='LA'\): the operator returned non-finite values \(NaN or Inf\).*Check the loss and the parameters"):
        funchess.eigsh(op, generator=torch.Generator().manual_seed(0))
    with pytest.raises(funchess.OutputError, match=r"funchess\.cg\(op, b\): the operator returned non-finite values"):
        funchess.cg(op, torch.ones(4, dtype=D))
    with pytest.raises(funchess.OutputError, match=r"funchess\.trace_estimate\(op, num_hvps, method='hutch\+\+'\): the operator returned non-finite"):
        funchess.trace_estimate(op, 9)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.cg\(op, b\): b has non-finite entries \(NaN or Inf\)"):
        funchess.cg(funchess.DenseOperator(torch.eye(4, dtype=D)), torch.full((4,), float("nan"), dtype=D))


def test_a_user_error_that_looks_like_a_missing_rule_is_not_swallowed_by_auto() -> None:
    calls = []

    def f(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("the derivative for 'my_op' is not implemented")

    for entry in (lambda: funchess.hessian(f, chunk_size=2)(torch.ones(3)), lambda: funchess.hvp(f)(torch.ones(3), torch.ones(3))):
        calls.clear()
        with pytest.raises(RuntimeError, match=r"^the derivative for 'my_op' is not implemented$"):
            entry()
        assert len(calls) == 1  # raised as is, not retried in the other mode


def test_hvp_of_a_function_independent_of_its_point_is_zero_like_torch_func() -> None:
    f = lambda w, x: (x**2).sum()  # noqa: E731
    w, x = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    for mode in ("auto", "rev-rev", "fwd-rev"):
        out = funchess.hvp(f, mode=mode)(w, torch.ones(3, dtype=D), x)
        torch.testing.assert_close(out, torch.zeros(3, dtype=D))
    batched = torch.func.vmap(funchess.hvp(f), in_dims=(None, 0, None))(w, torch.eye(3, dtype=D), x)
    torch.testing.assert_close(batched, torch.zeros(3, 3, dtype=D))


# ----------------------------------------------------------------------------- operators x tools x data


def _data_kinds(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return {
        "list of batches": [(x[:5], y[:5]), (x[5:], y[5:])],
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=4),
        "shuffled DataLoader": DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)),
    }


def _operators() -> dict[str, tuple[funchess.LinearOperator, torch.Tensor]]:
    """Every operator kind, with the dense matrix it must equal (from the oracle)."""
    case = mlp_ce(D, "cpu")
    f, params = case.functional()
    x, y = case.inputs, case.targets
    H = funchess.to_matrix(case.reference())
    G = funchess.to_matrix(funchess.ggn(f)(params, x, y))
    ops: dict[str, tuple[funchess.LinearOperator, torch.Tensor]] = {
        "HessianOperator (tensor batch)": (funchess.HessianOperator(f, params, x, y), H),
        "GGNOperator (tensor batch)": (funchess.GGNOperator(f, params, x, y), G),
        "DenseOperator": (funchess.DenseOperator(H, params), H),
        "FunctionOperator": (funchess.FunctionOperator(lambda v: funchess.hvp(f)(params, v, x, y), params), H),
    }
    for kind, data in _data_kinds(x, y).items():
        ops[f"DatasetOperator hessian ({kind})"] = (funchess.DatasetOperator(f, params, data), H)
        ops[f"DatasetOperator ggn ({kind})"] = (funchess.DatasetOperator(f, params, data, curvature="ggn"), G)
    return ops


@pytest.mark.parametrize("name", list(_operators()))
def test_every_operator_with_every_spectral_tool(name: str) -> None:
    op, M = _operators()[name]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    n = M.shape[0]
    eig = torch.linalg.eigvalsh(M)
    torch.testing.assert_close(op.as_matrix(), M, rtol=1e-9, atol=1e-11)
    V = torch.randn(n, 3, generator=gen(), dtype=D)
    torch.testing.assert_close(op @ V, M @ V, rtol=1e-9, atol=1e-11)  # a batch of vectors at once
    top = funchess.eigsh(op, k=2, generator=gen())
    torch.testing.assert_close(top.eigenvalues, eig.flip(0)[:2], rtol=1e-7, atol=1e-9)
    tr = funchess.trace_estimate(op, 3 * n, generator=gen())  # the sketch spans the space: exact
    torch.testing.assert_close(tr.value, M.trace(), rtol=1e-8, atol=1e-10)
    hut = funchess.trace_estimate(op, 20, method="hutchinson", generator=gen())
    assert abs(float(hut.value - M.trace())) <= 6 * float(hut.std_error) + 1e-9
    est = funchess.diagonal_estimate(op, 20, generator=gen())
    assert est.num_hvps == 20
    torch.testing.assert_close(funchess.ravel(funchess.diagonal(op)), M.diagonal(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(funchess.trace(op), M.trace(), rtol=1e-9, atol=1e-11)
    sd = funchess.spectral_density(op, num_probes=2, num_steps=n, generator=gen())
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1) < 1e-6
    torch.testing.assert_close(sd.moments(1).mean(), M.trace() / n, rtol=0.5, atol=1.0)  # 2 probes: loose
    lam = float(eig[0].abs()) + 1e-1
    b = torch.randn(n, generator=gen(), dtype=D)
    sol = funchess.cg(op, b, damping=lam, rtol=1e-10)
    assert sol.converged
    torch.testing.assert_close(sol.solution, torch.linalg.solve(M + lam * torch.eye(n, dtype=D), b), rtol=1e-7, atol=1e-9)


def test_a_data_loader_given_as_one_batch_points_at_the_data_set_operator() -> None:
    case = mlp_ce(D, "cpu")
    f, params = case.functional()
    loader = DataLoader(TensorDataset(case.inputs, case.targets), batch_size=4)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.HessianOperator\(f, params, \*data\): expected one batch \(e\.g\. inputs, targets\), got a DataLoader\. For the curvature of a whole data set use funchess\.DatasetOperator\(f, params, loader\)"):
        funchess.HessianOperator(f, params, loader)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.DatasetOperator\(f, params, data\): expected data that can be iterated again for every product.*got a one-shot generator\. Pass list\(data\)"):
        funchess.DatasetOperator(f, params, (b for b in loader))
