"""Benchmark: funchess.distributed with 1, 2 and 4 gloo processes on this machine.

Three workloads on one data set, each rank holding every world_size-th sample:

1. the data-set Hessian (`funchess.distributed.dataset_hessian`, one all-reduce of N x N);
2. a loop of data-set HVPs (`dataset_operator(...).mv`, one all-reduce of N per product);
3. Lanczos (`funchess.eigsh(dataset_operator, k=1)`, a fixed number of products).

Each is timed on every rank (median over repeats after a warm-up; the slowest rank counts), with
the time spent inside `torch.distributed.all_reduce` per product (which includes waiting for the
slowest rank, i.e. load imbalance) and, separately, a bare all-reduce of N floats after a barrier
(the transport alone). "1 (no group)" is the single-process function without a process group.
World sizes run in rounds (1, 2, 4, 1, 2, 4, ...) so that a burst of load on a shared machine hits
all of them; the table reports, per world size, the median over rounds.

On a machine with C cores the speed-up is bounded by C (here: 2): 4 processes share 2 cores. Each
process runs torch on one thread.

Run: `python benchmarks/bench_distributed.py` (`--quick` for a smaller problem, `--rounds` to
repeat). Prints a Markdown table; numbers belong in benchmarks/RESULTS.md, not in the code.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

F64 = torch.float64
STEPS = {True: 20, False: 30}  # Lanczos steps (quick or not)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problem(quick: bool) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, str]:
    import funchess

    torch.manual_seed(0)
    sizes = (10, 24, 24, 4) if quick else (20, 32, 32, 5)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    n = 1024 if quick else 2048
    x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
    f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
    N = sum(p.numel() for p in params.values())
    return f, params, x, y, f"MLP {'-'.join(map(str, sizes))} tanh, cross-entropy, float32, N = {N}, {n} samples in batches of 64"


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of this process over `repeats` runs after a warm-up. CPU
    time shows how the work divides between ranks even when the ranks share too few cores."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _rank(rank: int, world: int, port: int, quick: bool, out_dir: str) -> None:
    """One rank's measurements (world 0: no process group), written to out_dir/rank.json."""
    import faulthandler

    faulthandler.enable()  # a crash in native code prints where Python was
    torch.set_num_threads(1)
    import torch.distributed as dist

    import funchess
    import funchess.distributed as fd

    if world:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    f, params, x, y, _ = _problem(quick)
    step = max(world, 1)
    xs, ys = x[rank::step], y[rank::step]
    shard = [(xs[i : i + 64], ys[i : i + 64]) for i in range(0, len(xs), 64)]
    N = sum(p.numel() for p in params.values())

    spent = [0.0]
    calls = [0]
    if world:
        original = dist.all_reduce

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                calls[0] += 1

        dist.all_reduce = timed  # funchess looks it up per call

    def comm(fn: Callable[[], Any], per: int) -> float:
        """Seconds inside all_reduce per unit of `fn` (e.g. per product)."""
        spent[0] = 0.0
        fn()
        return spent[0] / per

    repeats = 3
    hessian = fd.dataset_hessian(f) if world else funchess.dataset_hessian(f)
    t_hessian, cpu_hessian = _median_time(lambda: hessian(params, shard), repeats)
    c_hessian = comm(lambda: hessian(params, shard), 1) if world else 0.0

    op = fd.dataset_operator(f, params, shard)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    products = 10 if quick else 20

    def hvp_loop() -> None:
        for _ in range(products):
            op.mv(v)

    t_hvp, cpu_hvp = (t / products for t in _median_time(hvp_loop, repeats))
    c_hvp = comm(hvp_loop, products) if world else 0.0

    steps = STEPS[quick]

    def lanczos() -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fixed number of steps, converged or not
            funchess.eigsh(op, k=1, max_iter=steps, tol=1e-30, generator=torch.Generator().manual_seed(0))

    t_lanczos, cpu_lanczos = _median_time(lanczos, 1)
    c_lanczos = comm(lanczos, steps) if world else 0.0

    bare = 0.0
    if world:
        buf = torch.zeros(N + 2)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(20):
            original(buf)
        bare = (time.perf_counter() - start) / 20
    result = {"hessian": t_hessian, "hessian_cpu": cpu_hessian, "hessian_comm": c_hessian, "hvp": t_hvp,
              "hvp_cpu": cpu_hvp, "hvp_comm": c_hvp, "lanczos": t_lanczos, "lanczos_cpu": cpu_lanczos,
              "lanczos_comm": c_lanczos, "bare": bare, "samples": len(xs)}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if world:
        dist.barrier()  # tear gloo down together: a rank leaving early can abort a peer's exit
        dist.destroy_process_group()


def _run(world: int, quick: bool) -> dict[str, float]:
    """The slowest rank's times (and its communication) for `world` processes (0: no group)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_rank, args=(world, _port(), quick, out), nprocs=max(world, 1), join=True)
        except mp.ProcessExitedException as exc:
            # every rank wrote its measurements before it exited: a crash while the process shuts
            # down (seen rarely with gloo on this machine) does not touch them; anything else does
            if not all(os.path.exists(os.path.join(out, f"{r}.json")) for r in range(max(world, 1))):
                raise
            print(f"  (world {world}: a rank exited abnormally after reporting: {exc})", flush=True)
        ranks = []
        for r in range(max(world, 1)):
            with open(os.path.join(out, f"{r}.json")) as fh:
                ranks.append(json.load(fh))
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worlds", default="0,1,2,4", help="world sizes; 0 = no process group")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in worlds}
    for r in range(args.rounds):
        for w in worlds:
            runs[w].append(_run(w, args.quick))
            print(f"round {r + 1}/{args.rounds}, world {w}: done", flush=True)
    med = {w: {k: statistics.median(run[k] for run in runs[w]) for k in runs[w][0]} for w in worlds}
    base = med[worlds[0]]
    print(f"\n{_problem(args.quick)[4]}; {os.cpu_count()} CPU cores; median of {args.rounds} rounds; "
          f"times of the slowest rank\n")
    steps = STEPS[args.quick]
    print("Wall-clock (speed-up) and the slowest rank's CPU time; all-reduce time per product includes "
          "waiting for the slowest rank.\n")
    print("| processes | data-set Hessian | its CPU/rank | HVP (per product) | its CPU/rank | all-reduce "
          "per HVP | bare all-reduce of N | Lanczos (per step) | its CPU/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in worlds:
        m = med[w]
        print(f"| {w if w else '1 (no group)'} | {m['hessian'] * 1e3:.0f} ms ({base['hessian'] / m['hessian']:.2f}x) | "
              f"{m['hessian_cpu'] * 1e3:.0f} ms | {m['hvp'] * 1e3:.1f} ms ({base['hvp'] / m['hvp']:.2f}x) | "
              f"{m['hvp_cpu'] * 1e3:.1f} ms | {m['hvp_comm'] * 1e3:.2f} ms | {m['bare'] * 1e3:.3f} ms | "
              f"{m['lanczos'] * 1e3 / steps:.1f} ms ({base['lanczos'] / m['lanczos']:.2f}x) | "
              f"{m['lanczos_cpu'] * 1e3 / steps:.1f} ms |")
    print("\nall-reduce time of the data-set Hessian (one N x N all-reduce, incl. waiting): "
          + ", ".join(f"{w}: {med[w]['hessian_comm'] * 1e3:.1f} ms" for w in worlds if w))


if __name__ == "__main__":
    main()
