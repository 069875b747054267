"""A model whose Hessian does not fit: ask the memory planner first, then take what does fit
(blocks, the exact diagonal) and go matrix-free for the rest (eigenvalues, trace, diagonal
estimates).

`funchess.plan_hessian(f, max_memory=...)(params, x, y)` measures one probe forward and returns
the `MemoryPlan` a call would use (the output, the kept graph, the working set per row, the chunk
of rows that fits), allocating nothing large. `funchess.hessian` runs the same planner and
raises `funchess.MemoryBudgetError`, before allocating, when even the output cannot fit. The
way out depends on what you need:

- some blocks: `funchess.hessian(f, blocks=["4.*"])` (here: the last layer's block);
- the exact diagonal, in O(N) memory: `funchess.hessian_diagonal(f)` (one Hessian row's work per
  entry, so its time grows with N; `blocks=` restricts it to some layers);
- everything else matrix-free: `funchess.HessianOperator` with `funchess.eigsh`,
  `funchess.trace_estimate`, `funchess.diagonal_estimate` (a few hundred products).

`--max-memory` sets the budget (default: 64 MiB with `--quick`, else 1 GiB, small on purpose so
the point shows on any machine; funchess's own default is 80 % of the device's free memory).

Run: python examples/memory_planner.py [--quick] [--max-memory 1GiB]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import funchess


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model (for the tests)")
    parser.add_argument("--max-memory", default=None, help="the budget, e.g. 1GiB (default: 64MiB with --quick, else 1GiB)")
    args = parser.parse_args()
    width = 64 if args.quick else 512
    budget = args.max_memory or ("64MiB" if args.quick else "1GiB")

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    )
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
    N = sum(p.numel() for p in params.values())
    print(f"{N:,} parameters: {', '.join(f'{k} {tuple(p.shape)}' for k, p in params.items())}")

    # 1. Ask first: what would the full Hessian need?
    plan = funchess.plan_hessian(f, max_memory=budget)(params, x, y)
    print(f"full Hessian: {plan}")  # needs ... of a budget of ...
    assert not plan.fits and plan.output_bytes == N * N * 4

    # 2. Asking for it anyway fails before anything large is allocated, and says what to do.
    try:
        funchess.hessian(f, max_memory=budget)(params, x, y)
        raise AssertionError("expected a MemoryBudgetError")
    except funchess.MemoryBudgetError as error:
        print(f"funchess.hessian refuses: {str(error)[:160]}...")

    # 3. What fits: the last layer's block ...
    last = ["4.*"]
    block_plan = funchess.plan_hessian(f, blocks=last, max_memory=budget)(params, x, y)
    print(f"last layer's block: {block_plan}")
    block = funchess.hessian(f, blocks=last, max_memory=budget)(params, x, y)
    M_last = funchess.to_matrix(block)  # the sub-Hessian among the chosen parameters
    print(f"  H['4.weight']['4.bias'].shape = {tuple(block['4.weight']['4.bias'].shape)}; as a matrix "
          f"{tuple(M_last.shape)}, top eigenvalue {float(torch.linalg.eigvalsh(M_last.double())[-1]):.4f}")

    # ... and the exact diagonal, in O(N) memory (all of it with --quick; the last layer otherwise).
    diag_blocks = None if args.quick else last
    diag_plan = funchess.plan_hessian(f, diagonal=True, blocks=diag_blocks, max_memory=budget)(params, x, y)
    print(f"exact diagonal{'' if diag_blocks is None else ' of the last layer'}: {diag_plan}")
    exact = funchess.hessian_diagonal(f, blocks=diag_blocks, max_memory=budget)(params, x, y)

    # 4. Matrix-free: only Hessian-vector products, O(N) memory each.
    H = funchess.HessianOperator(f, params, x, y)
    gen = torch.Generator().manual_seed(0)
    top = funchess.eigsh(H, k=3, tol=1e-3, generator=gen)
    print(f"top eigenvalues {[round(v, 4) for v in top.eigenvalues.tolist()]} ({top.num_hvps} products)")
    tr = funchess.trace_estimate(H, num_hvps=90, generator=gen)
    print(f"trace {float(tr.value):.3f} ± {float(tr.std_error):.3f} ({tr.num_hvps} products)")
    est = funchess.diagonal_estimate(H, num_hvps=200, generator=gen)
    print(f"diagonal ({est.num_hvps} products), per layer: mean entry, exact and estimated, and the "
          f"estimate's typical standard error per entry")
    for name in exact:
        exact_mean, estimate = float(exact[name].mean()), float(est.value[name].mean())
        print(f"  {name:9s} exact {exact_mean:+.2e}  estimate {estimate:+.2e}  per entry ± {float(est.std_error[name].median()):.1e}")
    if diag_blocks is None:
        total = sum(float(d.sum()) for d in exact.values())
        print(f"exact trace (sum of the exact diagonal) {total:.3f}")
        assert abs(total - float(tr.value)) < 5 * float(tr.std_error) + 1e-3 * abs(total)
    print("ok")


if __name__ == "__main__":
    main()
