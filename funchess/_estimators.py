"""Stochastic estimates from a few operator products: the trace (`trace_estimate`, Hutch++ or
Hutchinson) and the diagonal (`diagonal_estimate`), each with its standard error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import deprecated, relays_warnings
from ._errors import InvalidArgumentError
from ._linalg import Products, check_estimator, draw, mean_and_error, probe_batches
from ._operator import LinearOperator
from ._tree import unravel

__all__ = ["TraceEstimate", "DiagonalEstimate", "trace_estimate", "hutchinson_trace", "hutchpp_trace", "diagonal_estimate"]

PyTree = Any
Distribution = Literal["rademacher", "normal"]


@dataclass
class TraceEstimate:
    """A stochastic trace estimate (`funchess.hutchinson_trace`, `funchess.hutchpp_trace`).

    Attributes:
        value: the estimate, a 0-dimensional Tensor.
        std_error: its standard error (sample standard deviation of the random part over the
            square root of its sample count; NaN with fewer than two samples).
        num_hvps: operator products used.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.eye(10, dtype=torch.float64))
        >>> t = funchess.trace_estimate(op, num_hvps=4, method="hutchinson", generator=torch.Generator().manual_seed(0))
        >>> round(float(t.value), 6), t.num_hvps   # Rademacher probes are exact for the identity
        (10.0, 4)
    """

    value: Tensor
    std_error: Tensor
    num_hvps: int


@dataclass
class DiagonalEstimate:
    """Hutchinson's diagonal estimate (`funchess.diagonal_estimate`).

    Attributes:
        value: the estimated diagonal, a pytree shaped like the operator's structure.
        std_error: per-entry standard errors, same shape (NaN with fewer than two samples).
        num_hvps: operator products used.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> d = funchess.diagonal_estimate(op, num_hvps=3, generator=torch.Generator().manual_seed(0))
        >>> d.value.tolist()   # exact for a diagonal operator
        [1.0, 2.0, 3.0]
    """

    value: PyTree
    std_error: PyTree
    num_hvps: int


# ----------------------------------------------------------------------------- estimators


def _hutchinson(
    call: str,
    op: LinearOperator,
    num_hvps: int,
    distribution: str,
    generator: torch.Generator | None,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Sums of `z_i = v_i * (H v_i)` (per entry) and of their squares, and of the per-probe
    traces `sum(z_i)` and their squares, streamed over probe batches."""
    n = op.shape[0]
    products = Products(call, op, progress, num_hvps, call.split("(")[0])
    diag_sum = torch.zeros(n, dtype=op.dtype, device=op.device)
    diag_sq = torch.zeros_like(diag_sum)
    tr_sum = torch.zeros((), dtype=op.dtype, device=op.device)
    tr_sq = torch.zeros_like(tr_sum)
    try:
        for c in probe_batches(num_hvps, op):
            v = draw(c, n, distribution, generator, op)
            z = v * products(v)
            diag_sum += z.sum(0)
            diag_sq += (z * z).sum(0)
            t = z.sum(1)
            tr_sum += t.sum()
            tr_sq += (t * t).sum()
    finally:
        products.close()
    return diag_sum, diag_sq, tr_sum, tr_sq, products.count


