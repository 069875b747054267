"""funchess.distributed on real gloo process groups of 2 and 3 spawned ranks, against the
single-process functions on the concatenated shards in float64.

The ranks run several scenarios per spawn (`spawn_ranks.scenarios`: spawning costs far more than
the tiny problems), one module-scoped spawn per group size; each test asserts on its scenario's
outcome on every rank (the scenario already compared with the single-process result inside the
rank) and on the answers being identical on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import funchess
import funchess.distributed as fd
from funchess.distributed import _data as fd_data
from funchess.distributed import _sharded as fd_sharded
from funchess.testing import assert_hessian_close

import cases
import spawn_ranks

MODULE = "test_distributed"
GROUP_TIMEOUT = 20.0  # seconds: every collective in the spawned groups
SHORT_TIMEOUT = 1.5  # the subgroup of the timeout scenario
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64: the same sums in another order


# ----------------------------------------------------------------------------- the problem


def _model(hidden: int = 6, seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(hidden, 2))
    return nn.Sequential(*layers).double()


def _data(n: int = 23, seed: int = 1, classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g) if classes else torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, y


def _bounds(n: int, world: int) -> list[int]:
    """Unequal shards: rank r's share grows with r; with 3 ranks, rank 0's shard is empty."""
    weights = [r if world == 3 else r + 1 for r in range(world)]
    cuts = [0]
    for w in weights:
        cuts.append(min(n, cuts[-1] + round(n * w / sum(weights))))
    cuts[-1] = n
    return cuts


def _shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = _bounds(len(x), world)
    xs, ys = x[c[rank] : c[rank + 1]], y[c[rank] : c[rank + 1]]
    return [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, len(xs), batch)]


def _flat(tree: Any) -> list[float]:
    return funchess.ravel(tree).tolist()  # type: ignore[no-any-return]


def _close(a: Any, b: Any) -> None:
    torch.testing.assert_close(funchess.ravel(a), funchess.ravel(b), **TIGHT)


def _problem(reduction: str = "mean", classes: bool = False) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model = _model()
    loss = functools.partial(F.cross_entropy if classes else F.mse_loss, reduction=reduction)
    f, params = funchess.functional(model, loss)
    x, y = _data(classes=classes)
    return f, params, x, y


# ----------------------------------------------------------------------------- scenarios (run on the ranks)


@contextlib.contextmanager
def _all_reduces() -> Iterator[list[int]]:
    """Count the torch.distributed.all_reduce calls in the block (funchess looks it up per call)."""
    calls: list[int] = []
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original


def data_parallel(rank: int, world: int) -> dict[str, list[float]]:
    """Every data-set function, mean and sum, MSE and cross-entropy, equals the single-process
    function on the concatenated shards (with 3 ranks, two of the configurations: they run
    slower); each costs the entry check and ONE all-reduce of its result."""
    out: dict[str, list[float]] = {}
    configs = [("mean", False), ("sum", True)] if world == 3 else [(r, c) for r in ("mean", "sum") for c in (False, True)]
    for reduction, classes in configs:
        f, params, x, y = _problem(reduction, classes)
        mine, everything = _shard(x, y, rank, world), [(x, y)]
        torch.manual_seed(7)
        v = {k: torch.randn(p.shape, dtype=p.dtype) for k, p in params.items()}  # the same on every rank
        with _all_reduces() as calls:
            H = fd.dataset_hessian(f, reduction=reduction)(params, mine)
        assert len(calls) == 2, calls
        _close(H, funchess.dataset_hessian(f, reduction=reduction)(params, everything))
        Hv = fd.dataset_hvp(f, reduction=reduction)(params, v, mine)
        _close(Hv, funchess.dataset_hvp(f, reduction=reduction)(params, v, everything))
        G = fd.dataset_ggn(f, reduction=reduction)(params, mine)
        _close(G, funchess.dataset_ggn(f, reduction=reduction)(params, everything))
        with _all_reduces() as calls:
            Gv = fd.dataset_ggn_vp(f, reduction=reduction)(params, v, mine)
        assert len(calls) == 2, calls
        _close(Gv, funchess.dataset_ggn_vp(f, reduction=reduction)(params, v, everything))
        g = fd.dataset_grad(f, reduction=reduction)(params, mine)
        _close(g, torch.func.grad(f)(params, x, y))
        out[f"{reduction}-{'ce' if classes else 'mse'}"] = _flat(H) + _flat(Hv) + _flat(G) + _flat(Gv) + _flat(g)
    return out


def weighted_loss(rank: int, world: int) -> list[float]:
    """A cross-entropy with class weights and ignored targets divides its mean by the counted
    class weights (the loss's normaliser), not the sample count: so does the data-parallel
    mean. Rank 0's shard has only ignored targets (its normaliser is 0)."""
    model = _model()
    loss = functools.partial(F.cross_entropy, weight=torch.tensor([0.3, 2.0], dtype=torch.float64), ignore_index=-1)
    f, params = funchess.functional(model, loss)
    x, y = _data(classes=True)
    y = y.clone()
    y[::3] = -1  # some targets ignored everywhere
    c = _bounds(len(x), world)
    y[c[0] : c[1]] = -1  # and all of rank 0's
    mine, everything = _shard(x, y, rank, world), [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)]
    v = {k: torch.ones_like(p) for k, p in params.items()}
    H = fd.dataset_hessian(f)(params, mine)
    _close(H, funchess.dataset_hessian(f)(params, everything))
    _close(H, funchess.hessian(f)(params, x, y))  # one batch: the loss's own mean
    _close(fd.dataset_hvp(f)(params, v, mine), funchess.dataset_hvp(f)(params, v, everything))
    _close(fd.dataset_ggn(f)(params, mine), funchess.dataset_ggn(f)(params, everything))
    _close(fd.dataset_grad(f)(params, mine), torch.func.grad(f)(params, x, y))
    op = fd.dataset_operator(f, params, mine)
    M = torch.linspace(-1, 1, op.shape[0] * 3, dtype=torch.float64).reshape(-1, 3)
    torch.testing.assert_close(op @ M, funchess.to_matrix(H) @ M, **TIGHT)
    return _flat(H)


