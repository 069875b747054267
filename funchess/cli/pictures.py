"""The demo's pictures, sized and labelled for a paper: png, or pdf/svg (vector).

`plot_hessian` draws the Hessian's block structure (the Frobenius norm of every parameter-pair
block) next to one block at full resolution; `plot_spectrum` draws the eigenvalues, their
density per decade of |λ|, and the matrix-free (SLQ) density against the exact one. Both take
plain tensors and write one file; matplotlib is imported when they are called.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from funchess import SpectralDensity

__all__ = ["plot_hessian", "plot_spectrum", "block_norms", "zoom_block", "symlog_ticks"]

#: Largest block drawn entry by entry in the zoom panel (a bigger one shows its top-left corner).
ZOOM_MAX = 128
_RED, _BLUE, _GREY, _OUTLINE = "#c0392b", "#1f5fa8", "#9a9a9a", "#00b3b3"


@contextlib.contextmanager
def _pyplot() -> Iterator[Any]:
    """matplotlib's pyplot without a display, with paper-friendly settings for this figure only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style: dict[str, Any] = {
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
        "legend.fontsize": 8, "figure.titlesize": 11, "mathtext.fontset": "dejavusans",
        "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType in pdf: text stays text (editable, searchable)
        "svg.fonttype": "none",  # text as text in svg too
        "axes.spines.top": False, "axes.spines.right": False,
    }
    with matplotlib.rc_context(style):  # type: ignore[arg-type]
        yield plt


def _save(fig: Any, path: Path) -> Path:
    """Write the figure in the format of `path`'s suffix, cropped to its contents."""
    kwargs: dict[str, Any] = {"bbox_inches": "tight", "pad_inches": 0.05}
    if path.suffix == ".png":
        kwargs |= {"dpi": 150, "pil_kwargs": {"compress_level": 6}}
    elif path.suffix == ".pdf":
        kwargs["metadata"] = {"Creator": "funchess demo", "CreationDate": None}  # reproducible files
    elif path.suffix == ".svg":
        kwargs["metadata"] = {"Date": None}
    fig.savefig(path, **kwargs)
    return path


def block_norms(matrix: Tensor, sizes: Sequence[int]) -> Tensor:
    """The `(n, n)` Frobenius norms `||H_ab||_F` of the blocks of `matrix` cut at `sizes`, in float64.

    Example:
        >>> block_norms(torch.ones(3, 3), [1, 2])
        tensor([[1.0000, 1.4142],
                [1.4142, 2.0000]], dtype=torch.float64)
    """
    M = matrix.detach().double().cpu()
    rows = torch.split(M, list(sizes), 0)
    return torch.stack([torch.stack([b.norm() for b in torch.split(r, list(sizes), 1)]) for r in rows])


def zoom_block(norms: Tensor, sizes: Sequence[int]) -> int:
    """Which diagonal block to show entry by entry: the one with the largest norm among blocks of
    at most `ZOOM_MAX` rows (any block if none is that small; it is then cut to its corner).

    Example:
        >>> zoom_block(torch.tensor([[3.0, 0.0], [0.0, 9.0]]), [10, 1000])  # the small one
        0
    """
    small = [i for i, s in enumerate(sizes) if s <= ZOOM_MAX] or list(range(len(sizes)))
    return max(small, key=lambda i: float(norms[i, i]))


def _shape_text(shape: Sequence[int]) -> str:
    return "\u00d7".join(map(str, shape)) if shape else "scalar"


