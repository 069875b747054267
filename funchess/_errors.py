"""The exception family: every error funchess raises on bad input is a `FunchessError`.

Messages follow one pattern: the public call, what it expected, what it got, and the fix.
"""

from __future__ import annotations

__all__ = [
    "FunchessError",
    "InvalidArgumentError",
    "StructureError",
    "OutputError",
    "UnsupportedError",
    "MemoryBudgetError",
    "ConvergenceWarning",
]


class FunchessError(Exception):
    """Base class of every error funchess raises about its inputs.

    Example:
        >>> import funchess, torch
        >>> try:
        ...     funchess.hessian(lambda w: w * 2)(torch.ones(3))
        ... except funchess.FunchessError as e:
        ...     print(type(e).__name__)
        OutputError
    """


class InvalidArgumentError(FunchessError, ValueError):
    """An argument of a funchess call has the wrong type or value.

    Raised for, e.g., non-floating or complex parameters, an empty params dict, a parameter name the
    model does not have, `argnums` out of range, an unknown `mode` or a bad `chunk_size`.

    Example:
        >>> import funchess, torch
        >>> try:
        ...     funchess.hessian(lambda w: w.sum(), mode="fast")(torch.ones(2))
        ... except funchess.InvalidArgumentError as e:
        ...     print(str(e).split(":")[0])
        funchess.hessian(f, mode='fast')
    """


class StructureError(FunchessError, ValueError):
    """Two pytrees that must match (tangents and primals, a matrix and its params) do not.

    Example:
        >>> import funchess, torch
        >>> try:
        ...     funchess.from_matrix(torch.zeros(3, 3), {"w": torch.zeros(2)})
        ... except funchess.StructureError:
        ...     print("mismatch")
        mismatch
    """


class OutputError(FunchessError, ValueError):
    """The function being differentiated returned something the transform cannot use.

    Raised when a Hessian is asked of a function that does not return a scalar floating Tensor, or
    when `has_aux=True` but the function does not return a `(value, aux)` pair.

    Example:
        >>> import funchess, torch
        >>> try:
        ...     funchess.hessian(lambda w: w ** 2)(torch.ones(3))
        ... except funchess.OutputError as e:
        ...     print("scalar" in str(e))
        True
    """


class UnsupportedError(FunchessError, RuntimeError):
    """No verified composition can differentiate the function twice.

    Raised when an operator in the function has neither a double-backward nor a forward-mode rule,
    or when the function draws random numbers inside a vectorised pass.

    Example:
        >>> import funchess
        >>> issubclass(funchess.UnsupportedError, RuntimeError)
        True
    """


class MemoryBudgetError(FunchessError, MemoryError):
    """A computation would not fit its memory budget; raised before anything large is allocated.

    The message says how much the call needs, how much there is, and what to do instead.

    Example:
        >>> import funchess, torch
        >>> try:
        ...     funchess.hessian(lambda w: (w ** 3).sum(), max_memory="1MB")(torch.zeros(10_000))
        ... except funchess.MemoryBudgetError as e:
        ...     print("needs" in str(e))
        True
    """

    #: the `funchess.MemoryPlan` that did not fit (None when raised without one)
    plan: object = None
class ConvergenceWarning(UserWarning):
    """An iterative method (`funchess.eigsh`, `funchess.cg`) stopped before reaching its tolerance.

    The result is still returned (its `converged` field is False); raise `max_iter` or loosen the
    tolerance. Turn it into an error with `warnings.simplefilter("error", funchess.ConvergenceWarning)`.

    Example:
        >>> import funchess
        >>> issubclass(funchess.ConvergenceWarning, UserWarning)
        True
    """
