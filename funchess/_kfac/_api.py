"""K-FAC: Kronecker factors of the GGN, the Fisher or the empirical Fisher, per Linear / Conv2d layer.

For a layer `s = W a (+ b)` applied at `T` positions per sample (1 for a Linear on vectors, the
output pixels of a Conv2d, the tokens of a Linear on sequences), the curvature block of `W` is
approximated by `B ⊗ A` (row-major `W.flatten()` order):

- `A = 1/(N T) sum_n sum_t a_nt a_nt^T`, the input covariance (`N` = `num_data`, the batch size
  unless given; for a Conv2d `a_nt` is the unfolded input patch);
- `B = sum_n sum_t sum_c sigma_nc g_ntc g_ntc^T`, the covariance of the gradients w.r.t. the
  layer's output, backpropagated from the columns of the loss's factor (`_loss_factors`, the one
  factorisation the diagonals use too: the signed square root of the loss Hessian w.r.t. the
  output for the GGN, Monte-Carlo columns for the MC Fisher, each sample's loss gradient for the
  empirical Fisher). The bias's block is `B`.

These are curvlinops' `KFACLinearOperator` conventions ("expand"; "reduce" averages `a` and sums
`g` over the positions first; weight and bias are separate), so laplace's `kron` matches its
curvlinops backend. Parameters of other modules (LayerNorm, embeddings, ...) get their exact
block of the same curvature (`others="exact"`), or a refusal naming the module (`others="error"`).

Implementation: one forward of `funchess.functional`'s function with process-wide module hooks
(filtered to the model's layers; the model and its hooks are never touched) that record each
layer's input and add a zero Tensor to its output; the gradients w.r.t. those zeros are the
output gradients, as many factor columns at once as the budget holds through one batched
`torch.autograd.grad`. Exact blocks: per-sample `vjp`s of the same columns (`_sample_columns`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import (
    call_f,
    call_label,
    check_callable,
    check_generator,
    check_primals,
    check_randomness,
    relays_warnings,
)
from .._compose import RandomState, check_function, differentiable, random_errors, usable
from .._errors import InvalidArgumentError, StructureError, UnsupportedError
from .._functional import ModuleFunction, check_output, checked_loss, split_model
from .._loss_factors import empirical_columns, output_curvature, recognise
from .._memory import Budget, budget_of
from .._output_curvature import as_factor
from .._safe_ops import safe_ops
from .._sample_columns import RngReplay, per_sample_columns
from .._tree import tree_flatten
from ._layers import Layer, assign, backward_columns, input_covariance, output_rows, recording
from ._result import KFAC, KFACLayer

FisherType = Literal["type-2", "mc", "empirical"]
KFACApprox = Literal["expand", "reduce"]
Others = Literal["exact", "error"]
#: kfac's own defaults: the call label shows the options that differ from them
_DEFAULTS: dict[str, Any] = {
    "loss_fn": None, "fisher_type": "type-2", "kfac_approx": "expand", "reduction": None,
    "num_data": None, "others": "exact", "mc_samples": 1, "generator": None, "randomness": "error",
    "max_memory": None,
}
_FIXES = "Leave the other modules' parameters out of params, pass others='error', or use funchess.ggn_diagonal"


def _check_options(call: str, fisher_type: Any, kfac_approx: Any, others: Any, mc_samples: Any, num_data: Any, reduction: Any) -> None:
    def bad(what: str, got: Any, fix: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{call}: expected {what}, got {got!r}. {fix}")

    if fisher_type not in ("type-2", "mc", "empirical"):
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
    outputs a zero perturbation; the loss's factor columns (`S diag(sign) Sᵀ` = its Hessian w.r.t.
    the output, the factorisation `funchess.ggn_diagonal` uses: closed forms for cross-entropy,
    MSE and BCE, an eigendecomposition for other losses; Monte-Carlo draws for "mc"; each sample's
    loss gradient for "empirical") are pulled back to the perturbations in batched
    `torch.autograd.grad` calls. Exact blocks come from per-sample `vjp`s of those columns,
    `vmap`ped over the samples. The model is never changed.

    Args:
        f: the loss function from `funchess.functional(model, loss_fn)` (K-FAC needs the model's
            layers).
        loss_fn: overrides f's loss, `loss_fn(output, targets)` reduced over the batch.
        fisher_type: "type-2" (GGN, default), "mc" or "empirical".
        kfac_approx: "expand" (default) or "reduce", for layers applied at several positions.
        reduction: how the loss reduces over the batch ("mean"/"sum"); read from torch's losses,
            needed for the empirical Fisher of other losses (default "mean").
        num_data: the `N` that normalises `A` (default: the batch size); pass the data-set size to
            add up batches with `+`.
        others: "exact" (default) or "error" for parameters outside Linear / Conv2d layers.
        mc_samples: columns drawn per sample for fisher_type="mc".
        generator: the `torch.Generator` for those draws.
        randomness: "error" (default) refuses random operations (dropout in train mode); "same"
            or "different" allow them: the Kronecker factors use the draws of the one recorded
            forward, the exact blocks those of their per-sample passes (one mask for all samples,
            or one per sample, as in `torch.func.vmap`).
        max_memory: the memory budget (bytes or "4GiB"); default 80 % of the free memory.

    Returns:
        A function `(params, inputs, targets) -> KFAC`.

    Raises:
        InvalidArgumentError: f is not from `funchess.functional`, a bad option or argument, or
            batch norm in train mode.
        UnsupportedError: a parameter outside Linear/Conv2d with others="error", a parameter
            shared by two modules, random operations with randomness="error", or a loss that
            couples the samples.
        MemoryBudgetError: the exact blocks cannot fit the budget.

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
        "randomness": randomness, "max_memory": max_memory,
    }
    call = call_label("kfac", {k: v for k, v in opts.items() if not (v is _DEFAULTS[k] or v == _DEFAULTS[k])})
    check_callable(call, f)
    if not isinstance(f, ModuleFunction):
        raise InvalidArgumentError(
            f"{call}: expected f from funchess.functional(model, loss_fn) (K-FAC needs the "
            f"model's Linear and Conv2d layers), got {type(f).__name__}. Pass "
            f"funchess.functional(model, loss_fn)[0]."
        )
    output, loss, told = split_model(call, f, loss_fn)
    _check_options(call, fisher_type, kfac_approx, others, mc_samples, num_data, reduction)
    check_generator(call, generator)
    check_randomness(call, randomness)
    budget_of(call, max_memory)  # a bad max_memory is refused here, before any data arrives
    job = _Job(call, f, output, loss, told, fisher_type, kfac_approx, reduction, num_data, others, mc_samples,
               generator, randomness, max_memory)

    @functools.wraps(f)
    @relays_warnings
    def kfac_fn(params: dict[str, Tensor], inputs: Any, targets: Any = None) -> KFAC:
        here = f"{call}(params, inputs, targets)"
        check_primals(here, (params,), ["params"])
        check_function(here, f)
        coupled = f.batch_statistics()
        if coupled is not None:  # allowed by funchess.functional(..., batch_norm="batch")
            raise UnsupportedError(
                f"{here}: the model has {type(coupled[1]).__name__} {coupled[0]!r} normalising with the "
                f"batch's statistics, which couple the samples; expected running statistics (K-FAC "
                f"sums per-sample outer products). Call model.eval()."
            )
        if not isinstance(params, dict):
            raise InvalidArgumentError(
                f"{here}: expected params to be a dict of Tensors keyed by parameter name, got "
                f"{type(params).__name__}. Pass the dict funchess.functional returned."
            )
        with differentiable():  # copies of inference tensors made outside inference mode
            return _kfac(job, here, usable(params), usable(inputs), usable(targets))

    return kfac_fn


@dataclass(frozen=True)
class _Job:
    call: str
    f: ModuleFunction
    output: Callable[[Any, Any], Any]
    loss: Callable[..., Tensor]  # as given: its closed form is recognised
    told: Callable[..., Tensor]  # as evaluated for the user: torch's errors about the targets told
    fisher_type: str
    kfac_approx: str
    reduction: str | None
    num_data: int | None
    others: str
    mc_samples: int
    generator: torch.Generator | None
    randomness: str
    max_memory: int | float | str | None


def _kfac(job: _Job, here: str, params: dict[str, Tensor], inputs: Any, targets: Any) -> KFAC:
    job.f.check_params(params)  # names of the model's parameters, each once (told as the model function's)
    layers, rest = assign(here, job.f.model, params, job.others)
    device = next(iter(params.values())).device
    # parameters that require grad: torch refuses an in-place write into them before it lands
    tracked = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    guard = RandomState(device).guard(here) if job.randomness == "error" else contextlib.nullcontext()
    with recording(here, layers), guard, torch.enable_grad(), safe_ops():
        z = check_output(here, call_f(here, job.output, tracked, inputs))
    with torch.no_grad():  # once, so that the loss's errors (bad targets, no scalar) name the call
        checked_loss(here, job.told)(z.detach(), targets)
    S, signs = _columns(job, here, z, targets)
    budget = Budget(here, job.max_memory, device)
    Bs = _gradient_covariances(z, list(layers.values()), S, signs, job.kfac_approx, budget)
    N = job.num_data if job.num_data is not None else int(z.shape[0])
    result = {
        name: KFACLayer(name, layer.weight, layer.bias, input_covariance(layer, job.kfac_approx, N) if layer.weight is not None else None, Bl)
        for (name, layer), Bl in zip(layers.items(), Bs)
    }
    exact = _exact_blocks(job, here, {k: params[k] for k in rest}, inputs, S, signs, budget) if rest else {}
    return KFAC(result, exact, {k: v.detach() for k, v in params.items()})


def _columns(job: _Job, here: str, z: Tensor, targets: Any) -> tuple[Tensor, Tensor | None]:
    """The loss's factor columns `(B, K, *out)` and their signs (None: all +1)."""
    spec = recognise(job.loss)
    if spec is not None and job.reduction is not None and job.reduction != spec.reduction:
        raise InvalidArgumentError(
            f"{here}: reduction={job.reduction!r} contradicts the loss, which reduces with "
            f"{spec.reduction!r}. Leave reduction out (it is read from the loss)."
        )
    if job.fisher_type == "empirical":
        reduction = spec.reduction if spec is not None else (job.reduction or "mean")
        S = empirical_columns(job.told, z, targets, reduction)
        if S is None:
            raise StructureError(
                f"{here}: the empirical Fisher needs each sample's own loss; expected targets with "
                f"the samples along dim 0, got {type(targets).__name__ if not isinstance(targets, Tensor) else tuple(targets.shape)}. "
                f"Pass per-sample targets, or use fisher_type='type-2'."
            )
        return S, None
    samples = job.mc_samples if job.fisher_type == "mc" else None
    curv = output_curvature(job.loss, z, targets, per_sample=False, samples=samples, generator=job.generator)
    if curv is None:
        raise UnsupportedError(
            f"{here}: the loss couples the samples (its Hessian w.r.t. the output has blocks between "
            f"different samples), so it has no per-sample factor; expected a sum or mean of "
            f"per-sample losses. Use funchess.ggn for such a loss."
        )
    return as_factor(curv)


