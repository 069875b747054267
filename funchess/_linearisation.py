"""Linearisations: the part of a curvature product that does not depend on the vector, built once.

A reverse-over-reverse Hessian-vector product is two passes: the gradient with `create_graph=True`
(one forward, and one backward that records itself), then one backward of that gradient with the
vector as its cotangent. Only the second pass depends on the vector, so `HessianAt` builds the
first once and every product is one backward of the kept graph. `GGNAt` keeps the model output's
graph, the graph of its pullback as a function of the cotangent (whose backward gives `J v`) and
the loss's gradient at the output (whose backward gives `H_z u`): a GGN-vector product is then
three backward passes and no forward.

Both work by plain autograd (`torch.autograd.grad`) on detached copies of the point's leaves, so
they are built outside torch.func transforms, at a point no outer graph tracks
(`plain_autograd_ok`). Products work under `torch.func.vmap` over the vector (torch.func batches
the backward of a graph built outside it); `mm` takes `k` vectors at once, by autograd's own
`is_grads_batched` or by that `vmap`. The graph lives as long as the object: drop it (`del`) to free the memory.

`Reroute` decides whether a forward needs funchess's operator rerouting (`_safe_ops.py`) without
paying its Python call per operator on every call: the first forward runs under the rerouting and
records whether it rerouted anything; later forwards run without it while nothing was rerouted,
and one walk of the new autograd graph checks that no kernel of a rerouted operator appears
(a forward that meets one is redone under the rerouting, from the same random state).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import call_f, check_scalar, split_aux
from ._compat import inside_transform
from ._safe_ops import safe_ops
from ._tree import tree_flatten, tree_map

PyTree = Any

#: Autograd node names of the kernels `_safe_ops` reroutes (layer/batch/instance norm, weight
#: norm, embeddings, fused attention, fused recurrent layers). A superset is harmless: the forward
#: is redone under the rerouting, which reroutes only what it knows, and later calls start under it.
_REROUTED = re.compile(r"LayerNorm|BatchNorm|WeightNorm|Embedding|Attention|Rnn")
_NODE_KINDS: dict[tuple[re.Pattern[str], type], bool] = {}


def plain_autograd_ok(leaves: Sequence[Any]) -> bool:
    """Whether plain autograd can differentiate at this point: outside every torch.func transform,
    with no leaf already tracked by an outer autograd graph (whose derivatives torch.func would
    carry through, and a detached copy would not)."""
    return not inside_transform() and all(isinstance(t, Tensor) and not t.requires_grad for t in leaves)


def graph_has(roots: Sequence[Any], pattern: re.Pattern[str]) -> bool:
    """Whether the autograd graph behind `roots` holds a node whose type name matches `pattern`."""
    stack = [t.grad_fn for t in roots if isinstance(t, Tensor) and t.grad_fn is not None]
    seen: set[Any] = set(stack)
    kinds = _NODE_KINDS
    while stack:
        node = stack.pop()
        key = (pattern, type(node))
        hit = kinds.get(key)
        if hit is None:
            hit = kinds[key] = bool(pattern.search(type(node).__name__))
        if hit:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def meets_rerouted(roots: Sequence[Any]) -> bool:
    """Whether the autograd graph behind `roots` holds a kernel of an operator `_safe_ops` reroutes."""
    return graph_has(roots, _REROUTED)


_SAVED: dict[type, list[str]] = {}


def graph_bytes(roots: Sequence[Tensor]) -> int:
    """The bytes of the distinct storages the autograd graph behind `roots` (and `roots`
    themselves) holds: what keeping that graph costs. Saved tensors are read from the nodes'
    `_saved_*` attributes (autograd's documented view of them), once per node."""
    storages: dict[int, int] = {}

    def count(value: Any) -> None:
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()

    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[Any] = set(stack)
    count(list(roots))
    while stack:
        node = stack.pop()
        kind = type(node)
        names = _SAVED.get(kind)
        if names is None:
            names = _SAVED[kind] = [a for a in dir(kind) if a.startswith("_saved_")]
        for name in names:
            count(getattr(node, name))
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's ctx.save_for_backward
            count(node.saved_tensors)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return sum(storages.values())


class Reroute:
    """Whether one function's forward needs the operator rerouting: unknown until the first
    forward (run under it), then remembered as a hint that every later forward checks (see the
    module docstring). The hint changes only speed, never results."""

    __slots__ = ("needed",)

    def __init__(self) -> None:
        self.needed: bool | None = None

    def forward(self, fn: Callable[[], Any], roots: Callable[[Any], Sequence[Any]], rewind: Callable[[], None]) -> Any:
        """`fn()` under the rerouting when it needs it. `roots(out)`: the Tensors whose graph to
        check; `rewind()` restores the random state before a forward is redone."""
        if self.needed is False:
            out = fn()
            if not meets_rerouted(roots(out)):
                return out
            self.needed = True
            del out
            rewind()
        with safe_ops() as mode:
            out = fn()
        if mode is not None and self.needed is None:
            self.needed = mode.rerouted > 0
        return out


def _roots(has_aux: bool) -> Callable[[Any], list[Any]]:
    def roots(out: Any) -> list[Any]:
        return tree_flatten(out)[0] if has_aux else [out]

    return roots


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor], lead: tuple[int, ...] = ()) -> list[Tensor]:
    return [torch.zeros(*lead, *x.shape, dtype=x.dtype, device=x.device) if g is None else g for g, x in zip(grads, like)]


