"""The public diagonal functions: `ggn_diagonal`, `per_sample_ggn_diagonal`,
`per_sample_hessian_diagonal` (and `per_sample_ggn_factor` in `_factor`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import call_f, check_callable, check_chunk_size, check_primals, check_randomness, check_scalar
from .._compose import RandomState, check_function, differentiable, random_errors, usable
from .._errors import FunchessError, StructureError
from .._memory import parse_bytes
from .._samples import PER_SAMPLE_FIX, Samples
from .._tree import tree_flatten, tree_map, tree_unflatten
from ._checks import check_samples, label, recurrent, split_model
from ._route import GGNJob, ggn_parts, structured_hessian_diagonal

PyTree = Any
ChunkSize = Union[int, Literal["auto"], None]  # noqa: UP007 (a runtime alias on Python 3.10)
Randomness = Literal["error", "same", "different"]


def ggn_job(
    name: str, f: Callable[..., Any], loss_fn: Callable[..., Tensor] | None, samples: int | None,
    generator: torch.Generator | None, chunk_size: ChunkSize, sample_chunk_size: ChunkSize,
    max_memory: int | float | str | None, randomness: str,
) -> GGNJob:
    """Check a GGN function's options once, when the transform is built."""
    call = label(name, {
        "loss_fn": loss_fn, "samples": samples, "generator": generator, "chunk_size": chunk_size,
        "sample_chunk_size": sample_chunk_size, "max_memory": max_memory, "randomness": randomness,
    })
    output, loss, checked = split_model(call, f, loss_fn)
    chunk = check_chunk_size(call, chunk_size)
    sample_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_samples(call, samples, generator)
    check_randomness(call, randomness)
    if max_memory is not None:
        parse_bytes(call, max_memory)
    return GGNJob(call, f, output, loss, samples, generator, chunk, sample_chunk, max_memory, randomness, checked)


