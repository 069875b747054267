"""Rules for modules nonlinear in their input, and for parameter-free reshapes and poolings.

- `ElementwiseStep` (Tanh, ReLU, GELU, ...): the Jacobian is `diag(σ'(x))`, the residual
  `diag(g σ''(x))`; a diagonal curvature stays diagonal. `σ'`, `σ''` come in closed form for Tanh,
  Sigmoid, ReLU and LeakyReLU and from plain autograd (two backward passes of the sum, exact for an
  elementwise map) for the others.
- `ReshapeStep` (Flatten, Unflatten, Identity, Dropout in eval mode).
- `ChannelAffineStep` (BatchNorm in eval mode): a per-channel affine map of the input.
- `PositionwiseStep` (LayerNorm, RMSNorm, Softmax / LogSoftmax over the last dim): a map of each
  position's last `E` entries; its `E x E` Jacobian and residual per position come from `E`
  vectorised vector-Jacobian and Hessian-vector products, all positions and samples at once.
- `PullbackStep` (pooling, padding, upsampling, pixel shuffles): linear or piecewise linear, no
  residual; columns pass through the module's vector-Jacobian product, vectorised over columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from .._compat import vjp
from .._safe_ops import SecondOrderSafe
from ._curvature import Block, Curvature
from ._step import DENSE_MAX, Scaled, Step


class ElementwiseStep(Step):
    """An activation applied entry by entry."""

    accepts_dense = True
    keeps_diagonal = True
    pulls_scaled = True

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str]) -> None:
        super().__init__(module, local, selected)
        self.y = torch.empty(0)
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None

    def compute(self, x: Tensor) -> Tensor:
        # an in-place activation (inplace=True) would overwrite the recorded input
        self.y = self.module(x.clone() if getattr(self.module, "inplace", False) else x)
        return self.y

    def prepare(self, hessian: bool) -> None:
        x, y, m = self.x, self.y, self.module
        kind = type(m)
        if kind is nn.Tanh:
            self.s1 = 1 - y.square()
            self.s2 = -2 * y * self.s1 if hessian else None
        elif kind is nn.Sigmoid:
            self.s1 = y * (1 - y)
            self.s2 = self.s1 * (1 - 2 * y) if hessian else None
        elif kind is nn.ReLU:
            self.s1 = (x > 0).to(x.dtype)  # torch's threshold_backward: zero at x == 0
        elif kind is nn.LeakyReLU:
            slope = float(getattr(m, "negative_slope"))  # noqa: B009 (typed loosely on purpose)
            self.s1 = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))
        else:
            self.s1, self.s2 = _autograd_derivatives(m, x, hessian)

    def grad_in(self, g: Tensor) -> Tensor:
        assert self.s1 is not None
        return g * self.s1

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        assert self.s1 is not None
        s1 = self.s1[sl]
        blocks = [_scaled(b, s1) for b in c.blocks]
        diag = None if c.diag is None else c.diag * s1.square()
        dense = None
        if c.dense is not None:
            f = s1.reshape(s1.shape[0], -1)
            dense = c.dense * f.unsqueeze(2) * f.unsqueeze(1)
        return Curvature(self.feat_in, blocks, diag, dense)

    def residual(self, g: Tensor, sl: slice) -> Curvature | None:
        if self.s2 is None:
            return None
        return Curvature(self.feat_in, diag=g * self.s2[sl])


def _scaled(b: Block, s: Tensor) -> Block:
    """Block `b` times the per-sample entrywise factor `s` (`(b, *feat)` or broadcastable):
    shared columns keep being shared, with the factor in their scaling."""
    if b.shared and s.shape[0] != 1:
        return Block(b.S, b.w, s if b.r is None else b.r * s)
    return Block(b.S * s.unsqueeze(1), b.w, b.r)


def _autograd_derivatives(m: nn.Module, x: Tensor, hessian: bool) -> tuple[Tensor, Tensor | None]:
    """`σ'(x)`, `σ''(x)` of an elementwise module: derivatives of `sum σ(x)` (exact, since entry
    `i` of the sum's gradient depends on `x_i` alone)."""
    xl = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = m(xl * 1)  # a non-leaf copy: in-place activations may write into it
        (s1,) = torch.autograd.grad(y, xl, torch.ones_like(y), create_graph=hessian)
        s2 = None
        if hessian and s1.requires_grad:
            (s2,) = torch.autograd.grad(s1, xl, torch.ones_like(s1), allow_unused=True)
    return s1.detach(), None if s2 is None else s2.detach()


class ReshapeStep(Step):
    """A module that only rearranges (or passes on) the entries of each sample."""

    accepts_dense = True
    keeps_diagonal = True

    def compute(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x)
        return out

    def grad_in(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], *self.feat_in)

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        blocks = [Block(b.S.reshape(*b.S.shape[:2], *self.feat_in), b.w) for b in c.blocks]
        diag = None if c.diag is None else c.diag.reshape(-1, *self.feat_in)
        return Curvature(self.feat_in, blocks, diag, c.dense)


