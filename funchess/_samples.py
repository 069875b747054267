"""Per-sample data: the convention every per-sample function shares, and the per-sample gradient.

`f(params, *data)` is a loss over a *batch*; every Tensor in `data` holds the samples along dim 0,
and the loss of sample `i` is `f` on a batch of one, `f(params, *[d[i:i+1] for d in data])`. With
a mean-reduced loss the batch loss is the mean of the per-sample losses. The samples are a `vmap`
dimension, never a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import vmap

from ._checks import check_primals
from ._compose import check_function, gradient
from ._errors import StructureError, UnsupportedError
from ._functional import ModuleFunction
from ._tree import tree_flatten, tree_map, tree_unflatten

PyTree = Any
#: What a per-sample function's randomness error suggests.
PER_SAMPLE_FIX = (
    "randomness='different' (each sample its own mask, as in training) or 'same' (one mask for "
    "all samples); every derivative pass then replays the forward's mask"
)


def check_per_sample(call: str, f: Any) -> None:
    """Per-sample quantities need samples that do not interact and a model `vmap` can batch."""
    model = f.model if isinstance(f, ModuleFunction) else None
    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, nn.RNNBase):
            raise UnsupportedError(
                f"{call}: the model has {type(m).__name__} {name!r}; torch.func.vmap has no "
                f"batching rule for recurrent layers, so per-sample quantities cannot be "
                f"vectorised over the samples. Loop over them instead, e.g. "
                f"[funchess.hessian(f)(params, x[i:i+1], y[i:i+1]) for i in range(len(x))]."
            )
    check_function(call, f, per_sample=True)


class Samples:
    """The data arguments of a call, split into per-sample Tensors (batched on dim 0) and the rest."""

    def __init__(self, call: str, data: tuple[Any, ...]) -> None:
        self.leaves, self.spec = tree_flatten(data)
        self.where = [f"args[{p[0] + 1}]" + "".join(f"[{q!r}]" for q in p[1:]) for p in self.spec.paths()]
        self.index = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, Tensor)]
        if not self.index:
            raise StructureError(
                f"{call}: expected per-sample data after params (Tensors with the samples along "
                f"dim 0), got {len(data)} argument(s) with no Tensor. Call it as "
                f"fn(params, inputs, targets)."
            )
        first = self.index[0]
        for i in self.index:
            t = self.leaves[i]
            if t.dim() == 0 or t.shape[0] != self.leaves[first].shape[0]:
                raise StructureError(
                    f"{call}: every Tensor of the data must hold the samples along dim 0; "
                    f"expected size {self.leaves[first].shape[0]} (from {self.where[first]}), got "
                    f"shape {tuple(t.shape)} at {self.where[i]}. Pass per-sample data only; close "
                    f"over tensors shared by all samples inside f."
                )
        self.size = int(self.leaves[first].shape[0])
        if self.size == 0:
            raise StructureError(
                f"{call}: expected at least one sample, got Tensors with 0 samples along dim 0 "
                f"({self.where[first]}). Pass a non-empty batch."
            )

    def tensors(self, start: int = 0, stop: int | None = None) -> list[Tensor]:
        return [self.leaves[i][start:stop] for i in self.index]

    def one(self, tensors: Sequence[Tensor]) -> tuple[Any, ...]:
        """The data arguments of a batch of one, from one sample's tensors (given without dim 0)."""
        full = list(self.leaves)
        for i, t in zip(self.index, tensors):
            full[i] = t.unsqueeze(0)
        return tuple(tree_unflatten(self.spec, full))

    def loss(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """`ell(params, *sample_tensors)`: f on a batch of one."""
        return lambda params, *tensors: f(params, *self.one(tensors))


def per_sample_data(call: str, f: Any, params: PyTree, data: tuple[Any, ...]) -> tuple[str, Samples]:
    """Check a per-sample call's params and model, split its data: `(call with args, samples)`."""
    here = f"{call}(params, ...)"
    check_primals(here, (params,), ["params"])
    check_per_sample(here, f)
    return here, Samples(here, data)


def per_sample_gradients(
    ell: Callable[..., Any], call: str, randomness: str, *, for_jvp: bool = False, sample_chunk_size: int | None = None
) -> Callable[..., Any]:
    """`G(params, *tensors)`: the gradient of every sample's loss, leaves `(B, *p.shape)`."""

    def one(params: Any, *tensors: Tensor) -> Any:
        return gradient(lambda p: ell(p, *tensors), call, False, True, for_jvp=for_jvp)(params)

    def G(params: Any, *tensors: Tensor, params_dim: int | None = None) -> Any:
        dims = (params_dim, *([0] * len(tensors)))
        return vmap(one, in_dims=dims, randomness=randomness, chunk_size=sample_chunk_size)(params, *tensors)

    return G


def expand(params: PyTree, b: int) -> PyTree:
    """`params` broadcast to `b` copies along a new dim 0 (views)."""
    return tree_map(lambda p: p.expand(b, *p.shape), params)
