"""The caller's process group: which ranks take part, collectives under the group's timeout, the
entry check that every rank made the same call, and failures shared so that no rank waits.

Every collective funchess runs goes through this module. A collective is `torch.distributed`'s
own (no other transport), on the group the caller passes (`None`: the default group), and runs
under that group's timeout (`init_process_group(timeout=...)` or `new_group(timeout=...)`); a
failure or a timeout becomes a `DistributedError` that says which call and which rank.

Two rules keep ranks from hanging:

- On entry, the ranks `agree`: one small MAX all-reduce compares a digest of everything that must
  match (the call and its options, parameter names, shapes, dtypes, sampled parameter values) and
  a flag for an error found locally before any work. On a mismatch every rank raises, with the
  difference spelled out (the details are gathered only then).
- After local work, a failure flag rides in the result's own all-reduce (`share_failure`), so a
  rank whose computation raised still takes part and every rank raises.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._errors import FunchessError, InvalidArgumentError, StructureError

__all__ = ["DistributedError", "Ranks", "ranks_of", "agree", "share_failure"]

T = TypeVar("T")
#: sampled entries per Tensor in the entry check (evenly spaced, first and last included)
_SAMPLES = 16
#: relative tolerance of the float64 sums in the entry check (sums over different thread counts
#: differ by rounding, ~1e-16 sqrt(n); a different parameter differs by far more)
_SUM_RTOL = 1e-10
#: " at 0x7f..." in reprs of functions differs between processes
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class DistributedError(FunchessError, RuntimeError):
    """A collective of a `funchess.distributed` call failed or timed out, or another rank failed.

    Raised when a rank does not reach a collective within the group's timeout (it stopped, raised
    outside funchess, or made a different call), when the connection to another rank is lost, or
    on every other rank when one rank's computation raised something other than a funchess error.

    Example:
        >>> import funchess.distributed
        >>> issubclass(funchess.distributed.DistributedError, RuntimeError)
        True
    """


@dataclass(frozen=True)
class Ranks:
    """The process group of one call: this process's rank in it, its size and its backend."""

    group: Any  # a torch.distributed.ProcessGroup, or None for the default group
    rank: int
    size: int
    backend: str

    def comm_device(self, device: torch.device) -> torch.device:
        """Where a Tensor on `device` must be for this group's backend: NCCL needs CUDA, gloo the
        CPU; a per-device backend ("cpu:gloo,cuda:nccl") takes either."""
        kinds = dict(part.split(":", 1) for part in self.backend.split(",")) if ":" in self.backend else {}
        if kinds:
            if device.type in kinds:
                return device
            return torch.device("cuda", torch.cuda.current_device()) if "cuda" in kinds else torch.device("cpu")
        if self.backend == "nccl":
            return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        if self.backend == "gloo":
            return torch.device("cpu")
        return device

    def global_rank(self, rank: int) -> int:
        """The default group's rank of this group's `rank` (collectives name ranks globally)."""
        if self.group is None:
            return rank
        import torch.distributed as dist

        return int(dist.get_global_rank(self.group, rank))

    def timeout(self) -> str:
        """The group's timeout in words, for messages."""
        seconds = _timeout_seconds(self.group)
        return "the group's timeout" if seconds is None else f"the group's timeout ({seconds:g} s)"


def _timeout_seconds(group: Any) -> float | None:
    import torch.distributed as dist

    try:  # private in torch 2.x; only used to word the message
        pg: Any = group if group is not None else dist.group.WORLD
        timeout = pg._get_backend(torch.device("cpu")).options._timeout
        return float(timeout.total_seconds()) if isinstance(timeout, datetime.timedelta) else None
    except Exception:  # noqa: BLE001 - any failure just drops the number from the message
        return None


