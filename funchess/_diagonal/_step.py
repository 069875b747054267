"""One module of a chain: what a backward sweep needs from it (the base class of the rules).

A `Step` wraps one module, with the tensors its forward uses for each parameter (the caller's
`params` where given, the module's own otherwise). After `forward` has recorded its input, a sweep
asks it, for a slice of samples:

- `param_diag(c)`: the diagonal of `J_θᵀ H J_θ` for its selected parameters `θ` (summed over the
  samples, or per sample), `H` the curvature `c` on its output. Every rule here is for a module
  *linear in its parameters* (Linear, Conv, Embedding, norms' affine maps), so this is the exact
  diagonal of the loss Hessian (or GGN) block of `θ`;
- `param_columns(S)`: the per-sample, per-column products `J_θ,nᵀ s_nk` (the factored GGN);
- `pull(c)`: `J_xᵀ H J_x`, the curvature on its input;
- `residual(g)`: `sum_k g_k ∇²_x y_k`, the second-order term of the module at its input for the
  output gradient `g` (zero for modules linear in their input; the Hessian's sweep adds it);
- `grad_in(g)`: the gradient on its input from the gradient on its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ._curvature import Block, Curvature, weighted_sum

#: Largest per-sample feature count for which a curvature may be held as a dense `(D, D)` matrix.
DENSE_MAX = 512


class Step:
    """A module of the chain; subclasses are the rules (see the module docstring)."""

    #: whether `param_diag` and `pull` take a dense part (else the sweep turns it into columns)
    accepts_dense = False
    #: whether `pull` maps a diagonal to a diagonal (activations, reshapes, channel scalings)
    keeps_diagonal = False
    #: whether `pull` takes blocks with a per-sample scaling `r` (else the sweep applies it first)
    pulls_scaled = False
    #: whether `param_diag` takes blocks with a per-sample scaling `r`
    reads_scaled = False

    def __init__(self, module: nn.Module, local: dict[str, Tensor], selected: dict[str, str]) -> None:
        self.module = module
        self.p = local  # every parameter the forward uses, by local name
        self.selected = selected  # local name -> the caller's key, for the parameters wanted
        self.x: Tensor = torch.empty(0)
        self.feat_in = torch.Size()
        self.feat_out = torch.Size()

    def applies(self, x: Tensor) -> bool:
        """Whether the rule covers the module on this input (checked before `forward`)."""
        return True

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        y = self.compute(x)
        self.feat_in, self.feat_out = x.shape[1:], y.shape[1:]
        return y

    def compute(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def flops(self) -> float:
        """The forward's FLOPs per sample (after `forward`; entry-wise modules: the entries)."""
        return float(math.prod(self.feat_out))

    def prepare(self, hessian: bool) -> None:
        """Derivative information the sweep will need (after `forward`)."""

    def grad_in(self, g: Tensor) -> Tensor:
        raise NotImplementedError

    def pull(self, c: Curvature, sl: slice) -> Curvature:
        raise NotImplementedError

    def residual(self, g: Tensor, sl: slice) -> Curvature | None:
        return None

    def param_columns(self, S: Tensor, sl: slice) -> dict[str, Tensor]:
        """`{name: (b, K, *shape)}`: the columns `S` (`(b or 1, K, *feat_out)`) pulled to each
        selected parameter, per sample."""
        return {}

    def param_diag(self, c: Curvature, sl: slice, per_sample: bool, chunk: Callable[[], int]) -> dict[str, Tensor]:
        """Default: the blocks through `param_columns` (in passes of `chunk()` columns), the
        diagonal and dense parts through `diag_part` / `dense_part`."""
        b = sl.stop - sl.start
        out: dict[str, Tensor] = {}
        for block in c.blocks:
            for S, w in _column_chunks(block, chunk()):
                for name, G in self.param_columns(S, sl).items():
                    part = weighted_sum(G.square(), w)
                    _accumulate(out, name, part.expand(b, *part.shape[1:]) if per_sample else part.sum(0))
        for name, part in self.diag_part(c.diag, sl).items() if c.diag is not None else ():
            _accumulate(out, name, part if per_sample else part.sum(0))
        for name, part in self.dense_part(c.dense, sl).items() if c.dense is not None else ():
            _accumulate(out, name, part if per_sample else part.sum(0))
        return out

    def diag_part(self, d: Tensor, sl: slice) -> dict[str, Tensor]:
        """`{name: (b, *shape)}` from a diagonal curvature `d` (`(b, *feat_out)`)."""
        raise NotImplementedError

    def dense_part(self, M: Tensor, sl: slice) -> dict[str, Tensor]:
        """`{name: (b, *shape)}` from a dense curvature `M` (`(b, D, D)`)."""
        raise NotImplementedError


