"""What the spectral tools share: counting products (with a progress bar), random probes drawn
from a generator, the checks of their arguments, and a few dense linear-algebra helpers.

Every tool takes any `funchess.LinearOperator`, draws its random vectors from an optional
`torch.Generator` (same generator state, same result), reports the products it used, and refuses
an operator whose products are not finite (a NaN Hessian is an error, not a converged result).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ._checks import check_count, check_generator
from ._errors import InvalidArgumentError, OutputError
from ._memory import default_chunk
from ._operator import LinearOperator, check_operator
from ._progress import bar
from ._tree import chunks


class Products:
    """Counts the products a tool asks of an operator, advances its progress bar, and refuses
    products that are not finite. `close()` ends the bar where the tool stopped (a solver that
    converges early does not leave a bar claiming its iteration limit)."""

    def __init__(self, call: str, op: LinearOperator, progress: bool | None, total: int, desc: str) -> None:
        self.call, self.op = call, op
        self.count = 0
        self.bar = bar(call, progress, total=total, desc=desc, unit="product")

    def __call__(self, rows: Tensor) -> Tensor:
        out = self.op._mm(rows)
        if not bool(torch.isfinite(out).all()):
            raise OutputError(
                f"{self.call}: the operator returned non-finite values (NaN or Inf) for a finite vector "
                f"(product {self.count + 1}); expected finite products. Check the loss and the "
                f"parameters for NaN/Inf (e.g. funchess.hvp at the same point), or lower the learning "
                f"rate that produced them."
            )
        self.count += rows.shape[0]
        self.bar.update(rows.shape[0])
        return out

    def close(self) -> None:
        total = getattr(self.bar, "total", None)
        if total is not None and self.count < total:
            self.bar.total = self.count  # stopped early: the bar ends where the tool did
            self.bar.refresh()
        self.bar.close()


def check_finite(call: str, what: str, x: Tensor) -> None:
    """Refuse a non-finite right-hand side or start vector."""
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError(
            f"{call}: {what} has non-finite entries (NaN or Inf); expected finite values. Check how it "
            f"was computed."
        )


def check_distribution(call: str, distribution: str) -> None:
    if distribution not in ("rademacher", "normal"):
        raise InvalidArgumentError(
            f"{call}: expected distribution to be 'rademacher' or 'normal', got {distribution!r}. "
            f"Use 'rademacher' (lower variance) unless you need Gaussian probes."
        )


def draw(
    k: int, n: int, distribution: str, generator: torch.Generator | None, op: LinearOperator
) -> Tensor:
    """`k` random rows: drawn where the generator lives (so a CPU generator serves any device)."""
    device = generator.device if generator is not None else op.device
    if distribution == "rademacher":
        rows = torch.randint(0, 2, (k, n), generator=generator, device=device).mul_(2).sub_(1)
    else:
        rows = torch.randn(k, n, generator=generator, device=device, dtype=torch.float64)
    return rows.to(device=op.device, dtype=op.dtype)


def probe_batches(total: int, op: LinearOperator) -> Iterator[int]:
    """Sizes of the probe batches: the operator's chunk size, or its automatic one."""
    for s, e in chunks(total, op.chunk_size or default_chunk(total, op.shape[0])):
        yield e - s


def check_estimator(
    call: str, op: Any, num_hvps: Any, least: int, distribution: str, generator: Any
) -> tuple[LinearOperator, int, torch.Generator | None]:
    """The checks every stochastic estimator makes at its entry."""
    op = check_operator(call, op)
    m = check_count(call, "num_hvps", num_hvps, least)
    check_distribution(call, distribution)
    return op, m, check_generator(call, generator)


def mean_and_error(total: Tensor, squares: Tensor, m: int) -> tuple[Tensor, Tensor]:
    mean = total / m
    if m < 2:
        return mean, torch.full_like(mean, float("nan"))
    var = ((squares - m * mean * mean) / (m - 1)).clamp_min(0)
    return mean, (var / m).sqrt()


def orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of `w` (`(..., N)`) along the rows of `basis`, twice ("twice is
    enough": one classical Gram-Schmidt pass loses orthogonality in floating point)."""
    for _ in range(2):
        if basis.dim() == 2:  # one vector (N,) against (j, N)
            w = w - (basis @ w) @ basis
        else:  # P vectors (P, N), each against its own basis (j, P, N)
            w = w - torch.einsum("jp,jpn->pn", torch.einsum("jpn,pn->jp", basis, w), basis)
    return w


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