def ggn_diagonal(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: ChunkSize = "auto",
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The exact diagonal of the generalised Gauss-Newton matrix `Jᵀ H_z J` of a batch (or a
    Monte-Carlo estimate with `samples=k`), shaped like the parameters, for any model.

    `ggn_diagonal(f)(params, inputs, targets)["w"]` equals the diagonal of
    `funchess.ggn(f)(params, inputs, targets)["w"]["w"]` without forming any matrix: for a loss
    that does not couple the samples, `diag G = sum_n sum_k sign_nk (J_nᵀ s_nk)²` with `H_n =
    S_n diag(sign_n) S_nᵀ` a factorisation of sample `n`'s loss Hessian w.r.t. the output (closed
    forms for cross-entropy, MSE and BCE; an eigendecomposition for other losses).

    Routes (chosen per call, always exact): when `f` is `funchess.functional(model, loss_fn)` and
    `model` an `nn.Sequential` of Linear, Conv, activations, norms (BatchNorm in eval mode),
    pooling, Flatten, Dropout in eval mode and a first Embedding, the columns are swept backwards
    module by module with per-module rules (a Linear weight's diagonal is one matrix product for
    the whole batch; no per-sample gradients). Any other model (attention, recurrent layers,
    custom modules, plain functions): per-sample `vjp`s of each column, `vmap`ped over the samples
    and the columns. Batch norm in train mode and losses that couple the samples: the columns are
    pulled through the batch's `vjp`.

    Args:
        f: the loss function from `funchess.functional`, or a function `f(params, inputs)`
            returning the model output (then pass `loss_fn`).
        loss_fn: the loss of `(output, targets)`; overrides the one in `f`.
        samples: None for the exact diagonal; `k` for `k` Monte-Carlo columns per sample drawn
            from the model's predictive distribution (cross-entropy: labels from the softmax;
            MSE: Gaussian noise; BCE with logits: Bernoulli labels; other losses: random
            combinations of the exact columns). Unbiased; cheaper when the output is large.
        generator: the `torch.Generator` for the Monte-Carlo draws.
        chunk_size: columns per vectorised pass; "auto" plans it.
        sample_chunk_size: samples per vectorised pass; "auto" plans it from `max_memory`.
        max_memory: the memory budget (bytes or "4GiB"); default 80 % of the device's free memory.
        randomness: "error" (default: refuse random operations such as dropout in train mode),
            "same" or "different" (as in `torch.func.vmap`; each sample's columns then use the
            masks its forward drew).

    Returns:
        A function `(params, inputs, targets=None) -> diagonal` shaped like `params`.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> d = funchess.ggn_diagonal(f)(params, x, y)
        >>> G = funchess.ggn(f)(params, x, y)
        >>> torch.allclose(d["0.weight"], torch.diagonal(G["0.weight"]["0.weight"].reshape(12, 12)).reshape(4, 3), atol=1e-6)
        True
    """
    job = ggn_job("ggn_diagonal", f, loss_fn, samples, generator, chunk_size, sample_chunk_size, max_memory, randomness)

    @functools.wraps(f)
    def ggn_diagonal_fn(params: PyTree, inputs: Any, targets: Any = None) -> PyTree:
        here = f"{job.call}(params, inputs, targets)"
        check_primals(here, (params,), ["params"])
        check_function(here, f)
        return ggn_parts(at_call(job, here), params, inputs, targets, "diag")[0]

    return ggn_diagonal_fn


def at_call(job: GGNJob, here: str) -> GGNJob:
    """The job with the call label of one call (with its arguments)."""
    return dataclasses.replace(job, call=here)


def per_sample_ggn_diagonal(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: ChunkSize = "auto",
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The diagonal of every sample's GGN `J_nᵀ H_n J_n` (BackPACK's `BatchDiagGGNExact`), for any
    model: leaves of shape `(B, *param.shape)`.

    Sample `n`'s loss is `f` on a batch of one (as in `funchess.per_sample_ggn`); with a
    mean-reduced loss the mean over samples is `funchess.ggn_diagonal`. Same routes, options and
    Monte-Carlo `samples` as `funchess.ggn_diagonal`; models whose batch statistics couple the
    samples (batch norm in train mode) are refused.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> d = funchess.per_sample_ggn_diagonal(f)(params, x, y)
        >>> d["0.weight"].shape
        torch.Size([6, 4, 3])
        >>> torch.allclose(d["0.weight"].mean(0), funchess.ggn_diagonal(f)(params, x, y)["0.weight"], atol=1e-6)
        True
    """
    job = ggn_job("per_sample_ggn_diagonal", f, loss_fn, samples, generator, chunk_size, sample_chunk_size, max_memory, randomness)

    @functools.wraps(f)
    def per_sample_ggn_diagonal_fn(params: PyTree, inputs: Any, targets: Any = None) -> PyTree:
        here = f"{job.call}(params, inputs, targets)"
        check_primals(here, (params,), ["params"])
        check_function(here, f, per_sample=True)
        Samples(here, (inputs, targets))  # the samples along dim 0, at least one
        return ggn_parts(at_call(job, here), params, inputs, targets, "per_sample")[0]

    return per_sample_ggn_diagonal_fn


