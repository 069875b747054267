"""`python -m funchess demo`: train a built-in model on synthetic data, take its full Hessian, and
summarise it in text and pictures.

The steps are plain functions (`train`, `hessian_spectrum`, `block_table`, `plot_hessian`,
`plot_spectrum`) so the tests and later tools can reuse them; `run` strings them together.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._curvature_operators import HessianOperator
from ._eigen import EigenResult, SpectralDensity, eigsh, spectral_density
from ._estimators import TraceEstimate, trace_estimate
from ._hessian import hessian, plan_hessian
from ._measure import PeakMemory, Stopwatch, fmt_bytes, fmt_seconds
from ._models import DEMOS, Problem
from ._tree import offsets, to_matrix

#: Eigenvalues with |λ| below this fraction of max |λ| count as numerically zero (summary and picture).
NEAR_ZERO = 1e-7

__all__ = [
    "DemoOptions", "run", "train", "hessian_spectrum", "Spectrum", "matrix_free", "MatrixFree", "block_table",
    "plot_hessian", "plot_spectrum",
]


@dataclass
class DemoOptions:
    """The demo's command-line options (see `python -m funchess demo --help`)."""

    model: str = "mlp"
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    seed: int = 0
    steps: int = 400
    out: Path = Path("funchess-demo")
    progress: bool = True


# ----------------------------------------------------------------------------- training


def train(problem: Problem, steps: int, *, lr: float = 0.02, progress: bool = True) -> list[float]:
    """Full-batch Adam on the problem's data for `steps` steps (deterministic for a given seed).

    Returns the loss before each step and after the last one. The model is trained in place; this is
    the one place the demo changes a model (funchess itself never does).
    """
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(problem.model.parameters(), lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"training {problem.name}", unit="step", disable=not progress, leave=True)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    with torch.no_grad():
        losses.append(problem.loss_fn(problem.model(problem.inputs), problem.targets).item())
    problem.model.zero_grad(set_to_none=True)
    return losses


def accuracy(problem: Problem) -> float | None:
    """Training accuracy for classification problems, else None."""
    if problem.targets.is_floating_point():
        return None
    with torch.no_grad():
        return float((problem.model(problem.inputs).argmax(1) == problem.targets).double().mean())


# ----------------------------------------------------------------------------- spectrum


