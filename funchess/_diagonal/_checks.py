"""What the diagonal and factor functions check beyond the shared `_checks`: Monte-Carlo options
and the model's kind (batch statistics, recurrent layers)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._checks import call_label, check_generator
from .._errors import InvalidArgumentError
from .._functional import ModuleFunction


def label(name: str, opts: dict[str, Any]) -> str:
    """`call_label` for these functions: `samples` and `generator` shown only when given."""
    return call_label(name, {k: v for k, v in opts.items() if k not in ("samples", "generator") or v is not None})


def check_samples(call: str, samples: Any, generator: Any) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InvalidArgumentError(
            f"{call}: expected samples to be None (the exact GGN) or a positive int (Monte-Carlo "
            f"columns per sample), got {samples!r}. Pass e.g. samples=1."
        )
    check_generator(call, generator)


def couples_samples(f: Any) -> bool:
    """Whether `f`'s model normalises with batch statistics (allowed with batch_norm='batch')."""
    return isinstance(f, ModuleFunction) and f.batch_statistics() is not None


def recurrent(f: Any) -> bool:
    """Whether the model has recurrent layers (torch.func.vmap has no batching rule for them)."""
    return isinstance(f, ModuleFunction) and any(isinstance(m, nn.RNNBase) for m in f.model.modules())
