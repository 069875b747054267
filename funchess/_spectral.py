"""What runs on a matrix-free operator: eigenpairs, trace, diagonal, spectral density, solves.

Every tool takes any `funchess.LinearOperator`, draws its random vectors from an optional
`torch.Generator` (same generator state, same result), can show a tqdm progress bar counted in
operator products (`progress=True`), and reports how many products it used (`num_hvps`; for a
`HessianOperator` each is one Hessian-vector product). Batches of independent vectors (probes,
right-hand sides) go through the operator together, one `vmap`ped pass per chunk.

- `eigsh`: top/bottom-k eigenpairs by Lanczos with full reorthogonalisation.
- `hutchinson_trace`, `hutchpp_trace`: trace estimates with a standard error.
- `diagonal_estimate`: Hutchinson's estimate of the diagonal, with per-entry standard errors.
- `spectral_density`: stochastic Lanczos quadrature (SLQ).
- `cg`: conjugate gradients for `(H + damping * I) x = b`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._errors import ConvergenceWarning, InvalidArgumentError
from ._jacobian import _chunks, default_chunk
from ._operator import LinearOperator, _check_operator
from ._tree import unravel

__all__ = [
    "EigenResult",
    "TraceEstimate",
    "DiagonalEstimate",
    "SpectralDensity",
    "SolveResult",
    "eigsh",
    "hutchinson_trace",
    "hutchpp_trace",
    "diagonal_estimate",
    "spectral_density",
    "cg",
]

PyTree = Any
Which = Literal["LA", "SA", "LM"]
Distribution = Literal["rademacher", "normal"]


# ----------------------------------------------------------------------------- results


@dataclass
class EigenResult:
    """Eigenpairs from `funchess.eigsh`.

    Attributes:
        eigenvalues: `(k,)`, in the order asked for (largest first for "LA" and "LM", smallest
            first for "SA").
        eigenvectors: `k` unit vectors, each a pytree shaped like the operator's structure (e.g.
            a params dict); `eigenvectors[i]` belongs to `eigenvalues[i]`.
        residuals: `(k,)` Lanczos bounds on `||H y - theta y||` for each pair.
        num_hvps: operator products used.
        converged: every residual is within the tolerance (or the Krylov space is the whole space).

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> r = funchess.eigsh(op, k=2, generator=torch.Generator().manual_seed(0))
        >>> [round(v, 9) for v in r.eigenvalues.tolist()], r.converged
        ([5.0, 4.0], True)
    """

    eigenvalues: Tensor
    eigenvectors: list[PyTree]
    residuals: Tensor
    num_hvps: int
    converged: bool


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
        >>> t = funchess.hutchinson_trace(op, num_hvps=4, generator=torch.Generator().manual_seed(0))
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


@dataclass
class SpectralDensity:
    """A spectral density by stochastic Lanczos quadrature (`funchess.spectral_density`).

    Attributes:
        grid: `(G,)` increasing points.
        density: `(G,)` the Gaussian-smoothed density on the grid, normalised so that its
            trapezoidal integral over the grid is 1.
        nodes: `(num_probes, num_steps)` quadrature nodes (Ritz values) per probe; unused entries
            (a probe whose Krylov space was exhausted early) have weight 0.
        weights: `(num_probes, num_steps)` quadrature weights; each row sums to 1.
        sigma: the width of the Gaussian kernel.
        num_hvps: operator products used.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.linspace(-1, 1, 30, dtype=torch.float64)))
        >>> sd = funchess.spectral_density(op, num_probes=3, num_steps=10, generator=torch.Generator().manual_seed(0))
        >>> [round(w, 9) for w in sd.weights.sum(-1).tolist()]
        [1.0, 1.0, 1.0]
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_hvps: int

    def moments(self, k: int) -> Tensor:
        """Per-probe quadrature estimates of `trace(H^k) / N`, a `(num_probes,)` Tensor.

        Each is exact for the probe (`v^T H^k v / v^T v`) while `k < 2 * num_steps`; their mean is
        an unbiased estimate of `trace(H^k) / N` and their spread gives its standard error.
        """
        return (self.weights * self.nodes**k).sum(-1)


