"""GGN columns for any model: per-sample vector-Jacobian products, vectorised over columns.

For a loss that does not couple the samples, the GGN is `sum_n J_nᵀ H_n J_n` with `H_n = S_n
diag(sign) S_nᵀ` from `_losses`, so its factor is the `K x N` matrix `S_nᵀ J_n` per sample: the
vector-Jacobian products `J_nᵀ s_nk` of sample `n`'s output (a batch of one) with each column.
`vmap` over the samples of (one `vjp` of a batch of one, `vmap`ped over its `K` columns) gives them
all without a Python loop, in slices of `sample_chunk` samples and `chunk` columns. The model must
act on every sample separately (no batch statistics), as for every per-sample quantity.

A loss that couples the samples (its Hessian has blocks between different samples) has no
per-sample factor; `coupled_columns` factors its whole `(B D) x (B D)` output Hessian instead and
pulls those columns back through the batch's `vjp` (only for the batch GGN).

Random operations follow `randomness` as in `torch.func.vmap`: with "same" or "different", the
forward that gives the outputs (for the loss factor) and the forward inside each `vjp` draw the same
numbers (the generator's state is replayed per slice of samples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from .._checks import call_f
from .._compat import vjp
from .._compose import RandomState
from .._tree import tree_flatten, tree_map, tree_unflatten
from ._curvature import as_factor, weighted_sum
from ._losses import eigen_blocks, monte_carlo

PyTree = Any
Output = Callable[[PyTree, Any], Tensor]


class RngReplay:
    """The random generators' state saved per slice of samples, replayed on request (for
    randomness "same" / "different": the `vjp`s then draw what the forward drew)."""

    def __init__(self, active: bool, device: torch.device) -> None:
        self.active, self.device = active, device
        self.states: dict[int, RandomState] = {}
        self.end: RandomState | None = None

    def save(self, key: int) -> None:
        if self.active:
            self.states[key] = RandomState(self.device)
            self.states[key].save()

    def replay(self, key: int) -> None:
        if self.active:
            if self.end is None:
                self.end = RandomState(self.device)
                self.end.save()
            self.states[key].replay()

    def finish(self) -> None:
        if self.end is not None:
            self.end.replay()


def take(tree: PyTree, b0: int, b1: int) -> PyTree:
    return tree_map(lambda t: t[b0:b1], tree)


def _one(tree: PyTree) -> PyTree:
    return tree_map(lambda t: t.unsqueeze(0), tree)


def outputs(call: str, output: Output, params: PyTree, inputs: Any, chunk: int | None, randomness: str, replay: RngReplay) -> Tensor:
    """The model outputs (detached): one batch forward (deterministic models), or per slice of
    samples under `vmap` with the generators' states saved (random ones, replayed by the `vjp`s).
    The forward sees the parameters as tensors autograd tracks, so that torch refuses an in-place
    write into them before it lands (told as a funchess error naming the fix)."""
    if randomness == "error":
        tracked = tree_map(lambda p: p.detach().requires_grad_(True), params)
        with torch.enable_grad():
            z = call_f(call, output, tracked, inputs)
        return z.detach() if isinstance(z, Tensor) else z
    B = batch_size(inputs)
    chunk = chunk or B
    parts = []
    for b0 in range(0, B, chunk):
        replay.save(b0)
        xs = take(inputs, b0, min(B, b0 + chunk))
        with torch.no_grad():
            parts.append(vmap(lambda xn: output(params, _one(xn))[0], randomness=randomness)(xs))
    return torch.cat(parts)


def batch_size(inputs: Any) -> int:
    leaves, _ = tree_flatten(inputs)
    return int(leaves[0].shape[0])


def per_sample_columns(
    call: str,
    output: Output,
    params: PyTree,
    inputs: Any,
    S: Tensor,
    *,
    sample_chunk: int,
    chunk: int | None,
    randomness: str,
    replay: RngReplay,
) -> Iterator[tuple[int, int, PyTree]]:
    """`(b0, b1, cols)` per slice of samples: `cols` shaped like params with leading `(b, K)`,
    `cols[n, k] = J_nᵀ S[n, k]`."""
    B = S.shape[0]

    def one(xn: Any, Sn: Tensor) -> Any:
        _, back = vjp(lambda p: output(p, _one(xn)), params)
        return vmap(lambda s: back(s.unsqueeze(0))[0], chunk_size=chunk)(Sn)

    run = vmap(one, randomness=randomness)
    for b0 in range(0, B, sample_chunk):
        b1 = min(B, b0 + sample_chunk)
        replay.replay(b0)
        yield b0, b1, call_f(call, run, take(inputs, b0, b1), S[b0:b1])


def coupled_columns(
    call: str,
    output: Output,
    loss_fn: Callable[..., Tensor],
    params: PyTree,
    inputs: Any,
    targets: Any,
    z: Tensor,
    *,
    samples: int | None,
    generator: torch.Generator | None,
    chunk: int | None,
) -> tuple[PyTree, Tensor | None]:
    """A loss that couples the samples: its whole output Hessian (the batch as one "sample"),
    eigendecomposed, as columns pulled back through the batch `vjp`: `(cols with leading K, signs)`."""
    n = z.numel()
    def loss(zz: Tensor) -> Tensor:
        return loss_fn(zz) if targets is None else loss_fn(zz, targets)

    _, hvp = vjp(grad(loss), z)
    basis = torch.eye(n, dtype=z.dtype, device=z.device).reshape(n, *z.shape)
    H = vmap(lambda v: hvp(v)[0], chunk_size=chunk)(basis).reshape(1, n, n)
    curv = eigen_blocks(H, z.shape)
    if samples is not None:
        curv = monte_carlo(None, curv, z.unsqueeze(0), None, samples, generator)
    S, signs = as_factor(curv)
    _, back = call_f(call, vjp, lambda p: output(p, inputs), params)
    pulled = vmap(lambda s: back(s)[0], chunk_size=chunk)(S[0])
    return pulled, None if signs is None else signs[0]


def squares(cols: PyTree, signs: Tensor | None, per_sample: bool) -> PyTree:
    """`sum_k sign_k cols[.., k]²` (summed over samples too unless `per_sample`)."""
    leaves, spec = tree_flatten(cols)
    out = []
    for G in leaves:
        sq = G.square()
        v = sq.sum(1) if signs is None else weighted_sum(sq, signs)
        out.append(v if per_sample else v.sum(0))
    return tree_unflatten(spec, out)
