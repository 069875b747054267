"""funchess.integrations.laplace: laplace-torch backends against laplace's own and the oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from laplace import Laplace  # noqa: E402
from laplace.curvature import (  # noqa: E402
    CurvatureInterface,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
)

import funchess  # noqa: E402
from funchess.integrations.laplace import FunchessEF, FunchessGGN, FunchessHessian  # noqa: E402
from funchess.testing import reference_hessian  # noqa: E402

from cases import CASES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64
OURS = {"ggn": FunchessGGN, "ef": FunchessEF, "hessian": FunchessHessian}
THEIRS = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF, "hessian": CurvlinopsHessian}


def _model(kind: str, dtype: torch.dtype = f64) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).to(dtype)


def _data(kind: str, likelihood: str, n: int = 7, dtype: torch.dtype = f64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype) if kind == "mlp" else torch.randn(n, 2, 6, 6, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype) if likelihood == "regression" else torch.randint(0, 3, (n,), generator=g)
    return x, y


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == f64 else {"rtol": 1e-4, "atol": 1e-5}


def _close(a: Tensor, b: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Relative to the largest entry: curvature entries span orders of magnitude."""
    tol = _tol(dtype)
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale * float(b.abs().max()))


def _kron_close(k1: Any, k2: Any, dtype: torch.dtype) -> None:
    assert [len(F) for F in k1.kfacs] == [len(F) for F in k2.kfacs]
    for F1, F2 in zip(k1.kfacs, k2.kfacs):
        for a, b in zip(F1, F2):
            _close(a, b, dtype)


def _exact_full(which: str, backend: CurvatureInterface, x: Tensor, y: Tensor) -> Tensor:
    """laplace's own torch.func routes (exact; curvlinops's `full` is float32-accurate only)."""
    if which == "ggn":
        return GGNInterface.full(backend, x, y)[1]  # type: ignore[arg-type]
    if which == "ef":
        return EFInterface.full(backend, x, y)[1]  # type: ignore[arg-type]
    f, params = funchess.functional(backend.model, backend.lossfunc)
    return backend.factor * funchess.to_matrix(reference_hessian(f, params, x, y))


# ----------------------------------------------------------------------------- the backend methods