def options_pass_through(rank: int, world: int) -> list[float]:
    """Options of the single-process function reach it (mode, chunk_size); loaders work; a
    progress bar may be asked on one rank only (None: only on a terminal, so none here)."""
    f, params, x, y = _problem()
    c = _bounds(len(x), world)
    loader = DataLoader(TensorDataset(x[c[rank] : c[rank + 1]], y[c[rank] : c[rank + 1]]), batch_size=5)
    H = fd.dataset_hessian(f, mode="rev-rev", chunk_size=7, progress=None if rank == 0 else False)(params, loader)
    _close(H, funchess.hessian(f)(params, x, y))
    return _flat(H)


def operator_tools(rank: int, world: int) -> dict[str, Any]:
    """eigsh, trace_estimate, spectral_density, cg and batched products run unchanged on the
    operator and agree with the same tools on the dense data-set Hessian."""
    f, params, x, y = _problem()
    mine = _shard(x, y, rank, world)
    H = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    dense = funchess.DenseOperator(H, params)
    op = fd.dataset_operator(f, params, mine)
    n = H.shape[0]

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(3)

    eig = funchess.eigsh(op, k=3, generator=gen())
    torch.testing.assert_close(eig.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8, atol=1e-10)
    tr = funchess.trace_estimate(op, 30, generator=gen())
    torch.testing.assert_close(tr.value, funchess.trace_estimate(dense, 30, generator=gen()).value, **TIGHT)
    sd = funchess.spectral_density(op, num_probes=3, num_steps=12, generator=gen())
    ref = funchess.spectral_density(dense, num_probes=3, num_steps=12, generator=gen())
    torch.testing.assert_close(sd.nodes, ref.nodes, rtol=1e-8, atol=1e-10)
    b = torch.linspace(-1, 1, n, dtype=torch.float64)
    sol = funchess.cg(op, b, damping=1.0, rtol=1e-12)
    torch.testing.assert_close(sol.solution, torch.linalg.solve(H + torch.eye(n, dtype=H.dtype), b), rtol=1e-9, atol=1e-11)
    M = torch.linspace(0, 1, n * 20, dtype=torch.float64).reshape(n, 20).cos()
    for cols in (M[:, :5], M):  # one data-set product per vector, and one vmapped pass for 20
        torch.testing.assert_close(op @ cols, H @ cols, **TIGHT)
    torch.testing.assert_close(op.as_matrix(), H, **TIGHT)
    v = funchess.unravel(M[:, 0], params)
    _close(op @ v, funchess.unravel(H @ M[:, 0], params))
    ggn = fd.dataset_operator(f, params, mine, curvature="ggn", chunk_size=4)
    G = funchess.to_matrix(funchess.ggn(f)(params, x, y))
    for cols in (M[:, :5], M):
        torch.testing.assert_close(ggn @ cols, G @ cols, **TIGHT)
    top = funchess.eigsh(ggn, k=1, generator=gen()).eigenvalues
    torch.testing.assert_close(top, torch.linalg.eigvalsh(G)[-1:], rtol=1e-8, atol=1e-10)
    return {"eig": eig.eigenvalues.tolist(), "trace": float(tr.value), "density": sd.density.tolist(),
            "cg": sol.solution.tolist(), "ggn": top.tolist()}


