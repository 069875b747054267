"""What each rank passes in: models wrapped in DistributedDataParallel, shards from a
DistributedSampler, and loaders counted (samples, the loss's normaliser) as they are read.

- DDP: a `funchess.ModuleFunction` built over a `DistributedDataParallel` model (directly; the
  function `funchess.functional` unwraps it itself) would run DDP's own collectives (buffer
  broadcasts, gradient-sync bookkeeping) inside funchess's transforms, a different number of
  times on each rank. `unwrap` swaps in the wrapped module; the parameter names (`module.` +
  name) and the tensors stay the caller's.
- `DistributedSampler(drop_last=False)` (its default) pads a data set whose size the ranks do not
  divide with duplicates of its first samples: they would count twice in every data-set sum.
  `check_sampler` refuses it and names the fixes; unequal shards are fine (funchess weights them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

from torch import Tensor

from .._errors import InvalidArgumentError
from .._tree import tree_flatten
from ._group import Ranks

__all__ = ["unwrap", "check_sampler", "Counted", "counted", "samples"]

PyTree = Any
_PREFIX = "module."


def _ddp_model(f: Any) -> Any:
    """The DistributedDataParallel model behind a `funchess.ModuleFunction`, or None."""
    import funchess

    if not isinstance(f, funchess.ModuleFunction):
        return None
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return f.model if isinstance(f.model, DistributedDataParallel) else None


def unwrap(f: Any) -> tuple[Any, Callable[[PyTree], PyTree]]:
    """`f` with a DistributedDataParallel model replaced by the module it wraps (a new
    `funchess.ModuleFunction` over `ddp.module`), and the map from the caller's params to that
    module's names (`module.` dropped; the same Tensors in the same order). Anything else comes
    back as it is, with the identity."""
    import funchess

    model = _ddp_model(f)
    if model is None:
        return f, lambda params: params

    def rename(params: PyTree) -> PyTree:
        if not isinstance(params, dict):
            return params
        return {(k[len(_PREFIX) :] if isinstance(k, str) and k.startswith(_PREFIX) else k): v for k, v in params.items()}

    # the same function over the wrapped module: every option of the constructor carried over
    options = {k: getattr(f, k) for k, p in inspect.signature(funchess.ModuleFunction).parameters.items()
               if p.kind is p.KEYWORD_ONLY and hasattr(f, k)}
    return funchess.ModuleFunction(model.module, f.loss_fn, **options), rename


def _distributed_sampler(data: Any) -> Any:
    """The DistributedSampler a DataLoader draws from (directly or inside its batch sampler)."""
    try:
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(data, DataLoader):
        return None
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def check_sampler(call: str, data: Any, ranks: Ranks) -> None:
    """Refuse a DistributedSampler that pads the data set with duplicates, or that shards for a
    different group than the call's (every rank would then not see its own shard)."""
    sampler = _distributed_sampler(data)
    if sampler is None:
        return
    if sampler.num_replicas != ranks.size or sampler.rank != ranks.rank:
        raise InvalidArgumentError(
            f"{call}: the loader's DistributedSampler has num_replicas={sampler.num_replicas}, "
            f"rank={sampler.rank}; expected num_replicas={ranks.size}, rank={ranks.rank} (this "
            f"rank of the call's group). Build the sampler with the group's size and rank."
        )
    n = len(sampler.dataset)
    if not sampler.drop_last and sampler.total_size > n:
        pad = sampler.total_size - n
        raise InvalidArgumentError(
            f"{call}: the loader's DistributedSampler pads the data set's {n} samples with {pad} "
            f"duplicate(s) so that each of the {ranks.size} ranks gets {sampler.num_samples} "
            f"(drop_last=False, its default, and {n} is not divisible by {ranks.size}); the "
            f"duplicates would count twice in the data-set sum. Expected shards without "
            f"duplicates: shard with torch.utils.data.Subset(dataset, range(rank, len(dataset), "
            f"world_size)) (unequal shards are weighted exactly), or pass drop_last=True to the "
            f"sampler (which leaves {n % ranks.size} sample(s) out)."
        )


def samples(batch: Any) -> int:
    """A batch's sample count as funchess's data-set functions count it: dim 0 of the first Tensor
    of its inputs (0 for anything they would refuse; they raise the error)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return 0
    first = next((t for t in tree_flatten(batch[0])[0] if isinstance(t, Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 0


class Counted:
    """`data`, re-iterable, counting what every pass reads: `batches`, `samples`, and `weight`,
    the sum of the loss's normaliser `W(inputs, targets, n)` over the batches (the sample count
    for most losses; the counted class weights of a weighted cross-entropy). Each pass starts the
    counts afresh, so after a pass they are that pass's; `finished` says the pass read `data` to
    its end."""

    def __init__(self, data: Iterable[Any], normaliser: Callable[[Any, Any, int], float]) -> None:
        self.data, self.normaliser = data, normaliser
        self.batches = self.samples = 0
        self.weight = 0.0
        self.finished = False

    def __iter__(self) -> Iterator[Any]:
        self.batches = self.samples = 0
        self.weight = 0.0
        self.finished = False
        for batch in self.data:
            n = samples(batch)
            if n:
                self.samples += n
                self.weight += self.normaliser(batch[0], batch[1], n)
            self.batches += 1
            yield batch
        self.finished = True


class _SizedCounted(Counted):
    def __len__(self) -> int:
        assert isinstance(self.data, Sized)
        return len(self.data)


def counted(data: Any, normaliser: Callable[[Any, Any, int], float]) -> Any:
    """`data` wrapped in a `Counted` (sized when `data` is, so progress bars keep their total);
    anything that is not an iterable of batches comes back as it is, for the single-process
    function to refuse in its own words."""
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, dict, str)):
        return data
    return _SizedCounted(data, normaliser) if isinstance(data, Sized) else Counted(data, normaliser)