class ChannelAffineStep(Step):
    """`nn.BatchNorm1d/2d/3d` in eval mode with running statistics: per channel,
    `y = (x - mean) / sqrt(var + eps) * weight + bias`."""

    accepts_dense = True
    keeps_diagonal = True
    pulls_scaled = True

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str]) -> None:
        super().__init__(module, local, selected)
        self.rules = {name: Scaled((0,), local[name].shape) for name in local}

    def compute(self, x: Tensor) -> Tensor:
        m: nn.modules.batchnorm._BatchNorm = self.module  # type: ignore[assignment]
        return F.batch_norm(x, m.running_mean, m.running_var, self.p.get("weight"), self.p.get("bias"), False, 0.0, m.eps)

    def _channel(self, t: Tensor) -> Tensor:
        return t.reshape(-1, *([1] * (len(self.feat_in) - 1)))

    def _scale(self) -> Tensor:
        m: nn.modules.batchnorm._BatchNorm = self.module  # type: ignore[assignment]
        assert m.running_var is not None
        inv = torch.rsqrt(m.running_var + m.eps)
        w = self.p.get("weight")
        return self._channel(inv if w is None else inv * w)

    def _normalised(self, sl: slice) -> Tensor:
        m: nn.modules.batchnorm._BatchNorm = self.module  # type: ignore[assignment]
        assert m.running_mean is not None and m.running_var is not None
        return (self.x[sl] - self._channel(m.running_mean)) * self._channel(torch.rsqrt(m.running_var + m.eps))

    def grad_in(self, g: Tensor) -> Tensor:
        return g * self._scale()

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        a = self._scale()
        blocks = [Block(b.S * a, b.w, b.r) for b in c.blocks]
        diag = None if c.diag is None else c.diag * a.square()
        dense = None
        if c.dense is not None:
            f = a.expand(self.feat_in).reshape(-1)
            dense = c.dense * f.unsqueeze(1) * f.unsqueeze(0)
        return Curvature(self.feat_in, blocks, diag, dense)

    def _a(self, name: str, sl: slice) -> Tensor | None:
        return self._normalised(sl) if name == "weight" else None

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self.rules[n].columns(S, self._a(n, sl)) for n in self.selected}

    def diag_part(self, d: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self.rules[n].diag(d, self._a(n, sl)) for n in self.selected}

    def dense_part(self, M: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self.rules[n].dense(M, self.feat_out, self._a(n, sl)) for n in self.selected}


