"""Which training points made this prediction? Influence functions by Hessian-inverse-vector
products (Koh and Liang, 2017), checked against actually retraining without each point.

Removing training point `i` from an objective `R(θ) = (1/n) Σ_j loss_j(θ) + (wd/2) |θ|²` moves
its minimiser by about `(1/n) H⁻¹ g_i` (`H` the Hessian of `R`, `g_i` the gradient of `loss_i`),
so the test loss changes by about

    influence(i) = (1/n) g_testᵀ H⁻¹ g_i.

One solve `s = H⁻¹ g_test` per test point (conjugate gradients, matrix-free: `funchess.cg` on a
`funchess.HessianOperator`) and one matrix of per-sample gradients (`funchess.per_sample_grad`)
give the influence of every training point. The weight decay is the damping: the Hessian of `R`
is the data loss's Hessian plus `wd * I`, which is exactly `funchess.cg(H, g, damping=wd)`; for a
neural network, whose Hessian is indefinite, choose the damping above minus its smallest
eigenvalue (`funchess.eigsh(H, k=1, which="SA")`).

The model is multinomial logistic regression, whose `R` is convex, so "retrain without point
`i`" has one answer: a few Newton steps from the optimum (`funchess.hessian` of `R`).

Run: python examples/influence_functions.py [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import funchess

Params = dict[str, torch.Tensor]
Objective = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


def objective(g: Callable[..., torch.Tensor], weights: torch.Tensor, wd: float) -> Objective:
    """`R_w(params, x, y) = (1/n) Σ_i w_i loss_i + (wd/2) |params|²` for model-output function g."""

    def R(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(g(params, x), y, reduction="none")
        decay = sum((p**2).sum() for p in params.values())
        return (weights * losses).sum() / len(y) + 0.5 * wd * decay

    return R


def newton(R: Objective, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int = 20) -> Params:
    """Minimise a convex R by Newton's method with the exact Hessian (N is small here), halving
    a step until it decreases R."""
    for _ in range(steps):
        grad = funchess.ravel(torch.func.grad(R)(params, x, y))
        if grad.norm() < 1e-12:
            break
        step = torch.linalg.solve(funchess.to_matrix(funchess.hessian(R)(params, x, y)), grad)
        value, t = R(params, x, y), 1.0
        while True:
            trial = funchess.unravel(funchess.ravel(params) - t * step, params)
            if R(trial, x, y) <= value or t < 1e-8:
                break
            t /= 2
        params = trial
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, fewer retrainings")
    args = parser.parse_args()
    n, checked, wd = (120, 8, 1e-2) if args.quick else (600, 24, 1e-2)

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centres = 1.5 * torch.randn(3, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (n + 5,), generator=gen)
    inputs = centres[labels] + torch.randn(n + 5, 10, generator=gen, dtype=torch.float64)
    x, y, x_test, y_test = inputs[:n], labels[:n], inputs[n:], labels[n:]

    model = torch.nn.Linear(10, 3).double()
    g, params = funchess.functional(model)  # the model output as a function g(params, x)
    R = objective(g, torch.ones(n, dtype=torch.float64), wd)
    params = newton(R, params, x, y)
    print(f"trained: {sum(p.numel() for p in params.values())} parameters, {n} training points, "
          f"training objective {float(R(params, x, y)):.4f}")

    # The data loss's Hessian as an operator; its damped inverse by CG, for 5 test points at once.
    loss = funchess.functional(model, F.cross_entropy)[0]
    H = funchess.HessianOperator(loss, params, x, y)
    g_test = torch.stack([
        funchess.ravel(torch.func.grad(loss)(params, x_test[j : j + 1], y_test[j : j + 1])) for j in range(len(y_test))
    ], dim=1)  # (N, 5): one right-hand side per test point
    solve = funchess.cg(H, g_test, damping=wd, rtol=1e-10)
    print(f"CG: {solve.num_iter} iterations, {solve.num_hvps} Hessian-vector products, converged {solve.converged}")
    assert solve.converged

    per_sample = funchess.per_sample_grad(loss)(params, x, y)  # leaves (n, *p.shape)
    G = torch.cat([per_sample[k].reshape(n, -1) for k in params], dim=1)  # (n, N)
    influence = G @ solve.solution / n  # (n, 5): predicted change of each test loss without point i
    for j in range(len(y_test)):
        order = influence[:, j].argsort()
        print(f"test point {j} (label {int(y_test[j])}): most helpful training points {order[-3:].flip(0).tolist()}, "
              f"most harmful {order[:3].tolist()}")

    # Check on test point 0: retrain without each of the most influential points, compare.

    def test_loss(p: Params) -> float:
        return float(loss(p, x_test[:1], y_test[:1]))

    base = test_loss(params)
    chosen = influence[:, 0].abs().argsort(descending=True)[:checked].tolist()
    predicted, actual = [], []
    for i in chosen:
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0.0  # point i removed (the 1/n normalisation kept, as in the formula)
        retrained = newton(objective(g, weights, wd), params, x, y)
        predicted.append(float(influence[i, 0]))
        actual.append(test_loss(retrained) - base)
    corr = float(torch.corrcoef(torch.tensor([predicted, actual]))[0, 1])
    print(f"removing the {checked} most influential points, one at a time: predicted vs retrained change "
          f"of the test loss, correlation {corr:.4f}")
    for i, p, a in list(zip(chosen, predicted, actual))[:3]:
        print(f"  point {i:3d}: predicted {p:+.2e}, retrained {a:+.2e}")
    assert corr > 0.9, corr
    print("ok")


if __name__ == "__main__":
    main()
