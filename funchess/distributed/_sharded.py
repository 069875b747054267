"""One full Hessian whose blocks are computed on different ranks: the upper triangle of parameter
pairs `(a, b)` split by cost, each rank computing its pairs with `funchess.hessian(f,
blocks=[...])`, then gathered to every rank, to rank 0, or kept where they are (a
`ShardedHessian`).

Cost model: the engine computes the rows of a parameter `a` against the columns of all its pairs
in one pass per chunk of rows, so a pair costs `rows(a) * cols(b)` for the entries it writes plus,
once per rank for each row parameter it holds, `rows(a) * c` for the passes (`c`: about four
forward passes per row, from the FLOPs of one forward, counted once). Pairs go, largest first, to
the rank whose load grows least (greedy, deterministic, the same on every rank).

Memory: every rank plans its own blocks with `funchess.plan_hessian` and adds what gathering needs
(the full `N x N` matrix where it is assembled, plus its packed blocks and one rank's packed
blocks in flight); the ranks exchange these sizes before anything is computed, and if any rank
would not fit, every rank raises the same sized `MemoryBudgetError`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

import funchess

from .._errors import InvalidArgumentError, MemoryBudgetError
from .._tree import from_matrix, offsets, promoted_dtype, tree_flatten
from ._core import format_bytes
from ._data import label
from ._group import Ranks, agree, all_reduce, broadcast, ranks_of, recv, send, share_failure, signature
from ._inputs import unwrap
from ._operator import AllReduced

__all__ = ["sharded_hessian", "ShardedHessian"]

PyTree = Any
Gather = Literal["all", "rank0", "none"]
Pair = tuple[int, int]
_OPTIONS = ("mode", "chunk_size", "max_memory")
#: one row of a Hessian pass costs about this many forward passes (a double backward)
_PASSES_PER_ROW = 4.0


def _literal(name: str) -> str:
    """A parameter name as an fnmatch pattern that matches only itself."""
    return re.sub(r"([\[*?])", r"[\1]", name)


def assign(sizes: list[int], row_cost: float, world: int) -> dict[Pair, int]:
    """The rank of every upper-triangle pair `(i <= j)`, balancing the cost model's loads."""
    pairs = [(i, j) for i in range(len(sizes)) for j in range(i, len(sizes))]
    pairs.sort(key=lambda p: (-(sizes[p[0]] * (row_cost + sizes[p[1]])), p))
    load = [0.0] * world
    rows_held: list[set[int]] = [set() for _ in range(world)]
    owner: dict[Pair, int] = {}
    for i, j in pairs:
        def grown(r: int) -> float:
            return sizes[i] * sizes[j] + (0.0 if i in rows_held[r] else sizes[i] * row_cost)

        r = min(range(world), key=lambda r: (load[r] + grown(r), r))
        load[r] += grown(r)
        rows_held[r].add(i)
        owner[(i, j)] = r
    return owner


