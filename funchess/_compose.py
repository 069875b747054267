"""The pieces every transform is composed of: the gradient as a function, running a composition
(with "auto"'s fallback, decided per call), translating torch's errors, and the random number
generator's guard and replay.

- `gradient(h, ...)`: the gradient of a scalar function as a function (`torch.func.vjp` of it),
  optionally under a size-one `vmap` for forward mode (see its docstring).
- `run_modes(call, mode, runners)`: run "rev-rev" or "fwd-rev"; under "auto" the first that works.
  Nothing is remembered between calls (as no torch.func transform keeps state).
- `RandomState`: one snapshot of the CPU (and CUDA) generators; `guard` refuses a function that
  drew random numbers (randomness="error"), `replay` restores the snapshot before each pass so
  every pass of one call sees the same draws (randomness="same"/"different").
- `differentiable()`: grad mode on and inference mode off while funchess differentiates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import inplace_error, scalar_output
from ._compat import vjp
from ._errors import UnsupportedError
from ._functional import ModuleFunction
from ._safe_ops import safe_ops
from ._tree import tree_map

PyTree = Any
FALLBACK_ORDER: tuple[str, ...] = ("rev-rev", "fwd-rev")

# Messages torch raises when an operator has no rule for the derivative a composition needs.
_MISSING_RULE = re.compile(
    r"derivative for .* is not implemented|Trying to use forward AD with|"
    r"not implemented for forward AD|does not support forward AD|"
    r"does not have a (?:double backward|derivative)|No forward AD formula|"
    r"Batching rule not implemented|doesn't support double backward|"
    r"does not support double backward",
    re.IGNORECASE,
)
_RANDOM = re.compile(r"random operation while in randomness error mode", re.IGNORECASE)
_TORCH_DIR = os.path.dirname(torch.__file__)


# ----------------------------------------------------------------------------- gradients


def with_primals(
    f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], nums: tuple[int, ...]
) -> Callable[..., Any]:
    """`h(*primals)`: `f(*args, **kwargs)` with `args[nums[k]]` replaced by `primals[k]`."""

    def h(*primals: Any) -> Any:
        full = list(args)
        for i, p in zip(nums, primals):
            full[i] = p
        return f(*full, **kwargs)

    return h


def gradient(
    h: Callable[..., Any], call: str, has_aux: bool, single: bool, *, for_jvp: bool = False
) -> Callable[..., Any]:
    """The gradient of scalar `h` w.r.t. all its arguments, as a function (plus aux).

    With `for_jvp`, the pullback runs under a `vmap` of size one: differentiating the plain
    pullback in forward mode crashes for some losses ("ZeroTensors are immutable" in
    `mse_loss_backward`, pytorch#123996; no forward rule for `huber_loss_backward`), while their
    batched forms decompose into operators that have forward rules. This is what `jacrev` does too.
    """
    scalar = scalar_output(call, h, has_aux)

    def g(*primals: Any) -> Any:
        if has_aux:
            value, pullback, aux = vjp(scalar, *primals, has_aux=True)
        else:
            (value, pullback), aux = vjp(scalar, *primals), None
        if for_jvp:
            grads = tree_map(lambda t: t[0], vmap(pullback)(torch.ones_like(value).unsqueeze(0)))
        else:
            grads = pullback(torch.ones_like(value))
        grads = grads[0] if single else grads
        return (grads, aux) if has_aux else grads

    return g


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Inference mode off (under `torch.inference_mode()` nothing can be differentiated, and
    `torch.enable_grad()` alone does not leave it). Grad mode stays the caller's: torch.func's
    transforms differentiate under an outer `torch.no_grad()` and then return results that carry
    no graph, as the caller asked; plain-autograd paths turn grad mode on for themselves. (Leaving
    inference mode turns grad mode on, so the caller's is set back inside.)"""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def check_function(call: str, f: Any, *, per_sample: bool = False) -> None:
    """What a call refuses about a model made by `funchess.functional`: batch statistics and
    backward hooks (see `ModuleFunction.check`). Other functions are checked as they run."""
    if isinstance(f, ModuleFunction):
        f.check(call, per_sample=per_sample)


def usable(tree: PyTree) -> PyTree:
    """Inference tensors (made under `torch.inference_mode()`) cannot be saved for backward:
    normal copies of them; every other leaf as it is."""
    def normal(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.is_inference():
            return t
        with torch.inference_mode(False):  # a clone made inside inference mode is an inference tensor
            return t.clone()

    return tree_map(normal, tree)


# ----------------------------------------------------------------------------- running modes


def _raised_by_torch(exc: BaseException) -> bool:
    """Whether `exc` came out of torch (a derivative rule torch lacks) rather than the user's own
    code: the innermost frame of its traceback is in torch's package."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_TORCH_DIR)


def missing_rule(exc: BaseException) -> bool:
    """A torch error saying an operator has no rule for the derivative a composition needs."""
    return (
        isinstance(exc, (RuntimeError, NotImplementedError))
        and bool(_MISSING_RULE.search(str(exc)))
        and _raised_by_torch(exc)
    )


def random_error(call: str, exc: BaseException, fix: str | None = None) -> UnsupportedError | None:
    """An UnsupportedError for torch's vmap randomness error (or funchess's guard), else None."""
    if isinstance(exc, (RuntimeError, NotImplementedError)) and _RANDOM.search(str(exc)):
        return UnsupportedError(
            f"{call}: f draws random numbers (e.g. dropout in train mode) with "
            f"randomness='error'; expected a deterministic function. Call model.eval(), or pass "
            + (fix or "randomness='same' (the random numbers are drawn once and every pass of the call replays them)")
            + "."
        )
    return None


def _translate(call: str, mode: str, exc: BaseException) -> BaseException | None:
    """A FunchessError for a torch error we understand, else None (re-raise as is)."""
    translated = random_error(call, exc)
    if translated is not None:
        return translated
    inplace = inplace_error(call, exc)  # f writing into its inputs (a pass that did not go through call_f)
    if inplace is not None:
        return inplace
    if missing_rule(exc):
        other = [m for m in FALLBACK_ORDER if m != mode]
        fix = f"Try mode={other[0]!r} or mode='auto', or replace" if mode in FALLBACK_ORDER else "Replace"
        return UnsupportedError(
            f"{call}: an operator in f has no rule for mode {mode!r}: {str(exc).splitlines()[0]} "
            f"{fix} the operator by differentiable torch operations."
        )
    return None


def run_modes(
    call: str,
    mode: str,
    runners: dict[str, Callable[[], Any]],
    order: Sequence[str] = FALLBACK_ORDER,
    safe: bool = True,
) -> Any:
    """Run `mode`, or under "auto" the first of `order` that works (decided afresh every call);
    with `safe`, under funchess's operator rerouting, always with grad on."""
    modes = tuple(order) if mode == "auto" else (mode,)
    failures: list[str] = []
    # the context managers cost more than a small product: entered only when they change something
    plain = not safe and not torch.is_inference_mode_enabled()
    for m in modes:
        try:
            if plain:
                return runners[m]()
            with differentiable(), safe_ops(safe):
                return runners[m]()
        except (RuntimeError, NotImplementedError) as exc:
            if mode == "auto" and missing_rule(exc) and m != modes[-1]:
                failures.append(f"{m}: {str(exc).splitlines()[0]}")
                continue
            translated = _translate(call, m, exc)
            if translated is None:
                raise
            if failures and missing_rule(exc):
                raise UnsupportedError(
                    f"{call}: no composition can differentiate f twice; expected an operator "
                    f"with a double-backward or forward-mode rule, got "
                    f"{'; '.join(failures)}; {m}: {str(exc).splitlines()[0]} Replace the "
                    f"operator by differentiable torch operations."
                ) from exc
            raise translated from exc
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- random numbers


def _raw(state: Tensor) -> bytes:
    """A generator state's bytes (a contiguous CPU uint8 Tensor): comparing them costs less than
    `torch.equal`'s dispatch, and needs no NumPy."""
    return ctypes.string_at(state.data_ptr(), state.numel())


class RandomState:
    """The random number generators funchess watches: the CPU one, and the CUDA one of `device`.

    `guard(call)` (randomness="error") raises if the block drew random numbers; `replay()`
    (after `save()`) restores the saved state, so the next pass draws what the first one drew.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.saved: list[Tensor] | None = None

    def _state(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.cuda is not None:
            states.append(torch.cuda.get_rng_state(self.cuda))
        return states

    def _set(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(states[1], self.cuda)

    def save(self) -> None:
        self.saved = self._state()

    def replay(self) -> None:
        if self.saved is not None:
            self._set(self.saved)

    def snapshot(self) -> list[Tensor]:
        """The generators' states now, for `refuse_draws` (the guard without a context manager)."""
        return self._state()

    def _moved(self, before: list[Tensor]) -> bool:
        return any(_raw(a) != _raw(b) for a, b in zip(before, self._state()))

    def put_back(self, before: list[Tensor]) -> None:
        """Restore the generators to `before` if they moved (a call that failed draws nothing)."""
        if self._moved(before):
            self._set(before)

    def refuse_draws(self, call: str, before: list[Tensor], fix: str | None = None) -> None:
        """Raise an UnsupportedError if a generator moved since `snapshot()` returned `before`
        (e.g. dropout in train mode), putting it back, so the failed call draws nothing."""
        if self._moved(before):
            self._set(before)
            error = random_error(call, RuntimeError("random operation while in randomness error mode"), fix)
            assert error is not None
            raise error

    @contextlib.contextmanager
    def guard(self, call: str, fix: str | None = None) -> Iterator[None]:
        """Raise an UnsupportedError if the block advanced a generator (e.g. dropout in train
        mode); the generators are put back as they were, so a refused call draws nothing (also
        when an inner call refused first)."""
        before = self._state()
        try:
            yield
        except BaseException:
            self.put_back(before)
            raise
        self.refuse_draws(call, before, fix)


@contextlib.contextmanager
def random_errors(call: str, fix: str | None = None) -> Iterator[None]:
    """Re-raise torch's vmap randomness error as an UnsupportedError naming the fix."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        translated = random_error(call, exc, fix)
        if translated is None:
            raise
        raise translated from exc
