"""Data-parallel data-set curvature: each rank passes the loader of its own shard; every rank gets
the curvature of the whole data set.

Every function here is the single-process one plus `group=`, in two steps:

1. this rank's *local sum and normaliser* (one private function per kind, `_local_*`): the
   single-process public function on this rank's shard, turned into the shard's weighted sum
   `Σ_k W_k C_k` (`W_k` the loss's normaliser of batch `k`, what its mean divides by: the
   sample count for most losses, the counted class weights of a weighted cross-entropy; 1 for
   summed losses) and its normaliser `Σ_k W_k` (counted as the loader is read);
2. one all-reduce of the flattened `[sum, normaliser, samples, failed]`, then the division by the
   total normaliser (for `reduction="mean"`). The mean is over every sample of every rank, so
   shards of unequal sizes are weighted exactly, and the result is the same on every rank.

Without an initialised process group (and `group=None`) each function is the single-process one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

import funchess

from .._errors import InvalidArgumentError, OutputError, StructureError
from .._tree import from_matrix, promoted_dtype, ravel, tree_flatten, unravel
from ._core import call_label, check_reduction, no_random, normaliser_of
from ._group import Ranks, agree, all_reduce, ranks_of, share_failure, signature
from ._inputs import Counted, check_sampler, counted, samples, unwrap

__all__ = ["dataset_hessian", "dataset_hvp", "dataset_ggn", "dataset_ggn_vp", "dataset_grad"]

PyTree = Any
Reduction = Literal["mean", "sum"]
#: this rank's weighted sum (None: nothing to add), its normaliser and its sample count
Part = tuple["Tensor | None", float, int]


# ----------------------------------------------------------------------------- shared steps


#: options that may differ between ranks (a progress bar on rank 0 only, each machine's own memory
#: budget): left out of the call that the ranks compare on entry
_PER_RANK = ("progress", "max_memory")


def label(name: str, reduction: str = "mean", *, first: str = "f", **options: Any) -> str:
    """`funchess.distributed.name(f, <options past their defaults>)`: the call that messages quote
    and that the ranks compare on entry (per-rank options left out)."""
    shown = {"reduction": reduction, **{k: v for k, v in options.items() if k not in _PER_RANK}}
    return call_label(f"distributed.{name}", shown, first=first)


def core(call: str, fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """`fn(*args, **options)` (a single-process transform or operator), with unknown option names
    refused in funchess's words (before any rank waits for another)."""
    allowed = [k for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise InvalidArgumentError(
            f"{call}: got an unknown option {unknown[0]!r}; expected the options of "
            f"funchess.{fn.__name__}: {', '.join(allowed)}."
        )
    return fn(*args, **options)


def reduce_sum(
    call: str, ranks: Ranks | None, like: Tensor, entries: int, local: Callable[[], Part], reduction: str,
    before: Callable[[], None] | None = None,
) -> Tensor:
    """Run `local` (this rank's sum, normaliser and sample count), all-reduce `[sum, normaliser,
    samples, failed]` once, divide by the total normaliser for "mean". `like` gives the dtype and
    device; `entries` the size of the flattened result (for a rank with nothing to add); `before`
    runs between the local work and the all-reduce (a check that must pass on every rank first)."""
    comm_dtype = like.dtype if like.element_size() >= 4 else torch.float32  # counts exact to 2**24
    error: Exception | None = None
    try:
        part, weight, n = local()
    except Exception as exc:  # shared below, so that no rank waits for this one
        error, part, weight, n = exc, None, 0.0, 0
        if ranks is None:
            raise
    buf = torch.empty(entries + 3, dtype=comm_dtype, device=like.device)
    if part is None:
        buf[:entries].zero_()
    else:
        buf[:entries].copy_(part.reshape(-1))
        del part
    buf[entries:] = torch.tensor([weight, n, 0.0 if error is None else 1.0], dtype=comm_dtype)
    if before is not None:
        before()
    if ranks is not None:
        buf = all_reduce(call, ranks, buf, what="all-reduce of the result")
        share_failure(call, ranks, bool(buf[entries + 2] > 0), error)
    total, samples_seen = float(buf[entries]), float(buf[entries + 1])
    if samples_seen == 0:
        raise InvalidArgumentError(
            f"{call}: no rank's data yielded a sample; expected at least one (inputs, targets) "
            f"batch in the whole data set. Check that the shards are not empty (drop_last=True "
            f"with fewer samples than batch_size yields nothing)."
        )
    out = buf[:entries]
    if reduction == "mean":
        if total == 0:
            raise InvalidArgumentError(
                f"{call}: the loss's normaliser over every rank's data is 0 (every target ignored, "
                f"or all class weights 0); expected a positive total weight. Check ignore_index and "
                f"weight."
            )
        out.div_(total)
    return out.to(like.dtype)


def shard_sum(batches: Counted, reduction: str, run: Callable[[], Tensor]) -> Part:
    """`run()` (a single-process data-set result over `batches`) as this shard's weighted sum,
    with its normaliser and sample count. The single-process functions divide by the shard's
    normaliser for "mean", so the sum is the result times it; a shard with no batch, or whose
    normaliser is 0 (every target ignored), adds nothing (those functions refuse it)."""
    try:
        result = run()
    except InvalidArgumentError:
        # only the refusals of a shard read to its end with nothing in it: every other error stands
        if batches.finished and (batches.batches == 0 or (reduction == "mean" and batches.weight == 0)):
            return None, 0.0, batches.samples
        raise
    weight = batches.weight if reduction == "mean" else float(batches.samples)
    return (result.mul_(batches.weight) if reduction == "mean" else result), weight, batches.samples


def layout(call: str, params: PyTree) -> tuple[Tensor, int]:
    """An empty Tensor of the result's dtype and device, and the number of parameters."""
    leaves = tree_flatten(params)[0]
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise StructureError(
            f"{call}: expected params to be a non-empty pytree of Tensors (e.g. the dict "
            f"funchess.functional returns), got {type(params).__name__}."
        )
    like = torch.empty(0, dtype=promoted_dtype(leaves), device=leaves[0].device)
    return like, sum(t.numel() for t in leaves)


def enter(call: str, group: Any, data: Any, f: Any, params: PyTree, v: PyTree | None = None) -> Ranks | None:
    """The ranks of the call, after every rank agreed on it (the call, the parameter layout and
    values, `v`) and none refused its loader."""
    ranks = ranks_of(call, group)
    if ranks is None:
        return None
    error: Exception | None = None
    try:
        check_sampler(call, data, ranks)
        layout(call, params)
    except Exception as exc:  # found before any work: shared in the entry check
        error = exc
    extra: list[tuple[str, Any]] = [("group size", ranks.size)]
    tensors = [] if error is not None else [(f"params[{i}]", t) for i, t in enumerate(tree_flatten(params)[0])]
    if v is not None and error is None:
        vl = tree_flatten(v)[0]
        extra.append(("vector v's shapes", [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in vl]))
        tensors += [(f"v[{i}]", t) for i, t in enumerate(vl) if isinstance(t, Tensor)]
    items = signature(call, f, params, *extra) if error is None else [("call", call)]
    agree(call, ranks, items, tensors, error)
    return ranks


# ----------------------------------------------------------------------------- local sums (one per kind)
# Each returns this rank's weighted sum (None for an empty shard), its normaliser and its sample
# count. They are
# the one place that turns the single-process functions' per-shard results into sums, so a core
# API that returns (sum, normaliser) directly replaces just these.


def _local_hessian(transform: Any, f: Any, params: PyTree, data: Iterable[Any], reduction: str) -> Part:
    batches = counted(data, normaliser_of(f))
    return shard_sum(batches, reduction, lambda: funchess.to_matrix(transform(params, batches)))


_local_ggn = _local_hessian  # the same step: a data-set matrix from the single-process transform


def _local_product(transform: Any, f: Any, params: PyTree, v: PyTree, data: Iterable[Any], reduction: str) -> Part:
    batches = counted(data, normaliser_of(f))
    return shard_sum(batches, reduction, lambda: ravel(transform(params, v, batches)))


_local_hvp = _local_product
_local_ggn_vp = _local_product


def batches_of(call: str, batches: Iterable[Any], device: torch.device) -> Iterable[tuple[Any, Any, int]]:
    """`(inputs, targets, n)` per batch of `batches`, checked and moved to `device`."""
    for k, batch in enumerate(batches):
        n = samples(batch)
        if n == 0:
            raise StructureError(
                f"{call}: expected every batch to be a pair (inputs, targets) whose inputs hold a "
                f"Tensor with the samples along dim 0, got {type(batch).__name__} as batch {k}. "
                f"Make the loader yield pairs; use (inputs, None) for a loss without targets."
            )
        yield _to(batch[0], device), _to(batch[1], device), n


def _local_grad(call: str, f: Any, params: PyTree, data: Iterable[Any], reduction: str, randomness: str) -> Part:
    """The gradient has no single-process data-set function yet: `torch.func.grad` per batch,
    weighted by the batch's normaliser (its mean times it is its sum)."""
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, dict)):
        raise StructureError(
            f"{call}: expected data to be an iterable of (inputs, targets) batches (e.g. a "
            f"DataLoader or a list of pairs), got {type(data).__name__}. For one batch, pass "
            f"[(inputs, targets)]."
        )
    normaliser = normaliser_of(f)
    device = tree_flatten(params)[0][0].device
    grad = torch.func.grad(lambda p, x, t: f(p, x) if t is None else f(p, x, t))
    total: Tensor | None = None
    weight, n_all = 0.0, 0
    for x, t, n in batches_of(call, data, device):
        with no_random(call, device, randomness == "error"):
            try:
                g = ravel(grad(params, x, t))
            except RuntimeError as exc:
                if "scalar" not in str(exc):
                    raise
                raise OutputError(
                    f"{call}: f must return a scalar Tensor (the batch loss); torch.func.grad "
                    f"said: {str(exc).splitlines()[0]}. Reduce the loss (e.g. .mean())."
                ) from exc
        w = normaliser(x, t, n) if reduction == "mean" else 1.0
        total = g.mul_(w) if total is None else total.add_(g, alpha=w)
        weight, n_all = weight + (w if reduction == "mean" else n), n_all + n
    return total, weight, n_all