class PositionwiseStep(Step):
    """A map of each position's last `nd` dims (`E` entries): LayerNorm, RMSNorm, Softmax and
    LogSoftmax over the last dim. The weight and bias of the norms scale/shift those entries."""

    accepts_dense = True

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str], nd: int) -> None:
        super().__init__(module, local, selected)
        self.nd = nd
        self.J = torch.empty(0)

    @property
    def E(self) -> int:
        return math.prod(self.feat_in[len(self.feat_in) - self.nd:])

    @property
    def P(self) -> int:
        return math.prod(self.feat_in) // self.E

    def applies(self, x: Tensor) -> bool:
        dim = getattr(self.module, "dim", -1)
        return dim is not None and dim % x.dim() == x.dim() - 1  # softmax over the last dim only

    def compute(self, x: Tensor) -> Tensor:
        return self._fn(x, self.p)

    def flops(self) -> float:
        return 2.0 * math.prod(self.feat_in) * self.E

    def _fn(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, p.get("weight"), p.get("bias"), m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, p.get("weight"), m.eps)
        out: Tensor = m(x)
        return out

    def _normalised(self, sl: slice) -> Tensor:
        return self._fn(self.x[sl], {})

    def prepare(self, hessian: bool) -> None:
        """The Jacobian of every position, `(B, P, E, E)`, from `E` vector-Jacobian products."""
        B, E = self.x.shape[0], self.E
        with SecondOrderSafe():
            _, back = vjp(lambda t: self._fn(t, self.p), self.x)
            basis = torch.eye(E, dtype=self.x.dtype, device=self.x.device)
            cot = basis.reshape(E, 1, 1, E).expand(E, B, self.P, E).reshape(E, B, *self.feat_out)
            rows = vmap(back)(cot)[0]  # rows[e] = e-th row of every position's Jacobian
        self.J = rows.reshape(E, B, self.P, E).permute(1, 2, 0, 3)

    def grad_in(self, g: Tensor) -> Tensor:
        gp = g.reshape(g.shape[0], self.P, self.E)
        return torch.einsum("npe,npef->npf", gp, self.J).reshape(g.shape)

    def _block_dense(self, R: Tensor) -> Tensor:
        """Per-position `(b, P, E, E)` matrices as one block-diagonal `(b, D, D)`."""
        b, P, E = R.shape[0], self.P, self.E
        eye = torch.eye(P, dtype=R.dtype, device=R.device)
        return torch.einsum("npef,pq->npeqf", R, eye).reshape(b, P * E, P * E)

    def _as_curvature(self, R: Tensor, w: Tensor | None) -> Curvature:
        """`sum_e w[., e] R[., e] R[., e]ᵀ` (or `R` itself as matrices when `w` is None) per position,
        dense when small, else as columns on one position each."""
        b, P, E = R.shape[0], self.P, self.E
        if w is None:  # R: symmetric matrices per position
            if P * E <= DENSE_MAX:
                return Curvature(self.feat_in, dense=self._block_dense(R))
            lam, U = torch.linalg.eigh(0.5 * (R + R.transpose(2, 3)))
            R, w = U.transpose(2, 3), lam
        if P == 1:
            return Curvature(self.feat_in, [Block(R.reshape(b, E, *self.feat_in), w.reshape(b, E))])
        eye = torch.eye(P, dtype=R.dtype, device=R.device)
        S = torch.einsum("npef,pq->npeqf", R, eye).reshape(b, P * E, *self.feat_in)
        return Curvature(self.feat_in, [Block(S, w.reshape(b, P * E))])

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        J = self.J[sl]
        b, P, E = J.shape[0], self.P, self.E
        blocks = []
        for blk in c.blocks:
            Sp = blk.S.reshape(blk.S.shape[0], blk.K, P, E)
            blocks.append(Block(torch.einsum("nkpe,npef->nkpf", Sp, J).reshape(b, blk.K, *self.feat_in), blk.w))
        out = Curvature(self.feat_in, blocks)
        if c.diag is not None:  # Jᵀ diag(d) J per position: the rows of J weighted by d
            out = out + self._as_curvature(J, c.diag.reshape(b, P, E))
        if c.dense is not None:
            M = c.dense.reshape(b, P, E, P, E)
            dense = torch.einsum("npeqg,npef,nqgh->npfqh", M, J, J).reshape(b, P * E, P * E)
            out = out + Curvature(self.feat_in, dense=dense)
        return out

    def residual(self, g: Tensor, sl: slice) -> Curvature | None:
        """`sum_e g_e ∇² y_e` per position, `(b, P, E, E)`, from `E` Hessian-vector products of
        `<g, y(x)>` (all positions and samples at once: they do not interact)."""
        x = self.x[sl]
        b, E = x.shape[0], self.E
        with SecondOrderSafe():
            def weighted(t: Tensor) -> Tensor:
                return (g * self._fn(t, self.p)).sum()

            _, hvp = vjp(grad(weighted), x)
            basis = torch.eye(E, dtype=x.dtype, device=x.device)
            tangents = basis.reshape(E, 1, 1, E).expand(E, b, self.P, E).reshape(E, b, *self.feat_in)
            cols = vmap(hvp)(tangents)[0]
        R = cols.reshape(E, b, self.P, E).permute(1, 2, 3, 0)
        return self._as_curvature(R, None)

    def _rule(self, name: str) -> Scaled:
        return Scaled(tuple(range(len(self.feat_out) - self.nd, len(self.feat_out))), self.p[name].shape)

    def _a(self, name: str, sl: slice) -> Tensor | None:
        return self._normalised(sl) if name == "weight" else None

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self._rule(n).columns(S, self._a(n, sl)) for n in self.selected}

    def diag_part(self, d: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self._rule(n).diag(d, self._a(n, sl)) for n in self.selected}

    def dense_part(self, M: Tensor, sl: slice) -> dict[str, Tensor]:
        return {n: self._rule(n).dense(M, self.feat_out, self._a(n, sl)) for n in self.selected}


class PullbackStep(Step):
    """A parameter-free module linear (`linear=True`: pooling by averages, padding, upsampling,
    shuffles) or piecewise linear (max pooling) in its input: no residual. Columns are folded into
    the batch and pulled through one backward pass of the module (at the recorded input repeated
    per column; a linear module's pullback does not depend on the point, so there at zeros and
    shared columns stay shared)."""

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str], linear: bool, chunk: int = 1024) -> None:
        super().__init__(module, local, selected)
        self.linear, self.chunk = linear, chunk

    def compute(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x)
        return out

    def _back(self, x: Tensor, cot: Tensor) -> Tensor:
        xl = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.module(xl), xl, cot)
        return g

    def grad_in(self, g: Tensor) -> Tensor:
        return self._back(self.x, g)

    def _pull_columns(self, S: Tensor, sl: slice) -> Tensor:
        s, K = S.shape[:2]
        if self.linear:
            x = S.new_zeros(s * K, *self.feat_in)
        else:
            x = self.x[sl]
            s = x.shape[0]
            x = x.unsqueeze(1).expand(s, K, *self.feat_in).reshape(s * K, *self.feat_in)
            S = S.expand(s, *S.shape[1:])
        return self._back(x, S.reshape(s * K, *self.feat_out)).reshape(s, K, *self.feat_in)

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        c = c.diag_as_block()
        blocks = []
        for blk in c.blocks:
            parts = [self._pull_columns(blk.S[:, k : k + self.chunk], sl) for k in range(0, blk.K, self.chunk)]
            blocks.append(Block(torch.cat(parts, 1) if len(parts) > 1 else parts[0], blk.w))
        return Curvature(self.feat_in, blocks)
