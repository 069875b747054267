"""The catalogue: every public entry point x every bad input raises a funchess error naming the fix.

funchess promises that bad input never reaches the user as a raw Python or torch error: each
raises a `FunchessError` subclass whose message names the call, what was expected, what arrived
and the fix, and the model, its buffers and every `.grad` are unchanged afterwards. This module
keeps that promise checked as data:

- `ENTRIES`: every public entry point that takes a model function and data, called on a `World`
  (a tiny model, its params, one batch, a tangent, a data set);
- `BAD`: the bad inputs, each a change to a `World` and the error it must raise (type and a
  regex for the fix), by kind of entry where the kinds differ;
- smaller tables for the tangents of products, the spectral tools, the tree functions, options,
  memory budgets and optional dependencies;
- `WORKS`: what must *not* raise (no-grad and inference modes, `UserDict` batches, `to_matrix`
  inside `vmap`, a Hessian of a NaN loss), compared with the plain result.

A new entry point is one line in `ENTRIES`; a new bad input is one entry in `BAD`.
"""

from __future__ import annotations

import collections
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funchess
from funchess import (
    FunchessError,
    InvalidArgumentError,
    MemoryBudgetError,
    OutputError,
    StructureError,
    UnsupportedError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: the label of an error raised by the model function itself (what `funchess.functional` returns)
F_LABEL = r"funchess\.functional\(\w+, \w+\)\(params"


# ----------------------------------------------------------------------------- the world


@dataclass
class World:
    """One tiny model with everything an entry point takes."""

    model: nn.Module
    f: Any
    params: Any
    x: Any
    y: Any
    v: Any
    data: Any = None  # the data set; [(x, y)] unless a case sets it

    @property
    def batches(self) -> Any:
        return [(self.x, self.y)] if self.data is None else self.data


def mlp(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes))


def world(model: nn.Module | None = None, loss: Any = F.cross_entropy, **options: Any) -> World:
    torch.manual_seed(0)
    model = model if model is not None else mlp()
    f, params = funchess.functional(model, loss, **options)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return World(model, f, params, x, y, v)


def _op(w: World) -> funchess.HessianOperator:
    return funchess.HessianOperator(w.f, w.params, w.x, w.y)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)

