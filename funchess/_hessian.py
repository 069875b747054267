"""`hessian`, `hvp`, `vhp`, `jacrev`, `jacfwd`: compositions of torch.func, chunked and verified.

Two compositions compute second derivatives, both checked against nested double backward
(`funchess.testing`) on every test case:

- "rev-rev": `vjp` of the gradient. The forward and the first backward run once; every chunk of
  Hessian rows is one `vmap`ped double-backward pass. Fastest on CPU in our benchmarks, and the
  only one that needs no forward-mode rules.
- "fwd-rev": `jvp` of the gradient, `vmap`ped over chunks of directions. Needs forward-mode rules
  for the backward ops; useful where an operator has those but no double backward.

"auto" tries "rev-rev", falls back to "fwd-rev" when an operator lacks a rule, and remembers the
choice for the function. While funchess differentiates, a few fused operators whose second
derivatives torch.func gets wrong (layer/batch/instance norm) or cannot take (fused attention)
are replaced by equivalent compositions (see `funchess/_safe_ops.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor
from torch.func import vmap

from ._compat import inside_transform, jvp, vjp
from ._engine import DenseSink, DiagonalSink, Layout, SelectedSink, groups
from ._engine import run as engine_run
from ._errors import InvalidArgumentError, MemoryBudgetError, OutputError, StructureError, UnsupportedError
from ._jacobian import check_chunk_size, default_chunk, jac_fwd, jac_rev, safe_ops
from ._memory import (
    _DEFAULT_FRACTION,
    MemoryPlan,
    Probe,
    available_bytes,
    make_plan,
    parse_bytes,
    probe,
    too_big,
)
from ._select import Blocks, resolve_blocks, resolve_leaves
from ._tree import tree_flatten, tree_map, tree_unflatten

__all__ = ["hessian", "hessian_diagonal", "plan_hessian", "hvp", "vhp", "jacrev", "jacfwd", "Mode"]

PyTree = Any
Mode = Literal["auto", "rev-rev", "fwd-rev"]
_MODES: tuple[str, ...] = ("auto", "rev-rev", "fwd-rev")
_FALLBACK_ORDER: tuple[str, ...] = ("rev-rev", "fwd-rev")

# Messages torch raises when an operator has no rule for the derivative a composition needs.
_MISSING_RULE = re.compile(
    r"derivative for .* is not implemented|Trying to use forward AD with|"
    r"not implemented for forward AD|does not support forward AD|"
    r"does not have a (?:double backward|derivative)|No forward AD formula|"
    r"Batching rule not implemented|doesn't support double backward|"
    r"does not support double backward",
    re.IGNORECASE,
)
_RANDOM = re.compile(r"random operation while in randomness error mode", re.IGNORECASE)


# ----------------------------------------------------------------------------- validation


def _fmt_call(name: str, f: Callable[..., Any], opts: dict[str, Any]) -> str:
    shown = "".join(f", {k}={v!r}" for k, v in opts.items() if v is not None)
    return f"funchess.{name}(f{shown})"


def _check_mode(call: str, mode: str) -> None:
    if mode not in _MODES:
        raise InvalidArgumentError(
            f"{call}: expected mode to be one of {', '.join(map(repr, _MODES))}, got {mode!r}. "
            f"Use mode='auto' unless you need a specific composition."
        )


def _check_callable(call: str, f: Any) -> None:
    if not callable(f):
        raise InvalidArgumentError(
            f"{call}: expected f to be a function, got {type(f).__name__}. Pass the loss function "
            f"(e.g. the first value of funchess.functional(model, loss_fn))."
        )


def _argnums(call: str, argnums: int | tuple[int, ...], nargs: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if (
        not isinstance(nums, tuple)
        or not nums
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in nums)
    ):
        raise InvalidArgumentError(
            f"{call}: expected argnums to be an int or a non-empty tuple of ints, got "
            f"{argnums!r}. Pass e.g. argnums=0 or argnums=(0, 1)."
        )
    out = []
    for i in nums:
        if not -nargs <= i < nargs:
            raise InvalidArgumentError(
                f"{call}: argnums={argnums!r} is out of range for the {nargs} positional "
                f"argument(s) given; expected indices in [{-nargs}, {nargs}). Pass the arguments "
                f"to differentiate positionally, or fix argnums."
            )
        out.append(i % nargs)
    if len(set(out)) != len(out):
        raise InvalidArgumentError(
            f"{call}: argnums={argnums!r} names an argument twice. Pass each index once."
        )
    return tuple(out)


def _check_primals(call: str, primals: Sequence[Any], names: Sequence[str]) -> None:
    for primal, name in zip(primals, names):
        leaves, spec = tree_flatten(primal)
        if not leaves:
            raise InvalidArgumentError(
                f"{call}: {name} is an empty pytree ({spec}); there is nothing to differentiate. "
                f"Pass at least one parameter (check funchess.functional's params= selection "
                f"and requires_grad)."
            )
        paths = spec.paths()
        for path, leaf in zip(paths, leaves):
            where = f"{name}{''.join(f'[{p!r}]' for p in path)}"
            if not isinstance(leaf, Tensor):
                raise InvalidArgumentError(
                    f"{call}: {where} is a {type(leaf).__name__}; expected a Tensor (every leaf "
                    f"of a differentiated argument must be one). Wrap numbers with torch.tensor."
                )
            if not leaf.is_floating_point() or leaf.is_complex():
                raise InvalidArgumentError(
                    f"{call}: {where} has dtype {leaf.dtype}; expected a real floating-point "
                    f"Tensor. Convert it (e.g. .double()), or leave it out of the "
                    f"differentiated arguments."
                )


def _split_aux(call: str, out: Any, has_aux: bool) -> tuple[Any, Any]:
    if not has_aux:
        return out, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} values"
        raise OutputError(
            f"{call}: with has_aux=True, f must return a pair (value, aux), got {got}. Return "
            f"`loss, aux` from f, or drop has_aux=True."
        )
    return out[0], out[1]


def _check_scalar(call: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise OutputError(
            f"{call}: f must return a scalar Tensor, got a {type(value).__name__}. Return the "
            f"loss as a 0-dimensional Tensor (with has_aux=True for extra outputs)."
        )
    if value.dim() != 0:
        raise OutputError(
            f"{call}: f must return a scalar Tensor, got shape {tuple(value.shape)}. Reduce the "
            f"loss (e.g. `.mean()` or reduction='mean'), or use funchess.jacrev/jacfwd for "
            f"vector outputs."
        )
    if not value.is_floating_point() or value.is_complex():
        raise OutputError(
            f"{call}: f must return a real floating-point scalar, got dtype {value.dtype}. "
            f"Compute the loss in floating point."
        )
    return value


# ----------------------------------------------------------------------------- running modes


def _with_primals(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], nums: tuple[int, ...]) -> Callable[..., Any]:
    def h(*primals: Any) -> Any:
        full = list(args)
        for i, p in zip(nums, primals):
            full[i] = p
        return f(*full, **kwargs)

    return h


def _scalar_fn(h: Callable[..., Any], call: str, has_aux: bool) -> Callable[..., Any]:
    """`h` with its output checked: a real floating scalar (and aux with has_aux)."""

    def scalar(*primals: Any) -> Any:
        value, aux = _split_aux(call, h(*primals), has_aux)
        value = _check_scalar(call, value)
        return (value, aux) if has_aux else value

    return scalar


def _gradient(
    h: Callable[..., Any], call: str, has_aux: bool, single: bool, *, for_jvp: bool = False
) -> Callable[..., Any]:
    """The gradient of scalar `h` w.r.t. all its arguments, as a function (plus aux).

    With `for_jvp`, the pullback runs under a `vmap` of size one: differentiating the plain
    pullback in forward mode crashes for some losses ("ZeroTensors are immutable" in
    `mse_loss_backward`, pytorch#123996; no forward rule for `huber_loss_backward`), while their
    batched forms decompose into operators that have forward rules. This is what `jacrev` does too.
    """

    scalar = _scalar_fn(h, call, has_aux)

    def g(*primals: Any) -> Any:
        if has_aux:
            value, pullback, aux = vjp(scalar, *primals, has_aux=True)
        else:
            (value, pullback), aux = vjp(scalar, *primals), None
        if for_jvp:
            grads = tree_map(lambda t: t[0], vmap(pullback)(torch.ones_like(value).unsqueeze(0)))
        else:
            grads = pullback(torch.ones_like(value))
        grads = grads[0] if single else grads
        return (grads, aux) if has_aux else grads

    return g


def _missing_rule(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(_MISSING_RULE.search(str(exc)))


def _translate(call: str, mode: str, exc: BaseException) -> BaseException | None:
    """A FunchessError for a torch error we understand, else None (re-raise as is)."""
    if isinstance(exc, (RuntimeError, NotImplementedError)) and _RANDOM.search(str(exc)):
        return UnsupportedError(
            f"{call}: f draws random numbers (e.g. dropout in train mode) inside a vectorised "
            f"pass of mode {mode!r}; expected a deterministic function. Call model.eval(), or "
            f"use mode='rev-rev', which runs the forward (and draws the masks) once."
        )
    if _missing_rule(exc):
        other = [m for m in _FALLBACK_ORDER if m != mode]
        return UnsupportedError(
            f"{call}: an operator in f has no rule for mode {mode!r}: {str(exc).splitlines()[0]} "
            f"Try mode={other[0]!r} or mode='auto', or replace the operator by differentiable "
            f"torch operations."
        )
    return None


def _run(
    call: str,
    state: dict[str, str | None],
    runners: dict[str, Callable[[], Any]],
    fallback: tuple[str, ...] = _FALLBACK_ORDER,
    safe: bool = True,
) -> Any:
    """Run the chosen mode, or under "auto" the first of `fallback` that works (remembered in
    `state`); with `safe`, under funchess's operator rerouting."""
    chosen = state["mode"]
    order = (chosen,) if chosen else fallback
    failures: list[str] = []
    for mode in order:
        try:
            with safe_ops(safe):
                result = runners[mode]()
        except (RuntimeError, NotImplementedError) as exc:
            if chosen is None and _missing_rule(exc) and mode != order[-1]:
                failures.append(f"{mode}: {str(exc).splitlines()[0]}")
                continue
            translated = _translate(call, mode, exc)
            if translated is None:
                raise
            if failures and _missing_rule(exc):
                raise UnsupportedError(
                    f"{call}: no composition can differentiate f twice; expected an operator "
                    f"with a double-backward or forward-mode rule, got "
                    f"{'; '.join(failures)}; {mode}: {str(exc).splitlines()[0]} Replace the "
                    f"operator by differentiable torch operations."
                ) from exc
            raise translated from exc
        state["mode"] = mode
        return result
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- public API


ChunkSize = Union[int, Literal["auto"], None]  # noqa: UP007 (a runtime alias on Python 3.10)


def _check_chunk(call: str, chunk_size: ChunkSize) -> int | None:
    """None for "plan it", else the validated int."""
    if chunk_size is None or chunk_size == "auto":
        return None
    check_chunk_size(call, chunk_size)  # type: ignore[arg-type]
    return chunk_size  # type: ignore[return-value]


@dataclass
class _Prepared:
    """One call's differentiated arguments, their leaves, and the checked scalar function."""

    call: str
    primals: tuple[Any, ...]
    layout: Layout
    h: Callable[..., Any]


def _prepare(
    call: str, f: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Prepared:
    nums = _argnums(call, argnums, len(args))
    primals = tuple(args[i] for i in nums)
    _check_primals(call, primals, [f"argument {i}" for i in nums])
    h = _scalar_fn(_with_primals(f, args, kwargs, nums), call, has_aux)
    return _Prepared(call, primals, Layout(primals, isinstance(argnums, int)), h)


def _plan(
    prep: _Prepared,
    request: set[tuple[int, int]],
    output_entries: int,
    chunk_size: int | None,
    budget: int | None,
    budget_from: str,
    what: str,
    *,
    joint: bool = False,
    cost: Probe | None = None,
) -> MemoryPlan:
    """Plan a block computation; raise MemoryBudgetError before allocating if it cannot fit.

    `cost`: the probe (None when `chunk_size` is given); `joint`: one group whose rows are all `N`
    parameters (see `_planned`)."""
    lay = prep.layout
    itemsize = max(leaf.element_size() for leaf in lay.leaves)
    device = lay.leaves[0].device
    if joint:
        max_width = max_rows = lay.N
    else:
        grouped = groups(request, forward=False)
        max_width = max(sum(lay.sizes[y] for y in Y) for _, Y in grouped)
        max_rows = max(lay.sizes[x] for x, _ in grouped)
    if inside_transform():  # no probing under vmap/grad: a bounded default
        chunk = chunk_size or default_chunk(max_rows, max_width)
        return MemoryPlan(output_entries * itemsize, 0, max_width * itemsize, chunk, 0, 2**62, str(device))
    plan = make_plan(
        output_bytes=output_entries * itemsize,
        saved=cost.saved_bytes if cost is not None else 0,
        max_width=max_width,
        max_rows=max_rows,
        itemsize=itemsize,
        chunk_size=chunk_size,
        budget=budget if budget is not None else int(_DEFAULT_FRACTION * available_bytes(device)),
        device=device,
        joint=joint,
    )
    if joint and chunk_size is None and plan.chunk_size < lay.N:  # the joint pass: all rows at once
        plan = dataclasses.replace(plan, chunk_size=lay.N, peak_bytes=plan.output_bytes + plan.graph_bytes + lay.N * plan.row_bytes)
    if not plan.fits:
        raise too_big(prep.call, what, plan, budget_from)
    return plan


def _budget(call: str, max_memory: int | float | str | None) -> tuple[int | None, str]:
    if max_memory is None:
        return None, "80% of the device's free memory"
    return parse_bytes(call, max_memory), f"max_memory={max_memory!r}"


#: The full Hessian of a small model runs as one *joint* group: one forward and backward, then
#: passes of whole rows over all `N` parameters (what `torch.func.hessian` does). The per-leaf
#: engine does about half the arithmetic (symmetry, backward passes pruned below the tangent's
#: layer) but pays a forward, a backward and a `vmap` per leaf. The joint pass costs about
#: `N * (F + 2 N)` in FLOP units (`F` the forward's matrix-product FLOPs, convolutions counted
#: twice: batched over directions they run slower), doubled in float64; it runs when that is at
#: most `_JOINT_FLOPS_PER_LEAF` per leaf and all rows fit one pass. Calibrated on CPU on MLPs, conv
#: nets and transformer blocks of 76-8,074 parameters with 1-64 samples: the joint pass measured
#: 1.2-6.6x faster below the threshold, and up to 7x slower well above it (conv nets, large
#: batches). See benchmarks/RESULTS.md.
_JOINT_FLOPS_PER_LEAF = 2e7
_JOINT_MAX_N = 8192


def _joint_cost(lay: Layout, cost: Probe) -> float:
    """The joint pass's estimated cost in FLOP units (see `_JOINT_FLOPS_PER_LEAF`)."""
    itemsize: int = max(leaf.element_size() for leaf in lay.leaves)
    return float(lay.N * (cost.flops + cost.conv_flops + 2 * lay.N) * max(1, itemsize // 4))


@dataclass
class _Planned:
    """How a block computation runs: its memory plan, whether as one joint group, and whether the
    derivative passes need funchess's operator rerouting."""

    plan: MemoryPlan
    joint: bool
    safe: bool


def _planned(
    prep: _Prepared, request: set[tuple[int, int]], entries: int, chunk: int | None, budget: int | None,
    budget_from: str, what: str, *, full: bool = False,
) -> _Planned:
    """Probe `f` once (when the plan or the choice of grouping needs it) and plan the computation;
    a `full` Hessian of a small model runs as one joint group (see `_JOINT_FLOPS_PER_LEAF`)."""
    lay = prep.layout
    candidate = full and len(lay.leaves) > 1 and lay.N <= _JOINT_MAX_N
    with safe_ops() as mode:
        cost = None
        if not inside_transform() and (chunk is None or candidate):
            cost = probe(prep.h, prep.primals, lay.leaves, lay.rebuild)
        # the rerouting costs a Python call per operator: skip it when the probe's forward met none
        safe = cost is None or mode is None or mode.rerouted > 0
        if candidate and cost is not None and _joint_cost(lay, cost) <= _JOINT_FLOPS_PER_LEAF * len(lay.leaves):
            try:
                return _Planned(_plan(prep, request, entries, chunk, budget, budget_from, what, joint=True, cost=cost), True, safe)
            except MemoryBudgetError:  # all rows do not fit one pass: the per-leaf engine chunks
                pass
        return _Planned(_plan(prep, request, entries, chunk, budget, budget_from, what, cost=cost), False, safe)


@dataclass
class _BlockOptions:
    """The checked options of a block-engine call (`hessian`, `hessian_diagonal`)."""

    call: str
    chunk: int | None
    budget: int | None
    budget_from: str
    state: dict[str, str | None]

    @classmethod
    def checked(
        cls, name: str, f: Callable[..., Any], argnums: int | tuple[int, ...], mode: str, chunk_size: ChunkSize,
        blocks: Any, max_memory: int | float | str | None,
    ) -> _BlockOptions:
        opts = {"argnums": argnums or None, "mode": None if mode == "auto" else mode,
                "chunk_size": None if chunk_size == "auto" else chunk_size, "blocks": blocks,
                "max_memory": max_memory}
        call = _fmt_call(name, f, opts)
        _check_callable(call, f)
        _check_mode(call, mode)
        chunk = _check_chunk(call, chunk_size)
        budget, budget_from = _budget(call, max_memory)
        return cls(call, chunk, budget, budget_from, {"mode": None if mode == "auto" else mode})


def _blocks_runner(
    prep: _Prepared, request: set[tuple[int, int]], make_sink: Callable[[], Any], finish: Callable[[Any], Any], has_aux: bool,
    chunk: int, joint: bool = False,
) -> dict[str, Callable[[], Any]]:
    def runner(forward: bool) -> Any:
        sink = make_sink()
        aux = engine_run(prep.h, prep.layout, request, sink, forward=forward, has_aux=has_aux, chunk_for=lambda rows, width: chunk, joint=joint)
        return finish(sink), aux

    return {"rev-rev": lambda: runner(False), "fwd-rev": lambda: runner(True)}


def hessian(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: ChunkSize = "auto",
    blocks: Blocks = None,
    max_memory: int | float | str | None = None,
) -> Callable[..., Any]:
    """The Hessian of a scalar function, as a structured pytree of blocks.

    `hessian(f)(*args)` differentiates `f(*args)` twice with respect to `args[argnums]`. The result
    is the *tree product* of the differentiated argument with itself (JAX's spec, and what
    `torch.func.hessian` returns): for a params dict, `H[a][b]` has shape
    `(*params[a].shape, *params[b].shape)`; for a Tensor `x`, `H.shape == (*x.shape, *x.shape)`;
    for `argnums=(0, 1)`, `H[i][...][j][...]` is the tree product of `args[i]` and `args[j]`.
    `funchess.to_matrix(H)` gives the dense `(N, N)` matrix without a copy: the blocks are views of
    one preallocated matrix.

    Symmetry: each pair of blocks is computed once; `H[b][a]` is a copy of `H[a][b]`'s transpose
    (inside the one matrix). In reverse mode the rows of block `a` are differentiated only with
    respect to the parameters after `a`, so for a tangent in a later layer the second backward pass
    never goes below that layer. The full Hessian of a small, cheap model (outside transforms)
    skips the per-block passes: one forward and backward, then all rows in one joint pass, keeping
    the upper blocks and mirroring them. The planner picks it from one probe forward (the FLOPs of
    its matrix products and convolutions, and N): measured 1.2-2.6x faster on MLPs and transformer
    blocks with a few samples; conv nets and larger batches stay per block.

    Composition: "rev-rev" is `vjp` of the gradient of each block, `vmap`ped over chunks of basis
    rows (`jacrev(grad(f))`, block by block); "fwd-rev" is `vmap` of `jvp` through the gradient
    (`jacfwd(grad(f))`); "auto" (default) tries "rev-rev" and falls back to "fwd-rev" when an
    operator lacks a double-backward rule. It composes with `torch.func.vmap` (per-sample
    Hessians), `grad` and the other torch.func transforms.

    Memory: before allocating, a planner estimates the output, the graph and the working set per
    row (from one probe forward that measures the activations autograd saves) and picks the
    largest chunk of rows that fits the budget; if even the output cannot fit, it raises
    `MemoryBudgetError` saying what is needed. See `funchess.plan_hessian`. The probe evaluates f
    once more (it draws from the random number generator if f does); an int `chunk_size` skips it,
    except for full Hessians of at most 8,192 parameters, where it also chooses the joint pass.

    Args:
        f: a function returning a scalar Tensor (or `(scalar, aux)` with `has_aux=True`).
        argnums: which positional argument(s) to differentiate: an int or a tuple of ints.
        has_aux: f returns `(value, aux)`; the transform then returns `(H, aux)`.
        mode: "auto", "rev-rev" or "fwd-rev" (see above).
        chunk_size: Hessian rows per vectorised pass. "auto" (default; None means the same) lets
            the planner pick (at most 256, or all N rows in the joint pass); an int fixes it
            (smaller uses less memory).
        blocks: None for the full Hessian; "diagonal" for the diagonal blocks `H[a][a]` only; or a
            list of parameter names / glob patterns `p` (all blocks among the matching
            parameters) and pairs `(p, q)` (blocks `H[a][b]`, `a` matching `p`, `b` matching `q`).
            Only those blocks are computed. With blocks, the result is a dict of dicts keyed by
            parameter name (leaf paths joined by '.'); a requested mirror `H[b][a]` of a computed
            `H[a][b]` is a transposed view.
        max_memory: the memory budget in bytes or as a string ("4GiB", "500MB"); default 80 % of
            the free memory of the device the arguments live on.

    Returns:
        A function with f's signature returning the Hessian pytree (and aux with `has_aux=True`).
        NaNs in f propagate into the blocks they touch; funchess does not check values.

    Raises:
        OutputError: f does not return a scalar floating Tensor (or a pair with `has_aux=True`).
        InvalidArgumentError: bad argnums, mode, chunk_size, blocks, max_memory, or a
            non-float/empty argument.
        MemoryBudgetError: the computation cannot fit the budget (raised before allocating).
        UnsupportedError: an operator in f cannot be differentiated twice by any composition.

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
    o = _BlockOptions.checked("hessian", f, argnums, mode, chunk_size, blocks, max_memory)

    @functools.wraps(f)
    def hessian_fn(*args: Any, **kwargs: Any) -> Any:
        prep = _prepare(f"{o.call}(...)", f, argnums, has_aux, args, kwargs)
        lay = prep.layout
        request, wanted = resolve_blocks(prep.call, blocks, lay.names)
        entries = lay.N * lay.N if wanted is None else sum(lay.sizes[i] * lay.sizes[j] for i, j in request)
        what = f"the Hessian of {lay.N:,} parameters" if wanted is None else f"{len(request)} Hessian block(s)"
        p = _planned(prep, request, entries, o.chunk, o.budget, o.budget_from, what, full=wanted is None)
        if wanted is None:
            runners = _blocks_runner(prep, request, lambda: DenseSink(lay), lambda sink: sink.finish(), has_aux, p.plan.chunk_size, p.joint)
        else:
            runners = _blocks_runner(prep, request, lambda: SelectedSink(lay), lambda sink: sink.finish(wanted), has_aux, p.plan.chunk_size)
        H, aux = _run(prep.call, o.state, runners, safe=p.safe)
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
) -> Callable[..., Any]:
    """The exact diagonal of the Hessian, shaped like the parameters, in O(N) memory.

    `hessian_diagonal(f)(params)["w"][i, j]` is `d²f / dw[i, j]²`. Exact (not an estimate): each
    chunk of basis rows of a parameter is differentiated only with respect to that parameter (the
    block-diagonal computation, pruned by autograd), and only the diagonal entries are kept, so
    memory is O(N) plus one chunk's working set. For an estimate from a few HVPs instead, see the
    stochastic estimators.

    When `f` is `funchess.functional(model, loss_fn)` with `model` an `nn.Sequential` of modules
    with rules (Linear, Conv, activations, norms, pooling, ...; see `funchess.ggn_diagonal`), called
    as `f(params, inputs, targets)` with the default options, a module-aware backward sweep gives
    the same diagonal far faster: the loss Hessian's factor plus the activations' second-order
    terms, pulled through the modules (BackPACK's method, for more modules).

    Args:
        f, argnums, has_aux, mode, chunk_size, max_memory: as for `funchess.hessian`.
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
    o = _BlockOptions.checked("hessian_diagonal", f, argnums, mode, chunk_size, blocks, max_memory)

    @functools.wraps(f)
    def diagonal_fn(*args: Any, **kwargs: Any) -> Any:
        if argnums == 0 and not has_aux and blocks is None and mode == "auto" and not kwargs and len(args) > 1:
            from ._diagonal import structured_hessian_diagonal  # the module-aware sweep, when it applies

            _check_primals(f"{o.call}(...)", args[:1], ["argument 0"])
            fast = structured_hessian_diagonal(f, *args, chunk_size=o.chunk, max_memory=max_memory)
            if fast is not None:
                return fast
        prep = _prepare(f"{o.call}(...)", f, argnums, has_aux, args, kwargs)
        lay = prep.layout
        chosen = resolve_leaves(prep.call, blocks, lay.names)
        request = {(x, x) for x in chosen}
        p = _planned(prep, request, sum(lay.sizes[x] for x in chosen), o.chunk, o.budget, o.budget_from, "the Hessian diagonal")
        runners = _blocks_runner(
            prep, request, lambda: DiagonalSink(lay), lambda sink: sink.finish(chosen, as_tree=blocks is None), has_aux, p.plan.chunk_size
        )
        diag, aux = _run(prep.call, o.state, runners, safe=p.safe)
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
) -> Callable[..., MemoryPlan]:
    """What `funchess.hessian` (or `hessian_diagonal` with `diagonal=True`) would need: a `MemoryPlan`.

    Nothing large is allocated: one probe forward measures the activations autograd saves, and
    the plan adds the output, the kept graph and the working set of each row in a chunk. Use it to
    check a computation before running it, or to see the chunk size the planner would pick.

    Example:
        >>> import torch, funchess
        >>> plan = funchess.plan_hessian(lambda w: (w.tanh() ** 2).sum(), max_memory="1GiB")(torch.zeros(4000))
        >>> plan.output_bytes, plan.fits
        (64000000, True)
        >>> funchess.plan_hessian(lambda w: w.sum(), max_memory="1MiB")(torch.zeros(4000)).fits
        False
    """
    call = _fmt_call("plan_hessian", f, {"argnums": argnums or None, "blocks": blocks, "max_memory": max_memory})
    _check_callable(call, f)
    chunk = _check_chunk(call, chunk_size)
    budget, _ = _budget(call, max_memory)

    def plan_fn(*args: Any, **kwargs: Any) -> MemoryPlan:
        prep = _prepare(f"{call}(...)", f, argnums, False, args, kwargs)
        lay = prep.layout
        wanted = None
        if diagonal:
            request = {(x, x) for x in range(len(lay.leaves))}
            entries = lay.N
        else:
            request, wanted = resolve_blocks(prep.call, blocks, lay.names)
            entries = lay.N * lay.N if wanted is None else sum(lay.sizes[i] * lay.sizes[j] for i, j in request)
        try:
            return _planned(prep, request, entries, chunk, budget, "", "", full=not diagonal and wanted is None).plan
        except MemoryBudgetError as exc:
            assert isinstance(exc.plan, MemoryPlan)
            return exc.plan

    return plan_fn


def _check_tangents(call: str, primals: Any, tangents: Any) -> None:
    for name, value in (("primals", primals), ("tangents", tangents)):
        if not isinstance(value, tuple):
            raise StructureError(
                f"{call}: expected {name} to be a tuple (as in torch.func.jvp), got "
                f"{type(value).__name__}. Wrap it: funchess.hvp(f, (params,), (v,))."
            )
    if len(primals) != len(tangents):
        raise StructureError(
            f"{call}: expected one tangent per primal ({len(primals)}), got {len(tangents)}. "
            f"Pass tangents shaped like primals."
        )
    for k, (p, t) in enumerate(zip(primals, tangents)):
        p_leaves, p_spec = tree_flatten(p)
        t_leaves, t_spec = tree_flatten(t)
        if p_spec != t_spec:
            raise StructureError(
                f"{call}: tangents[{k}] must have the structure of primals[{k}]; expected "
                f"{p_spec}, got {t_spec}. Build it from the primal, e.g. "
                f"{{k: torch.randn_like(p) for k, p in params.items()}}."
            )
        for path, pl, tl in zip(p_spec.paths(), p_leaves, t_leaves):
            where = "".join(f"[{q!r}]" for q in path)
            if not isinstance(tl, Tensor) or tl.shape != pl.shape or tl.dtype != pl.dtype:
                got = (
                    f"shape {tuple(tl.shape)} and dtype {tl.dtype}"
                    if isinstance(tl, Tensor)
                    else f"a {type(tl).__name__}"
                )
                raise StructureError(
                    f"{call}: tangents[{k}]{where} must match primals[{k}]{where}: expected "
                    f"shape {tuple(pl.shape)} and dtype {pl.dtype}, got {got}. Build tangents "
                    f"with torch.randn_like / zeros_like of the primals."
                )


def _plain_autograd_ok(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> bool:
    """Whether plain autograd can take the reverse-over-reverse HVP: outside every torch.func
    transform, with no leaf already tracked by an outer autograd graph (whose derivatives
    torch.func would carry through, and a detached copy would not)."""
    if inside_transform():
        return False
    leaves = tree_flatten((primals, tangents))[0]
    return all(isinstance(t, Tensor) and not t.requires_grad for t in leaves)


def _double_backward(
    f: Callable[..., Any], call: str, has_aux: bool, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[tuple[Any, ...], Any]:
    """"rev-rev" by plain autograd: one gradient with `create_graph=True`, then one backward of
    the gradient with the tangent as its cotangent. Same arithmetic as `vjp(grad(f))`, without
    torch.func's wrappers."""
    leaves, spec = tree_flatten(primals)
    xs = [t.detach().requires_grad_(True) for t in leaves]
    vs = tree_flatten(tangents)[0]
    with torch.enable_grad():
        out = _scalar_fn(f, call, has_aux)(*tree_unflatten(spec, xs))
        value, aux = out if has_aux else (out, None)
        grads = torch.autograd.grad(value, xs, create_graph=True, allow_unused=True)
        live = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
        hv: Sequence[Tensor | None] = (
            torch.autograd.grad([g for g, _ in live], xs, grad_outputs=[v for _, v in live], allow_unused=True)
            if live else [None] * len(xs)
        )
    result = [torch.zeros_like(x) if h is None else h for x, h in zip(xs, hv)]
    aux = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)
    return tuple(tree_unflatten(spec, result)), aux


def _hvp_like(name: str) -> Callable[..., Any]:
    def product(
        f: Callable[..., Any],
        primals: tuple[Any, ...],
        tangents: tuple[Any, ...],
        *,
        has_aux: bool = False,
        mode: Mode = "auto",
    ) -> Any:
        call = _fmt_call(name, f, {"mode": None if mode == "auto" else mode}).replace("(f", "(f, primals, tangents", 1)
        _check_callable(call, f)
        _check_mode(call, mode)
        _check_tangents(call, primals, tangents)
        _check_primals(call, primals, [f"primals[{k}]" for k in range(len(primals))])

        def rev() -> Any:
            if _plain_autograd_ok(primals, tangents):
                return _double_backward(f, call, has_aux, primals, tangents)
            g = _gradient(f, call, has_aux, single=False)
            if has_aux:
                _, pullback, aux = vjp(g, *primals, has_aux=True)
            else:
                (_, pullback), aux = vjp(g, *primals), None
            return pullback(tangents), aux

        def fwd() -> Any:
            g = _gradient(f, call, has_aux, single=False, for_jvp=True)
            if has_aux:
                _, out, aux = jvp(g, primals, tangents, has_aux=True)
                return out, aux
            return jvp(g, primals, tangents)[1], None

        state: dict[str, str | None] = {"mode": None if mode == "auto" else mode}
        out, aux = _run(call, state, {"rev-rev": rev, "fwd-rev": fwd})
        out = out[0] if len(primals) == 1 else tuple(out)
        return (out, aux) if has_aux else out

    return product


_hvp = _hvp_like("hvp")
_vhp = _hvp_like("vhp")


def hvp(
    f: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
) -> Any:
    """Hessian-vector product `H v` of a scalar function, without forming `H`.

    Follows `torch.func.jvp`'s convention: `primals` and `tangents` are tuples with one entry per
    argument of `f`, each tangent shaped like its primal. The Hessian is taken with respect to all
    of `primals`. Works under `torch.func.vmap` over the tangents (many directions in one pass).

    Composition: "rev-rev" is `vjp` of the gradient (double backward); "fwd-rev" is
    `jvp(grad(f))`; "auto" tries "rev-rev" and falls back to "fwd-rev" when an operator lacks a
    rule. Cost: a few times one gradient.

    Args:
        f: a function returning a scalar Tensor (or `(scalar, aux)` with `has_aux=True`).
        primals: the point, a tuple (e.g. `(params,)`).
        tangents: the direction(s), a tuple shaped like `primals`.
        has_aux: f returns `(value, aux)`; the result is then `(Hv, aux)`.
        mode: "auto", "rev-rev" or "fwd-rev".

    Returns:
        `H v`, shaped like `tangents[0]` when there is one primal, else a tuple shaped like
        `tangents`.

    Raises:
        StructureError: tangents do not match primals in structure, shape or dtype.
        OutputError: f does not return a scalar.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> funchess.hvp(f, (p,), ({"w": torch.ones(2)},))
        {'w': tensor([ 6., 12.])}
    """
    return _hvp(f, primals, tangents, has_aux=has_aux, mode=mode)


def vhp(
    f: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
) -> Any:
    """Vector-Hessian product `vᵀ H`, the row form of `hvp` (`torch.autograd.functional.vhp`).

    For a twice continuously differentiable `f` the Hessian is symmetric and `vhp == hvp`; this
    form exists for code written against `torch.autograd.functional`. Same arguments, composition
    and results as `funchess.hvp`.

    Example:
        >>> import torch, funchess
        >>> f = lambda x: (x[0] * x[1] ** 2)
        >>> funchess.vhp(f, (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 0.0]),))
        tensor([0., 4.])
    """
    return _vhp(f, primals, tangents, has_aux=has_aux, mode=mode)


def _jacobian(name: str, forward: bool) -> Callable[..., Callable[..., Any]]:
    def transform(
        f: Callable[..., Any],
        argnums: int | tuple[int, ...] = 0,
        *,
        has_aux: bool = False,
        chunk_size: int | None = None,
    ) -> Callable[..., Any]:
        call = _fmt_call(name, f, {"argnums": argnums or None, "chunk_size": chunk_size})
        _check_callable(call, f)
        check_chunk_size(call, chunk_size)
        single = isinstance(argnums, int)

        @functools.wraps(f)
        def jac_fn(*args: Any, **kwargs: Any) -> Any:
            here = f"{call}(...)"
            nums = _argnums(here, argnums, len(args))
            primals = tuple(args[i] for i in nums)
            _check_primals(here, primals, [f"argument {i}" for i in nums])
            h = _with_primals(f, args, kwargs, nums)

            def checked(*p: Any) -> Any:
                out = h(*p)
                value, aux = _split_aux(here, out, has_aux)
                for leaf in tree_flatten(value)[0]:
                    if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                        raise OutputError(
                            f"{here}: f must return floating-point Tensors (a pytree of them), "
                            f"got {type(leaf).__name__ if not isinstance(leaf, Tensor) else leaf.dtype}. "
                            f"Return the differentiable outputs only (use has_aux=True for others)."
                        )
                return (value, aux) if has_aux else value

            inner = primals[0] if single else primals
            engine = jac_fwd if forward else jac_rev
            state: dict[str, str | None] = {"mode": name}
            J, aux = _run(
                here, state, {name: lambda: engine(checked, primals, inner, has_aux=has_aux, chunk_size=chunk_size)}
            )
            return (J, aux) if has_aux else J

        return jac_fn

    return transform


_jacrev = _jacobian("jacrev", forward=False)
_jacfwd = _jacobian("jacfwd", forward=True)


def jacrev(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Reverse-mode Jacobian, chunked, in torch.func's output format.

    `jacrev(f)(*args)` is the tree product of f's output with `args[argnums]`: a leaf of shape
    `(*out.shape, *arg.shape)` per (output leaf, argument leaf). Composition: one `vjp`, then
    `vmap` over chunks of `chunk_size` output basis vectors, written into one preallocated matrix.
    `funchess.jacfwd(funchess.jacrev(f))` is the Hessian.

    Args:
        f: a function returning a Tensor or a pytree of Tensors (plus aux with `has_aux=True`).
        argnums: the argument(s) to differentiate.
        has_aux: f returns `(output, aux)`; the result is then `(J, aux)`.
        chunk_size: output entries per vectorised pass; None bounds each chunk automatically.

    Example:
        >>> import torch, funchess
        >>> J = funchess.jacrev(lambda x: x ** 2, chunk_size=2)(torch.tensor([1.0, 2.0, 3.0]))
        >>> J
        tensor([[2., 0., 0.],
                [0., 4., 0.],
                [0., 0., 6.]])
    """
    return _jacrev(f, argnums, has_aux=has_aux, chunk_size=chunk_size)


def jacfwd(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Forward-mode Jacobian with `chunk_size` (which `torch.func.jacfwd` lacks).

    Same output format as `funchess.jacrev`. Composition: `vmap` of `jvp` over chunks of
    `chunk_size` input basis vectors. Prefer it when f has fewer inputs than outputs.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p ** 3).sum()
        >>> funchess.jacfwd(funchess.jacrev(f), chunk_size=1)(torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    return _jacfwd(f, argnums, has_aux=has_aux, chunk_size=chunk_size)
