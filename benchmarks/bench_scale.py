"""Issue 4's benchmark: symmetry, block selection, the exact diagonal and the memory planner.

Every measurement runs in a fresh subprocess, so its peak memory (the kernel's VmHWM, reset before
the timed call) is its own. Times are medians after one warm-up call; ratios compare methods
measured in the same run. The nested double-backward loop is timed on its first rows and
extrapolated (one backward per row, so time is linear in rows); the table says so.

    python benchmarks/bench_scale.py               # deep MLPs 5k-21k params + the 45k planner run
    python benchmarks/bench_scale.py --quick       # small sizes only (a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    r"""
    import json, statistics, sys, time
    import torch, torch.nn.functional as F
    import funchess
    from torch.func import jacrev

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    dims, batch, reps = spec["dims"], spec["batch"], spec["reps"]
    dtype = getattr(torch, spec["dtype"])
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).to(dtype)
    x, y = torch.randn(batch, dims[0], dtype=dtype), torch.randint(0, dims[-1], (batch,))
    f, params = funchess.functional(model, F.cross_entropy)
    loss = lambda p: f(p, x, y)
    names = list(params)
    m = spec["method"]
    if m == "funchess":
        run = lambda: funchess.hessian(f)(params, x, y)
    elif m == "funchess-views":  # each pair once, mirrors as transposed views: what the dense matrix costs
        run = lambda: funchess.hessian(f, blocks=[("*", "*")], chunk_size=256)(params, x, y)
    elif m == "blocks-diagonal":
        run = lambda: funchess.hessian(f, blocks="diagonal")(params, x, y)
    elif m == "blocks-first-last":
        run = lambda: funchess.hessian(f, blocks=[(names[0], names[-2])])(params, x, y)
    elif m == "hessian_diagonal":
        run = lambda: funchess.hessian_diagonal(f)(params, x, y)
    elif m == "torch.func.hessian":
        run = lambda: torch.func.hessian(loss)(params)
    elif m.startswith("jacrev(jacrev)"):
        chunk = int(m.split("=")[1])
        run = lambda: jacrev(jacrev(loss), chunk_size=chunk)(params)
    elif m == "nested-loop":
        rows = spec["loop_rows"]
        def run():
            leaves = [p.clone().requires_grad_(True) for p in params.values()]
            g = torch.autograd.grad(loss(dict(zip(names, leaves))), leaves, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            for i in range(rows):
                torch.autograd.grad(flat[i], leaves, retain_graph=True)
    else:
        raise SystemExit(f"unknown method {m}")
    n = sum(p.numel() for p in params.values())
    try:
        funchess.hessian(lambda w: (w ** 3).sum())(torch.randn(3))
        if spec.get("warmup", True):
            run()
        times = []
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        for _ in range(reps):
            t = time.perf_counter(); out = run(); times.append(time.perf_counter() - t); del out
        peak = status("VmHWM") - base
        print(json.dumps({"n": n, "time": statistics.median(times), "peak": peak, "ok": True}))
    except (RuntimeError, MemoryError) as e:
        print(json.dumps({"n": n, "ok": False, "error": f"{type(e).__name__}: {str(e)[:120]}"}))
    """
)


def measure(method: str, dims: list[int], batch: int, dtype: str = "float32", reps: int = 3, limit_gib: float | None = None, **extra: object) -> dict[str, object]:
    spec = {"method": method, "dims": dims, "batch": batch, "dtype": dtype, "reps": reps, **extra}
    cmd = [sys.executable, "-c", WORKER, json.dumps(spec)]
    pre = None
    if limit_gib is not None:
        import resource

        limit = int(limit_gib * 2**30)
        pre = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, preexec_fn=pre)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": (out.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def gib(b: object) -> str:
    return f"{int(b) / 2**30:.2f} GiB" if isinstance(b, int) else "-"  # type: ignore[call-overload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-45k", action="store_true")
    ap.add_argument("--widths", default=None, help="comma-separated hidden widths of the deep MLPs (default 32,48,64)")
    args = ap.parse_args()
    import torch

    print(f"# funchess scale benchmark\n\n{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; float32, cross-entropy, batch 128.\n")
    widths = [int(w) for w in args.widths.split(",")] if args.widths else ([24, 32] if args.quick else [32, 48, 64])
    for w in widths:
        dims = [30] + [w] * 6 + [10]  # 7 linear layers (6 hidden)
        rows = {}
        rows["funchess"] = measure("funchess", dims, 128)
        n = int(rows["funchess"]["n"])  # type: ignore[call-overload]
        rows["funchess, blocks=[(*, *)] (mirrors as views, no dense matrix)"] = measure("funchess-views", dims, 128)
        for c in (64, 256, 1024):
            rows[f"jacrev(jacrev) chunk={c}"] = measure(f"jacrev(jacrev)={c}", dims, 128)
        rows["torch.func.hessian"] = measure("torch.func.hessian", dims, 128, reps=1 if n > 10_000 else 3)
        loop_rows = min(n, 300)
        loop = measure("nested-loop", dims, 128, reps=1, loop_rows=loop_rows)
        if loop.get("ok"):
            loop["time"] = float(loop["time"]) * n / loop_rows  # type: ignore[arg-type]
        rows[f"nested loop (extrapolated from {loop_rows} rows)"] = loop
        rows["blocks='diagonal'"] = measure("blocks-diagonal", dims, 128)
        rows["blocks=[(first, last)]"] = measure("blocks-first-last", dims, 128)
        rows["hessian_diagonal"] = measure("hessian_diagonal", dims, 128)
        base = float(rows["funchess"]["time"])  # type: ignore[arg-type]
        jac = [r for k, r in rows.items() if k.startswith("jacrev") and r.get("ok")]
        best_jac = min(float(r["time"]) for r in jac) if jac else float("nan")  # type: ignore[arg-type]
        out_bytes = n * n * 4
        print(f"## deep MLP {'-'.join(map(str, dims))}: N = {n:,} (Hessian {gib(out_bytes)})\n")
        print("| method | time | time / funchess | peak RSS increase | peak / Hessian size |\n|---|---|---|---|---|")
        for k, r in rows.items():
            if not r.get("ok"):
                print(f"| {k} | failed: {r.get('error')} | | | |")
                continue
            t = float(r["time"])  # type: ignore[arg-type]
            print(f"| {k} | {t:.3f} s | {t / base:.2f} | {gib(r['peak'])} | {int(r['peak']) / out_bytes:.2f} |")  # type: ignore[call-overload]
        print(f"\nfunchess vs best jacrev(jacrev): {best_jac / base:.2f}x faster; "
              f"vs torch.func.hessian: {float(rows['torch.func.hessian'].get('time', float('nan'))) / base:.2f}x\n")  # type: ignore[arg-type]
    if not args.quick and not args.skip_45k:
        dims = [100, 150, 150, 100, 10]  # ~45k parameters, float32 Hessian ~ 8 GB
        print("## The planner: a ~45k-parameter MLP, full float32 Hessian\n")
        r = measure("funchess", dims, 128, reps=1, warmup=False)
        n = int(r.get("n", 0))  # type: ignore[call-overload]
        print(f"N = {n:,}; the Hessian alone is {gib(n * n * 4)}.\n")
        print("| method | result |\n|---|---|")
        if r.get("ok"):
            print(f"| funchess.hessian (planner, default budget) | {float(r['time']):.1f} s, peak RSS increase {gib(r['peak'])} ({int(r['peak']) / (n * n * 4):.2f}x the Hessian) |")  # type: ignore[arg-type, call-overload]
        else:
            print(f"| funchess.hessian | failed: {r.get('error')} |")
        t = measure("torch.func.hessian", dims, 128, reps=1, warmup=False, limit_gib=22)
        verdict = f"completed in {float(t['time']):.1f} s" if t.get("ok") else f"failed: {t.get('error')}"  # type: ignore[arg-type]
        print(f"| torch.func.hessian (address space capped at 22 GiB) | {verdict} |")

if __name__ == "__main__":
    main()
