"""Data-set Hessians, HVPs and GGNs: equal to the concatenated data set for uneven batches."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import funchess
from funchess.testing import assert_hessian_close, reference_hessian, reference_hvp

from cases import Case, batchnorm_train, mlp_ce, mlp_mse

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(case: Case, reduction: str) -> Any:
    return funchess.functional(case.model, functools.partial(case.loss_fn, reduction=reduction))


def _loader(case: Case, batch_size: int) -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(TensorDataset(case.inputs, case.targets), batch_size=batch_size)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [mlp_mse, mlp_ce])
def test_dataset_hessian_equals_the_concatenated_data_set(make: Any, reduction: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    case = make(torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = _loss(case, reduction)
    loader = _loader(case, 4)  # 7 or 9 samples: an uneven last batch
    assert [len(b[0]) for b in loader][-1] < 4
    H = funchess.dataset_hessian(f, reduction=reduction)(params, loader)
    assert_hessian_close(H, reference_hessian(f, params, case.inputs, case.targets))
    snap.assert_unchanged()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataset_hvp_equals_the_concatenated_data_set(reduction: str) -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = _loss(case, reduction)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    got = funchess.dataset_hvp(f, reduction=reduction)(params, v, _loader(case, 4))
    expected = reference_hvp(lambda p: f(p, case.inputs, case.targets), (params,), (v,))
    assert_hessian_close(got, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataset_ggn_and_ggn_vp_equal_the_concatenated_data_set(reduction: str) -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = _loss(case, reduction)
    batches = [(case.inputs[:5], case.targets[:5]), (case.inputs[5:], case.targets[5:])]
    G = funchess.dataset_ggn(f, reduction=reduction)(params, batches)
    whole = funchess.ggn(f)(params, case.inputs, case.targets)
    assert_hessian_close(G, whole)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    Gv = funchess.dataset_ggn_vp(f, reduction=reduction)(params, v, batches)
    torch.testing.assert_close(funchess.ravel(Gv), funchess.to_matrix(whole) @ funchess.ravel(v), rtol=1e-9, atol=1e-11)


def test_batches_of_pytrees_and_targetless_losses() -> None:
    torch.manual_seed(0)
    w = {"w": torch.randn(3, dtype=torch.float64)}

    def f(p: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torch.tanh(inputs["x"] @ p["w"]) * inputs["scale"]).mean()

    x, scale = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    batches = [({"x": x[:2], "scale": scale[:2]}, None), ({"x": x[2:], "scale": scale[2:]}, None)]
    H = funchess.dataset_hessian(f)(w, batches)
    assert_hessian_close(H, reference_hessian(f, w, {"x": x, "scale": scale}))


def test_batchnorm_in_train_mode_uses_each_batch_and_never_updates_running_stats(snapshot) -> None:  # type: ignore[no-untyped-def]
    case = batchnorm_train(torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = funchess.functional(case.model, F.mse_loss)
    batches = [(case.inputs[:4], case.targets[:4]), (case.inputs[4:], case.targets[4:])]
    H = funchess.to_matrix(funchess.dataset_hessian(f)(params, batches))
    expected = sum(
        len(x) / 6 * funchess.to_matrix(reference_hessian(f, params, x, y)) for x, y in batches
    )
    torch.testing.assert_close(H, expected, rtol=1e-9, atol=1e-11)
    snap.assert_unchanged()
    assert int(case.model[1].num_batches_tracked) == 0


def test_dropout_is_refused_by_default_and_allowed_with_randomness_different() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    f, params = funchess.functional(model, F.mse_loss)
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))]
    with pytest.raises(
        funchess.UnsupportedError,
        match=r"funchess\.dataset_hessian\(f\)\(params, data\): f draws random numbers \(e\.g\. dropout in train mode\)",
    ):
        funchess.dataset_hessian(f)(params, batches)
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.dataset_hvp\(f\)\(params, v, data\): f draws random"):
        funchess.dataset_hvp(f)(params, params, batches)
    H = funchess.to_matrix(funchess.dataset_hessian(f, randomness="different", mode="rev-rev")(params, batches))
    torch.testing.assert_close(H, H.T, rtol=1e-9, atol=1e-12)  # one mask for the whole Hessian


def test_progress_bar_on_request_and_off_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = funchess.functional(case.model, F.mse_loss)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    funchess.dataset_hvp(f)(params, v, _loader(case, 3))
    funchess.dataset_hvp(f, progress=None)(params, v, _loader(case, 3))  # captured stderr is not a tty
    assert capsys.readouterr().err == ""
    funchess.dataset_hvp(f, progress=True)(params, v, _loader(case, 3))
    err = capsys.readouterr().err
    assert "funchess.dataset_hvp" in err and "/3 [" in err  # the bar, with the loader's length


def test_errors_are_pinned() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = funchess.functional(case.model, F.mse_loss)
    H = funchess.dataset_hessian(f)
    empty = DataLoader(TensorDataset(case.inputs[:0], case.targets[:0]), batch_size=3)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.dataset_hessian\(f\)\(params, data\): data yielded no batches; expected at least one \(inputs, targets\) batch"):
        H(params, empty)
    with pytest.raises(funchess.InvalidArgumentError, match=r"data yielded no batches.*drop_last=True"):
        funchess.dataset_hvp(f)(params, params, DataLoader(TensorDataset(case.inputs, case.targets), batch_size=10, drop_last=True))
    with pytest.raises(funchess.StructureError, match=r"expected every batch to be a pair \(inputs, targets\), got a dict with keys \['x', 'y'\] as batch 0"):
        H(params, [{"x": case.inputs, "y": case.targets}])
    with pytest.raises(funchess.StructureError, match=r"got a tuple of 3 elements as batch 1"):
        H(params, [(case.inputs, case.targets), (case.inputs, case.targets, None)])
    with pytest.raises(funchess.StructureError, match=r"expected data to be an iterable of \(inputs, targets\) batches .* got a Tensor of shape \(7, 4\)"):
        H(params, case.inputs)
    with pytest.raises(funchess.StructureError, match=r"batch 0 has inputs a NoneType with no Tensor holding the samples along dim 0"):
        H(params, [(None, case.targets)])
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected reduction to be 'mean' or 'sum' .* got 'none'"):
        funchess.dataset_hessian(f, reduction="none")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected randomness to be one of 'error', 'different', got 'same'"):
        funchess.dataset_hvp(f, randomness="same")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected progress to be True \(show a bar\), None \(only on a terminal\) or False"):
        funchess.dataset_ggn(f, progress="yes")  # type: ignore[arg-type]
