"""Every bad input raises a FunchessError subclass naming the call, expectation, what arrived and
the fix, and leaves the model unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funchess
from funchess import InvalidArgumentError, OutputError, StructureError, UnsupportedError
from funchess.testing import assert_hessian_close, reference_hessian


@pytest.fixture
def setup(snapshot):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    snap = snapshot(model)
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    yield model, f, params, x, y
    snap.assert_unchanged()


def test_loss_not_scalar(setup) -> None:  # type: ignore[no-untyped-def]
    model, _, params, x, y = setup
    f, _ = funchess.functional(model, lambda out, t: F.mse_loss(out, t, reduction="none"))
    with pytest.raises(OutputError, match=r"funchess\.hessian\(f\)\(\.\.\.\): f must return a scalar Tensor, got shape \(5, 2\)\. Reduce the loss"):
        funchess.hessian(f)(params, x, y)
    with pytest.raises(OutputError, match=r"funchess\.hvp\(f\)\(params, v, \.\.\.\): f must return a scalar Tensor, got shape \(5, 2\)"):
        funchess.hvp(lambda p: f(p, x, y))(params, params)


def test_loss_not_a_tensor() -> None:
    with pytest.raises(OutputError, match=r"f must return a scalar Tensor, got a float\. Return the loss"):
        funchess.hessian(lambda w: 3.0)(torch.ones(2))


def test_integer_loss() -> None:
    with pytest.raises((OutputError, InvalidArgumentError), match=r"floating-point"):
        funchess.hessian(lambda w: w.long().sum())(torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_non_floating_or_complex_params(dtype: torch.dtype) -> None:
    p = {"w": torch.ones(3).to(dtype)}
    with pytest.raises(InvalidArgumentError, match=rf"funchess\.hessian\(f\)\(\.\.\.\): argument 0\['w'\] has dtype {dtype}; expected a real floating-point Tensor\. Convert it"):
        funchess.hessian(lambda q: q["w"].real.float().sum())(p)


def test_complex_module_params_rejected_by_functional() -> None:
    model = nn.Linear(2, 2)
    model.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(InvalidArgumentError, match=r"funchess\.functional\(model, loss_fn\): parameter 'weight' has dtype torch\.complex64; expected a real floating-point Tensor\. Convert the model"):
        funchess.functional(model)


def test_params_key_not_in_model(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    bad = dict(params)
    bad["0.wieght"] = bad.pop("0.weight")
    with pytest.raises(InvalidArgumentError, match=r"params has key '0\.wieght', which is not a parameter of the model \(4 parameters\)\. Did you mean '0\.weight'.*Use the names of model\.named_parameters\(\)"):
        funchess.hessian(f)(bad, x, y)


def test_params_pattern_matches_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    model = setup[0]
    with pytest.raises(InvalidArgumentError, match=r"params= pattern 'encoder\.\*' matches no parameter of the model\..*named_parameters"):
        funchess.functional(model, params=["encoder.*"])


def test_params_pattern_matches_only_frozen(setup) -> None:  # type: ignore[no-untyped-def]
    model = setup[0]
    model[0].weight.requires_grad_(False)
    try:
        with pytest.raises(InvalidArgumentError, match=r"matches only frozen parameters \(0\.weight\) with requires_grad=False\. Set requires_grad=True"):
            funchess.functional(model, params="0.weight")
    finally:
        model[0].weight.requires_grad_(True)


def test_all_frozen(setup) -> None:  # type: ignore[no-untyped-def]
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match=r"expected at least one trainable parameter, got none.*Unfreeze some"):
        funchess.functional(model)


def test_not_a_module() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected a torch\.nn\.Module, got function"):
        funchess.functional(lambda x: x)  # type: ignore[arg-type]


def test_empty_params_dict(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, _, x, y = setup
    with pytest.raises(InvalidArgumentError, match=r"funchess\.hessian\(f\)\(\.\.\.\): argument 0 is an empty pytree .*nothing to differentiate\. Pass at least one parameter"):
        funchess.hessian(f)({}, x, y)
    with pytest.raises(InvalidArgumentError, match=r"params is an empty pytree"):
        funchess.hvp(lambda p: f(p, x, y))({}, {})


def test_tangents_structure_mismatch(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    v = {k: torch.ones_like(p) for k, p in params.items()}
    missing = dict(v)
    missing.pop("2.bias")
    with pytest.raises(StructureError, match=r"funchess\.hvp\(f\)\(params, v, \.\.\.\): v must have the structure of params; expected .*, got .*Build it from params"):
        funchess.hvp(f)(params, missing, x, y)
    wrong_shape = dict(v)
    wrong_shape["0.weight"] = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(StructureError, match=r"v\['0\.weight'\] must match params\['0\.weight'\]: expected shape \(4, 3\), dtype torch\.float64 on cpu, got shape \(3, 4\)"):
        funchess.hvp(f)(params, wrong_shape, x, y)
    wrong_dtype = {k: t.float() for k, t in v.items()}
    with pytest.raises(StructureError, match=r"expected shape \(4, 3\), dtype torch\.float64 on cpu, got shape \(4, 3\), dtype torch\.float32 on cpu"):
        funchess.hvp(f)(params, wrong_dtype, x, y)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_deprecated_hvp_form_checks_its_tuples(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    loss = lambda p: f(p, x, y)  # noqa: E731
    v = {k: torch.ones_like(p) for k, p in params.items()}
    with pytest.raises(StructureError, match=r"funchess\.hvp\(f, primals, tangents\): expected primals to be a tuple \(as in torch\.func\.jvp\), got dict\. Wrap it"):
        funchess.hvp(loss, params, (v,))
    with pytest.raises(StructureError, match=r"expected one tangent per primal \(1\), got 2"):
        funchess.hvp(loss, (params,), (v, v))
    with pytest.raises(StructureError, match=r"funchess\.vhp\(f, primals, tangents\): tangents\[0\] must have the structure of primals\[0\]"):
        funchess.vhp(loss, (params,), ({"x": v["0.bias"]},))


def test_has_aux_with_single_output(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    with pytest.raises(OutputError, match=r"funchess\.hessian\(f, has_aux=True\)\(\.\.\.\): with has_aux=True, f must return a pair \(value, aux\), got a Tensor\. Return `loss, aux` from f, or drop has_aux=True"):
        funchess.hessian(f, has_aux=True)(params, x, y)
    with pytest.raises(OutputError, match=r"with has_aux=True, f must return a pair \(value, aux\), got 3 values"):
        funchess.hvp(lambda p: (f(p, x, y), 1, 2), has_aux=True)(params, params)
    with pytest.raises(OutputError, match=r"funchess\.jacrev\(f, has_aux=True\)\(\.\.\.\): with has_aux=True"):
        funchess.jacrev(lambda p: p["2.bias"] * 2, has_aux=True)(params)


@pytest.mark.parametrize("argnums", [3, -4, (0, 5)])
def test_argnums_out_of_range(setup, argnums) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    with pytest.raises(InvalidArgumentError, match=r"argnums=.* is out of range for the 3 positional argument\(s\) given; expected indices in \[-3, 3\)\. Pass the arguments"):
        funchess.hessian(f, argnums)(params, x, y)


@pytest.mark.parametrize("argnums", [(), (0, 0), 1.5, "0"])
def test_argnums_malformed(setup, argnums) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    with pytest.raises(InvalidArgumentError, match=r"argnums"):
        funchess.hessian(f, argnums)(params, x, y)


def test_bad_mode_and_chunk_size() -> None:
    with pytest.raises(InvalidArgumentError, match=r"funchess\.hessian\(f, mode='fast'\): expected mode to be one of 'auto', 'rev-rev', 'fwd-rev', got 'fast'"):
        funchess.hessian(lambda w: w.sum(), mode="fast")  # type: ignore[arg-type]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidArgumentError, match=r"expected chunk_size \(rows or vectors per vectorised pass\) to be a positive int or 'auto', got"):
            funchess.hessian(lambda w: w.sum(), chunk_size=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"funchess\.jacfwd\(f, chunk_size=0\): expected chunk_size"):
        funchess.jacfwd(lambda w: w, chunk_size=0)
    with pytest.raises(InvalidArgumentError, match=r"expected f to be a function, got int"):
        funchess.hessian(3)  # type: ignore[arg-type]


def test_unused_parameter_is_zero_not_error(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    extra = dict(params)
    H = funchess.hessian(lambda p, a, b: f({k: v for k, v in p.items() if k != "2.bias"}, a, b))(extra, x, y)
    assert not H["2.bias"]["2.bias"].any()
    assert not H["0.weight"]["2.bias"].any()


def test_nan_in_loss_propagates_documented(setup) -> None:  # type: ignore[no-untyped-def]
    _, f, params, x, y = setup
    x = x.clone()
    x[0, 0] = float("nan")
    M = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    assert torch.isnan(M).any()  # documented: NaNs in f propagate, funchess does not hide them


def test_operator_without_second_derivative_is_unsupported() -> None:
    a = torch.randn(3, 2, dtype=torch.float64)

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a @ w, a).sum()  # _cdist_backward has no derivative

    with pytest.raises(UnsupportedError, match=r"funchess\.hessian\(f\)\(\.\.\.\): no composition can differentiate f twice; expected an operator with a double-backward or forward-mode rule, got rev-rev: .*cdist.*Replace the operator"):
        funchess.hessian(f)(torch.randn(2, 2, dtype=torch.float64))
    with pytest.raises(UnsupportedError, match=r"mode='rev-rev'\)\(\.\.\.\): an operator in f has no rule for mode 'rev-rev': .*Try mode='fwd-rev'"):
        funchess.hessian(f, mode="rev-rev")(torch.randn(2, 2, dtype=torch.float64))


def test_dropout_in_train_mode_under_fwd_rev() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match=r"funchess\.hessian\(f, mode='fwd-rev'\)\(\.\.\.\): f draws random numbers \(e\.g\. dropout in train mode\) with randomness='error'.*Call model\.eval\(\), or pass randomness='same'"):
        funchess.hessian(f, mode="fwd-rev")(params, x, y)


def test_to_matrix_and_from_matrix_errors() -> None:
    with pytest.raises(StructureError, match=r"funchess\.to_matrix\(H\): expected a Hessian pytree \(n\*n blocks.*got 3 leaves"):
        funchess.to_matrix({"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)})
    with pytest.raises(StructureError, match=r"funchess\.from_matrix\(M, params\): expected a square matrix of side 3 .*got \(3, 2\)"):
        funchess.from_matrix(torch.zeros(3, 2), {"w": torch.zeros(3)})
    with pytest.raises(StructureError, match=r"funchess\.unravel\(flat, like\): expected a Tensor whose last dimension has 3 entries"):
        funchess.unravel(torch.zeros(4), {"w": torch.zeros(3)})
    with pytest.raises(StructureError, match=r"funchess\.ravel\(tree\): expected a pytree whose leaves are Tensors"):
        funchess.ravel({"w": 3})


def test_in_place_write_into_an_undifferentiated_argument_names_the_fix() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.copy_(x)
        return (y * x).sum()

    with pytest.raises(UnsupportedError, match=r"funchess\.hessian\(f\)\(\.\.\.\): f writes in place into a Tensor it does not differentiate .*Copy the tensor first inside f \(e\.g\. `y = y\.clone\(\)`"):
        funchess.hessian(f)(torch.randn(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x = torch.randn(3, dtype=torch.float64)
    H = funchess.hessian(lambda x, y: f(x, y.clone()))(x, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(H, 2 * torch.eye(3, dtype=torch.float64))


class _DictModel(torch.nn.Module):
    """A model whose forward takes one dict positionally (curvlinops' and many custom models')."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2).double()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(batch["x"] * batch["scale"])


