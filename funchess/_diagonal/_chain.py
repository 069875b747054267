"""Models that are a chain of known modules: discovery, one recorded forward, one backward sweep.

`build_chain(f, params)` recognises `f = funchess.functional(model, loss_fn)` whose model is an
`nn.Sequential` (nested freely) of modules with a rule (`_rules_linear`, `_rules_nonlinear`), each
called plainly: no hooks, no parametrisations, no tied or repeated parameters, batch norm in eval
mode, dropout only in eval mode, an embedding only first. Anything else returns None and the
caller takes the generic path; the rules never guess.

`run_chain` records the forward (each module's input), the gradient of the loss at each module's
output (for the Hessian's residual terms), and the loss curvature at the output; then sweeps
backwards over slices of samples: at each module the curvature on its output gives its
parameters' diagonal, and is pulled to its input (plus the residual term for the Hessian). The
sweep stops at the lowest module with a wanted parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn.utils import parametrize

from .._functional import ModuleFunction
from ._checks import Budget
from ._curvature import Block, Curvature, as_factor, sample_slice
from ._losses import output_curvature
from ._rules_linear import ConvStep, EmbeddingStep, LinearStep
from ._rules_nonlinear import (
    ChannelAffineStep,
    ElementwiseStep,
    PositionwiseStep,
    PullbackStep,
    ReshapeStep,
)
from ._step import DENSE_MAX, Step

_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)
_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_RESHAPE: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity)
_PIECEWISE: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_LINEAR: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
_CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POSITIONWISE: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.Softmax, nn.LogSoftmax)


def _plain(m: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    """`m` is one of `kinds`, or a subclass that keeps its forward."""
    if type(m) in kinds:
        return True
    return any(isinstance(m, k) and type(m).forward is k.forward for k in kinds)


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        or parametrize.is_parametrized(m)
    )


def _global_hooks() -> bool:
    mod = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(bool(getattr(mod, n, None)) for n in names)


def _leaves(m: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]] | None:
    """The modules a (nested) plain Sequential calls, in order, with their name prefixes."""
    out: list[tuple[str, nn.Module]] = []
    if type(m) is nn.Sequential:
        if _hooked(m) or any(True for _ in m.parameters(recurse=False)):
            return None
        for name, child in m.named_children():
            sub = _leaves(child, f"{prefix}{name}.")
            if sub is None:
                return None
            out.extend(sub)
        return iter(out)
    return iter([(prefix, m)])


def _step(m: nn.Module, first: bool, local: dict[str, Tensor], selected: dict[str, str]) -> Step | None:
    """The rule for module `m`, or None when it has none (or is used in a way it does not cover)."""
    if _hooked(m):
        return None
    if _plain(m, (nn.Linear,)):
        return LinearStep(m, local, selected)
    if _plain(m, _CONV) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        return ConvStep(m, local, selected)
    if _plain(m, _ELEMENTWISE):
        return ElementwiseStep(m, local, selected)
    if _plain(m, _RESHAPE) or (_plain(m, _DROPOUT) and not m.training):
        return ReshapeStep(m, local, selected)
    if _plain(m, _BATCHNORM):
        bn: nn.modules.batchnorm._BatchNorm = m  # type: ignore[assignment]
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return None  # batch statistics couple the samples: the generic path
        return ChannelAffineStep(m, local, selected)
    if _plain(m, _POSITIONWISE):
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return PositionwiseStep(m, local, selected, 1) if m.dim is not None else None
        shape: tuple[int, ...] = tuple(getattr(m, "normalized_shape"))  # noqa: B009
        return PositionwiseStep(m, local, selected, len(shape))
    if _plain(m, _LINEAR) or (_plain(m, _PIECEWISE) and not getattr(m, "return_indices", False)):
        return PullbackStep(m, local, selected, linear=_plain(m, _LINEAR))
    if _plain(m, (nn.Embedding,)) and first:
        emb: nn.Embedding = m  # type: ignore[assignment]
        if emb.max_norm is None and not emb.scale_grad_by_freq:
            return EmbeddingStep(m, local, selected)
    return None


def build_chain(f: Any, params: dict[str, Tensor]) -> list[Step] | None:
    """The steps of `f`'s model, or None when it is not a chain of modules with rules."""
    if not isinstance(f, ModuleFunction) or not isinstance(params, dict) or _global_hooks():
        return None
    model = f.model
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in named}) != len(named):
        return None  # tied or repeated parameters: their diagonals mix modules
    leaves = _leaves(model, "")
    if leaves is None:
        return None
    steps: list[Step] = []
    found: set[str] = set()
    for i, (prefix, m) in enumerate(leaves):
        local, selected = {}, {}
        for name, p in m.named_parameters(recurse=True):
            key = prefix + name
            if key in params:
                local[name], selected[name] = params[key], key
                found.add(key)
            else:
                local[name] = p.detach()
        step = _step(m, i == 0, local, selected)
        if step is None:
            return None
        steps.append(step)
    if found != set(params) or not steps:
        return None
    return steps


