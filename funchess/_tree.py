"""Pytrees of tensors: one stable ordering, ravel/unravel, and Hessian blocks <-> one dense matrix.

Every function here flattens dicts in *insertion* order (so a params dict keeps the order of
`named_parameters()`), tuples and lists by position, through optree. A Hessian of a pytree `P` is
the *tree product* of `P` with itself (JAX's convention): the leaf at `H[a][b]` has shape
`(*a.shape, *b.shape)`, and flattening `H` visits the blocks row by row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from ._compat import inside_transform
from ._errors import StructureError

__all__ = ["ravel", "unravel", "to_matrix", "from_matrix"]

PyTree = Any
_NAMESPACE = "funchess"


def tree_flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten with funchess's one ordering: dicts in insertion order, sequences by position; other
    mappings (`collections.UserDict`, HuggingFace's `BatchEncoding`, ...) like dicts."""
    with optree.dict_insertion_ordered(True, namespace=_NAMESPACE):
        leaves, spec = optree.tree_flatten(tree, namespace=_NAMESPACE)
        mappings = {type(leaf) for leaf in leaves if not isinstance(leaf, Tensor) and isinstance(leaf, Mapping)}
        if not mappings:
            return leaves, spec
        for cls in mappings:  # once per type: registered, the next flatten looks inside
            _register_mapping(cls)
        return tree_flatten(tree)


def _register_mapping(cls: type) -> None:
    """Flatten a mapping type like a dict (keys in order); rebuild it as `cls(dict)` where that works
    (UserDict and its subclasses), else as a plain dict."""

    def flatten(m: Mapping[Any, Any]) -> tuple[list[Any], tuple[Any, ...], tuple[Any, ...]]:
        keys = tuple(m.keys())
        return [m[k] for k in keys], keys, keys

    def unflatten(keys: tuple[Any, ...], children: Sequence[Any]) -> Any:
        data = dict(zip(keys, children))
        try:
            return cls(data)
        except Exception:  # a mapping type that cannot be built from a dict
            return data

    with contextlib.suppress(ValueError):  # registered meanwhile (another thread)
        optree.register_pytree_node(cls, flatten, unflatten, namespace=_NAMESPACE)  # type: ignore[arg-type]


