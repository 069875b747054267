"""The question this library answers: "How do I compute the Hessian of the loss with respect to
all the parameters of my PyTorch model?"

The usual answers, side by side:

1. The nested loop: take the gradient with `create_graph=True`, then one more backward pass per
   entry of it. Right, but one pass per row (and "element 0 of tensors does not require grad"
   when `create_graph=True` is forgotten).
2. `torch.autograd.functional.hessian` on a function of the flattened parameters: needs the
   model rewritten as a function of one Tensor (`torch.func.functional_call` and slicing), and
   still computes row by row unless `vectorize=True`.
3. `funchess.hessian`: the model as a pure function of its parameter dict, the Hessian as named
   blocks (`H[a][b].shape == params[a].shape + params[b].shape`) that are views of one dense
   matrix, computed in vectorised chunks and checked here against answer 1.

Run: python examples/hessian_of_a_loss.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

import funchess
from funchess.testing import assert_hessian_close


def nested_loop_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Answer 1, as it is usually written: one backward pass per row of the Hessian."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # create_graph: differentiable again
    g = torch.cat([gi.reshape(-1) for gi in grads])
    rows = []
    for i in range(g.numel()):
        row = torch.autograd.grad(g[i], params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(rows)


def autograd_functional_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Answer 2: the model as a function of one flat vector, for torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of_flat(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss_of_flat, flat, vectorize=True)


T = TypeVar("T")


def timed(fn: Callable[..., T], *args: object, repeats: int = 1) -> tuple[T, float]:
    """The result and the best time of `repeats` calls (timings on a busy machine are noisy)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model (for the tests)")
    args = parser.parse_args()
    torch.manual_seed(0)
    width, n = (8, 32) if args.quick else (32, 128)
    model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    x, y = torch.randn(n, 10), torch.randint(0, 3, (n,))

    # Answer 3: the model as a pure function f(params, x, y) of a params dict, then its Hessian.
    f, params = funchess.functional(model, F.cross_entropy)
    funchess.hessian(f)(params, x, y)  # the first call in a process pays torch's one-time set-up
    H, t_funchess = timed(funchess.hessian(f), params, x, y, repeats=3)
    M = funchess.to_matrix(H)  # (N, N), rows and columns in named_parameters() order, no copy
    N = M.shape[0]
    print(f"{N} parameters in blocks {', '.join(f'{k} {tuple(p.shape)}' for k, p in params.items())}")
    print(f"H['0.weight']['2.bias'].shape = {tuple(H['0.weight']['2.bias'].shape)}")

    loop, t_loop = timed(nested_loop_hessian, model, x, y)
    functional, t_functional = timed(autograd_functional_hessian, model, x, y, repeats=3)
    for name, other in (("nested loop", loop), ("torch.autograd.functional.hessian", functional)):
        assert_hessian_close(M, other)  # the float32 tolerance of funchess.testing.TOLERANCES
        print(f"matches the {name}: max |difference| = {(M - other).abs().max():.1e}")
    print(
        f"time (best of 3; the loop: once): funchess.hessian {t_funchess * 1e3:.0f} ms, "
        f"autograd.functional (vectorize=True) {t_functional * 1e3:.0f} ms, nested loop {t_loop * 1e3:.0f} ms"
    )

    # What the Hessian tells: curvature per block, and its extreme eigenvalues.
    norms = {(a, b): float(H[a][b].norm()) for a in params for b in params}
    a, b = max(norms, key=norms.__getitem__)
    eigenvalues = torch.linalg.eigvalsh(M.double())
    print(f"largest block: H[{a!r}][{b!r}] (Frobenius norm {norms[a, b]:.3f})")
    print(f"eigenvalues in [{eigenvalues[0]:.2e}, {eigenvalues[-1]:.2e}]; trace {M.trace():.4f}")
    print("ok")


if __name__ == "__main__":
    main()
