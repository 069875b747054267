"""The GGN, the Fisher and the empirical Fisher as sums of outer products, one sample at a time.

For a loss `L(z)` of a batch of model outputs `z` (`B` samples, `C` output entries each), all
three curvatures are sums over the samples `n` and the columns `c` of a per-sample factor `S_n`:

    G = sum_n sum_c sigma_nc (J_n^T s_nc)(J_n^T s_nc)^T

with `J_n` the Jacobian of sample `n`'s output w.r.t. the parameters and `sigma_nc = +-1`:

- "type-2" (the GGN): `S_n S_n^T = d^2 L / dz_n^2`; closed forms for MSE and cross-entropy (the
  same square roots curvlinops and BackPACK use), otherwise the eigendecomposition of the loss's
  Hessian w.r.t. the output, with `sigma` the signs of its eigenvalues (so non-convex losses stay
  exact);
- "mc" (the Monte-Carlo Fisher): sampled columns with `E[s s^T] = d^2 L / dz_n^2` (MSE and
  cross-entropy only: the likelihood must be known to sample from it);
- "empirical": one column, the gradient of sample `n`'s own loss w.r.t. its output;
- "jacobian": the identity, so the rows are those of the Jacobian `J_n` itself.

`LossFactor` holds the columns (computed per chunk of samples, so a (B, C, C) factor is never
formed at once); `factor_rows` yields the rows `J_n^T s_nc` (per-sample `vjp`s `vmap`ped over
chunks of samples and over the columns), with the chunk planned against a memory budget first.
The loss must be a sum or mean of per-sample terms, as every PyTorch loss with reduction "sum" or
"mean" is; the model must not couple the samples (batch norm in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.flop_counter import FlopCounterMode

from ._compat import vjp
from ._errors import InvalidArgumentError, MemoryBudgetError, UnsupportedError
from ._memory import MemoryPlan, available_bytes, format_bytes, parse_bytes
from ._safe_ops import SecondOrderSafe
from ._tree import tree_flatten, tree_unflatten

__all__ = [
    "FisherType", "LossFactor", "factor_rows", "ggn_columns", "prefer_columns", "probe", "one_sample",
    "memory_budget", "check_deterministic", "batch_size",
]

PyTree = Any
FisherType = Literal["type-2", "mc", "empirical"]
FISHER_TYPES: tuple[str, ...] = ("type-2", "mc", "empirical")
_FRACTION = 0.9  # of the budget planned for; the allocator's own slack must fit in the rest
_FIXED = 8 * 2**20  # Python's and the allocator's temporaries


# ----------------------------------------------------------------------------- the loss's factor


def _known_loss(loss_fn: Any, z: Tensor, targets: Any) -> tuple[str, str] | None:
    """("mse" | "ce", reduction) when the loss has a closed-form factor, else None."""
    if loss_fn is F.mse_loss or type(loss_fn) is nn.MSELoss:
        reduction = getattr(loss_fn, "reduction", "mean")
        ok = isinstance(targets, Tensor) and targets.shape == z.shape
        return ("mse", reduction) if ok else None
    if loss_fn is F.cross_entropy or type(loss_fn) is nn.CrossEntropyLoss:
        reduction = getattr(loss_fn, "reduction", "mean")
        plain = getattr(loss_fn, "weight", None) is None and getattr(loss_fn, "label_smoothing", 0.0) == 0.0
        ignore = getattr(loss_fn, "ignore_index", -100)
        ok = (
            plain and z.dim() == 2 and isinstance(targets, Tensor) and targets.dim() == 1
            and not targets.is_floating_point() and not bool((targets == ignore).any())
        )
        return ("ce", reduction) if ok else None
    return None


class LossFactor:
    """The per-sample columns `s_nc` of one batch's loss, computed chunk by chunk of samples.

    Attributes:
        rank: columns per sample (`C` for "type-2", `mc_samples` for "mc", 1 for "empirical").
        signed: whether some columns enter with a minus sign (a non-convex loss's GGN).
    """

    def __init__(
        self,
        call: str,
        loss_fn: Callable[..., Tensor],
        z: Tensor,
        targets: Any,
        *,
        kind: str,
        reduction: str | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(z, Tensor) or z.dim() < 1:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise UnsupportedError(
                f"{call}: expected the model to return one Tensor with the samples along dim 0, "
                f"got {got}. Wrap the model so that it returns its output Tensor."
            )
        self.call, self.loss_fn, self.kind = call, loss_fn, kind
        self.z, self.targets = z.detach(), targets
        self.B, self.C = z.shape[0], z[0].numel()
        self.known = _known_loss(loss_fn, z, targets)
        self.generator, self.mc_samples = generator, mc_samples
        if self.known is not None and self.known[1] not in ("sum", "mean"):
            raise InvalidArgumentError(
                f"{call}: expected the loss to reduce over the batch (reduction='sum' or 'mean'), "
                f"got reduction={self.known[1]!r}. Pass a reduced loss."
            )
        if reduction is not None and self.known is not None and reduction != self.known[1]:
            raise InvalidArgumentError(
                f"{call}: reduction={reduction!r} contradicts the loss, which reduces with "
                f"{self.known[1]!r}. Leave reduction out (it is read from the loss)."
            )
        self.reduction = self.known[1] if self.known is not None else (reduction or "mean")
        if kind == "mc" and self.known is None:
            raise UnsupportedError(
                f"{call}: fisher_type='mc' samples labels from the likelihood the loss defines, "
                f"which funchess knows for MSE and cross-entropy (with class-index targets) only; "
                f"got {getattr(loss_fn, '__name__', type(loss_fn).__name__)}. Use "
                f"fisher_type='type-2' (exact for any loss)."
            )
        self.rank = {"type-2": self.C, "mc": mc_samples, "empirical": 1, "jacobian": self.C}[kind]
        self.signed = kind == "type-2" and self.known is None
        self._grad: Tensor | None = None

    def _scale(self) -> float:
        """`c` in `loss = c * sum over samples`: 1 for "sum"; 1/B (CE) or 1/(B C) (MSE) for "mean"."""
        if self.reduction == "sum":
            return 1.0
        assert self.known is not None
        return 1.0 / (self.z.numel() if self.known[0] == "mse" else self.B)

    def _loss_of(self, z: Tensor) -> Tensor:
        value = self.loss_fn(z, self.targets) if self.targets is not None else self.loss_fn(z)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InvalidArgumentError(
                f"{self.call}: expected the loss to return a scalar Tensor, got {got}. Reduce it "
                f"over the batch (reduction='sum' or 'mean')."
            )
        return value

    def columns(self, b0: int, b1: int, c0: int = 0, c1: int | None = None) -> tuple[Tensor, Tensor | None]:
        """`(S, signs)` for samples `b0..b1-1` and columns `c0..c1-1`: `S` of shape `(k, C, r)`,
        `signs` of shape `(k, r)` or None (all +1)."""
        c1 = self.rank if c1 is None else c1
        z = self.z[b0:b1].reshape(b1 - b0, self.C)
        if self.kind == "empirical":
            return self._empirical(b0, b1), None
        if self.kind == "jacobian":  # the identity: the rows are the Jacobian's rows
            eye = torch.eye(self.C, dtype=z.dtype, device=z.device)[:, c0:c1]
            return eye.expand(b1 - b0, self.C, c1 - c0), None
        if self.known is None:
            S, signs = self._eigen(b0, b1)
            return S[:, :, c0:c1], signs[:, c0:c1]
        c = self._scale()
        if self.known[0] == "mse":
            if self.kind == "type-2":
                eye = torch.eye(self.C, dtype=z.dtype, device=z.device)[:, c0:c1]
                return (math.sqrt(2 * c) * eye).expand(b1 - b0, self.C, c1 - c0), None
            noise = torch.randn(b1 - b0, self.C, c1 - c0, dtype=z.dtype, device=z.device, generator=self.generator)
            return noise * math.sqrt(2 * c / self.mc_samples), None
        p = z.softmax(dim=1)
        if self.kind == "type-2":  # S = diag(sqrt p) - p sqrt(p)^T, so S S^T = diag(p) - p p^T
            root = p.sqrt()
            S = torch.diag_embed(root)[:, :, c0:c1] - p.unsqueeze(2) * root[:, c0:c1].unsqueeze(1)
            return math.sqrt(c) * S, None
        labels = torch.multinomial(p, c1 - c0, replacement=True, generator=self.generator)  # (k, r)
        onehot = F.one_hot(labels, self.C).to(p.dtype).transpose(1, 2)  # (k, C, r)
        return (p.unsqueeze(2) - onehot) * math.sqrt(c / self.mc_samples), None

    def _empirical(self, b0: int, b1: int) -> Tensor:
        if self._grad is None:  # one gradient of the whole batch's loss w.r.t. the output
            z = self.z.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self._loss_of(z), z)
            # sample n's own loss (a batch of one) has gradient B * dL/dz_n under a mean reduction
            self._grad = g.reshape(self.B, self.C) * (self.B if self.reduction == "mean" else 1.0)
        # the empirical Fisher of a mean-reduced loss averages over the samples
        scale = 1.0 / math.sqrt(self.B) if self.reduction == "mean" else 1.0
        return (self._grad[b0:b1] * scale).unsqueeze(2)

    def _eigen(self, b0: int, b1: int) -> tuple[Tensor, Tensor]:
        """A general loss: its per-sample Hessians w.r.t. the output (C HVPs of the batch loss,
        each with one output direction set in every sample of the chunk), then `eigh`."""
        k, C = b1 - b0, self.C
        mask = torch.zeros(self.B, 1, dtype=self.z.dtype, device=self.z.device)
        mask[b0:b1] = 1.0

        _, pull = vjp(torch.func.grad(self._loss_of), self.z)  # the Hessian is symmetric: vjp = hvp

        def hvp(u: Tensor) -> Tensor:  # u: (C,), the same output direction in every sample
            (h,) = pull((mask * u.unsqueeze(0)).reshape(self.z.shape))
            column: Tensor = h.reshape(self.B, C)[b0:b1]
            return column

        eye = torch.eye(C, dtype=self.z.dtype, device=self.z.device)
        H = vmap(hvp)(eye).permute(1, 2, 0)  # (k, C, C): column u of each sample's Hessian
        H = 0.5 * (H + H.transpose(1, 2))
        lam, Q = torch.linalg.eigh(H)
        return Q * lam.abs().sqrt().unsqueeze(1), torch.where(lam < 0, -1.0, 1.0).to(H.dtype).reshape(k, C)


# ----------------------------------------------------------------------------- memory and data


def memory_budget(call: str, max_memory: int | float | str | None, device: torch.device) -> tuple[int, str]:
    """`(bytes, where the number came from)` for messages."""
    if max_memory is None:
        free = available_bytes(device)
        return int(0.8 * free), f"80 % of the {format_bytes(free)} free on {device}"
    return parse_bytes(call, max_memory), f"max_memory={max_memory!r}"


def check_deterministic(call: str, model: nn.Module, randomness: str) -> None:
    """Refuse train-mode batch norm (it couples the samples) and, with randomness='error', active
    dropout: per-sample factors of either are undefined or not reproducible."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedError(
                f"{call}: the model has {type(m).__name__} {name!r} in train mode; its batch "
                f"statistics couple the samples, so the per-sample factors are undefined. Call "
                f"model.eval() first."
            )
        if randomness == "error" and isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise UnsupportedError(
                f"{call}: the model has {type(m).__name__} {name!r} (p={m.p}) in train mode, and "
                f"randomness='error'. Call model.eval() (Laplace and K-FAC are taken at the "
                f"trained, deterministic network)."
            )


