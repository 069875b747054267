"""Gauss-Newton (GGN) and empirical Fisher matrices: the curvature Laplace approximations and
second-order optimisers use.

For a loss `L(z(params), targets)` of a model output `z`, the generalised Gauss-Newton matrix is
`G = Jᵀ H_z J`: `J` the Jacobian of the output w.r.t. the parameters, `H_z` the Hessian of the loss
w.r.t. the output. It drops the second derivatives of the model from the Hessian, is positive
semi-definite for convex losses, and equals the Hessian when the model is linear in its parameters.
Every quantity here comes from *one* forward pass per batch (the Jacobian and its transpose both come
from that pass's `vjp`), so dropout masks are never mixed between passes.
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
    Randomness,
    Reduction,
    call_f,
    call_label,
    check_callable,
    check_chunk_size,
    check_out,
    check_primals,
    check_randomness,
    check_reduction,
    check_tangent,
    relays_warnings,
)
from ._compat import inside_transform, vjp
from ._compose import RandomState, check_function, differentiable, random_errors, usable
from ._errors import InvalidArgumentError, OutputError
from ._functional import ModuleFunction
from ._hessian import hessian
from ._hvp import hvp
from ._jacobian import jac_rev
from ._memory import PASS_ENTRIES, budget_of, check_fits
from ._per_sample import sample_chunks
from ._safe_ops import safe_ops
from ._samples import PER_SAMPLE_FIX, Samples, check_per_sample, per_sample_data, per_sample_gradients
from ._tree import chunks, from_matrix, offsets, promoted_dtype, ravel, tree_flatten, tree_map, unravel

__all__ = ["ggn", "ggn_vp", "per_sample_ggn", "empirical_fisher", "split_loss"]

PyTree = Any
_BATCH_RANDOMNESS: tuple[str, ...] = ("error", "same")
_GGN_FIXES = "Use matrix-free products (funchess.ggn_vp), the diagonal, or fewer parameters (funchess.functional(..., params=[...]))"


# ----------------------------------------------------------------------------- shared pieces


def split_loss(
    call: str, f: Callable[..., Any], loss_fn: Callable[..., Tensor] | None
) -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Tensor]]:
    """`(output(params, inputs), loss(output, targets))` from a ModuleFunction or a model function."""
    check_callable(call, f)
    if isinstance(f, ModuleFunction):
        loss = loss_fn if loss_fn is not None else (f.loss if f.loss_fn is not None else None)
        output: Callable[[Any, Any], Any] = f.output
    else:
        loss, output = loss_fn, f
    if loss is None or not callable(loss):
        raise InvalidArgumentError(
            f"{call}: the GGN needs the model output and the loss separately; expected f from "
            f"funchess.functional(model, loss_fn), or f(params, inputs) returning the model "
            f"output together with loss_fn=..., got "
            f"{'no loss' if loss is None else type(loss).__name__ + ' as loss_fn'}. Pass "
            f"loss_fn=torch.nn.functional.cross_entropy (or your loss of (output, targets))."
        )
    checked: Callable[..., Tensor] = loss

    def loss_of(out: Any, targets: Any) -> Tensor:
        value = checked(out) if targets is None else checked(out, targets)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise OutputError(
                f"{call}: loss_fn must return a scalar Tensor, got {got}. Reduce the loss "
                f"(reduction='mean' or 'sum')."
            )
        return value

    return output, loss_of


def _dense(blocks: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int]) -> Tensor:
    """A tree product's row-major blocks as one `(sum(rows), sum(cols))` matrix (works under vmap)."""
    n = len(cols)
    return torch.cat(
        [torch.cat([blocks[i * n + j].reshape(r, c) for j, c in enumerate(cols)], 1) for i, r in enumerate(rows)], 0
    )


def _numels(tree: PyTree) -> list[int]:
    leaves, _ = tree_flatten(tree)
    return [leaf.numel() for leaf in leaves]


