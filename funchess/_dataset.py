"""Data-set curvature: Hessians, HVPs and GGNs of the loss over all batches of a data loader.

`data` is any iterable of `(inputs, targets)` batches (a `DataLoader`, a list); see
`funchess/_data.py` for how batches are weighted (the loss's own normaliser), grouped and stacked.
With `reduction="mean"` (f averages over a batch, PyTorch's default) the result is the curvature of
the mean loss over the concatenated data set, whatever the batch sizes; with `reduction="sum"` of
the summed loss. Batches are moved to the parameters' device. Running statistics are never
updated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor
from torch.func import vmap

from ._checks import (
    ChunkSize,
    Mode,
    Reduction,
    call_label,
    check_callable,
    check_chunk_size,
    check_mode,
    check_primals,
    check_progress,
    check_randomness,
    check_reduction,
    check_tangent,
    relays_warnings,
)
from ._compose import check_function, usable
from ._data import (
    GROUP_SAMPLES,
    NO_VMAP,
    PRODUCT_GROUP_BYTES,
    STACK_FLOPS,
    Batch,
    Grouping,
    Stack,
    accumulate,
    apply,
    group_loss,
    has_stack,
    mean_of,
    normaliser_of,
)
from ._errors import MemoryBudgetError
from ._ggn import ggn, ggn_vp, split_loss
from ._hessian import hessian
from ._hvp import hvp
from ._linearisation import GGNAt, HessianAt, Reroute
from ._memory import budget_of, check_fits
from ._tree import from_matrix, promoted_dtype, to_matrix, tree_flatten

__all__ = ["dataset_hessian", "dataset_hvp", "dataset_ggn", "dataset_ggn_vp", "DatasetProducts", "SumAt", "DATA_RANDOMNESS"]

PyTree = Any
DataRandomness = Literal["error", "different"]
#: "different": every batch draws its own random numbers (as training does), and every derivative
#: pass of that batch replays them.
DATA_RANDOMNESS: tuple[str, ...] = ("error", "different")


def _inner(randomness: str) -> Any:
    """The batch-level transforms' randomness: one draw per call, replayed in every pass."""
    return "error" if randomness == "error" else "same"
_FIXES = (
    "Use matrix-free products over the data (funchess.dataset_hvp, funchess.DatasetOperator), the "
    "diagonal, or fewer parameters (funchess.functional(..., params=[...]))"
)


def _check(call: str, f: Any, reduction: Any, randomness: Any, progress: Any) -> None:
    check_callable(call, f)
    check_reduction(call, reduction)
    check_randomness(call, randomness, DATA_RANDOMNESS)
    check_progress(call, progress)


def _plan_sum(here: str, what: str, params: PyTree, budget: int | None, budget_from: str) -> None:
    """The data-set sum and one group's (or batch's) matrix, planned before either is allocated."""
    leaves = tree_flatten(params)[0]
    N = sum(leaf.numel() for leaf in leaves)
    check_fits(here, f"the data-set {what} of {N:,} parameters (the sum and one batch's)",
               2 * N * N * promoted_dtype(leaves).itemsize, leaves[0].device, budget, budget_from, _FIXES)


def _too_big(here: str, exc: MemoryBudgetError) -> MemoryBudgetError:
    """The planner's error for one batch, told as the data-set call's, with its own fixes."""
    plan = exc.plan
    error = MemoryBudgetError(
        f"{here}: one batch's Hessian {plan}; expected it to fit the budget. {_FIXES}, pass a larger "
        f"max_memory, or use a device with more memory."
    )
    error.plan = plan
    return error


