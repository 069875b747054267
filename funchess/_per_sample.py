"""Per-sample curvature: gradients, Hessians and Hessian-vector products of every sample's loss.

The convention: `f(params, *data)` is a loss over a *batch* (e.g. `funchess.functional(model,
loss_fn)`), every Tensor in `data` holds the samples along dim 0, and the loss of sample `i` is
`f` on a batch of one, `f(params, *[d[i:i+1] for d in data])`. The same `f` therefore serves the
batch Hessian (`funchess.hessian(f)`) and the per-sample ones; with a mean-reduced loss the batch
loss is the mean of the per-sample losses, so `per_sample_hessian(f)(...).mean(0)` is
`hessian(f)(...)` (with `reduction='sum'`, the sum).

The samples are a `vmap` dimension, never a Python loop: "fwd-rev" pushes a chunk of basis
directions through the `jvp` of the `vmap`ped per-sample gradient, so one pass yields those columns
of *every* sample's Hessian; "rev-rev" pulls basis rows back through the `vjp` of the per-sample
gradient taken at parameters broadcast to one copy per sample.

Random operations (dropout in train mode) follow `torch.func.vmap`'s `randomness`; every pass over
the same samples replays the same random numbers, so the forward and all derivative passes of a
sample see one dropout mask.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from ._compat import inside_transform, jvp, vjp
from ._engine import Layout, _forward_group, _reverse_group, groups
from ._engine import _basis as _engine_basis
from ._errors import InvalidArgumentError, StructureError, UnsupportedError
from ._functional import ModuleFunction
from ._hessian import (
    _RANDOM,
    _check_callable,
    _check_mode,
    _check_primals,
    _check_tangents,
    _gradient,
    _run,
    _scalar_fn,
    hessian,
)
from ._jacobian import _basis, _chunks, check_chunk_size
from ._tree import blocks_of, offsets, promoted_dtype, tree_flatten, tree_map, tree_unflatten

__all__ = ["per_sample_grad", "per_sample_hessian", "per_sample_hvp", "Randomness"]

PyTree = Any
Randomness = Literal["error", "same", "different"]
_RANDOMNESS: tuple[str, ...] = ("error", "same", "different")
_PER_SAMPLE_ORDER: tuple[str, ...] = ("fwd-rev", "rev-rev")  # with dropout: fwd-rev measured faster
_ENGINE_ORDER: tuple[str, ...] = ("rev-rev", "fwd-rev")  # deterministic f: the block engine, rev-rev first
_PASS_BUDGET = 1 << 23  # Hessian entries one vectorised pass produces (32 MiB in float32)
_MAX_ROWS = 256


# ----------------------------------------------------------------------------- validation


_DEFAULTS: dict[str, Any] = {"mode": "auto", "randomness": "error", "reduction": "mean", "progress": False}


def fmt_call(name: str, **opts: Any) -> str:
    """`funchess.name(f, opt=...)` showing the options that differ from their defaults."""
    shown = "".join(f", {k}={v!r}" for k, v in opts.items() if v is not None and v != _DEFAULTS.get(k))
    return f"funchess.{name}(f{shown})"


@contextlib.contextmanager
def random_errors(call: str) -> Iterator[None]:
    """Re-raise torch's vmap randomness error as an UnsupportedError naming the fix."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        translated = random_error(call, exc)
        if translated is None:
            raise
        raise translated from exc


def check_randomness(call: str, randomness: str, allowed: Sequence[str] = _RANDOMNESS) -> None:
    if randomness not in allowed:
        raise InvalidArgumentError(
            f"{call}: expected randomness to be one of {', '.join(map(repr, allowed))}, got "
            f"{randomness!r}. Keep 'error' for a deterministic model (model.eval()); pass "
            f"'different' to give every sample its own dropout mask."
        )


def coupling_layer(f: Any) -> tuple[str, nn.Module] | None:
    """A layer of `f`'s model whose output mixes the samples of a batch (batch statistics)."""
    model = getattr(f, "model", None) if isinstance(f, ModuleFunction) else None
    if model is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            return name, m
    return None