def _jacobian_and_output(
    output: Callable[[Any, Any], Any], params: PyTree, inputs: Any, chunk_size: int | None
) -> tuple[Tensor, Any]:
    """`J` as an `(M, N)` matrix (M output entries, rows by reverse mode) and the output `z`."""

    def both(p: Any) -> tuple[Any, Any]:
        z = output(p, inputs)
        return z, z

    J, z = jac_rev(both, (params,), params, has_aux=True, chunk_size=chunk_size)
    blocks, _ = tree_flatten(J)
    return _dense(blocks, _numels(z), _numels(params)), z


def _loss_hessian(loss: Callable[[Any], Tensor], z: Any) -> Tensor:
    """`H_z`, the `(M, M)` Hessian of the loss w.r.t. the model output."""
    H = hessian(loss)(z)
    blocks, _ = tree_flatten(H)
    m = _numels(z)
    return _dense(blocks, m, m)


def _guarded(call: str, randomness: str, device: torch.device) -> Any:
    """With randomness="error", refuse a function that draws random numbers (dropout)."""
    import contextlib

    return RandomState(device).guard(call) if randomness == "error" and not inside_transform() else contextlib.nullcontext()


# ----------------------------------------------------------------------------- full GGN


def ggn(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The generalised Gauss-Newton matrix `Jᵀ H_z J` of a batch, as a Hessian-shaped block pytree.

    `ggn(f)(params, inputs, targets)` has the structure of `funchess.hessian(f)(params, inputs,
    targets)` (block `G[a][b]` of shape `(*params[a].shape, *params[b].shape)`, views of one
    `(N, N)` matrix). `f` is `funchess.functional(model, loss_fn)`, or a function
    `f(params, inputs)` returning the model output together with `loss_fn(output, targets)`. Any
    loss whose Hessian w.r.t. the output exists works (MSE, cross-entropy, custom); the loss's
    reduction is part of it (a mean-reduced loss gives the mean GGN).

    Composition: one forward as a `vjp` of the model output; `J` (`M×N`, `M` the number of
    output entries) is that `vjp` `vmap`ped over chunks of output basis vectors; `H_z` is
    `funchess.hessian` of the loss w.r.t. the output (or, when `M > N`, `funchess.hvp` on the `N`
    columns of `J`); then two matrix products. Cost: `M` backward passes plus `O(M N²)`; for many
    outputs prefer `funchess.ggn_vp`.

    Args:
        f: the loss function from `funchess.functional`, or a model-output function.
        loss_fn: the loss of `(output, targets)`; required when `f` is a plain function.
        chunk_size: rows of `J` per vectorised pass; "auto" bounds each chunk automatically.
        max_memory: the memory budget for the result, `J` and `H_z J` (bytes or "4GiB"); default
            80 % of the device's free memory. A sized `MemoryBudgetError` is raised before
            anything large is allocated.
        randomness: "error" (default: raise if f draws random numbers) or "same" (allowed: the
            single forward pass draws the masks all derivatives use).

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> G = funchess.ggn(f)(params, x, y)
        >>> G["2.weight"]["0.bias"].shape
        torch.Size([2, 4, 4])
        >>> bool(torch.linalg.eigvalsh(funchess.to_matrix(G)).min() > -1e-6)  # PSD for cross-entropy
        True
    """
    call = call_label("ggn", {"loss_fn": loss_fn, "chunk_size": chunk_size, "max_memory": max_memory, "randomness": randomness})
    output, loss = split_loss(call, f, loss_fn)
    chunk = check_chunk_size(call, chunk_size)
    check_randomness(call, randomness, _BATCH_RANDOMNESS)
    budget, budget_from = budget_of(call, max_memory)

    @functools.wraps(f)
    @relays_warnings
    def ggn_fn(params: PyTree, inputs: Any, targets: Any = None) -> PyTree:
        here = f"{call}(params, inputs, targets)"
        params, inputs, targets = usable(params), usable(inputs), usable(targets)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        leaves = tree_flatten(params)[0]
        N, device = sum(_numels(params)), leaves[0].device
        itemsize = promoted_dtype(leaves).itemsize
        check_fits(here, f"the GGN of {N:,} parameters", N * N * itemsize, device, budget, budget_from, _GGN_FIXES)
        with differentiable(), safe_ops(), _guarded(here, randomness, device):
            # the output size, to plan J before forming it (at parameters that require grad, so that an
            # in-place write into them is refused as in every derivative pass, not made)
            z = call_f(here, output, tree_map(lambda t: t.detach().requires_grad_(True), params), inputs)
            M = sum(_numels(z))
            check_fits(here, f"the GGN of {N:,} parameters with {M:,} outputs (J, H_z J and the result)",
                       (N * N + 2 * M * N) * itemsize, device, budget, budget_from, _GGN_FIXES)
            J, z = call_f(here, _jacobian_and_output, output, params, inputs, chunk)
            loss_z = functools.partial(lambda zz, t: loss(zz, t), t=targets)
            if M <= N:
                HJ = _loss_hessian(loss_z, z) @ J
            else:  # H_z would be larger than J: push J's columns through H_z instead
                flat_z = ravel(z)
                column = functools.partial(hvp(lambda zz: loss_z(unravel(zz, z))), flat_z)
                HJ = torch.cat([vmap(column)(J[:, s:e].T).T for s, e in chunks(N, 256)], 1)
        return from_matrix(J.T @ HJ, params)

    return ggn_fn


def ggn_vp(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    randomness: Randomness = "error",
) -> Callable[..., PyTree]:
    """The GGN-vector product `Jᵀ H_z J v`, without forming `J` or the GGN.

    `ggn_vp(f)(params, v, inputs, targets)` returns a pytree shaped like `params`, equal to
    `to_matrix(ggn(f)(params, inputs, targets)) @ ravel(v)`. Works under `torch.func.vmap` over `v`.

    Composition: one forward as a `vjp` of the model output, whose pullback is `u ↦ Jᵀ u`; `J v` is
    the `vjp` of that (linear) pullback, so no second forward and no forward-mode rules are needed;
    then `funchess.hvp` of the loss w.r.t. the output, then the pullback. Cost: about two gradients.

    Args:
        f: the loss function from `funchess.functional`, or a model-output function.
        loss_fn: the loss of `(output, targets)`; required when `f` is a plain function.
        randomness: as for `funchess.ggn`.

    Returns:
        A function `(params, v, inputs, targets=None) -> G v`, funchess's product convention.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> v = {k: torch.randn_like(p) for k, p in params.items()}
        >>> Gv = funchess.ggn_vp(f)(params, v, x, y)
        >>> G = funchess.to_matrix(funchess.ggn(f)(params, x, y))
        >>> torch.allclose(funchess.ravel(Gv), G @ funchess.ravel(v), atol=1e-5)
        True
    """
    call = call_label("ggn_vp", {"loss_fn": loss_fn, "randomness": randomness})
    output, loss = split_loss(call, f, loss_fn)
    check_randomness(call, randomness, _BATCH_RANDOMNESS)

    @functools.wraps(f)
    @relays_warnings
    def ggn_vp_fn(params: PyTree, v: PyTree, inputs: Any, targets: Any = None) -> PyTree:
        here = f"{call}(params, v, inputs, targets)"
        params, v, inputs, targets = usable(params), usable(v), usable(inputs), usable(targets)
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)
        device = tree_flatten(params)[0][0].device
        with differentiable(), safe_ops(), _guarded(here, randomness, device):
            z, pullback = call_f(here, vjp, lambda p: output(p, inputs), params)
            _, transpose = vjp(lambda u: pullback(u)[0], _zeros_like(z))
            Jv = transpose(v)[0]
            HJv = hvp(lambda zz: loss(zz, targets))(z, Jv)
            return pullback(HJv)[0]

    return ggn_vp_fn


def _zeros_like(tree: PyTree) -> PyTree:
    leaves, spec = tree_flatten(tree)
    return spec.unflatten([torch.zeros_like(leaf) for leaf in leaves])


# ----------------------------------------------------------------------------- per sample


def per_sample_ggn(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
    chunk_size: int | None = None,
) -> Callable[..., PyTree]:
    """The GGN of every sample's loss, `J_iᵀ H_i J_i`, as blocks with a leading sample dimension.

    `per_sample_ggn(f)(params, inputs, targets)` returns blocks `G[a][b]` of shape
    `(B, *params[a].shape, *params[b].shape)` (views of one `(B, N, N)` Tensor; see
    `funchess.to_matrix(G, batch_dims=1)`). Sample `i` is a batch of one, as in
    `funchess.per_sample_hessian`; with a mean-reduced loss, `G.mean(0)` is `funchess.ggn`.

    Composition: `vmap` over the samples of [one `vjp` of the output of a batch of one, `vmap`ped
    over the output basis for `J_i`; `funchess.hessian` of the loss w.r.t. that output for `H_i`],
    then one batched matrix product written straight into the result. Much cheaper than
    `per_sample_hessian` when the output is small: the result is written once. For many
    parameters the `(B, N, N)` result itself is the problem: work with the factors instead.

    Args:
        f: the loss function from `funchess.functional`, or a model-output function.
        loss_fn: the loss of `(output, targets)`; required when `f` is a plain function.
        sample_chunk_size: samples per vectorised pass; "auto" bounds each pass automatically.
        max_memory: the memory budget for the `(B, N, N)` result (bytes or "4GiB").
        chunk_size: deprecated spelling of `sample_chunk_size` (removed in funchess 0.3).
        randomness: "error", "different" or "same", as in `torch.func.vmap`.

    Returns:
        A function `(params, inputs, targets=None, *, out=None) -> G`; `out`, as in
        `funchess.per_sample_hessian`, is a reused `(B, N, N)` result buffer.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> G = funchess.per_sample_ggn(f)(params, x, y)
        >>> G["0.weight"]["0.weight"].shape
        torch.Size([6, 4, 3, 4, 3])
        >>> torch.allclose(funchess.to_matrix(G, batch_dims=1).mean(0), funchess.to_matrix(funchess.ggn(f)(params, x, y)), atol=1e-6)
        True
    """
    call = call_label("per_sample_ggn", {"loss_fn": loss_fn, "sample_chunk_size": sample_chunk_size,
                                         "max_memory": max_memory, "randomness": randomness})
    output, loss = split_loss(call, f, loss_fn)
    sample_chunk_size, _ = sample_chunks(call, "per_sample_ggn", sample_chunk_size, chunk_size, rows_too=False)
    b_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)
    budget, budget_from = budget_of(call, max_memory)

    @functools.wraps(f)
    @relays_warnings
    def per_sample_ggn_fn(params: PyTree, inputs: Any, targets: Any = None, *, out: Tensor | None = None) -> PyTree:
        here = f"{call}(params, inputs, targets)"
        params, inputs, targets = usable(params), usable(inputs), usable(targets)
        check_primals(here, (params,), ["params"])
        check_per_sample(here, f)
        samples = Samples(here, (inputs, targets))
        leaves = tree_flatten(params)[0]
        dtype, device = promoted_dtype(leaves), leaves[0].device
        B, N = samples.size, offsets([p.shape for p in leaves])[-1]
        if out is not None:
            check_out(here, out, (B, N, N), dtype, device)
        else:
            check_fits(here, f"{B:,} per-sample GGNs of {N:,} parameters", B * N * N * dtype.itemsize, device,
                       budget, budget_from, _GGN_FIXES)

        def factors(*tensors: Tensor) -> tuple[Tensor, Tensor]:
            x, t = samples.one(tensors)
            J, z = _jacobian_and_output(output, params, x, None)
            return J, _loss_hessian(lambda zz: loss(zz, t), z) @ J

        chunk = b_chunk or max(1, min(B, PASS_ENTRIES // max(N * N, 1)))
        pieces: list[Tensor] = []
        with differentiable(), safe_ops():
            run = vmap(factors, randomness=randomness)
            for b0, b1 in chunks(B, chunk):
                with random_errors(here, PER_SAMPLE_FIX):
                    J, HJ = call_f(here, run, *samples.tensors(b0, b1))
                if inside_transform():
                    pieces.append(J.transpose(1, 2) @ HJ)
                    continue
                if out is None:
                    out = J.new_empty(B, N, N)
                torch.bmm(J.transpose(1, 2), HJ, out=out[b0:b1])
        G = out if out is not None and not pieces else torch.cat(pieces, 0)
        return from_matrix(G, params)

    return per_sample_ggn_fn


# ----------------------------------------------------------------------------- empirical Fisher


def empirical_fisher(
    f: Callable[..., Any],
    *,
    reduction: Reduction = "mean",
    sample_chunk_size: ChunkSize = "auto",
    max_memory: int | float | str | None = None,
    randomness: Randomness = "error",
    chunk_size: int | None = None,
) -> Callable[..., PyTree]:
    """The empirical Fisher `(1/B) Σ_i g_i g_iᵀ` (or the sum) from per-sample gradients.

    `empirical_fisher(f)(params, *data)` has the block structure of `funchess.hessian` (views of
    one `(N, N)` matrix). `g_i` is the gradient of sample `i`'s loss (a batch of one, as in
    `funchess.per_sample_grad`); `reduction` says how f reduces over a batch: "mean" averages the
    outer products, "sum" adds them. A sample's own outer product is `g_i g_iᵀ` from
    `funchess.per_sample_grad`.

    Composition: `funchess.per_sample_grad` (`vmap(grad)`) over chunks of samples, each chunk
    accumulated with one matrix product into the result.

    Args:
        f: the batch loss `f(params, *data)`.
        reduction: "mean" (default) or "sum", matching the loss's reduction.
        sample_chunk_size: samples per vectorised pass; "auto" bounds each pass automatically.
        max_memory: the memory budget for the `(N, N)` result (bytes or "4GiB").
        chunk_size: deprecated spelling of `sample_chunk_size` (removed in funchess 0.3).
        randomness: "error", "different" or "same", as in `torch.func.vmap`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> F = funchess.empirical_fisher(f)(params, x, y)
        >>> funchess.to_matrix(F).shape
        torch.Size([8, 8])
    """
    call = call_label("empirical_fisher", {"reduction": reduction, "sample_chunk_size": sample_chunk_size,
                                           "max_memory": max_memory, "randomness": randomness})
    check_callable(call, f)
    check_reduction(call, reduction)
    sample_chunk_size, _ = sample_chunks(call, "empirical_fisher", sample_chunk_size, chunk_size, rows_too=False)
    b_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
    check_randomness(call, randomness)
    budget, budget_from = budget_of(call, max_memory)

    @functools.wraps(f)
    @relays_warnings
    def empirical_fisher_fn(params: PyTree, *data: Any) -> PyTree:
        params, data = usable(params), usable(data)
        here, samples = per_sample_data(call, f, params, data)
        leaves = tree_flatten(params)[0]
        N, itemsize = sum(_numels(params)), promoted_dtype(leaves).itemsize
        chunk = b_chunk or max(1, min(samples.size, PASS_ENTRIES // max(N, 1)))
        check_fits(here, f"the empirical Fisher of {N:,} parameters", (N * N + chunk * N) * itemsize,
                   leaves[0].device, budget, budget_from, "Use fewer parameters (funchess.functional(..., params=[...])) or a smaller sample_chunk_size")
        G_fn = per_sample_gradients(samples.loss(f), here, randomness)
        F: Tensor | None = None
        with differentiable(), safe_ops():
            for b0, b1 in chunks(samples.size, chunk):
                with random_errors(here, PER_SAMPLE_FIX):
                    grads, _ = tree_flatten(G_fn(params, *samples.tensors(b0, b1)))
                g = torch.cat([t.reshape(b1 - b0, -1) for t in grads], 1)
                F = g.T @ g if F is None else F.addmm(g.T, g)
        assert F is not None
        if reduction == "mean":
            F = F / samples.size
        return from_matrix(F, params)

    return empirical_fisher_fn