class DatasetProducts:
    """Curvature-vector products over a data set, one group of batches at a time: the engine of
    `dataset_hvp`, `dataset_ggn_vp` and `funchess.DatasetOperator`. `products(params, V, data)`
    takes one vector, or a batch of them (every leaf with a leading dimension, `batched=True`):
    then each group of batches is loaded once and the vectors go through it in one `vmap`."""

    def __init__(
        self, call: str, f: Callable[..., Any], curvature: str, *, loss_fn: Callable[..., Tensor] | None = None,
        reduction: str = "mean", mode: Any = "auto", randomness: str = "error",
    ) -> None:
        self.f, self.call, self.reduction, self.randomness = f, call, reduction, randomness
        self.normaliser = normaliser_of(f)
        if curvature == "hessian":
            H = hvp(functools.partial(group_loss, f), mode=mode, randomness=_inner(randomness))
            self.loss_of: Callable[..., Any] = f
            self.group_product: Callable[[PyTree, PyTree, list[Batch | Stack]], PyTree] = H
        else:
            output, loss = split_loss(call, f, loss_fn)

            def group_output(params: PyTree, parts: list[Batch | Stack]) -> list[Any]:
                """The model output of every batch of a group (stacked batches: one vmapped evaluation)."""
                return [p.over(lambda x, t: output(params, x)) if isinstance(p, Stack) else output(params, p.inputs) for p in parts]

            def group_losses(outputs: list[Any], parts: list[Batch | Stack]) -> Tensor:
                """`Σ_k w_k loss(output_k, targets_k)`."""
                total: Tensor | None = None
                for z, p in zip(outputs, parts):
                    if isinstance(p, Stack):
                        each: Tensor = p.over(lambda x, t, zk: loss(zk, t), z)
                        term = (each * each.new_tensor(p.weights)).sum()
                    else:
                        term = loss(z, p.targets) * p.weight
                    total = term if total is None else total + term
                assert total is not None
                return total

            G = ggn_vp(group_output, loss_fn=group_losses, randomness=_inner(randomness))
            self.loss_of = lambda p, x, t=None: loss(output(p, x), t)
            self.group_product = lambda params, v, parts: G(params, v, parts, parts)
            self.group_output, self.group_losses = group_output, group_losses
        self.curvature = curvature

    def __call__(self, here: str, params: PyTree, V: PyTree, data: Iterable[Any], progress: bool | None, *, batched: bool = False) -> PyTree:
        grouping = Grouping(self.loss_of, params, self.randomness, float("inf"), here)

        def product(parts: list[Batch | Stack]) -> PyTree:
            if batched:
                return vmap(lambda v: self.group_product(params, v, parts))(V)
            return self.group_product(params, V, parts)

        def per_group(group: list[Batch]) -> PyTree:
            parts = grouping.parts(group)
            try:
                return product(parts)
            except NO_VMAP:
                if not has_stack(parts):
                    raise
            grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
            return product(list(group))

        acc, total = accumulate(
            here, data, params, self.reduction, progress, self.randomness, self.normaliser, per_group,
            lambda first: grouping.samples(first, PRODUCT_GROUP_BYTES),
        )
        return mean_of(acc, total, self.reduction)

    def linearise(
        self, here: str, params: PyTree, data: Iterable[Any], progress: bool | None, limit: int | None,
        rewind: Callable[[], None],
    ) -> SumAt | None:
        """Every group's linearisation (`funchess/_linearisation.py`), built in one pass over the
        data, as one sum whose products need the data no more; None as soon as the graphs held
        pass `limit` bytes (they are dropped: products then iterate the data)."""
        grouping = Grouping(self.loss_of, params, self.randomness, float("inf"), here)
        leaves, spec = tree_flatten(params)
        reroute, kept, held = Reroute(), [], 0

        def build(parts: list[Batch | Stack]) -> HessianAt | GGNAt:
            if self.curvature == "hessian":
                return HessianAt(here, lambda p: group_loss(self.f, p, parts), leaves, spec.unflatten, reroute=reroute, rewind=rewind)
            return GGNAt(here, lambda p: self.group_output(p, parts), lambda z: self.group_losses(z, parts), leaves,
                         spec.unflatten, reroute=reroute, rewind=rewind)

        def per_group(group: list[Batch]) -> Tensor:
            nonlocal held
            parts = grouping.parts(group)
            try:
                lin = build(parts)
            except NO_VMAP:
                if not has_stack(parts):
                    raise
                grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
                lin = build(list(group))
            held += lin.kept_bytes()
            if limit is not None and held > limit:
                raise _TooMuch
            kept.append(lin)
            zero: Tensor = leaves[0].new_zeros(())
            return zero

        try:
            _, total = accumulate(
                here, data, params, self.reduction, progress, self.randomness, self.normaliser, per_group,
                lambda first: grouping.samples(first, PRODUCT_GROUP_BYTES),
            )
        except _TooMuch:
            return None
        return SumAt(kept, total if self.reduction == "mean" else 1.0)


