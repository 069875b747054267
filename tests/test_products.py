"""Products without per-call overhead: `hvp`'s plain double backward with the rerouting learnt
then checked, curvature operators that keep their linearisation (`reuse=`), and the per-sample
Hessian's routes. Every path against the oracle in float64, kept products against fresh ones,
randomness, memory and the pinned messages."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import funchess
from funchess import _per_sample
from funchess._linearisation import meets_rerouted
from funchess.testing import assert_hessian_close, reference_ggn, reference_hessian, reference_hvp

from cases import CASES, Case

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
OPERATOR_CASES = ["mlp_mse", "mlp_ce", "conv", "layernorm", "batchnorm_eval", "attention_mha", "embedding", "tied", "selected"]


def _setup(name: str) -> tuple[Case, Any, dict[str, torch.Tensor], torch.Tensor]:
    case = CASES[name](F64, "cpu")
    f, params = case.functional()
    dense = funchess.to_matrix(reference_hessian(f, params, case.inputs, case.targets))
    return case, f, params, dense


def _vectors(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- hvp


def test_hvp_rerouting_learnt_then_checked_never_changes_results() -> None:
    """A function that meets layer_norm only on some calls: after a first call without it, the
    forward runs without the rerouting, the graph check finds the kernel and redoes the forward
    under the rerouting, so every result equals a fresh transform's."""
    torch.manual_seed(0)
    w = {"a": torch.randn(4, 4, dtype=F64), "g": torch.randn(4, dtype=F64)}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor, norm: bool) -> torch.Tensor:
        h = torch.tanh(x @ p["a"])
        if norm:
            h = F.layer_norm(h, (4,), p["g"])
        return (h**2).sum()

    x = torch.randn(3, 4, dtype=F64)
    v = {k: torch.randn_like(t) for k, t in w.items()}
    H = funchess.hvp(f)
    for norm in (False, True, False, True):
        got = H(w, v, x, norm)
        assert_hessian_close(got, reference_hvp(lambda p: f(p, x, norm), (w,), (v,)))
        fresh = funchess.hvp(f)(w, v, x, norm)  # its first call always runs under the rerouting
        assert all(torch.equal(got[k], fresh[k]) for k in w)


def test_graph_check_sees_rerouted_kernels() -> None:
    x = torch.randn(2, 4, requires_grad=True)
    assert meets_rerouted([F.layer_norm(x, (4,)).sum()])
    assert meets_rerouted([nn.BatchNorm1d(4)(x).sum()])
    assert meets_rerouted([nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))(x).sum()])
    assert meets_rerouted([nn.Embedding(5, 4, padding_idx=0)(torch.tensor([0, 1])).sum()])
    assert not meets_rerouted([torch.tanh(x @ x.T).sum()])


def test_hvp_fast_path_keeps_every_check() -> None:
    f = lambda p, x: (x @ p["w"] + p["b"]).pow(3).sum()  # noqa: E731
    p = {"w": torch.randn(3, 2, dtype=F64), "b": torch.randn(2, dtype=F64)}
    x = torch.randn(4, 3, dtype=F64)
    H = funchess.hvp(f)
    with pytest.raises(funchess.StructureError, match=r"funchess\.hvp\(f\)\(params, v, \.\.\.\): v must have the structure of params"):
        H(p, {"b": torch.zeros(2, dtype=F64), "w": torch.zeros(3, 2, dtype=F64)}, x)  # keys in another order
    with pytest.raises(funchess.StructureError, match=r"v\['w'\] must match params\['w'\]: expected shape \(3, 2\), dtype torch.float64"):
        H(p, {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(2, dtype=F64)}, x)
    with pytest.raises(funchess.InvalidArgumentError, match=r"params\['w'\] has dtype torch.int64; expected a real floating-point"):
        H({"w": torch.ones(3, 2, dtype=torch.long), "b": p["b"]}, {"w": torch.ones(3, 2, dtype=torch.long), "b": p["b"]}, x)
    with pytest.raises(funchess.InvalidArgumentError, match=r"params is an empty pytree"):
        H({}, {}, x)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    expected = reference_hvp(lambda q: f(q, x), (p,), (v,))
    with torch.no_grad():
        assert_hessian_close(H(p, v, x), expected)
    with torch.inference_mode():
        pi, vi, xi = {k: t.clone() for k, t in p.items()}, {k: t.clone() for k, t in v.items()}, x.clone()
    assert_hessian_close(H(pi, vi, xi), expected)  # inference tensors are copied
    nested = ({"w": p["w"]}, [p["b"]])
    got = funchess.hvp(lambda q, x: f({"w": q[0]["w"], "b": q[1][0]}, x))(nested, ({"w": v["w"]}, [v["b"]]), x)
    assert_hessian_close(got[0]["w"], expected["w"])
    assert_hessian_close(got[1][0], expected["b"])


