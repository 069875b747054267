"""Quick start: the Hessian of a network's loss with respect to its parameters, done right.

The textbook way is a nested double-backward loop (one backward pass per Hessian row, and a
"does not require grad" error if `create_graph=True` is forgotten). funchess turns the model into a
pure function of its parameters and returns the Hessian as named blocks, checked here against that
loop (`funchess.testing.reference_hessian`).

Run: python examples/quickstart.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import funchess
from funchess.testing import assert_hessian_close, reference_hessian


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))

    # 1. The model as a pure function of a params dict (the model itself is never modified).
    f, params = funchess.functional(model, F.cross_entropy)
    n = sum(p.numel() for p in params.values())
    print(f"{n} parameters in {len(params)} blocks: {', '.join(params)}")

    # 2. The Hessian as blocks: H[a][b].shape == params[a].shape + params[b].shape.
    t0 = time.perf_counter()
    H = funchess.hessian(f)(params, x, y)
    t_first = time.perf_counter() - t0  # includes torch.func's one-time set-up in this process
    t0 = time.perf_counter()
    H = funchess.hessian(f)(params, x, y)
    t_fast = time.perf_counter() - t0
    print("H['0.weight']['2.bias'].shape =", tuple(H["0.weight"]["2.bias"].shape))  # (16, 10, 3)

    # 3. ... and as one dense matrix, rows/columns in named_parameters() order (no copy).
    M = funchess.to_matrix(H)
    eigs = torch.linalg.eigvalsh(M.double())
    print(f"dense {tuple(M.shape)}; eigenvalues in [{eigs[0]:.3e}, {eigs[-1]:.3e}], trace {M.trace():.4f}")

    # 4. A Hessian-vector product without forming H, equal to M @ v.
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hv = funchess.hvp(f)(params, v, x, y)
    print("max |hvp - M @ v| =", f"{(funchess.ravel(hv) - M @ funchess.ravel(v)).abs().max():.2e}")

    # 5. Check against the nested double-backward loop (one backward pass per row).
    t0 = time.perf_counter()
    loop = reference_hessian(f, params, x, y)
    t_loop = time.perf_counter() - t0
    assert_hessian_close(H, loop)
    print(
        f"matches the nested loop; funchess {t_fast * 1e3:.0f} ms (first call {t_first * 1e3:.0f} ms with "
        f"torch.func's one-time set-up), loop {t_loop * 1e3:.0f} ms"
    )
    # ... and in float64, at the oracle's tight tolerance.
    f64, p64 = funchess.functional(model.double(), F.cross_entropy)
    assert_hessian_close(funchess.hessian(f64)(p64, x.double(), y), reference_hessian(f64, p64, x.double(), y))
    print("matches the nested loop in float64 too")


if __name__ == "__main__":
    main()
