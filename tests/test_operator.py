"""Matrix-free operators: products in every input form against the dense Hessian, operator
identities (symmetry, batched == looped, chunked == unchunked, transpose), SciPy interop, the
extensible operations and the pinned error messages."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import funchess
from funchess.testing import assert_hessian_close

from cases import CASES, Case

OPERATOR_CASES = ["mlp_mse", "mlp_ce", "conv", "layernorm", "batchnorm_eval", "tied", "selected"]
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(name: str) -> tuple[Case, Any, dict[str, torch.Tensor], torch.Tensor]:
    case = CASES[name](F64, "cpu")
    f, params = case.functional()
    dense = funchess.to_matrix(case.reference())
    return case, f, params, dense


def _randn_like(params: dict[str, torch.Tensor], seed: int, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*batch, *p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}


@pytest.fixture(params=OPERATOR_CASES)
def setup(request: pytest.FixtureRequest) -> tuple[Case, Any, dict[str, torch.Tensor], torch.Tensor]:
    return _setup(request.param)


def test_products_in_every_form_match_the_dense_hessian(setup, snapshot) -> None:  # type: ignore[no-untyped-def]
    case, f, params, dense = setup
    snap = snapshot(case.model)
    op = funchess.HessianOperator(f, params, case.inputs, case.targets)
    n = dense.shape[0]
    assert op.shape == (n, n) and op.dtype == F64 and op.symmetric
    assert_hessian_close(op.as_matrix(), dense)
    v = _randn_like(params, 1)
    hv = op @ v
    assert list(hv) == list(params) and all(hv[k].shape == p.shape for k, p in params.items())
    assert_hessian_close(funchess.ravel(hv), dense @ funchess.ravel(v))
    flat = funchess.ravel(v)
    assert_hessian_close(op @ flat, dense @ flat)
    V = torch.randn(n, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert_hessian_close(op @ V, dense @ V)
    snap.assert_unchanged()


def test_identities_symmetry_batched_chunked_transpose() -> None:
    case, f, params, dense = _setup("mlp_ce")
    op = funchess.HessianOperator(f, params, case.inputs, case.targets)
    v, w = _randn_like(params, 3), _randn_like(params, 4)
    lhs = torch.dot(funchess.ravel(op @ v), funchess.ravel(w))
    rhs = torch.dot(funchess.ravel(v), funchess.ravel(op @ w))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)  # <Hv, w> == <v, Hw>
    batch = _randn_like(params, 5, batch=(6,))
    batched = op @ batch
    looped = [op @ {k: t[i] for k, t in batch.items()} for i in range(6)]
    for k in params:
        assert batched[k].shape == (6, *params[k].shape)
        torch.testing.assert_close(batched[k], torch.stack([r[k] for r in looped]), rtol=1e-10, atol=1e-12)
    V = torch.cat([t.reshape(6, -1) for t in batch.values()], 1).T  # the same 6 vectors as columns
    for chunk in (1, 4, 100):
        chunked = funchess.HessianOperator(f, params, case.inputs, case.targets, chunk_size=chunk)
        torch.testing.assert_close(chunked @ V, op @ V, rtol=1e-10, atol=1e-12)
    assert op.T is op and op.transpose() is op


def test_fwd_rev_mode_and_float32() -> None:
    case, f, params, dense = _setup("mlp_mse")
    op = funchess.HessianOperator(f, params, case.inputs, case.targets, mode="fwd-rev")
    assert_hessian_close(op.as_matrix(), dense)
    case32 = CASES["mlp_mse"](torch.float32, "cpu")
    f32, p32 = case32.functional(params=None)
    op32 = funchess.HessianOperator(f32, p32, case32.inputs, case32.targets)
    assert op32.dtype == torch.float32
    assert_hessian_close(op32.as_matrix(), dense.float())


@given(
    sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=3),
    k=st.integers(1, 9),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_function_operator_batched_equals_looped(sizes: list[tuple[int, int]], k: int, chunk: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    structure = {f"p{i}": torch.zeros(a, b, dtype=F64) for i, (a, b) in enumerate(sizes)}
    n = sum(a * b for a, b in sizes)
    A = torch.randn(n, n, generator=gen, dtype=F64)
    A = A + A.T

    def fn(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return funchess.unravel(A @ funchess.ravel(v), structure)

    ops = [
        funchess.FunctionOperator(fn, structure, chunk_size=chunk),
        funchess.FunctionOperator(fn, structure, vectorize=False),
        funchess.DenseOperator(A, structure),
    ]
    V = torch.randn(n, k, generator=gen, dtype=F64)
    for op in ops:
        torch.testing.assert_close(op @ V, A @ V, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.as_matrix(), A, rtol=1e-12, atol=1e-12)
        batch = funchess.unravel(V.T.contiguous(), structure)
        out = op @ batch
        torch.testing.assert_close(torch.cat([t.reshape(k, -1) for t in out.values()], 1), (A @ V).T)


def test_transpose_of_non_symmetric_operators() -> None:
    A = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    fop = funchess.FunctionOperator(lambda v: A @ v, torch.zeros(5, dtype=F64), symmetric=False)
    dop = funchess.DenseOperator(A)
    assert not dop.symmetric and not fop.symmetric
    for op in (fop, dop):
        torch.testing.assert_close(op.T.as_matrix(), A.T, rtol=1e-12, atol=1e-12)
    assert fop.T.T is fop
    sym = funchess.DenseOperator(A + A.T)
    assert sym.symmetric and sym.T is sym


def test_dense_operator_from_hessian_pytree_and_exact_operations() -> None:
    case, f, params, dense = _setup("layernorm")
    H = funchess.hessian(f)(params, case.inputs, case.targets)
    dop = funchess.DenseOperator(H, params)
    hop = funchess.HessianOperator(f, params, case.inputs, case.targets, chunk_size=16)
    assert dop.as_matrix() is funchess.to_matrix(H)
    for op in (dop, hop):
        diag = funchess.diagonal(op)
        assert list(diag) == list(params) and all(diag[k].shape == p.shape for k, p in params.items())
        assert_hessian_close(funchess.ravel(diag), dense.diagonal())
        torch.testing.assert_close(funchess.trace(op), dense.trace(), rtol=1e-10, atol=1e-12)


def test_singledispatch_operations_are_extensible() -> None:
    class Scaled(funchess.LinearOperator):
        def __init__(self, c: float) -> None:
            super().__init__(torch.zeros(4, dtype=F64), symmetric=True)
            self.c = c

        def mv(self, v: torch.Tensor) -> torch.Tensor:
            return self.c * v

    @funchess.diagonal.register(Scaled)
    def _(op: Scaled) -> torch.Tensor:
        return torch.full((4,), -1.0, dtype=F64)  # a marker: the registered method runs

    op = Scaled(2.0)
    assert torch.equal(funchess.diagonal(op), torch.full((4,), -1.0, dtype=F64))
    assert float(funchess.trace(op)) == -4.0  # the generic trace goes through the registered diagonal
    torch.testing.assert_close(op.as_matrix(), 2.0 * torch.eye(4, dtype=F64))


def test_to_scipy_products_and_eigsh() -> None:
    from scipy.sparse.linalg import LinearOperator, cg, eigsh

    case, f, params, dense = _setup("mlp_mse")
    op = funchess.HessianOperator(f, params, case.inputs, case.targets)
    sop = op.to_scipy()
    assert isinstance(sop, LinearOperator) and sop.shape == op.shape and sop.dtype == np.float64
    x = np.random.default_rng(0).standard_normal(op.shape[0])
    out = sop.matvec(x)
    assert out.dtype == np.float64 and out.shape == x.shape
    np.testing.assert_allclose(out, dense.numpy() @ x, rtol=1e-10, atol=1e-12)
    X = np.random.default_rng(1).standard_normal((op.shape[0], 3))
    np.testing.assert_allclose(sop.matmat(X), dense.numpy() @ X, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sop.rmatvec(x), dense.numpy() @ x, rtol=1e-10, atol=1e-12)
    vals = eigsh(sop, k=3, which="LA", return_eigenvectors=False, v0=np.ones(op.shape[0]))
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(dense)[-3:].numpy(), rtol=1e-8)
    lam = 1.0 - float(torch.linalg.eigvalsh(dense)[0])
    shifted = funchess.FunctionOperator(lambda v: {k: h + lam * v[k] for k, h in (op @ v).items()}, params)
    sol, info = cg(shifted.to_scipy(), x, rtol=1e-12, atol=0.0)
    assert info == 0
    expected = torch.linalg.solve(dense + lam * torch.eye(op.shape[0], dtype=F64), torch.from_numpy(x))
    np.testing.assert_allclose(sol, expected.numpy(), rtol=1e-8, atol=1e-10)
    # a float32 operator still speaks float64 NumPy
    sop32 = funchess.DenseOperator(torch.eye(3)).to_scipy()
    assert sop32.matvec(np.ones(3)).dtype == np.float64
    # rmatvec of a non-symmetric operator is the transpose
    A = np.arange(9.0).reshape(3, 3)
    np.testing.assert_allclose(funchess.DenseOperator(torch.from_numpy(A)).to_scipy().rmatvec(np.ones(3)), A.T @ np.ones(3))


def test_to_scipy_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(funchess.UnsupportedError, match=r"DenseOperator\.to_scipy\(\): expected SciPy to be installed.*funchess\[scipy\]"):
        funchess.DenseOperator(torch.eye(2)).to_scipy()


def test_operator_error_messages() -> None:
    case, f, params, dense = _setup("mlp_mse")
    op = funchess.HessianOperator(f, params, case.inputs, case.targets)
    n = op.shape[0]
    with pytest.raises(funchess.StructureError, match=rf"op @ x \(op a funchess.HessianOperator\): expected a pytree with the operator's structure .* a 1-D Tensor of {n} entries.*got a Tensor of shape \(50,\)"):
        op @ torch.zeros(n - 1, dtype=F64)
    with pytest.raises(funchess.StructureError, match=r"op @ x \(op a funchess.HessianOperator\): expected a pytree with the operator's structure.*got PyTreeSpec"):
        op @ {"0.weight": torch.zeros(6, 4, dtype=F64)}
    bad = dict(_randn_like(params, 0))
    bad["2.bias"] = torch.zeros(4, dtype=F64)
    with pytest.raises(funchess.StructureError, match=r"op @ x \(op a funchess.HessianOperator\): leaf \['2.bias'\] has shape \(4,\); expected \(3,\) \(one vector"):
        op @ bad
    mixed = _randn_like(params, 0, batch=(2,))
    mixed["2.bias"] = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(funchess.StructureError, match=r"leaf \['2.bias'\] has shape \(3, 3\); expected \(2, 3\) \(a batch of k=2"):
        op @ mixed
    with pytest.raises(funchess.StructureError, match=r"op @ x \(op a funchess.HessianOperator\): x has dtype torch.float32; expected torch.float64 \(the operator's\). Convert it"):
        op @ torch.zeros(n)
    with pytest.raises(funchess.StructureError, match=r"leaf \['0.weight'\] has dtype torch.float32"):
        op @ {k: v.float() for k, v in params.items()}
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.HessianOperator\(f, params, \*data\): expected f to be a function, got int"):
        funchess.HessianOperator(3, params)  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.HessianOperator\(f, params, \*data\): params is an empty pytree"):
        funchess.HessianOperator(f, {})
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected mode to be one of"):
        funchess.HessianOperator(f, params, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.HessianOperator\(f, params, \*data, chunk_size=0\): expected chunk_size \(rows or vectors per vectorised pass\) to be a positive int or 'auto', got 0"):
        funchess.HessianOperator(f, params, chunk_size=0)
    with pytest.raises(funchess.StructureError, match=r"funchess.DenseOperator\(H, params\): expected a square matrix, got shape \(2, 3\)"):
        funchess.DenseOperator(torch.zeros(2, 3))
    with pytest.raises(funchess.StructureError, match=rf"the matrix has side 4 but params have {n} entries; expected equal"):
        funchess.DenseOperator(torch.eye(4), params)
    with pytest.raises(funchess.StructureError, match=r"H is a Hessian pytree, so params is needed"):
        funchess.DenseOperator({"a": {"a": torch.eye(2)}})
    with pytest.raises(funchess.StructureError, match=r"funchess.FunctionOperator\(...\): expected the structure to be a non-empty pytree of Tensors"):
        funchess.FunctionOperator(lambda v: v, {"a": 1.0})
    for fn in (funchess.diagonal, funchess.trace):
        with pytest.raises(funchess.InvalidArgumentError, match=r"funchess\.(diagonal|trace)\(op\): expected a funchess.LinearOperator .* got Tensor"):
            fn(dense)


def test_readme_example_runs() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Matrix-free operators and spectral tools", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    exec(compile(code.group(1), "README.md", "exec"), {})
