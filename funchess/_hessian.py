"""`hessian`, `hessian_diagonal`, `plan_hessian`: the block engine, planned and verified.

Two compositions compute second derivatives, both checked against nested double backward
(`funchess.testing`) on every test case:

- "rev-rev": `vjp` of the gradient. The forward and the first backward run once per group of
  blocks; every chunk of Hessian rows is one `vmap`ped double-backward pass. The only one that
  needs no forward-mode rules.
- "fwd-rev": `jvp` of the gradient, `vmap`ped over chunks of directions. Needs forward-mode rules
  for the backward ops; useful where an operator has those but no double backward.

"auto" tries "rev-rev" and falls back to "fwd-rev" when an operator lacks a rule, afresh on every
call. While funchess differentiates, a few fused operators whose second derivatives torch.func
gets wrong (layer/batch/instance norm) or cannot take (fused attention) are replaced by equivalent
compositions (see `funchess/_safe_ops.py`). Before anything large is allocated, one probe forward
measures what the call needs (`funchess/_memory.py`) and chooses how to group the rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import (
    ChunkSize,
    Mode,
    argnums_of,
    call_label,
    check_callable,
    check_chunk_size,
    check_mode,
    check_primals,
    check_randomness,
    relays_warnings,
    scalar_output,
)
from ._compat import inside_transform
from ._compose import RandomState, check_function, run_modes, usable, with_primals
from ._diagonal._route import structured_hessian_diagonal
from ._engine import DenseSink, DiagonalSink, Layout, SelectedSink, groups
from ._engine import run as engine_run
from ._errors import MemoryBudgetError
from ._memory import MemoryPlan, Probe, budget_of, default_budget, default_chunk, make_plan, probe, too_big
from ._safe_ops import safe_ops
from ._select import Blocks, resolve_blocks, resolve_leaves

__all__ = ["hessian", "hessian_diagonal", "plan_hessian"]

PyTree = Any
Pair = tuple[int, int]
#: Batch-level transforms evaluate one function: every pass must see one draw of its random
#: numbers, so "different" (a draw per vmapped element) has no meaning here.
BATCH_RANDOMNESS: tuple[str, ...] = ("error", "same")

#: The full Hessian of a small model runs as one *joint* group: one forward and backward, then
#: passes of whole rows over all `N` parameters (what `torch.func.hessian` does). The per-leaf
#: engine does about half the arithmetic (symmetry, backward passes pruned below the tangent's
#: layer) but pays a forward, a backward and a `vmap` per leaf. The joint pass costs about
#: `N * (F + 2 N)` in FLOP units (`F` the forward's matrix-product FLOPs, convolutions counted
#: twice: batched over directions they run slower), doubled in float64; it runs when that is at
#: most `_JOINT_FLOPS_PER_LEAF` per leaf and all rows fit one pass. The threshold was calibrated on
#: CPU on MLPs, conv nets and transformer blocks (benchmarks/RESULTS.md, "Small models").
_JOINT_FLOPS_PER_LEAF = 2e7
_JOINT_MAX_N = 8192


# ----------------------------------------------------------------------------- one call


@dataclass
class _Options:
    """The checked options of a block-engine transform (`hessian`, `hessian_diagonal`)."""

    call: str
    argnums: int | tuple[int, ...]
    has_aux: bool
    mode: str
    chunk: int | None
    budget: int | None
    budget_from: str
    randomness: str

    @classmethod
    def checked(
        cls, name: str, f: Any, argnums: Any, has_aux: bool, mode: Any, chunk_size: Any, blocks: Any,
        max_memory: Any, randomness: Any,
    ) -> _Options:
        call = call_label(name, {"argnums": argnums, "has_aux": has_aux, "mode": mode, "chunk_size": chunk_size,
                                 "blocks": blocks, "max_memory": max_memory, "randomness": randomness})
        check_callable(call, f)
        check_mode(call, mode)
        chunk = check_chunk_size(call, chunk_size)
        check_randomness(call, randomness, BATCH_RANDOMNESS)
        budget, budget_from = budget_of(call, max_memory)
        return cls(call, argnums, has_aux, mode, chunk, budget, budget_from, randomness)


@dataclass
class _Prepared:
    """One call's differentiated arguments, their leaves, the checked scalar function (replaying
    the random numbers before each evaluation with randomness="same") and the generators."""

    call: str
    primals: tuple[Any, ...]
    layout: Layout
    h: Callable[..., Any]
    rng: RandomState
    randomness: str


def _prepare(o: _Options, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Prepared:
    call = f"{o.call}(...)"
    check_function(call, f)
    args, kwargs = usable(args), usable(kwargs)
    nums = argnums_of(call, o.argnums, len(args))
    primals = tuple(args[i] for i in nums)
    check_primals(call, primals, [f"argument {i}" for i in nums])
    h = scalar_output(call, with_primals(f, args, kwargs, nums), o.has_aux)
    layout = Layout(primals, isinstance(o.argnums, int))
    rng = RandomState(layout.device)
    if o.randomness != "error":
        rng.save()
        plain = h

        def h(*p: Any) -> Any:
            rng.replay()
            return plain(*p)

    return _Prepared(call, primals, layout, h, rng, o.randomness)


@dataclass
class _Planned:
    """How a block computation runs: its memory plan, whether as one joint group, and whether the
    derivative passes need funchess's operator rerouting."""

    plan: MemoryPlan
    joint: bool
    safe: bool


