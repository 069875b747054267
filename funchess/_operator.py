"""Matrix-free linear operators over a parameter pytree, and the operations that run on them.

The design follows lineax: one small base class, `LinearOperator`, whose only abstract method is
`mv` (pytree in, pytree out); everything else is derived from it: `@` on a params-shaped pytree, a
flat vector, a matrix of column vectors or a batch of pytrees (chunks of vectors through one
`torch.func.vmap` each), `as_matrix()`, `.T`, `to_scipy()`. Operations that some operators can do
faster than the generic route (`diagonal`, `trace`) are `functools.singledispatch` functions, so a
new operator type registers its own method without editing the base class.

Vectors are flattened in funchess's one stable order (`funchess.ravel`: `named_parameters()`
order), so `op.as_matrix()` has the rows and columns of `funchess.to_matrix(funchess.hessian(...))`.

Operators here:

- `FunctionOperator(fn, structure)`: any linear map given as a pytree -> pytree function (a
  Hessian-, GGN- or Fisher-vector product, ...). Curvature operators are thin subclasses of it.
- `DenseOperator(H, params)`: a materialised Hessian (a block pytree or an `(N, N)` matrix).

The curvature operators (`HessianOperator`, `GGNOperator`, `DatasetOperator`) live in
`funchess/_curvature_operators.py`, one layer up: they need the transforms, this module does not.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ._checks import check_callable, check_chunk_size, relays_warnings
from ._errors import InvalidArgumentError, StructureError, UnsupportedError
from ._memory import budget_of, check_fits, default_chunk
from ._tree import basis, chunks, offsets, promoted_dtype, ravel, to_matrix, tree_flatten, unravel

__all__ = [
    "LinearOperator",
    "FunctionOperator",
    "DenseOperator",
    "diagonal",
    "trace",
]

PyTree = Any


class LinearOperator(abc.ABC):
    """A square linear operator on vectors shaped like a parameter pytree, given matrix-free.

    Subclasses implement `mv` (one pytree in, one pytree out); the rest is derived. `op @ x`
    accepts:

    - a pytree with the structure of `op.structure` (e.g. a params dict): returns a pytree;
    - a batch of such pytrees, every leaf with one extra leading dimension `k`: returns a batch;
    - a 1-D Tensor of `N` entries (a `funchess.ravel`-ed vector): returns a 1-D Tensor;
    - a 2-D Tensor of shape `(N, k)` (k column vectors): returns `(N, k)`, like a matrix product.

    Batches are computed `chunk_size` vectors at a time, each chunk one `torch.func.vmap` of `mv`.

    Attributes:
        structure: a pytree shaped like the operator's input and output vectors (for curvature
            operators, the params themselves).
        shape: `(N, N)`, `N` the total number of entries in `structure`.
        dtype: the dtype of flat vectors (the promoted dtype of the structure's leaves).
        device: where the products are computed.
        symmetric: whether `op.T` is `op` (all curvature operators are symmetric).
        chunk_size: vectors per vectorised pass; None ("auto") bounds each chunk automatically.

    Example:
        >>> import torch, funchess
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = funchess.FunctionOperator(lambda v: {"w": A @ v["w"]}, {"w": torch.zeros(2)})
        >>> op @ {"w": torch.tensor([1.0, 0.0])}
        {'w': tensor([2., 1.])}
        >>> op.as_matrix()
        tensor([[2., 1.],
                [1., 3.]])
    """

    #: the randomness of the `vmap` over vectors: "error", or "same" for an operator that replays
    #: one draw of random numbers in every product (curvature operators with randomness="same")
    randomness: str = "error"

    def __init__(
        self,
        structure: PyTree,
        *,
        symmetric: bool,
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        call = f"funchess.{type(self).__name__}(...)"
        chunk_size = check_chunk_size(call, chunk_size)
        leaves, spec = tree_flatten(structure)
        if not leaves or not all(isinstance(leaf, Tensor) for leaf in leaves):
            raise StructureError(
                f"{call}: expected the structure to be a non-empty pytree of Tensors (e.g. a "
                f"params dict), got {spec if leaves else 'an empty pytree'}. Pass the params the "
                f"operator acts on."
            )
        self.structure = structure
        self.symmetric = symmetric
        self.chunk_size = chunk_size
        self._spec = spec
        self._leaves: list[Tensor] = leaves
        n = offsets([leaf.shape for leaf in leaves])[-1]
        self.shape: tuple[int, int] = (n, n)
        self.dtype: torch.dtype = dtype or promoted_dtype(leaves)
        self.device: torch.device = device or leaves[0].device

    def __repr__(self) -> str:
        return f"funchess.{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    # ------------------------------------------------------------------ the one abstract method

    @abc.abstractmethod
    def mv(self, v: PyTree) -> PyTree:
        """The product with one vector shaped like `structure`; returns a pytree of that shape."""

    # ------------------------------------------------------------------ derived

    def _mv_flat(self, v: Tensor) -> Tensor:
        out = self.mv(unravel(v, self.structure))
        leaves, spec = tree_flatten(out)
        if spec != self._spec or any(
            not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(leaves, self._leaves)
        ):
            got = f"a Tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"{spec}"
            raise StructureError(
                f"funchess.{type(self).__name__}: a product returned {got}; expected a pytree shaped "
                f"like the operator's structure {self._spec} (the vector it was given). Make the "
                f"product function return A v with v's structure and shapes."
            )
        return ravel(out).to(self.dtype)

    def _mm(self, rows: Tensor) -> Tensor:
        """Products with the rows of a `(k, N)` Tensor, `chunk_size` rows per `vmap`."""
        k, n = rows.shape
        if k == 0:
            return rows.clone()
        if k == 1:  # no vmap for a single vector: it saves the batching overhead
            return self._mv_flat(rows[0]).unsqueeze(0)
        size = self.chunk_size or default_chunk(k, n)
        batched = vmap(self._mv_flat, randomness=self.randomness)
        return torch.cat([batched(rows[s:e]) for s, e in chunks(k, size)])

    def _rows(self, call: str, x: Any) -> tuple[Tensor, Callable[[Tensor], Any], bool]:
        """`x` as a `(k, N)` Tensor of rows, the map from result rows back to `x`'s form, and
        whether `x` is one vector (rather than a batch or a matrix)."""
        n = self.shape[0]
        if isinstance(x, Tensor) and x.dim() in (1, 2) and x.shape[0] == n:
            self._check_dtype(call, "x", x.dtype, self.dtype)
            self._check_device(call, "x", x.device)
            if x.dim() == 1:
                return x.unsqueeze(0), lambda r: r[0], True
            return x.T, lambda r: r.T, False
        leaves, spec = tree_flatten(x)
        if spec != self._spec or not all(isinstance(leaf, Tensor) for leaf in leaves):
            got = f"a Tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"{spec}"
            raise StructureError(
                f"{call}: expected a pytree with the operator's structure {self._spec} (or a "
                f"batch of them), a 1-D Tensor of {n} entries, or an (N, k) = ({n}, k) matrix of "
                f"column vectors; got {got}. Build vectors with torch.randn_like on the params, "
                f"or funchess.ravel them."
            )
        first, ref = leaves[0], self._leaves[0]
        batched = first.shape != ref.shape and first.dim() == ref.dim() + 1 and first.shape[1:] == ref.shape
        lead = (first.shape[0],) if batched else ()
        for path, a, b in zip(spec.paths(), leaves, self._leaves, strict=True):
            where = "leaf " + "".join(f"[{q!r}]" for q in path) if path else "x"
            if a.shape != (*lead, *b.shape):
                raise StructureError(
                    f"{call}: {where} has shape {tuple(a.shape)}; expected "
                    f"{(*lead, *b.shape)} ({'a batch of k=' + str(lead[0]) if lead else 'one vector'}"
                    f", like the first leaf). Shape every leaf like the params, with the same "
                    f"leading batch size k in all leaves for a batch."
                )
            self._check_dtype(call, where, a.dtype, b.dtype)
            self._check_device(call, where, a.device)
        if not batched:
            return ravel(x).to(self.dtype).unsqueeze(0), lambda r: unravel(r[0], self.structure), True
        k = first.shape[0]
        flat = torch.cat([leaf.reshape(k, -1).to(self.dtype) for leaf in leaves], 1)
        return flat, lambda r: unravel(r, self.structure), False

    @staticmethod
    def _check_dtype(call: str, what: str, got: torch.dtype, want: torch.dtype) -> None:
        if got != want:
            raise StructureError(
                f"{call}: {what} has dtype {got}; expected {want} (the operator's). Convert it "
                f"with .to({want})."
            )

    def _check_device(self, call: str, what: str, got: torch.device) -> None:
        if got != self.device and self.device.type != "meta":  # a flat DenseOperator's structure is meta
            raise StructureError(
                f"{call}: {what} is on {got}; expected {self.device} (the operator's). Move it with "
                f".to('{self.device}')."
            )

    @relays_warnings
    def __matmul__(self, x: Any) -> Any:
        rows, back, _ = self._rows(f"op @ x (op a funchess.{type(self).__name__})", x)
        return back(self._mm(rows))

    @relays_warnings
    def as_matrix(self, *, max_memory: int | float | str | None = None) -> Tensor:
        """The dense `(N, N)` matrix, `chunk_size` columns at a time (N products in all).

        Rows and columns follow `funchess.ravel` order, so for a `HessianOperator` this equals
        `funchess.to_matrix(funchess.hessian(f)(params, ...))`. Memory: the `N x N` result, planned
        against `max_memory` (bytes or "4GiB"; default 80 % of the device's free memory) before it
        is allocated: a larger one raises a sized `MemoryBudgetError`.

        Example:
            >>> import torch, funchess
            >>> op = funchess.DenseOperator(torch.eye(3) * 2)
            >>> op.as_matrix().diagonal()
            tensor([2., 2., 2.])
        """
        n = self.shape[0]
        call = f"funchess.{type(self).__name__}.as_matrix()"
        budget, budget_from = budget_of(call, max_memory)
        check_fits(call, f"the dense ({n:,}, {n:,}) matrix", n * n * self.dtype.itemsize, self.device, budget,
                   budget_from, "Use products (op @ v), funchess.diagonal, or the spectral tools (funchess.eigsh, "
                   "funchess.trace_estimate)")
        out = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for s, e in chunks(n, self.chunk_size or default_chunk(n, n)):
            out[:, s:e] = self._mm(_basis(s, e, n, self.dtype, self.device)).T
        return out

    def transpose(self) -> LinearOperator:
        """The transposed operator (`op` itself when `op.symmetric`).

        For a non-symmetric operator the product with the transpose is the `torch.func.vjp` of
        `mv` (exact, since `mv` is linear); dense operators transpose their matrix.

        Example:
            >>> import torch, funchess
            >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
            >>> op = funchess.FunctionOperator(lambda v: A @ v, torch.zeros(2), symmetric=False)
            >>> op.T @ torch.tensor([1.0, 0.0])
            tensor([1., 2.])
        """
        return self if self.symmetric else _TransposedOperator(self)

    @property
    def T(self) -> LinearOperator:
        """`op.transpose()`."""
        return self.transpose()

    def to_scipy(self) -> Any:
        """This operator as a `scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out).

        SciPy's `eigsh`, `cg`, `minres`, ... then run on it. Inputs are converted to the operator's
        dtype and device, results back to float64 NumPy arrays; `matmat` uses the batched product.
        Needs SciPy (`pip install 'funchess[scipy]'`).

        Raises:
            UnsupportedError: SciPy is not installed.

        Example:
            >>> import torch, funchess
            >>> from scipy.sparse.linalg import eigsh
            >>> op = funchess.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)))
            >>> round(float(eigsh(op.to_scipy(), k=1)[0][0]), 8)
            5.0
        """
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator as SciPyOperator
        except ImportError as exc:
            raise UnsupportedError(
                f"funchess.{type(self).__name__}.to_scipy(): expected SciPy to be installed, but "
                f"importing scipy.sparse.linalg failed ({exc}). Install it: pip install "
                f"'funchess[scipy]' (or pip install scipy)."
            ) from exc

        def apply(op: LinearOperator, x: Any) -> Any:
            a = np.asarray(x, dtype=np.float64)
            rows = torch.as_tensor(a.reshape(a.shape[0], -1).T.copy()).to(op.dtype).to(op.device)
            out = op._mm(rows).detach().T.to("cpu", torch.float64).numpy()
            return out.reshape(a.shape)

        transposed = self.T
        return SciPyOperator(
            shape=self.shape,
            dtype=np.float64,
            matvec=lambda x: apply(self, x),
            matmat=lambda x: apply(self, x),
            rmatvec=lambda x: apply(transposed, x),
            rmatmat=lambda x: apply(transposed, x),
        )


def _basis(s: int, e: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Rows `s..e-1` of the `(n, n)` identity, made lazily (one chunk at a time)."""
    return basis(s, e, [torch.Size([n])], [dtype], device)[0]


class FunctionOperator(LinearOperator):
    """A linear operator given by a function `fn(v) -> A v` on pytrees shaped like `structure`.

    The generic hook for every matrix-free curvature product: a Hessian-, GGN- or Fisher-vector
    product, a damped or shifted operator, anything linear. `fn` must be linear in `v`; it is
    `vmap`ped over chunks of vectors for batched products (pass `vectorize=False` for a function
    that cannot run under `torch.func.vmap`: then vectors go one at a time).

    Args:
        fn: the product, a pytree -> pytree function with `structure`'s shape.
        structure: a pytree shaped like the vectors (e.g. the params dict).
        symmetric: whether the operator is symmetric (`op.T is op`). For a non-symmetric operator,
            `op.T` is computed by `torch.func.vjp` of `fn`.
        chunk_size: vectors per vectorised pass (None: bounded automatically, at most 256).
        vectorize: `vmap` `fn` over chunks of vectors (default) or loop over them.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["w"] ** 4).sum()
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> op = funchess.FunctionOperator(lambda v: funchess.hvp(f)(params, v), params)
        >>> op @ torch.tensor([1.0, 1.0])
        tensor([12., 48.])
    """

    def __init__(
        self,
        fn: Callable[[PyTree], PyTree],
        structure: PyTree,
        *,
        symmetric: bool = True,
        chunk_size: int | None = None,
        vectorize: bool = True,
    ) -> None:
        check_callable(f"funchess.{type(self).__name__}(fn, structure)", fn, "fn")
        super().__init__(structure, symmetric=symmetric, chunk_size=chunk_size)
        self.fn = fn
        self.vectorize = vectorize

    def mv(self, v: PyTree) -> PyTree:
        """`fn(v)`."""
        return self.fn(v)

    def _mm(self, rows: Tensor) -> Tensor:
        if self.vectorize:
            return super()._mm(rows)
        return torch.stack([self._mv_flat(r) for r in rows]) if len(rows) else rows.clone()


class DenseOperator(LinearOperator):
    """A materialised matrix as an operator: `funchess.hessian`'s block pytree or an `(N, N)` Tensor.

    Products are plain matrix products; `diagonal`, `trace` and `as_matrix` read the matrix. Use it
    to run the spectral tools on a Hessian you already have, or as the exact peer of a
    `HessianOperator` in tests.

    Args:
        H: a Hessian pytree (`H[a][b]` blocks, e.g. from `funchess.hessian`) or a square 2-D Tensor.
        params: the pytree that gives vectors their structure. Required for a Hessian pytree;
            for a plain matrix, None means vectors are flat Tensors of `N` entries.
        symmetric: whether `op.T is op`; None checks the matrix (equal to its transpose up to
            `sqrt(eps)` relative to its largest entry).

    Raises:
        StructureError: the matrix is not square, does not match `params`, or `params` is missing
            for a Hessian pytree.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["a"] ** 2).sum() * p["b"].sum()
        >>> params = {"a": torch.ones(2), "b": torch.ones(1)}
        >>> op = funchess.DenseOperator(funchess.hessian(f)(params), params)
        >>> op @ {"a": torch.ones(2), "b": torch.zeros(1)}
        {'a': tensor([2., 2.]), 'b': tensor([4.])}
    """

    def __init__(self, H: Tensor | PyTree, params: PyTree | None = None, *, symmetric: bool | None = None) -> None:
        call = "funchess.DenseOperator(H, params)"
        if isinstance(H, Tensor):
            matrix = H
        elif params is None:
            raise StructureError(
                f"{call}: H is a Hessian pytree, so params is needed to give vectors their "
                f"structure; got params=None. Pass the params H was computed at."
            )
        else:
            matrix = to_matrix(H)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise StructureError(
                f"{call}: expected a square matrix, got shape {tuple(matrix.shape)}. Pass "
                f"funchess.to_matrix(H) or the Hessian pytree itself."
            )
        if not matrix.is_floating_point() or matrix.is_complex():
            raise InvalidArgumentError(
                f"{call}: expected a real floating-point matrix, got dtype {matrix.dtype}. Convert it "
                f"(e.g. H.double())."
            )
        n = matrix.shape[0]
        if symmetric is None:  # NaNs in mirrored places do not make a matrix asymmetric
            finite = matrix.nan_to_num(0.0, 0.0, 0.0)
            tol = torch.finfo(matrix.dtype).eps ** 0.5 * float(finite.abs().max()) if n else 0.0
            symmetric = (
                bool((finite - finite.T).abs().max() <= tol and torch.equal(matrix.isnan(), matrix.isnan().T)) if n else True
            )
        if params is None:
            params = torch.empty(n, dtype=matrix.dtype, device="meta")
        super().__init__(params, symmetric=symmetric, dtype=matrix.dtype, device=matrix.device)
        if self.shape[0] != n:
            raise StructureError(
                f"{call}: the matrix has side {n} but params have {self.shape[0]} entries; "
                f"expected equal. Pass the params the Hessian was computed at."
            )
        self.matrix = matrix

    def mv(self, v: PyTree) -> PyTree:
        """`H @ v` on one params-shaped pytree."""
        return unravel(self.matrix @ ravel(v).to(self.dtype), self.structure)

    def _mm(self, rows: Tensor) -> Tensor:
        return rows @ self.matrix.T

    def as_matrix(self, *, max_memory: int | float | str | None = None) -> Tensor:
        """The wrapped matrix itself (no copy, so nothing to plan)."""
        return self.matrix

    def transpose(self) -> LinearOperator:
        """The operator of `H.T` (`self` when symmetric)."""
        if self.symmetric:
            return self
        return DenseOperator(self.matrix.T, self.structure, symmetric=False)


class _TransposedOperator(LinearOperator):
    """`A.T` for a matrix-free, non-symmetric `A`: the `vjp` of the linear map `A.mv`."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.structure, symmetric=False, chunk_size=op.chunk_size, dtype=op.dtype, device=op.device)
        self.op = op

    def mv(self, v: PyTree) -> PyTree:
        zero = unravel(torch.zeros(self.shape[0], dtype=self.dtype, device=self.device), self.structure)
        pullback = vjp(self.op.mv, zero)[1]
        return pullback(v)[0]

    def transpose(self) -> LinearOperator:
        return self.op


# ------------------------------------------------------------------------- operations (extensible)


def check_operator(call: str, op: Any) -> LinearOperator:
    if not isinstance(op, LinearOperator):
        raise InvalidArgumentError(
            f"{call}: expected a funchess.LinearOperator (e.g. funchess.HessianOperator(f, "
            f"params, x, y)), got {type(op).__name__}. Wrap a matrix in funchess.DenseOperator "
            f"or a product function in funchess.FunctionOperator."
        )
    return op


@functools.singledispatch
@relays_warnings
def diagonal(op: LinearOperator) -> PyTree:
    """The exact diagonal of an operator, shaped like its `structure` (e.g. per parameter).

    A `functools.singledispatch` function: operator types register a faster method with
    `@funchess.diagonal.register`. The generic method takes `N` products with basis vectors
    (`chunk_size` at a time); a `DenseOperator` reads its matrix. When `N` products are too many,
    use `funchess.diagonal_estimate`.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> funchess.diagonal(funchess.HessianOperator(f, params))
        {'w': tensor([ 6., 12.])}
    """
    op = check_operator("funchess.diagonal(op)", op)
    n = op.shape[0]
    out = torch.empty(n, dtype=op.dtype, device=op.device)
    for s, e in chunks(n, op.chunk_size or default_chunk(n, n)):
        cols = op._mm(_basis(s, e, n, op.dtype, op.device))
        out[s:e] = cols[torch.arange(e - s), torch.arange(s, e)]
    return unravel(out, op.structure)


@diagonal.register
def _(op: DenseOperator) -> PyTree:
    return unravel(op.matrix.diagonal().clone(), op.structure)


@functools.singledispatch
@relays_warnings
def trace(op: LinearOperator) -> Tensor:
    """The exact trace of an operator, a 0-dimensional Tensor.

    A `functools.singledispatch` function like `funchess.diagonal`; the generic method sums
    `funchess.diagonal(op)` (`N` products). For an estimate from a few products use
    `funchess.trace_estimate`.

    Example:
        >>> import torch, funchess
        >>> funchess.trace(funchess.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0]))))
        tensor(6.)
    """
    check_operator("funchess.trace(op)", op)
    return ravel(diagonal(op)).sum()


@trace.register
def _(op: DenseOperator) -> Tensor:
    return op.matrix.trace()
