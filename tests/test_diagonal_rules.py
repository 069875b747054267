"""The module rules of the diagonal sweep, one model per rule and Hypothesis-drawn chains, each
against the oracle in float64 (and the sweep must apply: these are all chains of known modules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import funchess
from funchess._diagonal import structured_hessian_diagonal
from funchess.testing import assert_hessian_close, reference_ggn, reference_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def _diag(H: Any, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.diagonal(H[k][k].reshape(p.numel(), p.numel())).reshape(p.shape) for k, p in params.items()}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.linspace(-0.3, 0.3, m.num_features))
                m.running_var.copy_(torch.linspace(0.5, 1.5, m.num_features))
    return model.double().eval()


def _images(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=_gen(1), dtype=torch.float64)


def _check(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor, per_sample: bool = True) -> None:
    f, params = funchess.functional(model, loss)
    fast = structured_hessian_diagonal(f, params, x, y)
    assert fast is not None, "the module-aware sweep should apply"
    assert_hessian_close(fast, _diag(reference_hessian(f, params, x, y), params), msg="Hessian diagonal")
    G = reference_ggn(f.output, lambda z: loss(z, y), params, x)
    assert_hessian_close(funchess.ggn_diagonal(f)(params, x, y), _diag(G, params), msg="GGN diagonal")
    if per_sample:
        psh = structured_hessian_diagonal(f, params, x, y, per_sample=True)
        assert psh is not None
        V = funchess.per_sample_ggn_factor(f)(params, x, y)
        n = x.shape[0] - 1
        assert_hessian_close({k: t[n] for k, t in psh.items()}, _diag(reference_hessian(f, params, x[n:], y[n:]), params), msg="per sample")
        Gn = reference_ggn(f.output, lambda z: loss(z, y[n:]), params, x[n:])
        torch.testing.assert_close(V.dense()[n], funchess.to_matrix(Gn), rtol=1e-9, atol=1e-12)


def _classes(n: int, k: int) -> Tensor:
    return torch.randint(0, k, (n,), generator=_gen(2))


MODELS: dict[str, Callable[[], tuple[nn.Module, Callable[..., Tensor], Tensor, Tensor]]] = {
    "conv1d stride padding": lambda: (
        _init(nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(9, 3))),
        F.cross_entropy, _images(3, 2, 5), _classes(3, 3)),
    "conv2d groups dilation same reflect, relu, max pool": lambda: (
        _init(nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, groups=2, padding="same", padding_mode="reflect"), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2))),
        F.cross_entropy, _images(3, 2, 4, 4), _classes(3, 2)),
    "conv2d circular stride, elu, adaptive pool": lambda: (
        _init(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1, padding_mode="circular"), nn.ELU(),
                            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 2))),
        F.mse_loss, _images(3, 1, 5, 5), _images(3, 2)),
    "conv3d sigmoid": lambda: (
        _init(nn.Sequential(nn.Conv3d(1, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 2))),
        F.cross_entropy, _images(2, 1, 3, 3, 3), _classes(2, 2)),
    "pad, conv, batch norm eval, leaky relu, avg pool": lambda: (
        _init(nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.LeakyReLU(0.2), nn.AvgPool2d(2),
                            nn.Flatten(), nn.Linear(8, 3))),
        F.cross_entropy, _images(3, 1, 4, 4), _classes(3, 3)),
    "embedding first, padding_idx": lambda: (
        _init(nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))),
        F.cross_entropy, torch.tensor([[0, 1, 1, 5], [2, 2, 2, 0], [4, 3, 1, 0]]), _classes(3, 2)),
    "tokens: embedding, layer norm, linear per token, gelu": lambda: (
        _init(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.GELU(), nn.Flatten(), nn.Linear(9, 2))),
        F.mse_loss, torch.tensor([[0, 1, 1], [4, 2, 0]]), _images(2, 2)),
    "sequence input: linear per position, silu, layer norm over two dims": lambda: (
        _init(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 4), nn.SiLU(), nn.LayerNorm((2, 4)), nn.Linear(4, 2),
                            nn.Flatten(), nn.Linear(4, 3))),
        F.cross_entropy, _images(3, 2, 3), _classes(3, 3)),
    "two convs: stride and zero padding, then reflect padding": lambda: (
        _init(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 2, padding=1, padding_mode="reflect"),
                            nn.Tanh(), nn.Conv2d(2, 3, 2, dilation=2, padding=1), nn.Flatten(), nn.Linear(48, 2))),
        F.cross_entropy, _images(3, 1, 6, 6), _classes(3, 2)),
    "rms norm, softmax, mse": lambda: (
        _init(nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4), nn.Linear(4, 3), nn.Softmax(dim=-1))),
        F.mse_loss, _images(3, 3), _images(3, 3).softmax(1)),
    "log-softmax and nll (generic loss factor)": lambda: (
        _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(dim=1))),
        F.nll_loss, _images(4, 3), _classes(4, 3)),
    "nested sequential, identity, dropout in eval, unflatten": lambda: (
        _init(nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Identity()), nn.Dropout(0.5), nn.Mish(),
                            nn.Unflatten(1, (2, 2)), nn.Flatten(), nn.Sequential(nn.Linear(4, 2)))),
        F.cross_entropy, _images(3, 3), _classes(3, 2)),
    "deep narrow mlp (dense curvature)": lambda: (
        _init(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(),
                            nn.Linear(3, 3), nn.Hardtanh(), nn.Linear(3, 3), nn.Softsign(), nn.Linear(3, 3))),
        F.cross_entropy, _images(4, 3), _classes(4, 3)),
    "selu, celu, hardswish, tanhshrink": lambda: (
        _init(nn.Sequential(nn.Linear(3, 4), nn.SELU(), nn.Linear(4, 4), nn.CELU(), nn.Linear(4, 4), nn.Hardswish(),
                            nn.Linear(4, 4), nn.Tanhshrink(), nn.Linear(4, 2))),
        F.mse_loss, _images(3, 3), _images(3, 2)),
    "in-place activations": lambda: (
        _init(nn.Sequential(nn.Linear(3, 4), nn.ELU(inplace=True), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))),
        F.cross_entropy, _images(3, 3), _classes(3, 2)),
    "upsample, pixel shuffle": lambda: (
        _init(nn.Sequential(nn.Conv2d(1, 4, 1), nn.PixelShuffle(2), nn.Upsample(scale_factor=2), nn.Tanh(), nn.Flatten(),
                            nn.Linear(64, 2))),
        F.cross_entropy, _images(2, 1, 2, 2), _classes(2, 2)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_rule_matches_the_oracle(name: str, snapshot) -> None:  # type: ignore[no-untyped-def]
    model, loss, x, y = MODELS[name]()
    snap = snapshot(model)
    _check(model, loss, x, y)
    snap.assert_unchanged()


def test_large_features_go_through_columns_instead_of_dense_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    from funchess._diagonal import _chain, _rules_nonlinear

    for module in (_chain, _rules_nonlinear):  # as if every feature map were large
        monkeypatch.setattr(module, "DENSE_MAX", 2)
    for name in ("sequence input: linear per position, silu, layer norm over two dims", "rms norm, softmax, mse",
                 "tokens: embedding, layer norm, linear per token, gelu", "deep narrow mlp (dense curvature)"):
        model, loss, x, y = MODELS[name]()
        _check(model, loss, x, y, per_sample=False)


def test_softmax_over_another_dim_takes_the_generic_path() -> None:
    model = _init(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2)), nn.Softmax(dim=1), nn.Flatten(), nn.Linear(4, 2)))
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = _images(3, 3), _classes(3, 2)
    assert structured_hessian_diagonal(f, params, x, y) is None
    assert_hessian_close(funchess.hessian_diagonal(f)(params, x, y), _diag(reference_hessian(f, params, x, y), params))


def test_float32_sweep_within_float32_tolerance() -> None:
    model, loss, x, y = MODELS["pad, conv, batch norm eval, leaky relu, avg pool"]()
    f64, p64 = funchess.functional(model, loss)
    ref = _diag(reference_hessian(f64, p64, x, y), p64)
    f32, p32 = funchess.functional(model.float(), loss)
    out = funchess.hessian_diagonal(f32)(p32, x.float(), y)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert_hessian_close(out, ref)


_ACTIVATIONS = [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.Softplus, nn.ELU, nn.SiLU, nn.LeakyReLU, nn.Identity]
_LOSSES: dict[str, Callable[[int, int], tuple[Callable[..., Tensor], Tensor]]] = {
    "ce": lambda B, C: (F.cross_entropy, _classes(B, C)),
    "mse": lambda B, C: (F.mse_loss, _images(B, C)),
    "bce": lambda B, C: (F.binary_cross_entropy_with_logits, (_images(B, C) > 0).double()),
    "cosh": lambda B, C: (lambda z, y: torch.cosh(z - y).sum(), _images(B, C)),
}


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    acts=st.lists(st.integers(0, len(_ACTIVATIONS) - 1), min_size=3, max_size=3),
    norm=st.sampled_from(["none", "layer", "batch"]),
    loss=st.sampled_from(sorted(_LOSSES)),
    batch=st.integers(1, 4),
    chunk=st.sampled_from([None, 1, 2]),
    sample_chunk=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 3),
)
def test_drawn_chains_match_the_oracle(
    widths: list[int], acts: list[int], norm: str, loss: str, batch: int, chunk: int | None, sample_chunk: int | None, seed: int
) -> None:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i == 0 and norm == "layer" and b >= 3:  # two entries: ill-conditioned, the oracle's rounding shows
            layers.append(nn.LayerNorm(b))
        if i == 0 and norm == "batch":
            layers.append(nn.BatchNorm1d(b))
        layers.append(_ACTIVATIONS[acts[i]]())
    C = widths[-1] + 1
    layers.append(nn.Linear(widths[-1], C))
    model = _init(nn.Sequential(*layers), seed)
    lossf, y = _LOSSES[loss](batch, C)
    x = torch.randn(batch, widths[0], generator=_gen(seed + 10), dtype=torch.float64)
    f, params = funchess.functional(model, lossf)
    fast = structured_hessian_diagonal(f, params, x, y, chunk_size=chunk, sample_chunk_size=sample_chunk)
    assert fast is not None
    assert_hessian_close(fast, _diag(reference_hessian(f, params, x, y), params))
    G = reference_ggn(f.output, lambda z: lossf(z, y), params, x)
    ggn = funchess.ggn_diagonal(f, chunk_size=chunk or "auto", sample_chunk_size=sample_chunk or "auto")
    assert_hessian_close(ggn(params, x, y), _diag(G, params))
    psh = structured_hessian_diagonal(f, params, x, y, per_sample=True, sample_chunk_size=sample_chunk)
    assert psh is not None
    assert_hessian_close({k: t[0] for k, t in psh.items()}, _diag(reference_hessian(f, params, x[:1], y[:1]), params))
