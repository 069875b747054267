"""Choosing the route for one call: the module-aware sweep where the model is a chain of known
modules, the generic autodiff paths everywhere else (both exact; see the package docstring).

`structured_hessian_diagonal` is the one entry point the Hessian transforms call;
`ggn_parts` serves `ggn_diagonal`, `per_sample_ggn_diagonal` and `per_sample_ggn_factor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import call_f
from .._compat import inside_transform, vjp
from .._compose import RandomState, differentiable, usable
from .._errors import MemoryBudgetError
from .._functional import ModuleFunction
from .._memory import format_bytes
from .._safe_ops import SecondOrderSafe
from .._samples import PER_SAMPLE_FIX
from .._tree import tree_flatten, tree_map, tree_unflatten
from ._chain import Options, build_chain, run_chain
from ._checks import Budget, check_loss, check_output, couples_samples, recurrent
from ._curvature import as_factor
from ._generic import RngReplay, coupled_columns, outputs, per_sample_columns, squares, take
from ._losses import output_curvature

PyTree = Any


def _chain_ok(params: Any, data: tuple[Any, ...]) -> bool:
    """The sweep works on plain tensors outside transforms: no outer autograd graph to carry."""
    if inside_transform() or not isinstance(params, dict) or len(data) not in (1, 2):
        return False
    if not isinstance(data[0], Tensor):
        return False
    return not any(isinstance(p, Tensor) and p.requires_grad for p in params.values())


def structured_hessian_diagonal(
    f: Any,
    params: Any,
    *data: Any,
    per_sample: bool = False,
    chunk_size: int | None = None,
    sample_chunk_size: int | None = None,
    max_memory: int | float | str | None = None,
) -> PyTree | None:
    """The exact Hessian diagonal of `f(params, inputs, targets)` by the module-aware sweep, or
    None when it does not apply (the caller then takes the generic path).

    It applies when `f` is `funchess.functional(model, loss_fn)` with `model` an `nn.Sequential`
    (nested freely) of modules with rules (Linear, Conv1d/2d/3d, elementwise activations,
    Flatten, pooling, padding, Dropout and BatchNorm in eval mode, LayerNorm, RMSNorm,
    Softmax/LogSoftmax, Embedding first), `params` a dict of its parameters, `data` the inputs (a
    Tensor) and optionally the targets, no torch.func transform active and no parameter tracked by
    autograd, and the loss does not couple the samples (with `per_sample`, each sample's own loss
    is used, as in `funchess.per_sample_hessian`). Returns a dict shaped like `params` (with a
    leading sample dimension when `per_sample`).
    """
    if not _chain_ok(params, data) or getattr(f, "loss_fn", None) is None:
        return None
    steps = build_chain(f, params)
    if steps is None:
        return None
    device = next(iter(params.values())).device
    opts = Options(
        hessian=True, per_sample=per_sample, chunk_size=chunk_size, sample_chunk_size=sample_chunk_size,
        budget=Budget("funchess.hessian_diagonal(f)", max_memory, device),
    )
    with differentiable():  # copies of inference tensors made outside inference mode
        data = usable(data)
        out = run_chain(steps, f.loss_fn, data[0], data[1] if len(data) == 2 else None, opts)
    if out is None:
        return None
    return {k: out[0][k] for k in params}


@dataclass
class GGNJob:
    """One GGN-diagonal or factor call: the function's parts and the options."""

    call: str
    f: Any
    output: Callable[[Any, Any], Any]
    loss: Callable[..., Tensor]
    samples: int | None
    generator: torch.Generator | None
    chunk: int | None
    sample_chunk: int | None
    max_memory: int | float | str | None
    randomness: str
    checked_loss: Callable[..., Tensor]  # the loss as the user's call evaluates it (errors told)


def z_device(params: Any) -> torch.device:
    device: torch.device = tree_flatten(params)[0][0].device
    return device


