"""Per-sample gradients, Hessians and HVPs against a loop of the nested double-backward oracle."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funchess
from funchess.testing import assert_hessian_close, reference_hessian, reference_hvp

from cases import CASES, Case, batchnorm_eval, batchnorm_train, mlp_ce, mlp_mse

pytestmark = pytest.mark.usefixtures("one_thread")

RECURRENT = ["gru", "lstm"]  # torch.func.vmap has no batching rule for recurrent layers
PER_SAMPLE = [name for name in CASES if name != "batchnorm_train" and name not in RECURRENT]


def _setup(case: Case) -> tuple[Any, dict[str, torch.Tensor]]:
    return case.functional()


def _sample(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[i : i + 1]


def _row(tree: Any, i: int) -> Any:
    return {a: {b: tree[a][b][i] for b in tree[a]} for a in tree}


@functools.cache
def _reference(name: str) -> list[Any]:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    B = case.targets.shape[0]
    return [reference_hessian(f, params, _sample(case.inputs, i), _sample(case.targets, i)) for i in range(B)]


def test_every_per_sample_case_is_in_the_table() -> None:
    assert not CASES["batchnorm_train"](torch.float64, "cpu").per_sample
    assert all(CASES[n](torch.float64, "cpu").per_sample for n in PER_SAMPLE)


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_hessian_matches_reference_loop(name: str, mode: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    case = CASES[name](torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = _setup(case)
    H = funchess.per_sample_hessian(f, mode=mode)(params, case.inputs, case.targets)
    expected = _reference(name)
    for a in params:
        for b in params:
            assert H[a][b].shape == (len(expected), *params[a].shape, *params[b].shape)
    for i, ref in enumerate(expected):
        assert_hessian_close(_row(H, i), ref, msg=f"{name} {mode} sample {i}")
    snap.assert_unchanged()


@settings(max_examples=8)
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    samples=st.integers(1, 5),
    sample_chunk_size=st.one_of(st.none(), st.integers(1, 6)),
    chunk_size=st.one_of(st.none(), st.integers(1, 40)),
    mode=st.sampled_from(["auto", "fwd-rev", "rev-rev"]),
    loss=st.sampled_from(["mse", "ce"]),
)
def test_chunked_per_sample_hessian_matches_reference(
    widths: list[int], samples: int, sample_chunk_size: int | None, chunk_size: int | None, mode: str, loss: str
) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1], nn.Linear(widths[-1], 2)).double()
    x = torch.randn(samples, widths[0], dtype=torch.float64)
    y = torch.randn(samples, 2, dtype=torch.float64) if loss == "mse" else torch.randint(0, 2, (samples,))
    f, params = funchess.functional(model, F.mse_loss if loss == "mse" else F.cross_entropy)
    H = funchess.per_sample_hessian(f, mode=mode, sample_chunk_size=sample_chunk_size or "auto", chunk_size=chunk_size)(
        params, x, y
    )
    for i in range(samples):
        assert_hessian_close(_row(H, i), reference_hessian(f, params, x[i : i + 1], y[i : i + 1]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_hessians_reduce_to_the_batch_hessian(reduction: str) -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = case.functional(functools.partial(F.cross_entropy, reduction=reduction), params=None)
    M = funchess.to_matrix(funchess.per_sample_hessian(f)(params, case.inputs, case.targets), batch_dims=1)
    batch = funchess.to_matrix(funchess.hessian(f)(params, case.inputs, case.targets))
    torch.testing.assert_close(M.mean(0) if reduction == "mean" else M.sum(0), batch, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M, M.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_per_sample_hessian_blocks_are_views_of_one_tensor() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    H = funchess.per_sample_hessian(f)(params, case.inputs, case.targets)
    M = funchess.to_matrix(H, batch_dims=1)
    assert M.shape == (7, 51, 51)
    assert M.data_ptr() == H["0.weight"]["0.weight"].data_ptr()
    with pytest.raises(funchess.StructureError, match=r"funchess\.to_matrix\(H, batch_dims=-1\): expected batch_dims to be a non-negative int, got -1"):
        funchess.to_matrix(H, batch_dims=-1)
    with pytest.raises(funchess.StructureError, match=r"funchess\.to_matrix\(H\): diagonal block 0 has shape \(7, 6, 4, 6, 4\).*need batch_dims=1"):
        funchess.to_matrix(H)  # forgot batch_dims=1
    back = funchess.from_matrix(M, params)
    assert back["2.weight"]["0.bias"].shape == (7, 3, 6, 6)
    assert torch.equal(back["2.weight"]["0.bias"], H["2.weight"]["0.bias"])


@pytest.mark.parametrize("randomness", ["error", "different"])
def test_per_sample_hessian_writes_into_a_reused_out_buffer(randomness: str) -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    fn = funchess.per_sample_hessian(f, randomness=randomness)  # type: ignore[arg-type]
    expected = funchess.to_matrix(fn(params, case.inputs, case.targets), batch_dims=1)
    buffer = torch.full((7, 51, 51), float("nan"), dtype=torch.float64)
    for _ in range(2):  # the second call overwrites the first result in place
        H = fn(params, case.inputs, case.targets, out=buffer)
        assert funchess.to_matrix(H, batch_dims=1).data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer, expected, rtol=0, atol=0)


def test_per_sample_hessian_out_errors_are_pinned() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    fn = funchess.per_sample_hessian(f)
    x, y = case.inputs, case.targets
    expected = r"funchess\.per_sample_hessian\(f\)\(params, \.\.\.\): expected out to be a contiguous Tensor of shape \(7, 51, 51\) \(samples, N, N\), torch\.float64 on cpu, got "
    for bad, got in [
        (torch.empty(7, 51, 50, dtype=torch.float64), r"shape \(7, 51, 50\), torch\.float64 on cpu\. Allocate it once with torch\.empty\(7, 51, 51, dtype=torch\.float64, device='cpu'\), or drop out="),
        (torch.empty(7, 51, 51), r"shape \(7, 51, 51\), torch\.float32 on cpu\."),
        (torch.empty(51, 51, 7, dtype=torch.float64).permute(2, 0, 1), r"shape \(7, 51, 51\), torch\.float64 on cpu, not contiguous\."),
        ([[0.0]], r"a list\."),
    ]:
        with pytest.raises(funchess.StructureError, match=expected + got):
            fn(params, x, y, out=bad)
    xs = torch.stack([x, x])
    buffer = torch.empty(7, 51, 51, dtype=torch.float64)
    with pytest.raises(funchess.UnsupportedError, match=r"out= cannot be used inside torch\.func transforms \(vmap, grad, \.\.\.\), which do not allow writing into a buffer\. Drop out= there\."):
        torch.func.vmap(lambda xi: fn(params, xi, y, out=buffer))(xs)


def test_per_sample_hessian_composes_with_vmap() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    xs = torch.stack([case.inputs, case.inputs.flip(0)])
    fn = funchess.per_sample_hessian(f, chunk_size=10, sample_chunk_size="auto")
    got = torch.func.vmap(lambda x: fn(params, x, case.targets))(xs)
    for k in range(2):
        expected = fn(params, xs[k], case.targets)
        assert_hessian_close({a: {b: got[a][b][k] for b in got[a]} for a in got}, expected)


def test_per_sample_hessian_of_a_plain_function_with_pytree_data() -> None:
    def f(p: dict[str, torch.Tensor], data: dict[str, Any], scale: float) -> torch.Tensor:
        z = torch.tanh(data["x"] @ p["w"]) * data["mask"]
        return scale * (z**2).sum() + (p["w"] ** 3).sum()

    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64)}
    data = {"x": torch.randn(4, 3, generator=gen, dtype=torch.float64), "mask": torch.rand(4, 2, generator=gen, dtype=torch.float64)}
    H = funchess.per_sample_hessian(f)(p, data, 0.5)
    for i in range(4):
        one = {"x": data["x"][i : i + 1], "mask": data["mask"][i : i + 1]}
        assert_hessian_close(H["w"]["w"][i], reference_hessian(f, p, one, 0.5)["w"]["w"])


# ----------------------------------------------------------------------------- gradients, HVPs


@pytest.mark.parametrize("name", ["mlp_ce", "conv", "layernorm", "batchnorm_eval", "embedding", "tied"])
def test_per_sample_grad_matches_autograd_loop(name: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    g = funchess.per_sample_grad(f, sample_chunk_size=2)(params, case.inputs, case.targets)
    for i in range(case.targets.shape[0]):
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        loss = f(leaves, _sample(case.inputs, i), _sample(case.targets, i))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (k, expected) in zip(leaves, grads):
            torch.testing.assert_close(g[k][i], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "fwd-rev", "rev-rev"])
@pytest.mark.parametrize("name", ["mlp_mse", "conv", "layernorm", "attention_sdpa"])
def test_per_sample_hvp_matches_reference_loop(name: str, mode: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    hv = funchess.per_sample_hvp(f, mode=mode)(params, v, case.inputs, case.targets)
    for i in range(case.targets.shape[0]):
        x, y = _sample(case.inputs, i), _sample(case.targets, i)
        expected = reference_hvp(lambda p: f(p, x, y), (params,), (v,))  # noqa: B023
        assert_hessian_close({k: hv[k][i] for k in hv}, expected)


# ----------------------------------------------------------------------------- model semantics


@pytest.mark.parametrize(
    "call",
    [
        lambda f: funchess.per_sample_hessian(f),
        lambda f: funchess.per_sample_grad(f),
        lambda f: funchess.per_sample_ggn(f),
        lambda f: funchess.empirical_fisher(f),
    ],
)
def test_batchnorm_in_train_mode_has_no_per_sample_meaning(call: Any) -> None:
    case = batchnorm_train(torch.float64, "cpu")
    f, params = _setup(case)
    with pytest.raises(
        funchess.InvalidArgumentError,
        match=r"funchess\.\w+\(f\)\(params, .*\): the model has BatchNorm1d '1' in train mode; its batch "
        r"statistics couple the samples.*call model\.eval\(\)",
    ):
        call(f)(params, case.inputs, case.targets)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_layers_are_refused_with_the_loop_to_use(name: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    with pytest.raises(
        funchess.UnsupportedError,
        match=r"the model has (GRU|LSTM) 'rnn'; torch\.func\.vmap has no batching rule for recurrent layers.*"
        r"Loop over them instead",
    ):
        funchess.per_sample_hessian(f)(params, case.inputs, case.targets)


def test_batchnorm_without_running_stats_is_refused_even_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    f, params = funchess.functional(model, F.mse_loss)
    with pytest.raises(funchess.InvalidArgumentError, match="with track_running_stats=False"):
        funchess.per_sample_hessian(f)(params, torch.randn(3, 3), torch.randn(3, 2))


def test_batchnorm_eval_per_sample_is_one_sample_through_the_eval_model(snapshot) -> None:  # type: ignore[no-untyped-def]
    case = batchnorm_eval(torch.float64, "cpu")
    snap = snapshot(case.model)
    f, params = _setup(case)
    g = funchess.per_sample_grad(f)(params, case.inputs, case.targets)
    whole = torch.func.grad(f)(params, case.inputs, case.targets)
    torch.testing.assert_close(g["0.weight"].mean(0), whole["0.weight"], rtol=1e-10, atol=1e-12)
    snap.assert_unchanged()


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.drop = nn.Linear(2, 3), nn.Linear(3, 2), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(torch.tanh(self.l1(x))))


def _masked_references(model: _DropoutNet, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[Any]:
    """The Hessian of one sample's loss for each of the 8 possible dropout masks."""
    out = []
    for bits in range(8):
        m = torch.tensor([(bits >> k) & 1 for k in range(3)], dtype=torch.float64) * 2.0

        def loss(p: dict[str, torch.Tensor], m: torch.Tensor = m) -> torch.Tensor:
            h = torch.tanh(x @ p["l1.weight"].T + p["l1.bias"]) * m
            return F.mse_loss(h @ p["l2.weight"].T + p["l2.bias"], y)

        out.append(reference_hessian(loss, params))
    return out


