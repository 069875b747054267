"""Chunked Jacobians: the engine under `hessian`, `jacrev` and `jacfwd`.

A Jacobian of `g: primals -> out` is computed in chunks of basis vectors, each chunk one `vmap`ped
pass: rows of `vjp` (reverse mode: the forward and its graph are built once, then reused by every
chunk) or columns of `jvp` (forward mode). Outside torch.func transforms the chunks are written
into one preallocated `(M, N)` matrix, so peak memory is the result plus one chunk's working set;
the returned blocks are views of that matrix. Inside a transform (e.g. under `vmap` for per-sample
Hessians) writing into a buffer is not allowed, so the chunks are concatenated instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ._compat import inside_transform, jvp, vjp
from ._errors import InvalidArgumentError
from ._safe_ops import SecondOrderSafe
from ._tree import blocks_of, offsets, tree_flatten, tree_unflatten

PyTree = Any
_ROW_BUDGET = 1 << 22  # entries of one chunk of result rows when chunk_size is None (16 MiB f32)
_MAX_CHUNK = 256  # measured best on CPU for MLPs: 64-256 (benchmarks/RESULTS.md)

_state = threading.local()


@contextlib.contextmanager
def safe_ops(enabled: bool = True) -> Iterator[SecondOrderSafe | None]:
    """Enter funchess's operator rerouting once (nested transforms reuse the outer one); yields
    the mode, or None when an outer call entered it or `enabled` is False."""
    if not enabled or getattr(_state, "active", False):
        yield None
        return
    _state.active = True
    try:
        with SecondOrderSafe() as mode:
            yield mode
    finally:
        _state.active = False


def check_chunk_size(call: str, chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(
            f"{call}: expected chunk_size to be a positive int or None, got {chunk_size!r}. "
            f"Pass e.g. chunk_size=64 (smaller uses less memory, larger is faster)."
        )


def default_chunk(rows: int, cols: int) -> int:
    """Rows per chunk when the caller gives none: bounded output per chunk, at most 256."""
    return max(1, min(rows, _MAX_CHUNK, _ROW_BUDGET // max(cols, 1)))


def _basis(
    s: int, e: int, shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype], device: torch.device
) -> list[Tensor]:
    """Leaves of the standard basis vectors `s..e-1` of a raveled tree, batched along dim 0."""
    c, total = e - s, offsets(shapes)[-1]
    flat = torch.zeros(c, total, dtype=dtypes[0], device=device)
    idx = torch.arange(c, device=device)
    flat[idx, idx + s] = 1
    off = offsets(shapes)
    return [
        flat[:, off[i] : off[i + 1]].reshape(c, *shapes[i]).to(dtypes[i]) for i in range(len(shapes))
    ]


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, chunk_size):
        yield s, min(n, s + chunk_size)


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


def jac_rev(
    g: Callable[..., Any], primals: tuple[Any, ...], inner: PyTree, *, has_aux: bool, chunk_size: int | None
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
    chunk = chunk_size or default_chunk(M, N)
    fill = _Fill(M, N, by_rows=True)
    pullback = vmap(vjp_fn)
    for s, e in _chunks(M, chunk):
        cot = tree_unflatten(
            out_spec,
            _basis(s, e, out_shapes, [o.dtype for o in out_leaves], out_leaves[0].device),
        )
        rows, _ = tree_flatten(pullback(cot))
        fill.put(s, e, _rows_of(rows, e - s))
        del cot, rows
    J = fill.result(in_leaves[0])
    return blocks_of(J, (out_shapes, out_spec), (in_shapes, in_spec)), aux


def jac_fwd(
    g: Callable[..., Any], primals: tuple[Any, ...], inner: PyTree, *, has_aux: bool, chunk_size: int | None
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
        result = batched(*_basis(s, e, in_shapes, [p.dtype for p in in_leaves], in_leaves[0].device))
        if has_aux:
            result, aux = result
        cols, out_spec = tree_flatten(result)
        if fill is None:
            out_shapes = [c.shape[1:] for c in cols]
            M = offsets(out_shapes)[-1]
            fill = _Fill(M, N, by_rows=False)
            chunk = chunk_size or default_chunk(N, M)
        fill.put(s, e, _rows_of(cols, e - s))
        del result, cols
        s = e
    assert fill is not None and out_spec is not None
    J = fill.result(in_leaves[0])
    return blocks_of(J, (out_shapes, out_spec), ([p.shape for p in tree_flatten(inner)[0]], inner_spec)), aux