def batch_size(call: str, inputs: Any, targets: Any) -> int:
    """The number of samples: the targets' leading size, else the first input Tensor's."""
    for x in (targets, *tree_flatten(inputs)[0]):
        if isinstance(x, Tensor) and x.dim() > 0:
            return int(x.shape[0])
    raise InvalidArgumentError(
        f"{call}: expected the inputs or targets to hold the samples along dim 0, got no Tensor "
        f"with a batch dimension. Pass batched Tensors."
    )


def _per_sample_inputs(inputs: Any, B: int) -> tuple[list[Any], list[int | None], Callable[[list[Any]], Any]]:
    """The input leaves, their vmap dims (0 for Tensors holding the B samples) and a rebuild that
    gives each per-sample leaf its batch dimension back (the model sees a batch of one)."""
    leaves, spec = tree_flatten(inputs)
    dims: list[int | None] = [0 if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == B else None for x in leaves]

    def rebuild(parts: list[Any]) -> Any:
        return tree_unflatten(spec, [x.unsqueeze(0) if d == 0 else x for x, d in zip(parts, dims)])

    return leaves, dims, rebuild


def probe(output_fn: Callable[[dict[str, Tensor], Any], Any], params: dict[str, Tensor], one: Any) -> tuple[int, int]:
    """`(bytes autograd saves, FLOPs)` of one forward of a batch of one: the per-sample activation
    memory and compute that the memory plans and the choice of route need."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    fresh = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
        output_fn(fresh, one)
    return total, int(flops.get_total_flops())


def one_sample(inputs: Any, B: int) -> Any:
    """The first sample of `inputs` as a batch of one."""
    data, dims, rebuild = _per_sample_inputs(inputs, B)
    return rebuild([x[0] if d == 0 else x for x, d in zip(data, dims)])


@dataclass(frozen=True)
class RowPlan:
    samples: int  # samples per vectorised pass
    columns: int  # factor columns per pass
    plan: MemoryPlan


def plan_rows(
    call: str,
    what: str,
    *,
    act: int,
    P: int,
    itemsize: int,
    B: int,
    rank: int,
    output_bytes: int,
    budget: int,
    budget_from: str,
    device: torch.device,
    sample_chunk_size: int | str,
) -> RowPlan:
    """Samples and columns per pass so that the pass fits next to the result.

    One sample costs its activations plus, per column, a backward's intermediates (at most the
    activations again) and the row with its pieces before concatenation and its square (3 P).
    """
    per_column = act + 3 * P * itemsize
    room = int(_FRACTION * budget) - output_bytes - _FIXED
    if isinstance(sample_chunk_size, int):
        k, r = sample_chunk_size, rank
    else:
        k = max(0, min(B, room // max(act + rank * per_column, 1)))
        r = rank if k >= 1 else max(0, min(rank, (room - act) // per_column))
        k = max(k, 1 if r >= 1 else 0)
    need = output_bytes + _FIXED + max(k, 1) * (act + max(r, 1) * per_column)
    plan = MemoryPlan(output_bytes, _FIXED, act + max(r, 1) * per_column, max(k, 1), need, budget, str(device))
    if k < 1 or r < 1:
        error = MemoryBudgetError(
            f"{call}: {what} needs at least {format_bytes(need)} on {device} (result "
            f"{format_bytes(output_bytes)}, one sample's activations {format_bytes(act)}, one "
            f"row of {P:,} parameters {format_bytes(P * itemsize)} x 3); expected it to fit the "
            f"budget of {format_bytes(budget)} ({budget_from}). Pass a larger max_memory, use "
            f"fewer parameters (last_layer / subnetwork), or a diagonal or Kronecker structure."
        )
        error.plan = plan
        raise error
    return RowPlan(k, r, plan)


# ----------------------------------------------------------------------------- the rows


def factor_rows(
    call: str,
    output_fn: Callable[[dict[str, Tensor], Any], Any],
    params: dict[str, Tensor],
    inputs: Any,
    factor: LossFactor,
    *,
    what: str,
    output_bytes: int,
    max_memory: int | float | str | None = None,
    sample_chunk_size: int | str = "auto",
) -> Iterator[tuple[Tensor, Tensor | None, tuple[int, int]]]:
    """Yield `(rows, signs, (b0, c0))` chunk by chunk: `rows[i, j]` is `J_n^T s_nc` flattened over
    `params` (in their order) for sample `n = b0 + i` and column `c = c0 + j`; `signs` matches
    `rows.shape[:2]` (None: all +1). Chunks run over the columns within each chunk of samples.

    `output_fn(params, inputs)` is the model's output on a batch (a Tensor with the samples along
    dim 0); parameters missing from `params` keep their values. Raises `MemoryBudgetError` (sized)
    before the first pass when not even one sample and one column fit.
    """
    B = factor.B
    leaves = list(params.values())
    P = sum(p.numel() for p in leaves)
    dtype = torch.promote_types(leaves[0].dtype, factor.z.dtype)
    for p in leaves[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    device = leaves[0].device
    budget, budget_from = memory_budget(call, max_memory, device)
    data, dims, rebuild = _per_sample_inputs(inputs, B)
    act, _ = probe(output_fn, params, one_sample(inputs, B))
    rp = plan_rows(
        call, what, act=act, P=P, itemsize=torch.finfo(dtype).bits // 8, B=B, rank=factor.rank,
        output_bytes=output_bytes, budget=budget, budget_from=budget_from, device=device,
        sample_chunk_size=sample_chunk_size,
    )
    frozen = {k: v.detach() for k, v in params.items()}

    def sample_rows(parts: list[Any], S: Tensor) -> Tensor:
        """One sample: its output's vjp, pulled back along each column of S (C, r)."""
        z, pull = vjp(lambda p: output_fn(p, rebuild(parts)), frozen)

        def row(s: Tensor) -> Tensor:
            (g,) = pull(s.reshape(z.shape).to(z.dtype))
            return torch.cat([g[k].reshape(-1).to(dtype) for k in frozen])

        rows: Tensor = vmap(row, in_dims=1)(S)
        return rows

    batched = vmap(sample_rows, in_dims=(dims, 0))
    for b0 in range(0, B, rp.samples):
        b1 = min(B, b0 + rp.samples)
        chunk = [x[b0:b1] if d == 0 else x for x, d in zip(data, dims)]
        for c0 in range(0, factor.rank, rp.columns):
            S, signs = factor.columns(b0, b1, c0, min(factor.rank, c0 + rp.columns))
            try:
                # fused attention kernels have no batching rules: the mode sends them to math forms
                with SecondOrderSafe():
                    rows = batched(chunk, S)
            except RuntimeError as exc:
                raise _vmap_error(call, exc) from exc
            yield rows, signs, (b0, c0)


