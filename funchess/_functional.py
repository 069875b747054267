"""An `nn.Module` (plus a loss) as a pure function of a parameter dict."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module

from ._checks import closest
from ._errors import InvalidArgumentError, UnsupportedError

__all__ = ["functional", "ModuleFunction"]


def _check_float(call: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point() or t.is_complex():
        raise InvalidArgumentError(
            f"{call}: parameter {name!r} has dtype {t.dtype}; expected a real floating-point "
            f"Tensor. Convert the model (e.g. `model.double()`), or leave the parameter out "
            f"with `params=[...]`."
        )


DictInputs = Literal["auto", "keywords", "positional"]
BatchNorm = Literal["error", "batch"]
BackwardHooks = Literal["error", "skip"]


def _takes_keywords(model: nn.Module, keys: Iterable[str]) -> bool:
    """Whether `model.forward` can take every key as a keyword argument (HuggingFace's convention)
    rather than the dict as one positional argument (curvlinops' and many custom models')."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return True
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return set(keys) <= names


def _hooked(model: nn.Module) -> list[str]:
    """Modules (and "global") with backward hooks: torch.func cannot run the autograd.Function that
    full backward hooks insert, and old-style hooks would fire in every derivative pass."""
    names = [name or type(model).__name__ for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if _module._global_backward_hooks or _module._global_backward_pre_hooks:
        names.append("global (torch.nn.modules.module.register_module_full_backward_hook)")
    return names


@contextlib.contextmanager
def _without_backward_hooks(model: nn.Module) -> Iterator[None]:
    """Run the model with its modules' (and the global) backward hooks set aside, restoring them
    after. Hooks observe or change the gradients of training; the curvature is the loss's own."""
    saved = [(m, m._backward_hooks, m._backward_pre_hooks) for m in model.modules() if m._backward_hooks or m._backward_pre_hooks]
    glob = (_module._global_backward_hooks, _module._global_backward_pre_hooks)
    try:
        for m, _, _ in saved:
            m._backward_hooks, m._backward_pre_hooks = OrderedDict(), OrderedDict()
        _module._global_backward_hooks, _module._global_backward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, hooks, pre in saved:
            m._backward_hooks, m._backward_pre_hooks = hooks, pre
        _module._global_backward_hooks, _module._global_backward_pre_hooks = glob


class ModuleFunction:
    """The pure function that `funchess.functional` returns.

    With a loss: `f(params, inputs, targets=None)` returns `loss_fn(model(inputs), targets)` (or
    `loss_fn(model(inputs))` when `targets` is omitted); `inputs` is one Tensor, a tuple of
    positional inputs, or a dict (passed as keyword arguments when the model's `forward` takes
    its keys, HuggingFace's convention, else as one positional argument; see `dict_inputs`).
    Without a loss: `f(params, *inputs, **kwargs)` returns `model(*inputs, **kwargs)`.

    `params` may hold any subset of the model's parameters (by name); the rest, and all buffers,
    come from the module. Buffers are copied per call, so running statistics and counters of the
    model are never updated.

    Attributes:
        model: the wrapped module (never modified).
        loss_fn: the loss, or None.
        dict_inputs, batch_norm, backward_hooks: the options of `funchess.functional`.

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Linear(3, 1)
        >>> f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        >>> f(params, torch.ones(4, 3), torch.zeros(4, 1)).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor] | None,
        *,
        dict_inputs: DictInputs = "auto",
        batch_norm: BatchNorm = "error",
        backward_hooks: BackwardHooks = "error",
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.dict_inputs = dict_inputs
        self.batch_norm = batch_norm
        self.backward_hooks = backward_hooks
        self._known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        first: dict[int, str] = {}
        self._tied = {}  # alias -> the first name of the same tensor
        for name, p in model.named_parameters(remove_duplicate=False):
            self._tied[name] = first.setdefault(id(p), name)
        self._norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __repr__(self) -> str:
        loss = getattr(self.loss_fn, "__name__", repr(self.loss_fn))
        return f"funchess.functional({type(self.model).__name__}, {loss})"

    def batch_statistics(self) -> tuple[str, nn.Module] | None:
        """A batch-norm layer that normalises with the statistics of the batch (train mode, or no
        running statistics): its output couples the samples of a batch."""
        for name, m in self._norms:
            if m.training or m.running_mean is None:
                return name, m
        return None

    def check(self, call: str, *, per_sample: bool = False) -> None:
        """Refuse, with the fix, what a call cannot take silently: batch norm with batch
        statistics (unless `batch_norm="batch"`; never per sample) and backward hooks (unless
        `backward_hooks="skip"`)."""
        hit = self.batch_statistics()
        if hit is not None and (per_sample or self.batch_norm != "batch"):
            name, m = hit
            state = "in train mode" if m.training else "with track_running_stats=False"
            if per_sample:
                fix = (
                    "its batch statistics couple the samples, so per-sample quantities are undefined. "
                    "Expected every batch norm to use running statistics: call model.eval() (a "
                    "sample's loss is then one sample through the eval model); for the whole batch, "
                    "use the batch-level function with funchess.functional(..., batch_norm='batch')."
                )
            else:
                fix = (
                    "it normalises with the batch's statistics, which makes the loss a function of the "
                    "whole batch. Expected batch norms with running statistics: call model.eval(), or "
                    "pass funchess.functional(model, loss_fn, batch_norm='batch') to differentiate "
                    "the batch-statistics loss (running statistics are never updated)."
                )
            raise InvalidArgumentError(f"{call}: the model has {type(m).__name__} {name!r} {state}; {fix}")
        if self.backward_hooks == "error":
            hooked = _hooked(self.model)
            if hooked:
                raise UnsupportedError(
                    f"{call}: the model has backward hooks on {', '.join(map(repr, hooked[:3]))}"
                    f"{' and more' if len(hooked) > 3 else ''}; expected none, since torch.func cannot "
                    f"run the autograd.Function full backward hooks insert (and hooks would fire in "
                    f"every derivative pass). Pass funchess.functional(model, loss_fn, "
                    f"backward_hooks='skip') to run the model without them while funchess "
                    f"differentiates, or remove them (handle.remove())."
                )

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
                f"of the model ({len(self._known)} parameters).{closest(unknown[0], self._known)} "
                f"Use the names of model.named_parameters()."
            )
        seen: dict[str, str] = {}
        for k in params:
            twin = seen.setdefault(self._tied[k], k)
            if twin != k:
                raise InvalidArgumentError(
                    f"{self!r}(params, ...): params has both {twin!r} and {k!r}, two names of one tied "
                    f"parameter; expected each parameter once. Keep only {self._tied[k]!r} (the name "
                    f"funchess.functional returns)."
                )
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        hooks = _without_backward_hooks(self.model) if self.backward_hooks == "skip" else contextlib.nullcontext()
        with hooks:
            return functional_call(self.model, (dict(params), buffers), args, kwargs, strict=False)

    def output(self, params: Mapping[str, Tensor], inputs: Any) -> Any:
        """The model output for `inputs` packed as in `f(params, inputs, targets)`: one Tensor, a
        tuple of positional inputs, or a dict (keywords or one positional argument, see
        `dict_inputs`); the loss is not applied."""
        if isinstance(inputs, Mapping):
            keywords = (
                self.dict_inputs == "keywords"
                or (self.dict_inputs == "auto" and _takes_keywords(self.model, inputs.keys()))
            )
            return self.call_model(params, **inputs) if keywords else self.call_model(params, inputs)
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
                    f"{closest(pat, named)} Names are those of model.named_parameters()."
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
    dict_inputs: DictInputs = "auto",
    batch_norm: BatchNorm = "error",
    backward_hooks: BackwardHooks = "error",
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
        dict_inputs: how a dict of inputs reaches `forward`: "keywords" (`model(**inputs)`,
            HuggingFace's convention), "positional" (`model(inputs)`), or "auto" (default):
            keywords when `forward` takes every key (or `**kwargs`), else positional.
        batch_norm: "error" (default): every funchess call refuses a model whose batch norms
            normalise with the batch's statistics (train mode, or no running statistics), since
            the loss then couples the samples; call `model.eval()`. "batch": batch-level calls
            differentiate that batch-statistics loss (running statistics are never updated);
            per-sample calls refuse it always.
        backward_hooks: "error" (default): refuse a model with module backward hooks (torch.func
            cannot run full backward hooks); "skip": run the model without them while funchess
            differentiates (they are restored after each call).

    Returns:
        `(f, params)`: `f(params, inputs, targets)` with a loss (`f(params, *inputs)` without),
        and the dict of selected parameters, detached (they share memory with the model; funchess
        never writes to them), in `named_parameters()` order. Tied weights appear once.

    Raises:
        InvalidArgumentError: a pattern matches nothing, nothing is selected, a selected
            parameter is not a real floating-point Tensor, or a bad option.

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
    call = "funchess.functional(model, loss_fn)"
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # the wrapped model: the wrapper's hooks reduce gradients of training
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
    for name, value, allowed in (
        ("dict_inputs", dict_inputs, ("auto", "keywords", "positional")),
        ("batch_norm", batch_norm, ("error", "batch")),
        ("backward_hooks", backward_hooks, ("error", "skip")),
    ):
        if value not in allowed:
            raise InvalidArgumentError(
                f"{call}: expected {name} to be one of {', '.join(map(repr, allowed))}, got {value!r}."
                f"{closest(str(value), allowed)}"
            )
    selected = _select(call, model, params)
    return ModuleFunction(model, loss_fn, dict_inputs=dict_inputs, batch_norm=batch_norm, backward_hooks=backward_hooks), selected


