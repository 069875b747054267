"""K-FAC: Kronecker factors of the GGN, the Fisher or the empirical Fisher, per Linear / Conv2d layer.

For a layer `s = W a (+ b)` applied at `T` positions per sample (1 for a Linear on vectors, the
output pixels of a Conv2d, the tokens of a Linear on sequences), the curvature block of `W` is
approximated by `B ⊗ A` (row-major `W.flatten()` order):

- `A = 1/(N T) sum_n sum_t a_nt a_nt^T`, the input covariance (`N` = `num_data`, the batch size
  unless given; for a Conv2d `a_nt` is the unfolded input patch);
- `B = sum_n sum_t sum_c sigma_nc g_ntc g_ntc^T`, the covariance of the gradients w.r.t. the
  layer's output, backpropagated from the columns of the loss's factor (`funchess._ggn_factor`:
  the square root of the loss Hessian for the GGN, sampled gradients for the MC Fisher, the
  gradient for the empirical Fisher). The bias's block is `B`.

These are curvlinops' `KFACLinearOperator` conventions ("expand"; "reduce" averages `a` and sums
`g` over the positions first; weight and bias are separate), so laplace's `kron` matches its
curvlinops backend. Parameters of other modules (LayerNorm, embeddings, ...) get their exact
block of the same curvature (`others="exact"`), or a refusal naming the module (`others="error"`).

Implementation: one forward of `funchess.functional`'s function with process-wide module hooks
(filtered to the model's layers; the model and its hooks are never touched) that record each
layer's input and add a zero Tensor to its output; the gradients w.r.t. those zeros are the
output gradients, all factor columns at once through one batched `torch.autograd.grad`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import InvalidArgumentError, StructureError, UnsupportedError
from ._functional import ModuleFunction
from ._ggn_factor import (
    FISHER_TYPES,
    FisherType,
    LossFactor,
    batch_size,
    check_deterministic,
    factor_rows,
    memory_budget,
)

__all__ = ["kfac", "KFAC", "KFACLayer"]

KFACApprox = Literal["expand", "reduce"]
Others = Literal["exact", "error"]
_DEFAULTS: dict[str, Any] = {
    "loss_fn": None, "fisher_type": "type-2", "kfac_approx": "expand", "reduction": None,
    "num_data": None, "others": "exact", "mc_samples": 1, "generator": None, "randomness": "error",
}


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class KFACLayer:
    """The Kronecker factors of one `nn.Linear` or `nn.Conv2d` layer.

    The weight's curvature block is `torch.kron(B, A)` (rows and columns in `weight.flatten()`
    order); the bias's block is `B`.

    Attributes:
        module: the layer's name in `model.named_modules()`.
        weight: the weight's parameter name, or None when the weight is not differentiated.
        bias: the bias's parameter name, or None (no bias, or not differentiated).
        A: the input covariance, `(d_in, d_in)` with `d_in = in_features` (Linear) or
            `in_channels / groups * kernel_height * kernel_width` (Conv2d); None without a weight.
        B: the output-gradient covariance, `(d_out, d_out)`, `d_out = out_features / out_channels`.

    Example:
        >>> import torch, funchess
        >>> f, params = funchess.functional(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss)
        >>> K = funchess.kfac(f)(params, torch.randn(5, 3), torch.randn(5, 2))
        >>> layer = K.layers[""]
        >>> layer.weight, layer.bias, tuple(layer.A.shape), tuple(layer.B.shape)
        ('weight', 'bias', (3, 3), (2, 2))
        >>> layer.weight_block().shape
        torch.Size([6, 6])
    """

    module: str
    weight: str | None
    bias: str | None
    A: Tensor | None
    B: Tensor

    def weight_block(self) -> Tensor:
        """The weight's dense block, `torch.kron(B, A)`."""
        if self.A is None:
            raise InvalidArgumentError(
                f"KFACLayer({self.module!r}).weight_block(): expected a differentiated weight, got "
                f"a layer whose weight was left out of params. Include it in params."
            )
        block: Tensor = torch.kron(self.B, self.A)
        return block

    def bias_block(self) -> Tensor:
        """The bias's dense block, `B`."""
        return self.B


