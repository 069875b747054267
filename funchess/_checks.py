"""Validation at the public entry points, and the call labels every error message starts with.

One argument name has one meaning across the API (see `docs/architecture.md`), so it is checked by
one function here. Messages follow one pattern: the public call (`call_label`), what was
expected, what arrived, and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor

from ._compat import inside_transform
from ._errors import FunchessError, InvalidArgumentError, OutputError, StructureError, UnsupportedError
from ._tree import tree_flatten

PyTree = Any
Mode = Literal["auto", "rev-rev", "fwd-rev"]
ChunkSize = Union[int, Literal["auto"], None]  # noqa: UP007 (a runtime alias on Python 3.10)
Randomness = Literal["error", "same", "different"]
Reduction = Literal["mean", "sum"]

MODES: tuple[str, ...] = ("auto", "rev-rev", "fwd-rev")
RANDOMNESS: tuple[str, ...] = ("error", "same", "different")

#: The default of every option, by name (one meaning per name, so one default): a call label
#: shows only the options that differ from these.
DEFAULTS: dict[str, Any] = {
    "argnums": 0,
    "has_aux": False,
    "mode": "auto",
    "chunk_size": "auto",
    "sample_chunk_size": "auto",
    "blocks": None,
    "max_memory": None,
    "randomness": "error",
    "reduction": "mean",
    "progress": False,
    "loss_fn": None,
    "curvature": "hessian",
    "reuse": "auto",
}


def call_label(name: str, opts: dict[str, Any] | None = None, *, first: str = "f") -> str:
    """`funchess.name(f, opt=...)`, showing the options that differ from their defaults.

    Example:
        >>> call_label("hessian", {"mode": "fwd-rev", "chunk_size": "auto"})
        "funchess.hessian(f, mode='fwd-rev')"
    """
    shown = "".join(f", {k}={_show(k, v)}" for k, v in (opts or {}).items() if not _default(k, v))
    return f"funchess.{name}({first}{shown})"


def _default(name: str, value: Any) -> bool:
    if name not in DEFAULTS:
        return False
    if name.endswith("chunk_size") and value is None:  # torch.func's spelling of "auto"
        return True
    return bool(value is DEFAULTS[name] or (type(value) is type(DEFAULTS[name]) and value == DEFAULTS[name]))


def _show(name: str, value: Any) -> str:
    if isinstance(value, torch.Generator):  # its repr is an address
        return "<torch.Generator>"
    if callable(value) and not isinstance(value, (str, int, float)):
        return str(getattr(value, "__name__", type(value).__name__))
    return repr(value)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The `stacklevel` (for a `warnings.warn` in the caller of this function) of the first frame
    outside funchess: a warning about the user's input points at the user's line."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


_relay = threading.local()


def _user_frame() -> Any:
    """The first frame outside funchess (and the context-manager and dispatch machinery): the
    user's call."""
    frame = sys._getframe(1)
    skip = (_PACKAGE, os.path.abspath(contextlib.__file__), os.path.abspath(functools.__file__))
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame = frame.f_back
    return frame


@contextlib.contextmanager
def relayed_warnings() -> Iterator[None]:
    """Warnings raised while funchess evaluates the user's function (e.g. torch's "target size
    differs" from `mse_loss`) are collected and shown once per call, at the user's line, instead of
    once per evaluation site inside funchess. Entered once per public call (nested entries pass
    through); in threads other than the main one warnings are left as they are, since the warnings
    filters are process-wide."""
    if getattr(_relay, "active", False) or threading.current_thread() is not threading.main_thread():
        yield
        return
    frame = _user_frame()
    _relay.active = True
    failed = False
    try:
        with warnings.catch_warnings(record=True) as caught:  # the user's filters still decide what is caught
            yield
    except BaseException:
        failed = True
        raise
    finally:
        _relay.active = False
        seen: set[tuple[type[Warning], str, str]] = set()
        for w in caught:
            ours = os.path.abspath(w.filename).startswith(_PACKAGE)  # blamed on funchess: the user's line
            filename, lineno = (frame.f_code.co_filename, frame.f_lineno) if ours else (w.filename, w.lineno)
            key = (w.category, str(w.message), filename)
            if key in seen:
                continue
            seen.add(key)
            glob = frame.f_globals if ours else _module_globals(filename)
            try:
                warnings.warn_explicit(
                    w.message, w.category, filename, lineno or 0,
                    module=glob.get("__name__"), registry=glob.setdefault("__warningregistry__", {}),
                )
            except Warning:
                if not failed:  # a warning turned into an error by the user's filters
                    raise


