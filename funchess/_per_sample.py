"""Per-sample curvature: gradients, Hessians and Hessian-vector products of every sample's loss.

The convention (`funchess/_samples.py`): `f(params, *data)` is a loss over a *batch*, every
Tensor in `data` holds the samples along dim 0, and the loss of sample `i` is `f` on a batch of
one. The same `f` therefore serves the batch Hessian (`funchess.hessian(f)`) and the per-sample
ones; with a mean-reduced loss, `per_sample_hessian(f)(...).mean(0)` is `hessian(f)(...)`.

`per_sample_hessian` has four routes:

- deterministic `f`, outside transforms: `funchess.hessian`'s symmetric block engine with the
  samples as one more `vmap` dimension, every piece written straight into the `(B, N, N)` result
  (`_engine_route`); for a small result (`B * N * N` entries at most `_JOINT_ENTRIES`), the joint
  pass over whole rows instead (`_joint_route`), where one forward and backward per sample costs
  less than one per parameter leaf. Both skip the operator rerouting when one sample's forward
  meets no rerouted operator;
- inside an outer transform (no writing into buffers): `vmap(funchess.hessian)` over chunks of
  samples, concatenated (`_vmapped_route`);
- random `f` (`randomness` other than "error"): `jvp`/`vjp` of the `vmap`ped per-sample gradient,
  the generators replayed before every pass so a sample sees one mask (`_replay_route`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import (
    ChunkSize,
    Randomness,
    call_f,
    call_label,
    check_callable,
    check_chunk_size,
    check_mode,
    check_out,
    check_primals,
    check_randomness,
    check_tangent,
    deprecated,
    scalar_output,
)
from ._compat import inside_transform, jvp, vjp
from ._compose import RandomState, differentiable, random_error, run_modes, usable
from ._engine import Layout, forward_group, groups, reverse_group
from ._errors import UnsupportedError
from ._hessian import hessian
from ._memory import MAX_CHUNK, PASS_ENTRIES, budget_of, check_fits
from ._safe_ops import safe_ops
from ._samples import PER_SAMPLE_FIX, Samples, check_per_sample, expand, per_sample_data, per_sample_gradients
from ._tree import basis, blocks_of, chunks, promoted_dtype, tree_flatten, tree_unflatten

__all__ = ["per_sample_grad", "per_sample_hessian", "per_sample_hvp", "sample_chunks"]

PyTree = Any
_REPLAY_ORDER: tuple[str, ...] = ("fwd-rev", "rev-rev")  # with dropout: fwd-rev measured faster
_ENGINE_ORDER: tuple[str, ...] = ("rev-rev", "fwd-rev")  # deterministic f: the block engine, rev-rev first
#: Per-sample Hessians with at most this many entries in all (`B * N * N`) take the joint pass:
#: there the block engine's forward and backward per parameter leaf cost more than the joint
#: pass's doubled second pass (calibrated on CPU MLPs, benchmarks/bench_per_sample.py).
_JOINT_ENTRIES = 2**21


def sample_chunks(call: str, name: str, sample_chunk_size: Any, chunk_size: Any, *, rows_too: bool) -> tuple[Any, Any]:
    """`(sample_chunk_size, chunk_size)` after the 0.2 renaming. Before 0.2, per-sample functions'
    `chunk_size` counted samples; now `sample_chunk_size` does and `chunk_size` counts rows (in
    `per_sample_hessian`, `rows_too`) or is the deprecated spelling of `sample_chunk_size`."""
    if rows_too:  # the default sample_chunk_size is None, so an explicit "auto" silences the warning
        if chunk_size not in (None, "auto") and sample_chunk_size is None:
            deprecated(
                f"{call}: chunk_size now counts Hessian rows per pass (before funchess 0.2 it counted "
                f"samples, which sample_chunk_size counts now). Pass sample_chunk_size= too to "
                f"silence this warning; it goes away in funchess 0.3."
            )
        return sample_chunk_size, chunk_size
    if chunk_size not in (None, "auto"):
        deprecated(
            f"{call}: chunk_size is deprecated for samples per pass; use sample_chunk_size= "
            f"(chunk_size counts rows or vectors everywhere in funchess). It is removed in funchess 0.3."
        )
        if sample_chunk_size in (None, "auto"):
            return chunk_size, "auto"
    return sample_chunk_size, chunk_size


def _run(call: str, mode: str, runners: dict[str, Callable[[], Any]], order: Sequence[str], safe: bool = True) -> Any:
    """`run_modes`, with torch's vmap randomness error named for per-sample functions."""
    try:
        return run_modes(call, mode, runners, order=order, safe=safe)  # type: ignore[no-any-return]
    except UnsupportedError as exc:
        translated = random_error(call, exc.__cause__, PER_SAMPLE_FIX) if exc.__cause__ is not None else None
        if translated is not None:
            raise translated from exc.__cause__
        raise


