"""Rules for the modules whose output is linear in their parameters and input: Linear, Conv, and
Embedding (linear in its weight; its integer input is data).

Parameter diagonals never form per-sample gradients when a cheaper contraction exists: for a
Linear layer without extra dims the weight's diagonal is `sum_n a_n (x_n²)ᵀ`, `a_n` the diagonal
of the output curvature (`sum_k w S²` for columns), one matrix product for the whole batch. With
extra dims (tokens) or for convolutions, each column's weight gradient is formed (in chunks of
columns) and squared: the products between positions do not factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import vjp
from ._curvature import Block, Curvature
from ._step import Scaled, Step, dense_positions


class LinearStep(Step):
    """`nn.Linear`: `y = x Wᵀ + b` on the last dim; other dims of `x` are positions."""

    accepts_dense = True

    @property
    def reads_scaled(self) -> bool:  # type: ignore[override]
        return not self._mid()

    def compute(self, x: Tensor) -> Tensor:
        return F.linear(x, self.p["weight"], self.p.get("bias"))

    def _mid(self) -> bool:
        return len(self.feat_out) > 1

    def flops(self) -> float:
        return 2.0 * math.prod(self.feat_out) * self.feat_in[-1]

    def grad_in(self, g: Tensor) -> Tensor:
        return g @ self.p["weight"]

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        W = self.p["weight"]
        O, I = W.shape
        blocks = [Block((b.S.reshape(-1, O) @ W).reshape(*b.S.shape[:-1], I), b.w) for b in c.blocks]
        if c.diag is not None:
            if not self._mid():  # diag(d) pulls back to the rows of W, shared by all samples
                blocks.append(Block(W.unsqueeze(0), c.diag))
            else:  # one column per (position, output): W[o] placed at that position
                P = math.prod(self.feat_out[:-1])
                eye = torch.eye(P, dtype=W.dtype, device=W.device)
                S = torch.einsum("pq,oi->poqi", eye, W).reshape(1, P * O, *self.feat_in)
                blocks.append(Block(S, c.diag.reshape(c.diag.shape[0], P * O)))
        dense = None
        if c.dense is not None:
            P = math.prod(self.feat_out[:-1])
            if P == 1:
                dense = W.T @ (c.dense @ W)
            else:
                M = (c.dense.reshape(-1, P * O, P, O) @ W).reshape(-1, P, O, P * I)
                dense = torch.einsum("npoj,oi->npij", M, W).reshape(-1, P * I, P * I)
        return Curvature(self.feat_in, blocks, None, dense)

    def _inputs(self, sl: slice) -> Tensor:
        return self.x[sl]

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in self.selected:
            x = self._inputs(sl)
            if self._mid():
                O, I = self.feat_out[-1], self.feat_in[-1]
                out["weight"] = torch.einsum("nkpo,npi->nkoi", S.reshape(*S.shape[:2], -1, O), x.reshape(x.shape[0], -1, I))
            else:
                out["weight"] = S.unsqueeze(-1) * x.unsqueeze(1).unsqueeze(2)
        if "bias" in self.selected:
            out["bias"] = S.reshape(*S.shape[:2], -1, S.shape[-1]).sum(2)
        return out

    def param_diag(self, c: Curvature, sl: slice, per_sample: bool, chunk: Callable[[], int]) -> dict[str, Tensor]:
        if self._mid():
            return super().param_diag(c, sl, per_sample, chunk)
        # no positions: everything goes through the diagonal of the output curvature
        a = c.diagonal(sl.stop - sl.start)
        out: dict[str, Tensor] = {}
        if a is None:
            return out
        if "weight" in self.selected:
            x2 = self._inputs(sl).square()
            out["weight"] = a.unsqueeze(2) * x2.unsqueeze(1) if per_sample else a.T @ x2
        if "bias" in self.selected:
            out["bias"] = a if per_sample else a.sum(0)
        return out

    def diag_part(self, d: Tensor, sl: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        O, I = self.feat_out[-1], self.feat_in[-1]
        dp = d.reshape(d.shape[0], -1, O)
        if "weight" in self.selected:
            x = self._inputs(sl).reshape(d.shape[0], -1, I)
            out["weight"] = torch.einsum("npo,npi->noi", dp, x.square())
        if "bias" in self.selected:
            out["bias"] = dp.sum(1)
        return out

    def dense_part(self, M: Tensor, sl: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        Mp = dense_positions(M, self.feat_out, (len(self.feat_out) - 1,))  # (b, P, P, O)
        if "weight" in self.selected:
            x = self._inputs(sl).reshape(M.shape[0], -1, self.feat_in[-1])
            out["weight"] = torch.einsum("npqo,npi,nqi->noi", Mp, x, x)
        if "bias" in self.selected:
            out["bias"] = Mp.sum((1, 2))
        return out


class ConvStep(Step):
    """`nn.Conv1d/2d/3d` (any stride, padding, padding mode, dilation, groups)."""

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str]) -> None:
        super().__init__(module, local, selected)
        conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
        self.conv = conv
        self.nd = len(conv.kernel_size)
        self.pads = _padding(conv)
        self.bias_rule = Scaled((0,), torch.Size([conv.out_channels]))

    def compute(self, x: Tensor) -> Tensor:
        return self.conv._conv_forward(x, self.p["weight"], self.p.get("bias"))

    def flops(self) -> float:
        return 2.0 * math.prod(self.feat_out) * self.p["weight"][0].numel()

    def _padded(self, x: Tensor) -> Tensor:
        if not any(self.pads):
            return x
        mode = "constant" if self.conv.padding_mode == "zeros" else self.conv.padding_mode
        return F.pad(x, self.pads, mode=mode)

    def grad_in(self, g: Tensor) -> Tensor:
        return self._input_grad(g.unsqueeze(1))[:, 0]

    def _input_grad(self, S: Tensor) -> Tensor:
        """Columns on the output `(b, K, Co, *out)` pulled to the input `(b, K, Ci, *in)`."""
        b, K = S.shape[:2]
        conv = self.conv
        padded = [s + self.pads[2 * (self.nd - 1 - i)] + self.pads[2 * (self.nd - 1 - i) + 1] for i, s in enumerate(self.feat_in[1:])]
        # the transposed convolution is the input gradient (measured several times faster on CPU
        # than torch.nn.grad.convNd_input); output_padding restores sizes that strides cut off
        extra = [
            size - ((o - 1) * st + d * (k - 1) + 1)
            for size, o, st, d, k in zip(padded, self.feat_out[1:], conv.stride, conv.dilation, conv.kernel_size)
        ]
        grad = _CONV_T[self.nd](
            S.reshape(b * K, *self.feat_out), self.p["weight"], None, conv.stride, 0, extra, conv.groups, conv.dilation
        )
        if any(self.pads):
            if conv.padding_mode == "zeros":
                index = [slice(None), slice(None)] + [
                    slice(self.pads[2 * (self.nd - 1 - i)], self.pads[2 * (self.nd - 1 - i)] + s) for i, s in enumerate(self.feat_in[1:])
                ]
                grad = grad[tuple(index)]
            else:  # reflect / replicate / circular: the adjoint of the (linear) padding
                zeros = grad.new_zeros(b * K, *self.feat_in)
                _, back = vjp(self._padded, zeros)
                grad = back(grad)[0]
        return grad.reshape(b, K, *self.feat_in)

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        c = c.diag_as_block()
        return Curvature(self.feat_in, [Block(self._input_grad(b.S), b.w) for b in c.blocks])

    def _unfolded(self, sl: slice) -> Tensor:
        """The input patches `(b, groups, Ci/groups * prod(kernel), positions)`."""
        x = self._padded(self.x[sl])
        conv = self.conv
        b, Ci = x.shape[:2]
        if self.nd == 2:
            X = F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride)
        else:
            kk = math.prod(conv.kernel_size)
            eye = torch.eye(kk, dtype=x.dtype, device=x.device).reshape(kk, 1, *conv.kernel_size).repeat(Ci, *([1] * (self.nd + 1)))
            X = _CONV[self.nd](x, eye, None, conv.stride, 0, conv.dilation, Ci).reshape(b, Ci * kk, -1)
        return X.reshape(b, conv.groups, -1, X.shape[-1])

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in self.selected:
            X = self._unfolded(sl)
            g = self.conv.groups
            Sg = S.reshape(*S.shape[:2], g, -1, X.shape[-1])
            G = torch.einsum("nkgcp,ngjp->nkgcj", Sg, X)
            out["weight"] = G.reshape(*G.shape[:2], *self.p["weight"].shape)
        if "bias" in self.selected:
            out["bias"] = self.bias_rule.columns(S, None)
        return out

    def diag_part(self, d: Tensor, sl: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in self.selected:
            X = self._unfolded(sl)
            g = self.conv.groups
            dg = d.reshape(d.shape[0], g, -1, X.shape[-1])
            out["weight"] = torch.einsum("ngcp,ngjp->ngcj", dg, X.square()).reshape(d.shape[0], *self.p["weight"].shape)
        if "bias" in self.selected:
            out["bias"] = self.bias_rule.diag(d, None)
        return out


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """The padding as `F.pad` amounts (last spatial dim first), also for padding='same'."""
    nd = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [0] * (2 * nd)
        pads: list[int] = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    out: list[int] = []
    for p in reversed(conv.padding):
        out += [p, p]
    return out


class EmbeddingStep(Step):
    """`nn.Embedding` as the first module (its input is the data): `y[..., :] = W[idx[...]]`."""

    def compute(self, x: Tensor) -> Tensor:
        m: nn.Embedding = self.module  # type: ignore[assignment]
        return F.embedding(x, self.p["weight"], m.padding_idx)

    def _index(self, sl: slice) -> Tensor:
        return self.x[sl].reshape(self.x[sl].shape[0], -1)

    def _scatter(self, values: Tensor, idx: Tensor) -> Tensor:
        """`values` `(b, P, E)` added into rows `idx` `(b, P)`: `(b, V, E)`."""
        V = self.p["weight"].shape[0]
        b, P, E = values.shape
        flat = (idx + V * torch.arange(b, device=idx.device).unsqueeze(1)).reshape(-1)
        out = values.new_zeros(b * V, E).index_add_(0, flat, values.reshape(b * P, E))
        out = out.reshape(b, V, E)
        pad = getattr(self.module, "padding_idx", None)
        if pad is not None:  # the embedding's backward never updates the padding row
            out[:, pad] = 0
        return out

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        if "weight" not in self.selected:
            return {}
        idx = self._index(sl)
        b, K = idx.shape[0], S.shape[1]
        E = S.shape[-1]
        Sp = S.expand(b, *S.shape[1:]).reshape(b, K, -1, E)
        cols = self._scatter(Sp.transpose(0, 1).reshape(b * K, -1, E), idx.repeat(K, 1))
        return {"weight": cols.reshape(K, b, *cols.shape[1:]).transpose(0, 1)}

    def param_diag(self, c: Curvature, sl: slice, per_sample: bool, chunk: Callable[[], int]) -> dict[str, Tensor]:
        if "weight" not in self.selected:
            return {}
        idx = self._index(sl)
        b = idx.shape[0]
        E = self.feat_out[-1]
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(self.p["weight"].dtype)
        # entries between positions p, q at the same embedding coordinate, then pairs with equal rows
        pair: Tensor | None = None
        for blk in c.blocks:
            S = blk.S.reshape(blk.S.shape[0], blk.K, -1, E)
            SW = S if blk.w is None else S * blk.w.reshape(*blk.w.shape, 1, 1)
            part = torch.einsum("nkpe,nkqe->npqe", SW.expand(b, *SW.shape[1:]), S.expand(b, *S.shape[1:]))
            pair = part if pair is None else pair + part
        if c.dense is not None:
            part = dense_positions(c.dense, self.feat_out, (len(self.feat_out) - 1,))
            pair = part if pair is None else pair + part
        values = c.diag.reshape(b, -1, E) if c.diag is not None else None
        if pair is not None:
            on_rows = torch.einsum("npqe,npq->npe", pair, same)
            values = on_rows if values is None else values + on_rows
        if values is None:
            return {}
        out = self._scatter(values, idx)
        return {"weight": out if per_sample else out.sum(0)}

