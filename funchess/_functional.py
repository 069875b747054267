"""An `nn.Module` (plus a loss) as a pure function of a parameter dict."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ._errors import InvalidArgumentError

__all__ = ["functional", "ModuleFunction"]


def _check_float(call: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point() or t.is_complex():
        raise InvalidArgumentError(
            f"{call}: parameter {name!r} has dtype {t.dtype}; expected a real floating-point "
            f"Tensor. Convert the model (e.g. `model.double()`), or leave the parameter out "
            f"with `params=[...]`."
        )


def _closest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


class ModuleFunction:
    """The pure function that `funchess.functional` returns.

    With a loss: `f(params, inputs, targets=None)` returns `loss_fn(model(inputs), targets)` (or
    `loss_fn(model(inputs))` when `targets` is omitted); `inputs` is one Tensor, a tuple of
    positional inputs, or a dict of keyword inputs. Without a loss: `f(params, *inputs, **kwargs)`
    returns `model(*inputs, **kwargs)`.

    `params` may hold any subset of the model's parameters (by name); the rest, and all buffers,
    come from the module. Buffers are copied per call, so running statistics and counters of the
    model are never updated.

    Attributes:
        model: the wrapped module (never modified).
        loss_fn: the loss, or None.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Linear(3, 1)
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> f(params, torch.ones(4, 3), torch.zeros(4, 1)).shape
        torch.Size([])
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor] | None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self._known = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def __repr__(self) -> str:
        loss = getattr(self.loss_fn, "__name__", repr(self.loss_fn))
        return f"funchess.functional({type(self.model).__name__}, {loss})"

    def call_model(self, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """Run the model with `params` substituted (and copies of its buffers)."""
        if not isinstance(params, Mapping):
            raise InvalidArgumentError(
                f"{self!r}(params, ...): expected params to be a dict of Tensors keyed by "
                f"parameter name, got {type(params).__name__}. Pass the dict that "
                f"funchess.functional returned (or a dict shaped like it)."
            )
        unknown = [k for k in params if k not in self._known]
        if unknown:
            raise InvalidArgumentError(
                f"{self!r}(params, ...): params has key {unknown[0]!r}, which is not a parameter "
                f"of the model ({len(self._known)} parameters).{_closest(unknown[0], self._known)} "
                f"Use the names of model.named_parameters()."
            )
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        return functional_call(self.model, (dict(params), buffers), args, kwargs, strict=False)

    def output(self, params: Mapping[str, Tensor], inputs: Any) -> Any:
        """The model output for `inputs` packed as in `f(params, inputs, targets)`: one Tensor, a
        tuple of positional inputs, or a dict of keyword inputs (the loss is not applied)."""
        if isinstance(inputs, Mapping):
            return self.call_model(params, **inputs)
        if isinstance(inputs, (tuple, list)):
            return self.call_model(params, *inputs)
        return self.call_model(params, inputs)

    def __call__(self, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        if self.loss_fn is None:
            return self.call_model(params, *args, **kwargs)
        if not args or len(args) > 2 or kwargs:
            raise InvalidArgumentError(
                f"{self!r}(params, inputs, targets): expected the inputs and optionally the "
                f"targets, got {len(args)} positional and {len(kwargs)} keyword arguments. Call "
                f"f(params, inputs, targets); pack several model inputs into a tuple or dict."
            )
        out = self.output(params, args[0])
        return self.loss_fn(out) if len(args) == 1 else self.loss_fn(out, args[1])


def _select(call: str, model: nn.Module, patterns: str | Iterable[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())  # tied weights appear once, under their first name
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    if patterns is None:
        chosen = trainable
    else:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        for pat in pats:
            if not isinstance(pat, str):
                raise InvalidArgumentError(
                    f"{call}: expected params= to be parameter names or glob patterns (strings), "
                    f"got {type(pat).__name__}. Pass e.g. params=['0.weight', 'head.*']."
                )
            hits = fnmatch.filter(named, pat)
            if not hits:
                raise InvalidArgumentError(
                    f"{call}: params= pattern {pat!r} matches no parameter of the model."
                    f"{_closest(pat, named)} Names are those of model.named_parameters()."
                )
            frozen = [h for h in hits if h not in trainable]
            if len(frozen) == len(hits):
                raise InvalidArgumentError(
                    f"{call}: params= pattern {pat!r} matches only frozen parameters "
                    f"({', '.join(frozen[:3])}) with requires_grad=False. Set requires_grad=True "
                    f"on them, or drop the pattern."
                )
        chosen = {
            k: p for k, p in trainable.items() if any(fnmatch.fnmatchcase(k, pat) for pat in pats)
        }
    if not chosen:
        raise InvalidArgumentError(
            f"{call}: expected at least one trainable parameter, got none (the model has "
            f"{len(named)} parameters, none selected with requires_grad=True). Unfreeze some "
            f"parameters or check params=."
        )
    for k, p in chosen.items():
        _check_float(call, k, p)
    return {k: p.detach() for k, p in chosen.items()}


def functional(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    params: str | Iterable[str] | None = None,
) -> tuple[ModuleFunction, dict[str, Tensor]]:
    """Turn a module (and optionally a loss) into a pure function of a parameter dict.

    This is `torch.func.functional_call` packaged for curvature work: the result can be passed to
    `funchess.hessian`, `funchess.hvp`, `torch.func.grad`, `vmap`, ...

    Args:
        model: any `nn.Module`. It is never modified: no `.grad` is written, running statistics
            and other buffers are not updated (each call works on copies of the buffers), and the
            parameters are not touched.
        loss_fn: `loss_fn(output, targets)` returning a scalar, e.g.
            `torch.nn.functional.cross_entropy`. Without it, `f` returns the model output.
        params: which parameters to differentiate: names or glob patterns (`"encoder.*"`) matched
            against `model.named_parameters()`. Default: every parameter with `requires_grad`.
            Parameters left out (and frozen ones) keep the module's values.

    Returns:
        `(f, params)`: `f(params, inputs, targets)` with a loss (`f(params, *inputs)` without),
        and the dict of selected parameters, detached (they share memory with the model; funchess
        never writes to them), in `named_parameters()` order. Tied weights appear once.

    Raises:
        InvalidArgumentError: a pattern matches nothing, nothing is selected, or a selected
            parameter is not a real floating-point Tensor.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> list(params)
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> H = funchess.hessian(f)(params, x, y)
        >>> H["0.weight"]["2.bias"].shape
        torch.Size([8, 4, 3])
    """
    call = "funchess.functional(model, loss_fn, params=...)"
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{call}: expected a torch.nn.Module, got {type(model).__name__}. For a plain "
            f"function of tensors, pass it to funchess.hessian directly."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(
            f"{call}: expected loss_fn to be callable (e.g. torch.nn.functional.mse_loss), got "
            f"{type(loss_fn).__name__}."
        )
    selected = _select(call, model, params)
    return ModuleFunction(model, loss_fn), selected


