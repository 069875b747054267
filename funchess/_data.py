"""Data sets as iterables of batches: checking them, weighting them, grouping and stacking them.

`data` is any iterable of `(inputs, targets)` batches (a `DataLoader`, a list). Batch `k` has `n_k`
samples (dim 0 of its first input Tensor) and loss `f(params, inputs_k, targets_k)`. A
mean-reduced batch loss is `S_k / W_k`, a sum over its samples divided by its *normaliser*
`W_k`: the sample count for most losses, the summed class weights of the counted targets for a
cross-entropy or NLL loss with `weight=` or ignored targets (`ignore_index`). The data-set
curvature is that of `Σ_k S_k / Σ_k W_k`, so batch `k` is weighted by `W_k` and the sum divided
by `Σ_k W_k` (`accumulate` returns the sum and the normaliser, which data-parallel code adds up
across processes first). With `reduction="sum"` every weight is 1 and nothing is divided.

Consecutive batches are grouped into one derivative of `Σ_k w_k f(params, batch_k)` (per-call
costs paid once per group), and within a group equal-shaped batches are stacked and `f` is
`vmap`ped over them, while every evaluation of `f` still sees one batch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ._checks import call_f, relabel
from ._compose import RandomState, random_error, usable
from ._errors import FunchessError, InvalidArgumentError, StructureError, UnsupportedError
from ._functional import ModuleFunction
from ._memory import measure
from ._progress import iterate
from ._safe_ops import safe_ops
from ._tree import tree_flatten, tree_map, tree_unflatten

PyTree = Any
#: Groups of consecutive batches hold at least this many samples: the per-call costs (probe,
#: passes per block, mirror) are paid once per group, not per batch (benchmarks/RESULTS.md).
GROUP_SAMPLES = 1024
#: Within a group, batches of equal shapes are stacked and f is vmapped over them while the stack's
#: forward stays under this many matrix-product FLOPs; above it, per-operator costs no longer
#: dominate and stacking measured slower (benchmarks/RESULTS.md, "Data-set Hessian").
STACK_FLOPS = 2e6
#: Products evaluate groups whose saved activations stay under this many bytes.
PRODUCT_GROUP_BYTES = 256 * 2**20
#: What a data-set function's randomness error suggests.
DATA_FIX = (
    "randomness='different' (every batch draws its own random numbers, as training does, and every "
    "derivative pass of that batch replays them)"
)


# ----------------------------------------------------------------------------- normalisers


_WEIGHTED_MEAN_LOSSES = {F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss"}


def _weighted_mean_options(loss: Any) -> tuple[Tensor | None, int] | None:
    """`(weight, ignore_index)` of a cross-entropy / NLL loss (function, `functools.partial` of
    one, or module) whose mean divides by the summed weights of the counted targets; else None."""
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return (loss.weight, loss.ignore_index) if loss.reduction == "mean" else None
    keywords: dict[str, Any] = {}
    while isinstance(loss, functools.partial):
        keywords = {**loss.keywords, **keywords}
        loss = loss.func
    if loss in _WEIGHTED_MEAN_LOSSES and keywords.get("reduction", "mean") == "mean":
        return keywords.get("weight"), int(keywords.get("ignore_index", -100))
    return None


def normaliser_of(f: Callable[..., Any]) -> Callable[[Any, Any, int], float]:
    """`W(inputs, targets, n)`: what a mean-reduced batch loss of `f` divides by."""
    options = _weighted_mean_options(f.loss_fn) if isinstance(f, ModuleFunction) else None
    if options is None:
        return lambda inputs, targets, n: float(n)
    weight, ignore = options

    def W(inputs: Any, targets: Any, n: int) -> float:
        if not isinstance(targets, Tensor) or targets.is_floating_point():
            return float(n)  # class probabilities: the mean is over samples
        counted = targets != ignore
        if weight is None:
            return float(counted.sum())
        w = weight.to(targets.device)[targets.clamp(0, weight.numel() - 1)]
        return float((w * counted).sum())

    return W


# ----------------------------------------------------------------------------- the loop


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:4]}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"a {type(batch).__name__}"


def batches(
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
    total = len(data) if isinstance(data, Sized) else None
    for k, batch in enumerate(iterate(call, data, progress, total=total, desc=call.split("(")[0], unit="batch")):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise StructureError(
                f"{call}: expected every batch to be a pair (inputs, targets), got "
                f"{_describe(batch)} as batch {k}. Make the loader yield pairs, e.g. "
                f"((b['x'], b['y']) for b in loader); use (inputs, None) for a loss without targets."
            )
        inputs, targets = batch
        if any(isinstance(t, Tensor) and t.is_meta for t in tree_flatten(batch)[0]):
            raise InvalidArgumentError(
                f"{call}: batch {k} holds Tensors on the meta device, which hold shapes but no values; "
                f"expected data with values. Load the data itself (it is moved to the parameters' "
                f"device, {device})."
            )
        moved = usable(tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, (inputs, targets)))
        first = next((t for t in tree_flatten(moved[0])[0] if isinstance(t, Tensor)), None)
        if first is None or first.dim() == 0:
            raise StructureError(
                f"{call}: batch {k} has inputs {_describe(inputs)} with no Tensor holding the "
                f"samples along dim 0; expected one (its size is the batch's weight). Put the "
                f"batched input Tensor first in the inputs."
            )
        if first.shape[0] == 0:
            raise InvalidArgumentError(
                f"{call}: batch {k} has inputs of shape {tuple(first.shape)}, no samples; expected at "
                f"least one sample per batch. Leave empty batches out of the data."
            )
        seen += 1
        yield moved[0], moved[1], int(first.shape[0])
    if seen == 0:
        raise InvalidArgumentError(
            f"{call}: data yielded no batches; expected at least one (inputs, targets) batch. "
            f"Check that the data set is not empty (drop_last=True with fewer samples than "
            f"batch_size yields nothing; a generator can be iterated only once)."
        )


class Batch(NamedTuple):
    inputs: Any
    targets: Any
    n: int  # samples
    weight: float  # in the data-set sum: the normaliser W_k for mean-reduced losses (W_k x mean = sum), else 1


def grouped(batches: Iterator[Batch], samples: int | Callable[[Batch], int]) -> Iterator[list[Batch]]:
    """Consecutive batches, as groups of at least `samples` samples (the last may hold fewer);
    a callable `samples` is asked once, with the first batch."""
    group: list[Batch] = []
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


def accumulate(
    call: str,
    data: Iterable[Any],
    params: PyTree,
    reduction: str,
    progress: bool | None,
    randomness: str,
    normaliser: Callable[[Any, Any, int], float],
    per_group: Callable[[list[Batch]], PyTree],
    group_samples: int | Callable[[Batch], int] = 1,
) -> tuple[PyTree, float]:
    """`(Σ_k w_k curvature_k, Σ_k w_k)`: `per_group(batches)` is the weighted sum over a group of
    consecutive batches (`group_samples` samples or more); the caller divides by the normaliser
    for `reduction="mean"` (after adding both up across processes, in data-parallel code)."""
    device = tree_flatten(params)[0][0].device
    rng = RandomState(device)

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` refusing random numbers (randomness="error"): around the evaluations of f only, since
        iterating a DataLoader draws from the generator too (its workers' seeds)."""
        if randomness != "error":
            return fn

        def run(*args: Any) -> Any:
            with rng.guard(call, DATA_FIX):
                return fn(*args)

        return run

    total, acc = 0.0, None
    per_group = guarded(per_group)
    group_samples = guarded(group_samples) if callable(group_samples) else group_samples
    try:
        for group in grouped(
            (Batch(x, t, n, normaliser(x, t, n) if reduction == "mean" else 1.0) for x, t, n in batches(call, data, device, progress)),
            group_samples,
        ):
            got = per_group(group)
            if acc is None:
                acc = got
            else:
                tree_map(lambda a, t: a.add_(t), acc, got)
            total += sum(batch.weight for batch in group)
    except FunchessError as exc:  # an inner transform's error, told as this call's
        if str(exc).startswith(call):
            raise
        if isinstance(exc, UnsupportedError) and "draws random numbers" in str(exc):
            error = random_error(call, RuntimeError("random operation while in randomness error mode"), DATA_FIX)
            assert error is not None
            raise error from exc
        raise relabel(call, exc) from exc
    if reduction == "mean" and total == 0:
        raise InvalidArgumentError(
            f"{call}: the loss's normaliser over the whole data set is 0 (every target ignored, or all "
            f"class weights 0); expected a positive total weight. Check ignore_index and weight."
        )
    return acc, total