def _plan(
    prep: _Prepared, request: set[Pair], entries: int, o: _Options, what: str, *, joint: bool = False,
    cost: Probe | None = None,
) -> MemoryPlan:
    """Plan a block computation; raise MemoryBudgetError before allocating if it cannot fit.

    `cost`: the probe (None when `chunk_size` is given); `joint`: one group whose rows are all `N`
    parameters (see `_planned`)."""
    lay = prep.layout
    itemsize = max(leaf.element_size() for leaf in lay.leaves)
    if joint:
        max_width = max_rows = lay.N
    else:
        grouped = groups(request, forward=False)
        max_width = max(sum(lay.sizes[y] for y in Y) for _, Y in grouped)
        max_rows = max(lay.sizes[x] for x, _ in grouped)
    if inside_transform():  # no probing under vmap/grad: a bounded default
        chunk = o.chunk or default_chunk(max_rows, max_width)
        return MemoryPlan(entries * itemsize, 0, max_width * itemsize, chunk, 0, 2**62, str(lay.device))
    plan = make_plan(
        output_bytes=entries * itemsize,
        saved=cost.saved_bytes if cost is not None else 0,
        max_width=max_width,
        max_rows=max_rows,
        itemsize=itemsize,
        chunk_size=o.chunk,
        budget=o.budget if o.budget is not None else default_budget(lay.device),
        device=lay.device,
        joint=joint,
    )
    if joint and o.chunk is None and plan.chunk_size < lay.N:  # the joint pass: all rows at once
        plan = dataclasses.replace(plan, chunk_size=lay.N, peak_bytes=plan.output_bytes + plan.graph_bytes + lay.N * plan.row_bytes)
    if not plan.fits:
        raise too_big(prep.call, what, plan, o.budget_from)
    return plan


