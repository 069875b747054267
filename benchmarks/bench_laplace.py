"""laplace-torch's `Laplace(...).fit`: funchess's backends against laplace's own, as ratios from one run.

    python benchmarks/bench_laplace.py [--threads 1] [--repeat 3] [--quick] [--no-memory]

For each problem (an MLP, a small conv net, and a classifier with many outputs) and each Hessian
structure ("full", "diag", "kron"; all weights), `Laplace(model, "classification",
hessian_structure=..., backend=...).fit(loader)` with funchess's `FunchessGGN` and laplace's
curvlinops, BackPACK and ASDL GGN backends (those that import). Reported per row:

- the median wall-clock and process CPU time of `fit` over `--repeat` runs (the backends are
  interleaved within each repeat, after one warm-up run each; CPU time is the steadier figure on a
  shared machine) and the CPU-time ratio to funchess;
- the growth of peak RSS during one `fit` in a fresh process (`--no-memory` skips it);
- the largest difference of the posterior precision from funchess's, relative to its largest entry
  (flags a backend that computes something else; curvlinops's dense GGN is float32-accurate).

The many-outputs problem is where laplace's default diagonal (through dense `(batch, outputs,
params)` Jacobians, also used by its curvlinops backend) needs the most memory: backends whose
estimated need exceeds `--cap` are not run, and the estimate is printed instead. funchess runs it
with `max_memory` set to the cap. Numbers go to the terminal only (record them in RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_per_sample import _peak_mib  # noqa: E402

from funchess.integrations.laplace import FunchessGGN  # noqa: E402

laplace = importlib.import_module("laplace")
STRUCTURES = ("full", "diag", "kron")


def backends() -> dict[str, Any]:
    """funchess first; then laplace's own GGN backends that import here."""
    found: dict[str, Any] = {"funchess": FunchessGGN}
    curvature = importlib.import_module("laplace.curvature")
    for name, attr in (("curvlinops", "CurvlinopsGGN"), ("backpack", "BackPackGGN"), ("asdl", "AsdlGGN")):
        cls = getattr(curvature, attr, None)
        if cls is not None:
            found[name] = cls
    return found


def problem(name: str, quick: bool) -> tuple[nn.Module, DataLoader[Any], int]:
    """`(model, loader, outputs)`; sizes shrink with --quick."""
    torch.manual_seed(0)
    n = 64 if quick else 256
    if name == "mlp":
        width = 32 if quick else 64
        model: nn.Module = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        x, C = torch.randn(n, 20), 10
    elif name == "conv":
        ch = 4 if quick else 8
        model = nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(ch * 7 * 7, 10),
        )
        x, C = torch.randn(n, 3, 16, 16), 10
    else:  # many outputs: a (B, C, P) Jacobian per batch is large
        C = 200 if quick else 1000
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, C))
        x = torch.randn(n, 20)
    y = torch.randint(0, C, (n,))
    return model, DataLoader(TensorDataset(x, y), batch_size=32 if quick else 64), C


def jacobian_bytes(model: nn.Module, loader: DataLoader[Any], C: int) -> int:
    """What laplace's dense diagonal holds per batch: the (B, C, P) Jacobian (and as much again)."""
    P = sum(p.numel() for p in model.parameters())
    return 2 * int(loader.batch_size or 1) * C * P * 4


def fit(backend: Any, structure: str, model: nn.Module, loader: DataLoader[Any], kwargs: dict[str, Any]) -> Any:
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                         backend=backend, backend_kwargs=kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    return la


def precision(la: Any) -> torch.Tensor:
    P = la.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else P


def peak_of(spec: str) -> None:
    """In a fresh process: one fit (after a warm-up fit of a tiny copy), print the growth of peak RSS."""
    name, backend_name, structure, quick, cap = json.loads(spec)
    model, loader, _ = problem(name, quick)
    kwargs = {"max_memory": cap * 2**20} if backend_name == "funchess" else {}
    backend = backends()[backend_name]
    tiny = DataLoader(TensorDataset(*[t[:2] for t in loader.dataset.tensors]), batch_size=2)  # type: ignore[attr-defined]
    fit(backend, structure, model, tiny, kwargs)
    gc.collect()
    before = _peak_mib()
    fit(backend, structure, model, loader, kwargs)
    print(_peak_mib() - before, flush=True)