def _hutchinson_trace(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> TraceEstimate:
    """Hutchinson's estimate (see `trace_estimate`)."""
    call = "funchess.trace_estimate(op, num_hvps, method='hutchinson')"
    op, m, gen = check_estimator(call, op, num_hvps, 1, distribution, generator)
    _, _, tr_sum, tr_sq, count = _hutchinson(call, op, m, distribution, gen, progress)
    value, err = mean_and_error(tr_sum, tr_sq, m)
    return TraceEstimate(value=value, std_error=err, num_hvps=count)


def _hutchpp_trace(
    op: LinearOperator,
    num_hvps: int = 99,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> TraceEstimate:
    """Hutch++ (see `trace_estimate`)."""
    call = "funchess.trace_estimate(op, num_hvps, method='hutch++')"
    op, m, gen = check_estimator(call, op, num_hvps, 3, distribution, generator)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: Hutch++ needs a symmetric operator, got symmetric=False. Use "
            f"method='hutchinson' for a general operator."
        )
    n = op.shape[0]
    s = min(m // 3, n)
    g = m - 2 * s
    products = Products(call, op, progress, m, "hutchpp_trace")
    try:
        sketch = products(draw(s, n, distribution, gen, op))
        Q = torch.linalg.qr(sketch.T).Q.T  # (s, N) orthonormal rows spanning H S
        top = (Q * products(Q)).sum()
        probes = draw(g, n, distribution, gen, op)
        probes = probes - (probes @ Q.T) @ Q
        t = (probes * products(probes)).sum(1) if g else torch.zeros(0, dtype=op.dtype, device=op.device)
    finally:
        products.close()
    if s == n:  # the sketch spans the whole space: the trace is exact
        rest, err = torch.zeros_like(top), torch.zeros_like(top)
    else:
        rest, err = mean_and_error(t.sum(), (t * t).sum(), g)
    return TraceEstimate(value=top + rest, std_error=err, num_hvps=products.count)


@relays_warnings
def diagonal_estimate(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> DiagonalEstimate:
    """Hutchinson-style diagonal estimate: the mean of `v * (H v)` over random probes `v`.

    Unbiased; with Rademacher probes entry `i` has variance `sum_{j != i} H_ij^2` per probe. Use
    it when the exact `funchess.diagonal` (`N` products) is too expensive. Probes go through the
    operator in `vmap`ped batches and are streamed: memory is one batch.

    Args:
        op: any square `funchess.LinearOperator`.
        num_hvps: the number of probes (= products), >= 1.
        distribution: "rademacher" or "normal".
        generator: source of the probes.
        progress: show a tqdm progress bar.

    Returns:
        A `DiagonalEstimate`: value and std_error shaped like the operator's structure.

    Example:
        >>> import torch, funchess
        >>> params = {"w": torch.zeros(3)}
        >>> op = funchess.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])), params)
        >>> funchess.diagonal_estimate(op, 4, generator=torch.Generator().manual_seed(0)).value
        {'w': tensor([1., 2., 3.])}
    """
    call = "funchess.diagonal_estimate(op, num_hvps)"
    op, m, gen = check_estimator(call, op, num_hvps, 1, distribution, generator)
    diag_sum, diag_sq, _, _, count = _hutchinson(call, op, m, distribution, gen, progress)
    value, err = mean_and_error(diag_sum, diag_sq, m)
    return DiagonalEstimate(
        value=unravel(value, op.structure), std_error=unravel(err, op.structure), num_hvps=count
    )




@relays_warnings
def trace_estimate(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> TraceEstimate:
    """A stochastic estimate of an operator's trace from `num_hvps` products, with its standard error.

    - "hutch++" (default; Meyer et al. 2021): a third of the products sketch the dominant
      eigenspace `Q` (from `H S` for random `S`), whose trace `tr(Qᵀ H Q)` is taken exactly; the
      rest estimate the trace of the remainder `(I - QQᵀ) H (I - QQᵀ)` by Hutchinson's method. Its
      error falls like `1 / num_hvps` rather than `1 / sqrt(num_hvps)` when a few eigenvalues
      dominate, as in neural-network Hessians. Needs a symmetric operator.
    - "hutchinson": the mean of `vᵀ H v` over random probes `v`: unbiased, for any square
      operator; with Rademacher probes the variance per probe is
      `2 (||H||_F² - Σ_i H_ii²)`.

    Probes go through the operator in batches (one `vmap`ped pass per chunk).

    Args:
        op: a square `funchess.LinearOperator` (symmetric for "hutch++").
        num_hvps: the number of products (>= 3 for "hutch++", >= 1 for "hutchinson").
        method: "hutch++" or "hutchinson".
        distribution: "rademacher" (+-1 entries, lower variance) or "normal".
        generator: source of the probes (same state, same estimate).
        progress: a progress bar counted in products (True, None for terminals only, False).

    Returns:
        A `TraceEstimate` (value, std_error, num_hvps).

    Raises:
        InvalidArgumentError: bad options, or "hutch++" on a non-symmetric operator.
        OutputError: the operator's products are not finite.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.tensor([100.0, 10.0, 1.0, 1.0], dtype=torch.float64)))
        >>> est = funchess.trace_estimate(op, 12, generator=torch.Generator().manual_seed(0))
        >>> round(float(est.value), 6), est.num_hvps  # 4 sketch vectors span all 4 dimensions: exact
        (112.0, 12)
        >>> funchess.trace_estimate(op, 8, method="hutchinson", generator=torch.Generator().manual_seed(0)).value
        tensor(112., dtype=torch.float64)
    """
    if method == "hutch++":
        return _hutchpp_trace(op, num_hvps, distribution=distribution, generator=generator, progress=progress)
    if method == "hutchinson":
        return _hutchinson_trace(op, num_hvps, distribution=distribution, generator=generator, progress=progress)
    raise InvalidArgumentError(
        f"funchess.trace_estimate(op, num_hvps, method={method!r}): expected method to be 'hutch++' or "
        f"'hutchinson', got {method!r}. Use 'hutch++' for symmetric operators."
    )


def hutchpp_trace(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> TraceEstimate:
    """Deprecated: `funchess.trace_estimate(op, num_hvps)` (Hutch++ is its default method).

    Works in this release and warns; removed in funchess 0.3.

    Example:
        >>> import warnings, torch, funchess
        >>> op = funchess.DenseOperator(torch.eye(3, dtype=torch.float64))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", FutureWarning)
        ...     float(funchess.hutchpp_trace(op, 9, generator=torch.Generator().manual_seed(0)).value)
        3.0
    """
    deprecated("funchess.hutchpp_trace is deprecated; use funchess.trace_estimate(op, num_hvps) (method='hutch++'). It is removed in funchess 0.3.")
    return _hutchpp_trace(op, num_hvps, distribution=distribution, generator=generator, progress=progress)


def hutchinson_trace(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> TraceEstimate:
    """Deprecated: `funchess.trace_estimate(op, num_hvps, method="hutchinson")`.

    Works in this release and warns; removed in funchess 0.3.

    Example:
        >>> import warnings, torch, funchess
        >>> op = funchess.DenseOperator(torch.eye(3, dtype=torch.float64))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", FutureWarning)
        ...     float(funchess.hutchinson_trace(op, 4, generator=torch.Generator().manual_seed(0)).value)
        3.0
    """
    deprecated("funchess.hutchinson_trace is deprecated; use funchess.trace_estimate(op, num_hvps, method='hutchinson'). It is removed in funchess 0.3.")
    return _hutchinson_trace(op, num_hvps, distribution=distribution, generator=generator, progress=progress)