def check_per_sample(call: str, f: Any) -> None:
    model = getattr(f, "model", None) if isinstance(f, ModuleFunction) else None
    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, nn.RNNBase):
            raise UnsupportedError(
                f"{call}: the model has {type(m).__name__} {name!r}; torch.func.vmap has no "
                f"batching rule for recurrent layers, so per-sample quantities cannot be "
                f"vectorised over the samples. Loop over them instead, e.g. "
                f"[funchess.hessian(f)(params, x[i:i+1], y[i:i+1]) for i in range(len(x))]."
            )
    hit = coupling_layer(f)
    if hit is not None:
        name, m = hit
        state = "in train mode" if m.training else "with track_running_stats=False"
        raise InvalidArgumentError(
            f"{call}: the model has {type(m).__name__} {name!r} {state}; its batch statistics "
            f"couple the samples, so per-sample quantities are undefined. Expected every batch "
            f"norm to use running statistics: call model.eval() (a sample's loss is then one "
            f"sample through the eval model). For the Hessian of the whole batch in train mode, "
            f"use funchess.hessian."
        )


def check_out(call: str, out: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """`out=` must be a contiguous Tensor of the result's shape, dtype and device, outside transforms."""
    if inside_transform():
        raise UnsupportedError(
            f"{call}: out= cannot be used inside torch.func transforms (vmap, grad, ...), which do "
            f"not allow writing into a buffer. Drop out= there."
        )
    got = (
        f"a {type(out).__name__}" if not isinstance(out, Tensor)
        else f"shape {tuple(out.shape)}, {out.dtype} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
    )
    if (
        not isinstance(out, Tensor) or tuple(out.shape) != shape or out.dtype != dtype
        or out.device != device or not out.is_contiguous()
    ):
        raise StructureError(
            f"{call}: expected out to be a contiguous Tensor of shape {shape} (samples, N, N), "
            f"{dtype} on {device}, got {got}. Allocate it once with torch.empty({', '.join(map(str, shape))}, "
            f"dtype={dtype}, device='{device}'), or drop out=."
        )


def random_error(call: str, exc: BaseException) -> UnsupportedError | None:
    if isinstance(exc, (RuntimeError, NotImplementedError)) and _RANDOM.search(str(exc)):
        return UnsupportedError(
            f"{call}: f draws random numbers (e.g. dropout in train mode) with "
            f"randomness='error'; expected a deterministic function. Call model.eval(), or pass "
            f"randomness='different' (each sample its own mask, as in training) or 'same' (one "
            f"mask for all samples); every derivative pass then replays the forward's mask."
        )
    return None


class Samples:
    """The data arguments of a call, split into per-sample Tensors (batched on dim 0) and the rest."""

    def __init__(self, call: str, data: tuple[Any, ...]) -> None:
        self.leaves, self.spec = tree_flatten(data)
        self.where = [f"args[{p[0] + 1}]" + "".join(f"[{q!r}]" for q in p[1:]) for p in self.spec.paths()]
        self.index = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, Tensor)]
        if not self.index:
            raise StructureError(
                f"{call}: expected per-sample data after params (Tensors with the samples along "
                f"dim 0), got {len(data)} argument(s) with no Tensor. Call it as "
                f"fn(params, inputs, targets)."
            )
        first = self.index[0]
        for i in self.index:
            t = self.leaves[i]
            if t.dim() == 0 or t.shape[0] != self.leaves[first].shape[0]:
                raise StructureError(
                    f"{call}: every Tensor of the data must hold the samples along dim 0; "
                    f"expected size {self.leaves[first].shape[0]} (from {self.where[first]}), got "
                    f"shape {tuple(t.shape)} at {self.where[i]}. Pass per-sample data only; close "
                    f"over tensors shared by all samples inside f."
                )
        self.size = int(self.leaves[first].shape[0])

    def tensors(self, start: int = 0, stop: int | None = None) -> list[Tensor]:
        return [self.leaves[i][start:stop] for i in self.index]

    def one(self, tensors: Sequence[Tensor]) -> tuple[Any, ...]:
        """The data arguments of a batch of one, from one sample's tensors (given without dim 0)."""
        full = list(self.leaves)
        for i, t in zip(self.index, tensors):
            full[i] = t.unsqueeze(0)
        return tuple(tree_unflatten(self.spec, full))

    def loss(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """`ell(params, *sample_tensors)`: f on a batch of one."""
        return lambda params, *tensors: f(params, *self.one(tensors))


def per_sample_data(call: str, f: Any, params: PyTree, data: tuple[Any, ...]) -> tuple[str, Samples]:
    """Check a per-sample call's params and model, split its data: `(call with args, samples)`."""
    here = f"{call}(params, ...)"
    _check_primals(here, (params,), ["params"])
    check_per_sample(here, f)
    return here, Samples(here, data)


class Replay:
    """Restores the random number generators before each pass over the same samples."""

    def __init__(self, randomness: str, device: torch.device) -> None:
        self.active = randomness != "error"
        self.cuda = device if device.type == "cuda" else None
        self.state: tuple[Tensor, Tensor | None] | None = None

    def start(self) -> None:
        if self.active:
            cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
            self.state = (torch.get_rng_state(), cuda)

    def replay(self) -> None:
        if self.state is not None:
            torch.set_rng_state(self.state[0])
            if self.state[1] is not None and self.cuda is not None:
                torch.cuda.set_rng_state(self.state[1], self.cuda)


def per_sample_gradients(
    ell: Callable[..., Any], call: str, randomness: str, *, for_jvp: bool = False, chunk_size: int | None = None
) -> Callable[..., Any]:
    """`G(params, *tensors)`: the gradient of every sample's loss, leaves `(B, *p.shape)`."""

    def one(params: Any, *tensors: Tensor) -> Any:
        return _gradient(lambda p: ell(p, *tensors), call, False, True, for_jvp=for_jvp)(params)

    def G(params: Any, *tensors: Tensor, params_dim: int | None = None) -> Any:
        dims = (params_dim, *([0] * len(tensors)))
        return vmap(one, in_dims=dims, randomness=randomness, chunk_size=chunk_size)(params, *tensors)

    return G


def _expand(params: PyTree, b: int) -> PyTree:
    return tree_map(lambda p: p.expand(b, *p.shape), params)


def _run_per_sample(
    call: str, mode: str, runners: dict[str, Callable[[], Any]], order: tuple[str, ...] = _PER_SAMPLE_ORDER
) -> Any:
    state: dict[str, str | None] = {"mode": None if mode == "auto" else mode}
    try:
        return _run(call, state, runners, fallback=order)
    except UnsupportedError as exc:
        translated = random_error(call, exc.__cause__) if exc.__cause__ is not None else None
        if translated is not None:
            raise translated from exc.__cause__
        raise


# ----------------------------------------------------------------------------- Hessians


def plan(samples: int, n: int, chunk_size: int | None, rows: int | None) -> tuple[int, int]:
    """Samples and Hessian rows per pass: each pass produces at most `_PASS_BUDGET` entries."""
    if chunk_size is None:
        least = min(n, 32, rows or n)
        chunk_size = max(1, min(samples, _PASS_BUDGET // max(least * n, 1)))
    if rows is None:
        rows = max(1, min(n, _MAX_ROWS, _PASS_BUDGET // max(chunk_size * n, 1)))
    return min(chunk_size, max(samples, 1)), rows


class _Out:
    """The `(B, N, N)` result, filled with rows `s:e` of samples `b0:b1` at a time: in place, or
    (inside a transform, where writing into a buffer is not allowed) by concatenation."""

    def __init__(self, B: int, N: int, offsets: list[int], out: Tensor | None = None) -> None:
        self.B, self.N, self.off = B, N, offsets
        self.functional = inside_transform()
        self.out: Tensor | None = out
        self.pieces: list[list[Tensor]] = []

    def put(self, b0: int, b1: int, s: int, e: int, leaves: Sequence[Tensor]) -> None:
        """`leaves[k]` is `(e - s, b1 - b0, *p_k.shape)`: rows `s:e` of samples `b0:b1`."""
        c, b = e - s, b1 - b0
        if self.functional:
            if s == 0:
                self.pieces.append([])
            self.pieces[-1].append(torch.cat([t.reshape(c, b, -1) for t in leaves], 2).transpose(0, 1))
            return
        if self.out is None:
            self.out = leaves[0].new_empty(self.B, self.N, self.N, dtype=promoted_dtype(leaves))
        for k, t in enumerate(leaves):  # one contiguous-run copy per leaf, no concatenation
            self.out[b0:b1, s:e, self.off[k] : self.off[k + 1]].copy_(t.reshape(c, b, -1).transpose(0, 1))

    def result(self) -> Tensor:
        if self.out is not None:
            return self.out
        return torch.cat([torch.cat(p, 1) for p in self.pieces], 0)


def per_sample_hessian(
    f: Callable[..., Any],
    *,
    mode: Literal["auto", "fwd-rev", "rev-rev"] = "auto",
    chunk_size: int | None = None,
    hessian_chunk_size: int | None = None,
    randomness: Randomness = "error",
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
    second backward pass stops at the tangent's layer. With random operations, "fwd-rev" is `vmap`
    over chunks of basis directions of `jvp` of the per-sample gradient `vmap(grad(loss_i))`, and "rev-rev" is `vmap` over chunks of basis rows
    of the `vjp` of the per-sample gradient at parameters broadcast to one copy per sample; every
    pass replays the forward's random numbers. "auto" (default) falls back to the other mode when
    an operator lacks a rule. The result is `B` times the size of one Hessian and filling it
    dominates the cost (see benchmarks/RESULTS.md); each pass produces at most ~8M entries unless
    both chunk sizes are given. For repeated calls, `out=` reuses one result buffer: measured 1.3x
    faster on the 1,893-parameter MLP with 64 samples, as fresh memory is not paged in again.

    Semantics: BatchNorm must use running statistics (`model.eval()`): in train mode the samples
    are coupled and this raises. Buffers and frozen parameters come from the model; tied weights
    are one parameter. With dropout, `randomness` chooses the masks (torch.func's meanings), and
    every pass over a sample replays the same mask, so its Hessian is that of one fixed mask.

    Args:
        f: the batch loss `f(params, *data)`, e.g. from `funchess.functional(model, loss_fn)`.
        mode: "auto", "fwd-rev" or "rev-rev" (see above).
        chunk_size: samples per vectorised pass (`torch.func.vmap`'s `chunk_size`); None plans it.
        hessian_chunk_size: Hessian rows per pass (`funchess.hessian`'s `chunk_size`); None plans it.
        randomness: "error" (default: random operations raise), "different" (a mask per sample,
            as a train-mode batch would draw) or "same" (one mask shared by all samples).

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
    call = fmt_call("per_sample_hessian", mode=mode, chunk_size=chunk_size, hessian_chunk_size=hessian_chunk_size, randomness=randomness)
    _check_callable(call, f)
    if mode not in ("auto", "fwd-rev", "rev-rev"):
        _check_mode(call, mode)
    check_chunk_size(call, chunk_size)
    check_chunk_size(call.replace("chunk_size", "hessian_chunk_size"), hessian_chunk_size)
    check_randomness(call, randomness)

    @functools.wraps(f)
    def per_sample_hessian_fn(params: PyTree, *data: Any, out: Tensor | None = None) -> PyTree:
        here, samples = per_sample_data(call, f, params, data)
        leaves, spec = tree_flatten(params)
        shapes, dtypes = [p.shape for p in leaves], [p.dtype for p in leaves]
        device, N, B = leaves[0].device, offsets(shapes)[-1], samples.size
        if out is not None:
            check_out(here, out, (B, N, N), promoted_dtype(leaves), device)
        b_chunk, rows = plan(B, N, chunk_size, hessian_chunk_size)
        ell = samples.loss(f)
        replay = Replay(randomness, device)
        tangent_randomness = "error" if randomness == "error" else "same"

        def basis(s: int, e: int) -> list[Tensor]:
            return _basis(s, e, shapes, dtypes, device)

        def fwd() -> Tensor:
            G = per_sample_gradients(ell, here, randomness, for_jvp=True)
            sink = _Out(B, N, offsets(shapes), out)
            for b0, b1 in _chunks(B, b_chunk):
                tensors = samples.tensors(b0, b1)
                replay.start()

                def column(*t: Tensor) -> Any:
                    return jvp(lambda p: G(p, *tensors), (params,), (tree_unflatten(spec, t),))[1]

                push = vmap(column, randomness=tangent_randomness)
                for s, e in _chunks(N, rows):
                    replay.replay()
                    cols, _ = tree_flatten(push(*basis(s, e)))
                    sink.put(b0, b1, s, e, cols)  # column j is row j: the Hessian is symmetric
                    del cols
            return sink.result()

        def rev() -> Tensor:
            G = per_sample_gradients(ell, here, randomness)
            sink = _Out(B, N, offsets(shapes), out)
            for b0, b1 in _chunks(B, b_chunk):
                tensors, b = samples.tensors(b0, b1), b1 - b0
                _, pullback = vjp(lambda P: G(P, *tensors, params_dim=0), _expand(params, b))
                pull = vmap(lambda *t: pullback(tree_unflatten(spec, t))[0])
                for s, e in _chunks(N, rows):
                    cot = [t.unsqueeze(1).expand(t.shape[0], b, *t.shape[1:]) for t in basis(s, e)]
                    got, _ = tree_flatten(pull(*cot))
                    sink.put(b0, b1, s, e, got)
                    del cot, got
            return sink.result()

        def engine(m: str) -> Callable[[], Tensor]:
            # The block engine (each pair of blocks once, second backward stopped at the tangent's
            # layer) with the samples as one more vmap dimension; every piece is written straight
            # into the (B, N, N) result and mirrors are copied at the end.
            forward = m == "fwd-rev"
            group_of = _forward_group if forward else _reverse_group
            layout = Layout((params,), single=True)

            def sample_rows(x: int, Y: list[int], basis: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
                """Rows `basis` of blocks `H[x][y]`, y in Y, of one sample's loss."""
                h = _scalar_fn(lambda p: ell(p, *tensors), here, False)
                rows_of, _ = group_of(h, layout, layout.leaves, [x], Y, False)
                return tuple(rows_of([basis]))

            def run() -> Tensor:
                if inside_transform():  # no writing into buffers: vmap the engine, concatenate
                    return vmapped_engine(m)
                off, k = layout.off, len(shapes)
                request = {(i, j) for i in range(k) for j in range(i, k)}
                grouped = groups(request, forward)
                M: Tensor = out if out is not None else leaves[0].new_empty(B, N, N, dtype=layout.dtype)
                for b0, b1 in _chunks(B, b_chunk):
                    for x, Y in grouped:
                        for s, e in _chunks(layout.sizes[x], rows):
                            basis = _engine_basis(s, e, shapes[x], leaves[x])
                            pieces = vmap(functools.partial(sample_rows, x, Y, basis))(*samples.tensors(b0, b1))
                            for y, piece in zip(Y, pieces):
                                M[b0:b1, off[x] + s : off[x] + e, off[y] : off[y + 1]].copy_(piece.reshape(b1 - b0, e - s, -1))
                            del pieces
                computed = [(x, y) for x, Y in grouped for y in Y if x != y]
                for x, y in computed:  # per sample the blocks are small: one batched copy each
                    M[:, off[y] : off[y + 1], off[x] : off[x + 1]].copy_(M[:, off[x] : off[x + 1], off[y] : off[y + 1]].transpose(1, 2))
                return M

            return run

        def vmapped_engine(m: str) -> Tensor:
            """Inside an outer transform: `vmap(hessian)` over sample chunks, blocks concatenated."""
            one = hessian(ell, mode=m, chunk_size=rows)  # type: ignore[arg-type]
            batched = vmap(one, in_dims=(None, *[0] * len(samples.index)))
            off, k, chunks = offsets(shapes), len(shapes), []
            for b0, b1 in _chunks(B, b_chunk):
                flat = tree_flatten(batched(params, *samples.tensors(b0, b1)))[0]  # row-major over (a, b)
                block_rows = [torch.cat([t.reshape(b1 - b0, off[i + 1] - off[i], -1) for t in flat[i * k : (i + 1) * k]], 2) for i in range(k)]
                chunks.append(torch.cat(block_rows, 1))
            return torch.cat(chunks, 0)

        if randomness == "error":  # deterministic: no masks to replay between passes
            M = _run_per_sample(here, mode, {m: engine(m) for m in _ENGINE_ORDER}, order=_ENGINE_ORDER)
        else:
            M = _run_per_sample(here, mode, {"fwd-rev": fwd, "rev-rev": rev})
        return blocks_of(M, (shapes, spec), (shapes, spec))

    return per_sample_hessian_fn


# ----------------------------------------------------------------------------- gradients, HVPs


def per_sample_grad(
    f: Callable[..., Any],
    *,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The gradient of every sample's loss: `vmap(grad(loss_i))` over the samples.

    `per_sample_grad(f)(params, *data)` returns a pytree shaped like `params` with a leading sample
    dimension: leaf `g[a]` has shape `(B, *params[a].shape)` and `g[a][i]` is the gradient of
    `f(params, *[d[i:i+1] for d in data])`. Same conventions (data batched on dim 0, BatchNorm in
    eval mode, `randomness`) as `funchess.per_sample_hessian`.

    Composition: `torch.func.vmap` (with `chunk_size` and `randomness`) of the `vjp` of the loss
    of a batch of one.

    Args:
        f: the batch loss `f(params, *data)`.
        chunk_size: samples per vectorised pass; None does all samples in one.
        randomness: "error", "different" or "same", as in `torch.func.vmap`.

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
    call = fmt_call("per_sample_grad", chunk_size=chunk_size, randomness=randomness)
    _check_callable(call, f)
    check_chunk_size(call, chunk_size)
    check_randomness(call, randomness)

    @functools.wraps(f)
    def per_sample_grad_fn(params: PyTree, *data: Any) -> PyTree:
        here, samples = per_sample_data(call, f, params, data)
        G = per_sample_gradients(samples.loss(f), here, randomness, chunk_size=chunk_size)
        return _run_per_sample(here, "rev-rev", {"rev-rev": lambda: G(params, *samples.tensors())})

    return per_sample_grad_fn


def per_sample_hvp(
    f: Callable[..., Any],
    *,
    mode: Literal["auto", "fwd-rev", "rev-rev"] = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """`H_i v` for every sample `i`, without forming any Hessian.

    `per_sample_hvp(f)(params, v, *data)` returns a pytree shaped like `params` with a leading
    sample dimension: leaf `[a]` has shape `(B, *params[a].shape)` and row `i` is the Hessian of
    sample `i`'s loss times `v` (one direction shaped like `params`). Same conventions as
    `funchess.per_sample_hessian`.

    Composition: "fwd-rev" is one `jvp` of the per-sample gradient `vmap(grad(loss_i))` along `v`;
    "rev-rev" is one `vjp` of the per-sample gradient at parameters broadcast per sample, with `v`
    as every sample's cotangent; "auto" runs "fwd-rev" and falls back to "rev-rev". Cost: a few
    per-sample gradients.

    Args:
        f: the batch loss `f(params, *data)`.
        mode: "auto", "fwd-rev" or "rev-rev".
        chunk_size: samples per vectorised pass; None does all samples in one.
        randomness: "error", "different" or "same", as in `torch.func.vmap`.

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
    call = fmt_call("per_sample_hvp", mode=mode, chunk_size=chunk_size, randomness=randomness)
    _check_callable(call, f)
    if mode not in ("auto", "fwd-rev", "rev-rev"):
        _check_mode(call, mode)
    check_chunk_size(call, chunk_size)
    check_randomness(call, randomness)

    @functools.wraps(f)
    def per_sample_hvp_fn(params: PyTree, v: PyTree, *data: Any) -> PyTree:
        here = f"{call}(params, v, ...)"
        _check_primals(here, (params,), ["params"])
        _check_tangents(here, (params,), (v,))
        check_per_sample(here, f)
        samples = Samples(here, data)
        ell, tensors = samples.loss(f), samples.tensors()
        replay = Replay(randomness, tree_flatten(params)[0][0].device)

        def fwd() -> PyTree:
            G = per_sample_gradients(ell, here, randomness, for_jvp=True, chunk_size=chunk_size)
            replay.start()
            return jvp(lambda p: G(p, *tensors), (params,), (v,))[1]

        def rev() -> PyTree:
            replay.replay()  # a fallback after a failed fwd-rev draws the same masks again
            G = per_sample_gradients(ell, here, randomness, chunk_size=chunk_size)
            _, pullback = vjp(lambda P: G(P, *tensors, params_dim=0), _expand(params, samples.size))
            return pullback(_expand(v, samples.size))[0]

        return _run_per_sample(here, mode, {"fwd-rev": fwd, "rev-rev": rev})

    return per_sample_hvp_fn