def measure(name: str, structure: str, args: argparse.Namespace) -> None:
    model, loader, C = problem(name, args.quick)
    P = sum(p.numel() for p in model.parameters())
    found = backends()
    runs: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for bname, cls in found.items():
        kwargs = {"max_memory": args.cap * 2**20} if bname == "funchess" else {}
        dense_diag = structure == "diag" and bname == "curvlinops"
        if name == "many" and bname != "funchess" and (dense_diag or structure == "full"):
            need = jacobian_bytes(model, loader, C) if dense_diag else 0
            if structure == "full":
                need = max(need, 3 * P * P * 4)
            if need > args.cap * 2**20:
                skipped[bname] = f"not run: needs about {need / 2**30:.1f} GiB (> --cap {args.cap} MiB)"
                continue
        # each backend gets its own copy: BackPACK's `extend` leaves hooks on the model it saw
        own = copy.deepcopy(model)
        runs[bname] = lambda cls=cls, kwargs=kwargs, own=own: fit(cls, structure, own, loader, kwargs)
    results: dict[str, Any] = {}
    for bname in list(runs):  # warm-up, and the answer to compare
        try:
            results[bname] = precision(runs[bname]())
        except Exception as exc:  # a peer refusing the model: reported, not fatal
            skipped[bname] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            del runs[bname]
    walls: dict[str, list[float]] = {b: [] for b in runs}
    cpus: dict[str, list[float]] = {b: [] for b in runs}
    for _ in range(args.repeat):
        for bname, run in runs.items():
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            run()
            cpus[bname].append(time.process_time() - c)
            walls[bname].append(time.perf_counter() - w)
    print(f"\n{name} ({P:,} parameters, {C} outputs, {len(loader.dataset)} samples), hessian_structure={structure!r}")  # type: ignore[arg-type]
    print("| backend | wall ms | CPU ms | CPU / funchess | peak MiB | precision vs funchess |\n|---|---|---|---|---|---|")
    ref_cpu = statistics.median(cpus["funchess"]) if "funchess" in cpus else float("nan")
    ref = results.get("funchess")
    for bname in found:
        if bname not in runs:
            print(f"| {bname} | {skipped.get(bname, '')} | | | | |")
            continue
        w, c = statistics.median(walls[bname]), statistics.median(cpus[bname])
        peak = "-"
        if not args.no_memory:
            spec = json.dumps([name, bname, structure, args.quick, args.cap])
            out = subprocess.run([sys.executable, __file__, "--peak-of", spec], capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            peak = f"{float(lines[-1]):.0f}" if out.returncode == 0 and lines else "failed"
        diff = "-" if ref is None else f"{float((results[bname] - ref).abs().max() / ref.abs().max()):.1e}"
        print(f"| {bname} | {w * 1e3:.0f} | {c * 1e3:.0f} | {c / ref_cpu:.2f}x | {peak} | {diff} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small problems (a check that it runs)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--cap", type=int, default=2048, help="MiB: memory cap for the many-outputs problem")
    ap.add_argument("--only", default=None, help="comma-separated problems: mlp,conv,many")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of is not None:
        peak_of(args.peak_of)
        return
    print(f"torch {torch.__version__}, laplace-torch {importlib.metadata.version('laplace-torch')}, "
          f"{torch.get_num_threads()} thread(s), repeat {args.repeat}, backends {list(backends())}")
    for name in (args.only.split(",") if args.only else ["mlp", "conv", "many"]):
        for structure in STRUCTURES if name != "many" else ("diag", "kron", "full"):
            measure(name, structure, args)


if __name__ == "__main__":
    main()