def _vmap_error(call: str, exc: RuntimeError) -> Exception:
    text = str(exc)
    if "random" in text:
        return UnsupportedError(
            f"{call}: the model draws random numbers (dropout in train mode?) while its samples "
            f"are vectorised; expected a deterministic model. Call model.eval(). ({text})"
        )
    hint = (
        " A module has a backward hook (BackPACK's extend(model) leaves them): use a fresh copy of "
        "the model." if "setup_context" in text else ""
    )
    return UnsupportedError(
        f"{call}: could not vectorise the model over its samples with torch.func.vmap ({text}). "
        f"Expected a model whose samples are independent and whose operators have batching rules.{hint}"
    )


# ----------------------------------------------------------------------------- the columns


# A vectorised pass of small products runs at a fraction of a large matrix product's FLOP rate;
# the rows route's cost is mostly one large product, the columns route's mostly such passes
# (calibrated on benchmarks/bench_laplace.py's problems).
_PASS_PENALTY = 4.0
# basis vectors per vectorised product pass: larger passes were slower per column on CPU (their
# working set leaves the caches; see benchmarks/bench_laplace.py)
_COLUMNS_PER_PASS = 64


def prefer_columns(P: int, B: int, rank: int, flops: int) -> bool:
    """Whether `G[:, cols]` by GGN-vector products beats summing row outer products.

    Rows: `B * rank` vjps plus `P^2 * B * rank` multiply-adds; columns: per column, a forward-mode
    and a reverse pass over the batch (about 3 forwards each, `flops` per sample forward).
    """
    rows = 2.0 * P * P * B * rank + 2.0 * B * rank * flops
    columns = _PASS_PENALTY * P * B * 3.0 * flops
    return columns < rows