def _which_mask(H: Any, refs: list[Any]) -> int:
    M = funchess.to_matrix(H)
    hits = [k for k, R in enumerate(refs) if torch.allclose(M, funchess.to_matrix(R), rtol=1e-9, atol=1e-11)]
    assert len(hits) >= 1, "the Hessian matches no single dropout mask: masks were mixed between passes"
    return hits[0]


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_each_sample_sees_one_mask_in_every_pass(randomness: str, mode: str) -> None:
    torch.manual_seed(0)
    model = _DropoutNet().double().train()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    fn = funchess.per_sample_hessian(f, mode=mode, chunk_size=1, sample_chunk_size=4, randomness=randomness)  # type: ignore[arg-type]
    H = fn(params, x, y)
    masks = []
    for i in range(6):
        refs = _masked_references(model, params, x[i : i + 1], y[i : i + 1])
        masks.append(_which_mask(_row(H, i), refs))
    if randomness == "same":  # one mask per vectorised pass over samples (chunk_size=4)
        assert len(set(masks[:4])) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda f, p, x, y: funchess.per_sample_hessian(f)(p, x, y),
        lambda f, p, x, y: funchess.per_sample_hessian(f, mode="rev-rev")(p, x, y),
        lambda f, p, x, y: funchess.per_sample_grad(f)(p, x, y),
        lambda f, p, x, y: funchess.per_sample_hvp(f)(p, p, x, y),
        lambda f, p, x, y: funchess.per_sample_ggn(f)(p, x, y),
        lambda f, p, x, y: funchess.empirical_fisher(f)(p, x, y),
    ],
)
def test_dropout_without_a_randomness_choice_raises(call: Any) -> None:
    model = _DropoutNet().double().train()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(
        funchess.UnsupportedError,
        match=r"f draws random numbers \(e\.g\. dropout in train mode\) with randomness='error'; expected a "
        r"deterministic function\. Call model\.eval\(\), or pass randomness='different'",
    ):
        call(f, params, x, y)