def _to(tree: Any, device: torch.device) -> Any:
    from .._tree import tree_map

    return tree_map(lambda a: a.to(device) if isinstance(a, Tensor) else a, tree) if tree is not None else None


# ----------------------------------------------------------------------------- public API


def dataset_hessian(f: Callable[..., Any], *, reduction: Reduction = "mean", group: Any = None, **options: Any) -> Callable[..., PyTree]:
    """The Hessian of the loss over the union of every rank's shard, the same on every rank.

    `dataset_hessian(f)(params, data)` takes this rank's loader of `(inputs, targets)` batches as
    `data` and returns `funchess.dataset_hessian(f)`'s block pytree for the concatenated shards:
    with `reduction="mean"` the mean loss over all samples of all ranks (shards of any sizes),
    with "sum" the summed loss. Every rank passes the same `f`, `params` and options.

    Composition: `funchess.dataset_hessian` on this rank's shard, turned into its weighted sum,
    then one all-reduce of the flattened `N x N` matrix with the loss's normaliser, divided by the
    total count. Memory: two `N x N` matrices per rank. Without an initialised process group it
    is `funchess.dataset_hessian`.

    Args:
        f: the batch loss `f(params, inputs, targets)`, e.g. from `funchess.functional` (over a
            `DistributedDataParallel` model too: the wrapped module is used).
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        group: the `torch.distributed` process group; None is the default group.
        **options: the single-process function's options (`mode`, `chunk_size`, `progress`,
            `randomness`, `loss_fn` where it has them), passed on unchanged.

    Raises:
        StructureError: the ranks' calls differ (parameter names, shapes, dtypes or values,
            options), found on entry by every rank.
        InvalidArgumentError: a bad option, a `DistributedSampler` that pads the data set with
            duplicates, or no sample on any rank.
        DistributedError: a collective failed or timed out (a rank did not make the call).

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
        >>> H = funchess.distributed.dataset_hessian(f)(params, [(x[:6], y[:6]), (x[6:], y[6:])])
        >>> torch.allclose(funchess.to_matrix(H), funchess.to_matrix(funchess.hessian(f)(params, x, y)), atol=1e-6)
        True
    """
    return _dataset_hessian(f, reduction=reduction, group=group, **options)  # type: ignore[no-any-return]


