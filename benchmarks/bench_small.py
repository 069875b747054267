"""Small models, few samples: `funchess.hessian` against `torch.func.hessian`, as ratios from one run.

    python benchmarks/bench_small.py [--repeat 7] [--batches 1,4,16,64]

For models of a few hundred to a few thousand parameters evaluated on a handful of samples, the
per-leaf block engine's fixed cost (a forward, a backward and a `vmap` per parameter block)
outweighs the arithmetic it saves, and one joint pass over all rows (what `torch.func.hessian`
does) is faster. The planner chooses between the two from a probe forward; this script shows
where it chose which ("grouping"), the planned call, the per-leaf engine forced, and
`torch.func.hessian`, all on the same data. Both results are compared with the oracle
(`funchess.testing.reference_hessian`, nested double-backward loops): max relative difference, and a
mismatch above float32's tolerance is flagged. (torch.func's double backward of layer norm is
wrong, so its transformer Hessians are flagged.)

Times are medians of wall-clock milliseconds; the first call of each method is a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import funchess  # noqa: E402
from funchess import _hessian  # noqa: E402
from funchess.cli.models import Problem, cnn, make_problem, mlp, transformer  # noqa: E402
from funchess.testing import reference_hessian  # noqa: E402


def timeit(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def problems() -> list[tuple[str, Problem]]:
    return [
        ("MLP 10-16-16-3", make_problem("mlp-500")),
        ("MLP 20-32-32-5", make_problem("mlp-2k")),
        ("MLP 10-24x5-3 (deep)", mlp((10, 24, 24, 24, 24, 24, 3), batch=128, name="deep")),
        ("CNN 1x10x10 (demo)", cnn((1, 6, 8), size=10, classes=4, batch=128)),
        ("transformer d=8 (demo)", transformer(8, 2, 16, seq=6, classes=3, batch=128)),
        ("transformer d=16", make_problem("transformer-2k")),
        ("MLP 50-64-64-10", make_problem("mlp-8k")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--batches", default="1,4,16,64")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, repeat {args.repeat}\n")
    print("| model | N | samples | grouping | funchess.hessian ms | per-leaf forced ms | torch.func.hessian ms "
          "| torch.func / funchess | funchess vs oracle | torch.func vs oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    chosen: dict[str, bool] = {}
    planned = _hessian._planned

    def spy(*a: Any, **k: Any) -> Any:
        p = planned(*a, **k)
        chosen["joint"] = p.joint
        return p

    _hessian._planned = spy  # type: ignore[assignment]
    for name, pr in problems():
        f, params = pr.function()
        N = sum(p.numel() for p in params.values())
        for B in batches:
            x, y = pr.inputs[:B], pr.targets[:B]
            ours = timeit(lambda: funchess.hessian(f)(params, x, y), args.repeat)
            grouping = "joint" if chosen["joint"] else "per-leaf"
            _hessian._JOINT_MAX_N, keep = 0, _hessian._JOINT_MAX_N
            leaf = timeit(lambda: funchess.hessian(f)(params, x, y), args.repeat)
            _hessian._JOINT_MAX_N = keep
            theirs = timeit(lambda: torch.func.hessian(lambda p: f(p, x, y))(params), args.repeat)
            oracle = funchess.to_matrix(reference_hessian(f, params, x, y))
            checks = [funchess.hessian(f)(params, x, y), torch.func.hessian(lambda p: f(p, x, y))(params)]
            diffs = [((funchess.to_matrix(H) - oracle).abs().max() / oracle.abs().max()).item() for H in checks]
            shown = " | ".join(f"{d:.1e}" + ("" if d < 1e-4 else " **WRONG**") for d in diffs)
            print(f"| {name} | {N:,} | {B} | {grouping} | {ours:.1f} | {leaf:.1f} | {theirs:.1f} | "
                  f"{theirs / ours:.2f}x | {shown} |", flush=True)


if __name__ == "__main__":
    main()