#: name -> (kind, label regex of the call, how to call it on a World)
ENTRIES: dict[str, tuple[str, str, Callable[[World], Any]]] = {
    "hessian": ("batch", r"funchess\.hessian\(", lambda w: funchess.hessian(w.f)(w.params, w.x, w.y)),
    "hessian_diagonal": ("batch", r"funchess\.hessian_diagonal\(", lambda w: funchess.hessian_diagonal(w.f)(w.params, w.x, w.y)),
    "plan_hessian": ("batch", r"funchess\.plan_hessian\(", lambda w: funchess.plan_hessian(w.f)(w.params, w.x, w.y)),
    "hvp": ("batch", r"funchess\.hvp\(", lambda w: funchess.hvp(w.f)(w.params, w.v, w.x, w.y)),
    "jacrev": ("jacobian", r"funchess\.jacrev\(", lambda w: funchess.jacrev(w.f)(w.params, w.x, w.y)),
    "jacfwd": ("jacobian", r"funchess\.jacfwd\(", lambda w: funchess.jacfwd(w.f)(w.params, w.x, w.y)),
    "per_sample_grad": ("per_sample", r"funchess\.per_sample_grad\(", lambda w: funchess.per_sample_grad(w.f)(w.params, w.x, w.y)),
    "per_sample_hessian": ("per_sample", r"funchess\.per_sample_hessian\(", lambda w: funchess.per_sample_hessian(w.f)(w.params, w.x, w.y)),
    "per_sample_hvp": ("per_sample", r"funchess\.per_sample_hvp\(", lambda w: funchess.per_sample_hvp(w.f)(w.params, w.v, w.x, w.y)),
    "per_sample_ggn": ("per_sample", r"funchess\.per_sample_ggn\(", lambda w: funchess.per_sample_ggn(w.f)(w.params, w.x, w.y)),
    "empirical_fisher": ("per_sample", r"funchess\.empirical_fisher\(", lambda w: funchess.empirical_fisher(w.f)(w.params, w.x, w.y)),
    "ggn": ("batch", r"funchess\.ggn\(", lambda w: funchess.ggn(w.f)(w.params, w.x, w.y)),
    "ggn_vp": ("batch", r"funchess\.ggn_vp\(", lambda w: funchess.ggn_vp(w.f)(w.params, w.v, w.x, w.y)),
    "ggn_diagonal": ("batch", r"funchess\.ggn_diagonal\(", lambda w: funchess.ggn_diagonal(w.f)(w.params, w.x, w.y)),
    "per_sample_ggn_diagonal": ("per_sample", r"funchess\.per_sample_ggn_diagonal\(",
                                lambda w: funchess.per_sample_ggn_diagonal(w.f)(w.params, w.x, w.y)),
    "per_sample_ggn_factor": ("per_sample", r"funchess\.per_sample_ggn_factor\(",
                              lambda w: funchess.per_sample_ggn_factor(w.f)(w.params, w.x, w.y)),
    "per_sample_hessian_diagonal": ("per_sample", r"funchess\.per_sample_hessian_diagonal\(",
                                    lambda w: funchess.per_sample_hessian_diagonal(w.f)(w.params, w.x, w.y)),
    "dataset_hessian": ("dataset", r"funchess\.dataset_hessian\(", lambda w: funchess.dataset_hessian(w.f)(w.params, w.batches)),
    "dataset_hvp": ("dataset", r"funchess\.dataset_hvp\(", lambda w: funchess.dataset_hvp(w.f)(w.params, w.v, w.batches)),
    "dataset_ggn": ("dataset", r"funchess\.dataset_ggn\(", lambda w: funchess.dataset_ggn(w.f)(w.params, w.batches)),
    "dataset_ggn_vp": ("dataset", r"funchess\.dataset_ggn_vp\(", lambda w: funchess.dataset_ggn_vp(w.f)(w.params, w.v, w.batches)),
    "HessianOperator": ("operator", r"funchess\.HessianOperator\(", lambda w: _op(w) @ w.v),
    "GGNOperator": ("operator", r"funchess\.GGNOperator\(", lambda w: funchess.GGNOperator(w.f, w.params, w.x, w.y) @ w.v),
    "DatasetOperator": ("dataset", r"funchess\.DatasetOperator\(", lambda w: funchess.DatasetOperator(w.f, w.params, w.batches) @ w.v),
    # the spectral tools on a Hessian operator: errors about the model are the operator's
    "eigsh": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.eigsh(_op(w), k=1, generator=_gen())),
    "trace_estimate": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.trace_estimate(_op(w), 4, generator=_gen())),
    "diagonal_estimate": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.diagonal_estimate(_op(w), 4, generator=_gen())),
    "spectral_density": ("operator", r"funchess\.HessianOperator\(",
                         lambda w: funchess.spectral_density(_op(w), num_probes=1, num_steps=4, generator=_gen())),
    "cg": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.cg(_op(w), w.v, damping=1.0, max_iter=200)),
    "diagonal": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.diagonal(_op(w))),
    "trace": ("operator", r"funchess\.HessianOperator\(", lambda w: funchess.trace(_op(w))),
    "kfac": ("batch", r"funchess\.kfac\(", lambda w: funchess.kfac(w.f)(w.params, w.x, w.y)),
}


# ----------------------------------------------------------------------------- bad inputs


