"""Exact Hessian and GGN diagonals, per batch and per sample: funchess against BackPACK and
curvlinops, as ratios from one run.

    python benchmarks/bench_diagonal.py [--repeat 9] [--threads 1] [--problems mlp,cnn] [--quick]

Problems (the command-line benchmark's `mlp-8k` and `cnn-2k`, defined here again): an MLP
50-64-64-10 with tanh (N = 8,074, batch 128, cross-entropy) and a conv net 3x12x12 -> conv6 ->
conv8 -> 10 with tanh and average pooling (N = 1,898, batch 64, cross-entropy).

Quantities and methods:

- Hessian diagonal: `funchess.hessian_diagonal` (the module-aware sweep on these models),
  the generic block engine (the same call on a plain function, so no module route applies),
  BackPACK `DiagHessian`, curvlinops `HessianLinearOperator @ I` (its diagonal; curvlinops has no
  exact diagonal, only estimators);
- GGN diagonal: `funchess.ggn_diagonal`, BackPACK `DiagGGNExact`, curvlinops `GGNLinearOperator @ I`;
- per-sample Hessian diagonals: `funchess.per_sample_hessian_diagonal`, BackPACK `BatchDiagHessian`;
- per-sample GGN diagonals: `funchess.per_sample_ggn_diagonal`, BackPACK `BatchDiagGGNExact`
  (curvlinops has no per-sample quantities).

Times: the methods of one quantity run interleaved, `--repeat` rounds after one warm-up call each;
the table shows the median process CPU time (steadier than wall-clock on a shared machine; one
torch thread by default) and the median wall-clock time, and the ratio of CPU times to BackPACK's.
Correctness: every method is run once more in float64 and compared with the oracle
(`funchess.testing.reference_hessian` / `reference_ggn` diagonals; per-sample quantities on the
first `--check-samples` samples against the oracle of each sample's loss): the largest
difference over the largest entry.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import funchess  # noqa: E402
from funchess.testing import reference_ggn, reference_hessian  # noqa: E402

Problem = tuple[str, nn.Module, Tensor, Tensor]


def _init(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def mlp_problem() -> Problem:
    """MLP 50-64-64-10, tanh, cross-entropy, batch 128 (the bench's `mlp-8k`)."""
    widths = (50, 64, 64, 10)

    def module() -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            layers["out" if last else f"fc{i + 1}"] = nn.Linear(a, b)
            if not last:
                layers[f"act{i + 1}"] = nn.Tanh()
        return nn.Sequential(layers)

    model, teacher = _init(module(), 0), _init(module(), 1000)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, widths[0], generator=gen)
    with torch.no_grad():
        y = torch.multinomial((2.0 * teacher(x)).softmax(1), 1, generator=gen).squeeze(1)
    return "MLP 50-64-64-10, tanh, cross-entropy, batch 128", model, x, y


def cnn_problem() -> Problem:
    """Conv net 3x12x12 -> conv6 -> conv8 -> 10, tanh, cross-entropy, batch 64 (`cnn-2k`)."""
    model = _init(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3)), ("act1", nn.Tanh()), ("conv2", nn.Conv2d(6, 8, 3)),
        ("act2", nn.Tanh()), ("pool", nn.AvgPool2d(2)), ("flatten", nn.Flatten()),
        ("out", nn.Linear(8 * 4 * 4, 10)),
    ])), 0)
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (64,), generator=gen)
    angle = y.double() * math.pi / 10
    grid = torch.arange(12, dtype=torch.float64) - 5.5
    u = grid.view(1, 1, -1) * angle.cos().view(-1, 1, 1) + grid.view(1, -1, 1) * angle.sin().view(-1, 1, 1)
    img = torch.sin(2 * math.pi * u / 4.0 + 2 * math.pi * torch.rand(64, generator=gen, dtype=torch.float64).view(-1, 1, 1))
    x = (img.unsqueeze(1).expand(64, 3, 12, 12) + 0.5 * torch.randn(64, 3, 12, 12, generator=gen, dtype=torch.float64)).float()
    return "CNN 3x12x12 -> conv6 -> conv8 -> 10, tanh, cross-entropy, batch 64", model, x, y