def operator_vectors_differ(rank: int, world: int) -> list[str]:
    """Random draws from rank-dependent states, or different numbers of vectors, raise on every rank."""
    f, params, x, y = _problem()
    op = fd.dataset_operator(f, params, _shard(x, y, rank, world))
    messages = []
    torch.manual_seed(100 + rank)
    with pytest.raises(funchess.StructureError, match="same vectors") as e1:
        funchess.eigsh(op, k=1)
    with pytest.raises(funchess.StructureError, match="numbers of vectors") as e2:
        op @ torch.ones(op.shape[0], 1 + rank, dtype=torch.float64)
    messages += [str(e1.value), str(e2.value)]
    # the group is still usable afterwards
    with _all_reduces() as calls:
        op @ torch.ones(op.shape[0], 3, dtype=torch.float64)
    assert len(calls) == 2, calls  # the check of the vectors and ONE all-reduce for the 3 products
    return messages


def sharded(rank: int, world: int) -> dict[str, Any]:
    """sharded_hessian in every gather mode equals funchess.hessian; every pair has one owner."""
    model = _model(hidden=5)
    model.add_module("3", nn.Tanh())
    model.add_module("4", nn.Linear(2, 2).double())
    f, params = funchess.functional(model, F.mse_loss)
    x, y = _data(n=9)
    ref = funchess.hessian(f)(params, x, y)
    H = fd.sharded_hessian(f)(params, x, y)
    _close(H, ref)
    H0 = fd.sharded_hessian(f, gather="rank0", mode="rev-rev")(params, x, y)
    if rank == 0:
        _close(H0, ref)
    else:
        assert H0 is None
    S = fd.sharded_hessian(f, gather="none")(params, x, y)
    assert isinstance(S, fd.ShardedHessian) and S.world_size == world and S.rank == rank
    names = list(params)
    assert len(S.owners) == len(names) * (len(names) + 1) // 2
    for (a, b), blk in S.blocks.items():
        assert S.owner(a, b) == rank == S.owner(b, a)
        torch.testing.assert_close(blk, ref[a][b], **TIGHT)
        torch.testing.assert_close(S.block(b, a), ref[b][a], **TIGHT)
    assert len({r for r in S.owners.values()}) == min(world, len(S.owners))  # every rank has work
    _close(S.gather(), ref)
    again = S.gather(to="rank0")
    assert (again is None) == (rank != 0)
    top = funchess.eigsh(S.operator(), k=2, generator=torch.Generator().manual_seed(1)).eigenvalues
    torch.testing.assert_close(top, torch.linalg.eigvalsh(funchess.to_matrix(ref)).flip(0)[:2], rtol=1e-8, atol=1e-10)
    elsewhere = next((a, b) for (a, b), r in S.owners.items() if r != rank)
    with pytest.raises(funchess.InvalidArgumentError, match="does not hold this block"):
        S.block(*elsewhere)
    with pytest.raises(funchess.MemoryBudgetError, match=r"rank 0 of \d would not fit .*gathering to='rank0'"):
        S.gather(to="rank0", max_memory=S.gather_bytes("rank0", 1) + 1)  # enough for all but rank 0
    with pytest.raises(funchess.MemoryBudgetError, match=r"rank 0 of \d would not fit .* to compute"):
        fd.sharded_hessian(f, max_memory="1MiB")(params, x, y)
    return {"H": _flat(H), "owners": sorted((a, b, r) for (a, b), r in S.owners.items()), "top": top.tolist()}


