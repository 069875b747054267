"""The loss Hessian w.r.t. the model output, per sample, as a `Curvature` (columns, diagonal).

`output_curvature(loss_fn, z, targets, per_sample=...)` returns `H_n`, the block of sample `n` of
the Hessian of the loss w.r.t. the output `z` (batch on dim 0):

- closed forms for the losses whose Hessian is known:
  cross-entropy (`diag(p) - p pᵀ` per sample, factored as the columns `sqrt(p_c) (e_c - p)`;
  class-index targets with `weight=`, `ignore_index=`, `label_smoothing=`, or probability
  targets), MSE (a constant diagonal), BCE with logits (`sigmoid'(z)`, diagonal, with `weight=` and
  `pos_weight=`) and BCE on probabilities (`y/p² + (1-y)/(1-p)²`, diagonal);
- any other loss: the per-sample blocks from `2 D` Hessian-vector products of the loss in `z`
  (`D` entries per sample), after checking that the loss does not couple the samples (the blocks
  between different samples must vanish; else None: the caller takes a path without the
  per-sample structure), eigendecomposed into signed columns.

`per_sample=True` gives the Hessian of each sample's own loss (the loss of a batch of one, as in
`funchess.per_sample_hessian`); `per_sample=False` the sample's block of the batch loss (with a
mean reduction, `1/B` of it). With `samples=k`, `k` Monte-Carlo columns per sample whose outer
products average to `H_n`: drawn from the model's predictive distribution for cross-entropy (labels
from the softmax), MSE (Gaussian noise) and BCE with logits (Bernoulli labels); Rademacher-signed
square roots of the diagonal for the other diagonal losses; Gaussian combinations of the exact
columns for any other loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from .._compat import vjp
from ._curvature import Block, Curvature

_KINDS: dict[Any, str] = {
    F.cross_entropy: "ce",
    F.mse_loss: "mse",
    F.binary_cross_entropy_with_logits: "bce_logits",
    F.binary_cross_entropy: "bce",
}
_MODULES: dict[type[nn.Module], str] = {
    nn.CrossEntropyLoss: "ce",
    nn.MSELoss: "mse",
    nn.BCEWithLogitsLoss: "bce_logits",
    nn.BCELoss: "bce",
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ce": ("weight", "ignore_index", "reduction", "label_smoothing"),
    "mse": ("reduction",),
    "bce_logits": ("weight", "pos_weight", "reduction"),
    "bce": ("weight", "reduction"),
}


@dataclass
class LossSpec:
    """A loss whose output Hessian has a closed form: its kind and options."""

    kind: str
    weight: Tensor | None = None
    pos_weight: Tensor | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0


def recognise(loss_fn: Callable[..., Tensor]) -> LossSpec | None:
    """The closed-form loss behind `loss_fn` (a torch function, a `functools.partial` of one with
    keyword options, or a torch loss module), or None."""
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        kind, opts = _KINDS.get(loss_fn.func), dict(loss_fn.keywords)
    elif type(loss_fn) in _MODULES:
        module: nn.Module = loss_fn  # type: ignore[assignment]
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        kind = _MODULES[type(module)]
        opts = {k: getattr(module, k) for k in _OPTIONS[kind] if hasattr(module, k)}
    else:
        try:
            kind, opts = _KINDS.get(loss_fn), {}
        except TypeError:  # unhashable callables
            return None
    if kind is None or any(k not in _OPTIONS[kind] for k in opts):
        return None
    spec = LossSpec(kind, **opts)
    return spec if spec.reduction in ("mean", "sum") else None


def output_curvature(
    loss_fn: Callable[..., Tensor],
    z: Tensor,
    targets: Any,
    *,
    per_sample: bool,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Curvature | None:
    """`H_n` for every sample as a Curvature on `z.shape[1:]` (see the module docstring); None
    when the loss couples the samples."""
    z = z.detach()
    spec = recognise(loss_fn)
    curv = _closed_form(spec, z, targets, per_sample) if spec is not None else None
    if curv is None:
        curv = _generic(loss_fn, z, targets, per_sample)
        if curv is None:
            return None
    if samples is not None:
        return monte_carlo(spec, curv, z, targets, samples, generator)
    return curv


# ----------------------------------------------------------------------------- closed forms


def _closed_form(spec: LossSpec, z: Tensor, targets: Any, per_sample: bool) -> Curvature | None:
    if not isinstance(targets, Tensor) or z.dim() < 1 or z.shape[0] == 0:
        return None
    if spec.kind == "ce":
        return _cross_entropy(spec, z, targets, per_sample)
    if targets.shape != z.shape or not targets.is_floating_point():
        return None
    B, feat = z.shape[0], z.shape[1:]
    per_batch_numel = z.numel()
    if spec.reduction == "sum":
        scale = 1.0
    else:
        scale = 1.0 / (per_batch_numel // B if per_sample else per_batch_numel)
    if spec.kind == "mse":
        return Curvature(feat, diag=torch.full_like(z, 2.0 * scale))
    if spec.kind == "bce_logits":
        s = torch.sigmoid(z)
        d = s * (1 - s)
        if spec.pos_weight is not None:
            d = d * (spec.pos_weight * targets + 1 - targets)
    else:  # "bce": torch's backward divides by max(p (1 - p), 1e-12); stay off that clamp
        p = z
        if bool(((1 - p) * p < 1e-12).any()):
            return None
        d = targets / p.square() + (1 - targets) / (1 - p).square()
    if spec.weight is not None:
        d = d * spec.weight
    return Curvature(feat, diag=(d * scale).expand_as(z).contiguous())


def _cross_entropy(spec: LossSpec, z: Tensor, targets: Tensor, per_sample: bool) -> Curvature | None:
    if z.dim() != 2:
        return None  # class dimension with extra spatial dims: the generic factorisation
    B, C = z.shape
    eps = spec.label_smoothing
    if not targets.is_floating_point():
        if targets.shape != (B,):
            return None
        valid = targets != spec.ignore_index
        if spec.weight is None:
            v = valid.to(z.dtype)
        elif eps > 0:
            return None  # smoothing mixes in every class's weight: the generic path is exact
        else:
            v = torch.where(valid, spec.weight[targets.clamp(0, C - 1)], 0).to(z.dtype)
        if spec.reduction == "sum":
            scale = v
        elif per_sample:
            if not bool((v != 0).all()):
                return None  # a batch of one with weight 0 has loss 0/0: the generic path keeps its NaN
            scale = torch.ones_like(v)
        else:
            total = v.sum()
            if float(total) == 0:
                return None
            scale = v / total
    else:
        if targets.shape != z.shape:
            return None
        y = targets * (1 - eps) + eps / C
        a = (y * spec.weight).sum(1) if spec.weight is not None else y.sum(1)
        scale = a / B if spec.reduction == "mean" and not per_sample else a
    p = torch.softmax(z, 1)
    # columns sqrt(p_c) (e_c - p): sum_c of their outer products is diag(p) - p pᵀ
    S = p.sqrt().unsqueeze(2) * (torch.eye(C, dtype=z.dtype, device=z.device) - p.unsqueeze(1))
    return Curvature(z.shape[1:], [Block(S, scale.unsqueeze(1).expand(B, C))])


# ----------------------------------------------------------------------------- any other loss


def _loss_of(loss_fn: Callable[..., Tensor], targets: Any) -> Callable[[Tensor], Tensor]:
    return (lambda zz: loss_fn(zz)) if targets is None else (lambda zz: loss_fn(zz, targets))


def _generic(loss_fn: Callable[..., Tensor], z: Tensor, targets: Any, per_sample: bool) -> Curvature | None:
    B, feat = z.shape[0], z.shape[1:]
    D = z[0].numel()
    if per_sample:
        if targets is not None and not (isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] == B):
            return None

        def one(zn: Tensor, yn: Tensor | None) -> Tensor:
            return loss_fn(zn.unsqueeze(0)) if yn is None else loss_fn(zn.unsqueeze(0), yn.unsqueeze(0))

        H = vmap(jacrev(jacrev(one)), in_dims=(0, None if targets is None else 0))(z, targets)
        return eigen_blocks(H.reshape(B, D, D), feat)
    _, hvp = vjp(grad(_loss_of(loss_fn, targets)), z)
    basis = torch.eye(D, dtype=z.dtype, device=z.device).reshape(D, 1, *feat)
    ones = basis.expand(D, B, *feat)
    gen = torch.Generator(device=z.device).manual_seed(0)
    r = 1 + torch.rand(B, generator=gen, dtype=z.dtype, device=z.device).reshape(1, B, *([1] * len(feat)))
    H1 = vmap(hvp)(ones)[0]  # (D, B, *feat): column j of every sample's block, if separable
    H2 = vmap(hvp)(ones * r)[0]
    tol = torch.finfo(z.dtype).eps ** 0.5 * max(float(H1.abs().max()), torch.finfo(z.dtype).tiny)
    if not torch.allclose(H2, H1 * r, rtol=0.0, atol=tol):
        return None  # the loss couples the samples
    H = H1.reshape(D, B, D).permute(1, 2, 0)
    return eigen_blocks(H, feat)


def eigen_blocks(H: Tensor, feat: torch.Size) -> Curvature:
    """Per-sample symmetric `(B, D, D)` matrices as signed columns (their eigenpairs), dropping
    eigen-columns that vanish for every sample."""
    lam, U = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    keep = lam.abs().amax(0) > torch.finfo(H.dtype).eps * max(float(lam.abs().max()), torch.finfo(H.dtype).tiny)
    if not bool(keep.any()):
        keep[-1] = True
    S = U.transpose(1, 2)[:, keep]
    return Curvature(feat, [Block(S.reshape(H.shape[0], -1, *feat), lam[:, keep])])


# ----------------------------------------------------------------------------- Monte Carlo


def monte_carlo(
    spec: LossSpec | None, curv: Curvature, z: Tensor, targets: Any, k: int, generator: torch.Generator | None
) -> Curvature:
    """`k` random columns per sample whose weighted outer products average to `curv`."""
    B, feat = z.shape[0], z.shape[1:]
    kind = spec.kind if spec is not None else None
    if kind == "ce" and curv.blocks and len(curv.blocks) == 1 and curv.diag is None:
        p = torch.softmax(z, 1)
        draws = torch.multinomial(p, k, replacement=True, generator=generator)  # (B, k)
        S = p.unsqueeze(1) - F.one_hot(draws, z.shape[1]).to(z.dtype)
        w = curv.blocks[0].w
        scale = w[:, :1] if w is not None else torch.ones(B, 1, dtype=z.dtype, device=z.device)
        return Curvature(feat, [Block(S, (scale / k).expand(B, k))])
    out = Curvature(feat)
    if curv.diag is not None:
        d = curv.diag.unsqueeze(1)
        shape = (B, k, *feat)
        if kind == "mse":
            eps = torch.randn(shape, generator=generator, dtype=z.dtype, device=z.device)
            out = out + Curvature(feat, [Block(eps * d.sqrt(), _const(B, k, 1.0 / k, z))])
        elif kind == "bce_logits" and spec is not None and spec.pos_weight is None and bool((d >= 0).all()):
            s = torch.sigmoid(z).unsqueeze(1).expand(shape)
            y = torch.bernoulli(s, generator=generator)
            ratio = (d / (s * (1 - s))).nan_to_num(0.0)  # the weight and the reduction's scale
            out = out + Curvature(feat, [Block((s - y) * ratio.sqrt(), _const(B, k, 1.0 / k, z))])
        else:
            signs = torch.randint(0, 2, shape, generator=generator, device=z.device).to(z.dtype) * 2 - 1
            for sign in (1.0, -1.0):
                part = (sign * d).clamp(min=0)
                if bool((part > 0).any()):
                    out = out + Curvature(feat, [Block(signs * part.sqrt(), _const(B, k, sign / k, z))])
    for b in curv.blocks:
        S = b.S.expand(B, *b.S.shape[1:]).reshape(B, b.K, -1)
        w = b.w if b.w is not None else torch.ones(B, b.K, dtype=z.dtype, device=z.device)
        for sign in (1.0, -1.0):
            part = (sign * w).clamp(min=0)
            if not bool((part > 0).any()):
                continue
            eps = torch.randn(B, k, b.K, generator=generator, dtype=z.dtype, device=z.device)
            cols = (eps * part.sqrt().unsqueeze(1)) @ S
            out = out + Curvature(feat, [Block(cols.reshape(B, k, *feat), _const(B, k, sign / k, z))])
    return out


def _const(B: int, k: int, value: float, like: Tensor) -> Tensor:
    return torch.full((B, k), value, dtype=like.dtype, device=like.device)