@dataclass
class SolveResult:
    """The result of `funchess.cg`.

    Attributes:
        solution: `x`, in the form `b` was given (pytree, flat vector or `(N, k)` matrix).
        residual_norm: `||b - (H + damping I) x||` per right-hand side (`(k,)`, or 0-dim for one).
        num_iter: CG iterations.
        num_hvps: operator products used.
        converged: every residual is within the tolerance.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)))
        >>> r = funchess.cg(op, torch.tensor([2.0, 4.0], dtype=torch.float64))
        >>> r.solution.tolist(), r.converged
        ([1.0, 1.0], True)
    """

    solution: Any
    residual_norm: Tensor
    num_iter: int
    num_hvps: int
    converged: bool


# ----------------------------------------------------------------------------- shared pieces


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Products:
    """Counts the products a tool asks of an operator and advances its progress bar."""

    def __init__(self, call: str, op: LinearOperator, progress: bool, total: int, desc: str) -> None:
        self.op = op
        self.count = 0
        self.bar: Any = _NoBar()
        if progress:
            try:
                from tqdm import tqdm
            except ImportError as exc:
                raise InvalidArgumentError(
                    f"{call}: progress=True needs tqdm, which is not installed ({exc}). Install "
                    f"it (pip install tqdm) or pass progress=False."
                ) from exc
            self.bar = tqdm(total=total, desc=desc, unit="hvp")

    def __call__(self, rows: Tensor) -> Tensor:
        out = self.op._mm(rows)
        self.count += rows.shape[0]
        self.bar.update(rows.shape[0])
        return out

    def close(self) -> None:
        self.bar.close()