def _joint_cost(lay: Layout, cost: Probe) -> float:
    """The joint pass's estimated cost in FLOP units (see `_JOINT_FLOPS_PER_LEAF`)."""
    itemsize: int = max(leaf.element_size() for leaf in lay.leaves)
    return float(lay.N * (cost.flops + cost.conv_flops + 2 * lay.N) * max(1, itemsize // 4))


def _planned(prep: _Prepared, request: set[Pair], entries: int, o: _Options, what: str, *, full: bool = False) -> _Planned:
    """Probe `f` once (when the plan or the choice of grouping needs it) and plan the computation;
    a `full` Hessian of a small model runs as one joint group (see `_JOINT_FLOPS_PER_LEAF`). With
    randomness="error" a probe that draws random numbers is refused before any derivative pass."""
    lay = prep.layout
    candidate = full and len(lay.leaves) > 1 and lay.N <= _JOINT_MAX_N
    with safe_ops() as mode:
        cost = None
        if not inside_transform() and (o.chunk is None or candidate):
            if prep.randomness == "error":
                with prep.rng.guard(prep.call):
                    cost = probe(prep.h, lay.leaves, lay.rebuild)
            else:
                cost = probe(prep.h, lay.leaves, lay.rebuild)
        # the rerouting costs a Python call per operator: skip it when the probe's forward met none
        safe = cost is None or mode is None or mode.rerouted > 0
        if candidate and cost is not None and _joint_cost(lay, cost) <= _JOINT_FLOPS_PER_LEAF * len(lay.leaves):
            try:
                return _Planned(_plan(prep, request, entries, o, what, joint=True, cost=cost), True, safe)
            except MemoryBudgetError:  # all rows do not fit one pass: the per-leaf engine chunks
                pass
        return _Planned(_plan(prep, request, entries, o, what, cost=cost), False, safe)


def _run_blocks(
    prep: _Prepared, o: _Options, request: set[Pair], planned: _Planned, make_sink: Callable[[], Any],
    finish: Callable[[Any], Any],
) -> tuple[Any, Any]:
    """Run the block engine in the call's mode(s); `(finish(sink), aux)`."""

    def runner(forward: bool) -> Any:
        sink = make_sink()
        aux = engine_run(
            prep.h, prep.layout, request, sink, forward=forward, has_aux=o.has_aux,
            chunk_for=lambda rows, width: planned.plan.chunk_size, joint=planned.joint,
            randomness="same" if prep.randomness != "error" else "error",
        )
        return finish(sink), aux

    runners = {"rev-rev": lambda: runner(False), "fwd-rev": lambda: runner(True)}
    if prep.randomness != "error" or inside_transform():
        return run_modes(prep.call, o.mode, runners, safe=planned.safe)  # type: ignore[no-any-return]
    with prep.rng.guard(prep.call):  # a forward outside vmap (rev-rev) must not draw either
        return run_modes(prep.call, o.mode, runners, safe=planned.safe)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- public API


def hessian(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: ChunkSize = "auto",
    blocks: Blocks = None,
    max_memory: int | float | str | None = None,
    randomness: str = "error",
) -> Callable[..., Any]:
    """The Hessian of a scalar function, as a structured pytree of blocks.

    `hessian(f)(*args)` differentiates `f(*args)` twice with respect to `args[argnums]`. The result
    is the *tree product* of the differentiated argument with itself (JAX's spec, and what
    `torch.func.hessian` returns): for a params dict, `H[a][b]` has shape
    `(*params[a].shape, *params[b].shape)`; for a Tensor `x`, `H.shape == (*x.shape, *x.shape)`;
    for `argnums=(0, 1)`, `H[i][...][j][...]` is the tree product of `args[i]` and `args[j]`.
    `funchess.to_matrix(H)` gives the dense `(N, N)` matrix without a copy: the blocks are views of
    one preallocated matrix (in the promoted dtype of the differentiated leaves).

    Symmetry: each pair of blocks is computed once; `H[b][a]` is a copy of `H[a][b]`'s transpose
    (inside the one matrix). In reverse mode the rows of block `a` are differentiated only with
    respect to the parameters after `a`, so for a tangent in a later layer the second backward pass
    never goes below that layer. The full Hessian of a small, cheap model (outside transforms)
    skips the per-block passes: one forward and backward, then all rows in one joint pass, keeping
    the upper blocks and mirroring them; the planner picks it from one probe forward (the FLOPs of
    its matrix products and convolutions, and N).

    Composition: "rev-rev" is `vjp` of the gradient of each block, `vmap`ped over chunks of basis
    rows (`jacrev(grad(f))`, block by block); "fwd-rev" is `vmap` of `jvp` through the gradient
    (`jacfwd(grad(f))`); "auto" (default) tries "rev-rev" and falls back to "fwd-rev" when an
    operator lacks a double-backward rule (decided on every call). It composes with
    `torch.func.vmap` (per-sample Hessians), `grad` and the other torch.func transforms, and works
    under `torch.no_grad()` and `torch.inference_mode()`.

    Memory: before allocating, a planner estimates the output, the graph and the working set per
    row (from one probe forward that measures the activations autograd saves) and picks the
    largest chunk of rows that fits the budget; if even the output cannot fit, it raises
    `MemoryBudgetError` saying what is needed. See `funchess.plan_hessian`. An int `chunk_size`
    skips the probe, except for full Hessians of at most 8,192 parameters, where it also chooses
    the joint pass.

    Args:
        f: a function returning a scalar Tensor (or `(scalar, aux)` with `has_aux=True`).
        argnums: which positional argument(s) to differentiate: an int or a tuple of ints.
        has_aux: f returns `(value, aux)`; the transform then returns `(H, aux)`.
        mode: "auto", "rev-rev" or "fwd-rev" (see above).
        chunk_size: Hessian rows per vectorised pass: "auto" (default; `None` means the same) lets
            the planner pick; an int fixes it (smaller uses less memory).
        blocks: None for the full Hessian; "diagonal" for the diagonal blocks `H[a][a]` only; or a
            list of parameter names / glob patterns `p` (all blocks among the matching
            parameters) and pairs `(p, q)` (blocks `H[a][b]`, `a` matching `p`, `b` matching `q`).
            Only those blocks are computed. With blocks, the result is a dict of dicts keyed by
            parameter name (leaf paths joined by '.'); a requested mirror `H[b][a]` of a computed
            `H[a][b]` is a transposed view.
        max_memory: the memory budget in bytes or as a string ("4GiB", "500MB"); default 80 % of
            the free memory of the device the arguments live on.
        randomness: "error" (default): f must not draw random numbers (dropout in train mode is
            refused); "same": the random numbers f draws are drawn once and replayed in every
            pass of the call, so the result is the Hessian for that one draw (e.g. one dropout
            mask).

    Returns:
        A function with f's signature returning the Hessian pytree (and aux with `has_aux=True`).
        NaNs in f propagate into the blocks they touch; funchess does not check values.

    Raises:
        OutputError: f does not return a scalar floating Tensor (or a pair with `has_aux=True`).
        InvalidArgumentError: bad argnums, mode, chunk_size, blocks, max_memory, randomness, or a
            non-float/empty argument; a model with batch norm in train mode (see
            `funchess.functional`).
        MemoryBudgetError: the computation cannot fit the budget (raised before allocating).
        UnsupportedError: an operator in f cannot be differentiated twice by any composition, or
            f draws random numbers with randomness="error".

    Example:
        >>> import torch, funchess
        >>> def f(p):
        ...     return (p["w"] ** 2).sum() * p["b"].sum()
        >>> params = {"w": torch.ones(2, 3), "b": torch.ones(4)}
        >>> H = funchess.hessian(f)(params)
        >>> H["w"]["b"].shape
        torch.Size([2, 3, 4])
        >>> funchess.to_matrix(H).shape
        torch.Size([10, 10])
        >>> list(funchess.hessian(f, blocks="diagonal")(params)["b"])
        ['b']
    """
    o = _Options.checked("hessian", f, argnums, has_aux, mode, chunk_size, blocks, max_memory, randomness)

    @functools.wraps(f)
    @relays_warnings
    def hessian_fn(*args: Any, **kwargs: Any) -> Any:
        prep = _prepare(o, f, args, kwargs)
        lay = prep.layout
        request, wanted = resolve_blocks(prep.call, blocks, lay.names)
        entries = lay.N * lay.N if wanted is None else sum(lay.sizes[i] * lay.sizes[j] for i, j in request)
        what = f"the Hessian of {lay.N:,} parameters" if wanted is None else f"{len(request)} Hessian block(s)"
        planned = _planned(prep, request, entries, o, what, full=wanted is None)
        if wanted is None:
            H, aux = _run_blocks(prep, o, request, planned, lambda: DenseSink(lay), lambda sink: sink.finish())
        else:
            H, aux = _run_blocks(prep, o, request, planned, lambda: SelectedSink(lay), lambda sink: sink.finish(wanted))
        return (H, aux) if has_aux else H

    return hessian_fn


def hessian_diagonal(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: ChunkSize = "auto",
    blocks: str | Sequence[str] | None = None,
    max_memory: int | float | str | None = None,
    randomness: str = "error",
) -> Callable[..., Any]:
    """The exact diagonal of the Hessian, shaped like the parameters, in O(N) memory.

    `hessian_diagonal(f)(params)["w"][i, j]` is `d²f / dw[i, j]²`. Exact (not an estimate): each
    chunk of basis rows of a parameter is differentiated only with respect to that parameter (the
    block-diagonal computation, pruned by autograd), and only the diagonal entries are kept, so
    memory is O(N) plus one chunk's working set. For an estimate from a few products instead, see
    `funchess.diagonal_estimate`.

    When `f` is `funchess.functional(model, loss_fn)` with `model` an `nn.Sequential` of modules
    with rules (Linear, Conv, activations, norms, pooling, ...; see `funchess.ggn_diagonal`), called
    as `f(params, inputs, targets)` with the default options, a module-aware backward sweep gives
    the same diagonal far faster: the loss Hessian's factor plus the activations' second-order
    terms, pulled through the modules (BackPACK's method, for more modules).

    Args:
        f, argnums, has_aux, mode, chunk_size, max_memory, randomness: as for `funchess.hessian`.
        blocks: None for every parameter (the result is shaped like the differentiated argument),
            or parameter names / glob patterns: then only those diagonals are computed and the
            result is a dict keyed by parameter name.

    Returns:
        A function with f's signature returning the diagonal (and aux with `has_aux=True`).

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["w"] ** 3).sum() + (p["w"] * p["b"]).sum()
        >>> p = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
        >>> funchess.hessian_diagonal(f)(p)
        {'w': tensor([ 6., 12.]), 'b': tensor([0., 0.])}
    """
    o = _Options.checked("hessian_diagonal", f, argnums, has_aux, mode, chunk_size, blocks, max_memory, randomness)

    @functools.wraps(f)
    @relays_warnings
    def diagonal_fn(*args: Any, **kwargs: Any) -> Any:
        prep = _prepare(o, f, args, kwargs)
        if o.argnums == 0 and not has_aux and blocks is None and o.mode == "auto" and o.randomness == "error" and not kwargs:
            # the module-aware sweep, where it applies
            fast = structured_hessian_diagonal(f, *args, chunk_size=o.chunk, max_memory=max_memory)
            if fast is not None:
                return fast
        lay = prep.layout
        chosen = resolve_leaves(prep.call, blocks, lay.names)
        request = {(x, x) for x in chosen}
        planned = _planned(prep, request, sum(lay.sizes[x] for x in chosen), o, "the Hessian diagonal")
        diag, aux = _run_blocks(
            prep, o, request, planned, lambda: DiagonalSink(lay), lambda sink: sink.finish(chosen, as_tree=blocks is None)
        )
        return (diag, aux) if has_aux else diag

    return diagonal_fn


def plan_hessian(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    chunk_size: ChunkSize = "auto",
    blocks: Blocks = None,
    diagonal: bool = False,
    max_memory: int | float | str | None = None,
    randomness: str = "error",
) -> Callable[..., MemoryPlan]:
    """What `funchess.hessian` (or `hessian_diagonal` with `diagonal=True`) would need: a `MemoryPlan`.

    Nothing large is allocated: one probe forward measures the activations autograd saves, and
    the plan adds the output, the kept graph and the working set of each row in a chunk. Use it to
    check a computation before running it, or to see the chunk size the planner would pick. A plan
    that does not fit is returned (with `fits == False`), not raised. The options mean what they
    mean for `funchess.hessian` (with randomness="error", a function that draws random numbers is
    refused here too).

    Example:
        >>> import torch, funchess
        >>> plan = funchess.plan_hessian(lambda w: (w.tanh() ** 2).sum(), max_memory="1GiB")(torch.zeros(4000))
        >>> plan.output_bytes, plan.fits
        (64000000, True)
        >>> funchess.plan_hessian(lambda w: w.sum(), max_memory="1MiB")(torch.zeros(4000)).fits
        False
    """
    o = _Options.checked("plan_hessian", f, argnums, False, "auto", chunk_size, blocks, max_memory, randomness)

    @relays_warnings
    def plan_fn(*args: Any, **kwargs: Any) -> MemoryPlan:
        prep = _prepare(o, f, args, kwargs)
        lay = prep.layout
        wanted = None
        if diagonal:
            request = {(x, x) for x in range(len(lay.leaves))}
            entries = lay.N
        else:
            request, wanted = resolve_blocks(prep.call, blocks, lay.names)
            entries = lay.N * lay.N if wanted is None else sum(lay.sizes[i] * lay.sizes[j] for i, j in request)
        try:
            return _planned(prep, request, entries, o, "", full=not diagonal and wanted is None).plan
        except MemoryBudgetError as exc:
            assert isinstance(exc.plan, MemoryPlan)
            return exc.plan

    return plan_fn