def ranks_of(call: str, group: Any) -> Ranks | None:
    """The ranks of `group`, or None to run as one process (torch.distributed is not available or
    its default group is not initialised, and no group was passed)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise InvalidArgumentError(
                f"{call}: got group={group!r} but torch.distributed has no initialised process "
                f"group; expected one. Call torch.distributed.init_process_group first (torchrun "
                f"sets up the environment), or pass group=None to run as one process."
            )
        return None
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise InvalidArgumentError(
            f"{call}: expected group to be a torch.distributed.ProcessGroup (e.g. from "
            f"torch.distributed.new_group) or None for the default group, got {type(group).__name__}."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidArgumentError(
            f"{call}: this process (global rank {dist.get_rank()}) is not a member of the group "
            f"passed; expected a group that contains it. Call funchess.distributed functions only "
            f"on the ranks of the group."
        )
    return Ranks(group, rank, dist.get_world_size(group), str(dist.get_backend(group)))


# ----------------------------------------------------------------------------- collectives


def collective(call: str, ranks: Ranks, what: str, run: Callable[[], T]) -> T:
    """Run one torch.distributed collective; a failure or timeout becomes a DistributedError."""
    try:
        return run()
    except RuntimeError as exc:  # gloo/NCCL timeouts and lost peers (DistBackendError is one)
        raise DistributedError(
            f"{call}: the {what} failed on rank {ranks.rank} of {ranks.size} ({type(exc).__name__}: "
            f"{_first_line(exc)}); it waits up to {ranks.timeout()}. Expected every rank of the "
            f"group to make the same funchess.distributed call: a rank that stopped, raised "
            f"elsewhere, or called something else leaves the others waiting. Check the other "
            f"ranks' logs."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _on(ranks: Ranks, t: Tensor) -> Tensor:
    device = ranks.comm_device(t.device)
    return t if t.device == device else t.to(device)


def all_reduce(call: str, ranks: Ranks, t: Tensor, op: str = "sum", what: str = "all-reduce") -> Tensor:
    """`t` summed (or maxed) over the ranks, on `t`'s device (`t` itself when no move was needed)."""
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    buf = _on(ranks, t)
    collective(call, ranks, what, lambda: dist.all_reduce(buf, op=reduce_op, group=ranks.group))
    return buf if buf is t else buf.to(t.device)


class Pending:
    """An all-reduce whose result is read later with `wait()`. It runs to completion when made
    (not `async_op=True`): overlapping it with the local products saved little, and an
    asynchronous gloo work still in flight when a process ends aborts it."""

    def __init__(self, call: str, ranks: Ranks, t: Tensor, op: str, what: str) -> None:
        self.result = all_reduce(call, ranks, t, op, what)

    def wait(self) -> Tensor:
        return self.result


def broadcast(call: str, ranks: Ranks, t: Tensor, src: int, what: str) -> Tensor:
    """`t` from group rank `src` to every rank (in place where the backend allows)."""
    import torch.distributed as dist

    buf = _on(ranks, t)
    src_global = ranks.global_rank(src)
    collective(call, ranks, what, lambda: dist.broadcast(buf, src=src_global, group=ranks.group))
    if buf is not t:
        t.copy_(buf)
    return t


def send(call: str, ranks: Ranks, t: Tensor, dst: int, what: str) -> None:
    """Point-to-point: `t` to group rank `dst`."""
    import torch.distributed as dist

    buf = _on(ranks, t)
    collective(call, ranks, what, lambda: dist.send(buf, dst=ranks.global_rank(dst), group=ranks.group))


def recv(call: str, ranks: Ranks, t: Tensor, src: int, what: str) -> Tensor:
    """Point-to-point: fill `t` from group rank `src`."""
    import torch.distributed as dist

    buf = _on(ranks, t)
    collective(call, ranks, what, lambda: dist.recv(buf, src=ranks.global_rank(src), group=ranks.group))
    if buf is not t:
        t.copy_(buf)
    return t


def gather_objects(call: str, ranks: Ranks, obj: Any, what: str) -> list[Any]:
    """Every rank's `obj` (pickled; only on the failure paths, where speed does not matter)."""
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.size
    collective(call, ranks, what, lambda: dist.all_gather_object(out, obj, group=ranks.group))
    return out


# ----------------------------------------------------------------------------- the entry check


def _digest(text: str) -> list[float]:
    """Four 48-bit pieces of the SHA-256 of `text`, exact in float64."""
    raw = hashlib.sha256(text.encode()).digest()
    return [float(int.from_bytes(raw[6 * i : 6 * i + 6], "big")) for i in range(4)]


