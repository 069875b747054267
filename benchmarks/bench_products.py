"""Benchmark: curvature products against plain double backward, and the spectral tools before and
after keeping the linearisation, as ratios from one process run.

    python benchmarks/bench_products.py [--before DIR] [--repeats 7] [--threads 1] [--quick]

1. `funchess.hvp(f)(params, v, x, y)` (default mode "auto") and one `HessianOperator` product
   against a plain double-backward HVP of the same function (`torch.autograd.grad` with
   `create_graph=True`, then `torch.autograd.grad` of the gradient with `v`), on the bench's MLPs
   (`funchess/cli/models.py`, float32). Each method is timed in turn, many rounds interleaved;
   the table gives the median per call and the median of the per-round ratios.
2. `eigsh`, `cg`, `trace_estimate` and `spectral_density` on one fixed batch (float64) with
   `HessianOperator(reuse=True)` (the linearisation built once) and `reuse=False` (fresh products),
   and, with `--before DIR`, the funchess checked out in `DIR` (e.g. `git archive <commit>
   funchess | tar -x -C DIR`), loaded as a second package in this same process. Every method
   must use the same number of products (checked); the reference point is that many plain
   double-backward HVPs, one after another. Interleaved rounds, medians.

Times are process CPU time (see `interleaved`).

Runs torch on one thread by default (`--threads`): small products on a shared machine are far
steadier that way. Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import funchess  # noqa: E402
from funchess.cli.models import make_problem  # noqa: E402

F64 = torch.float64


def load_before(root: str) -> ModuleType:
    """The funchess package under `root` as a second package, `funchess_before`."""
    init = Path(root) / "funchess" / "__init__.py"
    spec = importlib.util.spec_from_file_location("funchess_before", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["funchess_before"] = module
    spec.loader.exec_module(module)
    return module


def plain_hvp(f: Callable[..., Any], params: dict[str, torch.Tensor], v: list[torch.Tensor], *data: Any) -> Any:
    """The reference: plain autograd's double backward."""
    xs = [p.detach().requires_grad_(True) for p in params.values()]
    loss = f(dict(zip(params, xs)), *data)
    g = torch.autograd.grad(loss, xs, create_graph=True)
    return torch.autograd.grad(g, xs, grad_outputs=v)


