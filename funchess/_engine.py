"""The block engine under `hessian` and `hessian_diagonal`: every unordered block pair once.

The differentiated arguments are flattened into leaves `0..n-1` (one stable order). A request is a
set of unordered leaf pairs `{x, y}` (all of them for the full Hessian, `{x, x}` for the diagonal
blocks, a selection otherwise). Each pair is computed once, as rows of `H[x][y]`, and mirrored:

- reverse mode ("rev-rev") groups pairs by their *earlier* leaf `x`. For each group it takes the
  gradient with respect to leaf `x` alone as a function of the partner leaves `Y`, then `vmap`s
  its `vjp` over chunks of basis rows of `x`. Leaves outside `Y` are constants, so autograd never
  walks below them: for a tangent in a later layer the second backward pass stops at that layer.
- forward mode ("fwd-rev") groups pairs by their *later* leaf `x` and `vmap`s a `jvp` in the
  directions of `x` through the gradient with respect to `Y`; by symmetry the columns it yields
  are the rows of `H[x][y]`.
- a *joint* group (the full Hessian of a small model, chosen by the planner) has all `N`
  parameters as rows: one forward and backward, then passes of whole rows, of which the sink keeps
  the blocks `H[x][y >= x]` and mirrors the rest.

Sinks receive the rows: `DenseSink` writes the full Hessian into one preallocated `(N, N)` matrix
and copies each computed block's transpose into its mirror (in cache-sized tiles); `SelectedSink`
keeps chosen blocks; `DiagonalSink` keeps only diagonal entries (O(N) memory). Inside torch.func transforms nothing is
written in place: pieces are concatenated instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ._compat import inside_transform, jvp, vjp
from ._tree import (
    basis,
    blocks_of,
    chunks,
    offsets,
    promoted_dtype,
    tree_flatten,
    tree_product,
    tree_unflatten,
)

PyTree = Any
Pair = tuple[int, int]


class Layout:
    """The leaves of the differentiated arguments, their shapes, offsets and names."""

    def __init__(self, primals: tuple[Any, ...], single: bool) -> None:
        self.single = single
        tree = primals[0] if single else primals
        self.leaves, self.spec = tree_flatten(tree)
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.sizes = [leaf.numel() for leaf in self.leaves]
        self.off = offsets(self.shapes)
        self.N = self.off[-1]
        self.names = [".".join(str(k) for k in path) for path in self.spec.paths()]
        self.dtype = promoted_dtype(self.leaves)  # of the one matrix
        self.device = self.leaves[0].device

    def rebuild(self, leaves: Sequence[Tensor]) -> tuple[Any, ...]:
        tree = tree_unflatten(self.spec, leaves)
        return (tree,) if self.single else tuple(tree)

    def block_shape(self, x: int, y: int) -> tuple[int, ...]:
        return (*self.shapes[x], *self.shapes[y])


def groups(pairs: set[Pair], forward: bool) -> list[tuple[int, list[int]]]:
    """Group unordered pairs `(i <= j)`: by `i` in reverse mode, by `j` in forward mode."""
    by: dict[int, set[int]] = {}
    for i, j in pairs:
        x, y = (j, i) if forward else (i, j)
        by.setdefault(x, set()).add(y)
    return [(x, sorted(by[x])) for x in sorted(by)]


def run(
    h: Callable[..., Any],
    layout: Layout,
    request: set[Pair],
    sink: Sink,
    *,
    forward: bool,
    has_aux: bool,
    chunk_for: Callable[[int, int], int],
    joint: bool = False,
    randomness: str = "error",
) -> Any:
    """Compute every pair of `request` into `sink`; returns the aux of the first group (or None).

    `h(*primals)` returns the scalar (or `(scalar, aux)`); `chunk_for(rows, width)` gives the rows
    per vectorised pass for a group whose rows have `width` entries. `joint=True` (the full
    Hessian of a small model) runs one group whose rows are all `N` parameters: one forward and
    backward, then passes of whole Hessian rows, of which the sink keeps the upper blocks.
    `randomness` is the forward-mode `vmap`'s (reverse mode runs each forward outside `vmap`).
    """
    fixed = layout.leaves
    if joint:
        everything = list(range(len(fixed)))
        group = forward_group if forward else reverse_group
        rows_of, aux = group(h, layout, fixed, everything, everything, has_aux, randomness)
        for s, e in chunks(layout.N, max(1, chunk_for(layout.N, layout.N))):
            outs = rows_of(basis(s, e, layout.shapes, [leaf.dtype for leaf in fixed], layout.device))
            for x in everything:  # the rows of leaf x in this pass, its blocks H[x][y >= x]
                lo, hi = max(s, layout.off[x]), min(e, layout.off[x + 1])
                for y in everything[x:] if lo < hi else ():
                    sink.put(x, y, lo - layout.off[x], hi - layout.off[x], outs[y][lo - s : hi - s].reshape(hi - lo, -1))
            del outs
        return aux
    aux_out: Any = None
    first = True
    for x, Y in groups(request, forward):
        width = sum(layout.sizes[y] for y in Y)
        chunk = max(1, chunk_for(layout.sizes[x], width))
        group = forward_group if forward else reverse_group
        rows_of, aux = group(h, layout, fixed, [x], Y, has_aux, randomness)
        if first:
            aux_out, first = aux, False
        for s, e in chunks(layout.sizes[x], chunk):
            outs = rows_of(basis(s, e, [layout.shapes[x]], [fixed[x].dtype], layout.device))
            for y, out in zip(Y, outs):
                sink.put(x, y, s, e, out.reshape(e - s, -1))
            del outs
    return aux_out


def _place(fixed: Sequence[Tensor], D: Sequence[int], values: Sequence[Tensor]) -> list[Tensor]:
    leaves = list(fixed)
    for i, t in zip(D, values):
        leaves[i] = t
    return leaves


def reverse_group(
    h: Callable[..., Any], layout: Layout, fixed: Sequence[Tensor], X: list[int], D: list[int], has_aux: bool,
    randomness: str = "error",
) -> tuple[Callable[[Sequence[Tensor]], Sequence[Tensor]], Any]:
    """Rows of `H[X][D]`: the `vjp` (w.r.t. leaves `D`) of the gradient w.r.t. leaves `X`, `vmap`ped
    over basis rows given as one Tensor per leaf of `X`."""

    def grad_X(*d: Tensor) -> Any:
        def inner(*lx: Tensor) -> Any:
            return h(*layout.rebuild(_place(_place(fixed, D, d), X, lx)))

        out = vjp(inner, *[d[D.index(x)] if x in D else fixed[x] for x in X], has_aux=has_aux)
        gx = out[1](torch.ones_like(out[0]))
        return (gx, out[2]) if has_aux else gx

    out = vjp(grad_X, *[fixed[i] for i in D], has_aux=has_aux)
    pullback = vmap(lambda *rows: out[1](rows))
    return lambda rows: pullback(*rows), (out[2] if has_aux else None)


def forward_group(
    h: Callable[..., Any], layout: Layout, fixed: Sequence[Tensor], X: list[int], D: list[int], has_aux: bool,
    randomness: str = "error",
) -> tuple[Callable[[Sequence[Tensor]], Sequence[Tensor]], Any]:
    """Rows of `H[X][D]` (columns of `H[D][X]`, by symmetry): `vmap` of the `jvp` along basis
    directions of leaves `X` through the gradient w.r.t. leaves `D`. The forward runs inside the
    `vmap`: with `randomness="same"` every direction sees one draw of random numbers."""

    def grads_D(*lx: Tensor) -> Any:
        def inner(*d: Tensor) -> Any:
            return h(*layout.rebuild(_place(_place(fixed, X, lx), D, d)))

        out = vjp(inner, *[lx[X.index(i)] if i in X else fixed[i] for i in D], has_aux=has_aux)
        # the pullback under a size-one vmap: forward mode over some plain pullbacks crashes
        # ("ZeroTensors are immutable" in mse_loss_backward, pytorch#123996)
        grads = vmap(out[1])(torch.ones_like(out[0]).unsqueeze(0))
        grads = tuple(g[0] for g in grads)
        return (grads, out[2]) if has_aux else grads

    primals = tuple(fixed[x] for x in X)

    def push(*t: Tensor) -> Any:
        if has_aux:
            _, tangent_out, aux = jvp(grads_D, primals, t, has_aux=True)
            return tangent_out, aux
        return jvp(grads_D, primals, t)[1]

    out_dims: Any = (0, None) if has_aux else 0
    batched = vmap(push, out_dims=out_dims, randomness=randomness)

    def rows_of(rows: Sequence[Tensor]) -> Sequence[Tensor]:
        result = batched(*rows)
        return result[0] if has_aux else result  # type: ignore[no-any-return]

    if has_aux:  # aux without a vectorised pass: one plain evaluation
        aux0 = h(*layout.rebuild(list(fixed)))[1]
        return rows_of, aux0
    return rows_of, None


# ----------------------------------------------------------------------------- sinks


class Sink:
    """Receives rows `s..e` of block `H[x][y]` as a `(e - s, numel(y))` piece."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.functional = inside_transform()
        self.pieces: dict[Pair, list[Tensor]] = {}

    def put(self, x: int, y: int, s: int, e: int, piece: Tensor) -> None:
        raise NotImplementedError

    def _collect(self, x: int, y: int, piece: Tensor) -> None:
        self.pieces.setdefault((x, y), []).append(piece)

    def _assembled(self, x: int, y: int) -> Tensor:
        if (x, y) not in self.pieces:  # an empty leaf: no rows were computed
            return self._zeros(x, y)
        return torch.cat(self.pieces[(x, y)], 0).reshape(self.layout.block_shape(x, y))

    def _zeros(self, x: int, y: int) -> Tensor:
        lay = self.layout
        return torch.zeros(lay.block_shape(x, y), dtype=lay.dtype, device=lay.device)