def dataset_ggn(f: Callable[..., Any], *, reduction: Reduction = "mean", group: Any = None, **options: Any) -> Callable[..., PyTree]:
    """The generalised Gauss-Newton matrix over the union of every rank's shard.

    `dataset_ggn(f, loss_fn=...)(params, data)` is `funchess.dataset_ggn` of the concatenated
    shards, the same on every rank, composed as `funchess.distributed.dataset_hessian` is (this
    rank's weighted sum, one all-reduce with the normaliser).

    Args:
        f: the batch loss from `funchess.functional(model, loss_fn)` (or the model output with
            `loss_fn=`), as for `funchess.dataset_ggn`.
        reduction: "mean" (default) or "sum".
        group: the process group; None is the default group.
        **options: the single-process function's options (`mode`, `chunk_size`, `progress`,
            `randomness`, `loss_fn` where it has them), passed on unchanged.

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
        >>> G = funchess.distributed.dataset_ggn(f)(params, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.to_matrix(G), funchess.to_matrix(funchess.ggn(f)(params, x, y)), atol=1e-6)
        True
    """
    return _dataset_ggn(f, reduction=reduction, group=group, **options)  # type: ignore[no-any-return]


def _data_parallel(
    name: str, fn: Callable[..., Any], local: Callable[..., Part], product: bool
) -> Callable[..., Any]:
    """The data-parallel version of the single-process data-set function `fn`: a matrix
    (`fn(f)(params, data)`: Hessian, GGN) or a product (`fn(f)(params, v, data)`)."""

    def transform(f: Callable[..., Any], *, reduction: Reduction = "mean", group: Any = None, **options: Any) -> Callable[..., PyTree]:
        call = label(name, reduction, **options)
        check_reduction(call, reduction)
        inner, rename = unwrap(f)
        single = core(call, fn, inner, reduction=reduction, **options)

        @functools.wraps(f)
        def data_parallel_fn(params: PyTree, *args: Any) -> PyTree:
            here = f"{call}(params, {'v, ' if product else ''}data)"
            if len(args) != 1 + product:
                raise InvalidArgumentError(
                    f"{here}: expected {2 + product} arguments, got {1 + len(args)}. Pass this "
                    f"rank's loader of (inputs, targets) batches as data."
                )
            ranks = enter(here, group, args[-1], f, params, args[0] if product else None)
            if ranks is None:
                return single(rename(params), *args)
            like, n = layout(here, params)
            flat = reduce_sum(here, ranks, like, n if product else n * n,
                              lambda: local(single, inner, rename(params), *args, reduction), reduction)
            return unravel(flat, params) if product else from_matrix(flat.view(n, n), params)

        return data_parallel_fn

    return transform


