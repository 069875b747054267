"""Curvature as matrix-free operators: the Hessian or GGN of one batch, or of a whole data set.

Each is a `funchess.LinearOperator` (products with pytrees, flat vectors, `(N, k)` matrices and
batches of pytrees; `as_matrix`, `to_scipy`), so every spectral tool (`eigsh`, `trace_estimate`,
`diagonal_estimate`, `spectral_density`, `cg`, `diagonal`, `trace`) runs on every one of them.

- `HessianOperator(f, params, *data)`: the Hessian of one batch.
- `GGNOperator(f, params, inputs, targets)`: the GGN of one batch.
- `DatasetOperator(f, params, data, curvature=...)`: the curvature of the loss over every batch
  of `data` (a `DataLoader`, a list of `(inputs, targets)` batches).

Each builds its linearisation once (`funchess/_linearisation.py`: the gradient's graph, or the
GGN's three graphs, per batch) at its first product and keeps it while the memory budget allows
(`reuse=`, `max_memory=`; `_Kept`): every product is then backward passes of kept graphs.
Otherwise products are fresh: one `funchess.hvp` / `ggn_vp` per vector, `vmap`ped over chunks; a
batch of vectors loads each group of batches of a data set once.

Randomness follows one rule: `randomness="error"` (default) refuses a function that draws random
numbers; `"same"` draws them once, when the operator is made, and replays that draw in every
product, so the operator is one fixed linear map (as `eigsh` and `cg` need).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ._checks import (
    ChunkSize,
    Mode,
    Reduction,
    call_f,
    call_label,
    check_callable,
    check_chunk_size,
    check_mode,
    check_primals,
    check_progress,
    check_randomness,
    check_reduction,
    check_scalar,
    relabel,
    relays_warnings,
)
from ._compat import inside_transform
from ._compose import RandomState, check_function, differentiable, usable
from ._dataset import DATA_RANDOMNESS, DatasetProducts, SumAt
from ._errors import FunchessError, InvalidArgumentError
from ._ggn import ggn_vp, split_loss
from ._hvp import hvp
from ._linearisation import BATCHINGS, GGNAt, HessianAt, plain_autograd_ok
from ._memory import budget_of, default_budget, default_chunk
from ._operator import FunctionOperator
from ._tree import chunks, offsets, tree_flatten, tree_map, unravel

__all__ = ["HessianOperator", "GGNOperator", "DatasetOperator"]

PyTree = Any
Reuse = Union[bool, Literal["auto"]]  # noqa: UP007 (a runtime alias on Python 3.10)
_OPERATOR_RANDOMNESS: tuple[str, ...] = ("error", "same")


def _refuse_loader(call: str, data: tuple[Any, ...]) -> None:
    """A data loader where one batch is expected: point at `DatasetOperator`."""
    for d in data:
        if isinstance(d, DataLoader):
            raise InvalidArgumentError(
                f"{call}: expected one batch (e.g. inputs, targets), got a DataLoader. For the "
                f"curvature of a whole data set use funchess.DatasetOperator(f, params, loader)."
            )


def _check_reuse(call: str, reuse: Any, mode: str = "auto") -> None:
    if not (reuse is True or reuse is False or (isinstance(reuse, str) and reuse == "auto")):
        raise InvalidArgumentError(
            f"{call}: expected reuse to be True, False or 'auto', got {reuse!r}. Keep 'auto' (the "
            f"linearisation is kept while it fits the memory budget), or pass False for fresh "
            f"products."
        )
    if reuse is True and mode == "fwd-rev":
        raise InvalidArgumentError(
            f"{call}: reuse=True keeps the reverse-mode linearisation (the gradient's graph), which "
            f"mode='fwd-rev' does not build; expected mode 'auto' or 'rev-rev'. Drop reuse=True, "
            f"or pass mode='rev-rev'."
        )


def _check_point(call: str, evaluate: Callable[[PyTree], Any], randomness: str, params: PyTree) -> None:
    """One forward at the operator's point when the operator is made, so that data the model cannot
    take, a loss that is not a scalar or (with randomness="error") random operations are refused
    naming the operator, not at its first product inside a spectral tool. Nothing is differentiated."""
    guard = (
        RandomState(tree_flatten(params)[0][0].device).guard(call)
        if randomness == "error" and not inside_transform() else contextlib.nullcontext()
    )
    with differentiable(), guard:  # at parameters that require grad: an in-place write into them is refused
        value = call_f(call, evaluate, tree_map(lambda t: (t.clone() if t.is_inference() else t.detach()).requires_grad_(True), params))
    check_scalar(call, value)


def _told_as(call: str, product: Callable[..., PyTree], *args: Any) -> PyTree:
    """`product(*args)`, an inner transform's errors told as the operator's."""
    try:
        return product(*args)
    except FunchessError as exc:
        raise relabel(call, exc) from exc


class _Replayed:
    """A product function that restores the generators to their state at construction before each
    call (randomness="same"), so every product sees the same random numbers."""

    def __init__(self, fn: Callable[[PyTree], PyTree], rng: RandomState) -> None:
        self.fn, self.rng = fn, rng

    def __call__(self, v: PyTree) -> PyTree:
        self.rng.replay()
        return self.fn(v)


Linearisation = Union[HessianAt, GGNAt, SumAt]  # noqa: UP007 (a runtime alias on Python 3.10)
#: `build(rewind, limit)`: the linearisation (built with `rewind` restoring the random state before
#: a redone forward), or None when the graphs it keeps pass `limit` bytes (None: no limit).
Build = Callable[[Callable[[], None], Union[int, None]], Union[Linearisation, None]]  # noqa: UP007


def _within(lin: HessianAt | GGNAt, limit: int | None) -> Linearisation | None:
    return lin if limit is None or lin.kept_bytes() <= limit else None


class _Kept:
    """An operator's products through one linearisation (`funchess/_linearisation.py`): built at
    the first product made outside torch.func transforms, then every product is backward passes
    of it. With reuse="auto" it is kept when the storages its graphs hold (counted once, as it is
    built) fit half the memory budget, since they stay allocated between products; with
    reuse=True always; otherwise, or when building or differentiating it fails (e.g. an operator
    without a double-backward rule), products are the fresh ones (`fresh`).

    Holds no reference to the operator, so the graph is freed with the operator."""

    def __init__(
        self, call: str, build: Build, fresh: Callable[[PyTree], PyTree], params: PyTree, reuse: Any,
        budget: int | None, rng: RandomState, randomness: str, *, guard: bool = True,
    ) -> None:
        self.call, self.build, self.fresh = call, build, fresh
        self.leaves, self.spec = tree_flatten(params)
        self.reuse, self.budget, self.rng, self.randomness = reuse, budget, rng, randomness
        self.guard = guard and randomness == "error"  # refuse a build that drew random numbers
        self.lin: Linearisation | None = None
        self.off = reuse is False
        self.batchings = list(BATCHINGS)  # how k products go at once; one that fails is dropped

    def _linearised(self) -> Linearisation | None:
        """The linearisation, built on the first call that can build it; None for fresh products."""
        if self.lin is not None or self.off or not plain_autograd_ok(self.leaves):
            return self.lin
        limit = None
        if self.reuse == "auto":  # the kept graphs stay allocated between products
            limit = (self.budget if self.budget is not None else default_budget(self.leaves[0].device)) // 2
        before = self.rng.snapshot()
        self.rng.replay()  # randomness other than "error": the draws of the operator's construction
        try:
            with differentiable():
                self.lin = self.build(self.rng.replay, limit)
        except FunchessError:
            raise
        except (RuntimeError, NotImplementedError):
            self.lin = None  # the fresh products say what went wrong (or fall back to another mode)
        finally:
            if self.guard:
                self.rng.refuse_draws(self.call, before)
        self.off = self.lin is None
        return self.lin

    def mv(self, v: PyTree) -> PyTree:
        lin = self._linearised()
        if lin is not None:
            try:
                vs = cast(list[Tensor], self.spec.flatten_up_to(v))
                return self.spec.unflatten(lin.mv(vs))
            except (RuntimeError, NotImplementedError):
                if not inside_transform():  # e.g. no double-backward rule: fresh products from now on
                    self.lin, self.off = None, True
        return self.fresh(v)

    def mm(self, Vs: list[Tensor]) -> list[Tensor] | None:
        """Products with `k` vectors (leaves `(k, *shape)`), or None when they are fresh ones."""
        lin = self._linearised()
        if lin is None:
            return None
        try:
            if Vs[0].shape[0] == 1:  # one vector: no batching to pay for
                return [t.unsqueeze(0) for t in lin.mv([V[0] for V in Vs])]
            while self.batchings:
                try:
                    return lin.mm(Vs, self.batchings[0])
                except (RuntimeError, NotImplementedError):
                    self.batchings.pop(0)  # a backward without a batching rule: the next way
            outs = [lin.mv([V[i] for V in Vs]) for i in range(Vs[0].shape[0])]
            return [torch.stack(leaf) for leaf in zip(*outs)]
        except (RuntimeError, NotImplementedError):
            self.lin, self.off = None, True
            return None


class _CurvatureOperator(FunctionOperator):
    """A `FunctionOperator` whose products go through a `_Kept` linearisation where it can."""

    _kept: _Kept

    def _mm(self, rows: Tensor) -> Tensor:
        if inside_transform() or not rows.shape[0]:
            return self._fresh_mm(rows)
        k, n = rows.shape
        pieces = []
        for s, e in chunks(k, self.chunk_size or default_chunk(k, n)):
            V = [rows[s:e, a:b].reshape(e - s, *leaf.shape).to(leaf.dtype) for leaf, a, b in self._slices]
            got = self._kept.mm(V)
            if got is None:
                return self._fresh_mm(rows)
            pieces.append(torch.cat([t.reshape(e - s, -1) for t in got], 1).to(self.dtype))
        return torch.cat(pieces)

    def _fresh_mm(self, rows: Tensor) -> Tensor:
        """Products without the kept linearisation."""
        return super()._mm(rows)

    @property
    def _slices(self) -> list[tuple[Tensor, int, int]]:
        """Each leaf of the structure with its columns `a:b` in a raveled vector."""
        off = offsets([leaf.shape for leaf in self._leaves])
        return [(leaf, off[i], off[i + 1]) for i, leaf in enumerate(self._leaves)]

    @property
    def reused(self) -> bool:
        """Whether products go through the kept linearisation (False before the first product)."""
        return self._kept.lin is not None


class HessianOperator(_CurvatureOperator):
    """The Hessian of `f(params, *data)` w.r.t. `params`, as a matrix-free operator.

    The linearisation is built once and reused: the first product (made outside torch.func
    transforms) takes the gradient of `f` with `create_graph=True` and keeps its graph; every
    product is then one backward of that graph with the vector as its cotangent (`k` vectors:
    one batched backward, by autograd's `is_grads_batched`), so the forward and the first
    backward are never repeated. `f` and the data are evaluated at that first product: the
    operator is one fixed linear map, as `eigsh` and `cg` need. With `reuse="auto"` (default) the
    graph is kept when the storages it holds fit half of `max_memory`, since they stay allocated
    between products; `reuse=False` gives fresh products, each one `funchess.hvp` (batched ones
    `vmap` it over chunks of `chunk_size` vectors, so the forward and first backward run once per
    chunk). `mode="fwd-rev"`, or an operator without a double-backward rule under "auto", gives
    fresh products. The graph is freed with the operator (`del H`). Products work under
    `torch.func.vmap` over the vector either way, and nothing of size `N x N` is ever formed.
    `f` is typically the function from `funchess.functional(model, loss_fn)`, and `data` one batch
    `(inputs, targets)`; for a whole data set use `funchess.DatasetOperator`.

    Args:
        f: a function returning a scalar Tensor; the Hessian is taken w.r.t. its first argument.
        params: the point, a pytree of floating Tensors (e.g. the params dict).
        *data: the remaining arguments of `f` (e.g. `inputs, targets`), held fixed.
        mode: `funchess.hvp`'s mode: "auto", "rev-rev" or "fwd-rev".
        chunk_size: vectors per vectorised pass ("auto": bounded automatically).
        randomness: "error" (default) refuses an `f` that draws random numbers; "same" draws them
            once (when the operator is made) and replays them in every product.
        reuse: "auto" (default), True (keep the linearisation whatever its size) or False (fresh
            products); see above. `H.reused` tells which products the operator is giving.
        max_memory: the memory budget `reuse="auto"` compares the kept graph with (bytes or
            "4GiB"; default 80 % of the device's free memory).

    The operator evaluates `f` once when it is made (a forward, nothing differentiated), so data
    the model cannot take, a loss that is not a scalar or random operations are refused there,
    naming the operator, rather than inside the first product of a spectral tool.

    Raises:
        InvalidArgumentError: f is not callable, bad options, params empty or not floating
            point, a DataLoader given as data, or data the model cannot take.
        OutputError: f does not return a scalar.
        UnsupportedError: f draws random numbers with randomness="error".

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> H = funchess.HessianOperator(f, params, x, y)
        >>> H.shape
        (26, 26)
        >>> v = {k: torch.randn_like(p) for k, p in params.items()}
        >>> Hv = H @ v
        >>> torch.allclose(funchess.ravel(Hv), H.as_matrix() @ funchess.ravel(v), atol=1e-5)
        True
    """

    @relays_warnings
    def __init__(
        self,
        f: Callable[..., Any],
        params: PyTree,
        *data: Any,
        mode: Mode = "auto",
        chunk_size: ChunkSize = "auto",
        randomness: str = "error",
        reuse: Reuse = "auto",
        max_memory: int | float | str | None = None,
    ) -> None:
        call = call_label("HessianOperator", {"mode": mode, "chunk_size": chunk_size, "randomness": randomness,
                                              "reuse": reuse, "max_memory": max_memory}, first="f, params, *data")
        check_callable(call, f)
        check_mode(call, mode)
        check_chunk_size(call, chunk_size)
        check_randomness(call, randomness, _OPERATOR_RANDOMNESS)
        _check_reuse(call, reuse, mode)
        budget, _ = budget_of(call, max_memory)
        check_primals(call, (params,), ["params"])
        check_function(call, f)
        _refuse_loader(call, data)
        params, data = usable(params), usable(data)
        self.f, self.params, self.data, self.mode, self.randomness = f, params, data, mode, randomness
        product = hvp(f, mode=mode, randomness=randomness)
        rng = RandomState(tree_flatten(params)[0][0].device)
        if randomness != "error":
            rng.save()  # the draws every product replays

        def mv(v: PyTree) -> PyTree:
            return _told_as(f"{call} @ v", product, params, v, *data)

        leaves, spec = tree_flatten(params)

        def h(p: PyTree) -> Any:
            return f(p, *data)

        def build(rewind: Callable[[], None], limit: int | None) -> Linearisation | None:
            return _within(HessianAt(f"{call} @ v", h, leaves, spec.unflatten, rewind=rewind), limit)

        fresh = _Replayed(mv, rng) if randomness != "error" else mv
        self._kept = _Kept(f"{call} @ v", build, fresh, params, reuse, budget, rng, randomness)
        self._kept.off = self._kept.off or mode == "fwd-rev"  # forward mode keeps no reverse graph
        _check_point(call, h, randomness, params)
        super().__init__(self._kept.mv, params, symmetric=True, chunk_size=chunk_size if chunk_size != "auto" else None)
        self.randomness = "same" if randomness != "error" else "error"  # the vmap over vectors

    @property
    def args(self) -> tuple[Any, ...]:
        """The data the operator holds fixed (the name before funchess 0.2)."""
        return self.data


class GGNOperator(_CurvatureOperator):
    """The generalised Gauss-Newton matrix `Jᵀ H_z J` of one batch, as a matrix-free operator.

    The linearisation is built once and reused, as in `funchess.HessianOperator`: the first
    product keeps the model output's graph, the graph of its pullback as a function of the
    cotangent (whose backward gives `J v`) and the loss gradient's at the output (whose backward
    gives `H_z u`); every product is then three backward passes and no forward. Fresh products
    (`reuse=False`, or a graph over half the budget) are one `funchess.ggn_vp` each (one forward
    and two backward passes, no forward-mode rules needed), batched ones `vmap`ped over chunks of
    `chunk_size` vectors. Positive semi-definite for convex losses, so `funchess.cg` needs no
    damping beyond its null space.

    Args:
        f: `funchess.functional(model, loss_fn)`'s function, or a model-output function
            `f(params, inputs)` with `loss_fn=`.
        params: the point.
        inputs, targets: one batch.
        loss_fn: the loss of `(output, targets)` when `f` is a model-output function.
        chunk_size: vectors per vectorised pass ("auto": bounded automatically).
        randomness, reuse, max_memory: as for `funchess.HessianOperator`.

    Like `funchess.HessianOperator`, it evaluates the loss once when it is made, so bad data or a
    loss that is not a scalar is refused there.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> G = funchess.GGNOperator(f, params, x, y)
        >>> torch.allclose(G.as_matrix(), funchess.to_matrix(funchess.ggn(f)(params, x, y)), atol=1e-6)
        True
    """

    @relays_warnings
    def __init__(
        self,
        f: Callable[..., Any],
        params: PyTree,
        inputs: Any,
        targets: Any = None,
        *,
        loss_fn: Callable[..., Tensor] | None = None,
        chunk_size: ChunkSize = "auto",
        randomness: Any = "error",
        reuse: Reuse = "auto",
        max_memory: int | float | str | None = None,
    ) -> None:
        call = call_label("GGNOperator", {"loss_fn": loss_fn, "chunk_size": chunk_size, "randomness": randomness,
                                          "reuse": reuse, "max_memory": max_memory}, first="f, params, inputs, targets")
        output, loss = split_loss(call, f, loss_fn)
        check_chunk_size(call, chunk_size)
        check_randomness(call, randomness, _OPERATOR_RANDOMNESS)
        _check_reuse(call, reuse)
        budget, _ = budget_of(call, max_memory)
        check_primals(call, (params,), ["params"])
        check_function(call, f)
        _refuse_loader(call, (inputs, targets))
        params, inputs, targets = usable(params), usable(inputs), usable(targets)
        product = ggn_vp(f, loss_fn=loss_fn, randomness=randomness)
        self.f, self.params, self.inputs, self.targets = f, params, inputs, targets
        rng = RandomState(tree_flatten(params)[0][0].device)
        if randomness != "error":
            rng.save()

        def mv(v: PyTree) -> PyTree:
            return _told_as(f"{call} @ v", product, params, v, inputs, targets)

        leaves, spec = tree_flatten(params)

        def build(rewind: Callable[[], None], limit: int | None) -> Linearisation | None:
            return _within(GGNAt(f"{call} @ v", lambda p: output(p, inputs), lambda z: loss(z, targets), leaves,
                                 spec.unflatten, rewind=rewind), limit)

        fresh = _Replayed(mv, rng) if randomness != "error" else mv
        self._kept = _Kept(f"{call} @ v", build, fresh, params, reuse, budget, rng, randomness)
        _check_point(call, lambda p: loss(output(p, inputs), targets), randomness, params)
        super().__init__(self._kept.mv, params, symmetric=True, chunk_size=chunk_size if chunk_size != "auto" else None)
        self.randomness = "same" if randomness != "error" else "error"


class DatasetOperator(_CurvatureOperator):
    """The Hessian or GGN of the loss over a whole data set, as a matrix-free operator.

    `DatasetOperator(f, params, data)` is the operator of `funchess.dataset_hessian(f)(params,
    data)` (or of `dataset_ggn` with `curvature="ggn"`), with the same weighting (`reduction`, the
    loss's normaliser); `data` is a `DataLoader` or any re-iterable of `(inputs, targets)` batches
    (a list; not a one-shot generator, since fresh products iterate it). The first product
    iterates the data once and keeps every group of batches' linearisation (as
    `funchess.HessianOperator` keeps one batch's) while their graphs together fit half of
    `max_memory`; later products are then backward passes of the kept graphs and read no data.
    Otherwise every product iterates the data: one product with a batch of `k` vectors (what the
    spectral tools ask for) iterates it once, every group of batches taking all `k` vectors in
    one `vmap`.

    Args:
        f: the batch loss `f(params, inputs, targets)` (a model-output function with `loss_fn=`
            for `curvature="ggn"`).
        params: the point.
        data: the batches.
        curvature: "hessian" (default) or "ggn".
        loss_fn: the loss of `(output, targets)` for `curvature="ggn"` with a model-output `f`; refused
            with `curvature="hessian"`, where `f` is the loss itself.
        reduction: "mean" (default) or "sum": how f reduces over a batch.
        mode: `funchess.hvp`'s mode (Hessian products).
        chunk_size: vectors per pass over the data ("auto": bounded automatically).
        progress: a bar over the batches of each pass (True, None for terminals only, False).
        randomness: "error" (default) refuses random operations; "different" gives every batch
            its own random numbers, drawn when the operator is made and replayed in every product.
        reuse: "auto" (default) keeps every group's linearisation after the first product's pass
            over the data while their graphs fit half of `max_memory`, so later products read
            no data; True keeps them whatever their size; False iterates the data for every
            product (see `funchess.HessianOperator`).
        max_memory: the memory budget for `reuse` (bytes or "4GiB"; default 80 % of the
            device's free memory).

    Raises:
        InvalidArgumentError: bad options, or data given as a one-shot iterator.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        >>> H = funchess.DatasetOperator(f, params, loader)
        >>> torch.allclose(H.as_matrix(), funchess.to_matrix(funchess.hessian(f)(params, x, y)), atol=1e-6)
        True
        >>> top = funchess.eigsh(H, k=1, generator=torch.Generator().manual_seed(0))
    """

    @relays_warnings
    def __init__(
        self,
        f: Callable[..., Any],
        params: PyTree,
        data: Iterable[Any],
        *,
        curvature: str = "hessian",
        loss_fn: Callable[..., Tensor] | None = None,
        reduction: Reduction = "mean",
        mode: Mode = "auto",
        chunk_size: ChunkSize = "auto",
        progress: bool | None = False,
        randomness: str = "error",
        reuse: Reuse = "auto",
        max_memory: int | float | str | None = None,
    ) -> None:
        call = call_label("DatasetOperator", {"curvature": curvature, "loss_fn": loss_fn, "reduction": reduction,
                                              "mode": mode, "chunk_size": chunk_size, "progress": progress,
                                              "randomness": randomness, "reuse": reuse, "max_memory": max_memory},
                          first="f, params, data")
        check_callable(call, f)
        if curvature not in ("hessian", "ggn"):
            raise InvalidArgumentError(f"{call}: expected curvature to be 'hessian' or 'ggn', got {curvature!r}.")
        if curvature == "hessian" and loss_fn is not None:
            raise InvalidArgumentError(
                f"{call}: expected no loss_fn with curvature='hessian' (f is then the loss itself; "
                f"loss_fn separates the model output from the loss for curvature='ggn'), got "
                f"loss_fn={getattr(loss_fn, '__name__', type(loss_fn).__name__)}. Pass f = "
                f"funchess.functional(model, loss_fn) without loss_fn=, or curvature='ggn'."
            )
        check_mode(call, mode)
        check_chunk_size(call, chunk_size)
        check_reduction(call, reduction)
        check_progress(call, progress)
        check_randomness(call, randomness, DATA_RANDOMNESS)
        _check_reuse(call, reuse, mode)
        budget, _ = budget_of(call, max_memory)
        check_primals(call, (params,), ["params"])
        check_function(call, f)
        if iter(data) is data:  # type: ignore[comparison-overlap]
            raise InvalidArgumentError(
                f"{call}: expected data that can be iterated again for every product (a DataLoader "
                f"or a list of batches), got a one-shot {type(data).__name__}. Pass list(data)."
            )
        params = usable(params)
        self.f, self.params, self.data, self.curvature = f, params, data, curvature
        products = DatasetProducts(call, f, curvature, loss_fn=loss_fn, reduction=reduction, mode=mode, randomness=randomness)
        here = f"{call}(...) @ v"
        rng = RandomState(tree_flatten(params)[0][0].device)
        rng.save()

        def mv(v: PyTree) -> PyTree:
            rng.replay()
            return products(here, params, v, data, progress)

        def build(rewind: Callable[[], None], limit: int | None) -> Linearisation | None:
            return products.linearise(here, params, data, progress, limit, rewind)

        self._products, self._here, self._rng, self._progress = products, here, rng, progress
        # each group is guarded as it is built (a data loader draws its own seeds as it iterates)
        self._kept = _Kept(here, build, mv, params, reuse, budget, rng, randomness, guard=False)
        self._kept.off = self._kept.off or mode == "fwd-rev"
        super().__init__(self._kept.mv, params, symmetric=True, chunk_size=chunk_size if chunk_size != "auto" else None,
                         vectorize=False)

    def _fresh_mm(self, rows: Tensor) -> Tensor:
        """`k` products in one pass over the data: the vectors go through each group together."""
        if rows.shape[0] <= 1:
            return super()._fresh_mm(rows)
        k, n = rows.shape
        pieces = []
        for s, e in chunks(k, self.chunk_size or default_chunk(k, n)):
            self._rng.replay()
            V = unravel(rows[s:e], self.structure)
            out = self._products(self._here, self.params, V, self.data, self._progress, batched=True)
            pieces.append(ravel_batched(out, e - s).to(self.dtype))
        return torch.cat(pieces)


def ravel_batched(tree: PyTree, k: int) -> Tensor:
    """A batch of `k` pytrees (leaves `(k, *shape)`) as a `(k, N)` Tensor, in `ravel` order."""
    leaves = tree_flatten(tree)[0]
    return torch.cat([leaf.reshape(k, -1) for leaf in leaves], 1)