class _KeywordModel(torch.nn.Module):
    """A model fed `model(**inputs)` (HuggingFace's convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lin(x * scale)


def test_dict_inputs_reach_forward_as_its_signature_asks() -> None:
    torch.manual_seed(0)
    x, scale, y = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for model in (_DictModel(), _KeywordModel()):
        f, params = funchess.functional(model, torch.nn.functional.mse_loss)
        H = funchess.hessian(f)(params, {"x": x, "scale": scale}, y)
        expected = reference_hessian(lambda p: torch.nn.functional.mse_loss(torch.func.functional_call(model.lin, {k.split(".", 1)[1]: v for k, v in p.items()}, (x * scale,)), y), params)
        assert_hessian_close(H, expected, msg=type(model).__name__)
    f, params = funchess.functional(_KeywordModel(), torch.nn.functional.mse_loss, dict_inputs="positional")
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'scale'"):
        f(params, {"x": x, "scale": scale}, y)
    with pytest.raises(InvalidArgumentError, match=r"funchess\.functional\(model, loss_fn\): expected dict_inputs to be one of 'auto', 'keywords', 'positional', got 'kwargs'"):
        funchess.functional(_KeywordModel(), dict_inputs="kwargs")  # type: ignore[arg-type]


def test_backward_hooks_are_refused_with_the_fix_or_skipped_when_asked(snapshot) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    seen: list[int] = []
    handle = model[0].register_full_backward_hook(lambda m, gi, go: seen.append(1))
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    snap = snapshot(model)
    f, params = funchess.functional(model, torch.nn.functional.mse_loss)
    with pytest.raises(UnsupportedError, match=r"funchess\.hessian\(f\)\(\.\.\.\): the model has backward hooks on '0'; expected none.*Pass funchess\.functional\(model, loss_fn, backward_hooks='skip'\)"):
        funchess.hessian(f)(params, x, y)
    f, params = funchess.functional(model, torch.nn.functional.mse_loss, backward_hooks="skip")
    H = funchess.hessian(f)(params, x, y)
    handle.remove()
    assert_hessian_close(H, reference_hessian(funchess.functional(model, torch.nn.functional.mse_loss)[0], params, x, y))
    assert not seen  # the hook never ran while funchess differentiated
    handle = model[0].register_full_backward_hook(lambda m, gi, go: seen.append(1))
    model(x.requires_grad_()).sum().backward()  # and it is back in place afterwards
    assert seen
    handle.remove()
    for p in model.parameters():
        p.grad = None
    snap.assert_unchanged()


def test_warnings_about_the_users_inputs_are_shown_once_per_call_at_the_users_line() -> None:
    model = torch.nn.Linear(3, 1).double()
    f, params = funchess.functional(model, torch.nn.functional.mse_loss)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)  # targets (5,) vs outputs (5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fresh products evaluate f in every call (a kept linearisation evaluates it once, in the
        # first call, and warns there)
        op = funchess.HessianOperator(f, params, x, y, reuse=False)
        ggn_op = funchess.GGNOperator(f, params, x, y, reuse=False)
    for call in (
        lambda: funchess.hessian(f)(params, x, y),
        lambda: funchess.hessian(f, mode="fwd-rev", chunk_size=2)(params, x, y),
        lambda: funchess.ggn(f)(params, x, y),
        lambda: funchess.dataset_hessian(f)(params, [(x, y), (x, y)]),
        lambda: funchess.eigsh(op, generator=torch.Generator().manual_seed(0)),
        lambda: funchess.HessianOperator(f, params, x, y, reuse=False),  # made: one forward
        lambda: funchess.diagonal(ggn_op),
        lambda: ggn_op @ params,
    ):
        with warnings.catch_warnings():  # torch's own one-time deprecation notices on first use
            warnings.simplefilter("ignore")
            call()
        with pytest.warns(UserWarning, match=r"Using a target size") as record:
            call()
        relayed = [w for w in record if "target size" in str(w.message)]
        assert len(relayed) == 1, [str(w.message)[:40] for w in record]
        assert relayed[0].filename == __file__, relayed[0].filename