class _TooMuch(Exception):
    """The kept graphs of a data set's groups passed the memory limit."""


class SumAt:
    """`Σ_k lin_k / scale`: a data set's curvature from the linearisations of its groups."""

    def __init__(self, parts: list[HessianAt | GGNAt], scale: float) -> None:
        self.parts, self.scale = parts, scale

    def _sum(self, pieces: Iterable[list[Tensor]]) -> list[Tensor]:
        acc: list[Tensor] | None = None
        for got in pieces:  # out of place: under vmap a piece may be batched and another not
            acc = got if acc is None else [a + g for a, g in zip(acc, got)]
        assert acc is not None
        return [a / self.scale for a in acc]

    def mv(self, vs: list[Tensor]) -> list[Tensor]:
        return self._sum(lin.mv(vs) for lin in self.parts)

    def mm(self, Vs: list[Tensor], how: str = "autograd") -> list[Tensor]:
        return self._sum(lin.mm(Vs, how) for lin in self.parts)

    def kept_bytes(self) -> int:
        return sum(lin.kept_bytes() for lin in self.parts)


# ----------------------------------------------------------------------------- public API


def dataset_hessian(
    f: Callable[..., Any],
    *,
    reduction: Reduction = "mean",
    mode: Mode = "auto",
    chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The Hessian of the loss over a whole data set, accumulated batch by batch.

    `dataset_hessian(f)(params, data)` returns the block pytree of `funchess.hessian(f)` (views of
    one `(N, N)` matrix) for the loss over every batch of `data`, an iterable of `(inputs,
    targets)` pairs. With `reduction="mean"` each batch's Hessian is weighted by its share of the
    loss's normaliser (its sample count; for a cross-entropy or NLL loss with `weight=` or ignored
    targets, the summed weights of its counted targets), so the result equals the Hessian of the
    mean loss over the concatenated data set even when the last batch is smaller; with "sum", of
    the summed loss. `reduction` must match the loss's own reduction.

    Composition: consecutive batches are grouped until a group holds 1,024 samples or more, and
    each group costs one `funchess.hessian(mode=mode)` of `Σ_k w_k f(params, inputs_k, targets_k)`,
    added in place into the first group's matrix. Within a group, batches of equal shapes are
    stacked and f is `vmap`ped over them while a stack's forward stays small (measured on the
    first batch: stacking pays where per-operator costs dominate). Every evaluation of f still sees
    one batch (under `vmap` too), so batch norms with batch statistics (with
    `funchess.functional(..., batch_norm="batch")`) use that batch's statistics; a function that
    fails under `vmap` (an operator without a batching rule, such as recurrent layers) is evaluated
    batch by batch. The memory planner sees a whole group; if it does not fit the budget, that
    group goes batch by batch. Peak memory: two Hessians plus one group's working set.

    Args:
        f: the batch loss `f(params, inputs, targets)` (or `f(params, inputs)` for batches
            `(inputs, None)`), e.g. from `funchess.functional`.
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        mode, chunk_size, max_memory: as for `funchess.hessian` (rows per pass, and the budget).
        progress: True shows a tqdm bar, None shows it only on a terminal, False (default) never.
        randomness: "error" (default: raise if f draws random numbers, e.g. dropout in train
            mode) or "different" (allowed: each batch's single forward draws the masks its
            derivatives use; every call draws new ones).

    Returns:
        A function `(params, data) -> H`.

    Raises:
        StructureError: data is not an iterable of `(inputs, targets)` pairs.
        InvalidArgumentError: data yields no batch, or a bad option.
        UnsupportedError: f draws random numbers with randomness="error".
        MemoryBudgetError: not even one batch's Hessian fits the budget (use `dataset_hvp` or
            `funchess.DatasetOperator` then).

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        >>> H = funchess.dataset_hessian(f)(params, loader)  # batches of 4, 4 and 2
        >>> torch.allclose(funchess.to_matrix(H), funchess.to_matrix(funchess.hessian(f)(params, x, y)), atol=1e-6)
        True
    """
    call = call_label("dataset_hessian", {"reduction": reduction, "mode": mode, "chunk_size": chunk_size,
                                          "max_memory": max_memory, "progress": progress, "randomness": randomness})
    _check(call, f, reduction, randomness, progress)
    check_mode(call, mode)
    check_chunk_size(call, chunk_size)
    options = {"mode": mode, "chunk_size": chunk_size, "max_memory": max_memory, "randomness": _inner(randomness)}
    budget, budget_from = budget_of(call, max_memory)
    H_batch = hessian(f, **options)  # type: ignore[arg-type]
    H_group = hessian(functools.partial(group_loss, f), **options)  # type: ignore[arg-type]
    normaliser = normaliser_of(f)

    @functools.wraps(f)
    @relays_warnings
    def dataset_hessian_fn(params: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, data)"
        params = usable(params)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        _plan_sum(here, "Hessian", params, budget, budget_from)
        grouping = Grouping(f, params, randomness, STACK_FLOPS, here)

        def per_group(group: list[Batch]) -> Tensor:
            parts = grouping.parts(group)
            attempts: list[list[Batch | Stack]] = [parts, list(group)] if has_stack(parts) else [parts]
            for attempt in attempts:
                try:
                    return to_matrix(H_group(params, attempt))
                except MemoryBudgetError:
                    break  # too big together: batch by batch
                except NO_VMAP:
                    if not has_stack(attempt):
                        raise
                    grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
            M: Tensor | None = None
            for b in group:
                try:
                    H = to_matrix(apply(H_batch, params, b.inputs, b.targets))
                except MemoryBudgetError as exc:
                    raise _too_big(here, exc) from exc
                M = H.mul_(b.weight) if M is None else M.add_(H, alpha=b.weight)
            assert M is not None
            return M

        M, total = accumulate(here, data, params, reduction, progress, randomness, normaliser, per_group, GROUP_SAMPLES)
        return from_matrix(mean_of(M, total, reduction), params)

    return dataset_hessian_fn


def dataset_hvp(
    f: Callable[..., Any],
    *,
    reduction: Reduction = "mean",
    mode: Mode = "auto",
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The Hessian-vector product of the loss over a whole data set, batch by batch.

    `dataset_hvp(f)(params, v, data)` returns a pytree shaped like `params`: the data-set Hessian
    (as in `funchess.dataset_hessian`, same weighting) times `v`, without forming any Hessian.

    Composition: `funchess.hvp` along `v` of `Σ_k w_k f(params, inputs_k, targets_k)` over groups
    of consecutive batches, equal-shaped batches stacked and f `vmap`ped over them (each
    evaluation of f still sees one batch; a function that does not vmap goes one batch at a time).
    A group holds at most 1,024 samples and 256 MiB of saved activations (measured on the first
    batch), so memory stays that of a moderate batch. One HVP costs a few gradients, so per-call
    costs dominate small batches, which grouping amortises. For many products over the same data
    (solvers, eigenvalues), `funchess.DatasetOperator` is the operator form.

    Args:
        f: the batch loss `f(params, inputs, targets)`.
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        mode: as for `funchess.hvp`.
        progress: True, None (only on a terminal) or False (default).
        randomness: "error" (default) or "different", as for `funchess.dataset_hessian`.

    Returns:
        A function `(params, v, data) -> H v` (funchess's product convention).

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(7, 3), torch.randn(7, 1)
        >>> v = {k: torch.ones_like(p) for k, p in params.items()}
        >>> Hv = funchess.dataset_hvp(f)(params, v, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.ravel(Hv), funchess.ravel(funchess.hvp(f)(params, v, x, y)))
        True
    """
    call = call_label("dataset_hvp", {"reduction": reduction, "mode": mode, "progress": progress, "randomness": randomness})
    _check(call, f, reduction, randomness, progress)
    check_mode(call, mode)
    products = DatasetProducts(call, f, "hessian", reduction=reduction, mode=mode, randomness=randomness)

    @functools.wraps(f)
    @relays_warnings
    def dataset_hvp_fn(params: PyTree, v: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, v, data)"
        params, v = usable(params), usable(v)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)
        return products(here, params, v, data, progress)

    return dataset_hvp_fn


