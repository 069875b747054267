"""Data-set Hessians, HVPs and GGNs: equal to the concatenated data set for uneven batches."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import funchess
from funchess.testing import assert_hessian_close, reference_hessian, reference_hvp

import cases
from cases import Case, batchnorm_train, mlp_ce, mlp_mse

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(case: Case, reduction: str) -> Any:
    return case.functional(functools.partial(case.loss_fn, reduction=reduction), params=None)


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


def _equal_batches(make: Any) -> tuple[Case, Any, Any, list[Any]]:
    """A float64 case split into batches of equal size (2, or 1 for an odd number of samples)."""
    case = make(torch.float64, "cpu")
    f, params = case.functional(params=None)
    n = len(case.inputs)
    size = 2 if n % 2 == 0 else 1
    return case, f, params, [(case.inputs[i : i + size], case.targets[i : i + size]) for i in range(0, n, size)]


def _count_hessian_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the block engine: one entry per Hessian computed."""
    from funchess import _hessian

    calls: list[int] = []
    engine_run = _hessian.engine_run

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return engine_run(*args, **kwargs)

    monkeypatch.setattr(_hessian, "engine_run", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("group_samples", [1, 5, 8, 1024])
def test_dataset_hessian_takes_one_hessian_per_group_of_batches(
    monkeypatch: pytest.MonkeyPatch, group_samples: int, reduction: str
) -> None:
    from funchess import _dataset

    case = mlp_ce(torch.float64, "cpu")  # 9 samples: batches of 2, 2, 2, 2, 1
    f, params = _loss(case, reduction)
    monkeypatch.setattr(_dataset, "GROUP_SAMPLES", group_samples)
    calls = _count_hessian_calls(monkeypatch)
    H = funchess.dataset_hessian(f, reduction=reduction)(params, _loader(case, 2))
    assert_hessian_close(H, reference_hessian(f, params, case.inputs, case.targets))
    assert len(calls) == {1: 5, 5: 2, 8: 2, 1024: 1}[group_samples]  # groups of >= group_samples samples


def test_dataset_hessian_chunk_size_counts_rows_and_leaves_the_grouping_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from funchess import _hessian

    case = mlp_ce(torch.float64, "cpu")
    f, params = _loss(case, "mean")
    chunks: list[int] = []
    engine_run = _hessian.engine_run

    def spy(*args: Any, **kwargs: Any) -> Any:
        chunks.append(kwargs["chunk_for"](10, 10))
        return engine_run(*args, **kwargs)

    monkeypatch.setattr(_hessian, "engine_run", spy)
    H = funchess.dataset_hessian(f, chunk_size=3)(params, _loader(case, 4))  # rows per pass, as everywhere
    assert_hessian_close(H, reference_hessian(f, params, case.inputs, case.targets))
    assert chunks == [3]  # one group of all batches, passes of 3 rows


def test_dataset_hessian_splits_a_group_that_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from funchess import _data, _dataset

    real = _dataset.hessian

    def planned_too_big(g: Any, **opts: Any) -> Any:
        H = real(g, **opts)
        if getattr(g, "func", None) is not _data.group_loss:
            return H

        def group_hessian(params: Any, group: list[Any]) -> Any:
            if len(group) > 1:
                raise funchess.MemoryBudgetError("the group's working set does not fit")
            return H(params, group)

        return group_hessian

    monkeypatch.setattr(_dataset, "hessian", planned_too_big)
    case = mlp_ce(torch.float64, "cpu")
    f, params = _loss(case, "mean")
    H = funchess.dataset_hessian(f)(params, _loader(case, 4))  # one group, split batch by batch
    assert_hessian_close(H, reference_hessian(f, params, case.inputs, case.targets))


def test_dataset_hessian_vmaps_batches_of_equal_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from funchess import _data

    stacks: list[int] = []
    loss = _data.Stack.loss
    monkeypatch.setattr(_data.Stack, "loss", lambda self, *a: stacks.append(len(self.weights)) or loss(self, *a))
    torch.manual_seed(0)
    w = {"w": torch.randn(3, dtype=torch.float64)}

    def f(p: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torch.tanh(inputs["x"] @ p["w"]) ** 2 * inputs["scale"]).mean()

    x, scale = torch.randn(7, 3, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    batches = [({"x": x[i : i + 2], "scale": scale[i : i + 2]}, None) for i in range(0, 7, 2)]  # 2, 2, 2, 1
    H = funchess.dataset_hessian(f)(w, batches)
    assert_hessian_close(H, reference_hessian(f, w, {"x": x, "scale": scale}))
    assert stacks and set(stacks) == {3}  # the three batches of 2 as one vmapped stack; the last alone


@pytest.mark.parametrize("stack_samples, sizes", [(4, [2, 2]), (3, []), (100, [4])])
def test_dataset_hessian_stacks_batches_up_to_a_flop_budget(
    monkeypatch: pytest.MonkeyPatch, stack_samples: int, sizes: list[int]
) -> None:
    from funchess import _data, _dataset

    case = mlp_ce(torch.float64, "cpu")  # 9 samples: batches of 2, 2, 2, 2, 1
    f, params = _loss(case, "mean")
    batch = _data.Batch(case.inputs[:2], case.targets[:2], 2, 2.0)
    grouping = _data.Grouping(f, params, "error", 0.0)
    grouping.measure(batch)
    per_sample = grouping.flops
    assert per_sample > 0
    monkeypatch.setattr(_dataset, "STACK_FLOPS", per_sample * stack_samples)
    stacks: list[int] = []
    loss = _data.Stack.loss
    monkeypatch.setattr(_data.Stack, "loss", lambda self, *a: stacks.append(len(self.weights)) or loss(self, *a))
    H = funchess.dataset_hessian(f)(params, _loader(case, 2))
    assert_hessian_close(H, reference_hessian(f, params, case.inputs, case.targets))
    assert sorted(set(stacks)) == sorted(set(sizes))  # batches per vmapped stack (none: one by one)


@pytest.mark.parametrize(
    "make", [cases.conv, cases.layernorm, cases.embedding, cases.attention_mha, cases.transformer, cases.gru, cases.batchnorm_eval]
)
def test_dataset_hessian_with_every_batch_stacked_equals_the_weighted_batch_hessians(
    monkeypatch: pytest.MonkeyPatch, make: Any
) -> None:
    """f vmapped over stacked batches (or, where it does not vmap, e.g. the GRU, one by one)."""
    from funchess import _dataset

    monkeypatch.setattr(_dataset, "STACK_FLOPS", float("inf"))
    case, f, params, batches = _equal_batches(make)
    n = len(case.inputs)
    H = funchess.to_matrix(funchess.dataset_hessian(f)(params, batches))
    expected = sum(len(x) / n * funchess.to_matrix(reference_hessian(f, params, x, y)) for x, y in batches)
    torch.testing.assert_close(H, expected, rtol=1e-9, atol=1e-11)


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    group_samples=st.integers(1, 12),
    stack_samples=st.integers(1, 12),
    reduction=st.sampled_from(["mean", "sum"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_grouped_and_stacked_dataset_hessian_matches_the_reference(
    sizes: list[int], group_samples: int, stack_samples: int, reduction: str, dtype: torch.dtype
) -> None:
    from funchess import _data, _dataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    f, params = funchess.functional(model, functools.partial(F.cross_entropy, reduction=reduction))
    x, y = torch.randn(sum(sizes), 3, dtype=dtype), torch.randint(0, 2, (sum(sizes),))
    ends = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    batches = [(x[a:b], y[a:b]) for a, b in zip(ends, ends[1:])]
    grouping = _data.Grouping(f, params, "error", 0.0)
    grouping.measure(_data.Batch(x[:1], y[:1], 1, 1.0))
    per_sample = grouping.flops
    saved = _dataset.GROUP_SAMPLES, _dataset.STACK_FLOPS
    _dataset.GROUP_SAMPLES, _dataset.STACK_FLOPS = group_samples, per_sample * stack_samples
    try:
        H = funchess.dataset_hessian(f, reduction=reduction)(params, batches)
    finally:
        _dataset.GROUP_SAMPLES, _dataset.STACK_FLOPS = saved
    p64 = {k: v.double() for k, v in params.items()}
    f64 = funchess.functional(model.double(), functools.partial(F.cross_entropy, reduction=reduction))[0]
    assert_hessian_close(H, reference_hessian(f64, p64, x.double(), y))


@pytest.mark.parametrize("group_bytes", [1, 2**30])  # one batch per group; all batches in one group
@pytest.mark.parametrize("make", [cases.mlp_ce, cases.conv, cases.layernorm, cases.attention_sdpa, cases.gru])
def test_dataset_hvp_groups_and_stacks_batches(monkeypatch: pytest.MonkeyPatch, make: Any, group_bytes: int) -> None:
    from funchess import _dataset

    monkeypatch.setattr(_dataset, "PRODUCT_GROUP_BYTES", group_bytes)
    case, f, params, batches = _equal_batches(make)
    n = len(case.inputs)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    got = funchess.ravel(funchess.dataset_hvp(f)(params, v, batches))
    expected = sum(len(x) / n * funchess.ravel(reference_hvp(lambda p: f(p, x, y), (params,), (v,))) for x, y in batches)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("make", [cases.mlp_ce, cases.conv, cases.layernorm, cases.gru])
def test_dataset_ggn_vp_groups_and_stacks_batches(make: Any) -> None:
    case, f, params, batches = _equal_batches(make)
    n = len(case.inputs)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    got = funchess.ravel(funchess.dataset_ggn_vp(f)(params, v, batches))
    expected = sum(len(x) / n * funchess.ravel(funchess.ggn_vp(f)(params, v, x, y)) for x, y in batches)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_dataset_ggn_vp_of_stacked_batches_without_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    out, params = funchess.functional(model)
    x = torch.randn(7, 3, dtype=torch.float64)
    batches = [(x[i : i + 2], None) for i in range(0, 7, 2)]  # 2, 2, 2, 1; the loss takes the output only
    v = {k: torch.randn_like(p) for k, p in params.items()}
    got = funchess.dataset_ggn_vp(out, loss_fn=lambda z: (z**2).sum(-1).log1p().mean())(params, v, batches)
    whole = funchess.ggn_vp(out, loss_fn=lambda z: (z**2).sum(-1).log1p().mean())(params, v, x)
    torch.testing.assert_close(funchess.ravel(got), funchess.ravel(whole), rtol=1e-9, atol=1e-11)


def test_dataset_hessian_of_a_non_scalar_loss_says_so_with_stacked_batches() -> None:
    case = mlp_ce(torch.float64, "cpu")
    f = case.functional(None, params=None)[0]  # no loss: the model output
    params = dict(case.model.named_parameters())
    with pytest.raises(funchess.OutputError, match=r"f must return a scalar Tensor, got shape \(2, 4\)"):
        funchess.dataset_hessian(lambda p, x, t: f(p, x))(params, _loader(case, 2))


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


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("sizes", [(4, 2), (2, 2, 2)])  # equal sizes: the batches are stacked and vmapped
def test_batchnorm_in_train_mode_uses_each_batch_and_never_updates_running_stats(  # type: ignore[no-untyped-def]
    snapshot, sizes: tuple[int, ...], track_running_stats: bool
) -> None:
    case = batchnorm_train(torch.float64, "cpu")
    if not track_running_stats:  # batch statistics only: f runs under vmap over the stacked batches
        case.model[1].track_running_stats = False
        case.model[1].running_mean = case.model[1].running_var = case.model[1].num_batches_tracked = None
    snap = snapshot(case.model)
    f, params = case.functional(F.mse_loss, params=None)
    ends = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    batches = [(case.inputs[a:b], case.targets[a:b]) for a, b in zip(ends, ends[1:])]
    H = funchess.to_matrix(funchess.dataset_hessian(f)(params, batches))
    expected = sum(
        len(x) / 6 * funchess.to_matrix(reference_hessian(f, params, x, y)) for x, y in batches
    )
    assert not torch.allclose(H, funchess.to_matrix(reference_hessian(f, params, case.inputs, case.targets)))
    torch.testing.assert_close(H, expected, rtol=1e-9, atol=1e-11)
    snap.assert_unchanged()
    if track_running_stats:
        assert int(case.model[1].num_batches_tracked) == 0


@pytest.mark.parametrize("n_batches", [1, 3])  # 3 equal batches are stacked and vmapped
def test_dropout_is_refused_by_default_and_allowed_with_randomness_different(n_batches: int) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    f, params = funchess.functional(model, F.mse_loss)
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))] * n_batches
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
    f, params = case.functional(F.mse_loss, params=None)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    funchess.dataset_hvp(f)(params, v, _loader(case, 3))
    funchess.dataset_hvp(f, progress=None)(params, v, _loader(case, 3))  # captured stderr is not a tty
    assert capsys.readouterr().err == ""
    funchess.dataset_hvp(f, progress=True)(params, v, _loader(case, 3))
    err = capsys.readouterr().err
    assert "funchess.dataset_hvp" in err and "/3 [" in err  # the bar, with the loader's length


def test_errors_are_pinned() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = case.functional(F.mse_loss, params=None)
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
