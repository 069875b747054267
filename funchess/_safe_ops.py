"""Route around operators whose second derivatives torch.func gets wrong or cannot take.

While funchess differentiates a function, a `TorchFunctionMode` replaces a few fused operators by
compositions of elementary ones with the same forward value:

- `layer_norm`, `batch_norm` (batch statistics) and `instance_norm`: under torch.func the mixed
  second derivative between the normalised input and the affine weight is silently wrong on current
  torch (relative errors of 10-100 % against nested double backward; see pytorch#196700, #196699).
  Plain autograd is right, so the oracle in `funchess.testing` is unaffected.
- `scaled_dot_product_attention`: fused kernels (flash, memory-efficient) have no double backward
  (pytorch#116350); the math form below has. `multi_head_attention_forward` calls it from inside
  (where the mode cannot see), so it is sent down its explicit `need_weights=True` branch.
- recurrent layers (`lstm`, `gru`, `rnn_*`): the fused cuDNN / oneDNN kernels have neither double
  backward nor forward-mode rules; they run with those backends off.

Batch normalisation with batch statistics never updates running statistics here: funchess promises
not to change the model, and an in-place update inside a vectorised pass would fail anyway. Fast
paths in `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` are skipped while the mode is active
(they check `has_torch_function`), so those modules also take differentiable paths.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._compat import fused_rnn_kernels_off


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return _affine(centred * torch.rsqrt(var + eps), weight, bias)


def _torch_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> Tensor:
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _normalise_per_channel(
    input: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    w = None if weight is None else weight.reshape(shape)
    b = None if bias is None else bias.reshape(shape)
    return _affine(centred * torch.rsqrt(var + eps), w, b)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not training and running_mean is not None and running_var is not None:
        # Running statistics make this an affine map of the input, which torch.func differentiates
        # correctly; the handler runs with the mode disabled, so this calls the real kernel.
        return _F_BATCH_NORM(
            input, running_mean, running_var, weight, bias, False, momentum or 0.0, eps
        )
    per_channel = input.numel() // max(input.shape[1], 1) if input.dim() > 1 else input.numel()
    if per_channel <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
        )
    dims = (0,) + tuple(range(2, input.dim()))
    return _normalise_per_channel(input, dims, weight, bias, eps)


def _torch_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    return _normalise_per_channel(input, tuple(range(2, input.dim())), weight, bias, eps)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ value


_F_BATCH_NORM = F.batch_norm
_F_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_F_MHA)


def multi_head_attention_forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    # The handler of a TorchFunctionMode runs with the mode off, so the attention kernel that
    # `multi_head_attention_forward` calls inside would escape the rerouting. Its
    # `need_weights=True` branch computes the same attention with bmm + softmax instead.
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    wanted = bound.arguments["need_weights"]
    bound.arguments["need_weights"] = True
    out, weights = _F_MHA(*bound.args, **bound.kwargs)
    return out, (weights if wanted else None)

def _native_rnn(func: Callable[..., Any]) -> Callable[..., Any]:
    # cuDNN's and oneDNN's fused RNN kernels have no double backward / forward-mode rule; with them
    # off, torch runs the recurrence as ordinary differentiable operators.
    def rnn(*args: Any, **kwargs: Any) -> Any:
        with fused_rnn_kernels_off():
            return func(*args, **kwargs)

    return rnn


_REROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: layer_norm,
    torch.layer_norm: _torch_layer_norm,
    F.batch_norm: batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: instance_norm,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
    **{fn: _native_rnn(fn) for fn in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)},
}


class SecondOrderSafe(TorchFunctionMode):
    """Active while funchess differentiates: swaps the operators above for safe compositions.
    `rerouted` counts the swaps (a probe forward with none lets the derivative passes run without
    the mode, whose Python call per operator costs ~5 us)."""

    def __init__(self) -> None:
        super().__init__()
        self.rerouted = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        impl = _REROUTES.get(func)
        if impl is None:
            return func(*args, **(kwargs or {}))
        self.rerouted += 1
        return impl(*args, **(kwargs or {}))


_state = threading.local()


@contextlib.contextmanager
def safe_ops(enabled: bool = True) -> Iterator[SecondOrderSafe | None]:
    """Enter funchess's operator rerouting once (nested transforms reuse the outer one); yields
    the mode, or None when an outer call entered it or `enabled` is False."""
    if not enabled or getattr(_state, "active", False):
        yield None
        return
    _state.active = True
    try:
        with SecondOrderSafe() as mode:
            yield mode
    finally:
        _state.active = False