def transposed(block: Tensor, ndim_x: int) -> Tensor:
    """`H[y][x]` from `H[x][y]` (shape `(*x, *y)` -> `(*y, *x)`), as a view."""
    ndim_y = block.dim() - ndim_x
    return block.permute((*range(ndim_x, ndim_x + ndim_y), *range(ndim_x)))


class DenseSink(Sink):
    """The full Hessian: one preallocated `(N, N)` matrix; mirrors are copied in `finish`."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.M: Tensor | None = None
        self.computed: set[Pair] = set()

    def put(self, x: int, y: int, s: int, e: int, piece: Tensor) -> None:
        if self.functional:
            self._collect(x, y, piece)
            return
        off = self.layout.off
        if self.M is None:
            self.M = piece.new_empty(self.layout.N, self.layout.N, dtype=self.layout.dtype)
        self.M[off[x] + s : off[x] + e, off[y] : off[y + 1]].copy_(piece)
        self.computed.add((x, y))

    def finish(self) -> PyTree:
        lay = self.layout
        outer = (lay.shapes, lay.spec)
        if not self.functional:
            if self.M is None:  # no rows: every leaf is empty
                self.M = torch.zeros(lay.N, lay.N, dtype=lay.dtype, device=lay.device)
            M, off = self.M, lay.off
            for x, y in self.computed:
                if x != y:
                    _mirror(M, off[x], off[x + 1], off[y], off[y + 1])
            return blocks_of(M, outer, outer)
        computed = {xy: self._assembled(*xy) for xy in self.pieces}

        def block(a: int, b: int) -> Tensor:
            if (a, b) in computed:
                return computed[(a, b)]
            if (b, a) in computed:
                return transposed(computed[(b, a)], len(lay.shapes[b]))
            return self._zeros(a, b)  # an empty leaf: no rows were computed

        return tree_product(outer, outer, block)


_TILE = 512


def _mirror(M: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
    """`M[c0:c1, r0:r1] = M[r0:r1, c0:c1].T` in square tiles: a whole-block transposed copy
    strides through memory; square tiles stay in cache (benchmarks/RESULTS.md)."""
    for i in range(r0, r1, _TILE):
        ie = min(r1, i + _TILE)
        for j in range(c0, c1, _TILE):
            je = min(c1, j + _TILE)
            M[j:je, i:ie].copy_(M[i:ie, j:je].T)


class SelectedSink(Sink):
    """Chosen blocks, each in its own buffer; a requested mirror is a transposed view."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.buffers: dict[Pair, Tensor] = {}

    def put(self, x: int, y: int, s: int, e: int, piece: Tensor) -> None:
        if self.functional:
            self._collect(x, y, piece)
            return
        buf = self.buffers.get((x, y))
        if buf is None:
            buf = self.buffers[(x, y)] = piece.new_empty(self.layout.sizes[x], self.layout.sizes[y])
        buf[s:e].copy_(piece)

    def finish(self, wanted: Sequence[Pair]) -> dict[str, dict[str, Tensor]]:
        lay = self.layout
        if self.functional:
            computed = {xy: self._assembled(*xy) for xy in self.pieces}
        else:
            computed = {xy: buf.reshape(lay.block_shape(*xy)) for xy, buf in self.buffers.items()}
        out: dict[str, dict[str, Tensor]] = {}
        for a, b in sorted(wanted):
            if (a, b) in computed:
                block = computed[(a, b)]
            elif (b, a) in computed:
                block = transposed(computed[(b, a)], len(lay.shapes[b]))
            else:  # an empty leaf: no rows were computed
                block = self._zeros(a, b)
            out.setdefault(lay.names[a], {})[lay.names[b]] = block
        return out