class InPlaceOnWeights(nn.Module):
    """A forward that writes into its own weight: funchess must refuse before the write lands."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin.weight.mul_(2.0)
        return self.lin(x)


def _tied() -> World:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight
    w = world(model)
    both = {"0.weight": w.params["0.weight"], "2.weight": w.params["0.weight"]}
    return replace(w, params=both, v={k: torch.randn_like(t) for k, t in both.items()})


def _hooked() -> World:
    w = world()
    w.model[0].register_full_backward_hook(lambda *args: None)
    return w


def _loader(w: World) -> World:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(w.x, w.y), batch_size=3)
    return replace(w, x=loader)


@dataclass(frozen=True)
class Bad:
    """A bad input: how it changes the world, and per kind of entry the error and the fix (a regex
    after the call's label); `names="f"` when the model function itself names the call."""

    make: Callable[[], World]
    error: type[FunchessError]
    fix: str
    names: str = "entry"
    kinds: dict[str, tuple[type[FunchessError], str, str] | None] | None = None  # kind -> (error, fix, names) or None: n/a


BAD: dict[str, Bad] = {
    "module-as-f": Bad(lambda: replace(world(), f=mlp()), InvalidArgumentError,
                       r"got the module Sequential.*funchess\.functional\(model, loss_fn\)"),
    "params-not-tensors": Bad(lambda: replace(world(), params={"0.weight": 1.0}), InvalidArgumentError,
                              r"is a float; expected a Tensor.*torch\.tensor"),
    "params-int": Bad(lambda: (w := world()) and replace(w, params={k: p.long() for k, p in w.params.items()}),
                      InvalidArgumentError, r"dtype torch\.int64; expected a real floating-point Tensor\. Convert it"),
    "params-meta": Bad(lambda: (w := world()) and replace(w, params={k: p.to("meta") for k, p in w.params.items()},
                                                           v={k: p.to("meta") for k, p in w.v.items()}),
                       InvalidArgumentError, r"on the meta device, which holds shapes but no values.*Materialise the model"),
    "data-on-another-device": Bad(lambda: (w := world()) and replace(w, x=w.x.to("meta"), y=w.y.to("meta")),
                                  InvalidArgumentError, r"inputs are on meta but the model's parameters are on cpu.*x\.to\('cpu'\)",
                                  names="f", kinds={"dataset": (InvalidArgumentError, r"batch 0 holds Tensors on the meta device.*Load the data", "entry")}),
    "float64-data-float32-model": Bad(lambda: (w := world()) and replace(w, x=w.x.double()), InvalidArgumentError,
                                      r"inputs have dtype torch\.float64 but the model's parameters have torch\.float32.*"
                                      r"x\.to\(torch\.float32\)", names="f"),
    "shapes-do-not-multiply": Bad(lambda: replace(world(), x=torch.randn(6, 5)), StructureError,
                                  r"cannot run on inputs of shape \(\d, 5\).*shapes cannot be multiplied.*Check the inputs' shapes",
                                  names="f"),
    "int32-targets": Bad(lambda: (w := world()) and replace(w, y=w.y.int()), InvalidArgumentError,
                         r"targets have dtype torch\.int32; expected torch\.int64.*targets\.long\(\)", names="f",
                         # under vmap torch's nll_loss takes int32 targets: the per-sample functions work
                         kinds={"per_sample": None}),
    "targets-out-of-range": Bad(lambda: replace(world(), y=torch.full((6,), 7)), StructureError,
                                r"loss cannot take the model output.*out of bounds.*class indices in \[0, classes\)", names="f",
                                kinds={"per_sample": None}),  # under vmap torch cannot check the class index
    "empty-batch": Bad(lambda: (w := world()) and replace(w, x=w.x[:0], y=w.y[:0]), InvalidArgumentError,
                       r"expected a batch of at least one sample.*Pass a non-empty batch", names="f",
                       kinds={"per_sample": (StructureError, r"expected at least one sample.*Pass a non-empty batch", "entry"),
                              "dataset": (InvalidArgumentError, r"batch 0 has inputs of shape \(0, 4\), no samples.*"
                                          r"Leave empty batches out", "entry")}),
    "empty-data-set": Bad(lambda: replace(world(), data=[]), InvalidArgumentError,
                          r"data yielded no batches.*not empty", kinds={k: None for k in ("batch", "jacobian", "per_sample", "operator")}),
    "exhausted-iterator": Bad(lambda: (w := world()) and replace(w, data=_exhausted(w)), InvalidArgumentError,
                              r"(data yielded no batches.*can be iterated only once|one-shot list_iterator\. Pass list\(data\))",
                              kinds={k: None for k in ("batch", "jacobian", "per_sample", "operator")}),
    "non-scalar-loss": Bad(lambda: world(loss=lambda out, y: F.cross_entropy(out, y, reduction="none")), OutputError,
                           r"must return a scalar.*Reduce the loss",
                           kinds={"jacobian": None}),  # the Jacobian of a vector is what jacrev is for
    "dropout-in-train-mode": Bad(lambda: world(nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))),
                                 UnsupportedError, r"draws random numbers.*randomness='error'.*Call model\.eval\(\), or pass "
                                 r"(randomness=|the function to funchess\.jacrev)",
                                 # one forward, so one draw: torch.func.jacrev's semantics (documented)
                                 kinds={"jacobian-rev": None}),
    "batchnorm-in-train-mode": Bad(lambda: world(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))),
                                   InvalidArgumentError, r"BatchNorm1d '1' in train mode.*call model\.eval\(\)"),
    "backward-hook": Bad(_hooked, UnsupportedError, r"backward hooks on '0'.*backward_hooks='skip'"),
    "in-place-write-into-params": Bad(lambda: world(InPlaceOnWeights()), InvalidArgumentError,
                                      r"f writes in place into the argument it is differentiated with respect to.*out-of-place",
                                      # forward mode lets torch write into the parameters, as torch.func.jacfwd does
                                      kinds={"jacobian-fwd": None}),
    "both-names-of-a-tied-weight": Bad(_tied, InvalidArgumentError,
                                       r"params has both '0\.weight' and '2\.weight', two names of one tied parameter.*Keep only '0\.weight'",
                                       names="f"),
    "dataloader-as-one-batch": Bad(lambda: _loader(world()), InvalidArgumentError,
                                   r"got a DataLoader.*funchess\.DatasetOperator\(f, params, loader\)", names="f",
                                   kinds={"operator": (InvalidArgumentError, r"got a DataLoader.*funchess\.DatasetOperator\(f, params, loader\)", "entry"),
                                          "dataset": None}),  # a loader is what they take
}


def _exhausted(w: World) -> Any:
    it = iter([(w.x, w.y)])
    list(it)
    return it