def _gradient_covariances(
    z: Tensor, layers: list[Layer], S: Tensor, signs: Tensor | None, approx: str, budget: Budget
) -> list[Tensor]:
    """`B` per layer: the loss's columns `S`, as many per batched `torch.autograd.grad` as the
    budget holds (each column's backward holds about three copies of the layers' outputs), pulled
    back to each layer's zero perturbation and multiplied out."""
    zeros = [zero for layer in layers for zero in layer.zeros]
    owner = [i for i, layer in enumerate(layers) for _ in layer.zeros]
    out: list[Tensor | None] = [None] * len(layers)
    K = int(S.shape[1])
    per_column = sum(t.numel() * t.element_size() for t in zeros) * 3 + z.numel() * z.element_size()
    step = budget.share(per_column, K)
    for c0 in range(0, K, step):
        c1 = min(K, c0 + step)
        cot = S[:, c0:c1].movedim(1, 0).to(z.dtype)  # (r, B, *out)
        grads = backward_columns(z, zeros, cot)
        for i, g in zip(owner, grads):
            if g is None:
                continue
            layer = layers[i]
            rows = output_rows(g, isinstance(layer.module, nn.Conv2d), approx)  # (r, B, T, d)
            weighted = rows if signs is None else rows * signs[:, c0:c1].T.reshape(c1 - c0, -1, 1, 1).to(rows.dtype)
            piece = weighted.reshape(-1, rows.shape[-1]).T @ rows.reshape(-1, rows.shape[-1])
            out[i] = piece if out[i] is None else out[i] + piece  # type: ignore[operator]
    result = []
    for layer, Bl in zip(layers, out):
        if Bl is None:  # the layer never influenced the output
            d = layer.module.weight.shape[0]
            Bl = torch.zeros(d, d, dtype=z.dtype, device=z.device)
        result.append(Bl)
    return result


