"""Validation for the diagonal and factor functions: call labels, options, params, the model.

(Candidates for the shared `_checks.py` of the house plan; kept here, small, until it exists.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import InvalidArgumentError, OutputError, UnsupportedError
from .._functional import ModuleFunction
from .._memory import available_bytes, parse_bytes
from .._tree import tree_flatten

_RANDOMNESS = ("error", "same", "different")
_DEFAULTS: dict[str, Any] = {
    "loss_fn": None, "samples": None, "generator": None, "chunk_size": "auto",
    "sample_chunk_size": "auto", "max_memory": None, "randomness": "error",
}
_DEFAULT_FRACTION = 0.8


def call_label(name: str, **opts: Any) -> str:
    """`funchess.name(f, opt=...)` with the options that differ from their defaults."""
    shown = "".join(
        f", {k}={_show(v)}" for k, v in opts.items() if not (v is _DEFAULTS.get(k) or (isinstance(v, str) and v == _DEFAULTS.get(k)))
    )
    return f"funchess.{name}(f{shown})"


def _show(v: Any) -> str:
    if callable(v) and hasattr(v, "__name__"):
        return str(v.__name__)
    if isinstance(v, torch.Generator):
        return "<generator>"
    return repr(v)


def check_callable(call: str, f: Any) -> None:
    if not callable(f):
        raise InvalidArgumentError(
            f"{call}: expected f to be a function, got {type(f).__name__}. Pass the loss function "
            f"from funchess.functional(model, loss_fn), or a function of (params, inputs)."
        )


def check_chunk(call: str, name: str, value: Any) -> int | None:
    """None for "plan it" ("auto" or None), else the positive int."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"{call}: expected {name} to be a positive int or 'auto', got {value!r}. Pass e.g. "
            f"{name}=32 (smaller uses less memory), or leave it 'auto'."
        )
    return value


