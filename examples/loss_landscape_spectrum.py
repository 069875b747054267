"""The loss landscape's curvature over a whole data set: top eigenvalues, trace and spectral
density of the training-loss Hessian, matrix-free, with a picture.

`funchess.DatasetOperator(f, params, loader)` is the Hessian of the mean loss over every batch
of a `DataLoader` (each batch weighted by its share of the samples, so an uneven last batch is
right), as a matrix-free operator: one product iterates the data once and never forms the
Hessian. The spectral tools run on it:

- `funchess.eigsh(H, k)`: the top eigenvalues (the "sharpness") by Lanczos;
- `funchess.trace_estimate(H, num_hvps)`: the trace, with a standard error (Hutch++);
- `funchess.spectral_density(H)`: the eigenvalue density by stochastic Lanczos quadrature,
  the picture of Ghorbani et al. (2019): a bulk near zero and a few outliers.

The model here is small enough to check every number against the dense Hessian (`--check`, on
by default with `--quick`); the operator is what scales to models whose Hessian does not fit.

Run: python examples/loss_landscape_spectrum.py [--quick] [--out spectrum.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import funchess


def make_data(n: int, generator: torch.Generator) -> torch.utils.data.TensorDataset:
    """A synthetic 4-class problem (two noisy informative features, eight distractors)."""
    x = torch.randn(n, 10, generator=generator)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    flip = torch.rand(n, generator=generator) < 0.1  # label noise keeps the loss away from zero
    y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def train(model: torch.nn.Module, loader: torch.utils.data.DataLoader, epochs: int) -> None:
    """Plain mini-batch SGD (torch.optim would also do; by hand it starts faster)."""
    for _ in range(epochs):
        for x, y in loader:
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.2 * g


def plot(density: funchess.SpectralDensity, top: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.semilogy(density.grid, density.density.clamp_min(1e-8), color="C0", label="density (SLQ)")
    for i, lam in enumerate(top.tolist()):
        ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel(r"eigenvalue $\lambda$ of the training-loss Hessian")
    ax.set_ylabel("density")
    ax.set_ylim(1e-6, None)
    ax.legend(frameon=False)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and data set (for the tests)")
    parser.add_argument("--out", type=Path, default=Path("spectrum.png"), help="the picture (png, pdf or svg)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with the dense Hessian (default: with --quick)")
    args = parser.parse_args()
    check = args.quick if args.check is None else args.check
    n, width, epochs = (512, 16, 5) if args.quick else (4096, 48, 20)

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 4)
    )
    data = make_data(n, gen)
    train(model, torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=gen), epochs)

    # The Hessian of the mean training loss over the whole data set, as an operator.
    loader = torch.utils.data.DataLoader(data, batch_size=256)  # re-iterable: every product passes over it
    f, params = funchess.functional(model, F.cross_entropy)
    H = funchess.DatasetOperator(f, params, loader)
    N = sum(p.numel() for p in params.values())
    print(f"{N} parameters, {n} samples in {len(loader)} batches")

    top = funchess.eigsh(H, k=3, tol=1e-4, generator=gen)
    print(f"top eigenvalues {[round(v, 4) for v in top.eigenvalues.tolist()]} ({top.num_hvps} products)")
    bottom = funchess.eigsh(H, k=1, which="SA", tol=1e-4, generator=gen)
    print(f"most negative eigenvalue {float(bottom.eigenvalues[0]):.4f} ({bottom.num_hvps} products)")
    tr = funchess.trace_estimate(H, num_hvps=60, generator=gen)
    print(f"trace {float(tr.value):.3f} ± {float(tr.std_error):.3f} ({tr.num_hvps} products)")
    density = funchess.spectral_density(H, num_probes=4, num_steps=40 if args.quick else 80, generator=gen)
    mass = float(torch.trapezoid(density.density, density.grid))
    print(f"spectral density on [{float(density.grid[0]):.3f}, {float(density.grid[-1]):.3f}], integral {mass:.3f}")

    if check:  # the dense Hessian of the concatenated data, for comparison (small models only)
        x, y = data.tensors
        exact = torch.linalg.eigvalsh(funchess.to_matrix(funchess.hessian(f)(params, x, y)).double())
        print(f"dense check: top {[round(v, 4) for v in exact[-3:].flip(0).tolist()]}, "
              f"min {float(exact[0]):.4f}, trace {float(exact.sum()):.3f}")
        assert torch.allclose(top.eigenvalues.double(), exact[-3:].flip(0), rtol=1e-3, atol=1e-4)
        assert abs(float(bottom.eigenvalues[0]) - float(exact[0])) < 1e-3 * float(exact.abs().max())
        assert abs(float(tr.value) - float(exact.sum())) < 4 * float(tr.std_error) + 1e-3 * abs(float(exact.sum()))

    try:
        plot(density, top.eigenvalues, args.out)
        print(f"wrote {args.out}")
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'funchess[cli]')")
    print("ok")


if __name__ == "__main__":
    main()