@dataclass(frozen=True)
class KFAC:
    """A block-diagonal K-FAC approximation: Kronecker factors per layer, exact blocks elsewhere.

    Blocks follow the order of `params` (`named_parameters()` order, as `funchess.ravel`), one per
    parameter, so `as_matrix()` has the rows and columns of `funchess.to_matrix(funchess.ggn(...))`.
    Off-diagonal blocks (between parameters, including a layer's weight and bias) are zero.

    Use it as an operator: `K.mv(v)` (a params-shaped dict), `K @ v` (a dict or a flat vector),
    `funchess.FunctionOperator(K.mv, params)` for `funchess.eigsh` / `funchess.cg`. Batches add up
    factor-wise (`K1 + K2`, as K-FAC accumulates over a data set; pass `num_data` so that the input
    covariances are normalised by the data-set size).

    Attributes:
        layers: `KFACLayer` per Linear / Conv2d module name.
        exact: the exact dense block (`(n, n)`, `n = p.numel()`) per parameter of other modules.
        structure: the params the approximation is over (shapes and order).

    Example:
        >>> import torch, funchess
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
        >>> K = funchess.kfac(f)(params, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> list(K.layers), K.as_matrix().shape
        (['0', '2'], torch.Size([43, 43]))
        >>> v = {k: torch.randn_like(p) for k, p in params.items()}
        >>> torch.allclose(funchess.ravel(K.mv(v)), K.as_matrix() @ funchess.ravel(v), atol=1e-6)
        True
    """

    layers: dict[str, KFACLayer]
    exact: dict[str, Tensor]
    structure: dict[str, Tensor] = field(repr=False)

    def _owner(self, name: str) -> tuple[str, KFACLayer | None]:
        if name in self.exact:
            return "exact", None
        for layer in self.layers.values():
            if name == layer.weight:
                return "weight", layer
            if name == layer.bias:
                return "bias", layer
        raise InvalidArgumentError(
            f"KFAC.block({name!r}): expected one of the parameters {list(self.structure)}, got "
            f"{name!r}."
        )

    def block(self, name: str) -> Tensor:
        """The dense `(n, n)` block of parameter `name`.

        Example:
            >>> import torch, funchess
            >>> f, params = funchess.functional(torch.nn.Linear(2, 2), torch.nn.functional.mse_loss)
            >>> funchess.kfac(f)(params, torch.randn(3, 2), torch.randn(3, 2)).block("bias").shape
            torch.Size([2, 2])
        """
        kind, layer = self._owner(name)
        if layer is None:
            exact: Tensor = self.exact[name]
            return exact
        return layer.weight_block() if kind == "weight" else layer.bias_block()

    def as_matrix(self) -> Tensor:
        """The dense `(N, N)` block-diagonal matrix (`funchess.ravel` order)."""
        dense: Tensor = torch.block_diag(*[self.block(name) for name in self.structure])
        return dense

    def diagonal(self) -> dict[str, Tensor]:
        """The diagonal, shaped like the params (`kron(diag B, diag A)` for a weight)."""
        out: dict[str, Tensor] = {}
        for name, p in self.structure.items():
            kind, layer = self._owner(name)
            if layer is None:
                d = self.exact[name].diagonal()
            elif kind == "weight":
                assert layer.A is not None
                d = torch.outer(layer.B.diagonal(), layer.A.diagonal())
            else:
                d = layer.B.diagonal()
            out[name] = d.reshape(p.shape)
        return out

    def mv(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """The product with a params-shaped dict (`B V A` per weight; works under `torch.func.vmap`)."""
        if not isinstance(v, dict) or list(v) != list(self.structure):
            got = list(v) if isinstance(v, dict) else type(v).__name__
            raise StructureError(
                f"KFAC.mv(v): expected a dict with the keys {list(self.structure)}, got {got}. "
                f"Build v like the params, e.g. {{k: torch.randn_like(p) for k, p in params.items()}}."
            )
        out: dict[str, Tensor] = {}
        for name, p in self.structure.items():
            kind, layer = self._owner(name)
            x = v[name]
            if layer is None:
                out[name] = (self.exact[name] @ x.reshape(-1)).reshape(p.shape)
            elif kind == "weight":
                assert layer.A is not None
                out[name] = (layer.B @ x.reshape(p.shape[0], -1) @ layer.A).reshape(p.shape)
            else:
                out[name] = layer.B @ x
        return out

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() == 1:  # a funchess.ravel-ed vector
            parts = v.split([p.numel() for p in self.structure.values()])
            out = self.mv({k: x.reshape(p.shape) for (k, p), x in zip(self.structure.items(), parts)})
            return torch.cat([t.reshape(-1) for t in out.values()])
        return self.mv(v)

    def __add__(self, other: KFAC) -> KFAC:
        """Factor-wise sum (the K-FAC of a data set from its batches)."""
        if not isinstance(other, KFAC) or list(other.layers) != list(self.layers) or list(other.exact) != list(self.exact):
            raise StructureError(
                "KFAC + other: expected another funchess.KFAC over the same layers and parameters, "
                f"got {type(other).__name__}. Compute both with the same f and params."
            )
        layers = {
            k: KFACLayer(a.module, a.weight, a.bias, None if a.A is None or b.A is None else a.A + b.A, a.B + b.B)
            for (k, a), b in zip(self.layers.items(), other.layers.values())
        }
        exact = {k: a + other.exact[k] for k, a in self.exact.items()}
        return KFAC(layers, exact, self.structure)

    def __mul__(self, scalar: float) -> KFAC:
        """Scale the approximation (the output-gradient factors `B` and the exact blocks)."""
        layers = {k: KFACLayer(a.module, a.weight, a.bias, a.A, a.B * scalar) for k, a in self.layers.items()}
        return KFAC(layers, {k: b * scalar for k, b in self.exact.items()}, self.structure)

    __rmul__ = __mul__


# ----------------------------------------------------------------------------- which parameter is where


@dataclass
class _Layer:
    name: str
    module: nn.Linear | nn.Conv2d
    weight: str | None = None
    bias: str | None = None
    inputs: list[Tensor] = field(default_factory=list)
    zeros: list[Tensor] = field(default_factory=list)


def _assign(call: str, model: nn.Module, params: dict[str, Tensor], others: str) -> tuple[dict[str, _Layer], list[str], dict[str, str]]:
    """Group the params by the module that owns them: Linear/Conv2d layers, and the rest."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules():
        for lname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, mod, lname))
    by_name = dict(model.named_parameters())
    layers: dict[str, _Layer] = {}
    rest: list[str] = []
    module_of: dict[str, str] = {}
    for pname in params:
        if pname not in by_name:
            raise InvalidArgumentError(
                f"{call}(params, inputs, targets): params has key {pname!r}, which is not a "
                f"parameter of the model. Use the dict funchess.functional returned."
            )
        found = owners[id(by_name[pname])]
        mname, mod, lname = found[0]
        module_of[pname] = f"{type(mod).__name__} {mname!r}"
        if len(found) > 1:
            names = ", ".join(f"{type(m).__name__} {n!r}" for n, m, _ in found)
            raise UnsupportedError(
                f"{call}(params, inputs, targets): parameter {pname!r} is shared by {names}; "
                f"expected each parameter to belong to one module (K-FAC factors one layer's "
                f"inputs and outputs). Leave it out of params, or use funchess.ggn."
            )
        if type(mod) in (nn.Linear, nn.Conv2d) and lname in ("weight", "bias"):
            layer = layers.setdefault(mname, _Layer(mname, mod))  # type: ignore[arg-type]
            setattr(layer, lname, pname)
        elif others == "error":
            raise UnsupportedError(
                f"{call}(params, inputs, targets): parameter {pname!r} belongs to "
                f"{type(mod).__name__} {mname!r}, which has no Kronecker factorisation (K-FAC "
                f"covers nn.Linear and nn.Conv2d); expected only their parameters with "
                f"others='error'. Pass others='exact' for its exact block, or leave it out of params."
            )
        else:
            rest.append(pname)
    return layers, rest, module_of


@contextlib.contextmanager
def _recording(layers: dict[str, _Layer]) -> Iterator[None]:
    """Process-wide forward hooks, active for this block only and filtered to `layers`' modules:
    each call records the layer's input and returns its output plus a zero Tensor that requires
    grad (so the output's gradient can be asked for even where nothing before it requires grad)."""
    wanted = {id(layer.module): layer for layer in layers.values()}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        layer = wanted.get(id(module))
        if layer is None:
            return None
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise UnsupportedError(
                f"funchess.kfac: layer {layer.name!r} was called without a positional input Tensor; "
                f"expected module(x). Call the layer with its input as the first positional argument."
            )
        layer.inputs.append(args[0].detach())
        zero = torch.zeros_like(output, requires_grad=True)
        layer.zeros.append(zero)
        return output + zero

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the factors


def _patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`(B, T, C_in/groups * kh * kw)` unfolded input patches (channel groups averaged, as
    curvlinops does), with the layer's own padding mode and asymmetric 'same' padding."""
    B, C = x.shape[0], x.shape[1]
    x = x.reshape(B, conv.groups, C // conv.groups, *x.shape[2:]).mean(1)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2)


def _input_covariance(layer: _Layer, approx: str, num_data: int) -> Tensor:
    if not layer.inputs:  # a layer the forward never called: it has no curvature
        w = layer.module.weight
        d = w[0].numel()
        return torch.zeros(d, d, dtype=w.dtype, device=w.device)
    A: Tensor | None = None
    for x in layer.inputs:
        if isinstance(layer.module, nn.Conv2d):
            a = _patches(x, layer.module)  # (B, T, d_in)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if approx == "reduce":
            rows, scale = a.mean(1), 1
        else:
            rows, scale = a.reshape(-1, a.shape[-1]), a.shape[1]
        piece = rows.T @ rows / (num_data * scale)
        A = piece if A is None else A + piece
    assert A is not None
    return A


def _output_rows(g: Tensor, conv: bool, approx: str) -> Tensor:
    """Output gradients `(r, B, ...)` as `(r, B, positions, d_out)` (summed over positions for "reduce")."""
    if conv:
        g = g.movedim(2, -1)
    g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
    return g.sum(2, keepdim=True) if approx == "reduce" else g


def _backward_columns(z: Tensor, zeros: list[Tensor], cot: Tensor) -> list[Tensor | None]:
    """Gradients w.r.t. `zeros` for each cotangent `cot[i]` (shaped like z), batched when torch can."""
    try:
        return list(torch.autograd.grad(z, zeros, cot, retain_graph=True, is_grads_batched=True, allow_unused=True))
    except RuntimeError:  # an operator without a batching rule for its backward: one column at a time
        cols = [torch.autograd.grad(z, zeros, c, retain_graph=True, allow_unused=True) for c in cot]
        return [None if cols[0][j] is None else torch.stack([c[j] for c in cols]) for j in range(len(zeros))]  # type: ignore[misc]


def _check_options(call: str, fisher_type: str, kfac_approx: str, others: str, mc_samples: Any, num_data: Any, generator: Any, reduction: Any) -> None:
    def bad(what: str, got: Any, fix: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{call}: expected {what}, got {got!r}. {fix}")

    if fisher_type not in FISHER_TYPES:
        raise bad("fisher_type to be 'type-2' (the GGN), 'mc' or 'empirical'", fisher_type, "Pick one of them.")
    if kfac_approx not in ("expand", "reduce"):
        raise bad("kfac_approx to be 'expand' or 'reduce'", kfac_approx, "Pick one of them.")
    if others not in ("exact", "error"):
        raise bad("others to be 'exact' or 'error'", others, "Pick one of them.")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise bad("mc_samples to be a positive int", mc_samples, "Pass e.g. mc_samples=1.")
    if mc_samples != 1 and fisher_type != "mc":
        raise bad("mc_samples=1 unless fisher_type='mc'", mc_samples, "Drop mc_samples, or pass fisher_type='mc'.")
    if num_data is not None and (isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1):
        raise bad("num_data to be None or a positive int (the data-set size)", num_data, "Pass len(dataset).")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise bad("generator to be None or a torch.Generator", type(generator).__name__, "Pass torch.Generator().manual_seed(0).")
    if reduction not in (None, "mean", "sum"):
        raise bad("reduction to be None (read from the loss), 'mean' or 'sum'", reduction, "Pass the loss's reduction.")


def kfac(
    f: Callable[..., Any],
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    fisher_type: FisherType = "type-2",
    kfac_approx: KFACApprox = "expand",
    reduction: Literal["mean", "sum"] | None = None,
    num_data: int | None = None,
    others: Others = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    randomness: Literal["error", "same", "different"] = "error",
    max_memory: int | float | str | None = None,
) -> Callable[..., KFAC]:
    """Kronecker-factored curvature (K-FAC) of a batch: `kfac(f)(params, inputs, targets) -> KFAC`.

    Per `nn.Linear` / `nn.Conv2d` layer, the curvature block of its weight is `B ⊗ A` (input
    covariance `A`, output-gradient covariance `B`) and its bias's is `B`: for the GGN
    (`fisher_type="type-2"`, exact loss Hessian), the Monte-Carlo Fisher (`"mc"`) or the empirical
    Fisher (`"empirical"`). The conventions are curvlinops' `KFACLinearOperator` (so laplace's
    Kronecker Laplace gets the same factors): `A` averages over the samples (`num_data` of them)
    and the layer's positions, `B` sums; `kfac_approx="reduce"` averages inputs and sums gradients
    over positions (tokens, pixels) first. Parameters of other modules get their exact curvature
    block (`others="exact"`, one per parameter) or a refusal naming the module (`others="error"`).

    Composition: one forward with module hooks that record the layers' inputs and give their
    outputs a zero perturbation; the loss's factor columns (`S Sᵀ` = its Hessian w.r.t. the output:
    closed forms for MSE / cross-entropy, an eigendecomposition for other losses) are pulled back
    to the perturbations in one batched `torch.autograd.grad`. Exact blocks come from per-sample
    `vjp`s of those columns, `vmap`ped over the samples. The model is never changed.

    Args:
        f: the loss function from `funchess.functional(model, loss_fn)` (K-FAC needs the model's
            layers).
        loss_fn: overrides f's loss, `loss_fn(output, targets)` reduced over the batch.
        fisher_type: "type-2" (GGN, default), "mc" or "empirical".
        kfac_approx: "expand" (default) or "reduce", for layers applied at several positions.
        reduction: how the loss reduces over the batch ("mean"/"sum"); read from MSE and
            cross-entropy losses, needed for the empirical Fisher of other losses (default "mean").
        num_data: the `N` that normalises `A` (default: the batch size); pass the data-set size to
            add up batches with `+`.
        others: "exact" (default) or "error" for parameters outside Linear / Conv2d layers.
        mc_samples: labels drawn per sample for fisher_type="mc".
        generator: the `torch.Generator` for those draws.
        randomness: "error" (default) refuses dropout in train mode; batch norm in train mode is
            always refused (it couples the samples).
        max_memory: budget for the exact blocks' per-sample passes (bytes or "4GiB").

    Returns:
        A function `(params, inputs, targets) -> KFAC`.

    Raises:
        InvalidArgumentError: f is not from `funchess.functional`, or a bad option.
        UnsupportedError: a parameter outside Linear/Conv2d with others="error", a parameter
            shared by two modules, batch norm in train mode, or "mc" with an unknown loss.
        MemoryBudgetError: the exact blocks' per-sample passes cannot fit the budget.

    Example:
        >>> import torch, funchess
        >>> layer = torch.nn.Linear(3, 2)
        >>> f, params = funchess.functional(layer, torch.nn.MSELoss(reduction="sum"))
        >>> x, y = torch.randn(1, 3), torch.randn(1, 2)
        >>> K = funchess.kfac(f)(params, x, y)
        >>> G = funchess.to_matrix(funchess.ggn(f)(params, x, y))  # one sample: K-FAC is exact
        >>> torch.allclose(K.block("weight"), G[:6, :6], atol=1e-5)
        True
    """
    opts = {
        "loss_fn": loss_fn, "fisher_type": fisher_type, "kfac_approx": kfac_approx, "reduction": reduction,
        "num_data": num_data, "others": others, "mc_samples": mc_samples, "generator": generator,
        "randomness": randomness,
    }
    shown = "".join(f", {k}={getattr(v, '__name__', v)!r}" for k, v in opts.items() if v is not _DEFAULTS[k] and v != _DEFAULTS[k])
    call = f"funchess.kfac(f{shown})"
    if not isinstance(f, ModuleFunction):
        raise InvalidArgumentError(
            f"{call}: expected f from funchess.functional(model, loss_fn) (K-FAC needs the "
            f"model's Linear and Conv2d layers), got {type(f).__name__}. Pass "
            f"funchess.functional(model, loss_fn)[0]."
        )
    loss = loss_fn if loss_fn is not None else f.loss_fn
    if loss is None or not callable(loss):
        raise InvalidArgumentError(
            f"{call}: expected a loss (K-FAC needs the loss's curvature w.r.t. the output), got "
            f"none. Pass funchess.functional(model, loss_fn) or loss_fn=..."
        )
    _check_options(call, fisher_type, kfac_approx, others, mc_samples, num_data, generator, reduction)
    if randomness not in ("error", "same", "different"):
        raise InvalidArgumentError(f"{call}: expected randomness 'error', 'same' or 'different', got {randomness!r}. Pick one.")
    model = f.model

    @functools.wraps(f)
    def kfac_fn(params: dict[str, Tensor], inputs: Any, targets: Any = None) -> KFAC:
        here = f"{call}(params, inputs, targets)"
        if not isinstance(params, dict) or not params:
            raise InvalidArgumentError(
                f"{here}: expected params to be a non-empty dict of Tensors, got "
                f"{type(params).__name__}. Pass the dict funchess.functional returned."
            )
        check_deterministic(call, model, randomness)
        layers, rest, _ = _assign(call, model, params, others)
        frozen = {k: v.detach() for k, v in params.items()}
        with _recording(layers), torch.enable_grad():
            z = f.output(frozen, inputs)
        if not isinstance(z, Tensor):
            raise UnsupportedError(f"{here}: expected the model to return one Tensor, got {type(z).__name__}. Wrap the model.")
        B = batch_size(here, inputs, targets)
        factor = LossFactor(here, loss, z, targets, kind=fisher_type, reduction=reduction, mc_samples=mc_samples, generator=generator)
        N = num_data if num_data is not None else B
        result: dict[str, KFACLayer] = {}
        budget, _ = memory_budget(here, max_memory, z.device)
        Bs = _gradient_covariances(z, list(layers.values()), factor, kfac_approx, budget)
        for (name, layer), Bl in zip(layers.items(), Bs):
            A = _input_covariance(layer, kfac_approx, N) if layer.weight is not None else None
            result[name] = KFACLayer(name, layer.weight, layer.bias, A, Bl)
        exact = _exact_blocks(here, f, {k: frozen[k] for k in rest}, inputs, factor, max_memory) if rest else {}
        return KFAC(result, exact, frozen)

    return kfac_fn


def _gradient_covariances(z: Tensor, layers: list[_Layer], factor: LossFactor, approx: str, budget: int) -> list[Tensor]:
    """`B` per layer: the factor's columns, a batch of them per `torch.autograd.grad` (as many as a
    quarter of the budget holds: each column's backward holds about three copies of the layers'
    outputs), pulled back to each layer's zero perturbation and multiplied out."""
    zeros = [zero for layer in layers for zero in layer.zeros]
    owner = [i for i, layer in enumerate(layers) for _ in layer.zeros]
    out: list[Tensor | None] = [None] * len(layers)
    per_column = sum(t.numel() * t.element_size() for t in zeros) * 3 + z.numel() * z.element_size()
    step = max(1, min(factor.rank, budget // 4 // max(per_column, 1)))
    for c0 in range(0, factor.rank, step):
        S, signs = factor.columns(0, factor.B, c0, min(factor.rank, c0 + step))
        cot = S.permute(2, 0, 1).reshape(S.shape[2], *z.shape).to(z.dtype)
        grads = _backward_columns(z, zeros, cot)
        for i, g in zip(owner, grads):
            if g is None:
                continue
            layer = layers[i]
            rows = _output_rows(g, isinstance(layer.module, nn.Conv2d), approx)  # (r, B, T, d)
            weighted = rows if signs is None else rows * signs.T.reshape(*signs.T.shape, 1, 1).to(rows.dtype)
            piece = weighted.reshape(-1, rows.shape[-1]).T @ rows.reshape(-1, rows.shape[-1])
            out[i] = piece if out[i] is None else out[i] + piece  # type: ignore[operator]
    result = []
    for layer, Bl in zip(layers, out):
        if Bl is None:  # the layer never influenced the output
            d = layer.module.weight.shape[0]
            Bl = torch.zeros(d, d, dtype=z.dtype, device=z.device)
        result.append(Bl)
    return result


def _exact_blocks(call: str, f: ModuleFunction, params: dict[str, Tensor], inputs: Any, factor: LossFactor, max_memory: Any) -> dict[str, Tensor]:
    sizes = [p.numel() for p in params.values()]
    blocks = [torch.zeros(n, n, dtype=factor.z.dtype, device=factor.z.device) for n in sizes]
    itemsize = factor.z.element_size()
    for rows, signs, _ in factor_rows(
        call, f.output, params, inputs, factor, what=f"the exact blocks of {len(params)} parameter(s)",
        output_bytes=sum(n * n for n in sizes) * itemsize, max_memory=max_memory,
    ):
        flat = rows.reshape(-1, rows.shape[-1])
        weighted = flat if signs is None else flat * signs.reshape(-1, 1).to(flat.dtype)
        for block, part, wpart in zip(blocks, flat.split(sizes, 1), weighted.split(sizes, 1)):
            block.addmm_(wpart.T, part)
    return dict(zip(params, blocks))