def interleaved(methods: dict[str, Callable[[], Any]], rounds: int, ref: str) -> dict[str, tuple[float, float]]:
    """`{name: (median CPU seconds, median of per-round ratios to ref)}`, methods timed in turn.

    Process CPU time, not wall time: on one thread it is the work done, while a shared machine
    deschedules the process for as long again as it runs."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {
        k: (statistics.median(t), statistics.median(a / b for a, b in zip(t, times[ref]))) for k, t in times.items()
    }


# ----------------------------------------------------------------------------- 1. products


def products(names: list[str], rounds: int, before: ModuleType | None) -> None:
    print("### One product against plain double backward (float32, default options)\n")
    extra = " before: hvp | ratio | before: HessianOperator @ v | ratio |" if before is not None else ""
    print("| problem | N | plain | funchess.hvp | ratio | HessianOperator @ v (reuse) | ratio | reuse=False | ratio |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if before is not None else ""))
    for name in names:
        pb = make_problem(name)
        f, params = pb.function()
        x, y = pb.inputs, pb.targets
        v = {k: torch.randn_like(p) for k, p in params.items()}
        vl = list(v.values())
        H = funchess.hvp(f)
        op = funchess.HessianOperator(f, params, x, y)
        op0 = funchess.HessianOperator(f, params, x, y, reuse=False)
        flat = funchess.ravel(v)
        methods: dict[str, Callable[[], Any]] = {
            "plain": lambda: plain_hvp(f, params, vl, x, y),
            "hvp": lambda: H(params, v, x, y),
            "op": lambda: op @ flat,
            "op0": lambda: op0 @ flat,
        }
        shown = ["hvp", "op", "op0"]
        if before is not None:
            fb, pb_params = before.functional(pb.model, pb.loss_fn)
            opb = before.HessianOperator(fb, pb_params, x, y)
            # 0.1's hvp ran at once, torch.func.jvp-style, with a tangent for every primal.
            methods["before hvp"] = lambda: before.hvp(lambda p: fb(p, x, y), (pb_params,), (v,))
            methods["before op"] = lambda: opb @ flat
            shown += ["before hvp", "before op"]
        got = interleaved(methods, rounds, "plain")
        n = op.shape[0]
        cells = " | ".join(f"{got[k][0] * 1e6:.0f} us | {got[k][1]:.2f}x" for k in shown)
        print(f"| {name} | {n:,} | {got['plain'][0] * 1e6:.0f} us | {cells} |")


# ----------------------------------------------------------------------------- 2. spectral tools


def tools(lib: ModuleType, op: Any, n: int) -> dict[str, Callable[[], int]]:
    """The four tools on `op`, each returning its product count (fixed by its options)."""

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    rhs = torch.randn(n, generator=gen(), dtype=F64)
    return {
        "eigsh": lambda: lib.eigsh(op, k=5, which="LM", tol=1e-30, max_iter=60, generator=gen()).num_hvps,
        "cg": lambda: lib.cg(op, rhs, damping=1.0, rtol=1e-30, max_iter=60).num_hvps,
        # 0.1 named the default Hutch++ estimate `hutchpp_trace`.
        "trace_estimate": lambda: getattr(lib, "trace_estimate", getattr(lib, "hutchpp_trace", None))(
            op, 60, generator=gen()
        ).num_hvps,
        "spectral_density": lambda: lib.spectral_density(op, num_probes=4, num_steps=20, generator=gen()).num_hvps,
    }


def spectral(names: list[str], before: ModuleType | None, rounds: int) -> None:
    print("\n### Spectral tools on a fixed batch (float64; same products for every method)\n")
    cols = ["reuse=True", "reuse=False"] + (["before"] if before is not None else [])
    print(f"| problem | tool | products | plain HVPs | {' | '.join(cols)} | " + " | ".join(f"{c} / reuse=True" for c in cols[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(cols) - 1))
    for name in names:
        pb = make_problem(name, dtype=F64)
        f, params = pb.function()
        x, y = pb.inputs, pb.targets
        n = sum(p.numel() for p in params.values())
        ops: dict[str, Callable[[], Any]] = {
            "reuse=True": lambda: funchess.HessianOperator(f, params, x, y, reuse=True),
            "reuse=False": lambda: funchess.HessianOperator(f, params, x, y, reuse=False),
        }
        libs: dict[str, ModuleType] = {"reuse=True": funchess, "reuse=False": funchess}
        if before is not None:
            fb, pb_params = before.functional(pb.model, pb.loss_fn)
            ops["before"] = lambda: before.HessianOperator(fb, pb_params, x, y)
            libs["before"] = before
        v = [torch.randn_like(p) for p in params.values()]
        for tool in ("eigsh", "cg", "trace_estimate", "spectral_density"):
            counts: dict[str, int] = {}

            def run(label: str, tool: str = tool, counts: dict[str, int] = counts) -> None:
                # a new operator per run: the build of the linearisation is part of the cost
                counts[label] = tools(libs[label], ops[label](), n)[tool]()

            methods: dict[str, Callable[[], Any]] = {c: (lambda c=c: run(c)) for c in cols}
            run("reuse=True")
            hvps = counts["reuse=True"]
            methods["plain"] = lambda hvps=hvps: [plain_hvp(f, params, v, x, y) for _ in range(hvps)]
            got = interleaved(methods, rounds, "reuse=True")
            assert len(set(counts.values())) == 1, f"{tool}: product counts differ: {counts}"
            cells = " | ".join(f"{got[c][0] * 1e3:.0f} ms" for c in cols)
            ratios = " | ".join(f"{got[c][1]:.2f}x" for c in cols[1:])
            print(f"| {name} | {tool} | {hvps} | {got['plain'][0] * 1e3:.0f} ms | {cells} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a checkout root whose funchess/ is the 'before' version")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the spectral tools")
    parser.add_argument("--rounds", type=int, default=300, help="rounds of single products")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer problems and rounds")
    parser.add_argument("--only", choices=["products", "spectral"], help="run one part")
    parser.add_argument("--problems", nargs="*", help="problems of the spectral part (default: mlp-2k, cnn-2k, transformer-2k)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", funchess.ConvergenceWarning)
    before = load_before(args.before) if args.before else None
    if before is not None:
        warnings.simplefilter("ignore", before.ConvergenceWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    mlps = ["mlp-tiny", "mlp-2k"] if args.quick else ["mlp-tiny", "mlp-500", "mlp-2k", "mlp-8k"]
    if args.only != "spectral":
        products(mlps, args.rounds // 3 if args.quick else args.rounds, before)
    if args.only != "products":
        problems = args.problems or (["mlp-2k"] if args.quick else ["mlp-2k", "cnn-2k", "transformer-2k"])
        spectral(problems, before, 3 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
