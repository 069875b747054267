"""The result of `funchess.kfac`: Kronecker factors per layer, exact blocks elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._errors import InvalidArgumentError, StructureError


@dataclass(frozen=True)
class KFACLayer:
    """The Kronecker factors of one `nn.Linear` or `nn.Conv2d` layer.

    The weight's curvature block is `torch.kron(B, A)` (rows and columns in `weight.flatten()`
    order); the bias's block is `B`.

    Attributes:
        module: the layer's name in `model.named_modules()`.
        weight: the weight's parameter name, or None when the weight is not differentiated.
        bias: the bias's parameter name, or None (no bias, or not differentiated).
        A: the input covariance, `(d_in, d_in)` with `d_in = in_features` (Linear) or
            `in_channels / groups * kernel_height * kernel_width` (Conv2d); None without a weight.
        B: the output-gradient covariance, `(d_out, d_out)`, `d_out = out_features / out_channels`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss)
        >>> K = funchess.kfac(f)(params, torch.randn(5, 3), torch.randn(5, 2))
        >>> layer = K.layers[""]
        >>> layer.weight, layer.bias, tuple(layer.A.shape), tuple(layer.B.shape)
        ('weight', 'bias', (3, 3), (2, 2))
        >>> layer.weight_block().shape
        torch.Size([6, 6])
    """

    module: str
    weight: str | None
    bias: str | None
    A: Tensor | None
    B: Tensor

    def weight_block(self) -> Tensor:
        """The weight's dense block, `torch.kron(B, A)`."""
        if self.A is None:
            raise InvalidArgumentError(
                f"KFACLayer({self.module!r}).weight_block(): expected a differentiated weight, got "
                f"a layer whose weight was left out of params. Include it in params."
            )
        block: Tensor = torch.kron(self.B, self.A)
        return block

    def bias_block(self) -> Tensor:
        """The bias's dense block, `B`."""
        return self.B