def _module_globals(filename: str) -> dict[str, Any]:
    """The globals of the loaded module defined in `filename` (for the warnings filters' module
    patterns), or a fresh dict."""
    path = os.path.abspath(filename)
    for module in list(sys.modules.values()):
        if os.path.abspath(getattr(module, "__file__", None) or "") == path:
            return vars(module)
    return {}


def relays_warnings(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` under `relayed_warnings()`."""

    @functools.wraps(fn)
    def relaying(*args: Any, **kwargs: Any) -> Any:
        with relayed_warnings():
            return fn(*args, **kwargs)

    return relaying


def deprecated(message: str) -> None:
    """A `FutureWarning` (shown to users by default) at the user's line: a public name or meaning
    that changed, kept working for one release."""
    warnings.warn(message, FutureWarning, stacklevel=user_stacklevel())


def closest(name: str, choices: Iterable[str]) -> str:
    """" Did you mean 'a', 'b'?" for the choices closest to `name`, or ""."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


# ----------------------------------------------------------------------------- options


def check_callable(call: str, f: Any, what: str = "f") -> None:
    if isinstance(f, torch.nn.Module):
        raise InvalidArgumentError(
            f"{call}: expected {what} to be a function of the parameters, f(params, *data), got the "
            f"module {type(f).__name__}. Make one with f, params = funchess.functional(model, "
            f"loss_fn) (or pass `lambda x: model(x).sum()` to differentiate w.r.t. the inputs)."
        )
    if not callable(f):
        raise InvalidArgumentError(
            f"{call}: expected {what} to be a function, got {type(f).__name__}. Pass the loss function "
            f"(e.g. the first value of funchess.functional(model, loss_fn))."
        )
    if _takes_no_arguments(f):
        raise InvalidArgumentError(
            f"{call}: expected {what} to take the point to differentiate at as an argument, got a "
            f"function of no arguments. Make it a function of the parameters, e.g. "
            f"`lambda params: loss(params)` rather than `lambda: loss(params)`."
        )


def _takes_no_arguments(f: Any) -> bool:
    """Whether `f`'s signature takes no positional argument at all (then nothing can be
    differentiated); False when the signature cannot be read (builtins, some C extensions)."""
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return not any(p.kind in kinds for p in sig.parameters.values())


def check_mode(call: str, mode: Any, allowed: Sequence[str] = MODES) -> None:
    if mode not in allowed:
        raise InvalidArgumentError(
            f"{call}: expected mode to be one of {', '.join(map(repr, allowed))}, got {mode!r}. "
            f"Use mode='auto' unless you need a specific composition."
        )


def check_chunk_size(call: str, chunk_size: Any, name: str = "chunk_size") -> int | None:
    """None for "plan it" ("auto", or torch.func's spelling None), else the validated int."""
    if chunk_size is None or chunk_size == "auto":
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        what = "samples" if name == "sample_chunk_size" else "rows or vectors"
        raise InvalidArgumentError(
            f"{call}: expected {name} ({what} per vectorised pass) to be a positive int or 'auto', "
            f"got {chunk_size!r}. Pass e.g. {name}=64 (smaller uses less memory), or 'auto'."
        )
    return chunk_size


def check_randomness(call: str, randomness: Any, allowed: Sequence[str] = RANDOMNESS) -> None:
    if randomness not in allowed:
        fix = (
            "pass 'different' to give every sample its own dropout mask"
            if "different" in allowed
            else "pass 'same' to draw the random numbers once and use them in every pass"
        )
        raise InvalidArgumentError(
            f"{call}: expected randomness to be one of {', '.join(map(repr, allowed))}, got "
            f"{randomness!r}. Keep 'error' for a deterministic model (model.eval()); {fix}."
        )


def check_reduction(call: str, reduction: Any) -> None:
    if reduction not in ("mean", "sum"):
        raise InvalidArgumentError(
            f"{call}: expected reduction to be 'mean' or 'sum' (how the loss reduces over a "
            f"batch), got {reduction!r}. Pass the reduction your loss uses (PyTorch's default is "
            f"'mean')."
        )


def check_progress(call: str, progress: Any) -> None:
    if progress not in (True, False, None):
        raise InvalidArgumentError(
            f"{call}: expected progress to be True (show a bar), None (only on a terminal) or "
            f"False (never), got {progress!r}."
        )


def check_generator(call: str, generator: Any) -> torch.Generator | None:
    """`generator` must be None or a `torch.Generator` (for random draws that can be replayed)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(
            f"{call}: expected generator to be a torch.Generator or None, got "
            f"{type(generator).__name__}. Pass e.g. torch.Generator().manual_seed(0)."
        )
    return generator


def check_count(call: str, name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgumentError(
            f"{call}: expected {name} to be an int >= {least}, got {value!r}. Pass e.g. "
            f"{name}={max(least, 10)}."
        )
    return value


def check_positive(call: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(
            f"{call}: expected {name} to be a finite number {bound}, got {value!r}. Pass e.g. "
            f"{name}={'0.0' if allow_zero else '1e-3'}."
        )
    return float(value)


# ----------------------------------------------------------------------------- arguments


def argnums_of(call: str, argnums: Any, nargs: int) -> tuple[int, ...]:
    """`argnums` (an int or a tuple of ints, negative allowed) as sorted-free non-negative indices."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if (
        not isinstance(nums, tuple)
        or not nums
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in nums)
    ):
        raise InvalidArgumentError(
            f"{call}: expected argnums to be an int or a non-empty tuple of ints, got "
            f"{argnums!r}. Pass e.g. argnums=0 or argnums=(0, 1)."
        )
    out = []
    for i in nums:
        if not -nargs <= i < nargs:
            raise InvalidArgumentError(
                f"{call}: argnums={argnums!r} is out of range for the {nargs} positional "
                f"argument(s) given; expected indices in [{-nargs}, {nargs}). Pass the arguments "
                f"to differentiate positionally, or fix argnums."
            )
        out.append(i % nargs)
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"{call}: argnums={argnums!r} names an argument twice. Pass each index once.")
    return tuple(out)


def check_primals(call: str, primals: Sequence[Any], names: Sequence[str]) -> None:
    """Every differentiated argument is a non-empty pytree of real floating Tensors with values."""
    if not primals:
        raise InvalidArgumentError(
            f"{call}: expected at least one argument to differentiate, got none. Pass the point, e.g. "
            f"(params,) and a tangent shaped like it."
        )
    for primal, name in zip(primals, names):
        leaves, spec = tree_flatten(primal)
        if not leaves:
            raise InvalidArgumentError(
                f"{call}: {name} is an empty pytree ({spec}); there is nothing to differentiate. "
                f"Pass at least one parameter (check funchess.functional's params= selection "
                f"and requires_grad)."
            )
        for path, leaf in zip(spec.paths(), leaves):
            where = f"{name}{''.join(f'[{p!r}]' for p in path)}"
            if not isinstance(leaf, Tensor):
                raise InvalidArgumentError(
                    f"{call}: {where} is a {type(leaf).__name__}; expected a Tensor (every leaf "
                    f"of a differentiated argument must be one). Wrap numbers with torch.tensor."
                )
            if not leaf.is_floating_point() or leaf.is_complex():
                raise InvalidArgumentError(
                    f"{call}: {where} has dtype {leaf.dtype}; expected a real floating-point "
                    f"Tensor. Convert it (e.g. .double()), or leave it out of the "
                    f"differentiated arguments."
                )
            if leaf.is_meta:
                raise InvalidArgumentError(
                    f"{call}: {where} is on the meta device, which holds shapes but no values; "
                    f"expected a Tensor with values. Materialise the model first (e.g. "
                    f"model.to_empty(device='cpu') and load_state_dict), then funchess.functional again."
                )


def check_tangent(call: str, primal: PyTree, tangent: PyTree, pname: str = "params", tname: str = "v") -> None:
    """`tangent` has `primal`'s structure, and every leaf its shape and dtype."""
    p_leaves, p_spec = tree_flatten(primal)
    t_leaves, t_spec = tree_flatten(tangent)
    if p_spec != t_spec:
        raise StructureError(
            f"{call}: {tname} must have the structure of {pname}; expected {p_spec}, got {t_spec}. "
            f"Build it from {pname}, e.g. {{k: torch.randn_like(p) for k, p in params.items()}}."
        )
    for path, pl, tl in zip(p_spec.paths(), p_leaves, t_leaves):
        where = "".join(f"[{q!r}]" for q in path)
        if not isinstance(tl, Tensor) or tl.shape != pl.shape or tl.dtype != pl.dtype or tl.device != pl.device:
            got = (
                f"shape {tuple(tl.shape)}, dtype {tl.dtype} on {tl.device}" if isinstance(tl, Tensor) else f"a {type(tl).__name__}"
            )
            raise StructureError(
                f"{call}: {tname}{where} must match {pname}{where}: expected shape {tuple(pl.shape)}, "
                f"dtype {pl.dtype} on {pl.device}, got {got}. Build {tname} with torch.randn_like / "
                f"zeros_like of {pname}."
            )


def check_out(call: str, out: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """`out=` must be a contiguous Tensor of the result's shape, dtype and device, outside transforms."""
    if inside_transform():
        raise UnsupportedError(
            f"{call}: out= cannot be used inside torch.func transforms (vmap, grad, ...), which do "
            f"not allow writing into a buffer. Drop out= there."
        )
    got = (
        f"a {type(out).__name__}" if not isinstance(out, Tensor)
        else f"shape {tuple(out.shape)}, {out.dtype} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
    )
    if (
        not isinstance(out, Tensor) or tuple(out.shape) != shape or out.dtype != dtype
        or out.device != device or not out.is_contiguous()
    ):
        raise StructureError(
            f"{call}: expected out to be a contiguous Tensor of shape {shape} (samples, N, N), "
            f"{dtype} on {device}, got {got}. Allocate it once with torch.empty({', '.join(map(str, shape))}, "
            f"dtype={dtype}, device='{device}'), or drop out=."
        )


# ----------------------------------------------------------------------------- outputs


def split_aux(call: str, out: Any, has_aux: bool) -> tuple[Any, Any]:
    if not has_aux:
        return out, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} values"
        raise OutputError(
            f"{call}: with has_aux=True, f must return a pair (value, aux), got {got}. Return "
            f"`loss, aux` from f, or drop has_aux=True."
        )
    return out[0], out[1]


def check_scalar(call: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise OutputError(
            f"{call}: f must return a scalar Tensor, got a {type(value).__name__}. Return the "
            f"loss as a 0-dimensional Tensor (with has_aux=True for extra outputs)."
        )
    if value.dim() != 0:
        raise OutputError(
            f"{call}: f must return a scalar Tensor, got shape {tuple(value.shape)}. Reduce the "
            f"loss (e.g. `.mean()` or reduction='mean'), or use funchess.jacrev/jacfwd for "
            f"vector outputs."
        )
    if not value.is_floating_point() or value.is_complex():
        raise OutputError(
            f"{call}: f must return a real floating-point scalar, got dtype {value.dtype}. "
            f"Compute the loss in floating point."
        )
    return value


def relabel(call: str, exc: FunchessError) -> FunchessError:
    """`exc`, an error of an inner funchess call, told as `call`'s: same type, the inner message
    kept after the outer call (and a `MemoryBudgetError`'s plan kept)."""
    error = type(exc)(f"{call}: {exc}")
    if hasattr(exc, "plan"):
        error.plan = exc.plan  # type: ignore[attr-defined]
    return error


def labelled(call: str, exc: FunchessError) -> FunchessError:
    """`exc` told as `call`'s when it was raised where the call is not known (an operator refused
    inside f, `unlabelled`), else `exc` itself."""
    if not getattr(exc, "unlabelled", False):
        return exc
    return type(exc)(f"{call}: {str(exc).removeprefix('funchess: ')}")


def inplace_error(call: str, exc: BaseException) -> FunchessError | None:
    """A funchess error for torch's refusal of an in-place write by f into one of its inputs, else None."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or isinstance(exc, FunchessError):
        return None
    if "leaf Variable that requires grad is being used in an in-place operation" in text:
        return InvalidArgumentError(
            f"{call}: f writes in place into the argument it is differentiated with respect to; "
            f"expected f to leave it unchanged (torch.func refuses this too). Use the out-of-place "
            f"form (`p = p * 2` rather than `p.mul_(2)`), or clone it inside f first."
        )
    if "mutate a captured Tensor" in text:
        return UnsupportedError(
            f"{call}: f writes in place into a Tensor it does not differentiate (an argument outside "
            f"argnums, a buffer, or a tensor it closes over), which torch.func cannot do while it "
            f"differentiates; expected f to leave such tensors unchanged. Copy the tensor first "
            f"inside f (e.g. `y = y.clone()` before `y.copy_(x)`), or differentiate it too (argnums)."
        )
    return None


def call_f(call: str, h: Callable[..., Any], *args: Any) -> Any:
    """`h(*args)`, the user's function, with torch's refusal of its in-place writes into its inputs
    re-raised as a funchess error naming the call."""
    try:
        return h(*args)
    except FunchessError as exc:
        told = labelled(call, exc)
        if told is exc:
            raise
        raise told from None
    except RuntimeError as exc:
        error = inplace_error(call, exc)
        if error is None:
            raise
        raise error from exc


def scalar_output(call: str, h: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """`h` with its output checked: a real floating scalar (and aux with `has_aux`)."""

    def scalar(*primals: Any) -> Any:
        value, aux = split_aux(call, call_f(call, h, *primals), has_aux)
        value = check_scalar(call, value)
        return (value, aux) if has_aux else value

    return scalar
