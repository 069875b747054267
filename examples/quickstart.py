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
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))

    # 1. The model as a pure function of a params dict (the model itself is never modified).
    f, params = funchess.functional(model, F.cross_entropy)
    n = sum(p.numel() for p in params.values())
    print(f"{n} parameters in {len(params)} blocks: {', '.join(params)}")

    # 2. The Hessian as blocks: H[a][b].shape == params[a].shape + params[b].shape.
    t0 = time.perf_counter()
    H = funchess.hessian(f)(params, x, y)
    t_fast = time.perf_counter() - t0
    print("H['0.weight']['2.bias'].shape =", tuple(H["0.weight"]["2.bias"].shape))

    # 3. ... and as one dense matrix, rows/columns in named_parameters() order (no copy).
    M = funchess.to_matrix(H)
    eigs = torch.linalg.eigvalsh(M.double())
    print(f"dense {tuple(M.shape)}; eigenvalues in [{eigs[0]:.3e}, {eigs[-1]:.3e}], trace {M.trace():.4f}")

    # 4. A Hessian-vector product without forming H, equal to M @ v.
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hv = funchess.hvp(lambda p: f(p, x, y), (params,), (v,))
    print("max |hvp - M @ v| =", f"{(funchess.ravel(hv) - M @ funchess.ravel(v)).abs().max():.2e}")

    # 5. Check against the nested double-backward loop, in float64.
    t0 = time.perf_counter()
    loop = reference_hessian(f, params, x, y)
    t_loop = time.perf_counter() - t0
    assert_hessian_close(H, loop)
    f64, p64 = funchess.functional(model.double(), F.cross_entropy)
    assert_hessian_close(funchess.hessian(f64)(p64, x.double(), y), reference_hessian(f64, p64, x.double(), y))
    print(f"matches the nested loop (float32 and float64); funchess {t_fast * 1e3:.0f} ms, loop {t_loop * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