@dataclass
class Spectrum:
    """Eigenvalues of the Hessian and how they were obtained.

    Attributes:
        eigenvalues: all eigenvalues, ascending, float64 on the CPU.
        method: what computed them (shown in the summary and the plot).
    """

    eigenvalues: Tensor
    method: str

    @property
    def largest(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def smallest(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def condition(self) -> float:
        """`max |λ| / min |λ|` (infinite when an eigenvalue is exactly zero)."""
        mags = self.eigenvalues.abs()
        low = float(mags.min())
        return math.inf if low == 0 else float(mags.max()) / low


def hessian_spectrum(matrix: Tensor) -> Spectrum:
    """All eigenvalues of the dense Hessian with `torch.linalg.eigvalsh` (in float64).

    This is the demo's one source of eigenvalues: when funchess's matrix-free spectral tools
    (Lanczos extremes, stochastic Lanczos quadrature) land, switch the demo to them here, for
    models whose dense Hessian does not fit.
    """
    sym = matrix.detach().to(torch.float64)
    sym = (sym + sym.T) / 2  # exact for funchess Hessians up to rounding; eigvalsh reads one triangle
    return Spectrum(torch.linalg.eigvalsh(sym).cpu(), "dense eigvalsh (torch.linalg.eigvalsh)")


@dataclass
class MatrixFree:
    """Estimates from Hessian-vector products alone: what still works when `N x N` does not fit."""

    top: EigenResult
    trace: TraceEstimate
    density: SpectralDensity


def matrix_free(f: Callable[..., Tensor], params: dict[str, Tensor], x: Tensor, y: Tensor, seed: int) -> MatrixFree:
    """The largest eigenvalue (`funchess.eigsh`, Lanczos), the trace (`funchess.trace_estimate`) and
    the spectral density (`funchess.spectral_density`, stochastic Lanczos quadrature) of the
    Hessian, through `funchess.HessianOperator` (no `N x N` matrix)."""
    op = HessianOperator(f, params, x, y)
    gen = torch.Generator().manual_seed(seed)
    return MatrixFree(
        top=eigsh(op, k=1, which="LA", generator=gen),
        trace=trace_estimate(op, num_hvps=60, generator=gen),
        density=spectral_density(op, num_probes=4, num_steps=30, generator=gen),
    )


# ----------------------------------------------------------------------------- tables


@dataclass
class BlockRow:
    name: str
    shape: tuple[int, ...]
    size: int
    frobenius: float  # ||H[a][a]||_F
    row_frobenius: float  # ||H[a][:]||_F, the block row
    trace: float


def block_table(H: dict[str, dict[str, Tensor]]) -> list[BlockRow]:
    """Per-parameter block statistics of a Hessian pytree (dict params)."""
    rows = []
    for a, row in H.items():
        diag = row[a]
        size = int(math.isqrt(diag.numel()))
        square = diag.reshape(size, size)
        rows.append(
            BlockRow(
                a,
                tuple(diag.shape[: diag.dim() // 2]),
                size,
                float(torch.linalg.matrix_norm(square.double())),
                math.sqrt(sum(float(b.double().pow(2).sum()) for b in row.values())),
                float(square.double().trace()),
            )
        )
    return rows


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------- pictures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hessian(matrix: Tensor, names: Sequence[str], sizes: Sequence[int], path: Path, title: str) -> Path:
    """Heatmap of `log10 |H_ij|` with the parameter blocks outlined and labelled, next to the
    matrix of per-block Frobenius norms."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    M = matrix.detach().double().abs().cpu()
    top = float(M.max()) or 1.0
    floor = top * 1e-8
    off = offsets([torch.Size([s]) for s in sizes])
    n = len(names)
    norms = torch.tensor(
        [[float(M[off[i] : off[i + 1], off[j] : off[j + 1]].norm()) for j in range(n)] for i in range(n)]
    )

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 7.2), gridspec_kw={"width_ratios": [1.25, 1], "wspace": 0.45})
    im = ax.imshow(
        M.clamp_min(floor).numpy(), norm=LogNorm(vmin=floor, vmax=top), cmap="magma", interpolation="nearest"
    )
    N = off[-1]
    for o in off[1:-1]:
        ax.axhline(o - 0.5, color="#3fc1ff", lw=0.8)
        ax.axvline(o - 0.5, color="#3fc1ff", lw=0.8)
    centres = [(off[i] + off[i + 1] - 1) / 2 for i in range(n)]
    ax.set_xticks([])
    ax.set_yticks([])
    _block_labels(ax, names, centres, N)
    ax.set_title(f"|H_ij|, {N} x {N} (log scale)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="|H_ij|")

    shown = norms.clamp_min(float(norms.max()) * 1e-8 or 1e-300)
    im2 = bx.imshow(shown.numpy(), norm=LogNorm(), cmap="magma")
    bx.set_xticks(range(n))
    bx.set_yticks(range(n))
    bx.set_xticklabels(names, rotation=90, fontsize=8)
    bx.set_yticklabels(names, fontsize=8)
    mid = math.sqrt(float(shown.max()) * float(shown.min()))
    for i in range(n if n <= 8 else 0):  # numbers only where they fit
        for j in range(n):
            bx.text(j, i, f"{float(norms[i, j]):.1e}", ha="center", va="center", fontsize=8,
                    color="black" if float(shown[i, j]) > mid else "white")
    bx.set_title("Frobenius norm of each block ||H[a][b]||")
    fig.colorbar(im2, ax=bx, fraction=0.046, pad=0.02)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig: Any, path: Path) -> None:
    """Write a figure cropped to its contents (no `tight_layout`: it lays the text out twice more)."""
    fig.savefig(path, dpi=110, bbox_inches="tight", pil_kwargs={"compress_level": 3})


def _spread(centres: Sequence[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label positions near `centres` (ascending), inside [lo, hi], at least `gap` apart (or as far
    apart as fits): pushed up past their neighbours, then pulled back from the top if they overflow."""
    n = len(centres)
    if n == 0:
        return []
    gap = min(gap, (hi - lo) / max(n - 1, 1))
    pos = [min(max(c, lo), hi) for c in centres]
    for i in range(1, n):
        pos[i] = max(pos[i], pos[i - 1] + gap)
    if pos[-1] > hi:
        pos[-1] = hi
        for i in range(n - 2, -1, -1):
            pos[i] = min(pos[i], pos[i + 1] - gap)
    return pos


def _block_labels(ax: Any, names: Sequence[str], centres: Sequence[float], N: int) -> None:
    """Parameter names beside the left and below the bottom edge of a matrix image, pushed apart
    where blocks are thin and joined to their block by a short leader line."""
    gap = N / 34
    where = _spread(centres, gap, -0.5, N - 0.5)
    style = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "#555555"}, "fontsize": 8,
             "annotation_clip": False}
    for name, c, p in zip(names, centres, where, strict=True):
        ax.annotate(name, xy=(-0.5, c), xycoords="data", xytext=(-0.04, p), textcoords=("axes fraction", "data"),
                    ha="right", va="center", **style)
        ax.annotate(name, xy=(c, N - 0.5), xycoords="data", xytext=(p, -0.04),
                    textcoords=("data", "axes fraction"), ha="center", va="top", rotation=90, **style)


def _symlog_ticks(lo: float, hi: float, lin: float) -> list[float]:
    """At most ~12 decade ticks over [lo, hi] on a symlog axis (every k-th decade)."""
    top = math.floor(math.log10(max(hi, -lo, lin)))
    bottom = math.ceil(math.log10(lin))
    decades = list(range(bottom, top + 1))
    pos = [d for d in decades if 10.0**d <= hi]
    neg = [d for d in decades if lo <= -(10.0**d)]
    step = max(1, math.ceil((len(pos) + len(neg)) / 9))
    keep = [d for d in decades if (top - d) % step == 0]
    return [-(10.0**d) for d in reversed(keep) if d in neg] + [0.0] + [10.0**d for d in keep if d in pos]


def plot_spectrum(spectrum: Spectrum, path: Path, title: str, slq: SpectralDensity | None = None) -> Path:
    """Sorted eigenvalues and a histogram of their density, both on a symmetric log scale, and
    (with `slq`) the matrix-free SLQ density against the exact eigenvalues on a linear axis.

    Eigenvalues with `|λ| < NEAR_ZERO max |λ|` (numerically zero; the printed summary counts the
    same band) are drawn grey and share one bin."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.patches import Patch

    ev = spectrum.eigenvalues.numpy()
    top = float(np.abs(ev).max()) or 1.0
    lin = top * NEAR_ZERO
    red, blue, grey = "#d62728", "#1f77b4", "#9a9a9a"

    def colour(v: float) -> str:
        return grey if abs(v) < lin else (red if v < 0 else blue)

    fig, axes = plt.subplots(1, 3 if slq is not None else 2, figsize=(20 if slq is not None else 14, 5.2),
                             gridspec_kw={"wspace": 0.25})
    ax, bx = axes[0], axes[1]
    idx = np.arange(1, ev.size + 1)
    ax.scatter(idx, ev, s=6, c=[colour(v) for v in ev], lw=0)
    ax.set_yscale("symlog", linthresh=lin)
    ax.set_yticks(_symlog_ticks(float(ev[0]), float(ev[-1]), lin))
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("index (ascending)")
    ax.set_ylabel("eigenvalue λ (symlog)")
    ax.set_title(f"{ev.size} eigenvalues: λmin = {ev[0]:.3g}, λmax = {ev[-1]:.3g}")
    ax.grid(alpha=0.3)

    pos = np.geomspace(lin, top * 1.001, 29)
    low = float(-ev[0])
    neg = -pos[::-1][pos[::-1] <= low * 1.5] if low > lin else np.array([])
    edges = np.concatenate([neg, [-lin, lin], pos[1:]])
    counts, edges = np.histogram(ev, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    bx.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=[colour(c) for c in centres],
           edgecolor="white", lw=0.4)
    bx.set_xscale("symlog", linthresh=lin)
    bx.set_yscale("log")
    bx.set_xticks(_symlog_ticks(float(edges[0]), float(edges[-1]), lin))
    bx.tick_params(axis="x", labelsize=8)
    bx.set_xlabel("eigenvalue λ (symlog)")
    bx.set_ylabel("count")
    n_neg, n_zero = int((ev <= -lin).sum()), int((np.abs(ev) < lin).sum())
    bx.legend(
        handles=[Patch(color=red, label=f"negative ({n_neg})"), Patch(color=grey, label=f"|λ| < {lin:.1e} ({n_zero})"),
                 Patch(color=blue, label=f"positive ({ev.size - n_neg - n_zero})")],
        loc="upper left", fontsize=8, framealpha=0.9,
    )
    bx.set_title(f"spectral density ({spectrum.method.split(' (')[0]})")
    bx.grid(alpha=0.3, which="both")
    if slq is not None:
        cx = axes[2]
        grid, dens = slq.grid.double().cpu().numpy(), slq.density.double().cpu().numpy()
        edges = np.linspace(min(float(ev[0]), float(grid[0])), max(float(ev[-1]), float(grid[-1])), 60)
        heights, _, _ = cx.hist(ev, bins=edges, density=True, color=blue, alpha=0.45,
                                label=f"exact: {ev.size} eigenvalues")
        cx.plot(grid, dens, color="black", lw=1.4,
                label=f"SLQ: funchess.spectral_density, {slq.num_hvps} HVPs (σ = {slq.sigma:.2g})")
        cx.set_yscale("log")
        floor = max(float(dens.max()) * 1e-5, 1e-12)
        cx.set_ylim(floor, 5 * max(float(dens.max()), float(np.max(heights))))
        cx.set_xlabel("eigenvalue λ (linear)")
        cx.set_ylabel("density")
        cx.set_title("matrix-free estimate vs exact")
        cx.legend(fontsize=8, loc="upper right")
        cx.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the demo


def _warm_up(problem: Problem) -> None:
    """One Hessian of a tiny slice of the problem, so that torch.func's one-time setup (about a
    second, and some memory) is not counted as the Hessian's time and memory."""
    small = problem.sample(0)
    f, params = small.function()
    hessian(f)(params, small.inputs, small.targets)


def _peak_note(mem: PeakMemory) -> str:
    return f"{fmt_bytes(mem.peak)} peak above the start ({mem.what})"


def run(opts: DemoOptions, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; print the summary, write the pictures, return the summary as a dict."""
    t_start = time.perf_counter()
    clock = Stopwatch()
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed)
    problem = DEMOS[opts.model](opts.seed).to(dtype=opts.dtype, device=device)
    dtype_name = str(opts.dtype).replace("torch.", "")
    print_fn(
        f"funchess demo: {problem.description}\n"
        f"  {problem.num_params:,} parameters, {dtype_name}, {device}, seed {opts.seed}, "
        f"synthetic data generated in code\n"
    )
    losses = clock.time("training", lambda: train(problem, opts.steps, progress=opts.progress), device)
    acc = accuracy(problem)

    f, params = problem.function()
    x, y = problem.inputs, problem.targets
    _warm_up(problem)
    plan = plan_hessian(f)(params, x, y)
    with PeakMemory(device) as mem:
        H = clock.time("Hessian (funchess.hessian)", lambda: hessian(f)(params, x, y), device)
    M = to_matrix(H)
    grad = torch.func.grad(f)(params, x, y)
    grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad.values()))
    spectrum = clock.time("eigenvalues (dense eigvalsh)", lambda: hessian_spectrum(M), device)
    free = clock.time("matrix-free estimates", lambda: matrix_free(f, params, x, y, opts.seed), device)
    trace = float(M.double().trace())
    blocks = block_table(H)
    symmetry = float((M - M.T).abs().max() / M.abs().max())

    N = problem.num_params
    planned = N * N * M.element_size()
    names = [b.name for b in blocks]
    title = f"funchess demo: Hessian of the training loss, {problem.description} ({N} parameters)"
    opts.out.mkdir(parents=True, exist_ok=True)
    heat = clock.time(
        "pictures", lambda: plot_hessian(M, names, [b.size for b in blocks], opts.out / "hessian.png", title), device
    )
    spec = clock.time("pictures", lambda: plot_spectrum(spectrum, opts.out / "spectrum.png", title, free.density), device)

    first = f"{losses[0]:.4g}"
    print_fn(f"\ntrained {opts.steps} full-batch Adam steps: loss {first} -> {losses[-1]:.6g}"
             + (f", accuracy {100 * acc:.1f}%" if acc is not None else ""))
    print_fn("\nparameter blocks (rows of the Hessian, in named_parameters() order)")
    print_fn(_table(
        ["block", "shape", "size", "||H[a][a]||_F", "||H[a][:]||_F", "trace H[a][a]"],
        [[b.name, "x".join(map(str, b.shape)), f"{b.size:,}", f"{b.frobenius:.4e}", f"{b.row_frobenius:.4e}",
          f"{b.trace:.4e}"] for b in blocks]
        + [["total", "", f"{N:,}", "", f"{float(M.double().norm()):.4e}", f"{trace:.4e}"]],
        [False, False, True, True, True, True],
    ))
    tol = NEAR_ZERO * float(spectrum.eigenvalues.abs().max())  # the picture's grey band too
    neg = int((spectrum.eigenvalues <= -tol).sum())
    near_zero = int((spectrum.eigenvalues.abs() < tol).sum())
    print_fn("\nHessian of the training loss")
    summary_rows = [
        ("loss", f"{losses[-1]:.8g}"),
        ("gradient norm", f"{grad_norm:.8g}"),
        ("trace", f"{trace:.8g}"),
        ("largest eigenvalue", f"{spectrum.largest:.8g}"),
        ("smallest eigenvalue", f"{spectrum.smallest:.8g}"),
        ("condition number", f"{spectrum.condition:.4g}   (max |λ| / min |λ|)"),
        ("near-zero eigenvalues", f"{near_zero} with |λ| < {NEAR_ZERO:.0e} max |λ|"),
        ("negative eigenvalues", f"{neg} of {N} (below the near-zero band)"),
        ("symmetry", f"max |H - Hᵀ| / max |H| = {symmetry:.1e}"),
        ("eigenvalues from", spectrum.method),
    ]
    width = max(len(k) for k, _ in summary_rows)
    for k, v in summary_rows:
        print_fn(f"  {k.ljust(width)}  {v}")
    print_fn("\nmatrix-free estimates (funchess.HessianOperator: Hessian-vector products, no N x N matrix)")
    free_rows = [
        ("largest eigenvalue", f"{float(free.top.eigenvalues[-1]):.8g}",
         f"funchess.eigsh (Lanczos), {free.top.num_hvps} HVPs"),
        ("trace", f"{float(free.trace.value):.6g} ± {float(free.trace.std_error):.2g}",
         f"funchess.trace_estimate, {free.trace.num_hvps} HVPs"),
        ("spectral density", "in spectrum.png",
         f"funchess.spectral_density (SLQ), {free.density.num_hvps} HVPs"),
    ]
    for k, v, how in free_rows:
        print_fn(f"  {k.ljust(width)}  {v.ljust(16)}  {how}")
    print_fn("\ntime and memory")
    for k, v in clock.phases.items():
        print_fn(f"  {k.ljust(28)}  {fmt_seconds(v)}")
    total = time.perf_counter() - t_start
    print_fn(f"  {'total'.ljust(28)}  {fmt_seconds(total)}")
    print_fn(f"  {'planned (plan_hessian)'.ljust(28)}  {fmt_bytes(plan.peak_bytes)} peak = "
             f"{fmt_bytes(plan.output_bytes)} Hessian ({N:,}² x {M.element_size()} bytes) + "
             f"{fmt_bytes(plan.graph_bytes)} graph + {plan.chunk_size} rows x {fmt_bytes(plan.row_bytes)}")
    print_fn(f"  {'measured during hessian'.ljust(28)}  {_peak_note(mem)}")

    summary: dict[str, Any] = {
        "model": opts.model,
        "description": problem.description,
        "parameters": N,
        "dtype": dtype_name,
        "device": str(device),
        "seed": opts.seed,
        "steps": opts.steps,
        "loss": losses[-1],
        "accuracy": acc,
        "gradient_norm": grad_norm,
        "trace": trace,
        "largest_eigenvalue": spectrum.largest,
        "smallest_eigenvalue": spectrum.smallest,
        "condition_number": spectrum.condition,
        "negative_eigenvalues": neg,
        "near_zero_eigenvalues": near_zero,
        "eigenvalue_method": spectrum.method,
        "blocks": [vars(b) for b in blocks],
        "seconds": clock.phases | {"total": total},
        "hessian_bytes": planned,
        "planned_peak_bytes": plan.peak_bytes,
        "peak_memory_bytes": mem.peak,
        "eigsh_largest_eigenvalue": float(free.top.eigenvalues[-1]),
        "hutchpp_trace": float(free.trace.value),
        "hutchpp_trace_std_error": float(free.trace.std_error),
        "peak_memory_kind": mem.what,
    }
    files = {"hessian": heat, "spectrum": spec}
    files["summary"] = opts.out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files["model"] = opts.out / "model.pt"
    torch.save({"model": opts.model, "seed": opts.seed, "state_dict": problem.model.state_dict(),
                "inputs": x, "targets": y}, files["model"])
    print_fn("\nwrote")
    for k, p in files.items():
        print_fn(f"  {str(p):40s}  {_describe(k)}")
    summary["files"] = {k: str(p) for k, p in files.items()}
    return summary


def _describe(kind: str) -> str:
    return {
        "hessian": "heatmap of log |H| with the parameter blocks, and the block norms",
        "spectrum": "eigenvalues and their density",
        "summary": "the numbers above, as JSON",
        "model": "trained weights and data (torch.load) to reproduce the Hessian",
    }[kind]