# ----------------------------------------------------------------------------- methods


def _backpack(model: nn.Module, x: Tensor, y: Tensor, extension: str) -> Callable[[], Tensor]:
    from backpack import backpack, extend, extensions

    net = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss())
    field = {"DiagHessian": "diag_h", "DiagGGNExact": "diag_ggn_exact",
             "BatchDiagHessian": "diag_h_batch", "BatchDiagGGNExact": "diag_ggn_exact_batch"}[extension]
    leaves = list(net.parameters())
    batched = extension.startswith("Batch")

    def run() -> Tensor:
        value = loss(net(x), y)
        with backpack(getattr(extensions, extension)()):
            value.backward()
        out = torch.cat([getattr(p, field).reshape(x.shape[0] if batched else 1, -1) for p in leaves], 1)
        for p in leaves:
            p.grad = None
        # BackPACK's per-sample terms are those of the mean-reduced batch loss: 1/B of each
        # sample's own loss (a batch of one), which funchess and the oracle give
        return out * x.shape[0] if batched else out[0]

    return run


def _curvlinops(model: nn.Module, x: Tensor, y: Tensor, kind: str) -> Callable[[], Tensor]:
    import curvlinops

    params = list(model.parameters())
    cls = curvlinops.HessianLinearOperator if kind == "hessian" else curvlinops.GGNLinearOperator
    op = cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    n = sum(p.numel() for p in params)

    def run() -> Tensor:
        eye = torch.eye(n, dtype=x.dtype)
        out = torch.empty(n, dtype=x.dtype)
        for s in range(0, n, 256):  # columns in chunks; keep their diagonal entries
            out[s : s + 256] = torch.diagonal(op @ eye[:, s : s + 256], offset=-s)[: min(256, n - s)]
        return out

    return run


def _flat(tree: Any, batched: bool = False) -> Tensor:
    leaves = list(tree.values())
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], 1)
    return torch.cat([t.reshape(-1) for t in leaves])


def methods(model: nn.Module, x: Tensor, y: Tensor, quick: bool) -> dict[str, list[tuple[str, Callable[[], Tensor]]]]:
    f, params = funchess.functional(model, F.cross_entropy)
    plain = lambda p, xx, yy: f(p, xx, yy)  # noqa: E731 (a plain function: no module route)
    hd, gd = funchess.hessian_diagonal(f), funchess.ggn_diagonal(f)
    psh, psg = funchess.per_sample_hessian_diagonal(f), funchess.per_sample_ggn_diagonal(f)
    generic = funchess.hessian_diagonal(plain)
    out: dict[str, list[tuple[str, Callable[[], Tensor]]]] = {
        "Hessian diagonal": [
            ("funchess.hessian_diagonal", lambda: _flat(hd(params, x, y))),
            ("BackPACK DiagHessian", _backpack(model, x, y, "DiagHessian")),
        ],
        "GGN diagonal": [
            ("funchess.ggn_diagonal", lambda: _flat(gd(params, x, y))),
            ("BackPACK DiagGGNExact", _backpack(model, x, y, "DiagGGNExact")),
        ],
        "per-sample Hessian diagonals": [
            ("funchess.per_sample_hessian_diagonal", lambda: _flat(psh(params, x, y), True)),
            ("BackPACK BatchDiagHessian", _backpack(model, x, y, "BatchDiagHessian")),
        ],
        "per-sample GGN diagonals": [
            ("funchess.per_sample_ggn_diagonal", lambda: _flat(psg(params, x, y), True)),
            ("BackPACK BatchDiagGGNExact", _backpack(model, x, y, "BatchDiagGGNExact")),
        ],
    }
    if not quick:
        out["Hessian diagonal"] += [
            ("funchess generic block engine", lambda: _flat(generic(params, x, y))),
            ("curvlinops H @ I, diagonal", _curvlinops(model, x, y, "hessian")),
        ]
        out["GGN diagonal"].append(("curvlinops GGN @ I, diagonal", _curvlinops(model, x, y, "ggn")))
    return out