# ----------------------------------------------------------------------------- Hessians


def _pass_sizes(samples: int, n: int, sample_chunk: int | None, rows: int | None) -> tuple[int, int]:
    """Samples and Hessian rows per pass: each pass produces at most `PASS_ENTRIES` entries."""
    if sample_chunk is None:
        least = min(n, 32, rows or n)
        sample_chunk = max(1, min(samples, PASS_ENTRIES // max(least * n, 1)))
    if rows is None:
        rows = max(1, min(n, MAX_CHUNK, PASS_ENTRIES // max(sample_chunk * n, 1)))
    return min(sample_chunk, max(samples, 1)), rows


@dataclass
class _Call:
    """One `per_sample_hessian` call: the checked data, sizes and the result buffer."""

    here: str
    f: Callable[..., Any]
    params: PyTree
    samples: Samples
    layout: Layout
    B: int
    b_chunk: int
    rows: int
    out: Tensor | None
    randomness: str

    @property
    def ell(self) -> Callable[..., Any]:
        return self.samples.loss(self.f)

    def result(self) -> Tensor:
        lay = self.layout
        if self.out is not None:
            return self.out
        M: Tensor = lay.leaves[0].new_empty(self.B, lay.N, lay.N, dtype=lay.dtype)
        return M


def _needs_rerouting(c: _Call) -> bool:
    """Whether one sample's forward meets an operator funchess reroutes (`_safe_ops.py`): if not,
    the derivative passes run without the rerouting and its Python call per operator. The forward
    must not draw random numbers (randomness="error")."""
    rng = RandomState(c.layout.device)
    before = rng.snapshot()
    point = tree_unflatten(c.layout.spec, [t.detach().requires_grad_(True) for t in c.layout.leaves])
    try:  # at parameters that require grad, with grad on: an in-place write into them is refused
        with differentiable(), torch.enable_grad(), safe_ops() as mode:
            call_f(c.here, c.ell, point, *[t[0] for t in c.samples.tensors(0, 1)])
    except BaseException:
        rng.put_back(before)
        raise
    rng.refuse_draws(c.here, before, PER_SAMPLE_FIX)
    return mode is None or mode.rerouted > 0


def _engine_route(c: _Call, mode: str) -> Tensor:
    """The block engine (each pair of blocks once, second backward stopped at the tangent's
    layer) with the samples as one more `vmap` dimension; every piece is written straight into the
    `(B, N, N)` result and the mirrors are copied at the end."""
    forward = mode == "fwd-rev"
    group_of = forward_group if forward else reverse_group
    lay = c.layout

    def sample_rows(x: int, Y: list[int], rows: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Rows `rows` of blocks `H[x][y]`, y in Y, of one sample's loss."""
        h = scalar_output(c.here, lambda p: c.ell(p, *tensors), False)
        rows_of, _ = group_of(h, lay, lay.leaves, [x], Y, False)
        return tuple(rows_of([rows]))

    off, k = lay.off, len(lay.leaves)
    grouped = groups({(i, j) for i in range(k) for j in range(i, k)}, forward)
    M = c.result()
    for b0, b1 in chunks(c.B, c.b_chunk):
        for x, Y in grouped:
            for s, e in chunks(lay.sizes[x], c.rows):
                rows = basis(s, e, [lay.shapes[x]], [lay.leaves[x].dtype], lay.device)[0]
                pieces = vmap(functools.partial(sample_rows, x, Y, rows))(*c.samples.tensors(b0, b1))
                for y, piece in zip(Y, pieces):
                    M[b0:b1, off[x] + s : off[x] + e, off[y] : off[y + 1]].copy_(piece.reshape(b1 - b0, e - s, -1))
                del pieces
    for x, Y in grouped:  # per sample the blocks are small: one batched copy each
        for y in Y:
            if x != y:
                M[:, off[y] : off[y + 1], off[x] : off[x + 1]].copy_(M[:, off[x] : off[x + 1], off[y] : off[y + 1]].transpose(1, 2))
    return M


def _joint_route(c: _Call, mode: str) -> Tensor:
    """Per chunk of samples, `vmap` of the joint pass: one forward and backward per sample, then
    passes of whole Hessian rows over all `N` parameters, each written straight into the result.
    Twice the arithmetic of the block engine's second pass, but one forward and backward per
    sample instead of one per parameter leaf, and no mirror copies."""
    group_of = forward_group if mode == "fwd-rev" else reverse_group
    lay = c.layout
    every = list(range(len(lay.leaves)))
    dtypes = [leaf.dtype for leaf in lay.leaves]

    def sample_rows(rows: list[Tensor], *tensors: Tensor) -> tuple[Tensor, ...]:
        h = scalar_output(c.here, lambda p: c.ell(p, *tensors), False)
        rows_of, _ = group_of(h, lay, lay.leaves, every, every, False)
        return tuple(rows_of(rows))

    off, M = lay.off, c.result()
    for b0, b1 in chunks(c.B, c.b_chunk):
        for s, e in chunks(lay.N, c.rows):
            rows = basis(s, e, lay.shapes, dtypes, lay.device)
            pieces = vmap(functools.partial(sample_rows, rows))(*c.samples.tensors(b0, b1))
            for y, piece in enumerate(pieces):
                M[b0:b1, s:e, off[y] : off[y + 1]].copy_(piece.reshape(b1 - b0, e - s, -1))
            del pieces
    return M


def _vmapped_route(c: _Call, mode: str) -> Tensor:
    """Inside an outer transform: `vmap(hessian)` over sample chunks, blocks concatenated."""
    one = hessian(c.ell, mode=mode, chunk_size=c.rows)  # type: ignore[arg-type]
    batched = vmap(one, in_dims=(None, *[0] * len(c.samples.index)))
    off, k, pieces = c.layout.off, len(c.layout.leaves), []
    for b0, b1 in chunks(c.B, c.b_chunk):
        flat = tree_flatten(batched(c.params, *c.samples.tensors(b0, b1)))[0]  # row-major over (a, b)
        block_rows = [torch.cat([t.reshape(b1 - b0, off[i + 1] - off[i], -1) for t in flat[i * k : (i + 1) * k]], 2) for i in range(k)]
        pieces.append(torch.cat(block_rows, 1))
    return torch.cat(pieces, 0)


class _Rows:
    """The `(B, N, N)` result of the replay route, filled with rows `s:e` of samples `b0:b1`."""

    def __init__(self, c: _Call) -> None:
        self.c, self.functional = c, inside_transform()
        self.M: Tensor | None = None
        self.pieces: list[list[Tensor]] = []

    def put(self, b0: int, b1: int, s: int, e: int, leaves: Sequence[Tensor]) -> None:
        """`leaves[k]` is `(e - s, b1 - b0, *p_k.shape)`: rows `s:e` of samples `b0:b1`."""
        n, b = e - s, b1 - b0
        if self.functional:
            if s == 0:
                self.pieces.append([])
            self.pieces[-1].append(torch.cat([t.reshape(n, b, -1) for t in leaves], 2).transpose(0, 1))
            return
        if self.M is None:
            self.M = self.c.out if self.c.out is not None else leaves[0].new_empty(
                self.c.B, self.c.layout.N, self.c.layout.N, dtype=promoted_dtype(leaves)
            )
        off = self.c.layout.off
        for k, t in enumerate(leaves):  # one contiguous-run copy per leaf, no concatenation
            self.M[b0:b1, s:e, off[k] : off[k + 1]].copy_(t.reshape(n, b, -1).transpose(0, 1))

    def result(self) -> Tensor:
        if self.M is not None:
            return self.M
        return torch.cat([torch.cat(p, 1) for p in self.pieces], 0)


def _replay_route(c: _Call, mode: str) -> Tensor:
    """With random operations: "fwd-rev" pushes basis directions through the `jvp` of the `vmap`ped
    per-sample gradient; "rev-rev" pulls basis rows back through its `vjp` at parameters broadcast
    per sample. The generators are restored before every pass, so every pass over the same samples
    draws the forward's masks."""
    lay, spec = c.layout, c.layout.spec
    shapes, dtypes = lay.shapes, [leaf.dtype for leaf in lay.leaves]
    rng, sink = RandomState(lay.device), _Rows(c)
    tangent_randomness = "error" if c.randomness == "error" else "same"
    for b0, b1 in chunks(c.B, c.b_chunk):
        tensors, b = c.samples.tensors(b0, b1), b1 - b0
        rng.save()
        if mode == "fwd-rev":
            G = per_sample_gradients(c.ell, c.here, c.randomness, for_jvp=True)

            def column(*t: Tensor) -> Any:
                return jvp(lambda p: G(p, *tensors), (c.params,), (tree_unflatten(spec, t),))[1]

            push = vmap(column, randomness=tangent_randomness)
            for s, e in chunks(lay.N, c.rows):
                rng.replay()
                cols, _ = tree_flatten(push(*basis(s, e, shapes, dtypes, lay.device)))
                sink.put(b0, b1, s, e, cols)  # column j is row j: the Hessian is symmetric
                del cols
        else:
            G = per_sample_gradients(c.ell, c.here, c.randomness)
            _, pullback = vjp(lambda P: G(P, *tensors, params_dim=0), expand(c.params, b))
            pull = vmap(lambda *t: pullback(tree_unflatten(spec, t))[0])
            for s, e in chunks(lay.N, c.rows):
                cot = [t.unsqueeze(1).expand(t.shape[0], b, *t.shape[1:]) for t in basis(s, e, shapes, dtypes, lay.device)]
                got, _ = tree_flatten(pull(*cot))
                sink.put(b0, b1, s, e, got)
                del cot, got
    return sink.result()


def per_sample_hessian(
    f: Callable[..., Any],
    *,
    mode: Literal["auto", "fwd-rev", "rev-rev"] = "auto",
    chunk_size: ChunkSize = "auto",
    sample_chunk_size: ChunkSize = None,
    randomness: Randomness = "error",
    hessian_chunk_size: int | None = None,
    max_memory: int | float | str | None = None,
) -> Callable[..., PyTree]:
    """The Hessian of every sample's loss, all samples in one vectorised pass per chunk.

    `per_sample_hessian(f)(params, *data)` returns the tree product of `params` with itself with a
    leading sample dimension: block `H[a][b]` has shape `(B, *params[a].shape, *params[b].shape)`
    and `H[a][b][i]` is the Hessian block of sample `i`'s loss `f(params, *[d[i:i+1] for d in
    data])`. Every Tensor in `data` carries the samples along dim 0 (`B` of them); other leaves
    (e.g. `None`) are passed to every sample unchanged. The blocks are views of one `(B, N, N)`
    Tensor, which `funchess.to_matrix(H, batch_dims=1)` returns without a copy. For some parameter
    blocks only, pass a subset of the parameters (`funchess.functional(..., params=[...])`).

    Composition: for a deterministic `f` (`randomness="error"`), `funchess.hessian`'s symmetric
    block engine in `mode` ("rev-rev" or "fwd-rev") with the samples as one more `vmap` dimension:
    each pair of blocks is computed once, written straight into the result and mirrored, and the
    second backward pass stops at the tangent's layer. When the whole result is small (about
    two million entries), the joint pass instead: per sample one forward and backward, then
    whole Hessian rows. Inside an outer transform it is `vmap(funchess.hessian)` over chunks of
    samples. With random operations, "fwd-rev" is `vmap`
    over chunks of basis directions of `jvp` of the per-sample gradient `vmap(grad(loss_i))`, and
    "rev-rev" is `vmap` over chunks of basis rows of the `vjp` of the per-sample gradient at
    parameters broadcast to one copy per sample; every pass replays the forward's random numbers.
    "auto" (default) falls back to the other mode when an operator lacks a rule. The result is `B`
    times the size of one Hessian and filling it dominates the cost; for repeated calls, `out=`
    reuses one result buffer (fresh memory is not paged in again). Each pass produces a bounded
    number of entries unless both chunk sizes are given.

    Semantics: BatchNorm must use running statistics (`model.eval()`): in train mode the samples
    are coupled and this raises. Buffers and frozen parameters come from the model; tied weights
    are one parameter. With dropout, `randomness` chooses the masks (torch.func's meanings), and
    every pass over a sample replays the same mask, so its Hessian is that of one fixed mask.

    Args:
        f: the batch loss `f(params, *data)`, e.g. from `funchess.functional(model, loss_fn)`.
        mode: "auto", "fwd-rev" or "rev-rev" (see above).
        chunk_size: Hessian rows per vectorised pass (as in `funchess.hessian`); "auto" plans it.
        sample_chunk_size: samples per vectorised pass (`torch.func.vmap`'s `chunk_size` over the
            samples); "auto" (or None, the default) plans it.
        randomness: "error" (default: random operations raise), "different" (a mask per sample,
            as a train-mode batch would draw) or "same" (one mask shared by all samples).
        hessian_chunk_size: deprecated spelling of `chunk_size` (removed in funchess 0.3).
        max_memory: the budget for the `(B, N, N)` result (bytes or "4GiB"; default 80 % of the
            device's free memory): a larger result raises a sized `MemoryBudgetError` before it is
            allocated (not checked with `out=`, which is already allocated).

    Returns:
        A function `(params, *data, out=None) -> H` with the block tree described above. `out`: a
        contiguous `(B, N, N)` Tensor of the parameters' (promoted) dtype and device to write the
        result into (its blocks are then views of `out`, so a result held from an earlier call with
        the same buffer is overwritten); not inside torch.func transforms.

    Raises:
        InvalidArgumentError: bad options, or a BatchNorm layer that couples the samples.
        StructureError: data Tensors disagree on the number of samples, or there are none.
        UnsupportedError: f draws random numbers with randomness="error", or an operator has no
            rule for any composition.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> H = funchess.per_sample_hessian(f)(params, x, y)
        >>> H["0.weight"]["2.bias"].shape
        torch.Size([5, 4, 3, 2])
        >>> M = funchess.to_matrix(H, batch_dims=1)  # (5, 26, 26), no copy
        >>> torch.allclose(M.mean(0), funchess.to_matrix(funchess.hessian(f)(params, x, y)), atol=1e-6)
        True
        >>> buffer = torch.empty(5, 26, 26)  # reused across calls
        >>> H = funchess.per_sample_hessian(f)(params, x, y, out=buffer)
        >>> funchess.to_matrix(H, batch_dims=1).data_ptr() == buffer.data_ptr()
        True
    """
    call = call_label("per_sample_hessian", {"mode": mode, "chunk_size": chunk_size, "sample_chunk_size": sample_chunk_size,
                                             "randomness": randomness, "max_memory": max_memory})
    check_callable(call, f)
    check_mode(call, mode)
    if hessian_chunk_size is not None:
        deprecated(f"{call}: hessian_chunk_size is deprecated; use chunk_size= (Hessian rows per pass). "
                   f"It is removed in funchess 0.3.")
        chunk_size, sample_chunk_size = hessian_chunk_size, sample_chunk_size or "auto"
    sample_chunk_size, chunk_size = sample_chunks(call, "per_sample_hessian", sample_chunk_size, chunk_size, rows_too=True)
    rows = check_chunk_size(call, chunk_size)
    b_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)
    budget, budget_from = budget_of(call, max_memory)

    @functools.wraps(f)
    def per_sample_hessian_fn(params: PyTree, *data: Any, out: Tensor | None = None) -> PyTree:
        params, data = usable(params), usable(data)
        here, samples = per_sample_data(call, f, params, data)
        layout = Layout((params,), single=True)
        B = samples.size
        if out is not None:
            check_out(here, out, (B, layout.N, layout.N), layout.dtype, layout.device)
        else:
            check_fits(here, f"{B:,} per-sample Hessians of {layout.N:,} parameters",
                       B * layout.N * layout.N * layout.dtype.itemsize, layout.device, budget, budget_from,
                       "Use per-sample products (funchess.per_sample_hvp), fewer samples per call, or fewer "
                       "parameters (funchess.functional(..., params=[...]))")
        b, r = _pass_sizes(B, layout.N, b_chunk, rows)
        c = _Call(here, f, params, samples, layout, B, b, r, out, randomness)
        if randomness != "error":
            M = _run(here, mode, {m: functools.partial(_replay_route, c, m) for m in _REPLAY_ORDER}, _REPLAY_ORDER)
        elif inside_transform():
            M = _run(here, mode, {m: functools.partial(_vmapped_route, c, m) for m in _ENGINE_ORDER}, _ENGINE_ORDER)
        else:
            route = _engine_route
            if B * layout.N * layout.N <= _JOINT_ENTRIES and len(layout.leaves) > 1:
                route = _joint_route  # the whole result is small: one pass, all samples and rows
                c.b_chunk, c.rows = b_chunk or B, rows or layout.N
            safe = _needs_rerouting(c)
            M = _run(here, mode, {m: functools.partial(route, c, m) for m in _ENGINE_ORDER}, _ENGINE_ORDER, safe)
        outer = (layout.shapes, layout.spec)
        return blocks_of(M, outer, outer)

    return per_sample_hessian_fn


# ----------------------------------------------------------------------------- gradients, HVPs


def per_sample_grad(
    f: Callable[..., Any],
    *,
    sample_chunk_size: ChunkSize = "auto",
    randomness: Randomness = "error",
    chunk_size: int | None = None,
) -> Callable[..., PyTree]:
    """The gradient of every sample's loss: `vmap(grad(loss_i))` over the samples.

    `per_sample_grad(f)(params, *data)` returns a pytree shaped like `params` with a leading sample
    dimension: leaf `g[a]` has shape `(B, *params[a].shape)` and `g[a][i]` is the gradient of
    `f(params, *[d[i:i+1] for d in data])`. Same conventions (data batched on dim 0, BatchNorm in
    eval mode, `randomness`) as `funchess.per_sample_hessian`.

    Composition: `torch.func.vmap` (with `sample_chunk_size` as its `chunk_size`, and
    `randomness`) of the `vjp` of the loss of a batch of one.

    Args:
        f: the batch loss `f(params, *data)`.
        sample_chunk_size: samples per vectorised pass; "auto" does all samples in one.
        randomness: "error", "different" or "same", as in `torch.func.vmap`.
        chunk_size: deprecated spelling of `sample_chunk_size` (removed in funchess 0.3).

    Returns:
        A function `(params, *data) -> per-sample gradients`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> g = funchess.per_sample_grad(f)(params, x, y)
        >>> g["weight"].shape
        torch.Size([4, 1, 3])
        >>> torch.allclose(g["weight"].mean(0), torch.func.grad(f)(params, x, y)["weight"])
        True
    """
    call = call_label("per_sample_grad", {"sample_chunk_size": sample_chunk_size, "randomness": randomness})
    check_callable(call, f)
    sample_chunk_size, _ = sample_chunks(call, "per_sample_grad", sample_chunk_size, chunk_size, rows_too=False)
    b_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)

    @functools.wraps(f)
    def per_sample_grad_fn(params: PyTree, *data: Any) -> PyTree:
        params, data = usable(params), usable(data)
        here, samples = per_sample_data(call, f, params, data)
        G = per_sample_gradients(samples.loss(f), here, randomness, sample_chunk_size=b_chunk)
        return _run(here, "rev-rev", {"rev-rev": lambda: G(params, *samples.tensors())}, ("rev-rev",))

    return per_sample_grad_fn


def per_sample_hvp(
    f: Callable[..., Any],
    *,
    mode: Literal["auto", "fwd-rev", "rev-rev"] = "auto",
    sample_chunk_size: ChunkSize = "auto",
    randomness: Randomness = "error",
    chunk_size: int | None = None,
) -> Callable[..., PyTree]:
    """`H_i v` for every sample `i`, without forming any Hessian.

    `per_sample_hvp(f)(params, v, *data)` returns a pytree shaped like `params` with a leading
    sample dimension: leaf `[a]` has shape `(B, *params[a].shape)` and row `i` is the Hessian of
    sample `i`'s loss times `v` (one direction shaped like `params`). Same conventions as
    `funchess.per_sample_hessian`; the calling convention of every funchess product (`hvp`).

    Composition: "fwd-rev" is one `jvp` of the per-sample gradient `vmap(grad(loss_i))` along `v`;
    "rev-rev" is one `vjp` of the per-sample gradient at parameters broadcast per sample, with `v`
    as every sample's cotangent; "auto" runs "fwd-rev" and falls back to "rev-rev". Cost: a few
    per-sample gradients.

    Args:
        f: the batch loss `f(params, *data)`.
        mode: "auto", "fwd-rev" or "rev-rev".
        sample_chunk_size: samples per vectorised pass; "auto" does all samples in one.
        randomness: "error", "different" or "same", as in `torch.func.vmap`.
        chunk_size: deprecated spelling of `sample_chunk_size` (removed in funchess 0.3).

    Returns:
        A function `(params, v, *data) -> per-sample H v`.

    Example:
        >>> import torch, funchess
        >>> f = lambda p, x: ((x @ p["w"]) ** 3).sum()
        >>> p, v = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 0.0])}
        >>> funchess.per_sample_hvp(f)(p, v, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))["w"]
        tensor([[6., 0.],
                [0., 0.]])
    """
    call = call_label("per_sample_hvp", {"mode": mode, "sample_chunk_size": sample_chunk_size, "randomness": randomness})
    check_callable(call, f)
    check_mode(call, mode)
    sample_chunk_size, _ = sample_chunks(call, "per_sample_hvp", sample_chunk_size, chunk_size, rows_too=False)
    b_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)

    @functools.wraps(f)
    def per_sample_hvp_fn(params: PyTree, v: PyTree, *data: Any) -> PyTree:
        here = f"{call}(params, v, ...)"
        params, v, data = usable(params), usable(v), usable(data)
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)
        check_per_sample(here, f)
        samples = Samples(here, data)
        ell, tensors = samples.loss(f), samples.tensors()
        rng = RandomState(tree_flatten(params)[0][0].device)
        rng.save()

        def fwd() -> PyTree:
            G = per_sample_gradients(ell, here, randomness, for_jvp=True, sample_chunk_size=b_chunk)
            return jvp(lambda p: G(p, *tensors), (params,), (v,))[1]

        def rev() -> PyTree:
            rng.replay()  # a fallback after a failed fwd-rev draws the same masks again
            G = per_sample_gradients(ell, here, randomness, sample_chunk_size=b_chunk)
            _, pullback = vjp(lambda P: G(P, *tensors, params_dim=0), expand(params, samples.size))
            return pullback(expand(v, samples.size))[0]

        return _run(here, mode, {"fwd-rev": fwd, "rev-rev": rev}, _REPLAY_ORDER)

    return per_sample_hvp_fn
