"""Per-sample Hessians, and what they are good for: how curvature varies across a batch.

`funchess.per_sample_hessian(f)(params, x, y)` gives every sample's Hessian `H_i` (the Hessian
of `f` on the batch of one `x[i:i+1], y[i:i+1]`) as blocks with a leading sample dimension, views
of one `(B, N, N)` Tensor, with the samples as a `vmap` dimension (no Python loop). With a
mean-reduced loss the batch Hessian is their mean, which this script checks, and then uses them:

- per-sample curvature statistics: the trace and the largest eigenvalue of every `H_i`, and how
  they relate to the model's confidence (samples near the decision boundary are the curved ones);
- how many samples a mini-batch Hessian needs: the error of the mean of `k` random `H_i` against
  the full batch, for growing `k`;
- per-sample Hessian-vector products without forming any `H_i` (`funchess.per_sample_hvp`).

Run: python examples/per_sample_hessians.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import funchess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, a smaller model")
    parser.add_argument("--samples", type=int, default=None, help="batch size (default 256, 64 with --quick)")
    args = parser.parse_args()
    B = args.samples or (64 if args.quick else 256)
    width = 8 if args.quick else 16

    torch.manual_seed(0)
    # BatchNorm/dropout would need model.eval(): per-sample results are refused when the samples
    # are coupled through batch statistics (see the docs' "Randomness and batch norm").
    model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).double()
    x = torch.randn(B, 10, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # a rule the model can partly learn
    f, params = funchess.functional(model, F.cross_entropy)

    # A few steps of gradient descent, so that confidence varies across samples. (By hand:
    # torch.optim's first use imports torch's compiler, seconds of set-up for this tiny job.)
    for _ in range(60):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
    f, params = funchess.functional(model, F.cross_entropy)  # the trained point (shares its memory)

    H = funchess.per_sample_hessian(f)(params, x, y)  # H[a][b].shape == (B, *a.shape, *b.shape)
    M = funchess.to_matrix(H, batch_dims=1)  # (B, N, N), no copy
    N = M.shape[-1]
    print(f"{B} per-sample Hessians of {N} parameters: {tuple(M.shape)}, {M.numel() * M.element_size() / 2**20:.1f} MiB")
    print(f"H['2.weight']['2.bias'].shape = {tuple(H['2.weight']['2.bias'].shape)}")

    batch = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    gap = float((M.mean(0) - batch).abs().max())
    assert gap < 1e-10, gap
    print(f"mean of the per-sample Hessians == the batch Hessian (max |difference| {gap:.1e})")

    # 1. Curvature per sample, against the model's confidence in the sample's label.
    traces = M.diagonal(dim1=-2, dim2=-1).sum(-1)
    top = torch.linalg.eigvalsh(M)[:, -1]
    with torch.no_grad():
        confidence = F.softmax(model(x), dim=-1).gather(1, y[:, None]).squeeze(1)
    corr = torch.corrcoef(torch.stack([traces, confidence]))[0, 1]
    print(f"per-sample trace: median {traces.median():.3f}, max {traces.max():.3f} (sample {int(traces.argmax())})")
    print(f"per-sample top eigenvalue: median {top.median():.3f}, max {top.max():.3f}")
    print(f"correlation of the trace with the confidence in the label: {corr:+.2f}")
    for name, chosen in (("unsure (< 0.6)", confidence < 0.6), ("confident (> 0.95)", confidence > 0.95)):
        if chosen.any():
            print(f"  {int(chosen.sum()):3d} {name:18s} samples: mean trace {traces[chosen].mean():.3f}")

    # 2. How many samples a mini-batch Hessian needs.
    gen = torch.Generator().manual_seed(0)
    print("relative error of the mean of k random per-sample Hessians:")
    for k in (1, 4, 16, B // 2):
        errors = [
            float((M[torch.randperm(B, generator=gen)[:k]].mean(0) - batch).norm() / batch.norm()) for _ in range(20)
        ]
        print(f"  k = {k:3d}: {sum(errors) / len(errors):.2f}")

    # 3. Per-sample Hessian-vector products, no Hessian formed (what scales to large models).
    v = {k: torch.randn(p.shape, dtype=p.dtype, generator=gen) for k, p in params.items()}
    Hv = funchess.per_sample_hvp(f)(params, v, x, y)  # leaves (B, *p.shape)
    flat = torch.cat([Hv[k].reshape(B, -1) for k in params], dim=1)
    expected = M @ funchess.ravel(v)
    assert torch.allclose(flat, expected, atol=1e-10), float((flat - expected).abs().max())
    print(f"per_sample_hvp == H_i @ v for every sample: {tuple(flat.shape)}")
    print("ok")


if __name__ == "__main__":
    main()