def _column_chunks(block: Block, chunk: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    for s in range(0, block.K, chunk):
        e = min(block.K, s + chunk)
        yield block.S[:, s:e], None if block.w is None else block.w[:, s:e]


def _accumulate(out: dict[str, Tensor], name: str, part: Tensor) -> None:
    out[name] = part if name not in out else out[name] + part


# ----------------------------------------------------------------------------- scaled parameters


def positions(t: Tensor, lead: int, pdims: tuple[int, ...]) -> Tensor:
    """`t` (`(*lead, *feat)`) with the feature dims `pdims` moved last and flattened into `T`,
    the other feature dims flattened into `P`: `(*lead, P, T)`."""
    nf = t.dim() - lead
    other = [lead + i for i in range(nf) if i not in pdims]
    last = [lead + i for i in pdims]
    t = t.permute(*range(lead), *other, *last)
    T = math.prod(t.shape[t.dim() - len(pdims):])
    return t.reshape(*t.shape[:lead], -1, T)


def dense_positions(M: Tensor, feat: torch.Size, pdims: tuple[int, ...]) -> Tensor:
    """A dense `(b, D, D)` curvature as `(b, P, P, T)`: the entries between positions `p, q` at the
    same parameter index `t` (see `positions`)."""
    b, nf = M.shape[0], len(feat)
    other = [i for i in range(nf) if i not in pdims]
    order = [*other, *pdims]
    full = M.reshape(b, *feat, *feat).permute(0, *[1 + i for i in order], *[1 + nf + i for i in order])
    T = math.prod(feat[i] for i in pdims)
    P = math.prod(feat) // max(T, 1)
    return full.reshape(b, P, T, P, T).diagonal(dim1=2, dim2=4)


class Scaled:
    """A parameter `θ` entering as `y[f] = a[f] θ[t(f)] + ...`, `t(f)` the feature's index along
    the feature dims `pdims` (a bias: `a = 1`; a norm's weight: `a` the normalised input)."""

    def __init__(self, pdims: tuple[int, ...], shape: torch.Size) -> None:
        self.pdims, self.shape = pdims, shape

    def columns(self, S: Tensor, a: Tensor | None) -> Tensor:
        Sp = positions(S, 2, self.pdims)
        G = Sp.sum(2) if a is None else (Sp * positions(a, 1, self.pdims).unsqueeze(1)).sum(2)
        return G.reshape(*G.shape[:2], *self.shape)

    def diag(self, d: Tensor, a: Tensor | None) -> Tensor:
        dp = positions(d, 1, self.pdims)
        v = dp.sum(1) if a is None else (dp * positions(a, 1, self.pdims).square()).sum(1)
        return v.reshape(-1, *self.shape)

    def dense(self, M: Tensor, feat: torch.Size, a: Tensor | None) -> Tensor:
        Mp = dense_positions(M, feat, self.pdims)  # (b, P, P, T)
        if a is None:
            v = Mp.sum((1, 2))
        else:
            ap = positions(a, 1, self.pdims)
            v = torch.einsum("npqt,npt,nqt->nt", Mp, ap, ap)
        return v.reshape(-1, *self.shape)