def shapes_differ(rank: int, world: int) -> tuple[str, float]:
    """Parameters of different shapes on one rank: every rank raises at once (no hang)."""
    model = _model(hidden=6 + (rank == world - 1))
    f, params = funchess.functional(model, F.mse_loss)
    x, y = _data()
    start = time.monotonic()
    with pytest.raises(funchess.StructureError, match=r"parameter names, shapes and dtypes") as e:
        fd.dataset_hessian(f)(params, _shard(x, y, rank, world))
    return str(e.value), time.monotonic() - start


def values_differ(rank: int, world: int) -> str:
    """Parameters of equal shapes but different values (no broadcast from rank 0) raise."""
    f, params = funchess.functional(_model(seed=rank), F.mse_loss)
    x, y = _data()
    with pytest.raises(funchess.StructureError, match="equal values") as e:
        fd.dataset_grad(f)(params, _shard(x, y, rank, world))
    return str(e.value)


def padded_sampler(rank: int, world: int) -> list[float]:
    """DistributedSampler's padding is refused; drop_last=True is exact over the samples kept."""
    f, params, x, y = _problem()
    data = TensorDataset(x, y)  # 23 samples: not divisible by 2 or 3
    padded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))
    with pytest.raises(funchess.InvalidArgumentError, match="pads the data set's 23 samples with .* duplicate"):
        fd.dataset_hessian(f)(params, padded)
    wrong = DataLoader(data, sampler=DistributedSampler(data, num_replicas=world + 1, rank=rank, drop_last=True))
    with pytest.raises(funchess.InvalidArgumentError, match="num_replicas"):
        fd.dataset_hvp(f)(params, params, wrong)
    dropped = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False, drop_last=True))
    H = fd.dataset_hessian(f)(params, dropped)
    kept = sorted(i for r in range(world) for i in DistributedSampler(data, num_replicas=world, rank=r, shuffle=False, drop_last=True))
    _close(H, funchess.hessian(f)(params, x[kept], y[kept]))
    return _flat(H)


