"""The oracle: slow, obviously correct references and assertion helpers (public).

Everything here uses plain `torch.autograd` (no torch.func), so it is independent of funchess's
fast paths and can check them, or any other library's curvature code:

- `reference_hessian`: the textbook nested double-backward loop, one
  `torch.autograd.grad(..., create_graph=True)` row per gradient entry;
- `reference_hvp`: one double backward;
- `finite_difference_hessian` / `check_hessian`, `finite_difference_hvp` / `check_hvp`: central
  differences of the plain first-order gradient, independent of every double-backward rule;
- `assert_hessian_close` with the dtype-keyed `TOLERANCES` table.

The double-backward references route the operators whose double backward torch itself gets wrong
(`AUTOGRAD_FIXES`: weight norm) through torch's own unfused composition; the finite-difference
checks need no such fix, and the suite runs them on every case.

Example:
    >>> import torch, funchess
    >>> from funchess.testing import reference_hessian, assert_hessian_close
    >>> f = lambda p: (p["w"].sin() * p["b"]).sum()
    >>> p = {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    >>> assert_hessian_close(funchess.hessian(f)(p), reference_hessian(f, p))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

try:
    from torch.nn.attention import SDPBackend as _SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    _sdpa_kernel = None  # type: ignore[assignment]

from ._errors import OutputError
from ._safe_ops import AUTOGRAD_FIXES, SecondOrderSafe
from ._tree import blocks_of, offsets, promoted_dtype, tree_flatten, tree_unflatten

__all__ = [
    "TOLERANCES",
    "tolerance",
    "reference_hessian",
    "reference_hvp",
    "finite_difference_tolerance",
    "finite_difference_hessian",
    "finite_difference_hvp",
    "check_hessian",
    "check_hvp",
    "assert_hessian_close",
    "reference_jacobian",
    "reference_ggn",
]

PyTree = Any

#: (rtol, atol) per dtype. An entry passes when |actual - expected| <= atol * scale + rtol * |expected|,
#: `scale` the largest |expected| entry of the whole Hessian (so atol is relative to the Hessian's size).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The `(rtol, atol)` pair `assert_hessian_close` uses for `dtype`.

    Example:
        >>> import torch
        >>> from funchess.testing import tolerance
        >>> tolerance(torch.float64)
        (1e-09, 1e-09)
    """
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def finite_difference_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The `(rtol, atol)` pair `check_hessian` uses for `dtype`: finite differences (truncation
    `~step**2`, rounding `~eps / step`) are ~1000x less accurate than an exact comparison, so both
    are `1000 * atol` of `TOLERANCES` (at most 0.05).

    Example:
        >>> import torch
        >>> from funchess.testing import finite_difference_tolerance
        >>> finite_difference_tolerance(torch.float64)
        (1e-06, 1e-06)
        >>> finite_difference_tolerance(torch.float32)
        (0.01, 0.01)
    """
    loose = min(round(tolerance(dtype)[1] * 1e3, 12), 5e-2)
    return loose, loose


@contextlib.contextmanager
def _plain_autograd(fixes: bool = True) -> Iterator[None]:
    """Grad mode on, and attention on torch's own math kernel: fused attention kernels have no
    double backward, the math kernel has (this is torch's path, not funchess's rerouting). With
    `fixes`, the operators whose double backward torch gets wrong under plain autograd too
    (`AUTOGRAD_FIXES`: weight norm) take torch's own unfused composition; finite differences of
    the first-order gradient need no fixes and run without them."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if _sdpa_kernel is not None:
            stack.enter_context(_sdpa_kernel([_SDPBackend.MATH]))
        if fixes:
            stack.enter_context(SecondOrderSafe(AUTOGRAD_FIXES))
        yield