def _sampled(t: Tensor) -> Tensor:
    """`_SAMPLES` evenly spaced entries of `t` (first and last included), as float64."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= _SAMPLES:
        return flat.double()
    idx = torch.linspace(0, flat.numel() - 1, _SAMPLES, device=flat.device).round().long()
    return flat[idx].double()


def _fingerprint(tensors: Sequence[tuple[str, Tensor]]) -> tuple[str, float, float]:
    """The sampled entries (as text, hashed exactly) and a weighted float64 sum with its scale."""
    text, total, scale = [], 0.0, 0.0
    for i, (label, t) in enumerate(tensors):
        text.append(f"{label}:{_sampled(t).cpu().tolist()}")
        d = t.detach().double()
        total += (i + 1) * float(d.sum())
        scale += (i + 1) * float(d.abs().sum())
    return "\n".join(text), total, scale


def agree(
    call: str,
    ranks: Ranks,
    items: Sequence[tuple[str, str]],
    tensors: Sequence[tuple[str, Tensor]] = (),
    error: Exception | None = None,
) -> None:
    """Return on every rank if all passed equal `items` and `tensors` and none has an `error`;
    else raise on every rank (the rank with the error re-raises it).

    `items` are `(what, description)` pairs that must be equal as text (the call, options, names,
    shapes, dtypes); `tensors` must hold equal values (parameters, a vector, shared data): their
    sampled entries are compared exactly, their sums to rounding. One MAX all-reduce of a few
    numbers; the descriptions are gathered only after a mismatch, to say what differs."""
    values_text, total, scale = _fingerprint(tensors)
    digest = _digest("\n".join(f"{k}={v}" for k, v in items) + "\n" + values_text)
    flag = 1.0 if error is not None else 0.0
    local = torch.tensor([flag, *digest, total], dtype=torch.float64)
    got = all_reduce(call, ranks, torch.cat([local, -local, torch.tensor([scale], dtype=torch.float64)]), "max",
                     "entry check")
    k = local.numel()
    high, low, top_scale = got[:k], -got[k : 2 * k], float(got[-1])
    failed = bool(high[0] > 0)
    differ = bool((high[1:-1] != low[1:-1]).any()) or float(high[-1] - low[-1]) > _SUM_RTOL * top_scale
    if not failed and not differ:
        return
    mine = {"items": list(items), "values": values_text, "sum": total,
            "error": None if error is None else (type(error).__name__, str(error))}
    every = gather_objects(call, ranks, mine, "entry check's details")
    if error is not None:
        raise error
    if failed:
        raise _from_rank(call, every)
    raise _mismatch(call, every)


def _from_rank(call: str, every: list[dict[str, Any]]) -> FunchessError:
    """The error to raise on a rank that did not fail: the failing rank's, with its rank named."""
    r, (name, text) = next((r, e["error"]) for r, e in enumerate(every) if e["error"] is not None)
    cls = _funchess_class(name)
    return cls(
        f"{call}: rank {r} raised {name}: {text} Every rank stops here, so that none waits for "
        f"the others; fix the call on rank {r}."
    )


def _funchess_class(name: str) -> type[FunchessError]:
    """The funchess error class called `name` (so that every rank raises the same type), else
    DistributedError."""
    import funchess

    cls = getattr(funchess, name, None)
    if isinstance(cls, type) and issubclass(cls, FunchessError):
        return cls
    return DistributedError


def _mismatch(call: str, every: list[dict[str, Any]]) -> StructureError:
    first = every[0]
    for r, other in enumerate(every[1:], 1):
        for (what, mine), (_, theirs) in zip(first["items"], other["items"]):
            if mine != theirs:
                return StructureError(
                    f"{call}: expected every rank to pass the same {what}, got {mine} on rank 0 and "
                    f"{theirs} on rank {r}. Make the same call with the same arguments on every "
                    f"rank of the group (only each rank's data loader differs)."
                )
        if len(first["items"]) != len(other["items"]):
            return StructureError(
                f"{call}: expected every rank to make the same call, got {len(first['items'])} "
                f"checked items on rank 0 and {len(other['items'])} on rank {r}. Make the same call "
                f"with the same arguments on every rank."
            )
    r = next((r for r, e in enumerate(every) if e["values"] != first["values"] or not _close(e["sum"], first["sum"])), 1)
    return StructureError(
        f"{call}: expected every rank to pass equal values (the parameters, and the vector or "
        f"data where the call takes one), got different values on rank 0 and rank {r} (sampled "
        f"entries or sums differ). Broadcast the parameters from rank 0 "
        f"(torch.distributed.broadcast; DistributedDataParallel does it when it wraps the model), "
        f"and seed every rank's random vectors the same."
    )


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SUM_RTOL, abs_tol=0.0)


def share_failure(call: str, ranks: Ranks, failed: bool, error: Exception | None) -> None:
    """After a result's all-reduce carried the failure flags: raise on every rank if any failed
    (`failed`: the reduced flag; `error`: this rank's own exception, re-raised here)."""
    if not failed:
        return
    mine: dict[str, Any] = {"error": None if error is None else (type(error).__name__, str(error)), "items": [],
                            "values": "", "sum": 0.0}
    every = gather_objects(call, ranks, mine, "failure report")
    if error is not None:
        raise error
    raise _from_rank(call, every)


def signature(call: str, f: Any, params: Any, *extra: tuple[str, Any]) -> list[tuple[str, str]]:
    """The items every rank must agree on: the call (with its options), the function, the
    parameter names, shapes and dtypes, the group size, and `extra` items."""
    from .._tree import tree_flatten

    leaves, spec = tree_flatten(params)
    layout = [
        (".".join(str(k) for k in path), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        for path, t in zip(spec.paths(), leaves)
        if isinstance(t, Tensor)
    ]
    own_repr = type(f).__repr__ is not object.__repr__  # type: ignore[comparison-overlap]
    fn = repr(f) if own_repr else getattr(f, "__qualname__", type(f).__name__)
    items = [("call", call), ("function f", fn), ("parameter names, shapes and dtypes", str(layout)),
             *((k, str(v)) for k, v in extra)]
    return [(k, _ADDRESS.sub("", v)) for k, v in items]