def ggn_columns(
    call: str,
    output_fn: Callable[[dict[str, Tensor], Any], Any],
    params: dict[str, Tensor],
    inputs: Any,
    loss_of: Callable[[Tensor], Tensor],
    cols: Tensor,
    *,
    max_memory: int | float | str | None = None,
) -> Tensor:
    """`G[cols][:, cols]` of the GGN `J^T (d^2 loss / dz^2) J` of one batch, by GGN-vector products
    with the basis vectors `e_c`, a planned chunk of them per `vmap`.

    One linearisation is reused for every chunk: the output's `vjp` (`u -> J^T u`), the `vjp` of
    that linear map (`v -> J v`, no forward-mode rules needed) and the loss's Hessian w.r.t. the
    output as the `vjp` of its gradient. Cheaper than the rows when the output is large.
    """
    leaves = list(params.values())
    P, n = sum(p.numel() for p in leaves), len(cols)
    dtype, device = leaves[0].dtype, leaves[0].device
    frozen = {k: v.detach() for k, v in params.items()}
    with SecondOrderSafe():  # `push` differentiates the backward pass: no fused attention kernels
        z, pull = vjp(lambda p: output_fn(p, inputs), frozen)

        def pulled(u: Tensor) -> Any:
            return pull(u)[0]

        _, push = vjp(pulled, torch.zeros_like(z))
        _, hess = vjp(torch.func.grad(loss_of), z.detach())
    B = z.shape[0]
    act, _ = probe(output_fn, params, one_sample(inputs, B))
    budget, budget_from = memory_budget(call, max_memory, device)
    itemsize = torch.finfo(dtype).bits // 8
    out_bytes = n * n * itemsize
    graph = 3 * B * act + _FIXED
    per_column = 2 * B * act + 2 * z.numel() * z.element_size() + 3 * P * itemsize
    room = int(_FRACTION * budget) - out_bytes - graph
    k = max(0, min(n, _COLUMNS_PER_PASS, room // max(per_column, 1)))
    if k < 1:
        need = out_bytes + graph + per_column
        error = MemoryBudgetError(
            f"{call}: the {n:,} x {n:,} matrix needs at least {format_bytes(need)} on {device} "
            f"(result {format_bytes(out_bytes)}, the batch's graph {format_bytes(graph)}, one "
            f"product {format_bytes(per_column)}); expected it to fit the budget of "
            f"{format_bytes(budget)} ({budget_from}). Pass a larger max_memory, use fewer "
            f"parameters (last_layer / subnetwork), or a diagonal or Kronecker structure."
        )
        error.plan = MemoryPlan(out_bytes, graph, per_column, 1, need, budget, str(device))
        raise error
    names = list(frozen)
    shapes = [frozen[name].shape for name in names]
    sizes = [frozen[name].numel() for name in names]

    def column(e: Tensor) -> Tensor:
        v = {name: part.reshape(shape) for name, part, shape in zip(names, e.split(sizes), shapes)}
        (Jv,) = push(v)
        (HJv,) = hess(Jv)
        g = pulled(HJv)
        return torch.cat([g[name].reshape(-1) for name in names])[cols]

    out = torch.empty(n, n, dtype=dtype, device=device)
    batched = vmap(column)
    for c0 in range(0, n, k):  # G is symmetric: column c is row c, written contiguously
        c1 = min(n, c0 + k)
        basis = torch.zeros(c1 - c0, P, dtype=dtype, device=device)
        basis[torch.arange(c1 - c0, device=device), cols[c0:c1]] = 1.0
        out[c0:c1] = batched(basis)
    return out