def ddp_model(rank: int, world: int) -> list[float]:
    """A DistributedDataParallel model is unwrapped: by funchess.functional (names without
    `module.`) or here, for a ModuleFunction built over DDP itself (names with it); DDP's
    forward (and its collectives) never runs."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    calls = []
    ddp.register_forward_pre_hook(lambda *a: calls.append(1))
    x, y = _data()
    mine = _shard(x, y, rank, world)
    inner, inner_params = funchess.functional(model, F.mse_loss)
    reference = funchess.to_matrix(funchess.hessian(inner)(inner_params, x, y))
    f, params = funchess.functional(ddp, F.mse_loss)
    assert list(params) == list(inner_params)
    torch.testing.assert_close(funchess.to_matrix(fd.dataset_hessian(f)(params, mine)), reference, **TIGHT)
    f = funchess.ModuleFunction(ddp, F.mse_loss)
    params = {f"module.{k}": p for k, p in inner_params.items()}
    H = fd.dataset_hessian(f)(params, mine)
    assert list(H) == list(params) and list(H["module.0.weight"]) == list(params)
    torch.testing.assert_close(funchess.to_matrix(H), reference, **TIGHT)
    G = fd.dataset_ggn(f)(params, mine)  # the GGN splits model and loss: needs the unwrapped ModuleFunction
    torch.testing.assert_close(funchess.to_matrix(G), funchess.to_matrix(funchess.ggn(inner)(inner_params, x, y)), **TIGHT)
    op = fd.dataset_operator(f, params, mine)
    torch.testing.assert_close(funchess.ravel(op @ params), reference @ funchess.ravel(inner_params), **TIGHT)
    S = fd.sharded_hessian(f)(params, x, y)
    torch.testing.assert_close(funchess.to_matrix(S), reference, rtol=1e-8, atol=1e-10)
    g = fd.dataset_grad(f)(params, mine)
    torch.testing.assert_close(funchess.ravel(g), funchess.ravel(torch.func.grad(inner)(inner_params, x, y)), **TIGHT)
    assert not calls, "DDP's forward ran"
    return funchess.ravel(H).tolist()


def dropout_on_one_rank(rank: int, world: int) -> str:
    """Dropout in train mode is refused; when only one rank's model draws, every rank raises."""
    model = _model(dropout=True)
    model.train(rank == world - 1)
    f, params = funchess.functional(model, F.mse_loss)
    x, y = _data()
    with pytest.raises(funchess.UnsupportedError, match="random|dropout") as e:
        fd.dataset_hessian(f)(params, _shard(x, y, rank, world))
    with pytest.raises(funchess.UnsupportedError, match="random|dropout"):
        fd.dataset_grad(f)(params, _shard(x, y, rank, world))
    return str(e.value)