#: The generic block engine's cost per Hessian row, in forwards of the model (a double backward
#: pass: forward, backward and their derivatives).
_GENERIC_COST = 4


@dataclass
class Options:
    """How a sweep runs."""

    hessian: bool  # add the residual terms (else the GGN)
    per_sample: bool  # each sample's own loss (else the batch loss), results per sample
    columns: bool = False  # return the per-sample factor columns instead of diagonals
    samples: int | None = None
    generator: torch.Generator | None = None
    chunk_size: int | None = None  # columns per pass in the parameters' rules
    sample_chunk_size: int | None = None
    budget: Budget | None = None  # the memory budget (None: no limit)


def _gradients(steps: list[Step], z: Tensor, loss_fn: Callable[..., Tensor], targets: Any, per_sample: bool, lo: int) -> list[Tensor]:
    """`g[l]`: the gradient of the loss at the output of step `l` (for `l > lo`)."""
    if per_sample:
        def one(zn: Tensor, yn: Any) -> Tensor:
            return loss_fn(zn.unsqueeze(0)) if yn is None else loss_fn(zn.unsqueeze(0), yn.unsqueeze(0))

        g = vmap(grad(one), in_dims=(0, None if targets is None else 0))(z, targets)
    else:
        zl = z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = loss_fn(zl) if targets is None else loss_fn(zl, targets)
            (g,) = torch.autograd.grad(value, zl)
    out = [g] * len(steps)
    for l in range(len(steps) - 1, lo, -1):
        out[l] = g
        g = steps[l].grad_in(g)
    return out


@dataclass
class Plan:
    """What a sweep costs per sample: the most entries its curvature holds, and its FLOPs."""

    entries: int
    flops: float


def plan_sweep(steps: list[Step], lo: int, K: int, diag: bool, hessian: bool) -> Plan:
    """An upper bound of the sweep's size and cost per sample, from the columns it will carry:
    each pull or parameter rule costs about one forward of the module per column."""
    peak, flops = 0, 0.0
    for l in range(len(steps) - 1, lo - 1, -1):
        s = steps[l]
        D_out, D_in = math.prod(s.feat_out), math.prod(s.feat_in)
        peak = max(peak, K * D_out + D_out)
        flops += (K + 1) * s.flops()
        if l == lo:
            break
        if diag and not s.keeps_diagonal:
            K, diag = K + D_out, False  # a diagonal through a mixing module becomes columns
        if hessian and isinstance(s, ElementwiseStep):
            diag = True
        if hessian and isinstance(s, PositionwiseStep):
            K += D_in
        peak = max(peak, K * D_in + D_in)
    return Plan(peak, flops)


def run_chain(
    steps: list[Step], loss_fn: Callable[..., Tensor], inputs: Tensor, targets: Any, opts: Options
) -> tuple[dict[str, Tensor], Tensor | None] | None:
    """Diagonals (or factor columns) keyed by the caller's parameter names, plus the factor's
    signs in column mode; None when the loss couples the samples (the caller's generic path)."""
    lo = min(i for i, s in enumerate(steps) if s.selected)
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        return None  # no samples: the generic path says so
    try:  # bad input (devices, dtypes, shapes, targets) fails here; the generic path names the fix
        with torch.no_grad():
            x = inputs
            for s in steps:
                if not isinstance(x, Tensor) or not s.applies(x):
                    return None
                y = s.forward(x)
                if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
                    return None  # a module that reduces over or reshapes the batch
                x = y
            z = x
            value = loss_fn(z) if targets is None else loss_fn(z, targets)
            if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
                return None  # not a scalar loss
            for s in steps[lo:]:
                s.prepare(opts.hessian)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    curv = output_curvature(loss_fn, z, targets, per_sample=opts.per_sample, samples=opts.samples, generator=opts.generator)
    if curv is None:
        return None
    g = _gradients(steps, z, loss_fn, targets, opts.per_sample, lo) if opts.hessian else []
    signs = None
    if opts.columns:
        S, signs = as_factor(curv)
        curv = Curvature(curv.feat, [Block(S, signs)])
    B = z.shape[0]
    sweep = plan_sweep(steps, lo, curv.K, curv.diag is not None, opts.hessian)
    per_sample_bytes = 3 * z.element_size() * sweep.entries
    budget = opts.budget
    if budget is not None and not budget.fits(per_sample_bytes):
        return None  # not even one sample's curvature fits: the generic path is memory-bounded
    if opts.hessian and sweep.flops > _GENERIC_COST * sum(p.numel() for s in steps for n, p in s.p.items() if n in s.selected) * sum(s.flops() for s in steps):
        return None  # more columns than Hessian rows would cost: the generic block engine is cheaper
    chunk_b = opts.sample_chunk_size or (budget.share(per_sample_bytes, B) if budget is not None else B)
    results: dict[str, Tensor] = {}
    with torch.no_grad():
        for b0 in range(0, B, chunk_b):
            b1 = min(B, b0 + chunk_b)
            part = _sweep(steps, lo, sample_slice(curv, b0, b1), g, slice(b0, b1), opts)
            for key, value in part.items():
                if opts.per_sample or opts.columns:
                    if key not in results:
                        results[key] = value.new_empty(B, *value.shape[1:])
                    results[key][b0:b1] = value
                else:
                    results[key] = value if key not in results else results[key] + value
    for s in steps:  # a parameter no curvature reached (a zero loss Hessian) has a zero diagonal
        for name, key in s.selected.items():
            if key not in results:
                lead = (B, curv.K) if opts.columns else (B,) if opts.per_sample else ()
                results[key] = s.p[name].new_zeros(*lead, *s.p[name].shape)
    return results, signs


