"""Route around operators whose second derivatives torch gets wrong or cannot take.

While funchess differentiates a function, a `TorchFunctionMode` replaces a few fused operators by
compositions of elementary ones with the same forward value. Every spelling that reaches Python is
caught: `F.*`, `torch.*` and `torch.ops.aten.*` (packets and their non-`out` overloads all reach a
`TorchFunctionMode`).

- `layer_norm`, `batch_norm` (batch statistics) and `instance_norm`, with their `native_*`,
  `_native_batch_norm_legit*`, `_batch_norm_impl_index` and `_batch_norm_with_update*` forms: under
  torch.func the mixed second derivative between the normalised input and the affine weight is
  silently wrong on current torch (relative errors of 10-100 % against nested double backward; see
  pytorch#196700, #196699). Plain autograd is right, so the oracle in `funchess.testing` is
  unaffected. (`rms_norm` and `group_norm` are right in both and pass through.)
- `_weight_norm` / `_weight_norm_interface` (`nn.utils.parametrizations.weight_norm` and the old
  `nn.utils.weight_norm` hook): torch's fused kernel has a wrong double backward in the (g, v) block,
  under plain autograd too; it becomes `v * (g / norm_except_dim(v, 2, dim))`, torch's own unfused
  form, with the norm from elementary operators. The oracle uses the same composition (see
  `AUTOGRAD_FIXES`).
- `embedding` with `padding_idx`: reverse mode gives the padding row no gradient, forward mode
  would push its tangent through; the looked-up padding rows are detached so both modes agree with
  plain autograd. `max_norm` renormalises the table in place and is refused (`UnsupportedError`),
  and so is `scale_grad_by_freq`, whose backward is not the derivative of the forward.
- `scaled_dot_product_attention`: fused kernels (flash, memory-efficient) have no double backward
  (pytorch#116350); the math form below has. `multi_head_attention_forward` calls it from inside
  (where the mode cannot see), so it is sent down its explicit `need_weights=True` branch. The
  private fused kernels (`_scaled_dot_product_flash_attention*`, ...) pass through: they fail with
  torch's "derivative ... not implemented", which funchess reports as an `UnsupportedError`.
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
from ._errors import UnsupportedError

#: returned by a replacement to let the original operator run (nothing to route around); the
#: replacements that may return it are annotated `-> Any`
_PASS: Any = object()


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ----------------------------------------------------------------------------- layer norm


def _layer_norm_parts(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    rstd = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + eps)
    return _affine(centred * rstd, weight, bias), mean, rstd


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _layer_norm_parts(input, normalized_shape, weight, bias, eps)[0]


def _torch_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> Tensor:
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _native_layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # torch's mean / rstd outputs are not differentiable (autograd drops their gradients)
    out, mean, rstd = _layer_norm_parts(input, normalized_shape, weight, bias, eps)
    return out, mean.detach(), rstd.detach()


# ----------------------------------------------------------------------------- batch / instance norm


def _per_channel_parts(
    input: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised-and-affine output, and the per-(sample-)channel mean and 1/std (keepdim)."""
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    invstd = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    w = None if weight is None else weight.reshape(shape)
    b = None if bias is None else bias.reshape(shape)
    return _affine(centred * invstd, w, b), mean, invstd


