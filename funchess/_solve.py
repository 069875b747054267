"""`cg`: solving `(H + damping * I) x = b` by conjugate gradients, matrix-free."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import check_count, check_positive, relays_warnings
from ._errors import ConvergenceWarning, InvalidArgumentError
from ._linalg import Products, check_finite
from ._operator import LinearOperator, check_operator

__all__ = ["SolveResult", "cg"]


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


# ----------------------------------------------------------------------------- conjugate gradients


@relays_warnings
def cg(
    op: LinearOperator,
    b: Any,
    *,
    damping: float = 0.0,
    x0: Any = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    progress: bool | None = False,
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
    op = check_operator(call, op)
    lam = check_positive(call, "damping", damping, allow_zero=True)
    check_positive(call, "rtol", rtol, allow_zero=True)
    check_positive(call, "atol", atol, allow_zero=True)
    n = op.shape[0]
    iters = 10 * n if max_iter is None else check_count(call, "max_iter", max_iter, 1)
    if not op.symmetric:
        raise InvalidArgumentError(
            f"{call}: conjugate gradients need a symmetric operator, got symmetric=False. Solve "
            f"the normal equations with op.T, or use SciPy's gmres on op.to_scipy()."
        )
    B, back, single = op._rows(call, b)
    check_finite(call, "b", B)
    products = Products(call, op, progress, iters, "cg")

    def apply(rows: Tensor) -> Tensor:
        return products(rows) + lam * rows if lam else products(rows)

    try:
        X, R = _start(call, op, B, x0, apply)
        X, rr, active, it = _iterate(call, apply, X, R, torch.clamp_min(rtol * B.norm(dim=1), atol), iters, lam)
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


def _start(call: str, op: LinearOperator, B: Tensor, x0: Any, apply: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The starting guess and its residual: zero (no product), or `x0` in the form of `b`."""
    if x0 is None:
        return torch.zeros_like(B), B.clone()
    X0, _, _ = op._rows(f"{call[:-1]}, x0=...)", x0)
    if X0.shape != B.shape:
        raise InvalidArgumentError(
            f"{call}: x0 holds {X0.shape[0]} vector(s) but b holds {B.shape[0]}; expected "
            f"the same form as b. Pass x0 shaped like b, or omit it."
        )
    check_finite(call, "x0", X0)
    return X0.clone(), B - apply(X0)


def _iterate(
    call: str, apply: Callable[[Tensor], Tensor], X: Tensor, R: Tensor, target: Tensor, iters: int, lam: float
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Conjugate-gradient iterations on the rows not yet converged (one batched product each);
    `(X, squared residual norms, still active, iterations)`."""
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
    return X, rr, active, it
