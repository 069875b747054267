"""Which parameter belongs to which Linear / Conv2d layer, the recorded forward, and the two
factors' pieces: the unfolded inputs (`A`) and the output gradients (`B`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import UnsupportedError


@dataclass
class Layer:
    name: str
    module: nn.Linear | nn.Conv2d
    weight: str | None = None
    bias: str | None = None
    inputs: list[Tensor] = field(default_factory=list)
    zeros: list[Tensor] = field(default_factory=list)


def assign(call: str, model: nn.Module, params: dict[str, Tensor], others: str) -> tuple[dict[str, Layer], list[str]]:
    """Group the params (names of the model's parameters) by the module that owns them:
    Linear/Conv2d layers, and the rest."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules():
        for lname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, mod, lname))
    by_name = dict(model.named_parameters())
    layers: dict[str, Layer] = {}
    rest: list[str] = []
    for pname in params:
        found = owners[id(by_name[pname])]
        mname, mod, lname = found[0]
        if len(found) > 1:
            names = ", ".join(f"{type(m).__name__} {n!r}" for n, m, _ in found)
            raise UnsupportedError(
                f"{call}: parameter {pname!r} is shared by {names}; expected each parameter to "
                f"belong to one module (K-FAC factors one layer's inputs and outputs). Leave it "
                f"out of params, or use funchess.ggn."
            )
        if type(mod) in (nn.Linear, nn.Conv2d) and lname in ("weight", "bias"):
            layer = layers.setdefault(mname, Layer(mname, mod))  # type: ignore[arg-type]
            setattr(layer, lname, pname)
        elif others == "error":
            raise UnsupportedError(
                f"{call}: parameter {pname!r} belongs to {type(mod).__name__} {mname!r}, which has "
                f"no Kronecker factorisation (K-FAC covers nn.Linear and nn.Conv2d); expected only "
                f"their parameters with others='error'. Pass others='exact' for its exact block, or "
                f"leave it out of params."
            )
        else:
            rest.append(pname)
    return layers, rest


@contextlib.contextmanager
def recording(call: str, layers: dict[str, Layer]) -> Iterator[None]:
    """Process-wide forward hooks, active for this block only and filtered to `layers`' modules:
    each call records the layer's input and returns its output plus a zero Tensor that requires
    grad (so the output's gradient can be asked for even where nothing before it requires grad)."""
    wanted = {id(layer.module): layer for layer in layers.values()}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        layer = wanted.get(id(module))
        if layer is None:
            return None
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise UnsupportedError(
                f"{call}: layer {layer.name!r} was called without a positional input Tensor; "
                f"expected module(x). Call the layer with its input as the first positional argument."
            )
        layer.inputs.append(args[0].detach())
        zero = torch.zeros_like(output, requires_grad=True)
        layer.zeros.append(zero)
        return output + zero

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the factors


def patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`(B, T, C_in/groups * kh * kw)` unfolded input patches (channel groups averaged, as
    curvlinops does), with the layer's own padding mode and asymmetric 'same' padding."""
    B, C = x.shape[0], x.shape[1]
    x = x.reshape(B, conv.groups, C // conv.groups, *x.shape[2:]).mean(1)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2)


def input_covariance(layer: Layer, approx: str, num_data: int) -> Tensor:
    if not layer.inputs:  # a layer the forward never called: it has no curvature
        w = layer.module.weight
        d = w[0].numel()
        return torch.zeros(d, d, dtype=w.dtype, device=w.device)
    A: Tensor | None = None
    for x in layer.inputs:
        if isinstance(layer.module, nn.Conv2d):
            a = patches(x, layer.module)  # (B, T, d_in)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if approx == "reduce":
            rows, scale = a.mean(1), 1
        else:
            rows, scale = a.reshape(-1, a.shape[-1]), a.shape[1]
        piece = rows.T @ rows / (num_data * scale)
        A = piece if A is None else A + piece
    assert A is not None
    return A


def output_rows(g: Tensor, conv: bool, approx: str) -> Tensor:
    """Output gradients `(r, B, ...)` as `(r, B, positions, d_out)` (summed over positions for "reduce")."""
    if conv:
        g = g.movedim(2, -1)
    g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
    return g.sum(2, keepdim=True) if approx == "reduce" else g


def backward_columns(z: Tensor, zeros: list[Tensor], cot: Tensor) -> list[Tensor | None]:
    """Gradients w.r.t. `zeros` for each cotangent `cot[i]` (shaped like z), batched when torch can."""
    try:
        return list(torch.autograd.grad(z, zeros, cot, retain_graph=True, is_grads_batched=True, allow_unused=True))
    except RuntimeError:  # an operator without a batching rule for its backward: one column at a time
        cols = [torch.autograd.grad(z, zeros, c, retain_graph=True, allow_unused=True) for c in cot]
        return [None if cols[0][j] is None else torch.stack([c[j] for c in cols]) for j in range(len(zeros))]  # type: ignore[misc]
