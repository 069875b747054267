"""An `nn.Module` (plus a loss) as a pure function of a parameter dict."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module
from torch.utils.data import DataLoader

from ._checks import closest
from ._errors import FunchessError, InvalidArgumentError, StructureError, UnsupportedError
from ._tree import tree_flatten

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


# ----------------------------------------------------------------------------- the model's errors

#: torch errors that arise from what reaches the model or the loss (not from a bug in the model):
#: they are re-raised as funchess errors naming the fix when the arguments show the cause.
_DTYPE = re.compile(r"dtype|scalar type|type \(\w+\) and (?:weight|bias) type", re.IGNORECASE)
_DEVICE = re.compile(r"device", re.IGNORECASE)
_SHAPE = re.compile(
    r"shapes? cannot be multiplied|size mismatch|must match the size|batch_size|expected input\[|"
    r"to have \d+ channels|input\.size\(-1\) must be equal|The size of tensor a|dimension out of range|"
    r"Expected \d+D|must be Tensor, not|out of bounds|index out of range|doesn't match the broadcast shape",
    re.IGNORECASE,
)
_CAUGHT = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _describe(tree: Any) -> str:
    shapes = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in _tensors(tree)]
    return ", ".join(shapes[:3]) + (", ..." if len(shapes) > 3 else "") if shapes else f"a {type(tree).__name__}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _model_error(call: str, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], inputs: Any,
                 exc: BaseException) -> FunchessError | None:
    """A funchess error for a torch error of the model's forward whose cause the arguments show
    (data of another dtype or device than the parameters, a shape the model cannot take, a data
    loader where one batch belongs), else None: the error is the model's own and stays as it is."""
    if isinstance(exc, FunchessError):
        return None
    text = _first_line(exc)
    data = _tensors(inputs)
    weights = [t for t in (*params.values(), *buffers.values()) if t.is_floating_point()]
    if isinstance(inputs, DataLoader) or any(isinstance(a, DataLoader) for a in tree_flatten(inputs)[0]):
        return InvalidArgumentError(
            f"{call}: expected one batch of inputs, got a DataLoader ({text}). For the curvature of a "
            f"whole data set use funchess.dataset_hessian / dataset_hvp / dataset_ggn, or "
            f"funchess.DatasetOperator(f, params, loader)."
        )
    want = weights[0].dtype if weights else None
    floats = sorted({str(t.dtype) for t in data if t.is_floating_point() and t.dtype != want})
    if want is not None and floats and _DTYPE.search(text):
        return InvalidArgumentError(
            f"{call}: the inputs have dtype {', '.join(floats)} but the model's parameters have "
            f"{want}; expected one floating dtype ({text}). Convert the data (x.to({want})), or the "
            f"model (model.to(dtype)) and call funchess.functional again."
        )
    devices = {t.device for t in (*data, *weights)}
    if len(devices) > 1 and _DEVICE.search(text):
        where = weights[0].device if weights else None
        return InvalidArgumentError(
            f"{call}: the inputs are on {', '.join(sorted({str(t.device) for t in data}))} but the "
            f"model's parameters are on {where}; expected one device ({text}). Move the data "
            f"(x.to('{where}')), or the model and its params."
        )
    if _SHAPE.search(text):
        return StructureError(
            f"{call}: the model cannot run on inputs of shape {_describe(inputs)}; expected inputs "
            f"shaped like a batch the model takes ({text}). Check the inputs' shapes (e.g. the "
            f"feature dimension of the first layer) and how they are packed: one Tensor, a tuple "
            f"of positional inputs, or a dict."
        )
    return None


def _loss_error(call: str, out: Any, targets: Any, exc: BaseException) -> FunchessError | None:
    """A funchess error for a torch error of the loss whose cause the targets show (class indices
    of another integer dtype than int64, floating targets of another dtype than the output,
    targets that do not match the output), else None."""
    if isinstance(exc, FunchessError):
        return None
    text = _first_line(exc)
    outs = [t for t in _tensors(out) if t.is_floating_point()]
    for t in _tensors(targets):
        if not t.is_floating_point() and t.dtype not in (torch.int64, torch.uint8, torch.bool) and _DTYPE.search(text):
            return InvalidArgumentError(
                f"{call}: the targets have dtype {t.dtype}; expected torch.int64 class indices, which "
                f"torch's classification losses take ({text}). Convert them: targets.long()."
            )
        if t.is_floating_point() and outs and t.dtype != outs[0].dtype and _DTYPE.search(text):
            return InvalidArgumentError(
                f"{call}: the targets have dtype {t.dtype} but the model output has {outs[0].dtype}; "
                f"expected one dtype ({text}). Convert the targets: targets.to({outs[0].dtype})."
            )
    if _SHAPE.search(text) or _DTYPE.search(text):
        return StructureError(
            f"{call}: the loss cannot take the model output ({_describe(out)}) with targets "
            f"({_describe(targets)}); expected targets that match the output ({text}). Pass the "
            f"batch's own targets (class indices in [0, classes) for a classification loss)."
        )
    return None


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
            try:
                return functional_call(self.model, (dict(params), buffers), args, kwargs, strict=False)
            except _CAUGHT as exc:
                error = _model_error(f"{self!r}(params, ...)", params, buffers, (args, kwargs), exc)
                if error is None:
                    raise
                raise error from exc

    def output(self, params: Mapping[str, Tensor], inputs: Any) -> Any:
        """The model output for `inputs` packed as in `f(params, inputs, targets)`: one Tensor, a
        tuple of positional inputs, or a dict (keywords or one positional argument, see
        `dict_inputs`); the loss is not applied."""
        first = next(iter(_tensors(inputs)), None)
        if first is not None and first.dim() > 0 and first.shape[0] == 0:
            raise InvalidArgumentError(
                f"{self!r}(params, inputs, targets): expected a batch of at least one sample, got "
                f"inputs of shape {tuple(first.shape)} (the loss of an empty batch is NaN or 0, "
                f"not a curvature). Pass a non-empty batch."
            )
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
        return self.loss(out, args[1]) if len(args) > 1 else self.loss(out)

    def loss(self, out: Any, *targets: Any) -> Any:
        """`loss_fn(out, *targets)`, with torch's errors about the targets told as funchess errors
        naming the fix."""
        assert self.loss_fn is not None
        try:
            return self.loss_fn(out, *targets)
        except _CAUGHT as exc:
            error = _loss_error(f"{self!r}(params, inputs, targets)", out, targets[0] if targets else None, exc)
            if error is None:
                raise
            raise error from exc


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