def test_hvp_dropout_refused_and_replayed() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 1)).double().train()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    state = torch.get_rng_state()
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.hvp\(f\)\(params, v, \.\.\.\): f draws random numbers .* randomness='same'"):
        funchess.hvp(f)(params, v, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the failed call drew nothing
    torch.manual_seed(3)
    rev = funchess.hvp(f, randomness="same", mode="rev-rev")(params, v, x, y)
    torch.manual_seed(3)
    fwd = funchess.hvp(f, randomness="same", mode="fwd-rev")(params, v, x, y)
    assert_hessian_close(rev, fwd)


# ----------------------------------------------------------------------------- operators


@pytest.mark.parametrize("name", OPERATOR_CASES)
def test_kept_products_match_the_oracle_and_fresh_ones(name: str) -> None:
    case, f, params, dense = _setup(name)
    n = dense.shape[0]
    kept = funchess.HessianOperator(f, params, case.inputs, case.targets, reuse=True)
    fresh = funchess.HessianOperator(f, params, case.inputs, case.targets, reuse=False)
    V = _vectors(n, 3)
    assert_hessian_close(kept @ V[:, 0], dense @ V[:, 0])  # one vector: one backward of the kept graph
    assert kept.reused and not fresh.reused
    assert_hessian_close(kept @ V, dense @ V)  # k vectors: one batched backward
    assert_hessian_close(kept @ V, fresh @ V)
    batched = torch.func.vmap(lambda r: kept @ r)(V.T)  # torch.func.vmap over the vector
    assert_hessian_close(batched, (dense @ V).T)
    assert_hessian_close(kept.as_matrix(), dense)


@pytest.mark.parametrize("name", ["mlp_ce", "conv", "attention_mha"])
def test_kept_ggn_and_dataset_operators_match_the_oracle(name: str) -> None:
    case = CASES[name](F64, "cpu")
    f, params = case.functional()
    out, _ = case.functional(loss_fn=None)
    x, y = case.inputs, case.targets
    ggn = funchess.to_matrix(reference_ggn(out, lambda z: case.loss_fn(z, y), params, x))
    G = funchess.GGNOperator(f, params, x, y)
    assert_hessian_close(G.as_matrix(), ggn)
    assert G.reused
    V = _vectors(ggn.shape[0], 2)
    assert_hessian_close(G @ V, funchess.GGNOperator(f, params, x, y, reuse=False) @ V)
    assert_hessian_close(torch.func.vmap(lambda r: G @ r)(V.T), (ggn @ V).T)
    half = x.shape[0] // 2
    data = [(x[:half], y[:half]), (x[half:], y[half:])]
    dense = funchess.to_matrix(reference_hessian(f, params, x, y))
    for curvature, expected in (("hessian", dense), ("ggn", ggn)):
        D = funchess.DatasetOperator(f, params, data, curvature=curvature)
        assert_hessian_close(D @ V, expected @ V)
        assert D.reused
        assert_hessian_close(D @ V[:, 0], expected @ V[:, 0])
        assert_hessian_close(torch.func.vmap(lambda r: D @ r)(V.T), (expected @ V).T)  # noqa: B023


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    batch=st.integers(1, 6),
    k=st.integers(1, 5),
    chunk=st.sampled_from(["auto", 1, 2]),
    seed=st.integers(0, 50),
)
def test_kept_products_on_drawn_shapes(widths: list[int], batch: int, k: int, chunk: Any, seed: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(batch, widths[0], dtype=F64), torch.randn(batch, widths[-1], dtype=F64)
    dense = funchess.to_matrix(reference_hessian(f, params, x, y))
    op = funchess.HessianOperator(f, params, x, y, chunk_size=chunk)
    V = _vectors(dense.shape[0], k, seed)
    assert_hessian_close(op @ V, dense @ V)
    assert_hessian_close(op @ V[:, 0], dense @ V[:, 0])


def test_spectral_tools_identical_with_and_without_reuse() -> None:
    case, f, params, dense = _setup("mlp_ce")
    x, y = case.inputs, case.targets
    n = dense.shape[0]
    results = []
    for reuse in (True, False):
        op = funchess.HessianOperator(f, params, x, y, reuse=reuse)
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        eig = funchess.eigsh(op, k=3, generator=gen())
        sol = funchess.cg(op, torch.ones(n, dtype=F64), damping=1.0, rtol=1e-10)
        tr = funchess.trace_estimate(op, 12, generator=gen())
        sd = funchess.spectral_density(op, num_probes=2, num_steps=8, generator=gen())
        results.append((eig, sol, tr, sd))
    (e1, s1, t1, d1), (e0, s0, t0, d0) = results
    assert e1.num_hvps == e0.num_hvps and s1.num_hvps == s0.num_hvps and t1.num_hvps == t0.num_hvps
    assert_hessian_close(e1.eigenvalues, e0.eigenvalues)
    assert_hessian_close(e1.eigenvalues, torch.linalg.eigvalsh(dense)[-3:].flip(0))
    assert_hessian_close(s1.solution, s0.solution)
    assert_hessian_close(t1.value, t0.value)
    assert_hessian_close(d1.nodes, d0.nodes)
    assert_hessian_close(d1.weights, d0.weights)


def test_kept_graph_is_freed_with_the_operator() -> None:
    case, f, params, _ = _setup("mlp_ce")
    x, y = case.inputs, case.targets
    makers = [
        lambda: funchess.HessianOperator(f, params, x, y),
        lambda: funchess.GGNOperator(f, params, x, y),
        lambda: funchess.DatasetOperator(f, params, [(x[:3], y[:3]), (x[3:], y[3:])]),
    ]
    for make in makers:
        op = make()
        op @ torch.ones(op.shape[0], dtype=F64)
        lin: Any = op._kept.lin
        assert lin is not None
        roots = [weakref.ref(t) for t in (lin.parts[0] if hasattr(lin, "parts") else lin).xs]
        del op, lin
        assert all(r() is None for r in roots)  # freed by reference counting: no cycle holds the graph


def test_memory_budget_decides_reuse() -> None:
    case, f, params, dense = _setup("mlp_mse")
    v = _vectors(dense.shape[0], 1)[:, 0]
    tiny = funchess.HessianOperator(f, params, case.inputs, case.targets, max_memory=1024)
    assert_hessian_close(tiny @ v, dense @ v)
    assert not tiny.reused  # the kept graph would not fit half of 1 KiB: fresh products
    forced = funchess.HessianOperator(f, params, case.inputs, case.targets, reuse=True, max_memory=1024)
    assert_hessian_close(forced @ v, dense @ v)
    assert forced.reused
    D = funchess.DatasetOperator(f, params, [(case.inputs[:4], case.targets[:4]), (case.inputs[4:], case.targets[4:])], max_memory=1024)
    assert_hessian_close(D @ v, dense @ v)
    assert not D.reused  # the groups' graphs passed the limit: products iterate the data


def test_operator_randomness_kept_and_fresh_agree() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2)).double().train()
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    with pytest.raises(funchess.UnsupportedError, match=r"funchess\.HessianOperator\(f, params, \*data\)(?: @ v)?: f draws random numbers"):
        funchess.HessianOperator(f, params, x, y) @ torch.ones(26, dtype=F64)
    mats = []
    for reuse in (True, False):
        torch.manual_seed(7)
        op = funchess.HessianOperator(f, params, x, y, randomness="same", reuse=reuse)
        torch.manual_seed(123)  # draws after construction do not matter: the construction's are replayed
        mats.append(op.as_matrix())
    assert_hessian_close(mats[0], mats[1])
    torch.manual_seed(7)
    G = funchess.GGNOperator(f, params, x, y, randomness="same")
    torch.manual_seed(7)
    G0 = funchess.GGNOperator(f, params, x, y, randomness="same", reuse=False)
    assert_hessian_close(G.as_matrix(), G0.as_matrix())


