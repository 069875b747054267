"""The test matrix as data: small model/loss/data factories, one entry per case.

Each factory takes `(dtype, device)` and returns a `Case`. A new case is one entry in `CASES`.
Sizes are small (tens to ~200 parameters) so the nested-loop oracle stays fast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[..., Tensor]
    inputs: Any
    targets: Any
    params: list[str] | None = None  # funchess.functional's params=
    per_sample: bool = True  # a per-sample Hessian is defined (no coupling across the batch)
    options: dict[str, Any] = field(default_factory=dict)  # more of funchess.functional's options
    # boolean masks of parameter entries torch treats as constants (an embedding's padding row:
    # its gradient is defined as zero, yet its value moves the loss), so finite differences of the
    # gradient must not step along them
    constant: dict[str, Tensor] | None = None

    def functional(self, loss_fn: Any = "case", **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """`funchess.functional` of the case's model with its loss (or `loss_fn`; None for the model
        output), its parameter selection and options (keywords override them)."""
        import funchess

        options = {"params": self.params, **self.options, **kwargs}
        return funchess.functional(self.model, self.loss_fn if loss_fn == "case" else loss_fn, **options)

    def reference(self) -> Any:
        """The nested-loop oracle's Hessian of the case's loss (as `functional()` makes it) at its
        data, computed once per (case, dtype, device) in a session and shared by every test that
        compares with it (the cases are deterministic factories)."""
        import funchess
        from funchess.testing import reference_hessian

        f, params = self.functional()
        first = next(iter(params.values()))
        key = (self.name, first.dtype, str(first.device))
        if key not in _REFERENCES:
            _REFERENCES[key] = funchess.to_matrix(reference_hessian(f, params, self.inputs, self.targets))
        return funchess.from_matrix(_REFERENCES[key].clone(), params)


#: The oracle's Hessians, by (case, dtype, device): see `Case.reference`.
_REFERENCES: dict[tuple[str, torch.dtype, str], Tensor] = {}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype=dtype, device=device)


def _classes(n: int, k: int, device: str, seed: int = 2) -> Tensor:
    return torch.randint(0, k, (n,), generator=_gen(seed)).to(device)


def _init(model: nn.Module, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=_gen(seed + p.numel()), dtype=torch.float64) * 0.5)
    return model.to(dtype=dtype, device=device)


def mlp_mse(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), dtype, device)
    return Case("mlp_mse", model, F.mse_loss, _randn(7, 4, dtype=dtype, device=device), _randn(7, 3, dtype=dtype, device=device, seed=3))


def mlp_ce(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4)), dtype, device)
    return Case("mlp_ce", model, F.cross_entropy, _randn(9, 5, dtype=dtype, device=device), _classes(9, 4, device))


def conv(dtype: torch.dtype, device: str) -> Case:
    model = _init(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)),
        dtype,
        device,
    )
    return Case("conv", model, F.cross_entropy, _randn(4, 2, 6, 6, dtype=dtype, device=device), _classes(4, 3, device))


def layernorm(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)), dtype, device)
    return Case("layernorm", model, F.mse_loss, _randn(5, 4, dtype=dtype, device=device), _randn(5, 2, dtype=dtype, device=device, seed=3))


def _with_running_stats(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.linspace(-0.5, 0.5, m.num_features))
            m.running_var.copy_(torch.linspace(0.5, 2.0, m.num_features))
    return model


def batchnorm_eval(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), dtype, device)
    _with_running_stats(model).eval()
    return Case("batchnorm_eval", model, F.cross_entropy, _randn(6, 4, dtype=dtype, device=device), _classes(6, 3, device))


def batchnorm_train(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), dtype, device)
    _with_running_stats(model).train()
    return Case(
        "batchnorm_train", model, F.mse_loss, _randn(6, 4, dtype=dtype, device=device),
        _randn(6, 3, dtype=dtype, device=device, seed=3), per_sample=False, options={"batch_norm": "batch"},
    )


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.out = nn.Linear(6, 2)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)).flatten(1))


def embedding(dtype: torch.dtype, device: str) -> Case:
    model = _init(_Embed(), dtype, device)
    idx = torch.randint(0, 7, (5, 2), generator=_gen(4)).to(device)
    return Case("embedding", model, F.cross_entropy, idx, _classes(5, 2, device))


class _EmbedPadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.out = nn.Linear(9, 2)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)).flatten(1))  # couples the rows of one sample


def embedding_padding(dtype: torch.dtype, device: str) -> Case:
    # the padding row gets a nonzero value (nn.Embedding zeroes it): it moves the loss, but is a
    # constant to autograd, which forward mode must respect too
    model = _init(_EmbedPadded(), dtype, device)
    idx = torch.tensor([[0, 2, 1], [3, 0, 5], [4, 4, 0], [1, 5, 2]], device=device)
    pad = torch.zeros(6, 3, dtype=torch.bool, device=device)
    pad[0] = True
    return Case("embedding_padding", model, F.cross_entropy, idx, _classes(4, 2, device), constant={"emb.weight": pad})


def weight_norm(dtype: torch.dtype, device: str) -> Case:
    # torch's own double backward of the fused `_weight_norm` is wrong in the (g, v) block
    first = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
    model = _init(nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)), dtype, device)
    return Case("weight_norm", model, F.mse_loss, _randn(6, 4, dtype=dtype, device=device), _randn(6, 3, dtype=dtype, device=device, seed=3))


def weight_norm_hook(dtype: torch.dtype, device: str) -> Case:
    # the old hook form, normalising over the last dim (torch's other fused case)
    with warnings.catch_warnings():  # the hook form is deprecated, and still in use
        warnings.simplefilter("ignore", FutureWarning)
        first = nn.utils.weight_norm(nn.Linear(3, 4), dim=1)
    model = _init(nn.Sequential(first, nn.Softplus(), nn.Linear(4, 2)), dtype, device)
    return Case("weight_norm_hook", model, F.cross_entropy, _randn(5, 3, dtype=dtype, device=device), _classes(5, 2, device))


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.att(x, x, x, need_weights=False)
        return self.out(a.mean(1))


class _SDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).flatten(2).mean(1))


def attention_mha(dtype: torch.dtype, device: str) -> Case:
    model = _init(_MHA(), dtype, device).eval()
    return Case("attention_mha", model, F.mse_loss, _randn(3, 5, 4, dtype=dtype, device=device), _randn(3, 2, dtype=dtype, device=device, seed=3))


def attention_sdpa(dtype: torch.dtype, device: str) -> Case:
    model = _init(_SDPA(), dtype, device)
    return Case("attention_sdpa", model, F.mse_loss, _randn(3, 5, 4, dtype=dtype, device=device), _randn(3, 2, dtype=dtype, device=device, seed=3))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(x).mean(1))


def transformer(dtype: torch.dtype, device: str) -> Case:
    model = _init(_Transformer(), dtype, device, seed=1).eval()
    return Case(
        "transformer", model, F.cross_entropy, _randn(2, 3, 4, dtype=dtype, device=device), _classes(2, 2, device),
        params=["layer.self_attn.*", "layer.norm1.*", "layer.linear1.*", "out.*"],
    )


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def gru(dtype: torch.dtype, device: str) -> Case:
    model = _init(_Recurrent(nn.GRU), dtype, device)
    return Case("gru", model, F.mse_loss, _randn(3, 4, 3, dtype=dtype, device=device), _randn(3, 2, dtype=dtype, device=device, seed=3))


def lstm(dtype: torch.dtype, device: str) -> Case:
    model = _init(_Recurrent(nn.LSTM), dtype, device)
    return Case("lstm", model, F.mse_loss, _randn(3, 4, 3, dtype=dtype, device=device), _randn(3, 2, dtype=dtype, device=device, seed=3))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(6, 3)
        self.dec = nn.Linear(3, 6)
        self.dec.weight = self.enc.weight  # tied: appears once in named_parameters()

    def forward(self, idx: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(idx)))


def tied(dtype: torch.dtype, device: str) -> Case:
    model = _init(_Tied(), dtype, device)
    return Case("tied", model, F.cross_entropy, torch.randint(0, 6, (5,), generator=_gen(5)).to(device), _classes(5, 6, device))


def frozen(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)), dtype, device)
    model[0].weight.requires_grad_(False)
    return Case("frozen", model, F.mse_loss, _randn(6, 4, dtype=dtype, device=device), _randn(6, 3, dtype=dtype, device=device, seed=3))


def noncontiguous(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 3)), dtype, device)
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())  # transposed layout
        model[2].weight = nn.Parameter(model[2].weight.detach().clone()[:, :])
    assert not model[0].weight.is_contiguous()
    return Case("noncontiguous", model, F.mse_loss, _randn(6, 4, dtype=dtype, device=device), _randn(6, 3, dtype=dtype, device=device, seed=3))


def selected(dtype: torch.dtype, device: str) -> Case:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)), dtype, device)
    return Case("selected", model, F.mse_loss, _randn(6, 4, dtype=dtype, device=device), _randn(6, 2, dtype=dtype, device=device, seed=3), params=["2.*", "4.bias"])


CASES: dict[str, Callable[[torch.dtype, str], Case]] = {
    f.__name__: f
    for f in (
        mlp_mse, mlp_ce, conv, layernorm, batchnorm_eval, batchnorm_train, embedding, embedding_padding,
        attention_mha, attention_sdpa, transformer, gru, lstm, tied, frozen, noncontiguous, selected,
        weight_norm, weight_norm_hook,
    )
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
