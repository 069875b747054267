"""Per-sample and data-set curvature: funchess against its peers, as ratios from one run.

    python benchmarks/bench_per_sample.py [--threads 1] [--repeat 5] [--quick]

Per-sample Hessians (MLP 20-32-32-5, tanh, MSE, 64 samples, float32; and a small MLP 10-16-3 with
256 samples, where per-pass overhead rather than memory dominates) against `vmap` of
`funchess.hessian` (whose mirrored blocks are transposed views, so it writes half the result) and
of `torch.func.hessian`, a Python loop of `torch.func.hessian` over the samples, and the batch Hessian
(`funchess.hessian`, the same arithmetic with a B times smaller result). "fill" is the cost of
writing the `(B, N, N)` result once into fresh memory: a floor for every method that allocates its
result; "out= reused" writes into one buffer allocated before the timed calls, whose floor is the
fill of that already-touched buffer.

Data-set Hessian (8 batches of 64, and 32 batches of 16, each plus an uneven one of 17) against one
Hessian per batch (dataset_hessian without grouping batches), one `funchess.hessian` of the
concatenated data and curvlinops' `HessianLinearOperator @ I` when curvlinops is importable; and
the data-set HVP and GGN-vector product on the same batches, against one product per batch, the
product on the concatenated data and curvlinops' operators applied to one vector.

Times are medians of wall-clock and process CPU time (the CPU time is the steadier figure on a
shared machine); the first call of each method is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import funchess  # noqa: E402


def mlp(dims: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def timeit(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        gc.collect()
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return statistics.median(walls), statistics.median(cpus)


def report(title: str, rows: list[tuple[str, float, float]], ref: str) -> None:
    base = dict((n, (w, c)) for n, w, c in rows)[ref]
    print(f"\n{title}\n| method | wall ms | CPU ms | CPU time / {ref} |\n|---|---|---|---|")
    for name, w, c in rows:
        print(f"| {name} | {w * 1e3:.0f} | {c * 1e3:.0f} | {c / base[1]:.2f}x |")


def per_sample_methods(dims: tuple[int, ...], B: int) -> tuple[int, list[tuple[str, Callable[[], Any]]]]:
    torch.manual_seed(0)
    model = mlp(dims)
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(B, dims[0]), torch.randn(B, dims[-1])
    N = sum(p.numel() for p in params.values())

    def loss_i(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return f(p, xi.unsqueeze(0), yi.unsqueeze(0))

    buffer = torch.empty(B, N, N)

    methods: list[tuple[str, Callable[[], Any]]] = [
        ("funchess.per_sample_hessian", lambda: funchess.per_sample_hessian(f)(params, x, y)),
        ("funchess.per_sample_hessian, out= reused", lambda: funchess.per_sample_hessian(f)(params, x, y, out=buffer)),
        ("funchess.per_sample_hessian rev-rev", lambda: funchess.per_sample_hessian(f, mode="rev-rev")(params, x, y)),
        ("vmap(funchess.hessian)", lambda: torch.func.vmap(funchess.hessian(loss_i), in_dims=(None, 0, 0))(params, x, y)),
        ("vmap(torch.func.hessian)", lambda: torch.func.vmap(torch.func.hessian(loss_i), in_dims=(None, 0, 0))(params, x, y)),
        ("loop of torch.func.hessian", lambda: [torch.func.hessian(loss_i)(params, x[i], y[i]) for i in range(B)]),
        ("batch Hessian (funchess.hessian)", lambda: funchess.hessian(f)(params, x, y)),
        ("fill (B, N, N) once", lambda: torch.empty(B, N, N).fill_(1.0)),
        ("fill the reused buffer", lambda: buffer.fill_(1.0)),
    ]
    return N, methods


def _peak_mib() -> float:
    """Peak RSS of this process: VmHWM (Linux; ru_maxrss would carry the parent's peak over exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_of(index: int) -> None:
    """Run one per-sample method once (first configuration) and print the growth of peak RSS."""
    _, methods = per_sample_methods((20, 32, 32, 5), 64)
    funchess.hessian(lambda p: (p["w"] ** 3).sum())({"w": torch.ones(2)})  # one-time torch.func setup
    gc.collect()
    before = _peak_mib()
    out = methods[index][1]()
    print(_peak_mib() - before, flush=True)
    del out


def peaks() -> None:
    N, methods = per_sample_methods((20, 32, 32, 5), 64)
    result_mib = 64 * N * N * 4 / 2**20
    print(f"\nPeak memory, per-sample Hessians (MLP 20-32-32-5, 64 samples; result {result_mib:.0f} MiB; "
          f"growth of peak RSS in a fresh process)\n| method | peak MiB | / result |\n|---|---|---|")
    for i, (name, _) in enumerate(methods):
        if "batch" in name or "fill" in name or "out=" in name:
            continue
        out = subprocess.run([sys.executable, __file__, "--peak-of", str(i)], capture_output=True, text=True)
        mib = float(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {mib:.0f} | {mib / result_mib:.2f}x |")


def per_sample(dims: tuple[int, ...], B: int, repeat: int, slow: bool) -> None:
    N, methods = per_sample_methods(dims, B)
    if not slow:
        methods = [m for m in methods if "loop" not in m[0]]
    rows = [(name, *timeit(fn, repeat)) for name, fn in methods]
    report(f"Per-sample Hessians: MLP {'-'.join(map(str, dims))}, {B} samples, N={N}, float32", rows,
           "funchess.per_sample_hessian")


def batch_by_batch(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` with the data-set functions taking one derivative per batch (no grouping of batches)."""
    from funchess import _data, _dataset

    names = [(_data, "GROUP_SAMPLES"), (_dataset, "GROUP_SAMPLES"), (_dataset, "PRODUCT_GROUP_BYTES")]

    def run() -> Any:
        saved = [getattr(module, name) for module, name in names]
        for module, name in names:
            setattr(module, name, 1)
        try:
            return fn()
        finally:
            for (module, name), value in zip(names, saved):
                setattr(module, name, value)

    return run


def import_curvlinops() -> Any:
    """The curvlinops module, or None (printed) when it is not installed or broken against this torch."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import curvlinops
    except Exception as exc:
        print(f"\n(curvlinops not importable: {type(exc).__name__}: {exc}; comparison skipped)")
        return None
    return curvlinops


def dataset_problem(sizes: list[int]) -> tuple[nn.Module, Any, dict[str, torch.Tensor], list[Any], torch.Tensor, torch.Tensor]:
    """The MLP 20-32-32-5 with MSE, batches of `sizes` samples, and the concatenated data."""
    torch.manual_seed(0)
    model = mlp((20, 32, 32, 5))
    f, params = funchess.functional(model, F.mse_loss)
    batches = [(torch.randn(n, 20), torch.randn(n, 5)) for n in sizes]
    return model, f, params, batches, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def dataset(repeat: int, sizes: list[int]) -> None:
    model, f, params, batches, x, y = dataset_problem(sizes)
    N = sum(p.numel() for p in params.values())
    methods: list[tuple[str, Callable[[], Any]]] = [
        ("funchess.dataset_hessian", lambda: funchess.dataset_hessian(f)(params, batches)),
        ("funchess.dataset_hessian, one Hessian per batch", batch_by_batch(lambda: funchess.dataset_hessian(f)(params, batches))),
        ("funchess.hessian of the concatenated data", lambda: funchess.hessian(f)(params, x, y)),
    ]
    curvlinops = import_curvlinops()
    if curvlinops is not None:
        plist = list(model.parameters())
        eye = torch.eye(N)

        def curv() -> torch.Tensor:
            op = curvlinops.HessianLinearOperator(model, nn.MSELoss(), plist, batches, progressbar=False, check_deterministic=False)
            return op @ eye

        methods.append(("curvlinops HessianLinearOperator @ I", curv))
        got = funchess.to_matrix(funchess.dataset_hessian(f)(params, batches))
        err = (curv() - got).abs().max().item() / got.abs().max().item()
        print(f"\n(curvlinops vs funchess.dataset_hessian: max relative difference {err:.1e})")
    rows = [(name, *timeit(fn, repeat)) for name, fn in methods]
    report(f"Data-set Hessian: MLP 20-32-32-5, {len(sizes)} batches of {sizes[0]} ({sum(sizes)} samples), N={N}, float32",
           rows, "funchess.dataset_hessian")


def dataset_products(repeat: int, sizes: list[int]) -> None:
    """Data-set Hessian- and GGN-vector products (what iterative solvers call many times)."""
    model, f, params, batches, x, y = dataset_problem(sizes)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    N = sum(p.numel() for p in params.values())
    methods: list[tuple[str, Callable[[], Any]]] = [
        ("funchess.dataset_hvp", lambda: funchess.dataset_hvp(f)(params, v, batches)),
        ("funchess.dataset_hvp, one HVP per batch", batch_by_batch(lambda: funchess.dataset_hvp(f)(params, v, batches))),
        ("funchess.hvp of the concatenated data", lambda: funchess.hvp(f)(params, v, x, y)),
        ("funchess.dataset_ggn_vp", lambda: funchess.dataset_ggn_vp(f)(params, v, batches)),
        ("funchess.dataset_ggn_vp, one product per batch", batch_by_batch(lambda: funchess.dataset_ggn_vp(f)(params, v, batches))),
        ("funchess.ggn_vp of the concatenated data", lambda: funchess.ggn_vp(f)(params, v, x, y)),
    ]
    curvlinops = import_curvlinops()
    if curvlinops is not None:
        plist, flat_v = list(model.parameters()), funchess.ravel(v)
        ops = {name: cls(model, nn.MSELoss(), plist, batches, progressbar=False, check_deterministic=False)
               for name, cls in (("Hessian", curvlinops.HessianLinearOperator), ("GGN", curvlinops.GGNLinearOperator))}
        methods.append(("curvlinops HessianLinearOperator @ v", lambda: ops["Hessian"] @ flat_v))
        methods.append(("curvlinops GGNLinearOperator @ v", lambda: ops["GGN"] @ flat_v))
    rows = [(name, *timeit(fn, repeat)) for name, fn in methods]
    report(f"Data-set HVP and GGN-vector product: MLP 20-32-32-5, {len(sizes)} batches of {sizes[0]} "
           f"({sum(sizes)} samples), N={N}, float32", rows, "funchess.dataset_hvp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip the slow Python loops")
    ap.add_argument("--peak-of", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of is not None:
        peak_of(args.peak_of)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), repeat {args.repeat}")
    peaks()
    per_sample((20, 32, 32, 5), 64, args.repeat, not args.quick)
    per_sample((10, 16, 3), 256, args.repeat, not args.quick)
    dataset(args.repeat, [64] * 8 + [17])
    dataset(args.repeat, [16] * 32 + [17])
    dataset_products(args.repeat * 4, [64] * 8 + [17])
    dataset_products(args.repeat * 4, [16] * 32 + [17])


if __name__ == "__main__":
    main()