def _check_count(call: str, name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgumentError(
            f"{call}: expected {name} to be an int >= {least}, got {value!r}. Pass e.g. "
            f"{name}={max(least, 10)}."
        )
    return value


def _check_generator(call: str, generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(
            f"{call}: expected generator to be a torch.Generator or None, got "
            f"{type(generator).__name__}. Pass e.g. torch.Generator().manual_seed(0)."
        )
    return generator


def _check_distribution(call: str, distribution: str) -> None:
    if distribution not in ("rademacher", "normal"):
        raise InvalidArgumentError(
            f"{call}: expected distribution to be 'rademacher' or 'normal', got {distribution!r}. "
            f"Use 'rademacher' (lower variance) unless you need Gaussian probes."
        )


def _check_positive(call: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(
            f"{call}: expected {name} to be a finite number {bound}, got {value!r}. Pass e.g. "
            f"{name}={'0.0' if allow_zero else '1e-3'}."
        )
    return float(value)


def _draw(
    k: int, n: int, distribution: str, generator: torch.Generator | None, op: LinearOperator
) -> Tensor:
    """`k` random rows: drawn where the generator lives (so a CPU generator serves any device)."""
    device = generator.device if generator is not None else op.device
    if distribution == "rademacher":
        rows = torch.randint(0, 2, (k, n), generator=generator, device=device).mul_(2).sub_(1)
    else:
        rows = torch.randn(k, n, generator=generator, device=device, dtype=torch.float64)
    return rows.to(device=op.device, dtype=op.dtype)


def _batches(total: int, op: LinearOperator) -> Iterator[int]:
    """Sizes of the probe batches: the operator's chunk size, or its automatic one."""
    for s, e in _chunks(total, op.chunk_size or default_chunk(total, op.shape[0])):
        yield e - s


def _check_estimator(
    call: str, op: Any, num_hvps: Any, least: int, distribution: str, generator: Any
) -> tuple[LinearOperator, int, torch.Generator | None]:
    """The checks every stochastic estimator makes at its entry."""
    op = _check_operator(call, op)
    m = _check_count(call, "num_hvps", num_hvps, least)
    _check_distribution(call, distribution)
    return op, m, _check_generator(call, generator)


def _mean_and_error(total: Tensor, squares: Tensor, m: int) -> tuple[Tensor, Tensor]:
    mean = total / m
    if m < 2:
        return mean, torch.full_like(mean, float("nan"))
    var = ((squares - m * mean * mean) / (m - 1)).clamp_min(0)
    return mean, (var / m).sqrt()


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of `w` (`(..., N)`) along the rows of `basis`, twice ("twice is
    enough": one classical Gram-Schmidt pass loses orthogonality in floating point)."""
    for _ in range(2):
        if basis.dim() == 2:  # one vector (N,) against (j, N)
            w = w - (basis @ w) @ basis
        else:  # P vectors (P, N), each against its own basis (j, P, N)
            w = w - torch.einsum("jp,jpn->pn", torch.einsum("jpn,pn->jp", basis, w), basis)
    return w


def _tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


# ----------------------------------------------------------------------------- eigenpairs


def _pick(theta: Tensor, which: str, k: int) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def _open_block_settled(
    alpha: Tensor, beta: Tensor, block: int, j: int, b: Tensor, which: str, bound: Tensor
) -> bool:
    """After a breakdown, the newest Krylov block explores the complement of the invariant
    subspace found so far: its own extreme Ritz value must have converged too, or an eigenvalue
    there (e.g. a second copy of a repeated one) could still belong to the wanted ones."""
    if block == 0:
        return True  # one block: the global check covers it
    theta, S = torch.linalg.eigh(_tridiagonal(alpha[block : j + 1], beta[block:j]))
    i = _pick(theta, which, 1)
    return bool(b * S[-1, i].abs() <= bound)


def _check_every(steps: int) -> int:
    """Convergence checks cost an `eigh` of the growing tridiagonal matrix; past a few hundred
    steps check only every ~2 % of the steps taken."""
    return 1 if steps <= 200 else steps // 50


def eigsh(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigenResult:
    """The top or bottom `k` eigenpairs of a symmetric operator, by Lanczos.

    Lanczos with full reorthogonalisation (every new Krylov vector is orthogonalised twice
    against all previous ones), one operator product per step, from a random start drawn from
    `generator`. After each step the Ritz values of the tridiagonal matrix are checked; it stops
    once the `k` wanted Ritz pairs have residuals `||H y - theta y|| <= tol * max|theta|`. If the
    Krylov space becomes invariant before that (e.g. repeated eigenvalues), Lanczos continues from
    a fresh random vector orthogonal to the basis, so multiplicities are found too. Memory: the
    basis, `max_iter` vectors of `N` entries. Compared with power iteration with deflation
    (PyHessian's method) it needs far fewer products (see `benchmarks/RESULTS.md`).

    Args:
        op: a symmetric `funchess.LinearOperator` (e.g. `funchess.HessianOperator`).
        k: how many eigenpairs, 1 <= k <= N.
        which: "LA" largest algebraic (sharpness), "SA" smallest algebraic (most negative
            curvature), "LM" largest magnitude.
        tol: relative residual tolerance; default `sqrt(eps)` of the operator's dtype
            (about 1.5e-8 in float64). An eigenvalue's error is at most its residual, and usually
            about its square over the gap to the next eigenvalue.
        max_iter: the largest Krylov dimension (= most products); default `min(N, max(100, 10 k))`.
        generator: source of the random start vector.
        progress: show a tqdm progress bar (counted in products).

    Returns:
        An `EigenResult` (eigenvalues, eigenvectors as pytrees, residuals, num_hvps, converged).
        A `funchess.ConvergenceWarning` is issued when the tolerance was not reached.

    Raises:
        InvalidArgumentError: bad k, which, tol, max_iter or generator, or a non-symmetric op.

    Example:
        >>> import torch, funchess
        >>> H = funchess.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = funchess.eigsh(H, k=2, generator=torch.Generator().manual_seed(0))
        >>> res.eigenvalues.round(decimals=8)
        tensor([10.,  9.], dtype=torch.float64)
        >>> res.num_hvps <= 10
        True
    """
    call = f"funchess.eigsh(op, k={k!r}, which={which!r})"
    op = _check_operator(call, op)
    n = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InvalidArgumentError(
            f"{call}: expected 1 <= k <= N = {n} (the operator's size), got k={k!r}. Ask for at "
            f"most {n} eigenpairs (use torch.linalg.eigh(op.as_matrix()) for all of them)."
        )
    if which not in ("LA", "SA", "LM"):
        raise InvalidArgumentError(
            f"{call}: expected which to be 'LA' (largest), 'SA' (smallest) or 'LM' (largest "
            f"magnitude), got {which!r}."
        )
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: Lanczos needs a symmetric operator, got one with symmetric=False. Pass a "
            f"curvature operator (Hessian, GGN), or symmetrise it."
        )
    eps = torch.finfo(op.dtype).eps
    rtol = eps**0.5 if tol is None else _check_positive(call, "tol", tol)
    steps = min(n, max(100, 10 * k)) if max_iter is None else min(n, _check_count(call, "max_iter", max_iter, k))
    gen = _check_generator(call, generator)

    basis = torch.empty(steps, n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, dtype=op.dtype, device=op.device)
    beta = torch.zeros(steps, dtype=op.dtype, device=op.device)  # beta[j] couples steps j and j+1
    products = _Products(call, op, progress, steps, "eigsh")
    q = _draw(1, n, "normal", gen, op)[0]
    q = q / q.norm()
    block = 0  # where the open Krylov block starts (a new one opens after each breakdown)
    converged = False
    theta = S = idx = res = torch.zeros(0, dtype=op.dtype)
    try:
        for j in range(steps):
            basis[j] = q
            w = products(q.unsqueeze(0))[0]
            alpha[j] = torch.dot(q, w)
            w = w - alpha[j] * q - (beta[j - 1] * basis[j - 1] if j > block else 0)
            w = _orthogonalise(w, basis[: j + 1])
            b = w.norm()
            scale_now = torch.cat([alpha[: j + 1].abs(), beta[:j].abs()]).max()
            breakdown = bool(b <= min(rtol, eps**0.5) * scale_now)  # numerically invariant
            full = j + 1 == n  # the Krylov space is the whole space: Ritz pairs are exact
            if j + 1 == steps or full or breakdown or (j + 1) % _check_every(steps) == 0:
                theta, S = torch.linalg.eigh(_tridiagonal(alpha[: j + 1], beta[:j]))
                idx = _pick(theta, which, k)
                scale = theta.abs().max().clamp_min(torch.finfo(op.dtype).tiny)
                res = b * S[-1, idx].abs()
                if full or (
                    j + 1 >= k
                    and not breakdown  # an invariant block says nothing about its complement
                    and bool((res <= rtol * scale).all())
                    and _open_block_settled(alpha, beta, block, j, b, which, rtol * scale)
                ):
                    converged = True
                    break
            if j + 1 == steps:
                break
            if breakdown:  # go on in the complement from a fresh direction; T splits (beta = 0)
                w = _orthogonalise(_draw(1, n, "normal", gen, op)[0], basis[: j + 1])
                q, block = w / w.norm(), j + 1
            else:
                beta[j] = b
                q = w / b
    finally:
        products.close()
    m = theta.numel()
    ritz = S[:, idx].T @ basis[:m]
    ritz = ritz / ritz.norm(dim=1, keepdim=True)
    if not converged:
        warnings.warn(
            f"{call}: Lanczos stopped after max_iter={steps} products with relative residuals up "
            f"to {float((res / theta.abs().max()).max()):.3g} > tol={rtol:.3g}. Raise max_iter or "
            f"tol; the eigenvalues returned are the current Ritz values.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=theta[idx],
        eigenvectors=[unravel(r, op.structure) for r in ritz],
        residuals=res,
        num_hvps=products.count,
        converged=converged,
    )


# ----------------------------------------------------------------------------- trace and diagonal


def _hutchinson(
    call: str,
    op: LinearOperator,
    num_hvps: int,
    distribution: str,
    generator: torch.Generator | None,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Sums of `z_i = v_i * (H v_i)` (per entry) and of their squares, and of the per-probe
    traces `sum(z_i)` and their squares, streamed over probe batches."""
    n = op.shape[0]
    products = _Products(call, op, progress, num_hvps, call.split("(")[0])
    diag_sum = torch.zeros(n, dtype=op.dtype, device=op.device)
    diag_sq = torch.zeros_like(diag_sum)
    tr_sum = torch.zeros((), dtype=op.dtype, device=op.device)
    tr_sq = torch.zeros_like(tr_sum)
    try:
        for c in _batches(num_hvps, op):
            v = _draw(c, n, distribution, generator, op)
            z = v * products(v)
            diag_sum += z.sum(0)
            diag_sq += (z * z).sum(0)
            t = z.sum(1)
            tr_sum += t.sum()
            tr_sq += (t * t).sum()
    finally:
        products.close()
    return diag_sum, diag_sq, tr_sum, tr_sq, products.count


def hutchinson_trace(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> TraceEstimate:
    """Hutchinson's trace estimate: the mean of `v^T H v` over random probes `v`.

    Unbiased; with Rademacher probes its variance per probe is `2 (||H||_F^2 - sum_i H_ii^2)`, so
    the standard error falls like `1 / sqrt(num_hvps)`. Probes go through the operator in
    batches (one `vmap`ped pass per chunk). When a few eigenvalues dominate, `funchess.hutchpp_trace`
    reaches the same accuracy with fewer products.

    Args:
        op: any square `funchess.LinearOperator`.
        num_hvps: the number of probes (= products), >= 1.
        distribution: "rademacher" (+-1 entries, lower variance) or "normal".
        generator: source of the probes.
        progress: show a tqdm progress bar.

    Returns:
        A `TraceEstimate` (value, std_error, num_hvps).

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.arange(1.0, 5.0)))
        >>> est = funchess.hutchinson_trace(op, 8, generator=torch.Generator().manual_seed(0))
        >>> est.value, est.num_hvps  # exact for a diagonal matrix with Rademacher probes
        (tensor(10.), 8)
    """
    call = "funchess.hutchinson_trace(op, num_hvps)"
    op, m, gen = _check_estimator(call, op, num_hvps, 1, distribution, generator)
    _, _, tr_sum, tr_sq, count = _hutchinson(call, op, m, distribution, gen, progress)
    value, err = _mean_and_error(tr_sum, tr_sq, m)
    return TraceEstimate(value=value, std_error=err, num_hvps=count)


def hutchpp_trace(
    op: LinearOperator,
    num_hvps: int = 99,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): the trace of a sketched top subspace exactly,
    plus Hutchinson on the rest.

    A third of the budget sketches `Q = orth(H S)` (`s = num_hvps // 3` random probes), a third
    computes `trace(Q^T H Q)` exactly, the rest (`num_hvps - 2 s` probes) estimates the trace of
    the deflated `(I - Q Q^T) H (I - Q Q^T)` by Hutchinson. The error falls like `1 / num_hvps`
    instead of `1 / sqrt(num_hvps)` when the spectrum decays fast (a few dominant eigenvalues);
    on a flat spectrum it is no better than Hutchinson (see `benchmarks/RESULTS.md`). The standard error is the Hutchinson part's. Memory: `3 s` vectors of `N` entries.

    Args:
        op: a symmetric `funchess.LinearOperator`.
        num_hvps: the budget of products, >= 3.
        distribution: "rademacher" or "normal" probes.
        generator: source of the probes.
        progress: show a tqdm progress bar.

    Returns:
        A `TraceEstimate` (value, std_error, num_hvps).

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.tensor([100.0, 10.0, 1.0, 1.0], dtype=torch.float64)))
        >>> est = funchess.hutchpp_trace(op, 12, generator=torch.Generator().manual_seed(0))
        >>> round(float(est.value), 6), est.num_hvps  # s = 4 >= N: the sketch is the whole space
        (112.0, 12)
    """
    call = "funchess.hutchpp_trace(op, num_hvps)"
    op, m, gen = _check_estimator(call, op, num_hvps, 3, distribution, generator)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: Hutch++ needs a symmetric operator, got symmetric=False. Use "
            f"funchess.hutchinson_trace for a general operator."
        )
    n = op.shape[0]
    s = min(m // 3, n)
    g = m - 2 * s
    products = _Products(call, op, progress, m, "hutchpp_trace")
    try:
        sketch = products(_draw(s, n, distribution, gen, op))
        Q = torch.linalg.qr(sketch.T).Q.T  # (s, N) orthonormal rows spanning H S
        top = (Q * products(Q)).sum()
        probes = _draw(g, n, distribution, gen, op)
        probes = probes - (probes @ Q.T) @ Q
        t = (probes * products(probes)).sum(1) if g else torch.zeros(0, dtype=op.dtype, device=op.device)
    finally:
        products.close()
    if s == n:  # the sketch spans the whole space: the trace is exact
        rest, err = torch.zeros_like(top), torch.zeros_like(top)
    else:
        rest, err = _mean_and_error(t.sum(), (t * t).sum(), g)
    return TraceEstimate(value=top + rest, std_error=err, num_hvps=products.count)


def diagonal_estimate(
    op: LinearOperator,
    num_hvps: int = 100,
    *,
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool = False,
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
    op, m, gen = _check_estimator(call, op, num_hvps, 1, distribution, generator)
    diag_sum, diag_sq, _, _, count = _hutchinson(call, op, m, distribution, gen, progress)
    value, err = _mean_and_error(diag_sum, diag_sq, m)
    return DiagonalEstimate(
        value=unravel(value, op.structure), std_error=unravel(err, op.structure), num_hvps=count
    )


# ----------------------------------------------------------------------------- spectral density


def _lanczos_batch(
    products: _Products, start: Tensor, steps: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos with full reorthogonalisation from each row of `start` at once (one batched
    product per step). Returns `alpha (P, steps)`, `beta (P, steps)` and the step count per row:
    a row whose Krylov space is exhausted early stops there (its quadrature is then exact)."""
    P, n = start.shape
    dtype, device = start.dtype, start.device
    basis = torch.empty(steps, P, n, dtype=dtype, device=device)
    alpha = torch.zeros(P, steps, dtype=dtype, device=device)
    beta = torch.zeros(P, steps, dtype=dtype, device=device)
    length = torch.full((P,), steps, dtype=torch.long)
    active = torch.arange(P)
    q = start / start.norm(dim=1, keepdim=True)
    for j in range(steps):
        basis[j, active] = q
        w = products(q)
        a = (w * q).sum(1)
        w = w - a[:, None] * q
        if j:
            w = w - beta[active, j - 1, None] * basis[j - 1, active]
        w = _orthogonalise(w, basis[: j + 1, active])
        b = w.norm(dim=1)
        alpha[active, j] = a
        if j + 1 == steps:
            break
        scale = torch.cat([alpha[active, : j + 1].abs(), beta[active, :j].abs()], 1).amax(1)
        done = b <= eps**0.5 * scale  # numerically invariant: the quadrature is exact
        length[active[done]] = j + 1
        keep = ~done
        beta[active[keep], j] = b[keep]
        q = w[keep] / b[keep, None]
        active = active[keep]
        if not active.numel():
            break
    return alpha, beta, length


def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SpectralDensity:
    """The eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe `v`, `num_steps` Lanczos steps (full reorthogonalisation) give a
    Gauss quadrature rule `(theta_j, tau_j)` with `sum_j tau_j f(theta_j) = v^T f(H) v / v^T v`,
    exact for polynomials `f` of degree `< 2 num_steps`. Averaged over probes and smoothed by a
    Gaussian of width `sigma`, this is the density `(1/N) sum_i delta(x - lambda_i)` (the method
    of PyHessian and Ghorbani et al. 2019). All probes advance together: one batched product of
    `num_probes` vectors per step. `result.moments(k)` gives the per-probe estimates of
    `trace(H^k) / N`.

    Args:
        op: a symmetric `funchess.LinearOperator`.
        num_probes: independent probes (their spread is the estimate's uncertainty), >= 1.
        num_steps: Lanczos steps per probe (capped at N), >= 1.
        grid: the number of grid points (spanning the nodes plus 5 sigma either side), or a 1-D
            increasing Tensor of at least 2 points.
        sigma: the kernel width; default 1 % of the spread of the nodes.
        generator: source of the probes.
        progress: show a tqdm progress bar.

    Returns:
        A `SpectralDensity` (grid, density integrating to 1 on the grid, nodes, weights, sigma,
        num_hvps = num_probes x steps actually taken).

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64)))
        >>> sd = funchess.spectral_density(op, num_probes=4, num_steps=20, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 9)
        1.0
        >>> sd.num_hvps
        80
    """
    call = "funchess.spectral_density(op)"
    op = _check_operator(call, op)
    probes = _check_count(call, "num_probes", num_probes, 1)
    steps = min(op.shape[0], _check_count(call, "num_steps", num_steps, 1))
    gen = _check_generator(call, generator)
    if sigma is not None:
        _check_positive(call, "sigma", sigma)
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise InvalidArgumentError(
                f"{call}: expected grid to be a 1-D increasing Tensor of at least 2 points, got "
                f"shape {tuple(grid.shape)}. Pass e.g. torch.linspace(lo, hi, 1000) or an int."
            )
    else:
        _check_count(call, "grid", grid, 2)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: SLQ needs a symmetric operator, got symmetric=False. Pass a curvature "
            f"operator (Hessian, GGN)."
        )
    n = op.shape[0]
    products = _Products(call, op, progress, probes * steps, "spectral_density")
    try:
        start = _draw(probes, n, "rademacher", gen, op)
        alpha, beta, length = _lanczos_batch(products, start, steps, torch.finfo(op.dtype).eps)
    finally:
        products.close()
    nodes = torch.zeros(probes, steps, dtype=op.dtype, device=op.device)
    weights = torch.zeros_like(nodes)
    for p in range(probes):
        L = int(length[p])
        theta, S = torch.linalg.eigh(_tridiagonal(alpha[p, :L], beta[p, : L - 1]))
        nodes[p, :L], weights[p, :L] = theta, S[0] ** 2
    used = nodes[weights > 0] if bool((weights > 0).any()) else nodes.reshape(-1)
    lo, hi = float(used.min()), float(used.max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    s = float(sigma) if sigma is not None else 0.01 * width
    if isinstance(grid, Tensor):
        xs = grid.to(device=op.device, dtype=op.dtype)
    else:
        xs = torch.linspace(lo - 5 * s, hi + 5 * s, grid, dtype=op.dtype, device=op.device)
    kernel = torch.exp(-0.5 * ((xs[:, None, None] - nodes[None]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum((1, 2)) / probes
    area = torch.trapezoid(density, xs)
    if area > 0:
        density = density / area
    return SpectralDensity(
        grid=xs, density=density, nodes=nodes, weights=weights, sigma=s, num_hvps=products.count
    )


# ----------------------------------------------------------------------------- solves


def cg(
    op: LinearOperator,
    b: Any,
    *,
    damping: float = 0.0,
    x0: Any = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    progress: bool = False,
) -> SolveResult:
    """Solve `(H + damping * I) x = b` by conjugate gradients, matrix-free.

    `b` may be a params-shaped pytree, a flat vector, a batch of pytrees or an `(N, k)` matrix of
    right-hand sides (all solved together: one batched product per iteration for the columns not
    yet converged); `x` comes back in the same form. CG needs `H + damping * I` positive definite:
    neural-network Hessians are indefinite away from a minimum, so choose `damping` above minus
    the smallest eigenvalue (`funchess.eigsh(op, k=1, which="SA")`). Stops when
    `||r|| <= max(rtol * ||b||, atol)` for every right-hand side. This is the solve of influence
    functions, damped Newton steps and Laplace approximations.

    Args:
        op: a symmetric `funchess.LinearOperator`.
        b: the right-hand side(s), in any form `op @ b` accepts.
        damping: `lambda >= 0` added to the diagonal.
        x0: a starting guess in the form of `b` (default zero; a guess costs one more product).
        rtol, atol: relative and absolute residual tolerances.
        max_iter: most iterations; default `10 N`.
        progress: show a tqdm progress bar.

    Returns:
        A `SolveResult` (solution, residual_norm, num_iter, num_hvps, converged). A
        `funchess.ConvergenceWarning` is issued when it stops at `max_iter`.

    Raises:
        InvalidArgumentError: negative damping or tolerances, a non-symmetric operator, or an
            `H + damping * I` found not positive definite (a direction of non-positive curvature).
        StructureError: `b` or `x0` does not match the operator.

    Example:
        >>> import torch, funchess
        >>> op = funchess.DenseOperator(torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> res = funchess.cg(op, torch.tensor([1.0, 2.0], dtype=torch.float64), damping=1.0, rtol=1e-12)
        >>> res.solution
        tensor([0.1053, 0.4737], dtype=torch.float64)
        >>> res.num_hvps
        2
    """
    call = "funchess.cg(op, b)"
    op = _check_operator(call, op)
    lam = _check_positive(call, "damping", damping, allow_zero=True)
    _check_positive(call, "rtol", rtol, allow_zero=True)
    _check_positive(call, "atol", atol, allow_zero=True)
    n = op.shape[0]
    iters = 10 * n if max_iter is None else _check_count(call, "max_iter", max_iter, 1)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: conjugate gradients need a symmetric operator, got symmetric=False. Solve "
            f"the normal equations with op.T, or use SciPy's gmres on op.to_scipy()."
        )
    B, back, single = op._rows(call, b)
    products = _Products(call, op, progress, iters, "cg")

    def apply(rows: Tensor) -> Tensor:
        return products(rows) + lam * rows if lam else products(rows)

    try:
        if x0 is None:
            X = torch.zeros_like(B)
            R = B.clone()
        else:
            X0, _, _ = op._rows(call.replace("b)", "b, x0=...)"), x0)
            if X0.shape != B.shape:
                raise InvalidArgumentError(
                    f"{call}: x0 holds {X0.shape[0]} vector(s) but b holds {B.shape[0]}; expected "
                    f"the same form as b. Pass x0 shaped like b, or omit it."
                )
            X = X0.clone()
            R = B - apply(X)
        target = torch.clamp_min(rtol * B.norm(dim=1), atol)
        Pd = R.clone()
        rr = (R * R).sum(1)
        active = rr.sqrt() > target
        it = 0
        while bool(active.any()) and it < iters:
            AP = apply(Pd[active])
            pAp = (Pd[active] * AP).sum(1)
            if bool((pAp <= 0).any()):
                raise InvalidArgumentError(
                    f"{call}: H + damping * I is not positive definite (found a direction with "
                    f"curvature p^T (H + {lam:g} I) p = {float(pAp.min()):.3g} <= 0); CG needs a "
                    f"positive definite system. Raise damping above minus the smallest eigenvalue "
                    f"(funchess.eigsh(op, k=1, which='SA')), or solve with SciPy's minres on "
                    f"op.to_scipy()."
                )
            step = rr[active] / pAp
            X[active] += step[:, None] * Pd[active]
            R[active] -= step[:, None] * AP
            rr_new = (R[active] * R[active]).sum(1)
            Pd[active] = R[active] + (rr_new / rr[active])[:, None] * Pd[active]
            rr[active] = rr_new
            active = rr.sqrt() > target
            it += 1
    finally:
        products.close()
    converged = not bool(active.any())
    if not converged:
        warnings.warn(
            f"{call}: CG stopped after max_iter={iters} iterations with relative residual "
            f"{float((rr.sqrt() / B.norm(dim=1).clamp_min(torch.finfo(op.dtype).tiny)).max()):.3g} "
            f"> rtol={rtol:g}. Raise max_iter or damping (which improves the conditioning).",
            ConvergenceWarning,
            stacklevel=2,
        )
    norms = rr.sqrt()
    return SolveResult(
        solution=back(X),
        residual_norm=norms[0] if single else norms,
        num_iter=it,
        num_hvps=products.count,
        converged=converged,
    )