def _kind(entry: str) -> list[str]:
    kind = ENTRIES[entry][0]
    return [kind, f"{kind}-{'fwd' if entry == 'jacfwd' else 'rev'}"] if kind == "jacobian" else [kind]


def _expected(entry: str, bad: Bad) -> tuple[type[FunchessError], str] | None:
    error, fix, names = bad.error, bad.fix, bad.names
    for kind in _kind(entry):
        if bad.kinds is not None and kind in bad.kinds:
            got = bad.kinds[kind]
            if got is None:
                return None
            error, fix, names = got
    label = ENTRIES[entry][1] if names == "entry" else F_LABEL
    return error, label + ".*" + fix


CASES = [(e, b) for b in BAD for e in ENTRIES if _expected(e, BAD[b]) is not None]


def _armed(w: World) -> None:
    """Every parameter of the model gets a `.grad`, so that a write into one shows."""
    for p in w.model.parameters():
        p.grad = torch.full_like(p, 0.5)


@pytest.mark.parametrize(("entry", "bad"), CASES, ids=[f"{b}-{e}" for e, b in CASES])
def test_bad_input_raises_a_funchess_error_naming_the_fix(entry: str, bad: str, snapshot: Any) -> None:
    w = BAD[bad].make()
    expected = _expected(entry, BAD[bad])
    assert expected is not None
    _armed(w)
    state = snapshot(w.model)
    error, pattern = expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", funchess.ConvergenceWarning)
        with pytest.raises(error, match=re.compile(pattern, re.DOTALL)):
            ENTRIES[entry][2](w)
    state.assert_unchanged()


def test_the_catalogue_covers_every_public_entry_point() -> None:
    """Every public function or operator class that takes user input is in a table here."""
    covered = set(ENTRIES) | {
        "functional", "ravel", "unravel", "to_matrix", "from_matrix", "FunctionOperator", "DenseOperator",
        "vhp", "hutchinson_trace", "hutchpp_trace", "testing", "LinearOperator", "ModuleFunction",
    }
    classes = {"FunchessError", "InvalidArgumentError", "MemoryBudgetError", "OutputError", "StructureError",
               "UnsupportedError", "ConvergenceWarning", "MemoryPlan", "EigenResult", "SpectralDensity",
               "SolveResult", "TraceEstimate", "DiagonalEstimate", "GGNFactor", "KFAC", "KFACLayer"}
    assert set(funchess.__all__) - classes <= covered, sorted(set(funchess.__all__) - classes - covered)


# ----------------------------------------------------------------------------- tangents of products


PRODUCTS: dict[str, tuple[str, Callable[[World], Any]]] = {
    "hvp": (r"funchess\.hvp\(f\)\(params, v", lambda w: funchess.hvp(w.f)(w.params, w.v, w.x, w.y)),
    "per_sample_hvp": (r"funchess\.per_sample_hvp\(f\)\(params, v", lambda w: funchess.per_sample_hvp(w.f)(w.params, w.v, w.x, w.y)),
    "ggn_vp": (r"funchess\.ggn_vp\(f\)\(params, v", lambda w: funchess.ggn_vp(w.f)(w.params, w.v, w.x, w.y)),
    "dataset_hvp": (r"funchess\.dataset_hvp\(f\)\(params, v", lambda w: funchess.dataset_hvp(w.f)(w.params, w.v, w.batches)),
    "dataset_ggn_vp": (r"funchess\.dataset_ggn_vp\(f\)\(params, v", lambda w: funchess.dataset_ggn_vp(w.f)(w.params, w.v, w.batches)),
    "HessianOperator @ v": (r"op @ x \(op a funchess\.HessianOperator\)", lambda w: _op(w) @ w.v),
    "cg": (r"funchess\.cg\(op, b\)", lambda w: funchess.cg(_op(w), w.v)),
}
TANGENTS: dict[str, tuple[Callable[[World], Any], str]] = {
    "wrong-shape": (lambda w: {k: t[:1] for k, t in w.v.items()}, r"(shape \(1, 4\)|randn_like|Shape every leaf like the params)"),
    "wrong-dtype": (lambda w: {k: t.double() for k, t in w.v.items()}, r"float64.*(randn_like|Convert it with \.to\(torch\.float32\))"),
    "another-device": (lambda w: {k: t.to("meta") for k, t in w.v.items()}, r"meta.*(randn_like|Move it with \.to\('cpu'\))"),
    "missing-leaf": (lambda w: {k: t for k, t in list(w.v.items())[1:]}, r"(structure of params|operator's structure).*(randn_like|ravel)"),
    "not-a-tensor": (lambda w: 1.0, r"(structure|pytree).*(randn_like|ravel)"),
}


