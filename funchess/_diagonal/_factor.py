"""`per_sample_ggn_factor`: every sample's GGN in factored form, `G_n = V_nᵀ diag(s_n) V_n`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_primals
from .._compose import check_function
from .._errors import StructureError
from .._samples import Samples
from .._tree import tree_flatten, tree_unflatten
from ._api import ChunkSize, Randomness, at_call, ggn_job
from ._curvature import weighted_sum
from ._route import ggn_parts

PyTree = Any


class GGNFactor:
    """Every sample's GGN as a `K x N` factor: `G_n = V_nᵀ diag(signs_n) V_n`, `V_n = S_nᵀ J_n`.

    `S_n` factors sample `n`'s loss Hessian w.r.t. the model output (`K` columns: the classes for
    cross-entropy, the outputs for MSE; `samples=k` Monte-Carlo columns), `J_n` is the Jacobian of
    its output. Memory `B K N` instead of the `B N²` of `funchess.per_sample_ggn`.

    Attributes:
        columns: shaped like the params, each leaf `(B, K, *param.shape)`: `columns[a][n, k]` is
            the part of `V_n`'s row `k` for parameter `a`.
        signs: `(B, K)` signs of the columns, or None when all are `+1` (cross-entropy, MSE, BCE:
            the GGN is positive semi-definite); an indefinite loss Hessian has some `-1`.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> V = funchess.per_sample_ggn_factor(f)(params, x, y)
        >>> V.columns["0.weight"].shape  # (samples, columns, *parameter)
        torch.Size([6, 2, 4, 3])
        >>> G = funchess.to_matrix(funchess.per_sample_ggn(f)(params, x, y), batch_dims=1)
        >>> torch.allclose(V.dense(), G, atol=1e-6)
        True
    """

    def __init__(self, columns: PyTree, signs: Tensor | None) -> None:
        self.columns = columns
        self.signs = signs
        leaves, self._spec = tree_flatten(columns)
        self._shapes = [leaf.shape[2:] for leaf in leaves]

    def __repr__(self) -> str:
        B, K, N = self.matrix().shape
        return f"GGNFactor(samples={B}, columns={K}, parameters={N}, signed={self.signs is not None})"

    def matrix(self) -> Tensor:
        """The factors as one `(B, K, N)` Tensor (parameters in `funchess.ravel` order)."""
        leaves, _ = tree_flatten(self.columns)
        return torch.cat([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], 2)

    def _signed(self, V: Tensor) -> Tensor:
        return V if self.signs is None else V * self.signs.unsqueeze(-1)

    def dense(self) -> Tensor:
        """The `(B, N, N)` per-sample GGNs (as `funchess.to_matrix(per_sample_ggn(...), batch_dims=1)`)."""
        V = self.matrix()
        return V.transpose(1, 2) @ self._signed(V)

    def diagonal(self) -> PyTree:
        """Every sample's GGN diagonal, shaped like the params with a leading sample dimension."""
        leaves, _ = tree_flatten(self.columns)
        out = []
        for leaf in leaves:
            sq = leaf.square()
            out.append(sq.sum(1) if self.signs is None else weighted_sum(sq, self.signs))
        return tree_unflatten(self._spec, out)

    def __matmul__(self, v: Any) -> Any:
        """`G_n v` for every sample: `v` shaped like the params (result: leaves with a leading
        sample dimension) or a flat `(N,)` Tensor (result: `(B, N)`)."""
        V = self.matrix()
        flat = isinstance(v, Tensor)
        if flat:
            vec = v
        else:
            leaves, spec = tree_flatten(v)
            if spec != self._spec:
                raise StructureError(
                    f"GGNFactor @ v: expected v shaped like the params ({self._spec}), got {spec}. "
                    f"Pass a dict like params, or a flat vector from funchess.ravel."
                )
            vec = torch.cat([t.reshape(-1) for t in leaves])
        if vec.shape != (V.shape[2],):
            raise StructureError(
                f"GGNFactor @ v: expected {V.shape[2]} entries (the parameters), got shape "
                f"{tuple(vec.shape)}. Pass a vector of the parameters' size."
            )
        out = torch.einsum("nkp,nk->np", V, self._signed(V) @ vec)
        if flat:
            return out
        pieces, start = [], 0
        for shape in self._shapes:
            n = shape.numel()
            pieces.append(out[:, start : start + n].reshape(out.shape[0], *shape))
            start += n
        return tree_unflatten(self._spec, pieces)


def per_sample_ggn_factor(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: ChunkSize = "auto",
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
) -> Callable[..., GGNFactor]:
    """Every sample's GGN in factored form (a `funchess.GGNFactor`): `G_n = V_nᵀ diag(s_n) V_n`
    with `V_n = S_nᵀ J_n` of shape `K x N` (BackPACK's `SqrtGGNExact`, per sample).

    The dense `funchess.per_sample_ggn` takes `B N²` memory; this takes `B K N` (`K` the
    output's columns: the classes for cross-entropy), and gives the same matrices through
    `.dense()`, the diagonals through `.diagonal()` and products `G_n v` through `@`. With
    `samples=k`, `K = k` Monte-Carlo columns drawn from the model's predictive distribution.
    Routes, options and the model requirements are those of `funchess.per_sample_ggn_diagonal`.

    Why this name: a per-sample function (`per_sample_*`) of the GGN, returning its factor, as
    `per_sample_ggn_diagonal` returns its diagonal.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
        >>> V = funchess.per_sample_ggn_factor(f)(params, x, y)
        >>> V
        GGNFactor(samples=4, columns=2, parameters=8, signed=False)
        >>> v = {k: torch.randn_like(p) for k, p in params.items()}
        >>> Gv = V @ v
        >>> torch.allclose(funchess.ravel({k: t[0] for k, t in Gv.items()}), V.dense()[0] @ funchess.ravel(v), atol=1e-6)
        True
    """
    job = ggn_job("per_sample_ggn_factor", f, loss_fn, samples, generator, chunk_size, sample_chunk_size, max_memory, randomness)

    @functools.wraps(f)
    def per_sample_ggn_factor_fn(params: PyTree, inputs: Any, targets: Any = None) -> GGNFactor:
        here = f"{job.call}(params, inputs, targets)"
        check_primals(here, (params,), ["params"])
        check_function(here, f, per_sample=True)
        Samples(here, (inputs, targets))  # the samples along dim 0, at least one
        columns, signs = ggn_parts(at_call(job, here), params, inputs, targets, "columns")
        return GGNFactor(columns, signs)

    return per_sample_ggn_factor_fn
