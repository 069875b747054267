"""Spectral tools against dense linear algebra on `to_matrix(funchess.hessian(...))`, in float64:
Lanczos eigenpairs, trace and diagonal estimators within their error bars, SLQ moments, CG;
determinism given the generator, honest HVP counts, progress bars and pinned error messages."""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

import pytest
import torch

import funchess

from cases import CASES, Case

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")
SPECTRAL_CASES = ["mlp_mse", "mlp_ce", "conv", "layernorm"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(name: str) -> tuple[Case, funchess.HessianOperator, torch.Tensor]:
    case = CASES[name](F64, "cpu")
    f, params = case.functional()
    dense = funchess.to_matrix(case.reference())
    return case, funchess.HessianOperator(f, params, case.inputs, case.targets), dense


class Counting(funchess.FunctionOperator):
    """Counts every vector it is applied to (vectorize=False: one call per vector)."""

    def __init__(self, A: torch.Tensor) -> None:
        self.calls = 0

        def fn(v: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return A @ v

        super().__init__(fn, torch.zeros(A.shape[0], dtype=A.dtype), vectorize=False)


def _spd_like_nn(n: int = 60, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with a few large outliers and a bulk near zero, like NN Hessians."""
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    vals = torch.cat([torch.tensor([50.0, 20.0, 10.0, 5.0], dtype=F64), 0.3 * torch.randn(n - 4, generator=g, dtype=F64)])
    return (Q * vals) @ Q.T


# ----------------------------------------------------------------------------- eigsh


@pytest.mark.parametrize("name", SPECTRAL_CASES)
def test_eigsh_matches_eigvalsh(name: str) -> None:
    case, op, dense = _setup(name)
    exact = torch.linalg.eigvalsh(dense)
    scale = exact.abs().max()
    wanted = [("LA", exact.flip(0)[:4]), ("SA", exact[:3])]
    for which, expected in wanted[: 1 if name == "conv" else 2]:  # conv HVPs are slow: top only
        res = funchess.eigsh(op, k=len(expected), which=which, generator=_gen(1))  # type: ignore[arg-type]
        assert res.converged and res.num_hvps <= op.shape[0]
        torch.testing.assert_close(res.eigenvalues, expected, rtol=0, atol=1e-8 * float(scale))
        Y = torch.stack([funchess.ravel(y) for y in res.eigenvectors])
        torch.testing.assert_close(Y @ Y.T, torch.eye(len(expected), dtype=F64), rtol=0, atol=1e-7)
        residual = (Y @ dense - res.eigenvalues[:, None] * Y).norm(dim=1)
        assert bool((residual <= 1e-6 * scale).all()), residual
        assert bool((res.residuals <= 2e-8 * scale).all())
        assert list(res.eigenvectors[0]) == list(op.structure)


def test_eigsh_largest_magnitude_and_multiplicities() -> None:
    vals = torch.tensor([-9.0, 4.0, 4.0, 4.0, 2.0, 2.0, 1.0, 0.0, 0.0, -1.0], dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=_gen(3), dtype=F64))
    op = funchess.DenseOperator((Q * vals) @ Q.T)
    res = funchess.eigsh(op, k=2, which="LM", generator=_gen(0))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-9.0, 4.0], dtype=F64))
    # a single Krylov sequence sees each distinct eigenvalue once: the restart after a breakdown
    # finds the repeated copies
    res = funchess.eigsh(op, k=4, which="LA", generator=_gen(0))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([4.0, 4.0, 4.0, 2.0], dtype=F64))
    full = funchess.eigsh(op, k=10, which="SA", generator=_gen(0))
    torch.testing.assert_close(full.eigenvalues, vals.sort().values)
    assert full.converged and full.num_hvps == 10


def test_eigsh_is_deterministic_and_counts_honestly() -> None:
    A = _spd_like_nn()
    counted = Counting(A)
    a = funchess.eigsh(counted, k=3, generator=_gen(5))
    b = funchess.eigsh(funchess.DenseOperator(A), k=3, generator=_gen(5))
    assert a.num_hvps == counted.calls == b.num_hvps
    assert torch.equal(a.eigenvalues, funchess.eigsh(counted, k=3, generator=_gen(5)).eigenvalues)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=1e-12)


def test_eigsh_warns_when_not_converged() -> None:
    with pytest.warns(funchess.ConvergenceWarning, match=r"funchess.eigsh\(op, k=3, which='LA'\): Lanczos stopped after max_iter=4 products with relative residuals up to .* > tol="):
        res = funchess.eigsh(funchess.DenseOperator(_spd_like_nn()), k=3, max_iter=4, generator=_gen(0))
    assert not res.converged and res.num_hvps == 4 and res.eigenvalues.shape == (3,)


def test_eigsh_error_messages() -> None:
    op = funchess.DenseOperator(torch.eye(5, dtype=F64))
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.eigsh\(op, k=6, which='LA'\): expected 1 <= k <= N = 5 \(the operator's size\), got k=6"):
        funchess.eigsh(op, k=6)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected 1 <= k <= N = 5 .* got k=0"):
        funchess.eigsh(op, k=0)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected which to be 'LA' \(largest\), 'SA' \(smallest\) or 'LM'.* got 'top'"):
        funchess.eigsh(op, which="top")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"Lanczos needs a symmetric operator, got one with symmetric=False"):
        funchess.eigsh(funchess.DenseOperator(torch.triu(torch.ones(3, 3))))
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected tol to be a finite number > 0, got -1"):
        funchess.eigsh(op, tol=-1)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected max_iter to be an int >= 2, got 1"):
        funchess.eigsh(op, k=2, max_iter=1)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected generator to be a torch.Generator or None, got int"):
        funchess.eigsh(op, generator=0)  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.eigsh\(op, k=1, which='LA'\): expected a funchess.LinearOperator"):
        funchess.eigsh(torch.eye(3))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- trace, diagonal


@pytest.mark.parametrize("name", ["mlp_mse", "mlp_ce"])
def test_trace_estimators_within_their_error_bars(name: str) -> None:
    case, op, dense = _setup(name)
    exact = dense.trace()
    for estimator, budget in ((functools.partial(funchess.trace_estimate, method="hutchinson"), 40), (funchess.trace_estimate, 42)):
        for seed in range(3):
            est = estimator(op, budget, generator=_gen(seed))
            assert est.num_hvps == budget
            assert float(est.std_error) > 0 and abs(float(est.value - exact)) <= 4 * float(est.std_error), (estimator, seed)


def test_trace_estimators_converge_and_their_error_bars_are_honest() -> None:
    A = _spd_like_nn()
    op, exact = funchess.DenseOperator(A), float(A.trace())
    for estimator in (functools.partial(funchess.trace_estimate, method="hutchinson"), funchess.trace_estimate):
        small = [estimator(op, 30, generator=_gen(s)) for s in range(40)]
        large = [estimator(op, 120, generator=_gen(s)) for s in range(40)]
        covered = sum(abs(float(e.value) - exact) <= 2 * float(e.std_error) for e in small + large)
        assert covered >= 0.85 * 80, (estimator, covered)  # ~95 % expected for honest error bars
        err_small = torch.tensor([abs(float(e.value) - exact) for e in small]).mean()
        err_large = torch.tensor([abs(float(e.value) - exact) for e in large]).mean()
        assert err_large < err_small
    # on a few dominant eigenvalues Hutch++ is far more accurate for the same budget
    hpp = torch.tensor([abs(float(funchess.trace_estimate(op, 60, generator=_gen(s)).value) - exact) for s in range(20)])
    hut = torch.tensor([abs(float(funchess.trace_estimate(op, 60, generator=_gen(s), method="hutchinson").value) - exact) for s in range(20)])
    assert hpp.mean() < 0.5 * hut.mean()
    # a sketch as large as the space gives the exact trace
    torch.testing.assert_close(funchess.trace_estimate(op, 180, generator=_gen(0)).value, A.trace())


def test_gaussian_probes_and_determinism() -> None:
    A = _spd_like_nn()
    op = funchess.DenseOperator(A)
    for estimator in (functools.partial(funchess.trace_estimate, method="hutchinson"), funchess.trace_estimate):
        a = estimator(op, 30, distribution="normal", generator=_gen(7))
        b = estimator(op, 30, distribution="normal", generator=_gen(7))
        assert torch.equal(a.value, b.value) and torch.equal(a.std_error, b.std_error)
        assert abs(float(a.value - A.trace())) <= 4 * float(a.std_error)


def test_diagonal_estimate_within_its_error_bars() -> None:
    case, op, dense = _setup("mlp_ce")
    est = funchess.diagonal_estimate(op, 64, generator=_gen(0))
    assert est.num_hvps == 64 and list(est.value) == list(op.structure)
    value, err = funchess.ravel(est.value), funchess.ravel(est.std_error)
    z = (value - dense.diagonal()).abs() / err.clamp_min(1e-12)
    assert float(z.max()) <= 5.0 and float((z <= 2).double().mean()) >= 0.85
    again = funchess.diagonal_estimate(op, 64, generator=_gen(0))
    assert all(torch.equal(again.value[k], est.value[k]) for k in est.value)
    # exact for a diagonal matrix with Rademacher probes, standard error zero
    d = funchess.diagonal_estimate(funchess.DenseOperator(torch.diag(torch.arange(4.0, dtype=F64))), 3, generator=_gen(0))
    assert torch.equal(d.value, torch.arange(4.0, dtype=F64)) and not d.std_error.any()
    one = funchess.diagonal_estimate(funchess.DenseOperator(torch.eye(2, dtype=F64)), 1)
    assert torch.isnan(one.std_error).all()


def test_estimator_error_messages() -> None:
    op = funchess.DenseOperator(torch.eye(4, dtype=F64))
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.trace_estimate\(op, num_hvps, method='hutchinson'\): expected num_hvps to be an int >= 1, got 0"):
        funchess.trace_estimate(op, 0, method="hutchinson")
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.trace_estimate\(op, num_hvps, method='hutch\+\+'\): expected num_hvps to be an int >= 3, got 2"):
        funchess.trace_estimate(op, 2)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.diagonal_estimate\(op, num_hvps\): expected num_hvps to be an int >= 1, got True"):
        funchess.diagonal_estimate(op, True)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected distribution to be 'rademacher' or 'normal', got 'gauss'"):
        funchess.trace_estimate(op, 5, distribution="gauss", method="hutchinson")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"Hutch\+\+ needs a symmetric operator.*Use method='hutchinson'"):
        funchess.trace_estimate(funchess.DenseOperator(torch.triu(torch.ones(3, 3))), 6)


# ----------------------------------------------------------------------------- spectral density


def test_spectral_density_integrates_to_one_and_matches_moments() -> None:
    A = _spd_like_nn()
    n = A.shape[0]
    sd = funchess.spectral_density(funchess.DenseOperator(A), num_probes=200, num_steps=12, generator=_gen(0))
    assert sd.num_hvps == 200 * 12 and sd.grid.shape == sd.density.shape == (1000,)
    torch.testing.assert_close(torch.trapezoid(sd.density, sd.grid), torch.tensor(1.0, dtype=F64))
    assert bool((sd.density >= 0).all())
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(200, dtype=F64))
    for k in (1, 2, 3, 4):
        per_probe = sd.moments(k)
        exact = float(torch.trace(torch.linalg.matrix_power(A, k))) / n
        se = float(per_probe.std()) / 200**0.5
        assert abs(float(per_probe.mean()) - exact) <= 4 * se, (k, float(per_probe.mean()), exact, se)
    # the smoothed density has the quadrature's mean (a symmetric kernel does not move it)
    torch.testing.assert_close(
        torch.trapezoid(sd.grid * sd.density, sd.grid), sd.moments(1).mean(), rtol=1e-6, atol=1e-6
    )


def test_spectral_density_of_a_hessian_operator_equals_the_dense_one() -> None:
    case, op, dense = _setup("mlp_mse")
    a = funchess.spectral_density(op, num_probes=3, num_steps=15, grid=200, generator=_gen(2))
    b = funchess.spectral_density(funchess.DenseOperator(dense), num_probes=3, num_steps=15, grid=200, generator=_gen(2))
    torch.testing.assert_close(a.nodes, b.nodes, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.density, b.density, rtol=1e-6, atol=1e-8)
    assert a.num_hvps == b.num_hvps == 3 * 15


def test_spectral_density_exhausted_krylov_space_and_custom_grid() -> None:
    vals = torch.tensor([3.0] * 5 + [1.0] * 5 + [-2.0] * 5, dtype=F64)
    counted = Counting(torch.diag(vals))
    grid = torch.linspace(-4, 5, 500, dtype=F64)
    sd = funchess.spectral_density(counted, num_probes=4, num_steps=10, grid=grid, sigma=0.1, generator=_gen(0))
    assert sd.num_hvps == counted.calls == 4 * 3  # 3 distinct eigenvalues: each probe stops after 3 steps
    for p in range(4):
        used = sd.weights[p] > 0
        torch.testing.assert_close(sd.nodes[p][used].sort().values, torch.tensor([-2.0, 1.0, 3.0], dtype=F64))
    assert torch.equal(sd.grid, grid) and sd.sigma == 0.1
    torch.testing.assert_close(torch.trapezoid(sd.density, grid), torch.tensor(1.0, dtype=F64))


def test_spectral_density_error_messages() -> None:
    op = funchess.DenseOperator(torch.eye(4, dtype=F64))
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.spectral_density\(op\): expected num_probes to be an int >= 1, got 0"):
        funchess.spectral_density(op, num_probes=0)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected num_steps to be an int >= 1, got -3"):
        funchess.spectral_density(op, num_steps=-3)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected sigma to be a finite number > 0, got 0"):
        funchess.spectral_density(op, sigma=0)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected grid to be a 1-D increasing Tensor of at least 2 points, got shape \(3,\)"):
        funchess.spectral_density(op, grid=torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected grid to be an int >= 2, got 1"):
        funchess.spectral_density(op, grid=1)
    with pytest.raises(funchess.InvalidArgumentError, match=r"SLQ needs a symmetric operator"):
        funchess.spectral_density(funchess.DenseOperator(torch.triu(torch.ones(3, 3))))


# ----------------------------------------------------------------------------- cg


@pytest.mark.parametrize("name", ["mlp_mse", "layernorm"])
def test_cg_matches_solve(name: str) -> None:
    case, op, dense = _setup(name)
    n = dense.shape[0]
    lam = max(0.0, -float(torch.linalg.eigvalsh(dense)[0])) + 0.1
    exact_op = dense + lam * torch.eye(n, dtype=F64)
    B = torch.randn(n, 3, generator=_gen(0), dtype=F64)
    res = funchess.cg(op, B, damping=lam, rtol=1e-12)
    assert res.converged and res.solution.shape == (n, 3) and res.residual_norm.shape == (3,)
    expected = torch.linalg.solve(exact_op, B)
    torch.testing.assert_close(res.solution, expected, rtol=1e-8, atol=1e-9)
    one = funchess.cg(op, funchess.unravel(B[:, 0].contiguous(), op.structure), damping=lam, rtol=1e-12)
    assert list(one.solution) == list(op.structure) and one.residual_norm.dim() == 0
    torch.testing.assert_close(funchess.ravel(one.solution), expected[:, 0], rtol=1e-8, atol=1e-9)
    assert one.num_hvps == one.num_iter  # one product per iteration for a single right-hand side
    assert res.num_hvps <= 3 * res.num_iter


def test_cg_warm_start_flat_vectors_and_warning() -> None:
    A = _spd_like_nn()
    A = A + 2 * torch.eye(A.shape[0], dtype=F64)
    op, b = funchess.DenseOperator(A), torch.randn(A.shape[0], generator=_gen(1), dtype=F64)
    exact = torch.linalg.solve(A, b)
    warm = funchess.cg(op, b, x0=exact + 1e-6, rtol=1e-12)
    cold = funchess.cg(op, b, rtol=1e-12)
    torch.testing.assert_close(warm.solution, exact) and torch.testing.assert_close(cold.solution, exact)
    assert warm.num_hvps < cold.num_hvps
    with pytest.warns(funchess.ConvergenceWarning, match=r"funchess.cg\(op, b\): CG stopped after max_iter=2 iterations with relative residual .* > rtol=1e-12"):
        res = funchess.cg(op, b, rtol=1e-12, max_iter=2)
    assert not res.converged and res.num_iter == 2


def test_cg_error_messages() -> None:
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=F64))
    op, b = funchess.DenseOperator(A), torch.ones(3, dtype=F64)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.cg\(op, b\): H \+ damping \* I is not positive definite .*<= 0.*Raise damping above minus the smallest eigenvalue"):
        funchess.cg(op, b)
    assert funchess.cg(op, b, damping=1.5, rtol=1e-12).converged
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.cg\(op, b\): expected damping to be a finite number >= 0, got -0.1"):
        funchess.cg(op, b, damping=-0.1)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected damping to be a finite number >= 0, got inf"):
        funchess.cg(op, b, damping=float("inf"))
    with pytest.raises(funchess.StructureError, match=r"funchess.cg\(op, b\): x has shape \(4,\); expected \(3,\) \(one vector"):
        funchess.cg(op, torch.ones(4, dtype=F64))
    with pytest.raises(funchess.StructureError, match=r"funchess.cg\(op, b\): expected a pytree with the operator's structure .* got PyTreeSpec"):
        funchess.cg(op, {"w": torch.ones(3, dtype=F64)})
    with pytest.raises(funchess.InvalidArgumentError, match=r"x0 holds 1 vector\(s\) but b holds 2"):
        funchess.cg(op, torch.ones(3, 2, dtype=F64), damping=2.0, x0=torch.ones(3, dtype=F64))
    with pytest.raises(funchess.InvalidArgumentError, match=r"conjugate gradients need a symmetric operator"):
        funchess.cg(funchess.DenseOperator(torch.triu(torch.ones(3, 3, dtype=F64))), b)


# ----------------------------------------------------------------------------- progress bars


def test_progress_bars(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    op = funchess.DenseOperator(_spd_like_nn())
    calls: list[Any] = [
        lambda: funchess.eigsh(op, k=2, generator=_gen(0), progress=True),
        lambda: funchess.trace_estimate(op, 10, generator=_gen(0), progress=True, method="hutchinson"),
        lambda: funchess.trace_estimate(op, 9, generator=_gen(0), progress=True),
        lambda: funchess.diagonal_estimate(op, 10, generator=_gen(0), progress=True),
        lambda: funchess.spectral_density(op, num_probes=2, num_steps=5, generator=_gen(0), progress=True),
        lambda: funchess.cg(op, torch.ones(60, dtype=F64), damping=5.0, progress=True),
    ]
    for call in calls:
        call()
        err = capsys.readouterr().err
        assert "product" in err
        if "100%" in err:  # a bar that stops early (Lanczos converged) ends where it stopped
            assert not re.search(r"\b[1-9]?[0-9]%\|", err.rsplit("\r", 1)[-1]), err[-200:]
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(funchess.UnsupportedError, match=r"funchess.trace_estimate\(op, num_hvps, method='hutchinson'\): progress=True needs tqdm, which is not installed.*pip install 'funchess\[progress\]'"):
        calls[1]()


def test_deprecated_trace_estimator_names_warn_and_agree() -> None:
    op = funchess.DenseOperator(_spd_like_nn())
    with pytest.warns(FutureWarning, match=r"funchess.hutchpp_trace is deprecated; use funchess.trace_estimate"):
        old = funchess.hutchpp_trace(op, 30, generator=_gen(3))
    torch.testing.assert_close(old.value, funchess.trace_estimate(op, 30, generator=_gen(3)).value)
    with pytest.warns(FutureWarning, match=r"funchess.hutchinson_trace is deprecated; use funchess.trace_estimate\(op, num_hvps, method='hutchinson'\)"):
        old = funchess.hutchinson_trace(op, 30, generator=_gen(3))
    torch.testing.assert_close(old.value, funchess.trace_estimate(op, 30, method="hutchinson", generator=_gen(3)).value)
