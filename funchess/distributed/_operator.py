"""The data-set curvature of every rank's shard as one `funchess.LinearOperator`, whose products
all-reduce: `funchess.eigsh`, `trace_estimate`, `spectral_density`, `cg`, ... run on it
unchanged, with the same answer on every rank.

Every tool hands the operator a batch of vectors (`op._mm(rows)`, `k` rows); the product is this
rank's weighted sum over its shard (`funchess.DatasetOperator` on the shard: one pass over the
data for all `k` vectors), then ONE all-reduce of the `k x N` results with the normaliser,
outside any `vmap`. The tools draw their random vectors on each rank, so before that all-reduce
the ranks check that they hold the same vectors: a small MAX all-reduce of sampled entries,
started before the local work and waited for after it (its latency hides behind the products).
Vectors drawn from rank-dependent random states raise a StructureError on every rank instead of
silently mixing products of different vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor

import funchess

from .._errors import InvalidArgumentError, StructureError
from .._tree import ravel, unravel
from ._core import normaliser_of
from ._data import Part, Reduction, core, enter, label, reduce_sum, shard_sum
from ._group import Pending, Ranks
from ._inputs import counted, unwrap

__all__ = ["dataset_operator", "AllReduced"]

PyTree = Any
Curvature = Literal["hessian", "ggn"]
#: positions sampled per vector for the check that every rank multiplies the same vectors
_CHECKED = 32


class _SameVectors:
    """The check that every rank multiplies the same `k` vectors: started (async) before the
    local products, waited for before their all-reduce. Fixed size, so ranks that disagree on
    `k` are caught before an all-reduce of unequal sizes."""

    def __init__(self, call: str, ranks: Ranks, rows: Tensor) -> None:
        self.call = call
        n = rows.shape[1]
        idx = torch.linspace(0, n - 1, min(n, _CHECKED), device=rows.device).round().long()
        if idx.numel() < _CHECKED:  # pad (fixed size on every rank)
            idx = torch.cat([idx, idx[-1:].expand(_CHECKED - idx.numel())])
        sampled = rows[:, idx].double()  # (k, _CHECKED)
        weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.float64, device=rows.device)[:, None]
        values = torch.cat([torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=rows.device),
                            (weights * sampled).sum(0)])
        scale = (weights * sampled.abs()).sum(0)
        self.rtol = torch.finfo(rows.dtype).eps ** 0.5
        self.size = values.numel()
        self.pending = Pending(call, ranks, torch.cat([values, -values, scale]), "max", "check of the vectors")

    def wait(self) -> None:
        got = self.pending.wait()
        m = self.size
        high, low, scale = got[:m], -got[m : 2 * m], got[2 * m :]
        if bool(high[0] != low[0]) or bool(((high[1:] - low[1:]) > self.rtol * scale + 1e-300).any()):
            raise StructureError(
                f"{self.call}: expected every rank to multiply the same vectors, got "
                f"{'different numbers of vectors' if bool(high[0] != low[0]) else 'different vectors'} "
                f"on different ranks (random vectors drawn from rank-dependent random states?). "
                f"Pass generator=torch.Generator().manual_seed(seed), with the same seed on every "
                f"rank, to funchess.eigsh / trace_estimate / spectral_density, and give every rank "
                f"the same right-hand sides."
            )


class AllReduced(funchess.LinearOperator):
    """A symmetric operator whose product is every rank's part, added by one all-reduce per batch
    of vectors (after checking that every rank multiplies the same vectors). Subclasses give this
    rank's part, `_local(call, rows) -> (sum or None, count)`; `reduction="mean"` divides by the
    total count, "sum" does not."""

    def __init__(self, call: str, structure: PyTree, ranks: Ranks | None, reduction: str, **kwargs: Any) -> None:
        super().__init__(structure, symmetric=True, **kwargs)
        self.call, self.ranks, self.reduction = call, ranks, reduction

    def _local(self, call: str, rows: Tensor) -> Part:
        raise NotImplementedError  # pragma: no cover

    def mv(self, v: PyTree) -> PyTree:
        """The product with one vector shaped like `structure` (all-reduced)."""
        return unravel(self._mm(ravel(v).to(self.dtype).unsqueeze(0))[0], self.structure)

    def _mm(self, rows: Tensor) -> Tensor:
        k, n = rows.shape
        if k == 0:
            return rows.clone()
        call = f"{self.call} @ x"
        check = _SameVectors(call, self.ranks, rows) if self.ranks is not None else None
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        flat = reduce_sum(call, self.ranks, like, k * n, lambda: self._local(call, rows), self.reduction,
                          before=check.wait if check is not None else None)
        return flat.view(k, n)


class _DatasetOperator(AllReduced):
    """The data-set Hessian or GGN of every rank's shard; see `funchess.distributed.dataset_operator`."""

    def __init__(
        self, call: str, f: Any, params: PyTree, data: Iterable[Any], ranks: Ranks | None, reduction: str,
        options: dict[str, Any],
    ) -> None:
        chunk = options.get("chunk_size")
        super().__init__(call, params, ranks, reduction, chunk_size=chunk if isinstance(chunk, int) else None)
        inner, rename = unwrap(f)
        self.curvature = options.get("curvature", "hessian")
        self.batches = counted(data, normaliser_of(inner))
        self.shard = core(call, funchess.DatasetOperator, inner, rename(params), self.batches, reduction=reduction, **options)

    def __repr__(self) -> str:
        where = "one process" if self.ranks is None else f"{self.ranks.size} ranks"
        return (f"funchess.distributed.dataset_operator(curvature={self.curvature!r}, shape={self.shape}, "
                f"dtype={self.dtype}, {where})")

    def _local(self, call: str, rows: Tensor) -> Part:
        """This rank's weighted sum of the products with the `k` rows (one pass over its shard)."""
        return shard_sum(self.batches, self.reduction, lambda: (self.shard @ rows.T).T)