# ----------------------------------------------------------------------------- the oracle


def oracle(model: nn.Module, x: Tensor, y: Tensor, check: int) -> dict[str, Tensor]:
    """Float64 references: batch diagonals, and per-sample ones for the first `check` samples."""
    f, params = funchess.functional(model, F.cross_entropy)

    def hdiag(xx: Tensor, yy: Tensor) -> Tensor:
        H = reference_hessian(f, params, xx, yy)
        return torch.cat([torch.diagonal(H[k][k].reshape(p.numel(), p.numel())) for k, p in params.items()])

    def gdiag(xx: Tensor, yy: Tensor) -> Tensor:
        G = reference_ggn(f.output, lambda z: F.cross_entropy(z, yy), params, xx)
        return torch.cat([torch.diagonal(G[k][k].reshape(p.numel(), p.numel())) for k, p in params.items()])

    return {
        "Hessian diagonal": hdiag(x, y),
        "GGN diagonal": gdiag(x, y),
        "per-sample Hessian diagonals": torch.stack([hdiag(x[i : i + 1], y[i : i + 1]) for i in range(check)]),
        "per-sample GGN diagonals": torch.stack([gdiag(x[i : i + 1], y[i : i + 1]) for i in range(check)]),
    }


def error(out: Tensor, ref: Tensor) -> float:
    out = out[: ref.shape[0]] if ref.dim() == 2 else out
    return float((out.double() - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------- running


def measure(fns: list[tuple[str, Callable[[], Tensor]]], repeat: int) -> dict[str, tuple[float, float]]:
    cpu: dict[str, list[float]] = {name: [] for name, _ in fns}
    wall: dict[str, list[float]] = {name: [] for name, _ in fns}
    for _, fn in fns:
        fn()
    for _ in range(repeat):
        for name, fn in fns:
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {n: (statistics.median(cpu[n]) * 1e3, statistics.median(wall[n]) * 1e3) for n in cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", default="mlp,cnn")
    parser.add_argument("--check-samples", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the slow methods (generic engine, curvlinops)")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 oracle comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    chosen = {"mlp": mlp_problem, "cnn": cnn_problem}
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeat} interleaved rounds")
    for key in args.problems.split(","):
        title, model, x, y = chosen[key]()
        n = sum(p.numel() for p in model.parameters())
        errors: dict[str, str] = {}
        if not args.no_check:
            m64, x64 = copy.deepcopy(model).double(), x.double() if x.is_floating_point() else x
            refs = oracle(m64, x64, y, args.check_samples)
            in32 = methods(model, x, y, args.quick)
            for quantity, fns in methods(m64, x64, y, args.quick).items():
                for (name, fn), (_, fn32) in zip(fns, in32[quantity]):
                    try:
                        errors[name] = f"{error(fn(), refs[quantity]):.1e}"
                    except RuntimeError as exc:  # e.g. BackPACK's average pooling fails in float64
                        errors[name] = f"{error(fn32(), refs[quantity]):.1e} (float32; float64 failed: {str(exc).splitlines()[0][:60]})"
        print(f"\n## {title}; N = {n:,}, float32\n")
        print("| quantity | method | CPU ms | wall ms | CPU time / BackPACK | rel. error (float64) |")
        print("|---|---|---|---|---|---|")
        for quantity, fns in methods(model, x, y, args.quick).items():
            slow = [(n_, f_) for n_, f_ in fns if n_.startswith(("curvlinops", "funchess generic"))]
            fast = [(n_, f_) for n_, f_ in fns if (n_, f_) not in slow]
            times = measure(fast, args.repeat)
            times.update(measure(slow, 1) if slow else {})
            base = next(t[0] for n_, t in times.items() if n_.startswith("BackPACK"))
            for name, _ in fns:
                c, w = times[name]
                e = errors.get(name, "-")
                print(f"| {quantity} | {name} | {c:.2f} | {w:.2f} | {c / base:.2f} | {e} |")


if __name__ == "__main__":
    main()