def _forward_flops(f: Callable[..., Any], params: PyTree, data: tuple[Any, ...]) -> int:
    """The matrix-product FLOPs of one forward (0 when f cannot be counted: then the cost model
    falls back to the parameter count per row; f's own errors surface in the Hessian)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            f(params, *data)
    except Exception:  # noqa: BLE001 - only an estimate
        return 0
    return int(counter.get_total_flops())


class ShardedHessian:
    """A Hessian whose blocks live on different ranks, from `sharded_hessian(f, gather="none")`.

    Blocks are the upper triangle of parameter pairs `(a, b)` in `funchess.ravel` order (the
    lower ones are their transposes); `owners` says which rank holds each, `blocks` holds this
    rank's. `gather()` assembles the full Hessian (a collective: every rank calls it), and
    `operator()` multiplies by it without assembling it: each rank multiplies its own blocks,
    then one all-reduce per batch of vectors, so `funchess.eigsh` runs on a Hessian no single
    rank holds.

    Attributes:
        names: parameter names, in `funchess.ravel` order.
        owners: `{(a, b): rank}` for every upper-triangle pair.
        blocks: `{(a, b): block}` for this rank's pairs; block shape `(*params[a].shape,
            *params[b].shape)`.
        rank, world_size: this rank and the group's size.

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> S = funchess.distributed.sharded_hessian(f, gather="none")(params, x, y)
        >>> S.owner("weight", "bias"), sorted(S.blocks)
        (0, [('bias', 'bias'), ('weight', 'bias'), ('weight', 'weight')])
        >>> H = S.gather()
        >>> torch.allclose(funchess.to_matrix(H), funchess.to_matrix(funchess.hessian(f)(params, x, y)))
        True
    """

    def __init__(
        self, call: str, params: PyTree, names: list[str], owners: dict[Pair, int], blocks: dict[Pair, Tensor],
        ranks: Ranks | None, budget: int | None,
    ) -> None:
        self._call, self._params, self._ranks, self._budget = call, params, ranks, budget
        leaves = tree_flatten(params)[0]
        self._shapes = [t.shape for t in leaves]
        self._sizes = [t.numel() for t in leaves]
        self._off = offsets(self._shapes)
        self._dtype = promoted_dtype(leaves)
        self._device = leaves[0].device
        self._index = {n: i for i, n in enumerate(names)}
        self._owners, self._blocks = owners, blocks
        self.names = list(names)
        self.rank = 0 if ranks is None else ranks.rank
        self.world_size = 1 if ranks is None else ranks.size
        self.owners = {(names[i], names[j]): r for (i, j), r in owners.items()}
        self.blocks = {(names[i], names[j]): b for (i, j), b in blocks.items()}

    def __repr__(self) -> str:
        return (f"funchess.distributed.ShardedHessian(N={self._off[-1]}, blocks={len(self._blocks)} of "
                f"{len(self._owners)} on rank {self.rank} of {self.world_size})")

    def _pair(self, a: str, b: str) -> tuple[Pair, bool]:
        for name in (a, b):
            if name not in self._index:
                raise InvalidArgumentError(
                    f"ShardedHessian.owner({a!r}, {b!r}): {name!r} is not a parameter name; "
                    f"expected one of {self.names[:6]}{'...' if len(self.names) > 6 else ''}."
                )
        i, j = self._index[a], self._index[b]
        return ((i, j), False) if i <= j else ((j, i), True)

    def owner(self, a: str, b: str) -> int:
        """The rank that holds block `(a, b)` (or its mirror `(b, a)`)."""
        return self._owners[self._pair(a, b)[0]]

    def block(self, a: str, b: str) -> Tensor:
        """Block `H[a][b]` of shape `(*params[a].shape, *params[b].shape)`, if this rank holds it
        (or its mirror, transposed)."""
        pair, mirrored = self._pair(a, b)
        if pair not in self._blocks:
            raise InvalidArgumentError(
                f"ShardedHessian.block({a!r}, {b!r}): rank {self.rank} does not hold this block; "
                f"expected a block of this rank (rank {self._owners[pair]} holds it). Ask that "
                f"rank, or gather() the Hessian."
            )
        blk = self._blocks[pair]
        if not mirrored:
            return blk
        i, j = pair
        return blk.reshape(self._sizes[i], self._sizes[j]).T.reshape(*self._shapes[j], *self._shapes[i])

    # ------------------------------------------------------------------ gathering

    def _packed_sizes(self) -> list[int]:
        per = [0] * self.world_size
        for (i, j), r in self._owners.items():
            per[r] += self._sizes[i] * self._sizes[j]
        return per

    def gather_bytes(self, to: str, rank: int) -> int:
        """Bytes that gathering `to` needs on `rank` on top of its blocks: the `N x N` result where
        it is assembled, and the packed blocks in flight."""
        item = torch.empty(0, dtype=self._dtype).element_size()
        per = self._packed_sizes()
        n = self._off[-1]
        if to == "none":
            return 0
        if to == "all" or rank == 0:
            return (n * n + per[rank] + max(per)) * item
        return per[rank] * item

    def _pack(self) -> Tensor:
        mine = sorted(p for p, r in self._owners.items() if r == self.rank)
        if not mine:
            return torch.empty(0, dtype=self._dtype, device=self._device)
        return torch.cat([self._blocks[p].reshape(-1).to(self._dtype) for p in mine])

    def _unpack(self, M: Tensor, r: int, buf: Tensor) -> None:
        at = 0
        for i, j in sorted(p for p, q in self._owners.items() if q == r):
            ri, cj = self._sizes[i], self._sizes[j]
            blk = buf[at : at + ri * cj].view(ri, cj)
            at += ri * cj
            M[self._off[i] : self._off[i + 1], self._off[j] : self._off[j + 1]] = blk
            if i != j:
                M[self._off[j] : self._off[j + 1], self._off[i] : self._off[i + 1]] = blk.T

    def gather(self, to: Literal["all", "rank0"] = "all", *, max_memory: int | float | str | None = None) -> PyTree | None:
        """The full Hessian (the block pytree of `funchess.hessian`) on every rank (`to="all"`) or
        on rank 0 (`to="rank0"`; None elsewhere). A collective: every rank must call it.

        Raises a sized `MemoryBudgetError` on every rank, before anything moves, if a rank could
        not hold what gathering needs there (`gather_bytes`) within `max_memory` (bytes or "4GiB";
        default: the budget of the `sharded_hessian` call, 80 % of free memory unless its
        `max_memory` said otherwise)."""
        call = f"{self._call}.gather(to={to!r})"
        if to not in ("all", "rank0"):
            raise InvalidArgumentError(f"{call}: expected to='all' or 'rank0', got {to!r}.")
        if max_memory is not None:
            budget = _budget(call, max_memory, self._device)
        else:
            budget = self._budget if self._budget is not None else _budget(call, None, self._device)
        _exchange_memory(call, self._ranks, 0, self.gather_bytes(to, self.rank), budget, to, None)
        return self._gather(call, to)

    def _gather(self, call: str, to: str) -> PyTree | None:
        n = self._off[-1]
        per = self._packed_sizes()
        packed = self._pack()
        if to == "rank0" and self.rank != 0:
            assert self._ranks is not None
            send(call, self._ranks, packed, 0, "send of this rank's blocks")
            return None
        M = torch.empty(n, n, dtype=self._dtype, device=self._device)
        for r in range(self.world_size):
            if r == self.rank:
                buf = packed
                if to == "all" and self._ranks is not None:
                    broadcast(call, self._ranks, buf, r, f"broadcast of rank {r}'s blocks")
            else:
                assert self._ranks is not None
                buf = torch.empty(per[r], dtype=self._dtype, device=self._device)
                if to == "all":
                    broadcast(call, self._ranks, buf, r, f"broadcast of rank {r}'s blocks")
                else:
                    recv(call, self._ranks, buf, r, f"receive of rank {r}'s blocks")
            self._unpack(M, r, buf)
            del buf
        return from_matrix(M, self._params)

    def operator(self) -> funchess.LinearOperator:
        """This Hessian as a `funchess.LinearOperator` whose products all-reduce (every rank calls
        them together; the vectors must be the same on every rank, as for `dataset_operator`)."""
        return _ShardedOperator(self)


class _ShardedOperator(AllReduced):
    """`H @ x` for a ShardedHessian: each rank multiplies its own blocks (and their mirrors)."""

    def __init__(self, H: ShardedHessian) -> None:
        super().__init__(f"{H._call}.operator()", H._params, H._ranks, "sum", dtype=H._dtype, device=H._device)
        self.H = H

    def _local(self, call: str, rows: Tensor) -> tuple[Tensor, float, int]:
        H, o = self.H, self.H._off
        out = torch.zeros_like(rows)
        for (i, j), blk in H._blocks.items():
            B = blk.reshape(H._sizes[i], H._sizes[j]).to(self.dtype)
            out[:, o[i] : o[i + 1]] += rows[:, o[j] : o[j + 1]] @ B.T
            if i != j:
                out[:, o[j] : o[j + 1]] += rows[:, o[i] : o[i + 1]] @ B
        return out, 1.0, 1  # nothing is divided with "sum"


def _budget(call: str, max_memory: int | float | str | None, device: torch.device) -> int:
    """`max_memory` in bytes, or 80 % of the device's free memory: the budget funchess's planner
    uses, read from the plan of a one-entry Hessian (so it parses sizes the same way)."""
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, float, str))):
        raise InvalidArgumentError(f"{call}: expected max_memory to be bytes or a size like '4GiB', got {max_memory!r}.")
    plan = funchess.plan_hessian(lambda w: (w * w).sum(), max_memory=max_memory)
    return int(plan(torch.zeros(1, device=device)).budget_bytes)


def _exchange_memory(
    call: str, ranks: Ranks | None, peak: int, need: int, budget: int, gather: str, error: Exception | None
) -> None:
    """Every rank's compute peak, gather need and budget, exchanged (one all-reduce); every rank
    raises the same sized error if any rank would not fit (or failed while planning)."""
    world = 1 if ranks is None else ranks.size
    rank = 0 if ranks is None else ranks.rank
    table = torch.zeros(world, 4, dtype=torch.float64)
    table[rank] = torch.tensor([0.0 if error is None else 1.0, peak, need, budget], dtype=torch.float64)
    if ranks is not None:
        table = all_reduce(call, ranks, table, what="exchange of memory plans")
        share_failure(call, ranks, bool(table[:, 0].sum() > 0), error)
    elif error is not None:
        raise error
    over = [(r, float(table[r, 1]), float(table[r, 2]), float(table[r, 3])) for r in range(world)
            if table[r, 1] + table[r, 2] > table[r, 3]]
    if not over:
        return
    r, p, g, b = over[0]
    what = (f"its blocks need {format_bytes(p)} to compute" if p > b else
            f"its blocks ({format_bytes(p)} to compute) and gathering to={gather!r} ({format_bytes(g)}: the full "
            f"matrix where it is assembled and the packed blocks in flight) need {format_bytes(p + g)}")
    fixes = ("gather='rank0' (only rank 0 holds the matrix) or gather='none' (keep the blocks where they are; "
             "ShardedHessian.operator() multiplies without assembling), " if g and p <= b else "")
    raise MemoryBudgetError(
        f"{call}: rank {r} of {world} would not fit its memory budget: {what}, of a budget of "
        f"{format_bytes(b)}; expected every rank to fit before anything is computed or gathered. "
        f"Use {fixes}more ranks (smaller shares), or a larger max_memory."
    )


def sharded_hessian(
    f: Callable[..., Any], *, gather: Gather = "all", group: Any = None, **hessian_options: Any
) -> Callable[..., Any]:
    """One full Hessian with its blocks computed on different ranks, balanced by cost.

    `sharded_hessian(f)(params, *data)` is `funchess.hessian(f)(params, *data)` (every rank
    passes the same `params` and `data`): the upper-triangle parameter pairs `(a, b)` are split
    across the ranks by estimated cost, each rank computes its pairs with `funchess.hessian(f,
    blocks=[...])`, and the blocks (mirrored for the lower triangle) are gathered:

    - `gather="all"`: every rank returns the block pytree (one broadcast per rank's blocks);
    - `gather="rank0"`: rank 0 returns it, other ranks return None (point-to-point sends);
    - `gather="none"`: every rank returns a `ShardedHessian` holding its own blocks, which says
      which rank holds which block and can `gather()` later or multiply (`operator()`).

    Every rank plans its blocks with `funchess.plan_hessian` and adds what gathering needs; the
    plans are exchanged first, and if any rank would not fit its budget (`max_memory`, default 80 %
    of its device's free memory) every rank raises the same sized `MemoryBudgetError` before
    anything is computed. Without an initialised process group it runs as one rank.

    Args:
        f: a scalar function of `(params, *data)`, e.g. from `funchess.functional` (a
            `DistributedDataParallel` model is unwrapped).
        gather: "all" (default), "rank0" or "none".
        group: the `torch.distributed` process group; None is the default group.
        **hessian_options: `mode`, `chunk_size`, `max_memory`, as for `funchess.hessian` (per rank).

    Returns:
        The Hessian block pytree; None on ranks other than 0 with gather="rank0"; a
        `ShardedHessian` with gather="none".

    Raises:
        StructureError: the ranks' calls, parameters or data differ (every rank raises).
        MemoryBudgetError: some rank's blocks or its share of the gathering would not fit.
        InvalidArgumentError: a bad gather or option (blocks=, argnums=, has_aux= are not taken).

    Example:
        >>> import torch, funchess, funchess.distributed
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(6, 3), torch.randn(6, 2)
        >>> H = funchess.distributed.sharded_hessian(f)(params, x, y)
        >>> torch.allclose(funchess.to_matrix(H), funchess.to_matrix(funchess.hessian(f)(params, x, y)), atol=1e-6)
        True
    """
    call = label("sharded_hessian", **({"gather": gather} if gather != "all" else {}), **hessian_options)
    if gather not in ("all", "rank0", "none"):
        raise InvalidArgumentError(
            f"{call}: expected gather to be 'all' (every rank), 'rank0' or 'none' (keep the blocks "
            f"sharded), got {gather!r}."
        )
    unknown = [k for k in hessian_options if k not in _OPTIONS]
    if unknown:
        raise InvalidArgumentError(
            f"{call}: got option {unknown[0]!r}; expected only {', '.join(_OPTIONS)} (the blocks are "
            f"chosen by the sharding, and the Hessian is w.r.t. params). For chosen blocks on one "
            f"process use funchess.hessian(f, blocks=...)."
        )
    if not callable(f):
        raise InvalidArgumentError(f"{call}: expected f to be callable, got {type(f).__name__}.")
    inner, rename = unwrap(f)
    opts = dict(hessian_options)

    @functools.wraps(f)
    def sharded_hessian_fn(params: PyTree, *data: Any) -> Any:
        here = f"{call}(params, *data)"
        ranks = ranks_of(here, group)
        p = rename(params)
        error: Exception | None = None
        flops = 0
        try:
            leaves, spec = tree_flatten(p)
            if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
                raise InvalidArgumentError(
                    f"{here}: expected params to be a non-empty pytree of floating-point Tensors, "
                    f"got {type(params).__name__}."
                )
            flops = _forward_flops(inner, p, data)
        except Exception as exc:  # shared in the entry check
            error = exc
            if ranks is None:
                raise
        if ranks is not None:
            data_leaves = [t for t in tree_flatten(data)[0] if isinstance(t, Tensor)]
            items = [("call", here)] if error is not None else signature(
                here, f, params, ("data shapes", [tuple(t.shape) for t in data_leaves]), ("group size", ranks.size),
                ("forward FLOPs", flops))
            tensors = [] if error is not None else [(f"params[{i}]", t) for i, t in enumerate(leaves)] + \
                [(f"data[{i}]", t) for i, t in enumerate(data_leaves)]
            agree(here, ranks, items, tensors, error)
        names = [".".join(str(k) for k in path) for path in spec.paths()]  # as funchess.hessian names blocks
        shown = [".".join(str(k) for k in path) for path in tree_flatten(params)[1].paths()]  # the caller's
        sizes = [t.numel() for t in leaves]
        world = 1 if ranks is None else ranks.size
        rank = 0 if ranks is None else ranks.rank
        owners = assign(sizes, max(_PASSES_PER_ROW * flops, float(sum(sizes))), world)
        mine = sorted(q for q, r in owners.items() if r == rank)
        blocks_arg = [(_literal(names[i]), _literal(names[j])) for i, j in mine]
        sharded = ShardedHessian(here, params, shown, owners, {}, ranks, None)
        peak = need = budget = 0
        try:
            probe_blocks = blocks_arg or [(_literal(names[0]), _literal(names[0]))]
            plan = funchess.plan_hessian(inner, blocks=probe_blocks, chunk_size=opts.get("chunk_size", "auto"),
                                         max_memory=opts.get("max_memory"))(p, *data)
            peak, budget = (plan.peak_bytes if blocks_arg else 0), plan.budget_bytes
            need = sharded.gather_bytes(gather, rank)
        except Exception as exc:
            error = exc
        _exchange_memory(here, ranks, peak, need, budget, gather, error)
        error, got = None, {}
        try:
            if blocks_arg:
                H = funchess.hessian(inner, blocks=blocks_arg, **opts)(p, *data)
                got = {(i, j): H[names[i]][names[j]] for i, j in mine}
        except Exception as exc:
            error = exc
            if ranks is None:
                raise
        if ranks is not None:
            flag = all_reduce(here, ranks, torch.tensor([0.0 if error is None else 1.0]), what="failure check")
            share_failure(here, ranks, bool(flag[0] > 0), error)
        sharded = ShardedHessian(here, params, shown, owners, got, ranks, budget)
        if gather == "none":
            return sharded
        return sharded._gather(here, gather)

    return sharded_hessian_fn
