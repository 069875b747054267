"""`jacrev` and `jacfwd`: chunked Jacobians in torch.func's output format.

A Jacobian of `g: primals -> out` is computed in chunks of basis vectors, each chunk one `vmap`ped
pass: rows of `vjp` (reverse mode: the forward and its graph are built once, then reused by every
chunk) or columns of `jvp` (forward mode). Outside torch.func transforms the chunks are written
into one preallocated `(M, N)` matrix, so peak memory is the result plus one chunk's working set;
the returned blocks are views of that matrix. Inside a transform (e.g. under `vmap`) writing into a
buffer is not allowed, so the chunks are concatenated instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import (
    ChunkSize,
    argnums_of,
    call_f,
    call_label,
    check_callable,
    check_chunk_size,
    check_primals,
    relays_warnings,
    split_aux,
)
from ._compat import inside_transform, jvp, vjp
from ._compose import check_function, random_errors, run_modes, usable, with_primals
from ._errors import OutputError
from ._memory import budget_of, check_fits, default_chunk
from ._tree import basis, blocks_of, chunks, offsets, promoted_dtype, tree_flatten, tree_unflatten

__all__ = ["jacrev", "jacfwd", "jac_rev", "jac_fwd"]

PyTree = Any
#: jacfwd pushes every direction through its own forward, so random numbers differ between the
#: columns: the fix is the reverse-mode Jacobian, whose one forward draws them once.
_JACFWD_RANDOM = "the function to funchess.jacrev instead (one forward pass, so one draw of the random numbers)"


class _Fill:
    """Collects `(c, width)` pieces of a matrix: into a preallocated buffer, or for concatenation."""

    def __init__(self, rows: int, cols: int, by_rows: bool) -> None:
        self.rows, self.cols, self.by_rows = rows, cols, by_rows
        self.functional = inside_transform()
        self.out: Tensor | None = None
        self.pieces: list[Tensor] = []

    def put(self, s: int, e: int, piece: Tensor) -> None:
        """`piece` is `(e - s, cols)` rows (by_rows) or `(e - s, rows)` columns, transposed."""
        if self.functional:
            self.pieces.append(piece)
            return
        if self.out is None:
            self.out = piece.new_empty(self.rows, self.cols)
        if self.by_rows:
            self.out[s:e].copy_(piece)
        else:
            self.out[:, s:e].copy_(piece.T)

    def result(self, like: Tensor) -> Tensor:
        if self.out is not None:
            return self.out
        if not self.pieces:
            return like.new_zeros(self.rows, self.cols)
        cat = torch.cat(self.pieces, 0)
        return cat if self.by_rows else cat.T


def _rows_of(leaves: Sequence[Tensor], c: int) -> Tensor:
    return torch.cat([leaf.reshape(c, -1) for leaf in leaves], 1)


#: `plan(M, N, itemsize, device)`: raise before an `(M, N)` Jacobian is allocated if it cannot fit.
Plan = Callable[[int, int, int, torch.device], None]


def jac_rev(
    g: Callable[..., Any], primals: tuple[Any, ...], inner: PyTree, *, has_aux: bool, chunk_size: int | None,
    plan: Plan | None = None,
) -> tuple[PyTree, Any]:
    """Reverse-mode Jacobian of `g(*primals)`; columns structured like `inner` (primals or primals[0])."""
    if has_aux:
        out, vjp_fn, aux = vjp(g, *primals, has_aux=True)
    else:
        (out, vjp_fn), aux = vjp(g, *primals), None
    out_leaves, out_spec = tree_flatten(out)
    in_leaves, in_spec = tree_flatten(inner)
    out_shapes, in_shapes = [o.shape for o in out_leaves], [p.shape for p in in_leaves]
    M, N = offsets(out_shapes)[-1], offsets(in_shapes)[-1]
    if plan is not None:
        plan(M, N, promoted_dtype(in_leaves).itemsize, in_leaves[0].device)
    chunk = chunk_size or default_chunk(M, N)
    fill = _Fill(M, N, by_rows=True)
    pullback = vmap(vjp_fn)
    for s, e in chunks(M, chunk):
        cot = tree_unflatten(
            out_spec,
            basis(s, e, out_shapes, [o.dtype for o in out_leaves], out_leaves[0].device),
        )
        rows, _ = tree_flatten(pullback(cot))
        fill.put(s, e, _rows_of(rows, e - s))
        del cot, rows
    J = fill.result(in_leaves[0])
    return blocks_of(J, (out_shapes, out_spec), (in_shapes, in_spec)), aux


def jac_fwd(
    g: Callable[..., Any], primals: tuple[Any, ...], inner: PyTree, *, has_aux: bool, chunk_size: int | None,
    plan: Plan | None = None,
) -> tuple[PyTree, Any]:
    """Forward-mode Jacobian of `g(*primals)`, one `vmap`ped `jvp` per chunk of input directions."""
    in_leaves, in_spec = tree_flatten(primals)
    _, inner_spec = tree_flatten(inner)
    in_shapes = [p.shape for p in in_leaves]
    N = offsets(in_shapes)[-1]

    def push(*tangent_leaves: Tensor) -> Any:
        tangents = tree_unflatten(in_spec, tangent_leaves)
        if has_aux:
            _, out, aux = jvp(g, primals, tuple(tangents), has_aux=True)
            return out, aux
        return jvp(g, primals, tuple(tangents))[1]

    out_dims: int | tuple[int | None, ...] = (0, None) if has_aux else 0
    batched = vmap(push, out_dims=out_dims)  # type: ignore[arg-type]
    fill: _Fill | None = None
    out_shapes: list[torch.Size] = []
    out_spec = None
    aux = None
    chunk = chunk_size or default_chunk(N, N)  # resized below once the output size is known
    s = 0
    while s < N:
        e = min(N, s + chunk)
        result = batched(*basis(s, e, in_shapes, [p.dtype for p in in_leaves], in_leaves[0].device))
        if has_aux:
            result, aux = result
        cols, out_spec = tree_flatten(result)
        if fill is None:
            out_shapes = [c.shape[1:] for c in cols]
            M = offsets(out_shapes)[-1]
            if plan is not None:  # the first chunk told M: plan the whole result before allocating it
                plan(M, N, promoted_dtype(in_leaves).itemsize, in_leaves[0].device)
            fill = _Fill(M, N, by_rows=False)
            chunk = chunk_size or default_chunk(N, M)
        fill.put(s, e, _rows_of(cols, e - s))
        del result, cols
        s = e
    assert fill is not None and out_spec is not None
    J = fill.result(in_leaves[0])
    return blocks_of(J, (out_shapes, out_spec), ([p.shape for p in tree_flatten(inner)[0]], inner_spec)), aux


def _jacobian(
    name: str, forward: bool, f: Callable[..., Any], argnums: Any, has_aux: bool, chunk_size: Any, max_memory: Any
) -> Callable[..., Any]:
    call = call_label(name, {"argnums": argnums, "has_aux": has_aux, "chunk_size": chunk_size, "max_memory": max_memory})
    check_callable(call, f)
    chunk = check_chunk_size(call, chunk_size)
    budget, budget_from = budget_of(call, max_memory)
    single = isinstance(argnums, int)

    @functools.wraps(f)
    @relays_warnings
    def jac_fn(*args: Any, **kwargs: Any) -> Any:
        here = f"{call}(...)"
        check_function(here, f)
        args, kwargs = usable(args), usable(kwargs)
        nums = argnums_of(here, argnums, len(args))
        primals = tuple(args[i] for i in nums)
        check_primals(here, primals, [f"argument {i}" for i in nums])
        h = with_primals(f, args, kwargs, nums)

        def checked(*p: Any) -> Any:
            value, aux = split_aux(here, call_f(here, h, *p), has_aux)
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
        def plan(M: int, N: int, itemsize: int, device: torch.device) -> None:
            check_fits(here, f"the ({M:,}, {N:,}) Jacobian", M * N * itemsize, device, budget, budget_from,
                       "Use products instead (torch.func.vjp / jvp, funchess.hvp), or fewer outputs or inputs")

        def run() -> Any:
            with random_errors(here, _JACFWD_RANDOM if forward else None):
                return engine(checked, primals, inner, has_aux=has_aux, chunk_size=chunk, plan=plan)

        J, aux = run_modes(here, name, {name: run})
        return (J, aux) if has_aux else J

    return jac_fn


def jacrev(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
) -> Callable[..., Any]:
    """Reverse-mode Jacobian, chunked, in torch.func's output format.

    `jacrev(f)(*args)` is the tree product of f's output with `args[argnums]`: a leaf of shape
    `(*out.shape, *arg.shape)` per (output leaf, argument leaf). Composition: one `vjp`, then
    `vmap` over chunks of `chunk_size` output basis vectors, written into one preallocated matrix.
    `funchess.jacfwd(funchess.jacrev(f))` is the Hessian. A function that draws random numbers
    (dropout in train mode) runs forward once, so the Jacobian is that of one draw, as with
    `torch.func.jacrev`; `funchess.jacfwd` refuses it (every column would draw anew).

    Args:
        f: a function returning a Tensor or a pytree of Tensors (plus aux with `has_aux=True`).
        argnums: the argument(s) to differentiate.
        has_aux: f returns `(output, aux)`; the result is then `(J, aux)`.
        chunk_size: output entries (rows) per vectorised pass; "auto" (default; `None` means the
            same) bounds each chunk's result automatically.
        max_memory: the budget for the `(M, N)` result (bytes or "4GiB"; default 80 % of the
            device's free memory): a larger Jacobian raises a sized `MemoryBudgetError` before it
            is allocated.

    Example:
        >>> import torch, funchess
        >>> J = funchess.jacrev(lambda x: x ** 2, chunk_size=2)(torch.tensor([1.0, 2.0, 3.0]))
        >>> J
        tensor([[2., 0., 0.],
                [0., 4., 0.],
                [0., 0., 6.]])
    """
    return _jacobian("jacrev", False, f, argnums, has_aux, chunk_size, max_memory)


def jacfwd(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
) -> Callable[..., Any]:
    """Forward-mode Jacobian with `chunk_size` (which `torch.func.jacfwd` lacks).

    Same output format and options as `funchess.jacrev` (with `max_memory`, the result is planned
    once the first chunk has told its size). Composition: `vmap` of `jvp` over chunks of
    `chunk_size` input basis vectors (columns). Prefer it when f has fewer inputs than outputs.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p ** 3).sum()
        >>> funchess.jacfwd(funchess.jacrev(f), chunk_size=1)(torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    return _jacobian("jacfwd", True, f, argnums, has_aux, chunk_size, max_memory)
