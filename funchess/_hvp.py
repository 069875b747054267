"""`hvp`: Hessian-vector products of a scalar function, without forming the Hessian.

funchess's one calling convention for products: `hvp(f, **options)(params, v, *data)` is the
Hessian of `f(params, *data)` with respect to `params`, times `v` (shaped like `params`). The
vector comes right after the point, as in `per_sample_hvp`, `dataset_hvp` and `ggn_vp`.
`torch.func.vmap` over `v` gives many products in one pass.

Outside torch.func transforms "rev-rev" is plain autograd: one gradient with `create_graph=True`,
then one backward of the gradient with `v` as its cotangent (the arithmetic of `vjp(grad(f))`
without torch.func's wrappers). Inside transforms it is `vjp` of the gradient; "fwd-rev" is
`jvp(grad(f))`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import (
    Mode,
    call_label,
    check_callable,
    check_mode,
    check_primals,
    check_randomness,
    check_tangent,
    scalar_output,
)
from ._compat import inside_transform, jvp, vjp
from ._compose import RandomState, check_function, gradient, run_modes, usable
from ._errors import StructureError
from ._tree import tree_flatten, tree_map, tree_unflatten

__all__ = ["hvp", "vhp"]

PyTree = Any
_BATCH_RANDOMNESS: tuple[str, ...] = ("error", "same")


def _plain_autograd_ok(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> bool:
    """Whether plain autograd can take the reverse-over-reverse HVP: outside every torch.func
    transform, with no leaf already tracked by an outer autograd graph (whose derivatives
    torch.func would carry through, and a detached copy would not)."""
    if inside_transform():
        return False
    leaves = tree_flatten((primals, tangents))[0]
    return all(isinstance(t, Tensor) and not t.requires_grad for t in leaves)


def _double_backward(
    f: Callable[..., Any], call: str, has_aux: bool, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[tuple[Any, ...], Any]:
    """"rev-rev" by plain autograd: one gradient with `create_graph=True`, then one backward of
    the gradient with the tangent as its cotangent. A primal the loss does not depend on gets a
    zero product (as torch.func gives)."""
    leaves, spec = tree_flatten(primals)
    xs = [t.detach().requires_grad_(True) for t in leaves]
    vs = tree_flatten(tangents)[0]
    with torch.enable_grad():
        out = scalar_output(call, f, has_aux)(*tree_unflatten(spec, xs))
        value, aux = out if has_aux else (out, None)
        grads: Sequence[Tensor | None] = (
            torch.autograd.grad(value, xs, create_graph=True, allow_unused=True) if value.requires_grad else [None] * len(xs)
        )
        live = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
        hv: Sequence[Tensor | None] = (
            torch.autograd.grad([g for g, _ in live], xs, grad_outputs=[v for _, v in live], allow_unused=True)
            if live else [None] * len(xs)
        )
    result = [torch.zeros_like(x) if h is None else h for x, h in zip(xs, hv)]
    aux = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)
    return tuple(tree_unflatten(spec, result)), aux


def _product(
    call: str, f: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...], has_aux: bool, mode: str,
    randomness: str,
) -> tuple[Any, Any]:
    """`(H v for every primal, aux)` of `f(*primals)` in `mode`."""
    device = tree_flatten(primals)[0][0].device
    rng = RandomState(device)

    def rev() -> Any:
        if _plain_autograd_ok(primals, tangents):
            return _double_backward(f, call, has_aux, primals, tangents)
        g = gradient(f, call, has_aux, single=False)
        if has_aux:
            _, pullback, aux = vjp(g, *primals, has_aux=True)
        else:
            (_, pullback), aux = vjp(g, *primals), None
        return pullback(tangents), aux

    def fwd() -> Any:
        rng.replay()  # after a failed "rev-rev", the same draws again
        g = gradient(f, call, has_aux, single=False, for_jvp=True)
        if has_aux:
            _, out, aux = jvp(g, primals, tangents, has_aux=True)
            return out, aux
        return jvp(g, primals, tangents)[1], None

    runners = {"rev-rev": rev, "fwd-rev": fwd}
    if randomness != "error":
        rng.save()
        return run_modes(call, mode, runners)  # type: ignore[no-any-return]
    if inside_transform():  # torch.func's own randomness check applies under vmap
        return run_modes(call, mode, runners)  # type: ignore[no-any-return]
    with rng.guard(call):
        return run_modes(call, mode, runners)  # type: ignore[no-any-return]


def _legacy(name: str, f: Callable[..., Any], primals: Any, tangents: Any, has_aux: bool, mode: Any) -> Any:
    """The pre-0.2 immediate form `hvp(f, primals, tangents)` (torch.func.jvp's convention)."""
    warnings.warn(
        f"funchess.{name}(f, primals, tangents) is deprecated and will be removed in funchess 0.3; "
        f"use funchess.hvp(f)(params, v, *data) (the Hessian of f(params, *data) w.r.t. params, "
        f"times v), e.g. funchess.hvp(f)(*primals[:1], *tangents[:1]) for one primal.",
        FutureWarning,
        stacklevel=3,
    )
    call = call_label(name, {"mode": mode, "has_aux": has_aux}, first="f, primals, tangents")
    check_callable(call, f)
    check_mode(call, mode)
    for label, value in (("primals", primals), ("tangents", tangents)):
        if not isinstance(value, tuple):
            raise StructureError(
                f"{call}: expected {label} to be a tuple (as in torch.func.jvp), got "
                f"{type(value).__name__}. Wrap it: funchess.{name}(f, (params,), (v,)), or use "
                f"funchess.hvp(f)(params, v)."
            )
    if len(primals) != len(tangents):
        raise StructureError(
            f"{call}: expected one tangent per primal ({len(primals)}), got {len(tangents)}. "
            f"Pass tangents shaped like primals."
        )
    check_primals(call, primals, [f"primals[{k}]" for k in range(len(primals))])
    for k, (p, t) in enumerate(zip(primals, tangents)):
        check_tangent(call, p, t, f"primals[{k}]", f"tangents[{k}]")
    out, aux = _product(call, f, usable(primals), usable(tangents), has_aux, mode, "error")
    out = out[0] if len(primals) == 1 else tuple(out)
    return (out, aux) if has_aux else out


_MISSING: Any = object()


def hvp(
    f: Callable[..., Any],
    primals: Any = _MISSING,
    tangents: Any = _MISSING,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    randomness: str = "error",
) -> Any:
    """Hessian-vector products `H v`, without forming `H`: `hvp(f)(params, v, *data)`.

    `hvp(f, **options)` returns a function of `(params, v, *data)`: the Hessian of the scalar
    `f(params, *data)` with respect to `params` (any pytree of Tensors: a params dict, a Tensor, a
    tuple of several), times `v` (shaped like `params`); the result is shaped like `params`. This
    is funchess's convention for every product (`ggn_vp`, `per_sample_hvp`, `dataset_hvp`): the
    point, then the vector, then the data. `torch.func.vmap` over `v`
    (`in_dims=(None, 0, None, ...)`) gives many products in one pass.

    Composition: "rev-rev" is `vjp` of the gradient (outside torch.func transforms, plain autograd's
    double backward: one gradient with `create_graph=True`, then its backward with `v` as the
    cotangent); "fwd-rev" is `jvp(grad(f))`; "auto" tries "rev-rev" and falls back to "fwd-rev"
    when an operator lacks a rule (decided on every call). Cost: a few times one gradient. For
    many products at one point, `funchess.HessianOperator` reuses the work that does not depend on
    `v`.

    Deprecated form: `hvp(f, primals, tangents)` (torch.func.jvp's convention, computed at once)
    still works in this release and warns; it is removed in funchess 0.3.

    Args:
        f: `f(params, *data)` returning a scalar Tensor (or `(scalar, aux)` with `has_aux=True`).
        has_aux: f returns `(value, aux)`; the result is then `(Hv, aux)`.
        mode: "auto", "rev-rev" or "fwd-rev".
        randomness: "error" (default: refuse a function that draws random numbers, e.g. dropout
            in train mode) or "same" (its draws are replayed in every pass of the call).

    Returns:
        A function `(params, v, *data, **kwargs) -> H v` (and aux with `has_aux=True`).

    Raises:
        StructureError: v does not match params in structure, shape, dtype or device.
        OutputError: f does not return a scalar.

    Example:
        >>> import torch, funchess
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> funchess.hvp(f)(p, {"w": torch.ones(2)})
        {'w': tensor([ 6., 12.])}
        >>> loss = lambda w, x: ((x @ w) ** 2).sum()          # with data after the vector
        >>> funchess.hvp(loss)(torch.ones(2), torch.tensor([1.0, 0.0]), torch.eye(2))
        tensor([2., 0.])
    """
    if primals is not _MISSING or tangents is not _MISSING:
        return _legacy("hvp", f, primals, tangents, has_aux, mode)
    call = call_label("hvp", {"has_aux": has_aux, "mode": mode, "randomness": randomness})
    check_callable(call, f)
    check_mode(call, mode)
    check_randomness(call, randomness, _BATCH_RANDOMNESS)

    @functools.wraps(f)
    def hvp_fn(params: Any, v: Any, *data: Any, **kwargs: Any) -> Any:
        here = f"{call}(params, v, ...)"
        check_function(here, f)
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)
        data, kwargs = usable(data), usable(kwargs)
        out, aux = _product(
            here, lambda p: f(p, *data, **kwargs), (usable(params),), (usable(v),), has_aux, mode, randomness
        )
        return (out[0], aux) if has_aux else out[0]

    return hvp_fn


def vhp(
    f: Callable[..., Any],
    primals: Any,
    tangents: Any,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
) -> Any:
    """Deprecated: the vector-Hessian product equals `hvp` (the Hessian is symmetric).

    `vhp(f, primals, tangents)` (torch.autograd.functional's name) still works in this release,
    warns, and returns what `funchess.hvp` returns; it is removed in funchess 0.3. Use
    `funchess.hvp(f)(params, v, *data)`.

    Example:
        >>> import warnings, torch, funchess
        >>> f = lambda x: (x[0] * x[1] ** 2)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", FutureWarning)
        ...     funchess.vhp(f, (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 0.0]),))
        tensor([0., 4.])
    """
    return _legacy("vhp", f, primals, tangents, has_aux, mode)