@pytest.mark.parametrize("tangent", TANGENTS)
@pytest.mark.parametrize("product", PRODUCTS)
def test_a_bad_tangent_raises_a_structure_error(product: str, tangent: str, snapshot: Any) -> None:
    w = world()
    _armed(w)
    state = snapshot(w.model)
    make, fix = TANGENTS[tangent]
    label, call = PRODUCTS[product]
    with pytest.raises(StructureError, match=re.compile(label + ".*" + fix, re.DOTALL)):
        call(replace(w, v=make(w)))
    state.assert_unchanged()


# ----------------------------------------------------------------------------- spectral tools


def _nan_op() -> funchess.HessianOperator:
    w = world()
    return funchess.HessianOperator(w.f, w.params, w.x * float("nan"), w.y)


TOOLS: dict[str, Callable[[Any], Any]] = {
    "eigsh": lambda op: funchess.eigsh(op, k=1, generator=_gen()),
    "trace_estimate": lambda op: funchess.trace_estimate(op, 4, generator=_gen()),
    "diagonal_estimate": lambda op: funchess.diagonal_estimate(op, 4, generator=_gen()),
    "spectral_density": lambda op: funchess.spectral_density(op, num_probes=1, num_steps=4, generator=_gen()),
    "cg": lambda op: funchess.cg(op, torch.ones(op.shape[0]) if isinstance(op, funchess.LinearOperator) else torch.ones(3)),
    "diagonal": lambda op: funchess.diagonal(op),
    "trace": lambda op: funchess.trace(op),
}
ITERATIVE = ("eigsh", "trace_estimate", "diagonal_estimate", "spectral_density", "cg")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_spectral_tool_refuses_what_is_not_an_operator(tool: str) -> None:
    for thing in (torch.eye(3), mlp()):
        with pytest.raises(InvalidArgumentError, match=rf"funchess\.{tool}\(op.*expected a funchess\.LinearOperator.*"
                                                        rf"funchess\.DenseOperator"):
            TOOLS[tool](thing)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("tool", ITERATIVE)
def test_an_iterative_tool_refuses_a_non_finite_operator(tool: str) -> None:
    """Products and solvers refuse an operator whose products are NaN (the exact `diagonal`,
    `trace` and `as_matrix` return the NaNs, as `hessian` does: see WORKS)."""
    with pytest.raises(OutputError, match=rf"funchess\.{tool}\(op.*non-finite values.*Check the loss and the parameters"):
        TOOLS[tool](_nan_op())
    dense = funchess.DenseOperator(torch.full((3, 3), float("nan")))
    with pytest.raises(OutputError, match=rf"funchess\.{tool}\(op.*non-finite values"):
        TOOLS[tool](dense)


SPECTRAL_BAD: dict[str, tuple[Callable[[], Any], type[FunchessError], str]] = {
    "cg-nan-rhs": (lambda: funchess.cg(_op(world()), torch.full((43,), float("nan"))), InvalidArgumentError,
                   r"funchess\.cg\(op, b\): b has non-finite entries.*Check how it was computed"),
    "eigsh-k-too-large": (lambda: funchess.eigsh(_op(world()), k=1000), InvalidArgumentError,
                          r"funchess\.eigsh\(op, k=1000.*expected 1 <= k <= N = 43.*torch\.linalg\.eigh"),
    "trace-estimate-no-probes": (lambda: funchess.trace_estimate(_op(world()), 0), InvalidArgumentError,
                                 r"funchess\.trace_estimate\(.*num_hvps.*Pass e\.g\. num_hvps="),
    "generator-not-a-generator": (lambda: funchess.diagonal_estimate(_op(world()), 4, generator=0), InvalidArgumentError,
                                  r"funchess\.diagonal_estimate\(.*torch\.Generator.*manual_seed"),
    "dense-not-square": (lambda: funchess.DenseOperator(torch.zeros(2, 3)), StructureError,
                         r"funchess\.DenseOperator\(H, params\): expected a square matrix.*funchess\.to_matrix"),
    "dense-integer": (lambda: funchess.DenseOperator(torch.eye(2, dtype=torch.long)), InvalidArgumentError,
                      r"funchess\.DenseOperator\(H, params\): expected a real floating-point matrix.*H\.double\(\)"),
    "function-operator-module": (lambda: funchess.FunctionOperator(mlp(), world().params), InvalidArgumentError,
                                 r"funchess\.FunctionOperator\(fn, structure\): expected fn.*got the module"),
    "function-operator-wrong-output": (lambda: funchess.FunctionOperator(lambda v: {"a": torch.zeros(2)}, world().params) @ world().v,
                                       StructureError, r"funchess\.FunctionOperator: a product returned.*Make the product function return"),
    "operator-of-a-loader": (lambda: funchess.HessianOperator(world().f, world().params, _loader(world()).x),
                             InvalidArgumentError, r"funchess\.HessianOperator\(f, params, \*data\).*got a DataLoader.*"
                             r"funchess\.DatasetOperator\(f, params, loader\)"),
    "dataset-operator-one-shot": (lambda: funchess.DatasetOperator(world().f, world().params, ((x, y) for x, y in world().batches)),
                                  InvalidArgumentError, r"funchess\.DatasetOperator\(.*one-shot generator\. Pass list\(data\)"),
    "dataset-operator-loss-fn-for-the-hessian": (
        lambda: funchess.DatasetOperator(world().f, world().params, world().batches, loss_fn=F.mse_loss), InvalidArgumentError,
        r"funchess\.DatasetOperator\(f, params, data, loss_fn=mse_loss\): expected no loss_fn with curvature='hessian'.*"
        r"got loss_fn=mse_loss\. Pass f = funchess\.functional\(model, loss_fn\) without loss_fn=, or curvature='ggn'"),
}