def rank_missing(rank: int, world: int) -> tuple[str, float]:
    """A rank that never makes the call: the others raise DistributedError after the timeout."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
    f, params, x, y = _problem()
    if rank == world - 1:
        time.sleep(SHORT_TIMEOUT + 1.0)
        return "", 0.0
    start = time.monotonic()
    with pytest.raises(fd.DistributedError, match="entry check failed on rank") as e:
        fd.dataset_hessian(f, group=group)(params, _shard(x, y, rank, world))
    return str(e.value), time.monotonic() - start


TWO = ["data_parallel", "weighted_loss", "options_pass_through", "operator_tools", "operator_vectors_differ", "sharded",
       "shapes_differ", "values_differ", "padded_sampler", "ddp_model", "dropout_on_one_rank", "rank_missing"]
THREE = ["data_parallel", "weighted_loss", "operator_tools", "sharded", "shapes_differ"]


# ----------------------------------------------------------------------------- the tests (run here)


def _spawn(world: int, names: list[str]) -> list[dict[str, tuple[str, Any]]]:
    return spawn_ranks.run(spawn_ranks.scenarios, world, names, MODULE, timeout=120.0, group_timeout=GROUP_TIMEOUT)


@pytest.fixture(scope="module")
def two() -> list[dict[str, tuple[str, Any]]]:
    return _spawn(2, TWO)


@pytest.fixture(scope="module")
def three() -> list[dict[str, tuple[str, Any]]]:
    return _spawn(3, THREE)


def _values(ranks: list[dict[str, tuple[str, Any]]], name: str) -> list[Any]:
    """Every rank's value of scenario `name`, failing with the first rank's traceback."""
    for r, outcomes in enumerate(ranks):
        kind, value = outcomes[name]
        if kind != "ok":
            pytest.fail(f"scenario {name!r} failed on rank {r}:\n{value}")
    return [outcomes[name][1] for outcomes in ranks]


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request: pytest.FixtureRequest) -> list[dict[str, tuple[str, Any]]]:
    return request.getfixturevalue({2: "two", 3: "three"}[request.param])  # type: ignore[no-any-return]


def test_data_parallel_functions_equal_the_concatenated_shards_on_every_rank(ranks: Any) -> None:
    values = _values(ranks, "data_parallel")
    assert all(v == values[0] for v in values[1:])  # bit for bit


def test_a_weighted_loss_is_normalised_by_its_weights_over_every_rank(ranks: Any) -> None:
    values = _values(ranks, "weighted_loss")
    assert all(v == values[0] for v in values[1:])


def test_options_reach_the_single_process_function(two: Any) -> None:
    values = _values(two, "options_pass_through")
    assert values[0] == values[1]


def test_operator_runs_the_spectral_tools_with_one_answer(ranks: Any) -> None:
    values = _values(ranks, "operator_tools")
    assert all(v == values[0] for v in values[1:])


def test_operator_refuses_vectors_that_differ_between_ranks(two: Any) -> None:
    messages = _values(two, "operator_vectors_differ")
    assert "generator=torch.Generator().manual_seed(seed)" in messages[0][0]


def test_sharded_hessian_in_every_gather_mode(ranks: Any) -> None:
    values = _values(ranks, "sharded")
    assert all(v == values[0] for v in values[1:])


def test_a_shape_mismatch_raises_on_every_rank_within_the_timeout(ranks: Any) -> None:
    values = _values(ranks, "shapes_differ")
    for message, seconds in values:
        assert seconds < GROUP_TIMEOUT / 4, seconds
        assert "(6, 3)" in message and "(7, 3)" in message


def test_different_parameter_values_raise(two: Any) -> None:
    messages = _values(two, "values_differ")
    assert "Broadcast the parameters from rank 0" in messages[0]


def test_a_padding_distributed_sampler_is_refused(two: Any) -> None:
    values = _values(two, "padded_sampler")
    assert values[0] == values[1]


def test_ddp_models_are_unwrapped(two: Any) -> None:
    values = _values(two, "ddp_model")
    assert values[0] == values[1]


def test_dropout_on_one_rank_raises_on_every_rank(two: Any) -> None:
    messages = _values(two, "dropout_on_one_rank")
    assert "rank 1 raised UnsupportedError" in messages[0]


def test_a_missing_rank_times_out_with_a_distributed_error(two: Any) -> None:
    (message, seconds), _ = _values(two, "rank_missing")
    assert SHORT_TIMEOUT * 0.8 < seconds < SHORT_TIMEOUT + 5, seconds
    assert "1.5 s" in message and "same funchess.distributed call" in message


# ----------------------------------------------------------------------------- one process


def test_without_a_process_group_every_function_is_the_single_process_one() -> None:
    assert not dist.is_initialized()
    f, params, x, y = _problem()
    data = [(x[:10], y[:10]), (x[10:], y[10:])]
    v = {k: torch.ones_like(p) for k, p in params.items()}
    _close(fd.dataset_hessian(f)(params, data), funchess.dataset_hessian(f)(params, data))
    _close(fd.dataset_ggn(f)(params, data), funchess.dataset_ggn(f)(params, data))
    _close(fd.dataset_hvp(f)(params, v, data), funchess.dataset_hvp(f)(params, v, data))
    _close(fd.dataset_ggn_vp(f)(params, v, data), funchess.dataset_ggn_vp(f)(params, v, data))
    _close(fd.dataset_grad(f)(params, data), torch.func.grad(f)(params, x, y))
    op = fd.dataset_operator(f, params, data)
    H = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    torch.testing.assert_close(op.as_matrix(), H, **TIGHT)
    _close(fd.sharded_hessian(f)(params, x, y), funchess.hessian(f)(params, x, y))
    S = fd.sharded_hessian(f, gather="none")(params, x, y)
    assert set(S.owners.values()) == {0} and len(S.blocks) == len(S.owners)
    _close(S.gather(), funchess.hessian(f)(params, x, y))


def test_bad_arguments_raise_before_any_collective() -> None:
    f, params, x, y = _problem()
    with pytest.raises(funchess.InvalidArgumentError, match=r"dataset_hessian\(f, reduction='avg'\): expected reduction"):
        fd.dataset_hessian(f, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match="unknown option 'chunks'.*mode, chunk_size"):
        fd.dataset_hessian(f, chunks=3)
    with pytest.raises(funchess.InvalidArgumentError, match="gather to be 'all'"):
        fd.sharded_hessian(f, gather="some")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match="got option 'blocks'"):
        fd.sharded_hessian(f, blocks="diagonal")
    with pytest.raises(funchess.InvalidArgumentError, match="read many times"):
        fd.dataset_operator(f, params, iter([(x, y)]))
    with pytest.raises(funchess.InvalidArgumentError, match="curvature to be 'hessian' or 'ggn'"):
        fd.dataset_operator(f, params, [(x, y)], curvature="fisher")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match="unknown option 'chunks'.*funchess.DatasetOperator"):
        fd.dataset_operator(f, params, [(x, y)], chunks=3)
    with pytest.raises(funchess.InvalidArgumentError, match="no initialised process group"):
        fd.dataset_hessian(f, group=object())(params, [(x, y)])
    with pytest.raises(funchess.InvalidArgumentError, match="no rank's data yielded a sample"):
        fd.dataset_grad(f)(params, [])
    with pytest.raises(funchess.StructureError, match="pair"):
        fd.dataset_grad(f)(params, [x])
    with pytest.raises(funchess.UnsupportedError, match="dropout"):
        g, p = funchess.functional(_model(dropout=True).train(), F.mse_loss)
        fd.dataset_grad(g)(p, [(x, y)])
    S = fd.sharded_hessian(f, gather="none")(params, x, y)
    with pytest.raises(funchess.MemoryBudgetError, match="would not fit .*gathering to='all'"):
        S.gather(max_memory=S.gather_bytes("all", 0) - 1)
    with pytest.raises(funchess.InvalidArgumentError, match="not a parameter name"):
        S.owner("0.weight", "9.bias")


def _simulated_ranks(local: Any, shards: list[Any], reduction: str) -> torch.Tensor:
    """What the all-reduce computes from every rank's (sum, normaliser, samples): Σ sums / Σ
    normalisers for "mean"."""
    parts = [local(shard) for shard in shards]
    total = sum(w for _, w, _ in parts)
    summed = sum(p for p, _, _ in parts if p is not None)
    assert isinstance(summed, torch.Tensor)
    return summed / total if reduction == "mean" else summed


@settings(max_examples=8)
@given(
    n=st.integers(3, 14), world=st.integers(1, 4), batch=st.integers(1, 5), data=st.data(),
    reduction=st.sampled_from(["mean", "sum"]), dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_local_sums_and_counts_add_up_to_the_whole_data_set(
    n: int, world: int, batch: int, data: st.DataObject, reduction: str, dtype: torch.dtype
) -> None:
    """The per-kind "local sum and normaliser" steps, over any split into shards (empty ones too)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=world - 1, max_size=world - 1)))
    bounds = [0, *cuts, n]
    model = _model(hidden=3).to(dtype)
    f, params = funchess.functional(model, functools.partial(F.mse_loss, reduction=reduction))
    x, y = (t.to(dtype) for t in _data(n=n))
    shards = [[(x[i : min(j, i + batch)], y[i : min(j, i + batch)]) for i in range(a, j, batch)]
              for a, j in zip(bounds[:-1], bounds[1:])]
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    H = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    transform = funchess.dataset_hessian(f, reduction=reduction)
    got = _simulated_ranks(lambda s: fd_data._local_hessian(transform, f, params, s, reduction), shards, reduction)
    torch.testing.assert_close(got, H, **tol)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    product = funchess.dataset_hvp(f, reduction=reduction)
    got = _simulated_ranks(lambda s: fd_data._local_hvp(product, f, params, v, s, reduction), shards, reduction)
    torch.testing.assert_close(got, H @ funchess.ravel(v), **tol)
    got = _simulated_ranks(lambda s: fd_data._local_grad("test", f, params, s, reduction, "error"), shards, reduction)
    torch.testing.assert_close(got, funchess.ravel(torch.func.grad(f)(params, x, y)), **tol)