def dataset_ggn(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    reduction: Reduction = "mean",
    chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The generalised Gauss-Newton matrix of the loss over a whole data set, batch by batch.

    `dataset_ggn(f)(params, data)` is `funchess.ggn` accumulated over the `(inputs, targets)`
    batches of `data` with the weights of `reduction` (as in `funchess.dataset_hessian`).

    Composition: `funchess.ggn(f, loss_fn, chunk_size)` per batch, added in place.

    Args:
        f, loss_fn, chunk_size, max_memory: as for `funchess.ggn`.
        reduction, progress, randomness: as for `funchess.dataset_hessian`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
        >>> G = funchess.dataset_ggn(f)(params, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.to_matrix(G), funchess.to_matrix(funchess.ggn(f)(params, x, y)), atol=1e-6)
        True
    """
    call = call_label("dataset_ggn", {"loss_fn": loss_fn, "reduction": reduction, "chunk_size": chunk_size,
                                      "max_memory": max_memory, "progress": progress, "randomness": randomness})
    _check(call, f, reduction, randomness, progress)
    budget, budget_from = budget_of(call, max_memory)
    G_fn = ggn(f, loss_fn=loss_fn, chunk_size=chunk_size, max_memory=max_memory, randomness=_inner(randomness))
    normaliser = normaliser_of(f)

    @functools.wraps(f)
    @relays_warnings
    def dataset_ggn_fn(params: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, data)"
        params = usable(params)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        _plan_sum(here, "GGN", params, budget, budget_from)

        def per_batch(group: list[Batch]) -> Tensor:
            (b,) = group
            return to_matrix(G_fn(params, b.inputs, b.targets)).mul_(b.weight)

        M, total = accumulate(here, data, params, reduction, progress, randomness, normaliser, per_batch)
        return from_matrix(mean_of(M, total, reduction), params)

    return dataset_ggn_fn


def dataset_ggn_vp(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    reduction: Reduction = "mean",
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The GGN-vector product over a whole data set, batch by batch, without forming the GGN.

    `dataset_ggn_vp(f)(params, v, data)` is `funchess.ggn_vp` accumulated over the batches of
    `data` with the weights of `reduction` (as in `funchess.dataset_hessian`).

    Composition: `funchess.ggn_vp` (one forward, two backward passes) of groups of batches, as in
    `funchess.dataset_hvp`: the outputs of equal-shaped batches in one `vmap`ped evaluation, the
    loss `Σ_k w_k loss(output_k, targets_k)`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
        >>> v = {k: torch.ones_like(p) for k, p in params.items()}
        >>> Gv = funchess.dataset_ggn_vp(f)(params, v, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.ravel(Gv), funchess.ravel(funchess.ggn_vp(f)(params, v, x, y)), atol=1e-6)
        True
    """
    call = call_label("dataset_ggn_vp", {"loss_fn": loss_fn, "reduction": reduction, "progress": progress, "randomness": randomness})
    _check(call, f, reduction, randomness, progress)
    products = DatasetProducts(call, f, "ggn", loss_fn=loss_fn, reduction=reduction, randomness=randomness)

    @functools.wraps(f)
    @relays_warnings
    def dataset_ggn_vp_fn(params: PyTree, v: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, v, data)"
        params, v = usable(params), usable(v)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)
        return products(here, params, v, data, progress)

    return dataset_ggn_vp_fn