def _reiterable(call: str, data: Any) -> None:
    if isinstance(data, (Tensor, dict)) or not isinstance(data, Iterable):
        raise InvalidArgumentError(
            f"{call}: expected data to be an iterable of (inputs, targets) batches (this rank's "
            f"shard: a DataLoader or a list of pairs), got {type(data).__name__}."
        )
    if isinstance(data, Iterator):
        raise InvalidArgumentError(
            f"{call}: expected data that can be read many times (every product reads this rank's "
            f"whole shard), got a one-shot {type(data).__name__}. Pass a DataLoader or a list of "
            f"batches."
        )


def dataset_operator(
    f: Callable[..., Any],
    params: PyTree,
    data: Iterable[Any],
    *,
    curvature: Curvature = "hessian",
    reduction: Reduction = "mean",
    group: Any = None,
    **options: Any,
) -> funchess.LinearOperator:
    """The data-set Hessian (or GGN) of every rank's shard, as one matrix-free operator.

    Each rank passes its own shard as `data` (a DataLoader or a list of `(inputs, targets)`
    batches, read once per product); every product is the data-set curvature of the concatenated
    shards times the vectors, the same on every rank. So `funchess.eigsh`, `trace_estimate`,
    `spectral_density`, `diagonal_estimate` and `cg` run on it unchanged, each rank running the
    same algorithm on the same numbers. Random vectors must be drawn the same on every rank: pass
    `generator=torch.Generator().manual_seed(seed)` with one seed; a product whose vectors differ
    between ranks raises a StructureError on every rank (checked on each product).

    Composition: `funchess.DatasetOperator` on this rank's shard (one pass over the shard for a
    batch of vectors, every group of batches taking them in one `vmap`), its mean turned into the
    shard's weighted sum, then one all-reduce of the `k x N` sums with the loss's normaliser,
    divided by the total normaliser for `reduction="mean"`. Nothing of size `N x N` is formed.
    Without an initialised process group it equals `funchess.DatasetOperator`.

    Args:
        f: the batch loss `f(params, inputs, targets)`, e.g. from `funchess.functional` (a
            `DistributedDataParallel` model is unwrapped).
        params: the point; the same on every rank (checked on entry).
        data: this rank's shard, readable many times.
        curvature: "hessian" (default) or "ggn" (the generalised Gauss-Newton matrix).
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        group: the `torch.distributed` process group; None is the default group.
        **options: `funchess.DatasetOperator`'s (`loss_fn`, `mode`, `chunk_size`, `progress`,
            `randomness`), passed on unchanged.

    Returns:
        A symmetric `funchess.LinearOperator` on vectors shaped like `params`.

    Raises:
        InvalidArgumentError: a bad option, a one-shot iterator as data, or a padding
            `DistributedSampler`.
        StructureError: the ranks' calls or vectors differ (every rank raises).

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> op = funchess.distributed.dataset_operator(f, params, [(x[:8], y[:8]), (x[8:], y[8:])])
        >>> top = funchess.eigsh(op, k=1, generator=torch.Generator().manual_seed(0)).eigenvalues
        >>> H = funchess.to_matrix(funchess.hessian(f)(params, x, y))
        >>> torch.allclose(top, torch.linalg.eigvalsh(H)[-1:])
        True
    """
    call = label("dataset_operator", reduction, first="f, params, data", curvature=curvature, **options)
    _reiterable(call, data)
    op = _DatasetOperator(call, f, params, data, None, reduction, {"curvature": curvature, **options})
    op.ranks = enter(f"{call}", group, data, f, params)
    return op