@pytest.mark.parametrize("dtype", [f64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("which", ["ggn", "ef", "hessian"])
def test_methods_equal_laplace_backends(which: str, kind: str, likelihood: str, dtype: torch.dtype, snapshot: type) -> None:
    model = _model(kind, dtype)
    snap = snapshot(model)
    x, y = _data(kind, likelihood, dtype=dtype)
    ours, theirs = OURS[which](model, likelihood), THEIRS[which](model, likelihood)
    loss, H = ours.full(x, y, N=20)
    loss_c, H_c = theirs.full(x, y)
    _close(loss, loss_c, dtype)
    _close(H, _exact_full(which, theirs, x, y), dtype)
    _close(H, H_c, dtype, scale=1e4 if dtype == f64 else 1.0)  # curvlinops's full is float32-accurate
    loss_d, d = ours.diag(x, y, N=20)
    _close(loss_d, loss_c, dtype)
    _close(d, H.diagonal(), dtype)
    if which != "hessian":
        loss_k, K = ours.kron(x, y, N=20)
        loss_kc, K_c = theirs.kron(x, y, N=20)
        _close(loss_k, loss_kc, dtype)
        _kron_close(K, K_c, dtype)
        G, loss_g = ours.gradients(x, y)
        G_ref, loss_gref = CurvatureInterface.gradients(theirs, x, y)
        _close(G, G_ref, dtype)
        _close(loss_g, loss_gref, dtype)
    snap.assert_unchanged()


@pytest.mark.parametrize("which", ["ggn", "ef", "hessian"])
def test_diag_is_full_diagonal_and_batches_add_up(which: str) -> None:
    model = _model("conv")
    x, y = _data("conv", "classification", n=9)
    backend = OURS[which](model, "classification", sample_chunk_size=2)
    loss, H = backend.full(x, y)
    loss_d, d = backend.diag(x, y)
    torch.testing.assert_close(d, H.diagonal(), rtol=1e-12, atol=1e-14)
    l1, H1 = backend.full(x[:4], y[:4])
    l2, H2 = backend.full(x[4:], y[4:])
    torch.testing.assert_close(H1 + H2, H, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(l1 + l2, loss)
    torch.testing.assert_close(backend.diag(x[:4], y[:4])[1] + backend.diag(x[4:], y[4:])[1], d, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ["rows", "columns"])
@pytest.mark.parametrize("sub", [False, True])
def test_full_ggn_routes_agree(route: str, sub: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGN's `full` sums row outer products or takes GGN-vector products with basis vectors,
    whichever the FLOP estimate prefers; both equal laplace's torch.func route."""
    import funchess.integrations.laplace as integration

    monkeypatch.setattr(integration, "prefer_columns", lambda *args: route == "columns")
    for kind, likelihood in (("conv", "classification"), ("mlp", "regression")):
        model = _model(kind)
        x, y = _data(kind, likelihood)
        idx = torch.LongTensor([40, 3, 7, 0, 50]) if sub else None
        ours = FunchessGGN(model, likelihood, subnetwork_indices=idx)
        expected = GGNInterface.full(CurvlinopsGGN(model, likelihood, subnetwork_indices=idx), x, y)[1]  # type: ignore[arg-type]
        torch.testing.assert_close(ours.full(x, y)[1], expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    if route == "columns":
        with pytest.raises(funchess.MemoryBudgetError, match=r"FunchessGGN.full\(x, y\): the 51 x 51 matrix needs at least .*one product"):
            FunchessGGN(_model("mlp"), "classification", max_memory="1KiB").full(*_data("mlp", "classification"))


def test_route_choice() -> None:
    from funchess._ggn_factor import prefer_columns

    assert prefer_columns(7272, 32, 200, 2 * 7272)  # many outputs: products with basis vectors
    assert not prefer_columns(2058, 64, 10, 2 * 2058)  # an MLP with 10 classes: rows
    assert not prefer_columns(2230, 64, 10, 100_000)  # a conv net: rows


@given(
    n=st.integers(1, 9), chunk=st.one_of(st.just("auto"), st.integers(1, 8)), regression=st.booleans(),
    dtype=st.sampled_from([f64, torch.float32]), which=st.sampled_from(["ggn", "ef"]),
)
def test_chunked_rows_equal_laplace(n: int, chunk: Any, regression: bool, dtype: torch.dtype, which: str) -> None:
    likelihood = "regression" if regression else "classification"
    model = _model("mlp", dtype)
    x, y = _data("mlp", likelihood, n=n, dtype=dtype)
    ours = OURS[which](model, likelihood, sample_chunk_size=chunk)
    theirs = THEIRS[which](model, likelihood)
    H = _exact_full(which, theirs, x, y)
    _close(ours.diag(x, y)[1], H.diagonal(), dtype)
    _close(ours.full(x, y)[1], H, dtype)
    _close(ours.jacobians(x)[0], CurvatureInterface.jacobians(theirs, x)[0], dtype)


def test_subnetwork_and_last_layer() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification")
    idx = torch.LongTensor([0, 3, 25, 30, 44, 50])
    _, H = FunchessGGN(model, "classification").full(x, y)
    sub = FunchessGGN(model, "classification", subnetwork_indices=idx)
    torch.testing.assert_close(sub.full(x, y)[1], H[idx][:, idx], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sub.diag(x, y)[1], H.diagonal()[idx], rtol=1e-12, atol=1e-14)
    ordered = torch.LongTensor([50, 3, 30])  # laplace's order, not sorted
    torch.testing.assert_close(FunchessEF(model, "classification", subnetwork_indices=ordered).gradients(x, y)[0],
                               CurvatureInterface.gradients(CurvlinopsEF(model, "classification", subnetwork_indices=ordered), x, y)[0])
    features = laplace.utils.FeatureExtractor(model, last_layer_name="2")
    for which in ("ggn", "ef"):
        ours = OURS[which](features, "classification", last_layer=True)
        theirs = THEIRS[which](features, "classification", last_layer=True)
        torch.testing.assert_close(ours.full(x, y)[1], theirs.full(x, y)[1], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ours.diag(x, y)[1], ours.full(x, y)[1].diagonal(), rtol=1e-12, atol=1e-14)
        _kron_close(ours.kron(x, y, N=10)[1], theirs.kron(x, y, N=10)[1], f64)


# ----------------------------------------------------------------------------- Laplace end to end


def _fit(backend: type, sub: str, structure: str, likelihood: str, **kw: Any) -> Any:
    model = _model("mlp")
    x, y = _data("mlp", likelihood, n=20)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    la = Laplace(model, likelihood, subset_of_weights=sub, hessian_structure=structure, backend=backend, **kw)
    la.fit(loader)
    return la


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize(
    "sub,structure",
    [("all", "full"), ("all", "diag"), ("all", "kron"), ("last_layer", "full"), ("last_layer", "diag"),
     ("last_layer", "kron"), ("subnetwork", "full"), ("subnetwork", "diag")],
)
@pytest.mark.parametrize("which", ["ggn", "ef"])
def test_laplace_fit_equals_curvlinops(which: str, sub: str, structure: str, likelihood: str) -> None:
    kw = {"subnetwork_indices": torch.LongTensor([0, 3, 5, 30, 45, 50])} if sub == "subnetwork" else {}
    ours, theirs = _fit(OURS[which], sub, structure, likelihood, **kw), _fit(THEIRS[which], sub, structure, likelihood, **kw)
    if (which, sub, structure) == ("ef", "last_layer", "diag"):
        # laplace's EF diagonal of a last layer goes through CurvatureInterface.gradients, which
        # differentiates the wrong parameters there; check against plain per-sample backward passes
        model = _model("mlp")
        x, y = _data("mlp", likelihood, n=20)
        loss_fn = ours.backend.lossfunc
        grads = []
        for i in range(len(x)):
            w, b = model[2].weight, model[2].bias
            gw, gb = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), (w, b))
            grads.append(torch.cat([gw.flatten(), gb]))
        _close(ours.H, ours.backend.factor * torch.stack(grads).square().sum(0), f64)
        return
    P, P_c = ours.posterior_precision, theirs.posterior_precision
    if structure == "kron":
        P, P_c = P.to_matrix(), P_c.to_matrix()
    scale = 1e4 if structure == "full" else 1.0  # curvlinops's full is float32-accurate
    _close(P, P_c, f64, scale=scale)
    _close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood(), f64, scale=scale)
    x, _ = _data("mlp", likelihood, n=3, seed=5)
    pred, pred_c = ours(x, pred_type="glm"), theirs(x, pred_type="glm")
    for a, b in zip(pred if isinstance(pred, tuple) else (pred,), pred_c if isinstance(pred_c, tuple) else (pred_c,)):
        _close(a, b, f64, scale=scale)


def test_kron_laplace_with_layernorm_gets_exact_blocks() -> None:
    """curvlinops refuses K-FAC for a LayerNorm; funchess gives its exact (dense) GGN blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(f64)
    x, y = torch.randn(6, 3, dtype=f64), torch.randint(0, 2, (6,))
    _, K = FunchessGGN(model, "classification").kron(x, y, N=6)
    _, G = FunchessGGN(model, "classification").full(x, y)
    torch.testing.assert_close(K.kfacs[2][0], G[20:25, 20:25], rtol=1e-10, atol=1e-12)  # LayerNorm weight
    torch.testing.assert_close(K.kfacs[3][0], G[25:30, 25:30], rtol=1e-10, atol=1e-12)  # LayerNorm bias
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=FunchessGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    assert torch.isfinite(la(x[:2], pred_type="glm")).all()


# ----------------------------------------------------------------------------- where others are wrong


@pytest.mark.parametrize("name", ["layernorm", "attention_mha", "attention_sdpa", "transformer"])
def test_hessian_backend_equals_oracle(name: str) -> None:
    case = CASES[name](f64, "cpu")
    likelihood = "regression" if case.loss_fn is torch.nn.functional.mse_loss else "classification"
    backend = FunchessHessian(case.model, likelihood)
    loss, H = backend.full(case.inputs, case.targets)
    f, params = funchess.functional(case.model, backend.lossfunc)
    expected = backend.factor * funchess.to_matrix(reference_hessian(f, params, case.inputs, case.targets))
    funchess.testing.assert_hessian_close(H, expected)
    torch.testing.assert_close(backend.diag(case.inputs, case.targets)[1], expected.diagonal(), rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- dict inputs


class _DictModel(nn.Module):
    """A HuggingFace-style model: one dict in, logits out."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.inner(batch["input_ids"] * batch["attention_mask"].unsqueeze(-1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("which", ["ggn", "ef", "hessian"])
def test_dict_inputs(which: str) -> None:
    inner = _model("mlp")
    x, y = _data("mlp", "classification")
    batch = {"input_ids": x, "attention_mask": torch.ones(len(x), dtype=f64), "labels": y}
    plain, wrapped = OURS[which](inner, "classification"), OURS[which](_DictModel(inner), "classification")
    torch.testing.assert_close(wrapped.full(batch, y)[1], plain.full(x, y)[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(wrapped.diag(batch, y)[1], plain.diag(x, y)[1], rtol=1e-12, atol=1e-14)
    if which != "hessian":
        _kron_close(wrapped.kron(batch, y, N=7)[1], plain.kron(x, y, N=7)[1], f64)


def test_dict_loader_diag_ef_laplace() -> None:
    """laplace refuses DiagLaplace with dict batches on its curvlinops EF; FunchessEF fits them."""
    model = _DictModel(_model("mlp"))
    x, y = _data("mlp", "classification", n=12)
    rows = [{"input_ids": x[i], "attention_mask": torch.tensor(1.0, dtype=f64), "labels": y[i]} for i in range(12)]
    loader = DataLoader(rows, batch_size=5)  # type: ignore[arg-type]
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=FunchessEF)
    la.fit(loader)
    _, d = FunchessEF(model, "classification").diag({"input_ids": x, "attention_mask": torch.ones(12, dtype=f64)}, y)
    torch.testing.assert_close(la.H, d, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- memory


def test_memory_budget_errors_before_allocating() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification")
    with pytest.raises(funchess.MemoryBudgetError, match=r"FunchessGGN.diag\(x, y\): the diagonal of 51 parameters needs at least .*\(max_memory='1KiB'\)"):
        FunchessGGN(model, "classification", max_memory="1KiB").diag(x, y)
    with pytest.raises(funchess.MemoryBudgetError, match=r"FunchessEF.full\(x, y\): the 51 x 51 matrix needs at least"):
        FunchessEF(model, "classification", max_memory=2**10).full(x, y)
    with pytest.raises(funchess.MemoryBudgetError, match=r"needs"):
        FunchessHessian(model, "classification", max_memory="1KiB").full(x, y)


def test_many_outputs_diag_fits_where_dense_jacobians_would_not() -> None:
    """100 outputs, 16 samples, ~3.4k parameters: laplace's (B, C, P) Jacobian is 42 MiB in
    float64; the planned diagonal runs in a 12 MiB budget and equals laplace's own on small slices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.Tanh(), nn.Linear(30, 100)).to(f64)
    x, y = torch.randn(16, 10, dtype=f64), torch.randint(0, 100, (16,))
    P = sum(p.numel() for p in model.parameters())
    assert 16 * 100 * P * 8 > 3 * 12 * 2**20
    _, d = FunchessGGN(model, "classification", max_memory="12MiB").diag(x, y)
    ref = sum(GGNInterface.diag(CurvlinopsGGN(model, "classification"), x[i : i + 4], y[i : i + 4])[1] for i in range(0, 16, 4))
    torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-14)


def test_jacobians_equal_laplace_and_split_columns_in_order() -> None:
    """Per-sample Jacobians for the GLM predictive: equal to laplace's (`jacrev` of the batch),
    also when the budget splits each sample's 100 output directions into several passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.Tanh(), nn.Linear(30, 100)).to(f64)
    x = torch.randn(16, 10, dtype=f64)
    expected, f = CurvatureInterface.jacobians(CurvlinopsGGN(model, "classification"), x)
    for kw in ({}, {"max_memory": "60MB"}):
        J, out = FunchessGGN(model, "classification", **kw).jacobians(x)
        torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out, f)
    idx = torch.LongTensor([3000, 5, 17])
    J, _ = FunchessEF(model, "classification", subnetwork_indices=idx).jacobians(x)
    torch.testing.assert_close(J, expected[:, :, idx])
    batch = {"input_ids": x, "attention_mask": torch.ones(16, dtype=f64)}
    J, _ = FunchessHessian(_DictModel(model), "classification").jacobians(batch)
    torch.testing.assert_close(J, expected)


# ----------------------------------------------------------------------------- refusals and options


def test_refusals_and_options() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification")
    with pytest.raises(funchess.UnsupportedError, match=r"FunchessHessian.kron\(x, y, N\): a Kronecker-factored Hessian is not defined"):
        FunchessHessian(model, "classification").kron(x, y, N=7)
    emb = CASES["embedding"](f64, "cpu")
    with pytest.raises(funchess.UnsupportedError, match=r"'emb.weight' of Embedding 'emb' has no Kronecker factorisation"):
        FunchessGGN(emb.model, "classification").kron(emb.inputs, emb.targets, N=5)
    with pytest.raises(funchess.InvalidArgumentError, match=r"unexpected keyword argument\(s\) \['damping'\]"):
        FunchessGGN(model, "classification").diag(x, y, damping=1.0)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected sample_chunk_size to be 'auto' or a positive int"):
        FunchessGGN(model, "classification", sample_chunk_size=0)
    model.train()
    drop = nn.Sequential(model, nn.Dropout(0.2))
    with pytest.raises(funchess.UnsupportedError, match=r"Dropout '1' \(p=0.2\) in train mode"):
        FunchessGGN(drop, "classification").full(x, y)
    # sample_chunk_size fixes the samples per pass; the result does not depend on it
    torch.testing.assert_close(FunchessGGN(model, "classification", sample_chunk_size=3).full(x, y)[1],
                               FunchessGGN(model, "classification").full(x, y)[1], rtol=1e-12, atol=1e-14)


def test_stochastic_ggn_is_reproducible_and_unbiased() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification")
    exact = FunchessGGN(model, "classification").full(x, y)[1]

    def mc(seed: int, m: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return FunchessGGN(model, "classification", stochastic=True, num_samples=m, generator=gen).full(x, y)[1]

    torch.testing.assert_close(mc(1, 3), mc(1, 3))
    assert (mc(0, 3000) - exact).norm() / exact.norm() < 0.1


# ----------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("which", ["ggn", "hessian", "ef"])
def test_eig_lowrank_equals_dense_eigendecomposition(which: str) -> None:
    model = _model("mlp")
    x, y = _data("mlp", "regression", n=12)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    backend = OURS[which](model, "regression", low_rank=3, generator=torch.Generator().manual_seed(0))
    vecs, vals, loss = backend.eig_lowrank(loader)
    H = sum(backend.full(xb, yb)[1] for xb, yb in loader)
    expected = torch.linalg.eigvalsh(H).flip(0)[:3]
    torch.testing.assert_close(vals, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(H @ vecs, vecs * vals, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, backend.full(x, y)[0])


def test_lowrank_laplace_runs_once_laplace_lets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """laplace 0.3's LowRankLaplace refuses to start without the old `asdfghjkl` package, whatever
    the backend; past that gate it runs on FunchessHessian.eig_lowrank."""
    with pytest.raises(ImportError, match="asdfghjkl"):
        Laplace(_model("mlp"), "regression", subset_of_weights="all", hessian_structure="lowrank", backend=FunchessHessian)
    import laplace.baselaplace as base

    real: Callable[[str], Any] = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda name: object() if name == "asdfghjkl" else real(name))
    x, y = _data("mlp", "regression", n=12)
    la = Laplace(_model("mlp"), "regression", subset_of_weights="all", hessian_structure="lowrank",
                 backend=FunchessHessian, backend_kwargs={"low_rank": 4})
    la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    mean, var = la(x[:2], pred_type="glm")
    assert var.shape == (2, 3, 3) and torch.isfinite(var).all()


def test_function_space_laplace() -> None:
    """laplace's Nystrom function-space Laplace (ELLA) takes any backend's Jacobians; its default
    'gp' approximation (FunctionalLaplace, 'sod') accepts only laplace's own GGN backends."""
    x, y = _data("mlp", "classification", n=24)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    preds = []
    for backend in (FunchessGGN, CurvlinopsGGN):
        la = Laplace(_model("mlp"), "classification", subset_of_weights="all", hessian_structure="gp",
                     functional_approximation="nystrom", subsample_size=12, n_eigenvalues=4, backend=backend)
        la.fit(loader)
        preds.append(la(x[:3]))
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-8, atol=1e-10)
    with pytest.raises(AssertionError):
        Laplace(_model("mlp"), "classification", subset_of_weights="all", hessian_structure="gp", n_subset=8, backend=FunchessGGN)


def test_example_runs(tmp_path: Any) -> None:
    """examples/laplace_regression_classification.py --quick: both Laplaces fit, the picture is
    written, and the predictive uncertainty grows away from the data."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "laplace.png"
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run(
        [sys.executable, "examples/laplace_regression_classification.py", "--quick", "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    widen = float(run.stdout.split("(|x| > 5) is ")[1].split("x")[0])
    assert widen > 2 and out.stat().st_size > 10_000