@pytest.mark.parametrize("name", ["mlp_ce", "conv", "embedding", "gru", "tied", "batchnorm_train", "selected"])
def test_local_hessians_of_two_shards_on_the_case_table(name: str) -> None:
    """Models of the case table whose inputs or parameters differ in kind (index inputs, recurrent
    layers, tied weights, batch norm in train mode, a parameter subset): the shards' sums and
    sample counts give the sample-weighted mean of the shards' Hessians (the Hessian of the whole
    batch when no layer couples the samples). The core functions are tested on the whole table."""
    case = cases.CASES[name](torch.float64, "cpu")
    f, params = case.functional()
    x, t = case.inputs, case.targets
    half = len(x) // 2
    shards = [[(x[:half], t[:half])], [(x[half:], t[half:])]]
    transform = funchess.dataset_hessian(f)
    got = _simulated_ranks(lambda s: fd_data._local_hessian(transform, f, params, s, "mean"), shards, "mean")
    ref = [funchess.to_matrix(funchess.hessian(f)(params, a, b)) for (a, b), in shards]  # single-process
    want = (half * ref[0] + (len(x) - half) * ref[1]) / len(x)
    assert_hessian_close(funchess.from_matrix(got, params), funchess.from_matrix(want, params))


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8), world=st.integers(1, 5),
       row_cost=st.floats(0, 1e4))