def plot_hessian(matrix: Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]], path: Path,
                 title: str) -> Path:
    """Two panels: `||H_ab||_F` for every pair of parameters (log colour), and the largest small
    diagonal block entry by entry (signed, linear colour), its place outlined in the first panel.

    Args:
        matrix: the `(N, N)` Hessian in `funchess.to_matrix` order.
        names, shapes: the parameters in that order (their sizes cut the matrix into blocks).
        path: where to write; the suffix (.png, .pdf, .svg) picks the format.
        title: the figure's title.
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    sizes = [math.prod(s) for s in shapes]
    n = len(names)
    norms = block_norms(matrix, sizes)
    z = zoom_block(norms, sizes)
    start = sum(sizes[:z])
    k = min(sizes[z], ZOOM_MAX)
    block = matrix.detach().double().cpu()[start : start + k, start : start + k]

    with _pyplot() as plt:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 4.6), layout="constrained",
                                     gridspec_kw={"width_ratios": [1, 1]})
        top = float(norms.max()) or 1.0
        shown = norms.clamp_min(top * 1e-6)
        im = ax.imshow(shown.numpy(), norm=LogNorm(vmin=float(shown.min()), vmax=top), cmap="viridis")
        labels = [f"{a} ({_shape_text(s)})" for a, s in zip(names, shapes, strict=True)]
        ax.set_xticks(range(n), labels if n <= 8 else names, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels if n <= 8 else names)
        ax.tick_params(length=0)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        if n <= 8:  # the numbers, where they fit
            mid = math.sqrt(float(shown.max()) * float(shown.min()))
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{float(norms[i, j]):.2g}", ha="center", va="center", fontsize=7.5,
                            color="black" if float(shown[i, j]) > mid else "white")
        ax.add_patch(Rectangle((z - 0.5, z - 0.5), 1, 1, fill=False, ec=_OUTLINE, lw=2.2))
        ax.set_title(r"block norms $\|H_{ab}\|_F$ over parameter pairs $(a, b)$")
        bar = fig.colorbar(im, ax=ax, shrink=0.85, label=r"$\|H_{ab}\|_F$")
        bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())

        # signed, on a linear scale: the sign pattern and the Kronecker-like stripes are the structure;
        # clipped at a high quantile so one large entry does not wash out the rest (the bar says so)
        mags = block.abs().flatten()
        clip = float(mags.quantile(0.995)) if mags.numel() > 1 else float(mags.max())
        clip = clip or float(mags.max()) or 1.0
        im2 = bx.imshow(block.numpy(), cmap="RdBu_r", norm=Normalize(vmin=-clip, vmax=clip), interpolation="nearest")
        shape = list(shapes[z])
        inner = math.prod(shape[1:]) if len(shape) > 1 else 0  # entries per output unit (row of a weight)
        if inner and 1 < k // inner <= 16:  # the weight's rows, where they are few enough to see
            for o in range(inner, k, inner):
                bx.axhline(o - 0.5, color="#555555", lw=0.5, alpha=0.5)
                bx.axvline(o - 0.5, color="#555555", lw=0.5, alpha=0.5)
        cut = "" if k == sizes[z] else f", top-left {k}\u00d7{k} of {sizes[z]}\u00d7{sizes[z]}"
        bx.set_title(rf"zoom: every entry $H_{{ij}}$ of the block $a = b =$ {names[z]}{cut}")
        bx.set_xlabel(f"$j$ (entry of {names[z]}, {_shape_text(shape)}, row-major)")
        bx.set_ylabel(f"$i$ (entry of {names[z]})")
        for side in ("top", "right"):
            bx.spines[side].set_visible(True)
        fig.colorbar(im2, ax=bx, shrink=0.85, extend="both", label=rf"$H_{{ij}}$ (colours clipped at $\pm${clip:.2g})")
        fig.suptitle(title)
        _save(fig, path)
        plt.close(fig)
    return path


def symlog_ticks(lo: float, hi: float, lin: float) -> list[float]:
    """At most ~12 decade ticks over [lo, hi] on a symlog axis (every k-th decade) and 0.

    Example:
        >>> symlog_ticks(-1e-2, 10.0, 1e-3)
        [-0.01, -0.001, 0.0, 0.001, 0.01, 0.1, 1.0, 10.0]
    """
    top = math.floor(math.log10(max(hi, -lo, lin)))
    bottom = math.ceil(math.log10(lin))
    decades = list(range(bottom, top + 1))
    pos = [d for d in decades if 10.0**d <= hi]
    neg = [d for d in decades if lo <= -(10.0**d)]
    step = max(1, math.ceil((len(pos) + len(neg)) / 9))
    keep = [d for d in decades if (top - d) % step == 0]
    return [-(10.0**d) for d in reversed(keep) if d in neg] + [0.0] + [10.0**d for d in keep if d in pos]


def plot_spectrum(eigenvalues: Tensor, near_zero: float, path: Path, title: str, method: str,
                  slq: SpectralDensity | None = None) -> Path:
    """Three panels (two without `slq`): the sorted eigenvalues (symlog axis), their density per
    decade of |λ| split by sign, and the matrix-free SLQ density against a histogram of the exact
    eigenvalues (density per unit λ, linear axis).

    Eigenvalues with `|λ| < near_zero` are numerically zero: grey in the first two panels.
    """
    import numpy as np

    ev = eigenvalues.detach().double().cpu().numpy()
    N = ev.size
    top = float(np.abs(ev).max()) or 1.0
    lin = max(near_zero, top * 1e-300)

    def colour(v: float) -> str:
        return _GREY if abs(v) < lin else (_RED if v < 0 else _BLUE)

    with _pyplot() as plt:
        panels = 3 if slq is not None else 2
        fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.9), layout="constrained")
        ax, bx = axes[0], axes[1]
        ax.scatter(np.arange(1, N + 1), ev, s=5, c=[colour(v) for v in ev], lw=0)
        ax.set_yscale("symlog", linthresh=lin)
        ax.set_yticks(symlog_ticks(float(ev[0]), float(ev[-1]), lin))
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlim(0, N + 1)
        ax.set_xlabel(r"index $i$ (ascending)")
        ax.set_ylabel(r"eigenvalue $\lambda_i$ (symlog)")
        ax.set_title(rf"{N} eigenvalues, $\lambda_{{\min}}$ = {ev[0]:.3g}, $\lambda_{{\max}}$ = {ev[-1]:.3g}")
        ax.grid(alpha=0.3)

        # density per decade of |λ| above the near-zero band; the band itself is one grey bar one
        # decade wide just below it (its eigenvalues are rounding noise, spread over many decades)
        mags = np.abs(ev)
        lo_edge = math.log10(lin)
        edges = np.linspace(lo_edge, math.log10(top) + 1e-9, 31)
        widths = np.diff(edges)
        bottom = np.zeros(len(widths))
        for mask, col, label in ((ev <= -lin, _RED, "negative"), (ev >= lin, _BLUE, "positive")):
            counts, _ = np.histogram(np.log10(mags[mask]), bins=edges)
            dens = counts / (N * widths)
            bx.bar(10.0 ** edges[:-1], dens, width=10.0 ** edges[1:] - 10.0 ** edges[:-1], bottom=bottom,
                   align="edge", color=col, lw=0, label=f"{label} ({int(mask.sum())})")
            bottom += dens
        zero = int((mags < lin).sum())
        bx.bar(lin / 10, zero / N, width=lin - lin / 10, align="edge", color=_GREY, lw=0,
               label=rf"$|\lambda| <$ {lin:.1e} ({zero})")
        bx.set_xscale("log")
        bx.axvline(lin, color=_GREY, lw=0.8, ls="--")
        bx.set_xlabel(r"$|\lambda|$ (log scale)")
        bx.set_ylabel(r"density of $\log_{10}|\lambda|$ (fraction per decade)")
        bx.set_title(f"density of magnitudes ({method.split(' (')[0]})")
        bx.legend(loc="upper left", frameon=False)
        bx.grid(alpha=0.3)

        if slq is not None:
            cx = axes[2]
            grid, dens = slq.grid.double().cpu().numpy(), slq.density.double().cpu().numpy()
            edges = np.linspace(min(float(ev[0]), float(grid[0])), max(float(ev[-1]), float(grid[-1])), 61)
            heights, _, _ = cx.hist(ev, bins=edges, density=True, color=_BLUE, alpha=0.4,
                                    label=f"exact ({N} eigenvalues)")
            cx.plot(grid, dens, color="black", lw=1.3,
                    label=rf"SLQ, {slq.num_hvps} HVPs ($\sigma$ = {slq.sigma:.2g})")
            cx.set_yscale("log")
            floor = max(float(dens.max()) * 1e-5, 1e-12)
            cx.set_ylim(floor, 5 * max(float(dens.max()), float(np.max(heights))))
            cx.set_xlabel(r"eigenvalue $\lambda$")
            cx.set_ylabel(r"spectral density $\rho(\lambda)$")
            cx.set_title("matrix-free estimate against exact")
            cx.legend(loc="upper right", frameon=False)
            cx.grid(alpha=0.3)
        fig.suptitle(title)
        _save(fig, path)
        plt.close(fig)
    return path