def mean_of(acc: PyTree, total: float, reduction: str) -> PyTree:
    """The data-set result from `accumulate`'s sum: divided by the normaliser for "mean"."""
    if reduction == "mean":
        tree_map(lambda a: a.div_(total), acc)
    return acc


def apply(f: Callable[..., Any], params: PyTree, inputs: Any, targets: Any) -> Any:
    return f(params, inputs) if targets is None else f(params, inputs, targets)


class Stack:
    """Batches of one structure and shapes, stacked along a new dim 0: `Σ_k w_k f(params, batch_k)`
    as one `vmap` over the batches (each evaluation of f still sees one batch)."""

    def __init__(self, batches: list[Batch], randomness: str) -> None:
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
        return self.over(lambda x, t: apply(f, params, x, t))

    def loss(self, f: Callable[..., Any], params: PyTree) -> Tensor:
        losses: Tensor = self.losses(f, params)
        return (losses * losses.new_tensor(self.weights)).sum()


def group_loss(f: Callable[..., Any], params: PyTree, parts: list[Batch | Stack]) -> Any:
    """`Σ_k w_k f(params, inputs_k, targets_k)` over a group: each evaluation of f sees one batch."""
    total = None
    for part in parts:
        if isinstance(part, Stack):
            loss = part.loss(f, params)
        else:
            loss = apply(f, params, part.inputs, part.targets)
            if not isinstance(loss, Tensor):
                return loss  # the derivative says what it expected
            loss = loss * part.weight
        total = loss if total is None else total + loss
    return total


