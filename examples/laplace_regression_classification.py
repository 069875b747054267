"""Laplace approximations with funchess as laplace-torch's curvature backend.

Trains a small regression network on a noisy sine and a small classifier on two moons (made here,
nothing is downloaded), fits a Laplace approximation of each with `backend=FunchessGGN`, tunes the
prior precision by the marginal likelihood, and plots the predictive uncertainty (the GLM
predictive) to a PNG: the regression's error bars widen away from the data, the classifier's
confidence drops between and beyond the moons.

Needs the optional extra: pip install "funchess[laplace]" (then pip uninstall torchvision if
`import laplace` fails with "operator torchvision::nms does not exist").

Run: python examples/laplace_regression_classification.py [--quick] [--out laplace.png]
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from laplace import Laplace  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from funchess.integrations.laplace import FunchessGGN  # noqa: E402


def train(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, epochs: int) -> None:  # type: ignore[type-arg]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()


def regression(ax: plt.Axes, quick: bool) -> float:
    torch.manual_seed(0)
    x = torch.cat([torch.rand(40, 1) * 2 - 4, torch.rand(40, 1) * 2 + 1])  # two clusters, a gap between
    y = torch.sin(x) + 0.1 * torch.randn_like(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)
    w = 16 if quick else 32
    model = nn.Sequential(nn.Linear(1, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1))
    train(model, loader, nn.MSELoss(), 150 if quick else 600)

    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", backend=FunchessGGN, sigma_noise=0.1)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=20))
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")

    grid = torch.linspace(-6, 6, 200).unsqueeze(1)
    mean, var = la(grid, pred_type="glm")
    mean, std = mean.squeeze().detach(), (var.squeeze() + la.sigma_noise**2).sqrt().detach()
    ax.scatter(x.squeeze(), y.squeeze(), s=8, c="k", label="data")
    ax.plot(grid.squeeze(), mean, label="predictive mean")
    ax.fill_between(grid.squeeze(), mean - 2 * std, mean + 2 * std, alpha=0.3, label="±2 std (GLM)")
    ax.set_title("regression: full GGN Laplace")
    ax.legend(loc="lower left", fontsize=7)
    g = grid.squeeze()
    inside = ((g > -4) & (g < -2)) | ((g > 1) & (g < 3))
    far = g.abs() > 5
    return float(std[far].mean() / std[inside].mean())


def moons(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n) * math.pi
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.cat([upper, lower]) + 0.1 * torch.randn(2 * n, 2)
    return x, torch.cat([torch.zeros(n), torch.ones(n)]).long()


def classification(ax: plt.Axes, quick: bool) -> float:
    torch.manual_seed(1)
    x, y = moons(100)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    w = 16 if quick else 32
    model = nn.Sequential(nn.Linear(2, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 2))
    train(model, loader, nn.CrossEntropyLoss(), 100 if quick else 400)

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=FunchessGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=50))
    la.optimize_prior_precision(method="marglik")

    g = torch.linspace(-3, 4, 60 if quick else 120)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    probs = la(grid, pred_type="glm", link_approx="probit").detach()
    confidence = probs.max(1).values.reshape(gx.shape)
    im = ax.contourf(gx, gy, confidence, levels=20, cmap="viridis")
    ax.scatter(x[:, 0], x[:, 1], c=y, s=6, cmap="coolwarm", edgecolors="k", linewidths=0.2)
    ax.set_title("classification: K-FAC Laplace, confidence")
    plt.colorbar(im, ax=ax)
    plain = model(grid).softmax(1).max(1).values.detach()
    return float(plain.mean() - confidence.mean())  # how much Laplace lowers the confidence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller networks, fewer epochs, a coarser grid")
    ap.add_argument("--out", default="laplace.png", help="where to write the picture")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models: more threads only contend
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    widen = regression(left, args.quick)
    drop = classification(right, args.quick)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"regression: the predictive std far from the data (|x| > 5) is {widen:.1f}x the std on the data")
    print(f"classification: Laplace lowers the mean confidence over the grid by {drop:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
