"""Every transform on every case of the table, against the nested double-backward oracle."""

from __future__ import annotations

import pytest
import torch

import funchess
from funchess.testing import assert_hessian_close, reference_hessian, reference_hvp

from cases import Case


def _setup(case: Case):  # type: ignore[no-untyped-def]
    f, params = case.functional()
    return f, params


@pytest.fixture(params=["joint", "per-leaf"])
def grouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The planner runs cheap full Hessians as one joint group over all rows and the rest in the
    symmetric per-leaf block engine; each case meets both, forced."""
    if request.param == "per-leaf":
        monkeypatch.setattr(funchess._hessian, "_JOINT_MAX_N", 0)
    else:
        monkeypatch.setattr(funchess._hessian, "_JOINT_FLOPS_PER_LEAF", float("inf"))
    return str(request.param)


@pytest.mark.parametrize("mode", ["auto", "rev-rev", "fwd-rev"])
def test_hessian_matches_reference(case: Case, mode: str, grouping: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(case.model)
    f, params = _setup(case)
    expected = case.reference()
    actual = funchess.hessian(f, mode=mode)(params, case.inputs, case.targets)
    assert_hessian_close(actual, expected, msg=f"{case.name} {mode} {grouping}")
    for a in params:
        for b in params:
            assert actual[a][b].shape == params[a].shape + params[b].shape
    snap.assert_unchanged()


@pytest.mark.parametrize("chunk_size", [3, 10_000])
def test_chunked_hessian_matches_reference(case64: Case, chunk_size: int, grouping: str) -> None:
    f, params = _setup(case64)
    expected = case64.reference()
    actual = funchess.hessian(f, chunk_size=chunk_size)(params, case64.inputs, case64.targets)
    assert_hessian_close(actual, expected)


@pytest.mark.parametrize("mode", ["auto", "rev-rev", "fwd-rev"])
def test_hvp_and_vhp_match_reference(case: Case, mode: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(case.model)
    f, params = _setup(case)
    gen = torch.Generator().manual_seed(7)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for k, p in params.items()}
    loss = lambda p: f(p, case.inputs, case.targets)  # noqa: E731
    expected = reference_hvp(loss, (params,), (v,))
    assert_hessian_close(funchess.hvp(f, mode=mode)(params, v, case.inputs, case.targets), expected)
    assert_hessian_close(funchess.hvp(loss, mode=mode)(params, v), expected)
    snap.assert_unchanged()


def test_hessian_to_matrix_agrees_with_hvp(case64: Case) -> None:
    f, params = _setup(case64)
    H = funchess.hessian(f)(params, case64.inputs, case64.targets)
    M = funchess.to_matrix(H)
    torch.testing.assert_close(M, M.T, rtol=1e-10, atol=1e-12)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hv = funchess.hvp(f)(params, v, case64.inputs, case64.targets)
    torch.testing.assert_close(M @ funchess.ravel(v), funchess.ravel(hv), rtol=1e-9, atol=1e-11)


def test_batchnorm_train_never_updates_running_stats(snapshot) -> None:  # type: ignore[no-untyped-def]
    from cases import batchnorm_train

    case = batchnorm_train(torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = _setup(case)
    for mode in ("rev-rev", "fwd-rev"):
        funchess.hessian(f, mode=mode)(params, case.inputs, case.targets)
    f(params, case.inputs, case.targets)  # a plain call too
    snap.assert_unchanged()
    bn = case.model[1]
    assert int(bn.num_batches_tracked) == 0


def test_tied_weights_counted_once() -> None:
    from cases import tied

    case = tied(torch.float64, "cpu")
    f, params = _setup(case)
    assert list(params) == ["enc.weight", "dec.bias"]
    H = funchess.hessian(f)(params, case.inputs, case.targets)
    assert H["enc.weight"]["enc.weight"].shape == (6, 3, 6, 3)


def test_frozen_and_selected_parameters_are_left_out() -> None:
    from cases import frozen, selected

    f, params = _setup(frozen(torch.float64, "cpu"))
    assert list(params) == ["0.bias", "2.weight", "2.bias"]
    f, params = _setup(selected(torch.float64, "cpu"))
    assert list(params) == ["2.weight", "2.bias", "4.bias"]


def test_unused_parameter_gives_zero_blocks() -> None:
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)}).double()

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,), strict=False) if False else (
            torch.tanh(x @ p["used.weight"].T + p["used.bias"]).pow(2).sum()
        )

    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)
    for mode in ("rev-rev", "fwd-rev"):
        H = funchess.hessian(loss, mode=mode)(params, x)
        assert_hessian_close(H, reference_hessian(loss, params, x))
        for k in ("unused.weight", "unused.bias"):
            for b in params:
                assert not H[k][b].any() and not H[b][k].any()