def test_block_assignment_covers_every_pair_once_and_balances_the_cost(sizes: list[int], world: int, row_cost: float) -> None:
    owners = fd_sharded.assign(sizes, row_cost, world)
    k = len(sizes)
    assert sorted(owners) == [(i, j) for i in range(k) for j in range(i, k)]
    assert owners == fd_sharded.assign(sizes, row_cost, world)  # the same on every rank
    # the cost model: entries written, plus the row passes once per row parameter a rank holds
    full = {p: sizes[p[0]] * (row_cost + sizes[p[1]]) for p in owners}
    load = [sum(sizes[i] * sizes[j] for (i, j), q in owners.items() if q == r)
            + sum(sizes[i] * row_cost for i in {i for (i, _), q in owners.items() if q == r}) for r in range(world)]
    assert max(load) <= sum(full.values()) / world + max(full.values()) + 1e-6  # the greedy bound


def test_import_funchess_does_not_import_the_distributed_submodule() -> None:
    code = "import sys, funchess; print('funchess.distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_is_documented_with_an_example() -> None:
    for name in fd.__all__:
        doc = getattr(fd, name).__doc__ or ""
        assert "Example" in doc and ">>>" in doc, f"funchess.distributed.{name} has no example"


def test_the_example_runs_under_torchrun() -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_curvature.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(example), "--quick"], capture_output=True,
                              text=True, timeout=120, env=env)

    out = run()
    if out.returncode != 0 and "terminate called without an active exception" in out.stderr and "same on every rank: True" in out.stdout:
        # torch's gloo teardown sometimes aborts a rank at exit after all its work (rare, under
        # load; benchmarks/RESULTS.md): the example's own checks passed. Once more, and that must be clean.
        out = run()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 rank(s)" in out.stdout and "same on every rank: True" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)")
def test_nccl_on_cuda_tensors() -> None:
    """NCCL refuses two ranks on one GPU: one rank per GPU, at most 2."""
    world = min(2, torch.cuda.device_count())
    values = spawn_ranks.run(_nccl_rank, world, timeout=180.0, backend="nccl")
    assert all(v == values[0] for v in values[1:])


def _nccl_rank(rank: int, world: int) -> list[float]:  # pragma: no cover - needs a GPU
    f, params = funchess.functional(_model().cuda(), F.mse_loss)
    x, y = (t.cuda() for t in _data())
    mine = _shard(x, y, rank, world)
    H = fd.dataset_hessian(f)(params, mine)
    _close(H, funchess.hessian(f)(params, x, y))
    op = fd.dataset_operator(f, params, mine)
    top = funchess.eigsh(op, k=1, generator=torch.Generator().manual_seed(0)).eigenvalues
    _close(fd.sharded_hessian(f)(params, x, y), H)
    _close(fd.sharded_hessian(f, gather="rank0")(params, x, y) if rank == 0 else H, H)
    return _flat(H) + top.tolist()