def ggn_parts(job: GGNJob, params: Any, inputs: Any, targets: Any, kind: str) -> tuple[PyTree, Tensor | None]:
    """`kind`: "diag" (the batch GGN's diagonal), "per_sample" (each sample's diagonal), or
    "columns" (each sample's factor columns, with their signs). Works under `torch.no_grad()` and
    `torch.inference_mode()`."""
    with differentiable():  # copies of inference tensors made outside inference mode
        return _ggn_parts(job, usable(params), usable(inputs), usable(targets), kind)


def _ggn_parts(job: GGNJob, params: Any, inputs: Any, targets: Any, kind: str) -> tuple[PyTree, Tensor | None]:
    per_sample = kind != "diag"
    leaves, _ = tree_flatten(params)
    device = leaves[0].device
    bud = Budget(job.call, job.max_memory, device)
    data = (inputs,) if targets is None else (inputs, targets)
    if _chain_ok(params, data):
        steps = build_chain(job.f, params)
        if steps is not None:
            opts = Options(
                hessian=False, per_sample=per_sample, columns=kind == "columns", samples=job.samples,
                generator=job.generator, chunk_size=job.chunk, sample_chunk_size=job.sample_chunk, budget=bud,
            )
            out = run_chain(steps, job.loss, inputs, targets, opts)
            if out is not None:
                return {k: out[0][k] for k in params}, out[1]
    with SecondOrderSafe():  # fused attention / norms / RNN kernels as differentiable compositions
        if couples_samples(job.f):
            return _batch_route(job, params, inputs, targets), None  # the per-sample kinds refuse these models
        if recurrent(job.f):
            return _loop_route(job, params, inputs, targets, kind)
        return _per_sample_route(job, params, inputs, targets, kind, bud)


def _per_sample_route(job: GGNJob, params: Any, inputs: Any, targets: Any, kind: str, bud: Budget) -> tuple[PyTree, Tensor | None]:
    leaves, spec = tree_flatten(params)
    N = sum(p.numel() for p in leaves)
    itemsize = leaves[0].element_size()
    replay = RngReplay(job.randomness != "error", leaves[0].device)
    with _guard(job, leaves[0].device, kind != "diag"):
        z = check_output(job.call, outputs(job.call, job.output, params, inputs, job.sample_chunk, job.randomness, replay))
    check_loss(job.call, job.checked_loss, z, targets)
    B = int(z.shape[0])
    first = job.sample_chunk or B
    if kind == "diag" and not isinstance(job.f, ModuleFunction) and job.randomness == "error" and not _independent(job, params, inputs, z):
        return _batch_route(job, params, inputs, targets), None  # a plain function that mixes the samples
    curv = output_curvature(job.loss, z, targets, per_sample=kind != "diag", samples=job.samples, generator=job.generator)
    if curv is None:  # the loss couples the samples: only the batch GGN is defined
        return _batch_route(job, params, inputs, targets), None
    S, signs = as_factor(curv)
    K = S.shape[1]
    one = (K + 3 * min(K, job.chunk or K)) * N * itemsize  # its columns, and a pass's working set
    if not bud.fits(one):
        raise MemoryBudgetError(
            f"{job.call}: expected one sample's {K} columns of {N:,} parameters to fit the memory "
            f"budget; they need about {format_bytes(one)}, got {format_bytes(bud.value())}. Raise "
            f"max_memory, pass chunk_size= (fewer columns per pass) or samples=k (Monte-Carlo columns)."
        )
    chunk = job.sample_chunk or bud.share(one, B)
    if job.randomness != "error" and chunk != first:
        chunk = first  # replaying the random draws needs the forward's slices
    pieces: list[PyTree] = []
    total: PyTree = None
    for b0, b1, cols in per_sample_columns(
        job.call, job.output, params, inputs, S, sample_chunk=chunk, chunk=job.chunk, randomness=job.randomness, replay=replay
    ):
        if kind == "columns":
            pieces.append(cols)
        else:
            part = squares(cols, None if signs is None else signs[b0:b1], per_sample=kind == "per_sample")
            if kind == "per_sample":
                pieces.append(part)
            else:
                total = part if total is None else tree_map(torch.add, total, part)
    replay.finish()
    if kind == "diag":
        return total, None
    cat = [torch.cat(ls) for ls in zip(*[tree_flatten(p)[0] for p in pieces])]
    return tree_unflatten(spec, cat), signs


