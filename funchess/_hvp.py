"""`hvp`: Hessian-vector products of a scalar function, without forming the Hessian.

funchess's one calling convention for products: `hvp(f, **options)(params, v, *data)` is the
Hessian of `f(params, *data)` with respect to `params`, times `v` (shaped like `params`). The
vector comes right after the point, as in `per_sample_hvp`, `dataset_hvp` and `ggn_vp`.
`torch.func.vmap` over `v` gives many products in one pass.

Outside torch.func transforms "rev-rev" is plain autograd: one gradient with `create_graph=True`,
then one backward of the gradient with `v` as its cotangent (the arithmetic of `vjp(grad(f))`
without torch.func's wrappers; `funchess/_linearisation.py`'s `HessianAt`, built for one
product). Inside transforms it is `vjp` of the gradient; "fwd-rev" is `jvp(grad(f))`. The checks
at the entry are O(leaves): a flat params dict is checked leaf by leaf without flattening.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

from torch import Tensor

from ._checks import (
    Mode,
    call_label,
    check_callable,
    check_mode,
    check_primals,
    check_randomness,
    check_tangent,
)
from ._compat import inside_transform, jvp, vjp
from ._compose import RandomState, check_function, gradient, run_modes, usable
from ._errors import StructureError
from ._linearisation import HessianAt, Reroute, plain_autograd_ok
from ._safe_ops import safe_ops
from ._tree import tree_flatten, tree_unflatten

__all__ = ["hvp", "vhp"]

PyTree = Any
_BATCH_RANDOMNESS: tuple[str, ...] = ("error", "same")


def _checked(here: str, params: Any, v: Any) -> tuple[list[Tensor], list[Tensor], Callable[[Sequence[Tensor]], Any], bool]:
    """The leaves of `params` and `v`, the map from leaves back to `params`' structure, and
    whether an outer autograd graph tracks a leaf, after `check_primals` and `check_tangent`'s
    checks (run in full only for a pytree other than a flat dict of Tensors, or to word an
    error); inference tensors are copied (`usable`)."""
    flat = type(params) is dict and type(v) is dict and bool(params) and list(params) == list(v)
    if flat:
        pl, vl = list(params.values()), list(v.values())
        flat = all(isinstance(t, Tensor) for t in pl) and all(isinstance(t, Tensor) for t in vl)
    if flat:
        keys = list(params)

        def rebuild(leaves: Sequence[Tensor]) -> Any:
            return dict(zip(keys, leaves))
    else:
        pl, spec = tree_flatten(params)
        vl = tree_flatten(v)[0]
        check_primals(here, (params,), ["params"])
        check_tangent(here, params, v)

        def rebuild(leaves: Sequence[Tensor]) -> Any:
            return tree_unflatten(spec, leaves)

    copy = tracked = False
    for p, t in zip(pl, vl):
        if not (
            isinstance(p, Tensor) and isinstance(t, Tensor) and p.is_floating_point() and not p.is_meta
            and t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
        ):
            check_primals(here, (params,), ["params"])
            check_tangent(here, params, v)
            raise AssertionError("unreachable: the checks above raise")  # pragma: no cover
        copy = copy or p.is_inference() or t.is_inference()
        tracked = tracked or p.requires_grad or t.requires_grad
    if copy:
        pl, vl = usable(pl), usable(vl)
    return pl, vl, rebuild, tracked


def _usable_args(data: tuple[Any, ...]) -> tuple[Any, ...]:
    """`usable(data)`, without flattening the common case (plain Tensors and None)."""
    for d in data:
        if not (d is None or (type(d) is Tensor and not d.is_inference())):
            return usable(data)  # type: ignore[no-any-return]
    return data


def _product(
    call: str, h: Callable[[Any], Any], leaves: list[Tensor], vs: list[Tensor], rebuild: Callable[[Sequence[Tensor]], Any],
    has_aux: bool, mode: str, randomness: str, reroute: Reroute | None = None, tracked: bool | None = None,
) -> tuple[Any, Any]:
    """`(H v, aux)` of `h(point)` at the point with `leaves`, `v` given by its leaves `vs`.

    Outside transforms, at a point no outer graph tracks, "rev-rev" is plain autograd's double
    backward (`HessianAt`, built for one product and freed as it goes), with the operator
    rerouting only where `reroute` says the forward needs it; otherwise torch.func's `vjp` of the
    gradient, and "fwd-rev" its `jvp`, under the rerouting."""
    rng = RandomState(leaves[0].device)
    if tracked is None:
        plain = mode != "fwd-rev" and plain_autograd_ok(leaves) and plain_autograd_ok(vs)
    else:  # the caller looked at every leaf already
        plain = mode != "fwd-rev" and not tracked and not inside_transform()

    def rev() -> Any:
        if plain:
            lin = HessianAt(call, h, leaves, rebuild, has_aux=has_aux, reroute=reroute, rewind=rng.replay)
            return rebuild(lin.mv(vs, keep=False)), lin.aux
        with safe_ops():
            g = gradient(h, call, has_aux, single=True)
            if has_aux:
                _, pullback, aux = vjp(g, rebuild(leaves), has_aux=True)
            else:
                (_, pullback), aux = vjp(g, rebuild(leaves)), None
            return pullback(rebuild(vs))[0], aux

    def fwd() -> Any:
        rng.replay()  # after a failed "rev-rev", the same draws again
        with safe_ops():
            g = gradient(h, call, has_aux, single=True, for_jvp=True)
            if has_aux:
                _, out, aux = jvp(g, (rebuild(leaves),), (rebuild(vs),), has_aux=True)
                return out, aux
            return jvp(g, (rebuild(leaves),), (rebuild(vs),))[1], None

    runners = {"rev-rev": rev, "fwd-rev": fwd}
    if randomness != "error":
        rng.save()
        return run_modes(call, mode, runners, safe=False)  # type: ignore[no-any-return]
    if inside_transform():  # torch.func's own randomness check applies under vmap
        return run_modes(call, mode, runners, safe=False)  # type: ignore[no-any-return]
    before = rng.snapshot()  # randomness="error": refuse a function that drew random numbers
    out = run_modes(call, mode, runners, safe=False)
    rng.refuse_draws(call, before)
    return out  # type: ignore[no-any-return]


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
    leaves, spec = tree_flatten(usable(primals))
    vs = cast(list[Tensor], spec.flatten_up_to(usable(tangents)))
    out, aux = _product(call, lambda p: f(*p), leaves, vs, functools.partial(tree_unflatten, spec), has_aux, mode, "error")
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
    when an operator lacks a rule (decided on every call). Cost: a few times one gradient. The
    returned function remembers one thing between calls, and only to save time: whether `f`'s
    forward meets an operator funchess reroutes (layer/batch norm, fused attention, fused
    recurrent layers). Its first call runs under the rerouting; later calls run without it while
    nothing was rerouted, and a walk of each call's autograd graph redoes a forward that did meet
    one (results never depend on it). For many products at one point,
    `funchess.HessianOperator` reuses the work that does not depend on `v`.

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

    here = f"{call}(params, v, ...)"
    reroute = Reroute()  # whether f's forward needs the operator rerouting: learnt, then checked

    @functools.wraps(f)
    def hvp_fn(params: Any, v: Any, *data: Any, **kwargs: Any) -> Any:
        check_function(here, f)
        leaves, vs, rebuild, tracked = _checked(here, params, v)
        data = _usable_args(data)
        if kwargs:
            kwargs = usable(kwargs)
        out, aux = _product(here, lambda p: f(p, *data, **kwargs), leaves, vs, rebuild, has_aux, mode, randomness, reroute, tracked)
        return (out, aux) if has_aux else out

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
