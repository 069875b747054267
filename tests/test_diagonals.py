"""Exact Hessian and GGN diagonals, per-sample diagonals and GGN factors against the oracle, on the
case table; the module-aware sweep against the generic paths; options and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import funchess
from funchess._diagonal import structured_hessian_diagonal
from funchess._diagonal._chain import build_chain
from funchess.testing import assert_hessian_close, reference_ggn, reference_hessian

from cases import CASES, Case

pytestmark = pytest.mark.usefixtures("one_thread")

#: the cases the module-aware sweep handles (nested Sequentials of known modules)
CHAINS = {"mlp_mse", "mlp_ce", "conv", "layernorm", "batchnorm_eval", "frozen", "noncontiguous", "selected"}


def _diag(H: Any, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.diagonal(H[k][k].reshape(p.numel(), p.numel())).reshape(p.shape) for k, p in params.items()}


def ref_hessian_diagonal(f: Any, params: dict[str, Tensor], *data: Any) -> dict[str, Tensor]:
    return _diag(reference_hessian(f, params, *data), params)


def ref_ggn_diagonal(f: Any, params: dict[str, Tensor], x: Any, y: Any, loss: Any = None) -> dict[str, Tensor]:
    loss = loss or f.loss_fn
    return _diag(reference_ggn(f.output, lambda z: loss(z, y), params, x), params)


def _setup(case: Case) -> tuple[Any, dict[str, Tensor]]:
    return case.functional()


def _first(t: Any, n: int) -> Any:
    return t[n : n + 1]


def _detached(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in tree.items()}


# ----------------------------------------------------------------------------- the case table


def test_batch_diagonals_match_the_oracle(case64: Case, snapshot) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(case64.model)
    f, params = _setup(case64)
    x, y = case64.inputs, case64.targets
    chain = build_chain(f, params) is not None
    assert chain == (case64.name in CHAINS)
    H = _detached(funchess.hessian_diagonal(f)(params, x, y))
    assert_hessian_close(H, ref_hessian_diagonal(f, params, x, y), msg=f"{case64.name} Hessian")
    fast = structured_hessian_diagonal(f, params, x, y)
    assert (fast is not None) == chain
    if chain:  # the module-aware rules agree with the generic block engine
        generic = funchess.hessian_diagonal(lambda p, a, b: f(p, a, b))(params, x, y)
        assert_hessian_close(fast, _detached(generic), msg=f"{case64.name} rules vs generic")
    G = funchess.ggn_diagonal(f)(params, x, y)
    assert_hessian_close(_detached(G), ref_ggn_diagonal(f, params, x, y), msg=f"{case64.name} GGN")
    plain = funchess.ggn_diagonal(lambda p, a: f.output(p, a), loss_fn=case64.loss_fn)(params, x, y)
    assert_hessian_close(_detached(plain), _detached(G), msg=f"{case64.name} GGN rules vs generic")
    snap.assert_unchanged()


def test_per_sample_diagonals_and_factors_match_the_oracle(case64: Case, snapshot) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(case64.model)
    f, params = _setup(case64)
    x, y = case64.inputs, case64.targets
    if not case64.per_sample:
        with pytest.raises(funchess.InvalidArgumentError, match=r"per_sample_ggn_diagonal\(f\).*couple the samples.*model\.eval\(\)"):
            funchess.per_sample_ggn_diagonal(f)(params, x, y)
        with pytest.raises(funchess.InvalidArgumentError, match="couple the samples"):
            funchess.per_sample_hessian_diagonal(f)(params, x, y)
        return
    psh = _detached(funchess.per_sample_hessian_diagonal(f)(params, x, y))
    psg = funchess.per_sample_ggn_diagonal(f)(params, x, y)
    V = funchess.per_sample_ggn_factor(f)(params, x, y)
    B = x.shape[0]
    assert all(t.shape[0] == B for t in psh.values())
    for n in range(min(B, 3)):  # each sample's own loss: a batch of one
        xn, yn = _first(x, n), _first(y, n)
        assert_hessian_close({k: t[n] for k, t in psh.items()}, ref_hessian_diagonal(f, params, xn, yn), msg=f"{case64.name} sample {n}")
        Gn = reference_ggn(f.output, lambda z, yn=yn: f.loss_fn(z, yn), params, xn)
        assert_hessian_close({k: t[n] for k, t in psg.items()}, _diag(Gn, params), msg=f"{case64.name} GGN sample {n}")
        torch.testing.assert_close(V.dense()[n], funchess.to_matrix(Gn), rtol=1e-9, atol=1e-12)
    assert_hessian_close(V.diagonal(), psg)
    snap.assert_unchanged()


# ----------------------------------------------------------------------------- losses


def _mlp(out: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(dtype)


def _log_cosh(z: Tensor, y: Tensor) -> Tensor:
    return torch.log(torch.cosh(z - y)).mean()


def _coupled(z: Tensor, y: Tensor) -> Tensor:  # the samples interact: (sum over the batch)^2
    return ((z - y).sum(0) ** 2).sum() + (z * y).sum()


def _losses() -> list[tuple[str, Any, Any]]:
    g = torch.Generator().manual_seed(7)
    B = 6
    classes = torch.randint(0, 3, (B,), generator=g)
    ignored = classes.clone()
    ignored[1] = -100
    probs = torch.rand(B, 3, generator=g, dtype=torch.float64).softmax(1)
    reals = torch.randn(B, 3, generator=g, dtype=torch.float64)
    bits = torch.randint(0, 2, (B, 3), generator=g).double()
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    return [
        ("ce", F.cross_entropy, classes),
        ("ce sum", nn.CrossEntropyLoss(reduction="sum"), classes),
        ("ce weight", nn.CrossEntropyLoss(weight=w), classes),
        ("ce ignore", nn.CrossEntropyLoss(ignore_index=-100), ignored),
        ("ce weight ignore sum", nn.CrossEntropyLoss(weight=w, reduction="sum"), ignored),
        ("ce smoothing", nn.CrossEntropyLoss(label_smoothing=0.2), classes),
        ("ce smoothing weight", nn.CrossEntropyLoss(label_smoothing=0.2, weight=w), classes),
        ("ce probabilities", F.cross_entropy, probs),
        ("ce probabilities weight", nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), probs),
        ("mse", F.mse_loss, reals),
        ("mse sum", nn.MSELoss(reduction="sum"), reals),
        ("bce logits", F.binary_cross_entropy_with_logits, bits),
        ("bce logits weights", nn.BCEWithLogitsLoss(weight=w, pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)), bits),
        ("bce", lambda z, y: F.binary_cross_entropy(torch.sigmoid(z), y), bits),
        ("log-cosh (generic)", _log_cosh, reals),
        ("coupled (generic, not separable)", _coupled, reals),
    ]


@pytest.mark.parametrize("name,loss,targets", _losses(), ids=[c[0] for c in _losses()])
def test_every_loss_gives_the_exact_diagonals(name: str, loss: Any, targets: Tensor) -> None:
    model = _mlp()
    x = torch.randn(targets.shape[0], 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f, params = funchess.functional(model, loss)
    assert_hessian_close(funchess.hessian_diagonal(f)(params, x, targets), ref_hessian_diagonal(f, params, x, targets), msg=name)
    assert_hessian_close(funchess.ggn_diagonal(f)(params, x, targets), ref_ggn_diagonal(f, params, x, targets), msg=name)
    if "coupled" in name:  # no per-sample structure: the batch paths above, and per-sample ones below
        assert structured_hessian_diagonal(f, params, x, targets) is None
    psh = funchess.per_sample_hessian_diagonal(f)(params, x, targets)
    psg = funchess.per_sample_ggn_diagonal(f)(params, x, targets)
    for n in (0, 1):
        xn, yn = _first(x, n), _first(targets, n)
        assert_hessian_close({k: t[n] for k, t in psh.items()}, ref_hessian_diagonal(f, params, xn, yn), msg=f"{name} {n}")
        assert_hessian_close({k: t[n] for k, t in psg.items()}, ref_ggn_diagonal(f, params, xn, yn), msg=f"{name} GGN {n}")


def test_a_signed_loss_hessian_gives_signed_factor_columns() -> None:
    f, params = funchess.functional(_mlp(), lambda z, y: (torch.sin(z) * y).sum())
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    V = funchess.per_sample_ggn_factor(f)(params, x, y)
    assert V.signs is not None and bool((V.signs < 0).any())
    for n in range(2):
        G = reference_ggn(f.output, lambda z, n=n: (torch.sin(z) * y[n : n + 1]).sum(), params, x[n : n + 1])
        torch.testing.assert_close(V.dense()[n], funchess.to_matrix(G), rtol=1e-9, atol=1e-12)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    Gv = V @ v
    flat = V @ funchess.ravel(v)
    torch.testing.assert_close(flat, torch.einsum("nij,j->ni", V.dense(), funchess.ravel(v)))
    torch.testing.assert_close(torch.cat([t.reshape(5, -1) for t in Gv.values()], 1), flat)


# ----------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("loss,targets", [
    (F.cross_entropy, torch.tensor([0, 2, 1, 1])),
    (F.mse_loss, torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)),
    (F.binary_cross_entropy_with_logits, torch.tensor([[0.0, 1.0, 1.0]] * 4, dtype=torch.float64)),
    (_log_cosh, torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)),
], ids=["ce", "mse", "bce", "generic"])
def test_monte_carlo_ggn_diagonal_is_unbiased_and_reproducible(loss: Any, targets: Tensor) -> None:
    f, params = funchess.functional(_mlp(), loss)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = funchess.ggn_diagonal(f)(params, x, targets)
    one = funchess.ggn_diagonal(f, samples=3, generator=torch.Generator().manual_seed(0))
    again = funchess.ggn_diagonal(f, samples=3, generator=torch.Generator().manual_seed(0))
    assert_hessian_close(one(params, x, targets), again(params, x, targets))
    many = funchess.ggn_diagonal(f, samples=4000, generator=torch.Generator().manual_seed(1))(params, x, targets)
    assert_hessian_close(many, exact, rtol=0.15, atol=0.03)
    V = funchess.per_sample_ggn_factor(f, samples=5, generator=torch.Generator().manual_seed(0))(params, x, targets)
    assert V.columns["0.weight"].shape == (4, 5, 5, 4)


# ----------------------------------------------------------------------------- options and errors


def test_chunks_budgets_and_routes_give_the_same_diagonals() -> None:
    case = CASES["conv"](torch.float64, "cpu")
    f, params = _setup(case)
    x, y = case.inputs, case.targets
    ref = ref_hessian_diagonal(f, params, x, y)
    for opts in ({"chunk_size": 1}, {"chunk_size": 3, "max_memory": "64KB"}):
        assert_hessian_close(funchess.hessian_diagonal(f, **opts)(params, x, y), ref)
    tiny = structured_hessian_diagonal(f, params, x, y, max_memory=1000)
    assert tiny is None  # one sample's curvature does not fit: the generic path takes over
    assert_hessian_close(structured_hessian_diagonal(f, params, x, y, sample_chunk_size=1, chunk_size=2), ref)
    g = ref_ggn_diagonal(f, params, x, y)
    for opts in ({"chunk_size": 1, "sample_chunk_size": 1}, {"sample_chunk_size": 3}, {"max_memory": 20000}):
        assert_hessian_close(funchess.ggn_diagonal(f, **opts)(params, x, y), g, msg=str(opts))
    plain = funchess.ggn_diagonal(lambda p, a: f.output(p, a), loss_fn=F.cross_entropy, max_memory=1000)
    with pytest.raises(funchess.MemoryBudgetError, match=r"ggn_diagonal\(f, loss_fn=cross_entropy, max_memory=1000\).*one sample's 3 columns.*Raise max_memory"):
        plain(params, x, y)
    psh = funchess.per_sample_hessian_diagonal(f, sample_chunk_size=3, chunk_size=2)(params, x, y)
    assert_hessian_close({k: t[0] for k, t in psh.items()}, ref_hessian_diagonal(f, params, x[:1], y[:1]))


def test_dropout_in_train_mode_is_refused_unless_randomness_is_given(snapshot) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double().train()
    snap = snapshot(model)
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for fn in (funchess.ggn_diagonal(f), funchess.per_sample_ggn_diagonal(f), funchess.per_sample_ggn_factor(f),
               funchess.per_sample_hessian_diagonal(f)):
        with pytest.raises(funchess.UnsupportedError, match=r"random numbers.*randomness='error'.*model\.eval\(\)"):
            fn(params, x, y)
    assert structured_hessian_diagonal(f, params, x, y) is None  # no rule for dropout in train mode
    torch.manual_seed(0)
    d = funchess.ggn_diagonal(f, randomness="different")(params, x, y)
    assert all(bool(t.isfinite().all()) for t in d.values())
    V = funchess.per_sample_ggn_factor(f, randomness="same")(params, x, y)
    assert V.columns["3.weight"].shape == (6, 3, 3, 5)
    snap.assert_unchanged()


def test_models_without_a_chain_structure_take_the_generic_paths() -> None:
    class Custom(nn.Module):  # a residual connection: not a chain
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(x + torch.tanh(self.a(x)))

    torch.manual_seed(0)
    f, params = funchess.functional(Custom().double(), F.cross_entropy)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert build_chain(f, params) is None
    assert_hessian_close(funchess.hessian_diagonal(f)(params, x, y), ref_hessian_diagonal(f, params, x, y))
    assert_hessian_close(funchess.ggn_diagonal(f)(params, x, y), ref_ggn_diagonal(f, params, x, y))


def test_hooks_tied_weights_and_train_mode_batch_norm_are_not_chains() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    f, params = funchess.functional(model, F.cross_entropy)
    assert build_chain(f, params) is not None
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    assert build_chain(f, params) is None
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    assert_hessian_close(funchess.hessian_diagonal(f)(params, x, y), ref_hessian_diagonal(f, params, x, y))
    handle.remove()
    model[2].weight = model[0].weight  # tied
    f, params = funchess.functional(model, F.cross_entropy)
    assert build_chain(f, params) is None
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().train()
    assert build_chain(*funchess.functional(bn, F.cross_entropy)) is None


@pytest.mark.parametrize("call,match", [
    (lambda f: funchess.ggn_diagonal(f, samples=0), r"ggn_diagonal\(f, samples=0\): expected samples .* positive int"),
    (lambda f: funchess.ggn_diagonal(f, generator=3), r"expected generator to be a torch.Generator"),
    (lambda f: funchess.per_sample_ggn_diagonal(f, chunk_size=0), r"per_sample_ggn_diagonal\(f, chunk_size=0\): expected chunk_size .*a positive int or 'auto'"),
    (lambda f: funchess.per_sample_ggn_factor(f, sample_chunk_size=-1), r"expected sample_chunk_size"),
    (lambda f: funchess.per_sample_hessian_diagonal(f, randomness="sometimes"), r"expected randomness to be one of"),
    (lambda f: funchess.ggn_diagonal(f, max_memory="lots"), r"expected max_memory"),
    (lambda f: funchess.ggn_diagonal(lambda p, x: x), r"needs the model output and the loss separately.*loss_fn="),
    (lambda f: funchess.per_sample_hessian_diagonal(3), r"expected f to be a function"),
])
def test_bad_options_are_refused_with_a_fix(call: Any, match: str) -> None:
    f, _ = funchess.functional(_mlp(), F.cross_entropy)
    with pytest.raises(funchess.InvalidArgumentError, match=match):
        call(f)


def test_bad_params_and_outputs_are_refused() -> None:
    f, params = funchess.functional(_mlp(), F.cross_entropy)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(funchess.InvalidArgumentError, match=r"ggn_diagonal\(f\)\(params, inputs, targets\): params\['0.weight'\] has dtype torch.int64; expected a real floating-point Tensor"):
        funchess.ggn_diagonal(f)({**params, "0.weight": torch.ones(5, 4, dtype=torch.long)}, x, y)
    with pytest.raises(funchess.InvalidArgumentError, match="params is an empty pytree"):
        funchess.per_sample_hessian_diagonal(f)({}, x, y)
    with pytest.raises(funchess.OutputError, match="model output to be a floating-point Tensor"):
        funchess.ggn_diagonal(lambda p, a: (a,), loss_fn=F.mse_loss)(params, x, y)
    none = funchess.functional(_mlp(), nn.CrossEntropyLoss(reduction="none"))[0]
    with pytest.raises(funchess.OutputError, match=r"ggn_diagonal\(f\)\(params, inputs, targets\): loss_fn must return a scalar floating-point Tensor, got shape \(3,\)"):
        funchess.ggn_diagonal(none)(params, x, y)
    with pytest.raises(funchess.OutputError, match="scalar"):
        funchess.hessian_diagonal(none)(params, x, y)
    V = funchess.per_sample_ggn_factor(f)(params, x, y)
    with pytest.raises(funchess.StructureError, match=r"GGNFactor @ v: expected 43 entries"):
        V @ torch.ones(3)


@pytest.mark.parametrize("name", ["layernorm", "attention_sdpa"])
def test_calls_work_under_no_grad_and_inference_mode(name: str) -> None:
    case = CASES[name](torch.float64, "cpu")
    f, params = _setup(case)
    x, y = case.inputs, case.targets
    ref_h, ref_g = ref_hessian_diagonal(f, params, x, y), ref_ggn_diagonal(f, params, x, y)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            xi, yi = x.clone(), y.clone()  # inference tensors under inference_mode
            H = structured_hessian_diagonal(f, params, xi, yi)
            G = funchess.ggn_diagonal(f)(params, xi, yi)
            P = funchess.per_sample_hessian_diagonal(f)(params, xi, yi)
        if H is not None:
            assert_hessian_close(H, ref_h)
        assert_hessian_close(G, ref_g)
        assert all(t.shape[0] == x.shape[0] for t in P.values())


def test_batch_norm_in_train_mode_and_backward_hooks_follow_the_functional_options() -> None:
    case = CASES["batchnorm_train"](torch.float64, "cpu")
    x, y = case.inputs, case.targets
    f, params = funchess.functional(case.model, case.loss_fn)  # batch_norm="error" (the default)
    with pytest.raises(funchess.InvalidArgumentError, match=r"ggn_diagonal\(f\)\(params, inputs, targets\): the model has BatchNorm1d '1' in train mode.*batch_norm='batch'"):
        funchess.ggn_diagonal(f)(params, x, y)
    model = _mlp()
    handle = model[0].register_full_backward_hook(lambda m, gi, go: None)
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    with pytest.raises(funchess.UnsupportedError, match="backward hooks"):
        funchess.per_sample_ggn_diagonal(f)(params, x, y)
    f, params = funchess.functional(model, F.cross_entropy, backward_hooks="skip")
    assert_hessian_close(funchess.ggn_diagonal(f)(params, x, y), ref_ggn_diagonal(f, params, x, y))
    handle.remove()