_dataset_hessian = _data_parallel("dataset_hessian", funchess.dataset_hessian, _local_hessian, product=False)
_dataset_ggn = _data_parallel("dataset_ggn", funchess.dataset_ggn, _local_ggn, product=False)
_dataset_hvp = _data_parallel("dataset_hvp", funchess.dataset_hvp, _local_hvp, product=True)
_dataset_ggn_vp = _data_parallel("dataset_ggn_vp", funchess.dataset_ggn_vp, _local_ggn_vp, product=True)


def dataset_hvp(f: Callable[..., Any], *, reduction: Reduction = "mean", group: Any = None, **options: Any) -> Callable[..., PyTree]:
    """The data-set Hessian-vector product over the union of every rank's shard.

    `dataset_hvp(f)(params, v, data)` is `funchess.dataset_hvp` of the concatenated shards (a
    pytree shaped like `params`), the same on every rank; every rank passes the same `v`.
    Composition: `funchess.dataset_hvp` on this rank's shard as a weighted sum, then one
    all-reduce of the `N` entries and the normaliser. For many products with the same data (CG,
    Lanczos) use `funchess.distributed.dataset_operator`.

    Args:
        f: the batch loss `f(params, inputs, targets)`.
        reduction: "mean" (default) or "sum".
        group: the process group; None is the default group.
        **options: the single-process function's options (`mode`, `chunk_size`, `progress`,
            `randomness`, `loss_fn` where it has them), passed on unchanged.

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(7, 3), torch.randn(7, 1)
        >>> v = {k: torch.ones_like(p) for k, p in params.items()}
        >>> Hv = funchess.distributed.dataset_hvp(f)(params, v, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.ravel(Hv), funchess.ravel(funchess.dataset_hvp(f)(params, v, [(x, y)])), atol=1e-6)
        True
    """
    return _dataset_hvp(f, reduction=reduction, group=group, **options)  # type: ignore[no-any-return]