@pytest.mark.parametrize("case", SPECTRAL_BAD)
def test_a_bad_operator_or_solver_input_raises(case: str) -> None:
    call, error, pattern = SPECTRAL_BAD[case]
    with pytest.raises(error, match=re.compile(pattern, re.DOTALL)):
        call()


# ----------------------------------------------------------------------------- trees, options, functions


OTHER_BAD: dict[str, tuple[Callable[[], Any], type[FunchessError], str]] = {
    "ravel-non-tensor": (lambda: funchess.ravel({"a": 1.0}), StructureError,
                         r"funchess\.ravel\(tree\): .*leaf of type float\. Pass dicts/tuples/lists of Tensors"),
    "unravel-wrong-size": (lambda: funchess.unravel(torch.zeros(3), {"a": torch.zeros(2)}), StructureError,
                           r"funchess\.unravel\(flat, like\): .*2 entries.*got \(3,\)\. Ravel the same pytree"),
    "to-matrix-not-a-hessian": (lambda: funchess.to_matrix(torch.zeros(3)), StructureError,
                                r"funchess\.to_matrix\(H\): .*Pass a Hessian pytree.*batch_dims=1"),
    "to-matrix-bad-batch-dims": (lambda: funchess.to_matrix({"a": {"a": torch.zeros(2, 2)}}, batch_dims=-1), StructureError,
                                 r"funchess\.to_matrix\(H, batch_dims=-1\): expected batch_dims to be a non-negative int"),
    "from-matrix-wrong-side": (lambda: funchess.from_matrix(torch.zeros(3, 3), {"a": torch.zeros(2)}), StructureError,
                               r"funchess\.from_matrix\(M, params\): expected a square matrix of side 2.*Pass the params"),
    "functional-not-a-module": (lambda: funchess.functional(lambda x: x), InvalidArgumentError,
                                r"funchess\.functional\(model, loss_fn\): expected a torch\.nn\.Module.*funchess\.hessian directly"),
    "functional-bad-option": (lambda: funchess.functional(mlp(), F.mse_loss, batch_norm="train"), InvalidArgumentError,
                              r"funchess\.functional\(model, loss_fn\): expected batch_norm to be one of 'error', 'batch'"),
    "functional-pattern-matches-nothing": (lambda: funchess.functional(mlp(), F.mse_loss, params=["head.*"]), InvalidArgumentError,
                                           r"params= pattern 'head\.\*' matches no parameter.*named_parameters"),
    "max-memory-infinite": (lambda: funchess.hessian(world().f, max_memory=float("inf")), InvalidArgumentError,
                            r"funchess\.hessian\(f, max_memory=inf\): expected max_memory to be a positive number.*'4GiB'"),
    "max-memory-nonsense": (lambda: funchess.ggn(world().f, max_memory="lots"), InvalidArgumentError,
                            r"funchess\.ggn\(f, max_memory='lots'\): expected max_memory"),
    "chunk-size-zero": (lambda: funchess.jacrev(world().f, chunk_size=0), InvalidArgumentError,
                        r"funchess\.jacrev\(f, chunk_size=0\): expected chunk_size .* positive int or 'auto'"),
    "unknown-mode": (lambda: funchess.hvp(world().f, mode="fast"), InvalidArgumentError,
                     r"funchess\.hvp\(f, mode='fast'\): expected mode to be one of.*mode='auto'"),
    "unknown-randomness": (lambda: funchess.per_sample_grad(world().f, randomness="maybe"), InvalidArgumentError,
                           r"funchess\.per_sample_grad\(f, randomness='maybe'\): expected randomness.*model\.eval\(\)"),
    "hvp-of-numbers": (lambda: funchess.hvp(lambda a, b: a * b)(1.0, 1.0), InvalidArgumentError,
                       r"funchess\.hvp\(f\)\(params, v, \.\.\.\): params is a float; expected a Tensor.*torch\.tensor"),
    "hvp-old-form-of-numbers": (lambda: _legacy(lambda a: a**3, (1.0,), (torch.ones(()),)), InvalidArgumentError,
                                r"funchess\.hvp\(f, primals, tangents\): primals\[0\] is a float.*torch\.tensor"),
    "hvp-old-form-of-nothing": (lambda: _legacy(lambda a: a, (), ()), InvalidArgumentError,
                                r"funchess\.hvp\(f, primals, tangents\): expected at least one argument to differentiate"),
    "hvp-of-a-function-of-nothing": (lambda: funchess.hvp(lambda: torch.ones(())), InvalidArgumentError,
                                     r"funchess\.hvp\(f\): expected f to take the point.*lambda params: loss\(params\)"),
    "hessian-of-a-module": (lambda: funchess.hessian(mlp()), InvalidArgumentError,
                            r"funchess\.hessian\(f\): expected f to be a function of the parameters.*funchess\.functional"),
}


