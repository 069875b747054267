"""The curvature a backward sweep carries: a per-sample symmetric matrix on a module's output.

For sample `n` and a module output with per-sample shape `feat` (`D` entries), the sweep carries

    H_n = sum over blocks (S, w) of  sum_k w[n, k] S[n, k] S[n, k]^T  +  diag(d[n])  +  M[n]

- *column blocks* `S` of shape `(B, K, *feat)` with weights `w` of shape `(B, K)` (None means all
  ones: a plain factor `S Sᵀ`; signed weights carry indefinite terms). A block may be *shared*:
  `S` of shape `(1, K, *feat)`, the same columns for every sample with per-sample weights (what a
  diagonal term becomes after a linear layer: the rows of its weight matrix). Sharing is kept until
  a per-sample operation (an activation's derivative) makes the columns differ;
- a *diagonal* `d` of shape `(B, *feat)` (an activation's second-derivative term, MSE's or BCE's
  output Hessian): elementwise modules keep it diagonal, so it costs `D` numbers, not `D` columns;
- a *dense* part `M` of shape `(B, D, D)`, used when the columns outnumber the entries (`K >= D`)
  and `D` is small: pulling it through a linear layer costs `O(D^2)` per sample, whatever `K`.

Every operation here keeps the batch dimension first, so a sweep can run on any slice of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Block:
    """Columns `S` (`(B or 1, K, *feat)`) with weights `w` (`(B, K)`, or None for ones), and an
    optional per-sample scaling `r` (`(B, *feat)`) of shared columns: column `k` of sample `n`
    is then `S[0, k] * r[n]` (what the rows of a weight matrix become after an activation: kept
    unexpanded until a module mixes the entries)."""

    S: Tensor
    w: Tensor | None = None
    r: Tensor | None = None

    def materialized(self) -> Block:
        return self if self.r is None else Block(self.S * self.r.unsqueeze(1), self.w)

    @property
    def K(self) -> int:
        return int(self.S.shape[1])

    @property
    def shared(self) -> bool:
        return self.S.shape[0] == 1

    def weighted_squares(self) -> Tensor:
        """`sum_k w[n, k] S[n, k]^2`, shape `(B or 1, *feat)` (the block's diagonal)."""
        out = weighted_sum(self.S.square(), self.w)
        return out if self.r is None else out * self.r.square()


def weighted_sum(sq: Tensor, w: Tensor | None) -> Tensor:
    """`sum_k w[n, k] sq[n, k, ...]` (`sq` may be shared: batch size 1 against `w`'s `b`)."""
    if w is None:
        return sq.sum(1)
    if w.dim() == 2 and w.stride(1) == 0:  # one weight per sample (a loss's scale): no product
        out = sq.sum(1)
        return out * w[:, 0].reshape(-1, *([1] * (out.dim() - 1)))
    w = w.contiguous()  # bmm with a broadcast (expanded) operand takes a slow path
    if sq.shape[0] == 1 and w.shape[0] != 1:
        return (w @ sq[0].reshape(sq.shape[1], -1)).reshape(w.shape[0], *sq.shape[2:])
    b, K = sq.shape[:2]
    return torch.bmm(w.reshape(b, 1, K), sq.reshape(b, K, -1)).reshape(b, *sq.shape[2:])


@dataclass
class Curvature:
    """`sum_blocks S diag(w) Sᵀ + diag(d) + M` per sample; see the module docstring."""

    feat: torch.Size
    blocks: list[Block] = field(default_factory=list)
    diag: Tensor | None = None
    dense: Tensor | None = None

    @property
    def D(self) -> int:
        return math.prod(self.feat)

    @property
    def K(self) -> int:
        return sum(b.K for b in self.blocks)

    def empty(self) -> bool:
        return not self.blocks and self.diag is None and self.dense is None

    def __add__(self, other: Curvature) -> Curvature:
        return Curvature(
            self.feat,
            self.blocks + other.blocks,
            _add(self.diag, other.diag),
            _add(self.dense, other.dense),
        )

    def materialized(self) -> Curvature:
        """The same curvature with every block's scaling applied to its columns."""
        if all(b.r is None for b in self.blocks):
            return self
        return Curvature(self.feat, [b.materialized() for b in self.blocks], self.diag, self.dense)

    def diagonal(self, batch: int) -> Tensor | None:
        """`diag(H_n)`, shape `(B, *feat)` (None when the curvature is empty)."""
        out = self.diag
        for b in self.blocks:
            out = _add(out, b.weighted_squares().expand(batch, *self.feat))
        if self.dense is not None:
            out = _add(out, self.dense.diagonal(dim1=1, dim2=2).reshape(-1, *self.feat))
        return out

    def to_dense(self, batch: int) -> Curvature:
        """All parts summed into one `(B, D, D)` matrix."""
        D = self.D
        M = self.dense
        for b in self.materialized().blocks:
            S = b.S.reshape(b.S.shape[0], b.K, D)
            if b.shared:
                S0 = S[0]
                part = (S0.T @ S0).expand(batch, D, D) if b.w is None else torch.einsum("nk,kd,ke->nde", b.w, S0, S0)
            else:
                part = (S if b.w is None else S * b.w.unsqueeze(-1)).transpose(1, 2) @ S
            M = part if M is None else M + part
        if self.diag is not None:
            dd = torch.diag_embed(self.diag.reshape(-1, D))
            M = dd if M is None else M + dd
        assert M is not None
        return Curvature(self.feat, dense=M)

    def dense_as_blocks(self) -> Curvature:
        """The dense part as columns (its eigenvectors, weighted by the eigenvalues)."""
        if self.dense is None:
            return self
        M = self.dense
        lam, U = torch.linalg.eigh(0.5 * (M + M.transpose(1, 2)))
        S = U.transpose(1, 2).reshape(M.shape[0], self.D, *self.feat)
        return Curvature(self.feat, [*self.blocks, Block(S, lam)], self.diag, None)

    def diag_as_block(self) -> Curvature:
        """The diagonal part as shared identity columns weighted by the diagonal."""
        if self.diag is None:
            return self
        D = self.D
        eye = torch.eye(D, dtype=self.diag.dtype, device=self.diag.device).reshape(1, D, *self.feat)
        return Curvature(self.feat, [*self.blocks, Block(eye, self.diag.reshape(-1, D))], None, self.dense)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def sample_slice(c: Curvature, b0: int, b1: int) -> Curvature:
    """The curvature of samples `b0:b1` (shared blocks stay shared)."""
    blocks = [
        Block(b.S if b.shared else b.S[b0:b1], None if b.w is None else b.w[b0:b1], None if b.r is None else b.r[b0:b1])
        for b in c.blocks
    ]
    return Curvature(
        c.feat,
        blocks,
        None if c.diag is None else c.diag[b0:b1],
        None if c.dense is None else c.dense[b0:b1],
    )


def as_factor(curv: Curvature) -> tuple[Tensor, Tensor | None]:
    """Plain columns `(B, K, *feat)` and their signs (None when all are positive):
    `H_n = S_n diag(sign_n) S_nᵀ`, each weight's magnitude moved into its column."""
    curv = curv.diag_as_block().dense_as_blocks().materialized()
    cols, signs = [], []
    for b in curv.blocks:
        B = b.w.shape[0] if b.w is not None else b.S.shape[0]
        S = b.S.expand(B, *b.S.shape[1:])
        w = b.w if b.w is not None else torch.ones(B, b.K, dtype=S.dtype, device=S.device)
        cols.append(S * w.abs().sqrt().reshape(B, b.K, *([1] * (S.dim() - 2))))
        signs.append(torch.sign(w))
    sign = torch.cat(signs, 1)
    return torch.cat(cols, 1), None if bool((sign >= 0).all()) else sign
