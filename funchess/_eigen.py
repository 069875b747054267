"""Eigenvalues of symmetric operators by Lanczos: `eigsh` (extreme eigenpairs) and
`spectral_density` (the eigenvalue density by stochastic Lanczos quadrature).

Both use Lanczos with full reorthogonalisation (every new Krylov vector orthogonalised twice
against all previous ones), one operator product per step; `spectral_density` advances all its
probes together, one batched product per step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import check_count, check_positive, relays_warnings
from ._errors import ConvergenceWarning, InvalidArgumentError
from ._linalg import Products, check_generator, draw, orthogonalise, tridiagonal
from ._operator import LinearOperator, check_operator
from ._tree import unravel

__all__ = ["EigenResult", "SpectralDensity", "eigsh", "spectral_density"]

PyTree = Any
Which = Literal["LA", "SA", "LM"]


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
    theta, S = torch.linalg.eigh(tridiagonal(alpha[block : j + 1], beta[block:j]))
    i = _pick(theta, which, 1)
    return bool(b * S[-1, i].abs() <= bound)


def _check_every(steps: int) -> int:
    """Convergence checks cost an `eigh` of the growing tridiagonal matrix; past a few hundred
    steps check only every ~2 % of the steps taken."""
    return 1 if steps <= 200 else steps // 50


@relays_warnings
def eigsh(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = False,
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
    op, steps, rtol, gen = _check_eigsh(call, op, k, which, tol, max_iter, generator)
    products = Products(call, op, progress, steps, "eigsh")
    try:
        run = _lanczos(products, op, steps, k, which, rtol, gen)
    finally:
        products.close()
    m = run.theta.numel()
    ritz = run.S[:, run.idx].T @ run.basis[:m]
    ritz = ritz / ritz.norm(dim=1, keepdim=True)
    if not run.converged:
        warnings.warn(
            f"{call}: Lanczos stopped after max_iter={steps} products with relative residuals up "
            f"to {float((run.res / run.theta.abs().max()).max()):.3g} > tol={rtol:.3g}. Raise max_iter or "
            f"tol; the eigenvalues returned are the current Ritz values.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=run.theta[run.idx],
        eigenvectors=[unravel(r, op.structure) for r in ritz],
        residuals=run.res,
        num_hvps=products.count,
        converged=run.converged,
    )


def _check_eigsh(
    call: str, op: Any, k: Any, which: Any, tol: Any, max_iter: Any, generator: Any
) -> tuple[LinearOperator, int, float, torch.Generator | None]:
    """`eigsh`'s checked arguments: the operator, the step limit, the tolerance, the generator."""
    op = check_operator(call, op)
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
    rtol = torch.finfo(op.dtype).eps ** 0.5 if tol is None else check_positive(call, "tol", tol)
    steps = min(n, max(100, 10 * k)) if max_iter is None else min(n, check_count(call, "max_iter", max_iter, k))
    return op, steps, rtol, check_generator(call, generator)


@dataclass
class _Run:
    """Where one Lanczos run stopped: its basis and tridiagonal matrix, the Ritz values `theta`
    with eigenvectors `S`, the wanted ones `idx`, their residual bounds and whether they converged."""

    basis: Tensor
    theta: Tensor
    S: Tensor
    idx: Tensor
    res: Tensor
    converged: bool


def _lanczos(
    products: Products, op: LinearOperator, steps: int, k: int, which: str, rtol: float, gen: torch.Generator | None
) -> _Run:
    """Lanczos with full reorthogonalisation until the `k` wanted Ritz pairs converge (checked every
    `_check_every` steps), restarting in the complement after a breakdown."""
    n, eps = op.shape[0], torch.finfo(op.dtype).eps
    basis = torch.empty(steps, n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, dtype=op.dtype, device=op.device)
    beta = torch.zeros(steps, dtype=op.dtype, device=op.device)  # beta[j] couples steps j and j+1
    q = draw(1, n, "normal", gen, op)[0]
    q = q / q.norm()
    block = 0  # where the open Krylov block starts (a new one opens after each breakdown)
    theta = S = idx = res = torch.zeros(0, dtype=op.dtype)
    for j in range(steps):
        basis[j] = q
        w = products(q.unsqueeze(0))[0]
        alpha[j] = torch.dot(q, w)
        w = w - alpha[j] * q - (beta[j - 1] * basis[j - 1] if j > block else 0)
        w = orthogonalise(w, basis[: j + 1])
        b = w.norm()
        scale_now = torch.cat([alpha[: j + 1].abs(), beta[:j].abs()]).max()
        breakdown = bool(b <= min(rtol, eps**0.5) * scale_now)  # numerically invariant
        full = j + 1 == n  # the Krylov space is the whole space: Ritz pairs are exact
        if j + 1 == steps or full or breakdown or (j + 1) % _check_every(steps) == 0:
            theta, S = torch.linalg.eigh(tridiagonal(alpha[: j + 1], beta[:j]))
            idx = _pick(theta, which, k)
            scale = theta.abs().max().clamp_min(torch.finfo(op.dtype).tiny)
            res = b * S[-1, idx].abs()
            if full or (
                j + 1 >= k
                and not breakdown  # an invariant block says nothing about its complement
                and bool((res <= rtol * scale).all())
                and _open_block_settled(alpha, beta, block, j, b, which, rtol * scale)
            ):
                return _Run(basis, theta, S, idx, res, True)
        if j + 1 == steps:
            break
        if breakdown:  # go on in the complement from a fresh direction; T splits (beta = 0)
            w = orthogonalise(draw(1, n, "normal", gen, op)[0], basis[: j + 1])
            q, block = w / w.norm(), j + 1
        else:
            beta[j] = b
            q = w / b
    return _Run(basis, theta, S, idx, res, False)


# ----------------------------------------------------------------------------- spectral density


def _lanczos_batch(
    products: Products, start: Tensor, steps: int, eps: float
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
        w = orthogonalise(w, basis[: j + 1, active])
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


@relays_warnings
def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = False,
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
    op = check_operator(call, op)
    probes = check_count(call, "num_probes", num_probes, 1)
    steps = min(op.shape[0], check_count(call, "num_steps", num_steps, 1))
    gen = check_generator(call, generator)
    if sigma is not None:
        check_positive(call, "sigma", sigma)
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise InvalidArgumentError(
                f"{call}: expected grid to be a 1-D increasing Tensor of at least 2 points, got "
                f"shape {tuple(grid.shape)}. Pass e.g. torch.linspace(lo, hi, 1000) or an int."
            )
    else:
        check_count(call, "grid", grid, 2)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: SLQ needs a symmetric operator, got symmetric=False. Pass a curvature "
            f"operator (Hessian, GGN)."
        )
    n = op.shape[0]
    products = Products(call, op, progress, probes * steps, "spectral_density")
    try:
        start = draw(probes, n, "rademacher", gen, op)
        alpha, beta, length = _lanczos_batch(products, start, steps, torch.finfo(op.dtype).eps)
    finally:
        products.close()
    nodes = torch.zeros(probes, steps, dtype=op.dtype, device=op.device)
    weights = torch.zeros_like(nodes)
    for p in range(probes):
        L = int(length[p])
        theta, S = torch.linalg.eigh(tridiagonal(alpha[p, :L], beta[p, : L - 1]))
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