def check_samples(call: str, samples: Any, generator: Any) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InvalidArgumentError(
            f"{call}: expected samples to be None (the exact GGN) or a positive int (Monte-Carlo "
            f"columns per sample), got {samples!r}. Pass e.g. samples=1."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(
            f"{call}: expected generator to be a torch.Generator or None, got "
            f"{type(generator).__name__}. Pass torch.Generator().manual_seed(0)."
        )


def check_randomness(call: str, randomness: Any) -> None:
    if randomness not in _RANDOMNESS:
        raise InvalidArgumentError(
            f"{call}: expected randomness to be one of {', '.join(map(repr, _RANDOMNESS))}, got "
            f"{randomness!r}. Keep 'error' for a deterministic model (model.eval()); pass "
            f"'different' to give every sample its own dropout mask."
        )


class Budget:
    """The memory budget: `max_memory`, or 80 % of the device's free memory, which is asked of the
    system only when a plan comes near `_SMALL` (reading it costs more than a small sweep)."""

    _SMALL = 64 * 2**20

    def __init__(self, call: str, max_memory: int | float | str | None, device: torch.device) -> None:
        self.fixed = None if max_memory is None else parse_bytes(call, max_memory)
        self.device = device
        self._free: int | None = None

    def value(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self._free is None:
            self._free = int(_DEFAULT_FRACTION * available_bytes(self.device))
        return self._free

    def fits(self, nbytes: int) -> bool:
        if self.fixed is None and nbytes <= self._SMALL:
            return True
        return nbytes <= self.value()

    def share(self, nbytes_each: int, most: int) -> int:
        """How many pieces of `nbytes_each` (at most `most`, at least 1) fit the budget at once."""
        if self.fits(nbytes_each * most):
            return most
        return max(1, min(most, self.value() // max(nbytes_each, 1)))


def check_params(call: str, params: Any) -> list[Tensor]:
    leaves, spec = tree_flatten(params)
    if not leaves:
        raise InvalidArgumentError(
            f"{call}: expected params to hold at least one Tensor, got an empty pytree ({spec}). "
            f"Pass the params dict from funchess.functional."
        )
    for path, leaf in zip(spec.paths(), leaves):
        where = "params" + "".join(f"[{p!r}]" for p in path)
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point() or leaf.is_complex():
            got = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
            raise InvalidArgumentError(
                f"{call}: expected {where} to be a real floating-point Tensor, got {got}. Convert "
                f"it (e.g. .double()), or leave it out of params."
            )
    return leaves


def split_model(
    call: str, f: Any, loss_fn: Callable[..., Tensor] | None
) -> tuple[Callable[[Any, Any], Any], Callable[..., Tensor]]:
    """`(output(params, inputs), loss_fn)` from a ModuleFunction or a model-output function."""
    check_callable(call, f)
    if isinstance(f, ModuleFunction):
        loss = loss_fn if loss_fn is not None else f.loss_fn
        output: Callable[[Any, Any], Any] = f.output
    else:
        loss, output = loss_fn, f
    if loss is None or not callable(loss):
        raise InvalidArgumentError(
            f"{call}: the GGN needs the model output and the loss separately; expected f from "
            f"funchess.functional(model, loss_fn), or f(params, inputs) returning the model "
            f"output together with loss_fn=..., got "
            f"{'no loss' if loss is None else type(loss).__name__ + ' as loss_fn'}. Pass "
            f"loss_fn=torch.nn.functional.cross_entropy (or your loss of (output, targets))."
        )
    return output, loss


def model_of(f: Any) -> nn.Module | None:
    return f.model if isinstance(f, ModuleFunction) else None


def coupling(f: Any) -> str | None:
    """A description of the first module whose output mixes the samples (batch statistics)."""
    model = model_of(f)
    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            state = "in train mode" if m.training else "with track_running_stats=False"
            return f"{type(m).__name__} {name!r} {state}"
    return None


def recurrent(f: Any) -> bool:
    """Whether the model has recurrent layers (torch.func.vmap has no batching rule for them)."""
    model = model_of(f)
    return model is not None and any(isinstance(m, nn.RNNBase) for m in model.modules())


def check_per_sample(call: str, f: Any) -> None:
    hit = coupling(f)
    if hit is not None:
        raise InvalidArgumentError(
            f"{call}: expected a model whose samples do not interact, got {hit}; its batch "
            f"statistics couple the samples, so per-sample quantities are undefined. Call "
            f"model.eval() (every batch norm then uses its running statistics), or use the batch "
            f"functions (funchess.hessian_diagonal, funchess.ggn_diagonal)."
        )


def check_output(call: str, z: Any) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() == 0 or not z.is_floating_point():
        got = f"shape {tuple(z.shape)}, {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
        raise OutputError(
            f"{call}: expected the model output to be a floating-point Tensor with the samples "
            f"along dim 0, got {got}. Return one output Tensor from the model (put several into "
            f"one, or wrap the model)."
        )
    return z


def check_loss(call: str, loss: Callable[..., Tensor], z: Tensor, targets: Any) -> None:
    """The loss of the outputs must be a real floating scalar."""
    with torch.no_grad():
        value = loss(z) if targets is None else loss(z, targets)
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        got = f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise OutputError(
            f"{call}: expected loss_fn(output, targets) to return a floating-point scalar, got "
            f"{got}. Reduce the loss over the batch (reduction='mean' or 'sum')."
        )


def random_error(call: str) -> UnsupportedError:
    return UnsupportedError(
        f"{call}: f draws random numbers (e.g. dropout in train mode) with randomness='error'; "
        f"expected a deterministic function. Call model.eval(), or pass randomness='different' "
        f"(each sample its own mask) or 'same' (one mask for all samples)."
    )


class RandomGuard:
    """With randomness="error", raise if the forward advanced the random number generator."""

    def __init__(self, call: str, randomness: str, device: torch.device) -> None:
        self.call, self.check = call, randomness == "error"
        self.cuda = device if device.type == "cuda" else None

    def _state(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.cuda is not None:
            states.append(torch.cuda.get_rng_state(self.cuda))
        return states

    def __enter__(self) -> RandomGuard:
        self.before = self._state() if self.check else []
        return self

    def __exit__(self, *exc: object) -> None:
        if self.check and exc[0] is None and any(not torch.equal(a, b) for a, b in zip(self.before, self._state())):
            raise random_error(self.call)