def test_operator_without_double_backward_falls_back_to_fresh_products() -> None:
    a = torch.randn(3, 2, dtype=F64)
    f = lambda w: torch.cdist(a @ w, a).sum()  # noqa: E731  _cdist_backward has no derivative
    op = funchess.HessianOperator(f, torch.randn(2, 2, dtype=F64))
    with pytest.raises(funchess.UnsupportedError, match=r"no composition can differentiate f twice"):
        op @ torch.ones(4, dtype=F64)
    assert not op.reused


def test_reuse_option_errors() -> None:
    case, f, params, _ = _setup("mlp_mse")
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.HessianOperator\(f, params, \*data, reuse='yes'\): expected reuse to be True, False or 'auto', got 'yes'"):
        funchess.HessianOperator(f, params, case.inputs, case.targets, reuse="yes")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"reuse=True keeps the reverse-mode linearisation .* expected mode 'auto' or 'rev-rev'"):
        funchess.HessianOperator(f, params, case.inputs, case.targets, reuse=True, mode="fwd-rev")
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.GGNOperator\(f, params, inputs, targets, reuse=1\): expected reuse"):
        funchess.GGNOperator(f, params, case.inputs, case.targets, reuse=1)  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"max_memory"):
        funchess.DatasetOperator(f, params, [(case.inputs, case.targets)], max_memory="lots")


# ----------------------------------------------------------------------------- per-sample routes


@pytest.mark.parametrize("route", ["joint", "engine"])
@pytest.mark.parametrize("name", ["mlp_ce", "conv", "layernorm", "attention_mha", "embedding"])
def test_per_sample_routes_match_the_oracle(name: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_per_sample, "_JOINT_ENTRIES", 2**62 if route == "joint" else 0)
    case = CASES[name](F64, "cpu")
    f, params = case.functional()
    x, y = case.inputs, case.targets
    M = funchess.to_matrix(funchess.per_sample_hessian(f)(params, x, y), batch_dims=1)
    for i in (0, x.shape[0] - 1):
        expected = funchess.to_matrix(reference_hessian(f, params, x[i : i + 1], y[i : i + 1]))
        assert_hessian_close(M[i], expected)
    out = torch.empty_like(M)
    H = funchess.per_sample_hessian(f)(params, x, y, out=out)
    assert funchess.to_matrix(H, batch_dims=1).data_ptr() == out.data_ptr()
    assert_hessian_close(out, M)