# ----------------------------------------------------------------------------- errors


def test_errors_are_pinned() -> None:
    case = mlp_mse(torch.float64, "cpu")
    f, params = _setup(case)
    with pytest.raises(funchess.StructureError, match=r"every Tensor of the data must hold the samples along dim 0; expected size 7 \(from args\[1\]\), got shape \(3, 3\) at args\[2\]"):
        funchess.per_sample_hessian(f)(params, case.inputs, case.targets[:3])
    with pytest.raises(funchess.StructureError, match=r"expected per-sample data after params .* got 0 argument\(s\) with no Tensor"):
        funchess.per_sample_grad(f)(params)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected randomness to be one of 'error', 'same', 'different', got 'sometimes'"):
        funchess.per_sample_hessian(f, randomness="sometimes")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected mode to be one of"):
        funchess.per_sample_hvp(f, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.per_sample_hessian\(f, chunk_size=0, sample_chunk_size=2\): expected chunk_size \(rows or vectors per vectorised pass\) to be a positive int"):
        funchess.per_sample_hessian(f, chunk_size=0, sample_chunk_size=2)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.per_sample_hessian\(f, sample_chunk_size=0\): expected sample_chunk_size \(samples per vectorised pass\) to be a positive int"):
        funchess.per_sample_hessian(f, sample_chunk_size=0)
    with pytest.raises(funchess.StructureError, match=r"funchess\.per_sample_hvp\(f\)\(params, v, \.\.\.\): v\['0\.bias'\] must match params\['0\.bias'\]"):
        funchess.per_sample_hvp(f)(params, {k: torch.zeros(2) if k == "0.bias" else p for k, p in params.items()}, case.inputs, case.targets)


def test_renamed_chunk_sizes_warn_once_and_keep_working() -> None:
    case = mlp_ce(torch.float64, "cpu")
    f, params = case.functional()
    expected = funchess.per_sample_hessian(f)(params, case.inputs, case.targets)
    with pytest.warns(FutureWarning, match=r"hessian_chunk_size is deprecated; use chunk_size="):
        H = funchess.per_sample_hessian(f, hessian_chunk_size=3)(params, case.inputs, case.targets)
    assert_hessian_close(H, expected)
    with pytest.warns(FutureWarning, match=r"chunk_size now counts Hessian rows per pass \(before funchess 0\.2 it counted samples"):
        H = funchess.per_sample_hessian(f, chunk_size=3)(params, case.inputs, case.targets)
    assert_hessian_close(H, expected)
    with pytest.warns(FutureWarning, match=r"funchess\.per_sample_grad\(f\): chunk_size is deprecated for samples per pass; use sample_chunk_size="):
        g = funchess.per_sample_grad(f, chunk_size=2)(params, case.inputs, case.targets)
    assert_hessian_close(g, funchess.per_sample_grad(f)(params, case.inputs, case.targets))
