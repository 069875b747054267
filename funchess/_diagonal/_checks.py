"""What the diagonal and factor functions check beyond the shared `_checks`: Monte-Carlo options,
the model's output and loss, and the memory budget (asked of the system only when needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import call_label, check_callable
from .._errors import InvalidArgumentError, OutputError
from .._functional import ModuleFunction
from .._memory import default_budget, parse_bytes


def label(name: str, opts: dict[str, Any]) -> str:
    """`call_label` for these functions: `samples` and `generator` shown only when given."""
    shown = {k: v for k, v in opts.items() if k not in ("samples", "generator") or v is not None}
    if isinstance(shown.get("generator"), torch.Generator):
        shown["generator"] = _Shown("<torch.Generator>")
    return call_label(name, shown)


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


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
            self._free = default_budget(self.device)
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


def split_model(
    call: str, f: Any, loss_fn: Callable[..., Tensor] | None
) -> tuple[Callable[[Any, Any], Any], Callable[..., Tensor], Callable[..., Tensor]]:
    """`(output(params, inputs), loss_fn, checked loss)` from a ModuleFunction or a model-output
    function; the checked loss tells torch's errors about the targets as funchess errors."""
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
    checked: Callable[..., Tensor] = f.loss if isinstance(f, ModuleFunction) and loss_fn is None else loss
    return output, loss, checked


def couples_samples(f: Any) -> bool:
    """Whether `f`'s model normalises with batch statistics (allowed with batch_norm='batch')."""
    return isinstance(f, ModuleFunction) and f.batch_statistics() is not None


def recurrent(f: Any) -> bool:
    """Whether the model has recurrent layers (torch.func.vmap has no batching rule for them)."""
    return isinstance(f, ModuleFunction) and any(isinstance(m, nn.RNNBase) for m in f.model.modules())


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
            f"{call}: loss_fn must return a scalar floating-point Tensor, got {got}. Reduce the "
            f"loss over the batch (reduction='mean' or 'sum')."
        )