#: How `k` products go through a kept graph at once: autograd's `is_grads_batched` (measured as
#: fast as torch.func's `vmap` or faster, with less Python per call, and much faster on
#: convolutions), or `vmap` of the backward.
BATCHINGS: tuple[str, ...] = ("autograd", "vmap")


def _batched_backward(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], how: str
) -> list[Tensor]:
    """One backward of the kept graph for `k` cotangents at once (leading dim `k`); the graph is kept."""
    k = cotangents[0].shape[0]
    if how == "autograd":
        got = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
    else:
        got = vmap(lambda *c: torch.autograd.grad(outputs, inputs, c, retain_graph=True, allow_unused=True))(*cotangents)
    return _zeros_for_none(got, inputs, (k,))


def _check_loss(call: str, out: Any, has_aux: bool) -> tuple[Tensor, Any]:
    value, aux = split_aux(call, out, has_aux)
    return check_scalar(call, value), aux


class HessianAt:
    """The gradient of scalar `h` at one point, kept with its graph: each Hessian-vector product is
    one backward of it (`mv`), `k` of them one batched backward (`mm`).

    Args:
        call: the public call, for error messages.
        h: `h(point)` returning a scalar Tensor (or `(value, aux)` with `has_aux`).
        leaves: the point's leaves (detached copies requiring grad are differentiated).
        rebuild: leaves -> the point `h` takes.
        reroute: the function's rerouting hint (`Reroute`).
        rewind: restores the random state before a redone forward.
    """

    def __init__(
        self, call: str, h: Callable[[Any], Any], leaves: Sequence[Tensor], rebuild: Callable[[list[Tensor]], Any],
        *, has_aux: bool = False, reroute: Reroute | None = None, rewind: Callable[[], None] = lambda: None,
    ) -> None:
        xs = [t.detach().requires_grad_(True) for t in leaves]
        with torch.enable_grad():  # whatever the caller's grad mode: the products carry no graph
            out = (reroute or Reroute()).forward(lambda: call_f(call, h, rebuild(xs)), _roots(has_aux), rewind)
            value, aux = _check_loss(call, out, has_aux)
            grads: Sequence[Tensor | None] = (
                torch.autograd.grad(value, xs, create_graph=True, allow_unused=True) if value.requires_grad else [None] * len(xs)
            )
        self.xs = xs
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads: list[Tensor] = [cast(Tensor, grads[i]) for i in self.live]
        self.aux = None if aux is None else tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)

    def kept_bytes(self) -> int:
        """What keeping the linearisation costs: the storages its graph holds."""
        return graph_bytes(self.grads)

    def mv(self, vs: Sequence[Tensor], *, keep: bool = True) -> list[Tensor]:
        """`H v` for one vector given by its leaves; `keep=False` frees the graph as it goes."""
        if not self.live:
            return _zeros_for_none([None] * len(self.xs), self.xs)
        got = torch.autograd.grad(self.grads, self.xs, [vs[i] for i in self.live], retain_graph=keep, allow_unused=True)
        return _zeros_for_none(got, self.xs)

    def mm(self, Vs: Sequence[Tensor], how: str = "autograd") -> list[Tensor]:
        """`H v` for `k` vectors (leaves `(k, *shape)`, the same for the result), batched `how`
        (one of `BATCHINGS`)."""
        if not self.live:
            return _zeros_for_none([None] * len(self.xs), self.xs, (Vs[0].shape[0],))
        return _batched_backward(self.grads, self.xs, [Vs[i] for i in self.live], how)