def per_sample_hessian_diagonal(
    f: Callable[..., Any],
    *,
    chunk_size: ChunkSize = "auto",
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The exact diagonal of every sample's Hessian (BackPACK's `BatchDiagHessian`), for any
    model: leaves of shape `(B, *param.shape)`.

    `per_sample_hessian_diagonal(f)(params, *data)[k][n]` is the diagonal of
    `funchess.per_sample_hessian(f)(params, *data)[k][k][n]`: sample `n`'s loss is `f` on a batch
    of one (every Tensor in `data` holds the samples along dim 0). With a mean-reduced loss, the
    mean over samples is `funchess.hessian_diagonal`.

    Routes (always exact): for `funchess.functional(model, loss_fn)` with `model` an
    `nn.Sequential` of modules with rules (see `funchess.ggn_diagonal`), one backward sweep
    carries each sample's output Hessian factor plus the second-order terms of the nonlinear
    modules (diagonal for activations, per position for norms), and reads every parameter's
    diagonal from its module's rule. Otherwise `funchess.hessian_diagonal` of each sample's loss,
    `vmap`ped over the samples (a loop for recurrent layers, which `vmap` cannot batch).

    Args:
        f: a loss `f(params, *data)` over a batch, e.g. from `funchess.functional`.
        chunk_size: Hessian rows (generic route) or columns (module route) per vectorised pass.
        sample_chunk_size: samples per vectorised pass; "auto" plans it.
        max_memory: the memory budget (bytes or "4GiB"); default 80 % of the free memory.
        randomness: "error" (default: refuse dropout in train mode), "same" or "different".

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> d = funchess.per_sample_hessian_diagonal(f)(params, x, y)
        >>> d["0.weight"].shape
        torch.Size([5, 4, 3])
        >>> H = funchess.hessian(f)(params, x[1:2], y[1:2])
        >>> torch.allclose(d["2.bias"][1], torch.diagonal(H["2.bias"]["2.bias"]), atol=1e-6)
        True
    """
    call = label("per_sample_hessian_diagonal", {
        "chunk_size": chunk_size, "sample_chunk_size": sample_chunk_size, "max_memory": max_memory, "randomness": randomness,
    })
    check_callable(call, f)
    chunk = check_chunk_size(call, chunk_size)
    sample_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)
    if max_memory is not None:
        parse_bytes(call, max_memory)

    @functools.wraps(f)
    def per_sample_hessian_diagonal_fn(params: PyTree, *data: Any) -> PyTree:
        here = f"{call}(params, ...)"
        check_primals(here, (params,), ["params"])
        check_function(here, f, per_sample=True)
        Samples(here, data)  # the samples along dim 0, at least one
        out = structured_hessian_diagonal(
            f, params, *data, per_sample=True, chunk_size=chunk, sample_chunk_size=sample_chunk, max_memory=max_memory
        )
        if out is not None:
            return out
        with differentiable():  # copies of inference tensors made outside inference mode
            data = usable(data)
            _check_once(here, f, params, data, randomness)
            return _generic_per_sample_hessian_diagonal(here, f, params, data, chunk, sample_chunk, max_memory, randomness)

    return per_sample_hessian_diagonal_fn


def _check_once(call: str, f: Callable[..., Any], params: PyTree, data: tuple[Any, ...], randomness: str) -> None:
    """One evaluation of `f` on the batch, so that its errors (the model's, the loss's, a random
    draw, an in-place write into the parameters, a non-scalar loss) name this call."""
    tracked = tree_map(lambda p: p.detach().requires_grad_(True), params)
    device = tree_flatten(params)[0][0].device
    guard = RandomState(device).guard(call, PER_SAMPLE_FIX) if randomness == "error" else contextlib.nullcontext()
    with guard:
        check_scalar(call, call_f(call, f, tracked, *data))


def _generic_per_sample_hessian_diagonal(
    call: str, f: Callable[..., Any], params: PyTree, data: tuple[Any, ...], chunk: int | None, sample_chunk: int | None,
    max_memory: int | float | str | None, randomness: str,
) -> PyTree:
    from .._hessian import hessian_diagonal  # the transforms' generic engine (a layer below)

    leaves, spec = tree_flatten(data)
    index = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
    if not index or any(leaves[i].dim() == 0 or leaves[i].shape[0] != leaves[index[0]].shape[0] for i in index):
        raise StructureError(
            f"{call}: expected per-sample data after params (Tensors with the samples along dim 0, "
            f"all of one size), got {[tuple(leaves[i].shape) for i in index] or 'no Tensor'}. Pass "
            f"per-sample data only; close over tensors shared by all samples inside f."
        )
    B = int(leaves[index[0]].shape[0])
    inner = "error" if randomness == "error" else "same"  # each sample's passes replay its draw
    diag = hessian_diagonal(f, chunk_size="auto" if chunk is None else chunk, max_memory=max_memory, randomness=inner)

    def one(*tensors: Tensor) -> PyTree:
        full = list(leaves)
        for i, t in zip(index, tensors):
            full[i] = t.unsqueeze(0)
        return diag(params, *tree_unflatten(spec, full))

    try:
        if recurrent(f):  # torch.func.vmap has no batching rule for recurrent layers
            rows = [one(*[leaves[i][n] for i in index]) for n in range(B)]
            return tree_map(lambda *t: torch.stack(t), *rows)
        size = sample_chunk or B
        parts = []
        for b0 in range(0, B, size):
            with random_errors(call, PER_SAMPLE_FIX):
                parts.append(vmap(one, randomness=randomness)(*[leaves[i][b0 : b0 + size] for i in index]))
        return tree_map(lambda *t: torch.cat(t), *parts)
    except FunchessError as exc:  # the inner hessian_diagonal's error, told for this call
        raise type(exc)(f"{call}: {str(exc).split(': ', 1)[-1]}") from exc