def dataset_ggn_vp(f: Callable[..., Any], *, reduction: Reduction = "mean", group: Any = None, **options: Any) -> Callable[..., PyTree]:
    """The data-set GGN-vector product over the union of every rank's shard.

    `dataset_ggn_vp(f)(params, v, data)` is `funchess.dataset_ggn_vp` of the concatenated shards,
    the same on every rank; composed as `funchess.distributed.dataset_hvp`.

    Args:
        f: the batch loss from `funchess.functional(model, loss_fn)` (or `loss_fn=`).
        reduction: "mean" (default) or "sum".
        group: the process group; None is the default group.
        **options: the single-process function's options (`mode`, `chunk_size`, `progress`,
            `randomness`, `loss_fn` where it has them), passed on unchanged.

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
        >>> v = {k: torch.ones_like(p) for k, p in params.items()}
        >>> Gv = funchess.distributed.dataset_ggn_vp(f)(params, v, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.ravel(Gv), funchess.ravel(funchess.ggn_vp(f)(params, v, x, y)), atol=1e-6)
        True
    """
    return _dataset_ggn_vp(f, reduction=reduction, group=group, **options)  # type: ignore[no-any-return]


def dataset_grad(
    f: Callable[..., Any], *, reduction: Reduction = "mean", randomness: Literal["error", "different"] = "error", group: Any = None
) -> Callable[..., PyTree]:
    """The gradient of the loss over the union of every rank's shard, the same on every rank.

    `dataset_grad(f)(params, data)` returns a pytree shaped like `params`: the gradient of the
    mean (`reduction="mean"`: over all samples of all ranks) or summed loss over the concatenated
    shards. Composition: `torch.func.grad` of f per batch of this rank's shard, weighted by the
    batch's normaliser for "mean", then one all-reduce of the `N` entries and the normaliser. It
    never writes `.grad` and does not touch DistributedDataParallel's gradient hooks.

    Args:
        f: the batch loss `f(params, inputs, targets)`.
        reduction: "mean" (default) or "sum".
        randomness: "error" (default: raise if f draws random numbers, e.g. dropout in train
            mode) or "different" (allowed).
        group: the process group; None is the default group.

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(7, 3), torch.randn(7, 1)
        >>> g = funchess.distributed.dataset_grad(f)(params, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(g["weight"], torch.func.grad(f)(params, x, y)["weight"], atol=1e-6)
        True
    """
    call = label("dataset_grad", reduction, randomness=randomness)
    check_reduction(call, reduction)
    if randomness not in ("error", "different"):
        raise InvalidArgumentError(
            f"{call}: expected randomness to be 'error' or 'different', got {randomness!r}. Keep "
            f"'error' for a deterministic model (model.eval())."
        )
    if not callable(f):
        raise InvalidArgumentError(f"{call}: expected f to be callable (the batch loss), got {type(f).__name__}.")
    inner, rename = unwrap(f)

    @functools.wraps(f)
    def dataset_grad_fn(params: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, data)"
        ranks = enter(here, group, data, f, params)
        like, n = layout(here, params)
        flat = reduce_sum(here, ranks, like, n, lambda: _local_grad(here, inner, rename(params), data, reduction, randomness), reduction)
        return unravel(flat, params)

    return dataset_grad_fn