@dataclass(frozen=True)
class KFAC:
    """A block-diagonal K-FAC approximation: Kronecker factors per layer, exact blocks elsewhere.

    Blocks follow the order of `params` (`named_parameters()` order, as `funchess.ravel`), one per
    parameter, so `as_matrix()` has the rows and columns of `funchess.to_matrix(funchess.ggn(...))`.
    Off-diagonal blocks (between parameters, including a layer's weight and bias) are zero.

    Use it as an operator: `K.mv(v)` (a params-shaped dict), `K @ v` (a dict or a flat vector),
    `funchess.FunctionOperator(K.mv, params)` for `funchess.eigsh` / `funchess.cg`. Batches add up
    factor-wise (`K1 + K2`, as K-FAC accumulates over a data set; pass `num_data` so that the input
    covariances are normalised by the data-set size).

    Attributes:
        layers: `KFACLayer` per Linear / Conv2d module name.
        exact: the exact dense block (`(n, n)`, `n = p.numel()`) per parameter of other modules.
        structure: the params the approximation is over (shapes and order).

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> K = funchess.kfac(f)(params, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> list(K.layers), K.as_matrix().shape
        (['0', '2'], torch.Size([43, 43]))
        >>> v = {k: torch.randn_like(p) for k, p in params.items()}
        >>> torch.allclose(funchess.ravel(K.mv(v)), K.as_matrix() @ funchess.ravel(v), atol=1e-6)
        True
    """

    layers: dict[str, KFACLayer]
    exact: dict[str, Tensor]
    structure: dict[str, Tensor] = field(repr=False)

    def _owner(self, name: str) -> tuple[str, KFACLayer | None]:
        if name in self.exact:
            return "exact", None
        for layer in self.layers.values():
            if name == layer.weight:
                return "weight", layer
            if name == layer.bias:
                return "bias", layer
        raise InvalidArgumentError(
            f"KFAC.block({name!r}): expected one of the parameters {list(self.structure)}, got "
            f"{name!r}."
        )

    def block(self, name: str) -> Tensor:
        """The dense `(n, n)` block of parameter `name`.

        Example:
            >>> import torch, funchess
            >>> f, params = funchess.functional(torch.nn.Linear(2, 2), torch.nn.functional.mse_loss)
            >>> funchess.kfac(f)(params, torch.randn(3, 2), torch.randn(3, 2)).block("bias").shape
            torch.Size([2, 2])
        """
        kind, layer = self._owner(name)
        if layer is None:
            exact: Tensor = self.exact[name]
            return exact
        return layer.weight_block() if kind == "weight" else layer.bias_block()

    def as_matrix(self) -> Tensor:
        """The dense `(N, N)` block-diagonal matrix (`funchess.ravel` order)."""
        dense: Tensor = torch.block_diag(*[self.block(name) for name in self.structure])
        return dense

    def diagonal(self) -> dict[str, Tensor]:
        """The diagonal, shaped like the params (`kron(diag B, diag A)` for a weight)."""
        out: dict[str, Tensor] = {}
        for name, p in self.structure.items():
            kind, layer = self._owner(name)
            if layer is None:
                d = self.exact[name].diagonal()
            elif kind == "weight":
                assert layer.A is not None
                d = torch.outer(layer.B.diagonal(), layer.A.diagonal())
            else:
                d = layer.B.diagonal()
            out[name] = d.reshape(p.shape)
        return out

    def mv(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """The product with a params-shaped dict (`B V A` per weight; works under `torch.func.vmap`)."""
        if not isinstance(v, dict) or list(v) != list(self.structure):
            got = list(v) if isinstance(v, dict) else type(v).__name__
            raise StructureError(
                f"KFAC.mv(v): expected a dict with the keys {list(self.structure)}, got {got}. "
                f"Build v like the params, e.g. {{k: torch.randn_like(p) for k, p in params.items()}}."
            )
        out: dict[str, Tensor] = {}
        for name, p in self.structure.items():
            kind, layer = self._owner(name)
            x = v[name]
            if layer is None:
                out[name] = (self.exact[name] @ x.reshape(-1)).reshape(p.shape)
            elif kind == "weight":
                assert layer.A is not None
                out[name] = (layer.B @ x.reshape(p.shape[0], -1) @ layer.A).reshape(p.shape)
            else:
                out[name] = layer.B @ x
        return out

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() == 1:  # a funchess.ravel-ed vector
            parts = v.split([p.numel() for p in self.structure.values()])
            out = self.mv({k: x.reshape(p.shape) for (k, p), x in zip(self.structure.items(), parts)})
            return torch.cat([t.reshape(-1) for t in out.values()])
        return self.mv(v)

    def __add__(self, other: KFAC) -> KFAC:
        """Factor-wise sum (the K-FAC of a data set from its batches)."""
        if not isinstance(other, KFAC) or list(other.layers) != list(self.layers) or list(other.exact) != list(self.exact):
            raise StructureError(
                "KFAC + other: expected another funchess.KFAC over the same layers and parameters, "
                f"got {type(other).__name__}. Compute both with the same f and params."
            )
        layers = {
            k: KFACLayer(a.module, a.weight, a.bias, None if a.A is None or b.A is None else a.A + b.A, a.B + b.B)
            for (k, a), b in zip(self.layers.items(), other.layers.values())
        }
        exact = {k: a + other.exact[k] for k, a in self.exact.items()}
        return KFAC(layers, exact, self.structure)

    def __mul__(self, scalar: float) -> KFAC:
        """Scale the approximation (the output-gradient factors `B` and the exact blocks)."""
        layers = {k: KFACLayer(a.module, a.weight, a.bias, a.A, a.B * scalar) for k, a in self.layers.items()}
        return KFAC(layers, {k: b * scalar for k, b in self.exact.items()}, self.structure)

    __rmul__ = __mul__