def _differentiated(
    args: tuple[Any, ...], argnums: int | tuple[int, ...]
) -> tuple[tuple[int, ...], list[Tensor], Callable[[list[Tensor]], tuple[Any, ...]], Any]:
    """Indices, fresh leaf tensors requiring grad, a rebuild of args from leaves, and the
    differentiated structure (one argument, or a tuple of them)."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    nums = tuple(i % len(args) for i in nums)
    diff = args[nums[0]] if isinstance(argnums, int) else tuple(args[i] for i in nums)
    leaves, spec = tree_flatten(diff)
    fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]

    def rebuild(new_leaves: list[Tensor]) -> tuple[Any, ...]:
        value = tree_unflatten(spec, new_leaves)
        full = list(args)
        if isinstance(argnums, int):
            full[nums[0]] = value
        else:
            for i, v in zip(nums, value):
                full[i] = v
        return tuple(full)

    return nums, fresh, rebuild, spec


def _scalar(call: str, out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 0:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise OutputError(f"{call}: f must return a scalar Tensor, got {got}. Reduce the loss.")
    return out


def reference_hessian(
    f: Callable[..., Tensor], *args: Any, argnums: int | tuple[int, ...] = 0, **kwargs: Any
) -> PyTree:
    """The Hessian by nested double-backward loops: slow, simple, independent of torch.func.

    One `torch.autograd.grad(loss, params, create_graph=True)`, then one
    `torch.autograd.grad(g[i], params, retain_graph=True)` per gradient entry `i`. Returns the same
    tree product as `funchess.hessian(f, argnums)(*args, **kwargs)`. Parameters the loss does not
    depend on get zero rows and columns.

    Example:
        >>> import torch
        >>> from funchess.testing import reference_hessian
        >>> reference_hessian(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    _, leaves, rebuild, spec = _differentiated(args, argnums)
    shapes = [leaf.shape for leaf in leaves]
    off = offsets(shapes)
    H = torch.zeros(off[-1], off[-1], dtype=promoted_dtype(leaves), device=leaves[0].device)
    with _plain_autograd():
        loss = _scalar("funchess.testing.reference_hessian(f, ...)", f(*rebuild(leaves), **kwargs))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        for li, g in enumerate(grads):
            if g is None or not g.requires_grad:
                continue  # the gradient of this leaf is constant: its rows are zero
            flat = g.reshape(-1)
            for k in range(flat.numel()):
                row = torch.autograd.grad(flat[k], leaves, retain_graph=True, allow_unused=True)
                for lj, r in enumerate(row):
                    if r is not None:
                        H[off[li] + k, off[lj] : off[lj + 1]] = r.reshape(-1).detach()
    return blocks_of(H, (shapes, spec), (shapes, spec))


def reference_hvp(f: Callable[..., Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    """`H v` by one plain double backward; same conventions and result as `funchess.hvp`.

    Example:
        >>> import torch
        >>> from funchess.testing import reference_hvp
        >>> reference_hvp(lambda x: (x ** 3).sum(), (torch.tensor([1.0, 2.0]),), (torch.ones(2),))
        tensor([ 6., 12.])
    """
    leaves, spec = tree_flatten(tuple(primals))
    t_leaves: list[Any] = spec.flatten_up_to(tuple(tangents))  # type: ignore[arg-type]
    fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    with _plain_autograd():
        loss = _scalar("funchess.testing.reference_hvp(f, ...)", f(*tree_unflatten(spec, fresh)))
        grads = torch.autograd.grad(loss, fresh, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(grads, t_leaves) if g is not None and g.requires_grad]
        hv: Any = (
            torch.autograd.grad([g for g, _ in pairs], fresh, grad_outputs=[t for _, t in pairs], allow_unused=True)
            if pairs
            else [None] * len(fresh)
        )
    out = tree_unflatten(spec, [torch.zeros_like(p) if r is None else r.detach() for p, r in zip(leaves, hv)])
    return out[0] if len(primals) == 1 else out


def _gradient_flat(
    f: Callable[..., Tensor], rebuild: Callable[[list[Tensor]], tuple[Any, ...]], leaves: list[Tensor],
    kwargs: dict[str, Any], call: str = "funchess.testing.finite_difference_hessian(f, ...)",
) -> Tensor:
    """The plain first-order autograd gradient, raveled (no rerouting: one backward is right)."""
    fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    with _plain_autograd(fixes=False):
        loss = _scalar(call, f(*rebuild(fresh), **kwargs))
        grads = torch.autograd.grad(loss, fresh, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(fresh, grads)])


def _default_step(dtype: torch.dtype, eps: float | None) -> float:
    return eps if eps is not None else (1e-5 if dtype == torch.float64 else 1e-2)


def finite_difference_hessian(
    f: Callable[..., Tensor],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    eps: float | None = None,
    **kwargs: Any,
) -> PyTree:
    """The Hessian by central differences of the autograd gradient (column by column).

    Column `i` is `(g(x + h e_i) - g(x - h e_i)) / 2h` with `h = eps * max(1, |x_i|)`. Accurate to
    about `eps**2` (times the third derivative): use float64. Same tree product as
    `funchess.hessian`.

    Args:
        f, args, argnums, kwargs: as for `funchess.hessian(f, argnums)(*args, **kwargs)`.
        eps: the relative step; default `1e-5` for float64, `1e-2` for lower precision.

    Example:
        >>> import torch
        >>> from funchess.testing import finite_difference_hessian
        >>> H = finite_difference_hessian(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(H, torch.tensor([[6.0, 0.0], [0.0, 12.0]], dtype=torch.float64))
        True
    """
    prob = _Flat(f, args, argnums, kwargs, "funchess.testing.finite_difference_hessian(f, ...)")
    step = _default_step(prob.dtype, eps)
    H = torch.empty(prob.x.numel(), prob.x.numel(), dtype=prob.dtype, device=prob.x.device)
    for i in range(prob.x.numel()):
        h = step * max(1.0, abs(float(prob.x[i])))
        up, down = prob.x.clone(), prob.x.clone()
        up[i] += h
        down[i] -= h
        H[:, i] = (prob.grad(up) - prob.grad(down)) / (2 * h)
    return blocks_of(H, (prob.shapes, prob.spec), (prob.shapes, prob.spec))


class _Flat:
    """`f` as a function of the raveled differentiated argument(s): the point `x` (in the
    promoted dtype), the plain first-order gradient at any point, and the way back to a tree."""

    def __init__(self, f: Callable[..., Tensor], args: tuple[Any, ...], argnums: int | tuple[int, ...], kwargs: dict[str, Any], call: str) -> None:
        _, self.leaves, self.rebuild, self.spec = _differentiated(args, argnums)
        self.f, self.kwargs, self.call = f, kwargs, call
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.offsets = offsets(self.shapes)
        self.dtype = promoted_dtype(self.leaves)
        self.x = torch.cat([leaf.detach().reshape(-1).to(self.dtype) for leaf in self.leaves])

    def split(self, v: Tensor) -> list[Tensor]:
        o = self.offsets
        return [v[o[i] : o[i + 1]].reshape(s).to(leaf.dtype) for i, (s, leaf) in enumerate(zip(self.shapes, self.leaves))]

    def ravel(self, tree: PyTree) -> Tensor:
        return torch.cat([t.detach().reshape(-1).to(self.dtype) for t in self.spec.flatten_up_to(tree)])  # type: ignore[arg-type]

    def tree(self, flat: Tensor) -> PyTree:
        return tree_unflatten(self.spec, self.split(flat))

    def grad(self, x: Tensor) -> Tensor:
        return _gradient_flat(self.f, self.rebuild, self.split(x), self.kwargs, self.call).to(self.dtype)


def _absmax(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _directional(prob: _Flat, v: Tensor, step: float) -> tuple[Tensor, Tensor, float, float]:
    """Central differences of the gradient along `v` with steps `h` and `2h`, and the scale of the
    gradients met (for the rounding estimate) and `h` itself; `v` is scaled to max |entry| 1 so
    that `h = step * max(1, max |x|)` is a step in x's own units."""
    m, h = _absmax(v), step * max(1.0, _absmax(prob.x))
    g = [prob.grad(prob.x + k * h * v / m) for k in (1, -1, 2, -2)]
    return (g[0] - g[1]) * (m / (2 * h)), (g[2] - g[3]) * (m / (4 * h)), m * max(_absmax(t) for t in g), h


def finite_difference_hvp(
    f: Callable[..., Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...], *, eps: float | None = None
) -> Any:
    """`H v` by central differences of the plain first-order gradient: `(g(x + h u) - g(x - h u)) / 2h`
    times `max |v|`, `u = v / max |v|`, `h = eps * max(1, max |x|)`. Independent of every
    double-backward and forward-mode rule; accurate to about `h**2` (times the third derivative),
    so use float64. Same conventions and result structure as `reference_hvp`.

    Args:
        f: a function of `*primals` returning a scalar Tensor.
        primals, tangents: the point and the direction, tuples with one entry per argument of `f`.
        eps: the relative step; default `1e-5` for float64, `1e-2` for lower precision.

    Example:
        >>> import torch
        >>> from funchess.testing import finite_difference_hvp
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> hv = finite_difference_hvp(lambda x: (x ** 3).sum(), (x,), (torch.ones(2, dtype=torch.float64),))
        >>> torch.allclose(hv, torch.tensor([6.0, 12.0], dtype=torch.float64))
        True
    """
    prob = _Flat(f, tuple(primals), tuple(range(len(primals))), {}, "funchess.testing.finite_difference_hvp(f, ...)")
    v = prob.ravel(tuple(tangents))
    out = prob.tree(
        torch.zeros_like(prob.x) if not v.any() else _directional(prob, v, _default_step(prob.dtype, eps))[0]
    )
    return out[0] if len(primals) == 1 else out


def _least_precise(leaves: list[Tensor]) -> torch.dtype:
    worst = leaves[0].dtype
    for leaf in leaves:
        if tolerance(leaf.dtype)[0] > tolerance(worst)[0]:
            worst = leaf.dtype
    return worst


def _scale(leaves: list[Tensor]) -> float:
    finite = [leaf.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().item() for leaf in leaves if leaf.numel()]
    return max(finite, default=0.0) or 1.0


def assert_hessian_close(
    actual: PyTree,
    expected: PyTree,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str = "",
) -> None:
    """Assert two Hessian pytrees (or any matching pytrees of Tensors) are equal within tolerance.

    An entry passes when `|actual - expected| <= atol * scale + rtol * |expected|`, `scale` being the
    largest `|expected|` entry over all blocks: Hessian entries span many orders of magnitude, so
    `atol` is relative to the Hessian's size. Tolerances default to `TOLERANCES` for the less
    precise of the two dtypes. NaNs must appear in the same places.

    Raises:
        AssertionError: naming the first block out of tolerance, its worst entry and the bound.

    Example:
        >>> import torch
        >>> from funchess.testing import assert_hessian_close
        >>> assert_hessian_close({"a": torch.ones(2)}, {"a": torch.ones(2) + 1e-12})
    """
    a_leaves, a_spec = tree_flatten(actual)
    e_leaves, e_spec = tree_flatten(expected)
    prefix = f"{msg}: " if msg else ""
    if a_spec != e_spec:
        raise AssertionError(f"{prefix}structures differ: actual {a_spec}, expected {e_spec}")
    if not e_leaves:
        return
    d_rtol, d_atol = tolerance(_least_precise(a_leaves + e_leaves))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = _scale(e_leaves)
    for path, a, e in zip(e_spec.paths(), a_leaves, e_leaves):
        where = "".join(f"[{p!r}]" for p in path) or "<root>"
        if tuple(a.shape) != tuple(e.shape):
            raise AssertionError(f"{prefix}block {where}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
        dtype = torch.promote_types(a.dtype, e.dtype)
        a64, e64 = a.detach().to(dtype), e.detach().to(dtype).to(a.device)
        nan_a, nan_e = a64.isnan(), e64.isnan()
        if not torch.equal(nan_a, nan_e):
            raise AssertionError(f"{prefix}block {where}: NaNs in different places")
        err = (a64 - e64).abs().nan_to_num(0.0)
        bound = atol * scale + rtol * e64.abs().nan_to_num(0.0)
        bad = err > bound
        if bool(bad.any()):
            k = int(torch.argmax((err - bound).reshape(-1)))
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), a.shape)) if a.dim() else ()
            raise AssertionError(
                f"{prefix}block {where}: {int(bad.sum())} of {a.numel()} entries out of tolerance; "
                f"worst at {idx}: actual {a64.reshape(-1)[k].item():.6g}, expected "
                f"{e64.reshape(-1)[k].item():.6g} (|diff| {err.reshape(-1)[k].item():.3g} > "
                f"bound {bound.reshape(-1)[k].item():.3g}; rtol={rtol:g}, atol={atol:g} x scale {scale:.3g})"
            )


def _with_precision_hint(err: AssertionError, dtype: torch.dtype) -> AssertionError:
    return err if dtype == torch.float64 else AssertionError(
        f"{err}. The check ran in {dtype}, where finite differences are only accurate to about 1e-3 "
        f"of the Hessian's scale: use float64 for a tight check (e.g. `model.double()` and float64 inputs)."
    )


def check_hessian(
    f: Callable[..., Tensor],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    hessian_fn: Callable[..., PyTree] | None = None,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **kwargs: Any,
) -> None:
    """Check a Hessian against finite differences of the gradient (like JAX's `check_grads`).

    Args:
        f, args, argnums, kwargs: the function and point.
        hessian_fn: computes the Hessian to check, called as `hessian_fn(*args, **kwargs)`;
            default `funchess.hessian(f, argnums)`.
        eps: finite-difference step (see `finite_difference_hessian`).
        rtol, atol: tolerances as in `assert_hessian_close`; default
            `finite_difference_tolerance(dtype)` for the least precise dtype of the point and the
            Hessian (finite differences are only accurate to about `eps**2`).

    Raises:
        AssertionError: the Hessian disagrees with finite differences (in lower precision the
            message says to use float64 for a tight check).

    Example:
        >>> import torch
        >>> from funchess.testing import check_hessian
        >>> check_hessian(lambda x: x.exp().sum(), torch.randn(4, dtype=torch.float64))
    """
    if hessian_fn is None:
        from ._hessian import hessian

        hessian_fn = hessian(f, argnums)
    actual = hessian_fn(*args, **kwargs)
    expected = finite_difference_hessian(f, *args, argnums=argnums, eps=eps, **kwargs)
    dtype = _least_precise(tree_flatten(actual)[0] + tree_flatten(expected)[0])
    d_rtol, d_atol = finite_difference_tolerance(dtype)
    try:
        assert_hessian_close(actual, expected, rtol=d_rtol if rtol is None else rtol, atol=d_atol if atol is None else atol,
                             msg="check_hessian vs finite differences")
    except AssertionError as err:
        raise _with_precision_hint(err, dtype) from None


def _funchess_hvp(f: Callable[..., Tensor], argnums: int | tuple[int, ...]) -> Callable[..., PyTree]:
    """`check_hvp`'s default: `funchess.hvp` with respect to the differentiated argument(s)."""
    from ._hvp import hvp

    def product(v: PyTree, *point: Any, **kw: Any) -> PyTree:
        nums, _, rebuild, _ = _differentiated(point, argnums)
        diff = point[nums[0]] if isinstance(argnums, int) else tuple(point[i] for i in nums)
        return hvp(lambda d: f(*rebuild(tree_flatten(d)[0]), **kw))(diff, v)

    return product


def check_hvp(
    f: Callable[..., Tensor],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    hvp_fn: Callable[..., PyTree] | None = None,
    tangents: list[PyTree] | None = None,
    num_directions: int = 2,
    eps: float | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> None:
    """Check Hessian-vector products against finite differences of the plain gradient.

    For each direction `v`, compares `hvp_fn(v, *args, **kwargs)` with the Richardson combination
    `(4 D(h) - D(2h)) / 3` of the central differences `D(h) = (g(x + h v) - g(x - h v)) / 2h` of
    the first-order autograd gradient `g` (accurate to `h**4`). No double-backward or forward-mode
    rule is involved, so this catches errors the double-backward oracle shares with torch. The
    tolerance comes from the step and the values' scale: `2 |D(h) - D(2h)|` (a generous bound on
    the truncation error left) plus `100 eps_dtype |g| / h` (rounding in the gradients, amplified
    by `1/h`), so it is tight in float64 and honest in lower precision.

    Args:
        f, args, argnums, kwargs: the function and point, as for `funchess.hessian(f, argnums)`.
        hvp_fn: computes `H v` for `v` shaped like the differentiated argument(s), called as
            `hvp_fn(v, *args, **kwargs)`; default `funchess.hvp` of `f` in those arguments.
            To check a dense Hessian `H`: `lambda v, *a: funchess.unravel(funchess.to_matrix(H)
            @ funchess.ravel(v), v)`.
        tangents: the directions (a list of trees shaped like the differentiated argument(s));
            default `num_directions` standard normal draws from `generator`.
        num_directions: how many random directions when `tangents` is None.
        eps: the relative step (see `finite_difference_hvp`).
        generator: for the random directions (default: a fixed seed, so the check is repeatable).

    Raises:
        AssertionError: naming the direction, the block and its worst entry, and the bound (in
            lower precision the message says to use float64 for a tight check).

    Example:
        >>> import torch
        >>> from funchess.testing import check_hvp
        >>> check_hvp(lambda p: (p["w"].sin() * p["b"]).sum(),
        ...           {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)})
    """
    prob = _Flat(f, args, argnums, kwargs, "funchess.testing.check_hvp(f, ...)")
    product = hvp_fn if hvp_fn is not None else _funchess_hvp(f, argnums)
    if tangents is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        flat = [torch.randn(prob.x.numel(), generator=gen, dtype=torch.float64).to(prob.x) for _ in range(num_directions)]
    else:
        flat = [prob.ravel(t) for t in tangents]
    step = _default_step(prob.dtype, eps)
    rounding = 100 * torch.finfo(prob.dtype).eps
    for k, v in enumerate(flat):
        actual = product(prob.tree(v), *args, **kwargs)
        dtype = _least_precise(tree_flatten(actual)[0] + [prob.x])
        if not v.any():
            expected, bound = torch.zeros_like(v), 0.0
        else:
            d1, d2, grad_scale, h = _directional(prob, v, step)
            expected = (4 * d1 - d2) / 3
            bound = 2 * _absmax(d1 - d2) + rounding * grad_scale / h
        expected_tree = prob.tree(expected)
        try:
            assert_hessian_close(actual, expected_tree, rtol=0.0, atol=bound / _scale(tree_flatten(expected_tree)[0]),
                                 msg=f"check_hvp vs finite differences, direction {k}")
        except AssertionError as err:
            raise _with_precision_hint(err, dtype) from None


def reference_jacobian(f: Callable[..., Any], *args: Any, argnums: int | tuple[int, ...] = 0, **kwargs: Any) -> PyTree:
    """The Jacobian by plain autograd, one `torch.autograd.grad` per output entry.

    Returns the tree product of f's output (a Tensor or a pytree of them) with the differentiated
    argument(s), as `funchess.jacrev(f, argnums)(*args, **kwargs)` does: leaf `(*out.shape,
    *arg.shape)` per (output leaf, argument leaf).

    Example:
        >>> import torch
        >>> from funchess.testing import reference_jacobian
        >>> reference_jacobian(lambda x: x ** 2, torch.tensor([1.0, 3.0]))
        tensor([[2., 0.],
                [0., 6.]])
    """
    _, leaves, rebuild, in_spec = _differentiated(args, argnums)
    in_shapes = [leaf.shape for leaf in leaves]
    with _plain_autograd():
        out = f(*rebuild(leaves), **kwargs)
        outs, out_spec = tree_flatten(out)
        out_shapes = [o.shape for o in outs]
        J = torch.zeros(offsets(out_shapes)[-1], offsets(in_shapes)[-1], dtype=promoted_dtype(leaves), device=leaves[0].device)
        row = 0
        for o in outs:
            for k in range(o.numel()):
                flat = o.reshape(-1)[k]
                grads = (
                    torch.autograd.grad(flat, leaves, retain_graph=True, allow_unused=True)
                    if flat.requires_grad
                    else [None] * len(leaves)
                )
                J[row] = torch.cat(
                    [(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for p, g in zip(leaves, grads)]
                )
                row += 1
    return blocks_of(J, (out_shapes, out_spec), (in_shapes, in_spec))


def reference_ggn(
    output_fn: Callable[..., Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    params: PyTree,
    *args: Any,
) -> PyTree:
    """The generalised Gauss-Newton matrix `Jᵀ H_z J` built from the slow references.

    `J` is `reference_jacobian(output_fn, params, *args)` (the output must be one Tensor `z`),
    `H_z` is `reference_hessian(loss_fn, z)` (the loss as a function of the output alone, e.g.
    `lambda z: F.cross_entropy(z, targets)`). Returns the Hessian-shaped block tree of
    `funchess.ggn`.

    Example:
        >>> import torch
        >>> from funchess.testing import reference_ggn
        >>> p = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> out = lambda p, x: x @ p["w"]
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> reference_ggn(out, lambda z: (z ** 2).sum(), p, x)["w"]["w"]
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    leaves, spec = tree_flatten(params)
    shapes = [leaf.shape for leaf in leaves]
    z = output_fn(params, *args).detach()
    J = reference_jacobian(output_fn, params, *args)
    J_flat = torch.cat([b.reshape(z.numel(), -1) for b in tree_flatten(J)[0]], 1)
    H = reference_hessian(loss_fn, z).reshape(z.numel(), z.numel())
    return blocks_of(J_flat.T @ H @ J_flat, (shapes, spec), (shapes, spec))