def _legacy(f: Any, primals: Any, tangents: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return funchess.hvp(f, primals, tangents)


@pytest.mark.parametrize("case", OTHER_BAD)
def test_a_bad_tree_option_or_function_raises(case: str) -> None:
    call, error, pattern = OTHER_BAD[case]
    with pytest.raises(error, match=re.compile(pattern, re.DOTALL)):
        call()


def test_in_place_writes_into_data_raise_a_funchess_error_or_work() -> None:
    """A model that writes into its *inputs* (not its parameters): torch.func passes arguments that
    are not differentiated through and lets f write into them; where funchess holds them fixed it
    says so. Never a raw torch error."""

    class Scales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.mul_(1.0))

    for entry, (_, label, call) in ENTRIES.items():
        w = world(Scales())
        try:
            call(w)
        except FunchessError as exc:
            pattern = rf"({label}|{F_LABEL}).*writes in place.*(out-of-place form|Copy the tensor first inside f)"
            assert re.search(pattern, str(exc), re.DOTALL), (entry, str(exc))
        # anything else propagates and fails the test


# ----------------------------------------------------------------------------- memory budgets


def _wide(n: int = 600) -> World:
    model = nn.Sequential(nn.Linear(n // 10, 10), nn.Tanh(), nn.Linear(10, 3))
    w = world(model)
    return replace(w, x=torch.randn(6, n // 10))


MEMORY: dict[str, Callable[[World], Any]] = {
    "hessian": lambda w: funchess.hessian(w.f, max_memory="1MB")(w.params, w.x, w.y),
    "per_sample_hessian": lambda w: funchess.per_sample_hessian(w.f, max_memory="1MB")(w.params, w.x, w.y),
    "ggn": lambda w: funchess.ggn(w.f, max_memory="1MB")(w.params, w.x, w.y),
    "per_sample_ggn": lambda w: funchess.per_sample_ggn(w.f, max_memory="1MB")(w.params, w.x, w.y),
    "empirical_fisher": lambda w: funchess.empirical_fisher(w.f, max_memory="1MB")(w.params, w.x, w.y),
    "dataset_hessian": lambda w: funchess.dataset_hessian(w.f, max_memory="1MB")(w.params, w.batches),
    "dataset_ggn": lambda w: funchess.dataset_ggn(w.f, max_memory="1MB")(w.params, w.batches),
    "jacrev": lambda w: funchess.jacrev(lambda p: funchess.ravel(p) * 2, max_memory="1MB")(w.params),
    "jacfwd": lambda w: funchess.jacfwd(lambda p: funchess.ravel(p) * 2, max_memory="1MB")(w.params),
    "as_matrix": lambda w: _op(w).as_matrix(max_memory="1MB"),
}


@pytest.mark.parametrize("entry", MEMORY)
def test_every_dense_result_is_planned_before_it_is_allocated(entry: str, snapshot: Any) -> None:
    w = _wide()
    state = snapshot(w.model)
    label = {"as_matrix": r"funchess\.HessianOperator\.as_matrix\(\)"}.get(entry, rf"funchess\.{entry}\(f, max_memory='1MB'\)")
    with pytest.raises(MemoryBudgetError, match=re.compile(label + r".*needs .* of a budget of .*(larger max_memory|MiB)", re.DOTALL)) as info:
        MEMORY[entry](w)
    assert isinstance(info.value.plan, funchess.MemoryPlan) and not info.value.plan.fits
    state.assert_unchanged()


def test_jacfwd_of_jacrev_at_tens_of_gib_is_refused_before_allocating() -> None:
    """The issue's 40-80 GiB `jacfwd(jacrev(f))`: the outer result is planned once its first chunk
    has run, against the default budget (80 % of the free memory)."""
    n = 150_000  # a 90 GB float32 Hessian
    with pytest.raises(MemoryBudgetError, match=r"funchess\.jacfwd\(f, chunk_size=4\)\(\.\.\.\): the \(150,000, 150,000\) Jacobian needs"):
        funchess.jacfwd(funchess.jacrev(lambda w: (w**3).sum()), chunk_size=4)(torch.zeros(n))


# ----------------------------------------------------------------------------- optional dependencies


def test_a_missing_optional_dependency_is_one_error_type_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    w = world()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    for call in (lambda: funchess.dataset_hvp(w.f, progress=True)(w.params, w.v, w.batches),
                 lambda: funchess.eigsh(_op(w), k=1, progress=True),
                 lambda: funchess.cg(_op(w), w.v, progress=True)):
        with pytest.raises(UnsupportedError, match=r"progress=True needs tqdm, which is not installed.*pip install tqdm"):
            call()
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(UnsupportedError, match=r"to_scipy\(\): expected SciPy to be installed.*pip install"):
        _op(w).to_scipy()


def test_the_command_line_refuses_an_existing_file_as_out(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from funchess.cli import main

    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    assert main(["demo", "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"funchess: error: .*--out .*report\.txt: expected a folder to write into, got an existing "
                     r"file\. Pass --out with a new or existing folder", err), err
    assert existing.read_text() == "keep me"


# ----------------------------------------------------------------------------- what must work


def _same(a: Any, b: Any) -> None:
    la, lb = funchess._tree.tree_flatten(a)[0], funchess._tree.tree_flatten(b)[0]
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, equal_nan=True)


def _value(out: Any) -> Any:
    """The Tensors of a result (the fields of a spectral tool's result)."""
    if hasattr(out, "_asdict"):
        return [v for v in out._asdict().values() if isinstance(v, torch.Tensor)]
    if hasattr(out, "__dataclass_fields__"):
        return [getattr(out, k) for k in out.__dataclass_fields__ if isinstance(getattr(out, k), torch.Tensor)]
    return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_no_grad_and_inference_mode_work_and_change_nothing(entry: str, mode: str) -> None:
    """torch.func's transforms work under `torch.no_grad()` and `torch.inference_mode()`; so does
    every funchess entry point, with the result it gives outside them."""
    w = world()
    plain = _value(ENTRIES[entry][2](w))
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:  # the data made there too (inference tensors under inference_mode)
        inside = _value(ENTRIES[entry][2](replace(w, x=w.x.clone(), y=w.y.clone(), v={k: t.clone() for k, t in w.v.items()})))
    _same(plain, inside)


def test_a_userdict_batch_is_looked_into() -> None:
    """A `collections.UserDict` batch (HuggingFace's `BatchEncoding` is one) holds the Tensors."""

    class ByName(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    f, params = funchess.functional(ByName(), F.cross_entropy)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    user, plain = collections.UserDict({"x": x}), {"x": x}
    _same(funchess.hessian(f)(params, user, y), funchess.hessian(f)(params, plain, y))
    _same(funchess.dataset_hessian(f)(params, [(user, y)]), funchess.dataset_hessian(f)(params, [(plain, y)]))
    _same(funchess.per_sample_grad(f)(params, user, y), funchess.per_sample_grad(f)(params, plain, y))


def test_to_matrix_works_inside_vmap() -> None:
    ws = torch.randn(3, 2)
    inside = torch.func.vmap(lambda w: funchess.to_matrix(funchess.hessian(lambda q: (q["a"] ** 3).sum())({"a": w})))(ws)
    loop = torch.stack([funchess.to_matrix(funchess.hessian(lambda q: (q["a"] ** 3).sum())({"a": w})) for w in ws])
    torch.testing.assert_close(inside, loop)
    blocks = {"a": {"a": torch.randn(3, 2, 2), "b": torch.randn(3, 2, 1)}, "b": {"a": torch.randn(3, 1, 2), "b": torch.randn(3, 1, 1)}}
    torch.testing.assert_close(torch.func.vmap(funchess.to_matrix)(blocks), funchess.to_matrix(blocks, batch_dims=1))


def test_a_nan_loss_has_a_nan_hessian_and_nan_exact_reads() -> None:
    """Values are not checked by the transforms: a Hessian of a NaN loss is NaN (documented in
    `funchess.hessian`), and so are the exact `diagonal`, `trace` and `as_matrix` of its operator;
    the iterative tools refuse it (above)."""
    w = world()
    nan_x = w.x * float("nan")
    assert funchess.to_matrix(funchess.hessian(w.f)(w.params, nan_x, w.y)).isnan().all()
    op = funchess.HessianOperator(w.f, w.params, nan_x, w.y)
    assert funchess.trace(op).isnan() and op.as_matrix().isnan().all()