def _signature(batch: Batch) -> Any:
    """Batches with equal signatures stack: same structure, Tensor shapes/dtypes/devices, constants."""
    leaves, spec = tree_flatten((batch.inputs, batch.targets))
    key = (spec, tuple((l.shape, l.dtype, l.device) if isinstance(l, Tensor) else ("constant", l) for l in leaves))
    try:
        hash(key)
    except TypeError:  # an unhashable constant: this batch goes alone
        return None
    return key


def _stacked(group: list[Batch], flops_per_sample: float, limit: float, randomness: str) -> list[Batch | Stack]:
    """The group as `Stack`s of equal-signature batches whose forward stays under `limit` FLOPs,
    and the batches that stack with no other."""
    runs: dict[Any, list[list[Batch]]] = {}
    alone: list[Batch | Stack] = []
    for batch in group:
        key = _signature(batch)
        if key is None:
            alone.append(batch)
            continue
        stacks = runs.setdefault(key, [[]])
        if stacks[-1] and (sum(b.n for b in stacks[-1]) + batch.n) * flops_per_sample > limit:
            stacks.append([])
        stacks[-1].append(batch)
    parts: list[Batch | Stack] = [
        Stack(s, randomness) if len(s) > 1 else s[0] for stacks in runs.values() for s in stacks
    ]
    return parts + alone


def has_stack(parts: list[Batch | Stack]) -> bool:
    return any(isinstance(p, Stack) for p in parts)


def differentiable_params(params: PyTree) -> PyTree:
    """Parameters that require grad, as inside the derivative passes (fused fast paths, such as
    `nn.MultiheadAttention`'s inference kernel, are then not taken)."""
    return tree_map(lambda p: p.detach().requires_grad_(True), params)


class Grouping:
    """One call's grouping of batches: what f costs per sample (FLOPs and the bytes autograd saves,
    measured on the first batch), and whether f evaluates under `vmap` over stacked batches."""

    def __init__(self, f: Callable[..., Any], params: PyTree, randomness: str, stack_flops: float, call: str = "f") -> None:
        self.f, self.params, self.stack_flops, self.call = f, params, stack_flops, call
        self.randomness = "error" if randomness == "error" else "different"
        self.flops = self.saved = 0.0
        self.measured = False
        self.vmaps: bool | None = None  # None: not yet tried on a stack

    def measure(self, batch: Batch) -> None:
        """Matrix-product FLOPs (convolutions counted twice, as in the joint-pass rule: they gain
        less from larger operands) and saved bytes of f per sample, on one batch."""
        if self.measured:
            return
        with safe_ops():
            cost = measure(lambda: call_f(self.call, apply, self.f, differentiable_params(self.params), batch.inputs, batch.targets))
        n = max(batch.n, 1)
        self.flops, self.saved, self.measured = (cost.flops + cost.conv_flops) / n, cost.saved_bytes / n, True

    def samples(self, batch: Batch, limit_bytes: float) -> int:
        """Samples per group whose saved activations stay under `limit_bytes` (at most 1,024)."""
        self.measure(batch)
        return int(max(1, min(GROUP_SAMPLES, limit_bytes // max(self.saved, 1.0))))

    def parts(self, group: list[Batch]) -> list[Batch | Stack]:
        """The group with equal-shaped batches stacked where f vmaps over them; else its batches."""
        self.measure(group[0])
        if self.vmaps is not False:
            parts = _stacked(group, self.flops, self.stack_flops, self.randomness)
            if not has_stack(parts):
                return parts
            if self.vmaps is None:  # checked on the first stacks; a later failure falls back too
                self.vmaps = self._vmaps(parts)
            if self.vmaps:
                return parts
        return list(group)

    def _vmaps(self, parts: list[Batch | Stack]) -> bool:
        """Whether f evaluates under `vmap` over every stack as it does batch by batch: one scalar
        loss per batch, no error (recurrent layers have no batching rule), and no operator falling
        back to torch's slow per-batch loop. Run as the derivative passes run: with grad and
        funchess's rerouting of norms and attention."""
        with torch.inference_mode(False), torch.enable_grad(), safe_ops(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*batching rule", category=UserWarning)
            try:
                for part in parts:
                    if isinstance(part, Stack):
                        losses = part.losses(self.f, differentiable_params(self.params))
                        if not isinstance(losses, Tensor) or tuple(losses.shape) != (len(part.weights),):
                            return False
            except (UserWarning, RuntimeError, NotImplementedError, UnsupportedError):
                return False
        return True


NO_VMAP = (RuntimeError, NotImplementedError, UnsupportedError)  # a pass failing on stacked batches