def tree_unflatten(spec: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    """Inverse of `tree_flatten`."""
    return optree.tree_unflatten(spec, list(leaves))


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """`optree.tree_map` with funchess's ordering (`rest` must share `tree`'s structure)."""
    leaves, spec = tree_flatten(tree)
    others = [spec.flatten_up_to(r) for r in rest]
    return tree_unflatten(spec, [fn(*xs) for xs in zip(leaves, *others)])


def tree_product(
    outer: tuple[list[torch.Size], optree.PyTreeSpec],
    inner: tuple[list[torch.Size], optree.PyTreeSpec],
    block: Callable[[int, int], Tensor],
) -> PyTree:
    """Build the tree product: `outer`'s structure with each leaf `i` replaced by `inner`'s
    structure whose leaf `j` is `block(i, j)`."""
    (outer_shapes, outer_spec), (inner_shapes, inner_spec) = outer, inner
    rows = [
        tree_unflatten(inner_spec, [block(i, j) for j in range(len(inner_shapes))])
        for i in range(len(outer_shapes))
    ]
    return tree_unflatten(outer_spec, rows)


def promoted_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype all of `tensors` promote to (one matrix or vector holding them all)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def offsets(shapes: Sequence[torch.Size]) -> list[int]:
    """Start offset of each leaf in the raveled vector, plus the total at the end."""
    out = [0]
    for s in shapes:
        out.append(out[-1] + math.prod(s))
    return out


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` of consecutive chunks of `size` (the last may be shorter) covering `0..n`."""
    for s in range(0, n, size):
        yield s, min(n, s + size)


def basis(
    s: int, e: int, shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype], device: torch.device
) -> list[Tensor]:
    """Standard basis vectors `s..e-1` of a raveled pytree with leaves of `shapes` and `dtypes`,
    made lazily one chunk at a time: one Tensor `(e - s, *shape)` per leaf."""
    out = []
    a = 0
    for shape, dtype in zip(shapes, dtypes):
        n = math.prod(shape)
        flat = torch.zeros(e - s, n, dtype=dtype, device=device)
        lo, hi = max(s, a), min(e, a + n)
        if lo < hi:
            idx = torch.arange(lo, hi, device=device)
            flat[idx - s, idx - a] = 1
        out.append(flat.reshape(e - s, *shape))
        a += n
    return out


def blocks_of(
    matrix: Tensor,
    outer: tuple[list[torch.Size], optree.PyTreeSpec],
    inner: tuple[list[torch.Size], optree.PyTreeSpec],
) -> PyTree:
    """View a dense `(*batch, M, N)` matrix as the tree product of `outer` (rows) and `inner`
    (columns); leading batch dimensions stay leading dimensions of every block.

    The blocks are views of `matrix` when it is laid out row-major (no copy)."""
    ro, co = offsets(outer[0]), offsets(inner[0])
    batch = matrix.shape[:-2]

    def block(i: int, j: int) -> Tensor:
        sub = matrix[..., ro[i] : ro[i + 1], co[j] : co[j + 1]]
        return sub.reshape((*batch, *outer[0][i], *inner[0][j]))  # a view whenever the layout allows

    return tree_product(outer, inner, block)


def _check_tensor_leaves(call: str, leaves: list[Any], what: str) -> None:
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise StructureError(
                f"{call}: expected a pytree whose leaves are Tensors ({what}), got a leaf of type "
                f"{type(leaf).__name__}. Pass dicts/tuples/lists of Tensors only."
            )


def ravel(tree: PyTree) -> Tensor:
    """Concatenate the leaves of a pytree of tensors into one 1-D vector.

    Leaves are visited in funchess's one stable order (dicts in insertion order, i.e. the order of
    `named_parameters()`), the same order `to_matrix` uses for rows and columns. Leaves of different
    dtypes are promoted to a common dtype.

    Args:
        tree: a Tensor, or a dict/tuple/list (nested freely) of Tensors.

    Returns:
        A 1-D Tensor of length `sum(leaf.numel())`.

    Example:
        >>> import torch, funchess
        >>> p = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
        >>> v = funchess.ravel(p)
        >>> v.shape
        torch.Size([8])
        >>> funchess.unravel(v, p)["w"].shape
        torch.Size([2, 3])
    """
    leaves, _ = tree_flatten(tree)
    _check_tensor_leaves("funchess.ravel(tree)", leaves, "e.g. a params dict")
    if not leaves:
        return torch.zeros(0)
    dtype = promoted_dtype(leaves)
    return torch.cat([leaf.reshape(-1).to(dtype) for leaf in leaves])


def unravel(flat: Tensor, like: PyTree) -> PyTree:
    """Split a 1-D vector into a pytree shaped (and typed) like `like`; the inverse of `ravel`.

    Args:
        flat: a 1-D Tensor with `sum(leaf.numel() for leaf in like)` entries (or a Tensor with more
            dimensions whose *last* dimension has that size: leading dimensions are kept as batch
            dimensions of every leaf).
        like: the pytree whose structure, shapes and dtypes the result takes.

    Returns:
        A pytree with `like`'s structure; leaf `i` has shape `(*batch, *like_i.shape)`. Leaves are
        views of `flat` where the dtype allows.

    Example:
        >>> import torch, funchess
        >>> p = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> funchess.unravel(torch.arange(3.0), p)
        {'w': tensor([0., 1.]), 'b': tensor([2.])}
    """
    leaves, spec = tree_flatten(like)
    _check_tensor_leaves("funchess.unravel(flat, like)", leaves, "like")
    shapes = [leaf.shape for leaf in leaves]
    off = offsets(shapes)
    if not isinstance(flat, Tensor) or flat.dim() < 1 or flat.shape[-1] != off[-1]:
        got = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
        raise StructureError(
            f"funchess.unravel(flat, like): expected a Tensor whose last dimension has "
            f"{off[-1]} entries (the total size of `like`), got {got}. Ravel the same pytree "
            f"with funchess.ravel, or pass the `like` it came from."
        )
    batch = flat.shape[:-1]
    out = [
        flat[..., off[i] : off[i + 1]].reshape((*batch, *shapes[i])).to(leaves[i].dtype)
        for i in range(len(leaves))
    ]
    return tree_unflatten(spec, out)


def _hessian_layout(
    call: str, H: PyTree, batch_dims: int = 0
) -> tuple[list[Tensor], list[torch.Size], int]:
    """Blocks of a Hessian tree in row-major order, the parameter shapes, and the block count n.

    With `batch_dims`, every block has that many leading batch dimensions (e.g. samples)."""
    blocks, _ = tree_flatten(H)
    _check_tensor_leaves(call, blocks, "the blocks of a Hessian")
    n = math.isqrt(len(blocks))
    if n == 0 or n * n != len(blocks):
        raise StructureError(
            f"{call}: expected a Hessian pytree (n*n blocks, e.g. from funchess.hessian), got "
            f"{len(blocks)} leaves. Pass the full Hessian, not a row or a selection of blocks."
        )
    batch = blocks[0].shape[:batch_dims]
    shapes: list[torch.Size] = []
    for i in range(n):
        diag = blocks[i * n + i]
        if diag.dim() < batch_dims or diag.shape[:batch_dims] != batch or (diag.dim() - batch_dims) % 2:
            lead = f"{batch_dims} batch dimension(s) {tuple(batch)}, then " if batch_dims else ""
            hint = "" if batch_dims else " (per-sample Hessians, with a leading sample dimension, need batch_dims=1)"
            raise StructureError(
                f"{call}: diagonal block {i} has shape {tuple(diag.shape)}, expected {lead}"
                f"(*p.shape, *p.shape) with an even number of dimensions. Pass a Hessian pytree{hint}."
            )
        k = (diag.dim() - batch_dims) // 2
        shapes.append(diag.shape[batch_dims : batch_dims + k])
    for i in range(n):
        for j in range(n):
            want = (*batch, *shapes[i], *shapes[j])
            if tuple(blocks[i * n + j].shape) != want:
                raise StructureError(
                    f"{call}: block ({i}, {j}) has shape {tuple(blocks[i * n + j].shape)}, "
                    f"expected {want} from the diagonal blocks. Pass an unmodified Hessian pytree."
                )
    return blocks, shapes, n


def _shared_base(
    blocks: list[Tensor], shapes: list[torch.Size], n: int, batch: tuple[int, ...] = ()
) -> Tensor | None:
    """The dense matrix the blocks are views of, if they came from one (zero-copy `to_matrix`)."""
    base = blocks[0]._base
    off = offsets(shapes)
    N = off[-1]
    if base is None or tuple(base.shape) != (*batch, N, N):
        return None
    for i in range(n):
        for j in range(n):
            b = blocks[i * n + j]
            if b._base is not base:
                return None
            expect = base[..., off[i] : off[i + 1], off[j] : off[j + 1]]
            if b.storage_offset() != expect.storage_offset():
                return None
            if b.numel() and b.stride() != expect.reshape(b.shape).stride():
                return None
    return base


def to_matrix(H: PyTree, *, batch_dims: int = 0) -> Tensor:
    """The dense `(N, N)` matrix of a Hessian pytree, rows and columns in `ravel` order.

    `H` is a tree product as returned by `funchess.hessian` (or `torch.func.hessian`): block
    `H[a][b]` has shape `(*params[a].shape, *params[b].shape)`. Rows and columns follow the
    parameters in insertion (`named_parameters()`) order, so `to_matrix(H) @ ravel(v)` equals
    `ravel(hvp(v))`.

    When the blocks are views of one matrix (what `funchess.hessian` returns) that matrix is returned
    without a copy, so it shares memory with the blocks; otherwise a new matrix is built.

    Args:
        H: a Hessian pytree.
        batch_dims: leading batch dimensions every block carries, e.g. 1 for the per-sample
            Hessians of `funchess.per_sample_hessian` (blocks `(B, *a.shape, *b.shape)`).

    Returns:
        A Tensor of shape `(*batch, N, N)`, `N` the total number of parameter entries.

    Example:
        >>> import torch, funchess
        >>> H = funchess.hessian(lambda p: (p["a"] ** 2).sum() * p["b"].sum())(
        ...     {"a": torch.ones(2), "b": torch.ones(1)})
        >>> funchess.to_matrix(H)
        tensor([[2., 0., 2.],
                [0., 2., 2.],
                [2., 2., 0.]])
    """
    call = f"funchess.to_matrix(H{f', batch_dims={batch_dims!r}' if batch_dims else ''})"
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise StructureError(
            f"{call}: expected batch_dims to be a non-negative int, got {batch_dims!r}. Pass 0 "
            f"for a Hessian, 1 for per-sample Hessians."
        )
    blocks, shapes, n = _hessian_layout(call, H, batch_dims)
    batch = blocks[0].shape[:batch_dims]
    base = _shared_base(blocks, shapes, n, batch)
    if base is not None:
        return base
    off = offsets(shapes)
    dtype = promoted_dtype(blocks)
    if inside_transform():  # under vmap/grad nothing can be written into a new buffer: concatenate
        sizes = [off[i + 1] - off[i] for i in range(n)]
        rows = [
            torch.cat([blocks[i * n + j].reshape(*batch, sizes[i], sizes[j]).to(dtype) for j in range(n)], -1)
            for i in range(n)
        ]
        return torch.cat(rows, -2)
    out = torch.empty(*batch, off[-1], off[-1], dtype=dtype, device=blocks[0].device)
    for i in range(n):
        for j in range(n):
            out[..., off[i] : off[i + 1], off[j] : off[j + 1]] = blocks[i * n + j].reshape(
                *batch, off[i + 1] - off[i], off[j + 1] - off[j]
            )
    return out


def from_matrix(M: Tensor, params: PyTree) -> PyTree:
    """View a dense `(N, N)` matrix as a Hessian pytree shaped by `params`; inverse of `to_matrix`.

    Block `H[a][b]` is a view of `M[rows(a), cols(b)]` with shape `(*params[a].shape,
    *params[b].shape)`, in the same order `ravel` uses. No data is copied.

    Args:
        M: a square 2-D Tensor whose side is the total number of entries in `params`, or a
            stack of them `(*batch, N, N)` (the blocks then keep the leading batch dimensions).
        params: the pytree (e.g. a params dict) that fixes the block structure and shapes.

    Returns:
        The Hessian pytree (nested dicts for a params dict).

    Example:
        >>> import torch, funchess
        >>> p = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> H = funchess.from_matrix(torch.eye(6), p)
        >>> H["w"]["b"].shape
        torch.Size([2, 2, 2])
        >>> torch.equal(funchess.to_matrix(H), torch.eye(6))
        True
    """
    leaves, spec = tree_flatten(params)
    _check_tensor_leaves("funchess.from_matrix(M, params)", leaves, "params")
    shapes = [leaf.shape for leaf in leaves]
    N = offsets(shapes)[-1]
    if not isinstance(M, Tensor) or M.dim() < 2 or tuple(M.shape[-2:]) != (N, N):
        got = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise StructureError(
            f"funchess.from_matrix(M, params): expected a square matrix of side {N} (the number "
            f"of entries in params), got {got}. Pass the params the matrix was built from."
        )
    return blocks_of(M, (shapes, spec), (shapes, spec))