class GGNAt:
    """The GGN `Jᵀ H_z J` of `loss(output(point))` at one point, kept as three graphs: the
    output's (its backward is `Jᵀ`), the pullback's as a function of the cotangent `u` (its
    backward is `J`) and the loss gradient's at the output (its backward is `H_z`). A product is
    three backward passes; nothing is recomputed.

    Args:
        call: the public call, for error messages.
        output: `output(point)`, the model output (a pytree of Tensors).
        loss: `loss(output)`, a scalar Tensor.
        leaves, rebuild, reroute, rewind: as for `HessianAt`.
    """

    def __init__(
        self, call: str, output: Callable[[Any], Any], loss: Callable[[Any], Tensor], leaves: Sequence[Tensor],
        rebuild: Callable[[list[Tensor]], Any], *, reroute: Reroute | None = None,
        rewind: Callable[[], None] = lambda: None,
    ) -> None:
        xs = [t.detach().requires_grad_(True) for t in leaves]
        with torch.enable_grad():  # whatever the caller's grad mode: the products carry no graph
            z = (reroute or Reroute()).forward(lambda: call_f(call, output, rebuild(xs)), lambda out: tree_flatten(out)[0], rewind)
            zl, spec = tree_flatten(z)
            tracked = [i for i, t in enumerate(zl) if isinstance(t, Tensor) and t.requires_grad]
            zs = [zl[i] for i in tracked]
            us = [torch.zeros_like(t).requires_grad_(True) for t in zs]
            pulled: Sequence[Tensor | None] = (
                torch.autograd.grad(zs, xs, us, create_graph=True, allow_unused=True) if zs else [None] * len(xs)
            )
            zz = list(zl)
            for i in tracked:  # the loss sees the output as a new leaf: its graph is the loss's alone
                zz[i] = zl[i].detach().requires_grad_(True)
            zt = [zz[i] for i in tracked]
            value = check_scalar(call, call_f(call, loss, spec.unflatten(zz)))
            gz: Sequence[Tensor | None] = (
                torch.autograd.grad(value, zt, create_graph=True, allow_unused=True) if value.requires_grad else [None] * len(zt)
            )
        self.xs, self.zs, self.us, self.zt = xs, zs, us, zt
        self.j_live = [i for i, p in enumerate(pulled) if p is not None and p.requires_grad]
        self.pulled: list[Tensor] = [cast(Tensor, pulled[i]) for i in self.j_live]
        self.h_live = [i for i, g in enumerate(gz) if g is not None and g.requires_grad]
        self.gz: list[Tensor] = [cast(Tensor, gz[i]) for i in self.h_live]

    def kept_bytes(self) -> int:
        """What keeping the linearisation costs: the storages its graphs hold."""
        return graph_bytes(self.pulled + self.zs + self.gz)

    def _zero(self) -> bool:
        return not self.zs or not self.j_live or not self.h_live

    def mv(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """`G v` for one vector given by its leaves."""
        if self._zero():
            return _zeros_for_none([None] * len(self.xs), self.xs)

        def grad(outs: Sequence[Tensor], ins: Sequence[Tensor], cots: Sequence[Tensor]) -> list[Tensor]:
            return _zeros_for_none(torch.autograd.grad(outs, ins, cots, retain_graph=True, allow_unused=True), ins)

        Jv = grad(self.pulled, self.us, [vs[i] for i in self.j_live])
        HJv = grad(self.gz, self.zt, [Jv[i] for i in self.h_live])
        return grad(self.zs, self.xs, HJv)

    def mm(self, Vs: Sequence[Tensor], how: str = "autograd") -> list[Tensor]:
        """`G v` for `k` vectors (leaves `(k, *shape)`, the same for the result), batched `how`."""
        if self._zero():
            return _zeros_for_none([None] * len(self.xs), self.xs, (Vs[0].shape[0],))
        if how == "vmap":
            return list(vmap(lambda *v: tuple(self.mv(v)))(*Vs))
        Jv = _batched_backward(self.pulled, self.us, [Vs[i] for i in self.j_live], how)
        HJv = _batched_backward(self.gz, self.zt, [Jv[i] for i in self.h_live], how)
        return _batched_backward(self.zs, self.xs, HJv, how)
