"""Benchmark: matrix-free spectral tools against their classic peers, in one run.

1. Top-5 eigenvalues to a 1e-4 relative tolerance: `funchess.eigsh` (Lanczos with full
   reorthogonalisation) vs power iteration with deflation, PyHessian's method (implemented below the
   way PyHessian does it: orthonormalise against the eigenvectors found so far, one HVP, stop when
   the Rayleigh quotient changes by less than `tol` relatively). Both on the same
   `funchess.HessianOperator`; HVP counts, achieved relative error against
   `torch.linalg.eigvalsh` of the dense Hessian, and wall time (median of repeats). Also the
   "oracle" counts: the fewest HVPs after which each method's top-5 really are within 1e-4.
2. Trace to 1 %: Hutch++ vs Hutchinson. For budgets m, over many seeds, the fraction of estimates
   within 1 % of the exact trace; reported: the smallest m where >= 90 % are. The seed sweep runs on
   `funchess.DenseOperator` of the exact Hessian (same arithmetic as HVPs, much faster), plus the
   closed-form Hutchinson variance `2 (||H||_F^2 - sum H_ii^2)` per Rademacher probe.

Run: `python benchmarks/bench_spectral.py` (a few minutes on 2 CPU cores; `--quick` for a smaller
model). Runs torch on one thread by default (`--threads`): on a shared 2-core machine two threads
made these small HVPs ~10x slower and far noisier. Prints Markdown to paste into
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import funchess

F64 = torch.float64


def make_problem(quick: bool) -> tuple[funchess.HessianOperator, torch.Tensor, str]:
    torch.manual_seed(0)
    sizes = (10, 24, 24, 4) if quick else (20, 32, 32, 5)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).double()
    x = torch.randn(256, sizes[0], dtype=F64)
    y = torch.randint(0, sizes[-1], (256,))
    # a few steps of training, so the spectrum looks like a network's mid-training (a few outliers)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
    op = funchess.HessianOperator(f, params, x, y)
    dense = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    name = f"MLP {'-'.join(map(str, sizes))} tanh, cross-entropy, batch 256, float64, N = {op.shape[0]}"
    return op, dense, name


# ----------------------------------------------------------------------------- the peer


def power_iteration_deflation(
    op: funchess.LinearOperator,
    k: int,
    *,
    tol: float = 1e-4,
    max_iter: int = 5000,
    generator: torch.Generator,
    exact: torch.Tensor | None = None,
    rel: float = 1e-4,
) -> tuple[torch.Tensor, int]:
    """PyHessian's `eigenvalues()`: power iteration per eigenvalue, deflated by orthonormalising
    against the eigenvectors found before. With `exact`, stop each eigenvalue as soon as it is
    within `rel` of the exact one instead (the oracle count)."""
    n = op.shape[0]
    found: list[torch.Tensor] = []
    values: list[float] = []
    hvps = 0
    for i in range(k):
        v = torch.randn(n, generator=generator, dtype=F64)
        v = v / v.norm()
        value: float | None = None
        for _ in range(max_iter):
            for u in found:  # orthonormal(v, eigenvectors)
                v = v - torch.dot(v, u) * u
            v = v / v.norm()
            Hv = op @ v
            hvps += 1
            now = float(torch.dot(Hv, v))
            v = Hv / Hv.norm()
            if exact is not None:
                if abs(now - float(exact[i])) <= rel * abs(float(exact[i])):
                    value = now
                    break
            elif value is not None and abs(value - now) / (abs(value) + 1e-6) < tol:
                value = now
                break
            value = now
        assert value is not None
        found.append(v)
        values.append(value)
    return torch.tensor(values, dtype=F64), hvps


# ----------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def lanczos_oracle(dense_op: funchess.LinearOperator, exact: torch.Tensor, rel: float) -> int:
    """Fewest Lanczos steps after which the top-5 Ritz values are within `rel` (same start)."""
    for m in range(5, dense_op.shape[0] + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", funchess.ConvergenceWarning)
            res = funchess.eigsh(dense_op, k=5, which="LM", tol=1e-14, max_iter=m, generator=torch.Generator().manual_seed(0))
        if rel_err(res.eigenvalues, exact) <= rel:
            return m
    return dense_op.shape[0]


def trace_budget(dense_op: funchess.LinearOperator, exact: float, estimator: Callable[..., Any], budgets: list[int], seeds: int) -> tuple[int | None, list[tuple[int, float, float]]]:
    rows, first = [], None
    for m in budgets:
        errs = [abs(float(estimator(dense_op, m, generator=torch.Generator().manual_seed(s)).value) - exact) / abs(exact) for s in range(seeds)]
        within = sum(e <= 0.01 for e in errs) / seeds
        rows.append((m, within, statistics.median(errs)))
        if first is None and within >= 0.9:
            first = m
            break
    return first, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer seeds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls, shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op, dense, name = make_problem(args.quick)
    n = op.shape[0]
    eig = torch.linalg.eigvalsh(dense)
    exact5 = eig[eig.abs().argsort(descending=True)[:5]]
    print(f"## {name}\n")
    print(f"top-5 eigenvalues (largest magnitude): {[round(float(e), 6) for e in exact5]}")
    print(f"torch threads: {torch.get_num_threads()}\n")

    # warm-up (torch.func's one-time setup)
    op @ torch.randn(n, dtype=F64)

    # ---- top-5 eigenvalues
    lz, t_lz = timed(lambda: funchess.eigsh(op, k=5, which="LM", tol=1e-4, generator=torch.Generator().manual_seed(0)), args.repeats)
    (pw_vals, pw_hvps), t_pw = timed(lambda: power_iteration_deflation(op, 5, tol=1e-4, generator=torch.Generator().manual_seed(0)), args.repeats)
    dense_op = funchess.DenseOperator(dense)
    lz_oracle = lanczos_oracle(dense_op, exact5, 1e-4)
    _, pw_oracle = power_iteration_deflation(dense_op, 5, generator=torch.Generator().manual_seed(0), exact=exact5, rel=1e-4)
    print("### Top-5 eigenvalues, 1e-4 relative tolerance\n")
    print("| method | stopping rule | HVPs | max rel. error of top-5 | time (median) |")
    print("|---|---|---|---|---|")
    print(f"| funchess.eigsh (Lanczos, full reorth.) | residual <= 1e-4 x max abs Ritz value | {lz.num_hvps} | {rel_err(lz.eigenvalues, exact5):.1e} | {t_lz:.2f} s |")
    print(f"| power iteration + deflation (PyHessian) | rel. change of Rayleigh quotient < 1e-4 | {pw_hvps} | {rel_err(pw_vals, exact5):.1e} | {t_pw:.2f} s |")
    print(f"| funchess.eigsh, oracle | all top-5 within 1e-4 of exact | {lz_oracle} | <= 1e-4 | |")
    print(f"| power iteration + deflation, oracle | each within 1e-4 of exact | {pw_oracle} | <= 1e-4 | |")
    print(f"\nHVP ratio Lanczos / power iteration: {lz.num_hvps / pw_hvps:.3f} (own rules), "
          f"{lz_oracle / pw_oracle:.3f} (oracle); time ratio {t_lz / t_pw:.3f}\n")

    # ---- trace to 1 %
    exact_tr = float(dense.trace())
    fro2 = float((dense * dense).sum())
    var = 2 * (fro2 - float((dense.diagonal() ** 2).sum()))
    m_closed = (1.645 * var**0.5 / (0.01 * abs(exact_tr))) ** 2
    seeds = 40 if args.quick else 100
    budgets = [12, 18, 24, 36, 48, 72, 96, 144, 192, 288, 384, 576, 768, 1152, 1536, 2304, 3072]
    hpp_m, hpp_rows = trace_budget(dense_op, exact_tr, funchess.trace_estimate, budgets, seeds)
    hut_m, hut_rows = trace_budget(dense_op, exact_tr, functools.partial(funchess.trace_estimate, method="hutchinson"), budgets, seeds)
    print(f"### Trace to 1 % (exact trace {exact_tr:.5g}, ||H||_F = {fro2 ** 0.5:.4g}; {seeds} seeds per budget)\n")
    print("| method | budget m | fraction within 1 % | median rel. error |")
    print("|---|---|---|---|")
    for label, rows in (("Hutch++", hpp_rows), ("Hutchinson", hut_rows)):
        for m, within, med in rows:
            print(f"| {label} | {m} | {within:.2f} | {med:.2e} |")
    print(f"\nsmallest budget with >= 90 % of estimates within 1 %: Hutch++ {hpp_m}, Hutchinson "
          f"{hut_m if hut_m is not None else f'> {budgets[-1]}'} (closed form for Hutchinson, "
          f"Rademacher: {m_closed:.0f})")
    if hpp_m is not None:
        est, t_hpp = timed(lambda: funchess.trace_estimate(op, hpp_m, generator=torch.Generator().manual_seed(0)), args.repeats)
        print(f"Hutch++ with m = {hpp_m} on the HessianOperator: {float(est.value):.5g} ± {float(est.std_error):.2g} "
              f"(exact {exact_tr:.5g}), {t_hpp:.2f} s (median)")
    m_hut = hut_m or int(m_closed)
    est, t_hut = timed(lambda: funchess.hutchinson_trace(op, m_hut, generator=torch.Generator().manual_seed(0)), 1)
    print(f"Hutchinson with m = {m_hut} on the HessianOperator: {float(est.value):.5g} ± {float(est.std_error):.2g}, {t_hut:.2f} s")


if __name__ == "__main__":
    main()