class DiagonalSink(Sink):
    """Only the diagonal entries of diagonal blocks: O(N) memory."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.diag: dict[int, Tensor] = {}

    def put(self, x: int, y: int, s: int, e: int, piece: Tensor) -> None:
        idx = torch.arange(e - s, device=piece.device)
        values = piece[idx, idx + s]
        if self.functional:
            self._collect(x, x, values)
            return
        buf = self.diag.get(x)
        if buf is None:
            buf = self.diag[x] = values.new_empty(self.layout.sizes[x])
        buf[s:e].copy_(values)

    def finish(self, leaves: Sequence[int], as_tree: bool) -> PyTree:
        lay = self.layout
        def empty(x: int) -> Tensor:  # an empty leaf: no rows were computed
            return torch.zeros(lay.shapes[x], dtype=lay.leaves[x].dtype, device=lay.device)

        if self.functional:
            vals = {x: torch.cat(self.pieces[(x, x)]).reshape(lay.shapes[x]) if (x, x) in self.pieces else empty(x) for x in leaves}
        else:
            vals = {x: self.diag[x].reshape(lay.shapes[x]) if x in self.diag else empty(x) for x in leaves}
        if as_tree:
            return tree_unflatten(lay.spec, [vals[x] for x in range(len(lay.leaves))])
        return {lay.names[x]: vals[x] for x in leaves}