def _sweep(steps: list[Step], lo: int, c: Curvature, g: list[Tensor], sl: slice, opts: Options) -> dict[str, Tensor]:
    b = sl.stop - sl.start
    out: dict[str, Tensor] = {}
    for l in range(len(steps) - 1, lo - 1, -1):
        s = steps[l]
        if c.dense is not None and (not s.accepts_dense or math.prod(s.feat_in) > DENSE_MAX):
            c = c.dense_as_blocks()
        if s.selected:
            chunk = functools.partial(_column_chunk, s, b, c.K, opts.budget, opts.chunk_size)
            read = c if s.reads_scaled else c.materialized()
            if opts.columns:
                parts: dict[str, Tensor] = {}
                for blk in read.blocks:
                    for name, G in s.param_columns(blk.S, sl).items():
                        G = G.expand(b, *G.shape[1:])
                        parts[name] = G if name not in parts else torch.cat([parts[name], G], 1)
            else:
                parts = s.param_diag(read, sl, opts.per_sample, chunk)
            for name, value in parts.items():
                out[s.selected[name]] = value
        if l == lo:
            break
        new = s.pull(c if s.pulls_scaled else c.materialized(), sl)
        if opts.hessian:
            r = s.residual(g[l][sl], sl)
            if r is not None:
                new = new + r
        c = new if opts.columns else _fit(new, steps, l - 1, lo, b)
    return out


def _fit(c: Curvature, steps: list[Step], l: int, lo: int, b: int) -> Curvature:
    """Hold the curvature at the input of step `l + 1` (the output of step `l`) densely when the
    next pull through a linear layer is cheaper that way: `K (O + I) > O I (O + I) / ...`, i.e.
    more columns than the layer's `O + I` (a dense pull costs `O I (O + I)` per sample, a column
    pull `K O I`). Elementwise modules in between keep either form; the lowest module only reads
    diagonals, which columns give cheaply."""
    if c.dense is not None:
        return c.to_dense(b) if (c.blocks or c.diag is not None) and steps[l].accepts_dense else c
    t = l
    while t > lo and steps[t].keeps_diagonal and steps[t].accepts_dense:
        t -= 1
    nxt = steps[t]
    if t == lo or not isinstance(nxt, LinearStep) or len(nxt.feat_out) > 1 or c.D > DENSE_MAX:
        return c
    if any(not steps[i].accepts_dense for i in range(t, l + 1)):
        return c
    K = c.K + (c.D if c.diag is not None else 0)
    return c.to_dense(b) if math.prod(nxt.feat_out) + math.prod(nxt.feat_in) < K else c


def _column_chunk(s: Step, b: int, K: int, budget: Budget | None, given: int | None) -> int:
    """Columns per pass in a parameter's rule (`chunk_size`, or what the budget allows: each
    column's per-sample gradients, squared); asked only by rules that form those gradients."""
    if given is not None:
        return given
    size = max(p.numel() for p in s.p.values()) if s.p else 1
    item = next(iter(s.p.values())).element_size() if s.p else 4
    return budget.share(4 * item * max(b * size, 1), max(K, 1)) if budget is not None else max(K, 1)