def _uses_running_stats(training: bool, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    return not training and running_mean is not None and running_var is not None


def _batch_stats_norm(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm with batch statistics: output, and the (C,) mean and 1/std, detached as torch's
    saved statistics are (they are not differentiable outputs)."""
    per_channel = input.numel() // max(input.shape[1], 1) if input.dim() > 1 else input.numel()
    if per_channel <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
        )
    out, mean, invstd = _per_channel_parts(input, (0,) + tuple(range(2, input.dim())), weight, bias, eps)
    return out, mean.detach().reshape(-1), invstd.detach().reshape(-1)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Any:
    if _uses_running_stats(training, running_mean, running_var):
        # Running statistics make this an affine map of the input, which torch.func differentiates
        # correctly: the original kernel runs.
        return _PASS
    return _batch_stats_norm(input, weight, bias, eps)[0]


def _native_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Any:
    if _uses_running_stats(training, running_mean, running_var):
        return _PASS
    return _batch_stats_norm(input, weight, bias, eps)


def _native_batch_norm_legit(input: Tensor, weight: Tensor | None, bias: Tensor | None, *args: Any, **kwargs: Any) -> Any:
    # two overloads: (..., running_mean, running_var, training, momentum, eps) and .no_stats
    # (..., training, momentum, eps)
    if "running_mean" in kwargs or (args and isinstance(args[0], Tensor)):
        return _native_batch_norm(input, weight, bias, *args, **kwargs)
    return _native_batch_norm(input, weight, bias, None, None, *args, **kwargs)


def _empty_reserve(input: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=input.device)


def _batch_norm_impl_index(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Any:
    parts = _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if parts is _PASS:
        return _PASS
    return (*parts, _empty_reserve(input), 0)  # 0: torch's index of its native kernel


def _torch_batch_norm(*args: Any, **kwargs: Any) -> Any:
    """`torch.batch_norm` / `aten.batch_norm`: the arguments of `_batch_norm_impl_index`."""
    parts = _batch_norm_impl_index(*args, **kwargs)
    return parts if parts is _PASS else parts[0]


def _batch_norm_with_update(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
    momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # always batch statistics; the in-place update of the running statistics is left out
    out, mean, invstd = _batch_stats_norm(input, weight, bias, eps)
    return out, mean, invstd, _empty_reserve(input)


def _updated_stats(
    input: Tensor, mean: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """torch's running-statistics update, out of place: unbiased variance, `momentum` weight."""
    n = input.numel() // max(input.shape[1], 1)
    var = (invstd.pow(-2) - eps) * (n / max(n - 1, 1))
    return (
        running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum,
        running_var * (1 - momentum) + var.to(running_var.dtype) * momentum,
    )


def _native_batch_norm_legit_functional(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
    training: bool, momentum: float, eps: float,
) -> Any:
    if not training:
        return _PASS
    out, mean, invstd = _batch_stats_norm(input, weight, bias, eps)
    return (out, mean, invstd, *_updated_stats(input, mean, running_mean, running_var, momentum, eps, invstd))


def _batch_norm_with_update_functional(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
    momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, mean, invstd = _batch_stats_norm(input, weight, bias, eps)
    new = _updated_stats(input, mean, running_mean, running_var, momentum, eps, invstd)
    return (out, mean, invstd, _empty_reserve(input), *new)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Any:
    if not use_input_stats:  # running statistics: affine, the original kernel runs
        return _PASS
    return _per_channel_parts(input, tuple(range(2, input.dim())), weight, bias, eps)[0]


def _torch_instance_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Any:
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


# ----------------------------------------------------------------------------- weight norm


def _norm_except_dim(v: Tensor, dim: int) -> Tensor:
    """`torch.norm_except_dim(v, 2, dim)` from elementary operators (its `dim=-1`, whole-tensor
    form has a broken forward-mode rule: "a forward gradient ... of a different size")."""
    if dim == -1:  # torch's convention: the norm of the whole tensor
        return (v * v).sum().sqrt()
    keep = dim % max(v.dim(), 1)
    dims = tuple(d for d in range(v.dim()) if d != keep)
    return (v * v).sum(dim=dims, keepdim=True).sqrt()


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """`torch._weight_norm(v, g, dim)` as torch's own unfused form, `v * (g / ||v||)`: the fused
    kernel it uses for `dim` 0 or last (`_weight_norm_interface`) has a wrong double backward in
    the (g, v) block, under plain autograd too."""
    return v * (g / _norm_except_dim(v, dim))


def _weight_norm_interface(v: Tensor, g: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    norms = _norm_except_dim(v, dim)
    return v * (g / norms), norms.detach()  # torch's norms output is not differentiable


# ----------------------------------------------------------------------------- embedding


def _refused(message: str) -> UnsupportedError:
    """An operator funchess will not differentiate, found inside f: told as the entry's (see
    `funchess._checks.labelled`), which the operator does not know."""
    error = UnsupportedError(f"funchess: {message}")
    error.unlabelled = True  # type: ignore[attr-defined]
    return error


def _max_norm_refused(spelling: str) -> UnsupportedError:
    return _refused(
        f"f calls {spelling} (e.g. `nn.Embedding(max_norm=...)`), which renormalises rows "
        f"of the embedding table in place during the forward; expected a function that leaves its "
        f"parameters alone (funchess never changes the model, and torch gives the renormalisation "
        f"no derivative, so no Hessian agrees with both torch's gradient and the function's values). "
        f"Renormalise the table yourself first (`with torch.no_grad(): "
        f"emb(torch.arange(emb.num_embeddings))`) and set `emb.max_norm = None` while funchess runs; "
        f"or write the renormalisation as differentiable operations if you want its derivative."
    )


def _scaled_gradient_refused(spelling: str) -> UnsupportedError:
    return _refused(
        f"f calls {spelling} (e.g. `nn.Embedding(scale_grad_by_freq=True)`), whose backward "
        f"divides each table row's gradient by how often its index occurs in the batch; expected a "
        f"function whose gradient is its derivative (with the scaling, torch's gradient is not the "
        f"derivative of f, so no derivative funchess gives could agree with both torch's gradient "
        f"and f's values; differentiating the scaled gradient again is not even symmetric). Set "
        f"`emb.scale_grad_by_freq = False` while funchess runs: f's values, and so its derivatives, "
        f"do not depend on it."
    )


def _constant_padding(out: Tensor, indices: Tensor, padding_idx: int) -> Tensor:
    # reverse mode gives the padding row no gradient; forward mode would push its tangent through.
    # Detached padding rows are a constant for both, as plain autograd treats them.
    return torch.where((indices == padding_idx).unsqueeze(-1), out.detach(), out)


_F_EMBEDDING = F.embedding


def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    if max_norm is not None:
        raise _max_norm_refused(f"`F.embedding(..., max_norm={max_norm!r})`")
    if scale_grad_by_freq:
        raise _scaled_gradient_refused("`F.embedding(..., scale_grad_by_freq=True)`")
    if padding_idx is None:
        return _PASS
    out = _F_EMBEDDING(input, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    return _constant_padding(out, input, padding_idx + weight.size(0) if padding_idx < 0 else padding_idx)


def _torch_embedding(
    weight: Tensor, indices: Tensor, padding_idx: int = -1, scale_grad_by_freq: bool = False, sparse: bool = False
) -> Any:
    if scale_grad_by_freq:
        raise _scaled_gradient_refused("`torch.embedding(..., scale_grad_by_freq=True)`")
    if padding_idx < 0:  # torch.embedding's "no padding row"
        return _PASS
    out = torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)
    return _constant_padding(out, indices, padding_idx)


def _embedding_renorm_(*args: Any, **kwargs: Any) -> Tensor:
    raise _max_norm_refused("`torch.embedding_renorm_`")


# ----------------------------------------------------------------------------- attention


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


# ----------------------------------------------------------------------------- recurrent layers


def _native_rnn(func: Callable[..., Any]) -> Callable[..., Any]:
    # cuDNN's and oneDNN's fused RNN kernels have no double backward / forward-mode rule; with them
    # off, torch runs the recurrence as ordinary differentiable operators.
    def rnn(*args: Any, **kwargs: Any) -> Any:
        with fused_rnn_kernels_off():
            return func(*args, **kwargs)

    return rnn


# ----------------------------------------------------------------------------- the tables


def _spellings(*names: str, torch_too: bool = True) -> list[Any]:
    """`torch.<name>` (when it exists) and `torch.ops.aten.<name>` with every overload except
    the `out=` ones, which write into given tensors and cannot be differentiated anyway."""
    found: list[Any] = []
    for name in names:
        if torch_too and hasattr(torch, name):
            found.append(getattr(torch, name))
        packet = getattr(torch.ops.aten, name)
        found.append(packet)
        found += [getattr(packet, o) for o in packet.overloads() if not o.endswith("out")]
    return found


def _table(entries: Sequence[tuple[Sequence[Any], Callable[..., Any]]]) -> dict[Any, Callable[..., Any]]:
    return {func: impl for funcs, impl in entries for func in funcs}


#: operators whose double backward is wrong under plain autograd too: the oracle routes these
AUTOGRAD_FIXES: dict[Any, Callable[..., Any]] = _table([
    (_spellings("_weight_norm"), weight_norm),
    (_spellings("_weight_norm_interface"), _weight_norm_interface),
])

_REROUTES: dict[Any, Callable[..., Any]] = {
    **AUTOGRAD_FIXES,
    **_table([
        ([F.layer_norm], layer_norm),
        (_spellings("layer_norm"), _torch_layer_norm),
        (_spellings("native_layer_norm"), _native_layer_norm),
        ([F.batch_norm], batch_norm),
        (_spellings("batch_norm"), _torch_batch_norm),
        (_spellings("native_batch_norm"), _native_batch_norm),
        (_spellings("_native_batch_norm_legit"), _native_batch_norm_legit),
        (_spellings("_native_batch_norm_legit_functional"), _native_batch_norm_legit_functional),
        (_spellings("_batch_norm_impl_index"), _batch_norm_impl_index),
        (_spellings("_batch_norm_with_update"), _batch_norm_with_update),
        (_spellings("_batch_norm_with_update_functional"), _batch_norm_with_update_functional),
        ([F.instance_norm], instance_norm),
        (_spellings("instance_norm"), _torch_instance_norm),
        ([F.embedding], embedding),
        (_spellings("embedding"), _torch_embedding),
        (_spellings("embedding_renorm_"), _embedding_renorm_),
        ([F.scaled_dot_product_attention], scaled_dot_product_attention),
        (_spellings("scaled_dot_product_attention", torch_too=False), scaled_dot_product_attention),
        ([F.multi_head_attention_forward], multi_head_attention_forward),
    ]),
    **{fn: _native_rnn(fn) for fn in _spellings("lstm", "gru", "rnn_tanh", "rnn_relu")},
}


class SecondOrderSafe(TorchFunctionMode):
    """Active while funchess differentiates: swaps the operators above for safe compositions.
    `rerouted` counts the swaps (a probe forward with none lets the derivative passes run without
    the mode, whose Python call per operator costs ~5 us). `table` defaults to every rerouting;
    the oracle passes `AUTOGRAD_FIXES`."""

    def __init__(self, table: dict[Any, Callable[..., Any]] | None = None) -> None:
        super().__init__()
        self.rerouted = 0
        self.table = _REROUTES if table is None else table

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        impl = self.table.get(func)
        if impl is not None:
            result = impl(*args, **(kwargs or {}))
            if result is not _PASS:
                self.rerouted += 1
                return result
        return func(*args, **(kwargs or {}))


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