def _exact_blocks(
    job: _Job, here: str, params: dict[str, Tensor], inputs: Any, S: Tensor, signs: Tensor | None, budget: Budget
) -> dict[str, Tensor]:
    """The exact block of each parameter of another module: `sum_n sum_k sign_nk r r^T` over the
    rows `r = J_n^T s_nk` (per-sample `vjp`s of the columns, slices of samples at a time)."""
    sizes = [p.numel() for p in params.values()]
    dtype, device = S.dtype, S.device
    itemsize = torch.finfo(dtype).bits // 8
    budget.require(f"the exact blocks of {len(params)} parameter(s)", sum(n * n for n in sizes) * itemsize, _FIXES)
    blocks = [torch.zeros(n, n, dtype=dtype, device=device) for n in sizes]
    K = int(S.shape[1])
    one = 4 * K * sum(sizes) * itemsize  # one sample's rows, and a pass's working set
    with safe_ops(), random_errors(here):
        for b0, b1, cols in per_sample_columns(
            here, job.output, params, inputs, S, sample_chunk=budget.share(one, int(S.shape[0])), chunk=None,
            randomness=job.randomness, replay=RngReplay(False, device),
        ):
            for block, leaf in zip(blocks, tree_flatten(cols)[0]):
                rows = leaf.reshape(-1, block.shape[0]).to(dtype)
                weighted = rows if signs is None else rows * signs[b0:b1].reshape(-1, 1).to(dtype)
                block.addmm_(weighted.T, rows)
    return dict(zip(params, blocks))
