"""`python -m funchess demo`: train a built-in model on synthetic data, take its full Hessian, and
summarise it in text and pictures.

The steps are plain functions (`train`, `hessian_spectrum`, `block_table`, and the pictures of
`funchess.cli.pictures`) so the tests and later tools can reuse them; `run` strings them together.
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

import funchess
from funchess import (
    EigenResult,
    HessianOperator,
    SpectralDensity,
    TraceEstimate,
    hessian,
    plan_hessian,
    to_matrix,
)

from .measure import PeakMemory, Stopwatch, fmt_bytes, fmt_seconds
from .models import DEMOS, Problem
from .pictures import plot_hessian, plot_spectrum
from .progress import Bar

#: Eigenvalues with |λ| below this fraction of max |λ| count as numerically zero (summary and picture;
#: more in float32, see `hessian_spectrum`).
NEAR_ZERO = 1e-7

__all__ = [
    "DemoOptions", "run", "train", "hessian_spectrum", "Spectrum", "matrix_free", "MatrixFree", "block_table",
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
    format: str = "png"  # of the pictures: png, pdf or svg
    progress: bool = True


# ----------------------------------------------------------------------------- training


def train(problem: Problem, steps: int, *, lr: float = 0.02, progress: bool = True) -> list[float]:
    """Full-batch Adam on the problem's data for `steps` steps (deterministic for a given seed).

    Returns the loss before each step and after the last one. The model is trained in place; this is
    the one place the demo changes a model (funchess itself never does).
    """
    opt = torch.optim.Adam(problem.model.parameters(), lr=lr)
    losses: list[float] = []
    with Bar(range(steps), desc=f"training {problem.name}", unit="step", enabled=progress) as bar:
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.note(f"loss {losses[-1]:.4f}")
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
        relative_tolerance: |λ| below this fraction of the largest |λ| is numerically zero.
    """

    eigenvalues: Tensor
    method: str
    relative_tolerance: float = NEAR_ZERO

    @property
    def largest(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def smallest(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def tolerance(self) -> float:
        """|λ| below this is numerically zero: `relative_tolerance` times the largest |λ|."""
        return self.relative_tolerance * float(self.eigenvalues.abs().max())

    @property
    def near_zero(self) -> int:
        """How many eigenvalues are numerically zero."""
        return int((self.eigenvalues.abs() < self.tolerance).sum())

    @property
    def nonzero_ratio(self) -> float:
        """The ratio of the extreme nonzero |eigenvalues|: `max |λ| / min |λ|` over `|λ| >= tolerance`.

        This equals the condition number when no eigenvalue is numerically zero; with some, the
        condition number is infinite (or, in floating point, a meaningless 1e16-1e20) and this is
        the spread of the rest. NaN when every eigenvalue is zero.
        """
        mags = self.eigenvalues.abs()
        kept = mags[mags >= self.tolerance]
        return float(kept.max() / kept.min()) if kept.numel() and float(kept.min()) > 0 else math.nan

    @property
    def condition(self) -> float | None:
        """`max |λ| / min |λ|` when no eigenvalue is numerically zero, else None (not meaningful)."""
        return None if self.near_zero else self.nonzero_ratio


def hessian_spectrum(matrix: Tensor) -> Spectrum:
    """All eigenvalues of the dense Hessian with `torch.linalg.eigvalsh` (in float64).

    This is the demo's one source of eigenvalues: when funchess's matrix-free spectral tools
    (Lanczos extremes, stochastic Lanczos quadrature) land, switch the demo to them here, for
    models whose dense Hessian does not fit.
    """
    sym = matrix.detach().to(torch.float64)
    sym = (sym + sym.T) / 2  # exact for funchess Hessians up to rounding; eigvalsh reads one triangle
    # entries rounded at eps move eigenvalues by about sqrt(N) eps max |λ| (a random-error bound,
    # far below the worst-case N eps of numerical rank): in float32 that is well above NEAR_ZERO
    resolution = max(NEAR_ZERO, math.sqrt(matrix.shape[0]) * torch.finfo(matrix.dtype).eps)
    return Spectrum(torch.linalg.eigvalsh(sym).cpu(), "dense eigvalsh (torch.linalg.eigvalsh)", resolution)


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
        top=funchess.eigsh(op, k=1, which="LA", generator=gen),
        trace=funchess.trace_estimate(op, num_hvps=60, generator=gen),
        density=funchess.spectral_density(op, num_probes=4, num_steps=30, generator=gen),
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
    title = f"Hessian of the training loss: {problem.description}, N = {N:,}"
    opts.out.mkdir(parents=True, exist_ok=True)
    shapes = [b.shape for b in blocks]
    heat = clock.time(
        "pictures", lambda: plot_hessian(M, names, shapes, opts.out / f"hessian.{opts.format}", title), device
    )
    spec = clock.time("pictures", lambda: plot_spectrum(
        spectrum.eigenvalues, spectrum.tolerance, opts.out / f"spectrum.{opts.format}", title, spectrum.method,
        free.density), device)

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
    tol = spectrum.tolerance  # the picture's grey band too
    neg = int((spectrum.eigenvalues <= -tol).sum())
    near_zero = spectrum.near_zero
    if spectrum.condition is not None:
        spread = ("condition number", f"{spectrum.condition:.4g}   (max |λ| / min |λ|)")
    else:  # numerically singular: max / min would be rounding noise over the largest
        spread = ("extreme nonzero |λ| ratio", f"{spectrum.nonzero_ratio:.4g}   (max |λ| / min |λ| over the "
                  f"{len(spectrum.eigenvalues) - near_zero} eigenvalues outside the near-zero band)")
    print_fn("\nHessian of the training loss")
    summary_rows = [
        ("loss", f"{losses[-1]:.8g}"),
        ("gradient norm", f"{grad_norm:.8g}"),
        ("trace", f"{trace:.8g}"),
        ("largest eigenvalue", f"{spectrum.largest:.8g}"),
        ("smallest eigenvalue", f"{spectrum.smallest:.8g}"),
        ("near-zero eigenvalues", f"{near_zero} with |λ| < {spectrum.relative_tolerance:.1g} max |λ|"
         + ("; numerically singular, so no condition number" if near_zero else "")),
        spread,
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
         f"funchess.trace_estimate (Hutch++), {free.trace.num_hvps} HVPs"),
        ("spectral density", f"in {spec.name}",
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
        "condition_number": spectrum.condition,  # None (null) when numerically singular
        "nonzero_eigenvalue_ratio": spectrum.nonzero_ratio,
        "negative_eigenvalues": neg,
        "near_zero_eigenvalues": near_zero,
        "eigenvalue_method": spectrum.method,
        "blocks": [vars(b) for b in blocks],
        "seconds": clock.phases | {"total": total},
        "hessian_bytes": planned,
        "planned_peak_bytes": plan.peak_bytes,
        "peak_memory_bytes": mem.peak,
        "eigsh_largest_eigenvalue": float(free.top.eigenvalues[-1]),
        "trace_estimate": float(free.trace.value),
        "trace_estimate_std_error": float(free.trace.std_error),
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
        "hessian": "block norms ||H_ab||_F of every parameter pair, and one block entry by entry",
        "spectrum": "eigenvalues, their density, and the matrix-free density against it",
        "summary": "the numbers above, as JSON",
        "model": "trained weights and data (torch.load) to reproduce the Hessian",
    }[kind]