def _guard(job: GGNJob, device: torch.device, per_sample: bool = False) -> Any:
    """With randomness="error", refuse a forward that draws random numbers (dropout in train mode)."""
    if job.randomness != "error" or inside_transform():
        return contextlib.nullcontext()
    fix = PER_SAMPLE_FIX if per_sample else None
    return RandomState(device).guard(job.call, fix)


def _independent(job: GGNJob, params: Any, inputs: Any, z: Tensor) -> bool:
    """Whether a plain function's outputs are those of its samples one by one (no batch
    statistics): compared with one `vmap`ped forward over batches of one."""
    try:
        with torch.no_grad():
            one = vmap(lambda xn: job.output(params, tree_map(lambda t: t.unsqueeze(0), xn))[0])(inputs)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    tol = torch.finfo(z.dtype).eps ** 0.5
    z = z.detach()
    return one.shape == z.shape and bool(torch.allclose(one, z, rtol=tol, atol=tol * float(z.abs().max())))


def _batch_route(job: GGNJob, params: Any, inputs: Any, targets: Any) -> PyTree:
    """Models whose samples interact (batch statistics), recurrent layers (no `vmap` over
    samples), or losses that couple the samples: columns of the batch output pulled back through
    the batch's one `vjp`."""
    with _guard(job, tree_flatten(params)[0][0].device):
        z, back = call_f(job.call, vjp, lambda p: job.output(p, inputs), params)
    z = check_output(job.call, z).detach()
    check_loss(job.call, job.checked_loss, z, targets)
    curv = output_curvature(job.loss, z, targets, per_sample=False, samples=job.samples, generator=job.generator)
    if curv is None:
        cols, signs = coupled_columns(job.call, job.output, job.loss, params, inputs, targets, z, samples=job.samples, generator=job.generator, chunk=job.chunk)
        return squares(tree_map(lambda t: t.unsqueeze(0), cols), None if signs is None else signs.unsqueeze(0), per_sample=False)
    S, sgn = as_factor(curv)  # (B, K, *out): column (n, k) lives on sample n
    B, K = S.shape[:2]
    eye = torch.eye(B, dtype=S.dtype, device=S.device)
    sparse = torch.einsum("nk...,nm->nkm...", S, eye).reshape(B * K, B, *S.shape[2:])
    try:
        pulled = vmap(lambda s: back(s)[0], chunk_size=job.chunk)(sparse)
    except (RuntimeError, NotImplementedError):  # no batching rule (recurrent kernels): one by one
        rows = [back(s)[0] for s in sparse]
        pulled = tree_map(lambda *t: torch.stack(t), *rows)
    signs = None if sgn is None else sgn.reshape(1, B * K)
    return squares(tree_map(lambda t: t.unsqueeze(0), pulled), signs, per_sample=False)


def _loop_route(job: GGNJob, params: Any, inputs: Any, targets: Any, kind: str) -> tuple[PyTree, Tensor | None]:
    """Recurrent layers: `vmap` cannot batch them over samples, so one `vjp` per sample (each
    pulling back all its columns)."""
    with _guard(job, tree_flatten(params)[0][0].device, kind != "diag"):
        z = check_output(job.call, outputs(job.call, job.output, params, inputs, None, "error", RngReplay(False, z_device(params))))
    check_loss(job.call, job.checked_loss, z, targets)
    curv = output_curvature(job.loss, z, targets, per_sample=kind != "diag", samples=job.samples, generator=job.generator)
    if curv is None:
        return _batch_route(job, params, inputs, targets), None
    S, signs = as_factor(curv)
    rows = []
    for n in range(S.shape[0]):
        _, back = call_f(job.call, vjp, lambda p: job.output(p, take(inputs, n, n + 1)), params)
        cols = [back(S[n : n + 1, k])[0] for k in range(S.shape[1])]
        rows.append(tree_map(lambda *t: torch.stack(t), *cols))
    stacked = tree_map(lambda *t: torch.stack(t), *rows)  # (B, K, *param)
    if kind == "columns":
        return stacked, signs
    return squares(stacked, signs, per_sample=kind == "per_sample"), None
