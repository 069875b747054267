"""Data-set curvature: Hessians, HVPs and GGNs of the loss over all batches of a data loader.

`data` is any iterable of `(inputs, targets)` batches (a `DataLoader`, a list). Batch `k` has
`n_k` samples (dim 0 of its first input Tensor) and loss `f(params, inputs_k, targets_k)`. With
`reduction="mean"` (f averages over a batch, PyTorch's default) the result is
`Σ_k (n_k / n) · curvature_k`, the curvature of the mean loss over the concatenated data set,
whatever the batch sizes; with `reduction="sum"` it is `Σ_k curvature_k`. Batches are moved to the
parameters' device. Batch-norm layers in train mode use each batch's own statistics (as training
does), so then the result is the weighted sum of per-batch curvatures; running statistics are
never updated.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from ._errors import InvalidArgumentError, MemoryBudgetError, StructureError, UnsupportedError
from ._ggn import RandomGuard, Reduction, check_reduction, ggn, ggn_vp, split_loss
from ._hessian import Mode, _check_callable, _check_primals, _check_tangents, hessian, hvp
from ._jacobian import check_chunk_size, safe_ops
from ._memory import _CountFlops
from ._per_sample import check_randomness, fmt_call
from ._tree import from_matrix, to_matrix, tree_flatten, tree_map, tree_unflatten

__all__ = ["dataset_hessian", "dataset_hvp", "dataset_ggn", "dataset_ggn_vp"]

PyTree = Any
DataRandomness = Literal["error", "different"]
#: dataset_hessian takes one Hessian per group of consecutive batches holding at least this many
#: samples: the per-call costs (probe, passes per block, mirror) are paid once per group, not per
#: batch (benchmarks/RESULTS.md, "Data-set Hessian").
_GROUP_SAMPLES = 1024
#: Within a group, batches of equal shapes are stacked and f is vmapped over them (one evaluation
#: for several batches) while the stack's forward stays under this many matrix-product FLOPs:
#: measured 1.2-3.6x faster on MLPs with stacks of 0.5-2 MFLOP, and slower on stacks of 8-20 MFLOP
#: (conv nets, transformer blocks), where per-operator costs no longer dominate.
_STACK_FLOPS = 2e6
#: dataset_hvp evaluates groups of consecutive batches (equal-shaped ones stacked and vmapped) in
#: one HVP while the activations autograd saves for the group stay under this many bytes (and the
#: group under 1,024 samples): one HVP costs a few gradients, so per-call costs dominate small
#: batches.
_HVP_GROUP_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- the loop


def _progress(call: str, data: Iterable[Any], progress: bool | None) -> Iterable[Any]:
    """Wrap `data` in a tqdm bar: always with True, only on a terminal with None, never with False."""
    if progress is False:
        return data
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise UnsupportedError(
            f"{call}: progress={progress!r} needs tqdm, which is not installed. Install it "
            f"(pip install tqdm, or funchess[progress]) or pass progress=False."
        ) from exc
    total = len(data) if isinstance(data, Sized) else None
    disable = None if progress is None else False  # None: tqdm turns itself off when not a tty
    bar: Iterable[Any] = tqdm(
        data, total=total, desc=call.split("(")[0], unit="batch", disable=disable, file=sys.stderr, leave=False
    )
    return bar


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:4]}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"a {type(batch).__name__}"


def _batches(
    call: str, data: Iterable[Any], device: torch.device, progress: bool | None
) -> Iterator[tuple[Any, Any, int]]:
    """`(inputs, targets, n)` per batch, checked and on `device`."""
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, dict)):
        raise StructureError(
            f"{call}: expected data to be an iterable of (inputs, targets) batches (e.g. a "
            f"DataLoader or a list of pairs), got {_describe(data)}. For one batch, pass "
            f"[(inputs, targets)]."
        )
    seen = 0
    for k, batch in enumerate(_progress(call, data, progress)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise StructureError(
                f"{call}: expected every batch to be a pair (inputs, targets), got "
                f"{_describe(batch)} as batch {k}. Make the loader yield pairs, e.g. "
                f"((b['x'], b['y']) for b in loader); use (inputs, None) for a loss without targets."
            )
        inputs, targets = batch
        moved = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, (inputs, targets))
        first = next((t for t in tree_flatten(moved[0])[0] if isinstance(t, Tensor)), None)
        if first is None or first.dim() == 0:
            raise StructureError(
                f"{call}: batch {k} has inputs {_describe(inputs)} with no Tensor holding the "
                f"samples along dim 0; expected one (its size is the batch's weight). Put the "
                f"batched input Tensor first in the inputs."
            )
        seen += 1
        yield moved[0], moved[1], int(first.shape[0])
    if seen == 0:
        raise InvalidArgumentError(
            f"{call}: data yielded no batches; expected at least one (inputs, targets) batch. "
            f"Check that the data set is not empty (drop_last=True with fewer samples than "
            f"batch_size yields nothing; a generator can be iterated only once)."
        )


class _Batch(NamedTuple):
    inputs: Any
    targets: Any
    n: int  # samples
    weight: float  # in the data-set sum: n for mean-reduced losses (n x a batch mean is its sum), else 1


def _grouped(batches: Iterator[_Batch], samples: int | Callable[[_Batch], int]) -> Iterator[list[_Batch]]:
    """Consecutive batches, as groups of at least `samples` samples (the last may hold fewer);
    a callable `samples` is asked once, with the first batch."""
    group: list[_Batch] = []
    held = 0
    for batch in batches:
        if callable(samples):
            samples = samples(batch)
        group.append(batch)
        held += batch.n
        if held >= samples:
            yield group
            group, held = [], 0
    if group:
        yield group


def _accumulate(
    call: str,
    data: Iterable[Any],
    params: PyTree,
    reduction: str,
    progress: bool | None,
    randomness: str,
    per_batch: Callable[[Any, Any], PyTree] | None = None,
    *,
    per_group: Callable[[list[_Batch]], PyTree] | None = None,
    group_samples: int | Callable[[_Batch], int] = 1,
) -> PyTree:
    """`Σ w_k curvature_k` with the data-set weights of `reduction`: `per_batch(inputs_k, targets_k)`
    batch by batch, or `per_group(batches)` (the weighted sum over a group of consecutive batches,
    `group_samples` samples or more) group by group."""
    device = tree_flatten(params)[0][0].device
    total, acc = 0, None
    batches = (_Batch(x, t, n, float(n) if reduction == "mean" else 1.0) for x, t, n in _batches(call, data, device, progress))
    for group in _grouped(batches, group_samples):
        with RandomGuard(call, randomness, device):
            if per_group is not None:
                got, w = per_group(group), 1.0
            else:
                assert per_batch is not None and len(group) == 1
                got, w = per_batch(group[0].inputs, group[0].targets), group[0].weight
        if acc is None:
            acc = got if w == 1 else tree_map(lambda t: t.mul_(w), got)
        else:
            tree_map(lambda a, t: a.add_(t, alpha=w), acc, got)
        total += sum(batch.n for batch in group)
    if reduction == "mean":  # Σ_k n_k mean_k / n: the mean over the whole data set
        tree_map(lambda a: a.div_(total), acc)
    return acc


def _apply(f: Callable[..., Any], params: PyTree, inputs: Any, targets: Any) -> Any:
    return f(params, inputs) if targets is None else f(params, inputs, targets)


class _Stack:
    """Batches of one structure and shapes, stacked along a new dim 0: `Σ_k w_k f(params, batch_k)`
    as one `vmap` over the batches (each evaluation of f still sees one batch)."""

    def __init__(self, batches: list[_Batch], randomness: str) -> None:
        flat = [tree_flatten((b.inputs, b.targets))[0] for b in batches]
        self.spec = tree_flatten((batches[0].inputs, batches[0].targets))[1]
        self.index = [i for i, leaf in enumerate(flat[0]) if isinstance(leaf, Tensor)]
        self.leaves = list(flat[0])
        for i in self.index:
            self.leaves[i] = torch.stack([leaves[i] for leaves in flat])
        self.weights = [b.weight for b in batches]
        self.randomness = randomness

    def over(self, fn: Callable[..., Any], *per_batch: Any) -> Any:
        """`fn(inputs_k, targets_k, *per_batch_k)` for every stacked batch k, as one `vmap`."""
        k = len(self.index)

        def one(*args: Any) -> Any:
            leaves = list(self.leaves)
            for i, t in zip(self.index, args[:k]):
                leaves[i] = t
            return fn(*tree_unflatten(self.spec, leaves), *args[k:])

        return vmap(one, randomness=self.randomness)(*(self.leaves[i] for i in self.index), *per_batch)

    def losses(self, f: Callable[..., Any], params: PyTree) -> Any:
        return self.over(lambda x, t: _apply(f, params, x, t))

    def loss(self, f: Callable[..., Any], params: PyTree) -> Tensor:
        losses: Tensor = self.losses(f, params)
        return (losses * losses.new_tensor(self.weights)).sum()


def _group_loss(f: Callable[..., Any], params: PyTree, parts: list[_Batch | _Stack]) -> Any:
    """`Σ_k w_k f(params, inputs_k, targets_k)` over a group: each evaluation of f sees one batch."""
    total = None
    for part in parts:
        if isinstance(part, _Stack):
            loss = part.loss(f, params)
        else:
            loss = _apply(f, params, part.inputs, part.targets)
            if not isinstance(loss, Tensor):
                return loss  # the derivative says what it expected
            loss = loss * part.weight
        total = loss if total is None else total + loss
    return total


def _signature(batch: _Batch) -> Any:
    """Batches with equal signatures stack: same structure, Tensor shapes/dtypes/devices, constants."""
    leaves, spec = tree_flatten((batch.inputs, batch.targets))
    key = (spec, tuple((l.shape, l.dtype, l.device) if isinstance(l, Tensor) else ("constant", l) for l in leaves))
    try:
        hash(key)
    except TypeError:  # an unhashable constant: this batch goes alone
        return None
    return key


def _stacked(group: list[_Batch], flops_per_sample: float, limit: float, randomness: str) -> list[_Batch | _Stack]:
    """The group as `_Stack`s of equal-signature batches whose forward stays under `limit` FLOPs,
    and the batches that stack with no other."""
    runs: dict[Any, list[list[_Batch]]] = {}
    alone: list[_Batch | _Stack] = []
    for batch in group:
        key = _signature(batch)
        if key is None:
            alone.append(batch)
            continue
        stacks = runs.setdefault(key, [[]])
        if stacks[-1] and (sum(b.n for b in stacks[-1]) + batch.n) * flops_per_sample > limit:
            stacks.append([])
        stacks[-1].append(batch)
    parts: list[_Batch | _Stack] = [
        _Stack(s, randomness) if len(s) > 1 else s[0] for stacks in runs.values() for s in stacks
    ]
    return parts + alone


def _has_stack(parts: list[_Batch | _Stack]) -> bool:
    return any(isinstance(p, _Stack) for p in parts)


def _differentiable(params: PyTree) -> PyTree:
    """Parameters that require grad, as inside the derivative passes (fused fast paths, such as
    `nn.MultiheadAttention`'s inference kernel, are then not taken)."""
    return tree_map(lambda p: p.detach().requires_grad_(True), params)


class _Grouping:
    """One call's grouping of batches: what f costs per sample (FLOPs and the bytes autograd saves,
    measured on the first batch), and whether f evaluates under `vmap` over stacked batches."""

    def __init__(self, f: Callable[..., Any], params: PyTree, randomness: str, stack_flops: float) -> None:
        self.f, self.params, self.stack_flops = f, params, stack_flops
        self.randomness = "error" if randomness == "error" else "different"
        self.flops = self.saved = 0.0
        self.measured = False
        self.vmaps: bool | None = None  # None: not yet tried on a stack

    def measure(self, batch: _Batch) -> None:
        """Matrix-product FLOPs (convolutions counted twice, as in the joint-pass rule: they gain
        less from larger operands) and saved bytes of f per sample, on one batch."""
        if self.measured:
            return
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        counter = _CountFlops()
        with torch.enable_grad(), safe_ops(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
            _apply(self.f, _differentiable(self.params), batch.inputs, batch.targets)
        n = max(batch.n, 1)
        self.flops, self.saved, self.measured = (counter.flops + counter.conv_flops) / n, saved / n, True

    def samples(self, batch: _Batch, limit_bytes: float) -> int:
        """Samples per group whose saved activations stay under `limit_bytes` (at most 1,024)."""
        self.measure(batch)
        return int(max(1, min(_GROUP_SAMPLES, limit_bytes // max(self.saved, 1.0))))

    def parts(self, group: list[_Batch]) -> list[_Batch | _Stack]:
        """The group with equal-shaped batches stacked where f vmaps over them; else its batches."""
        self.measure(group[0])
        if self.vmaps is not False:
            parts = _stacked(group, self.flops, self.stack_flops, self.randomness)
            if not _has_stack(parts):
                return parts
            if self.vmaps is None:  # checked on the first stacks; a later failure falls back too
                self.vmaps = self._vmaps(parts)
            if self.vmaps:
                return parts
        return list(group)

    def _vmaps(self, parts: list[_Batch | _Stack]) -> bool:
        """Whether f evaluates under `vmap` over every stack as it does batch by batch: one scalar
        loss per batch, no error (recurrent layers have no batching rule), and no operator falling
        back to torch's slow per-batch loop. Run as the derivative passes run: with grad and
        funchess's rerouting of norms and attention."""
        with torch.enable_grad(), safe_ops(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*batching rule", category=UserWarning)
            try:
                for part in parts:
                    if isinstance(part, _Stack):
                        losses = part.losses(self.f, _differentiable(self.params))
                        if not isinstance(losses, Tensor) or tuple(losses.shape) != (len(part.weights),):
                            return False
            except (UserWarning, RuntimeError, NotImplementedError, UnsupportedError):
                return False
        return True


_NO_VMAP = (RuntimeError, NotImplementedError, UnsupportedError)  # a pass failing on stacked batches


def _check(call: str, reduction: str, randomness: str, progress: Any) -> None:
    check_reduction(call, reduction)
    check_randomness(call, randomness, ("error", "different"))
    if progress not in (True, False, None):
        raise InvalidArgumentError(
            f"{call}: expected progress to be True (show a bar), None (only on a terminal) or "
            f"False (never), got {progress!r}."
        )


# ----------------------------------------------------------------------------- public API


def dataset_hessian(
    f: Callable[..., Any],
    *,
    reduction: Reduction = "mean",
    mode: Mode = "auto",
    chunk_size: int | None = None,
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The Hessian of the loss over a whole data set, accumulated batch by batch.

    `dataset_hessian(f)(params, data)` returns the block pytree of `funchess.hessian(f)` (views of
    one `(N, N)` matrix) for the loss over every batch of `data`, an iterable of `(inputs,
    targets)` pairs. With `reduction="mean"` each batch's Hessian is weighted by its share of the
    samples, so the result equals the Hessian of the mean loss over the concatenated data set even
    when the last batch is smaller; with "sum", of the summed loss. `reduction` must match the
    loss's own reduction.

    Composition: consecutive batches are grouped until a group holds 1,024 samples or more, and
    each group costs one `funchess.hessian(mode=mode)` of `Σ_k w_k f(params, inputs_k, targets_k)`,
    added in place into the first group's matrix. Within a group, batches of equal shapes are
    stacked and f is `vmap`ped over them while a stack's forward stays under 2 MFLOP (measured on
    the first batch). Every evaluation of f still sees one batch (under `vmap` too), so batch norms
    in train mode use that batch's statistics; a function that fails under `vmap` (an operator
    without a batching rule, such as recurrent layers) is evaluated batch by batch. Measured 1.4-3.9x
    faster than one Hessian per batch on MLPs with batches of 16-64 (as fast as the Hessian of the
    concatenated data), 0-25% on conv nets and transformer blocks (benchmarks/RESULTS.md). The
    memory planner sees a whole group; if even one row of it does not fit the budget, that group
    goes batch by batch. With an int `chunk_size` (rows per pass, bounding each batch's working
    set) every batch is its own Hessian. Peak memory: two Hessians plus one group's working set.

    Args:
        f: the batch loss `f(params, inputs, targets)` (or `f(params, inputs)` for batches
            `(inputs, None)`), e.g. from `funchess.functional`.
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        mode, chunk_size: as for `funchess.hessian`.
        progress: True shows a tqdm bar, None shows it only on a terminal, False (default) never.
        randomness: "error" (default: raise if f draws random numbers, e.g. dropout in train
            mode) or "different" (allowed: each batch's single forward draws the masks its
            derivatives use; every call draws new ones).

    Raises:
        StructureError: data is not an iterable of `(inputs, targets)` pairs.
        InvalidArgumentError: data yields no batch, or a bad option.
        UnsupportedError: f draws random numbers with randomness="error".

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
    call = fmt_call("dataset_hessian", reduction=reduction, mode=mode, chunk_size=chunk_size)
    _check_callable(call, f)
    _check(call, reduction, randomness, progress)
    check_chunk_size(call, chunk_size)
    H_fn = hessian(f, mode=mode, chunk_size=chunk_size)
    # planned: the probe measures the whole group
    H_group = hessian(lambda params, parts: _group_loss(f, params, parts), mode=mode)

    @functools.wraps(f)
    def dataset_hessian_fn(params: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, data)"
        _check_primals(here, (params,), ["params"])
        grouping = _Grouping(f, params, randomness, _STACK_FLOPS)

        def per_group(group: list[_Batch]) -> Tensor:
            parts = grouping.parts(group)
            attempts: list[list[_Batch | _Stack]] = [parts, list(group)] if _has_stack(parts) else [parts]
            for attempt in attempts:
                try:
                    return to_matrix(H_group(params, attempt))
                except MemoryBudgetError:
                    if len(group) == 1:
                        raise
                    break  # too big together: batch by batch
                except _NO_VMAP:
                    if not _has_stack(attempt):
                        raise
                    grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
            first = group[0]
            M = to_matrix(_apply(H_fn, params, first.inputs, first.targets)).mul_(first.weight)
            for b in group[1:]:
                M.add_(to_matrix(_apply(H_fn, params, b.inputs, b.targets)), alpha=b.weight)
            return M

        if chunk_size is not None:  # the caller bounds each pass: batch by batch, as asked
            M = _accumulate(here, data, params, reduction, progress, randomness,
                            lambda x, t: to_matrix(_apply(H_fn, params, x, t)))
        else:
            M = _accumulate(here, data, params, reduction, progress, randomness,
                            per_group=per_group, group_samples=_GROUP_SAMPLES)
        return from_matrix(M, params)

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
    costs dominate small batches: measured 3x faster with 8 batches of 64 and 9x with 32 batches
    of 16 than one HVP per batch on a 1,893-parameter MLP (benchmarks/RESULTS.md).

    Args:
        f: the batch loss `f(params, inputs, targets)`.
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        mode: as for `funchess.hvp`.
        progress: True, None (only on a terminal) or False (default).
        randomness: "error" (default) or "different", as for `funchess.dataset_hessian`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(7, 3), torch.randn(7, 1)
        >>> v = {k: torch.ones_like(p) for k, p in params.items()}
        >>> Hv = funchess.dataset_hvp(f)(params, v, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.ravel(Hv), funchess.ravel(funchess.hvp(lambda p: f(p, x, y), (params,), (v,))))
        True
    """
    call = fmt_call("dataset_hvp", reduction=reduction, mode=mode)
    _check_callable(call, f)
    _check(call, reduction, randomness, progress)

    @functools.wraps(f)
    def dataset_hvp_fn(params: PyTree, v: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, v, data)"
        _check_primals(here, (params,), ["params"])
        _check_tangents(here, (params,), (v,))
        grouping = _Grouping(f, params, randomness, float("inf"))

        def per_group(group: list[_Batch]) -> PyTree:
            parts = grouping.parts(group)
            try:
                return hvp(lambda p: _group_loss(f, p, parts), (params,), (v,), mode=mode)
            except _NO_VMAP:
                if not _has_stack(parts):
                    raise
            grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
            return hvp(lambda p: _group_loss(f, p, list(group)), (params,), (v,), mode=mode)

        return _accumulate(
            here, data, params, reduction, progress, randomness, per_group=per_group,
            group_samples=lambda first: grouping.samples(first, _HVP_GROUP_BYTES),
        )

    return dataset_hvp_fn


def dataset_ggn(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    progress: bool | None = False,
    randomness: DataRandomness = "error",
) -> Callable[..., PyTree]:
    """The generalised Gauss-Newton matrix of the loss over a whole data set, batch by batch.

    `dataset_ggn(f)(params, data)` is `funchess.ggn` accumulated over the `(inputs, targets)`
    batches of `data` with the weights of `reduction` (as in `funchess.dataset_hessian`).

    Composition: `funchess.ggn(f, loss_fn, chunk_size)` per batch, added in place.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
        >>> G = funchess.dataset_ggn(f)(params, [(x[:4], y[:4]), (x[4:], y[4:])])
        >>> torch.allclose(funchess.to_matrix(G), funchess.to_matrix(funchess.ggn(f)(params, x, y)), atol=1e-6)
        True
    """
    call = fmt_call("dataset_ggn", reduction=reduction, chunk_size=chunk_size)
    _check(call, reduction, randomness, progress)
    G_fn = ggn(f, loss_fn=loss_fn, chunk_size=chunk_size, randomness=randomness)

    @functools.wraps(f)
    def dataset_ggn_fn(params: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, data)"
        _check_primals(here, (params,), ["params"])
        M = _accumulate(
            here, data, params, reduction, progress, randomness, lambda x, t: to_matrix(G_fn(params, x, t))
        )
        return from_matrix(M, params)

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
    call = fmt_call("dataset_ggn_vp", reduction=reduction)
    _check(call, reduction, randomness, progress)
    output, loss = split_loss(call, f, loss_fn)

    def group_output(params: PyTree, parts: list[_Batch | _Stack]) -> list[Any]:
        """The model output of every batch of a group (stacked batches: one vmapped evaluation)."""
        return [p.over(lambda x, t: output(params, x)) if isinstance(p, _Stack) else output(params, p.inputs) for p in parts]

    def group_loss(outputs: list[Any], parts: list[_Batch | _Stack]) -> Tensor:
        """`Σ_k w_k loss(output_k, targets_k)`."""
        total: Tensor | None = None
        for z, p in zip(outputs, parts):
            if isinstance(p, _Stack):
                each: Tensor = p.over(lambda x, t, zk: loss(zk, t), z)
                term = (each * each.new_tensor(p.weights)).sum()
            else:
                term = loss(z, p.targets) * p.weight
            total = term if total is None else total + term
        assert total is not None
        return total

    Gv_group = ggn_vp(group_output, loss_fn=group_loss, randomness=randomness)

    @functools.wraps(f)
    def dataset_ggn_vp_fn(params: PyTree, v: PyTree, data: Iterable[Any]) -> PyTree:
        here = f"{call}(params, v, data)"
        _check_primals(here, (params,), ["params"])
        _check_tangents(here, (params,), (v,))
        grouping = _Grouping(lambda p, x, t=None: loss(output(p, x), t), params, randomness, float("inf"))

        def per_group(group: list[_Batch]) -> PyTree:
            parts = grouping.parts(group)
            try:
                return Gv_group(params, v, parts, parts)
            except _NO_VMAP:
                if not _has_stack(parts):
                    raise
            grouping.vmaps = False  # a derivative pass failed on the stacks: one by one
            return Gv_group(params, v, list(group), list(group))

        return _accumulate(
            here, data, params, reduction, progress, randomness, per_group=per_group,
            group_samples=lambda first: grouping.samples(first, _HVP_GROUP_BYTES),
        )

    return dataset_ggn_vp_fn
