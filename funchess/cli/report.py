"""Results of a benchmark run and their reports: markdown tables (with a headline of ratios) and a
log-log plot. `funchess.cli.bench` produces the `Result`s; this module only reads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import fmt_bytes, fmt_seconds
from .methods import CHUNK, METHODS, TOLERANCE, Sizes, find_method
from .models import DTYPES

__all__ = ["Result", "ProblemInfo", "markdown", "plot", "status_text"]


@dataclass
class Result:
    """What a job measured (times in seconds, memory in bytes); `status` is "ok", "WRONG",
    "fails", "timeout", "crashed", "skipped", "not installed" or "unchecked"."""

    section: str
    problem: str
    dtype: str
    method: str
    device: str
    status: str
    n: int = 0
    time: float | None = None
    times: list[float] = field(default_factory=list)
    extrapolated: bool = False
    rows: int | None = None
    peak_memory: int | None = None
    memory_kind: str = ""
    error: float | None = None
    tolerance: float | None = None
    flops: float | None = None  # the method's own arithmetic (matmul/conv FLOPs, torch.utils.flop_counter)
    estimate: float | None = None  # the memory estimate that decided whether it ran
    message: str = ""

    @property
    def has_time(self) -> bool:
        return self.time is not None and self.status in ("ok", "WRONG", "unchecked")


@dataclass
class ProblemInfo:
    """Sizes and arithmetic of a problem, measured once in the parent process."""

    name: str
    family: str
    description: str
    n: int
    batch: int
    activations: int
    hvp_flops: float  # matmul/conv FLOPs of one double-backward HVP (torch.utils.flop_counter)

    def sizes(self, dtype: str) -> Sizes:
        return Sizes(self.n, DTYPES[dtype].itemsize, self.batch, self.activations)

    @property
    def hessian_flops(self) -> float:
        """The full Hessian's arithmetic: N Hessian-vector products."""
        return self.n * self.hvp_flops


def status_text(res: Result, short: bool = False) -> str:
    t = "" if res.time is None else ("~" if res.extrapolated else "") + fmt_seconds(res.time)
    if res.status == "ok":
        return f"{t}  ok" if short else "✓"
    if res.status == "WRONG":
        return f"{t}  WRONG (rel. error {res.error:.1e})" if short else f"**WRONG** (rel. error {res.error:.1e})"
    msg = res.message.replace("|", "/")
    if not short and len(msg) > 110:
        msg = msg[:107] + "..."
    return f"{res.status}: {msg}" if msg else res.status


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return ""
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.0f}" if r < 1000 else f"{r:.1e}"


def _group(results: Sequence[Result]) -> dict[tuple[str, str, str], list[Result]]:
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.section, r.problem, r.dtype), []).append(r)
    return groups


def _reference_time(rows: Sequence[Result], section: str) -> tuple[float | None, str]:
    for r in rows:
        m = find_method(section, r.method)
        if (m.unit or (section != "hvp" and m.name.startswith(("funchess", "vmap(funchess")))) and r.has_time:
            return r.time, m.name
    return None, ""


def markdown(results: Sequence[Result], infos: dict[str, ProblemInfo], meta: dict[str, Any]) -> str:
    """The results as markdown: a headline table, then one table per (section, problem, dtype)."""
    out = [f"# funchess bench ({'quick' if meta['quick'] else 'full'} run)", ""]
    mach = meta["machine"]
    out.append(
        f"Machine: {mach['processor']}, {mach['cpu_count']} CPUs ({mach['torch_threads']} torch threads)"
        + (f", {mach['gpu']}" if "gpu" in mach else "")
        + f"; torch {mach['torch']}, Python {mach['python']}; device `{meta['device']}`; {mach['date']}."
        + (f" Load average at the start: {', '.join(map(str, mach['load_average']))}." if "load_average" in mach else "")
    )
    rates = ", ".join(f"{v:.0f} GFLOP/s {k}" for k, v in meta["matmul_gflops"].items())
    out.append(f"Peak matmul rate measured in this run (fastest square product, at the start and the end): {rates}.")
    out.append(
        "Times are medians of repeated runs after a warm-up (runs = how many); `~` marks a time "
        "extrapolated from a timed subset of rows. Peak memory is above the process's start, each "
        "method in a fresh process (RSS on CPU, CUDA allocator on GPU); `x H` is that over the "
        "Hessian's own size. Every result is checked against the float64 oracle (`funchess.testing`: "
        "rows `H e_i` and products `H v` by plain double backward); rel. error is the largest relative "
        f"error, correct when at most {TOLERANCE['float32']:g} (float32) / {TOLERANCE['float64']:g} (float64)."
    )
    out.append("")
    out += _headline(results, infos)
    for (section, prob, dt), rows in _group(results).items():
        info = infos[prob]
        ref_t, ref_name = _reference_time(rows, section)
        out.append(f"## {section}: {prob}, {dt}")
        out.append("")
        itemsize = DTYPES[dt].itemsize
        size = info.n**2 * itemsize * (info.batch if section == "per-sample" else 1)
        what = {"hessian": "H", "per-sample": "the B per-sample Hessians"}.get(section)
        out.append(f"{info.description}; N = {info.n:,} parameters"
                   + (f"; {what} take {fmt_bytes(size)}" if what else "") + ".")
        out.append("")
        rate = meta["matmul_gflops"].get(dt)
        ratio_head = "x gradient" if section == "hvp" else "x funchess"
        head = ["method", "time", ratio_head, "runs", "peak memory"]
        if what:
            head.append("x H" if section == "hessian" else "x B·H")
        if section == "hessian":
            head += ["GFLOP", "GFLOP/s", "% of matmul peak"]
        head += ["rel. error", "correct"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            t = "" if r.time is None else ("~" if r.extrapolated else "") + fmt_seconds(r.time)
            cells = [f"`{r.method}`", t, _ratio(r.time, ref_t) if r.has_time else "",
                     "" if not r.times else ("1 (rows)" if r.extrapolated else str(len(r.times))),
                     "" if r.peak_memory is None else fmt_bytes(r.peak_memory)]
            if what:
                cells.append("" if r.peak_memory is None else f"{r.peak_memory / size:.2f}")
            if section == "hessian":
                gf = r.flops / r.time / 1e9 if r.flops and r.has_time and r.time else None
                cells += ["" if not r.flops else f"{r.flops / 1e9:.2f}", "" if gf is None else f"{gf:.1f}",
                          "" if gf is None or not rate else f"{100 * gf / rate:.0f}%"]
            cells += ["" if r.error is None else f"{r.error:.1e}", status_text(r)]
            out.append("| " + " | ".join(cells) + " |")
        notes = []
        for r in rows:
            if r.extrapolated and r.rows:
                notes.append(f"`{r.method}`: extrapolated from {r.rows:,} of {info.n:,} rows "
                             f"(setup + rows x N / rows timed).")
        if section == "hessian":
            notes.append(f"GFLOP: the method's own matmul/conv arithmetic for the whole Hessian, counted by "
                         f"torch.utils.flop_counter in one extra run (when that fits the time budget); for scale, "
                         f"N double-backward HVPs are {info.hessian_flops / 1e9:.1f} GFLOP. GFLOP/s is that over "
                         f"the median time; the last column compares it with the peak matmul rate.")
        if ref_name:
            notes.append(f"Ratios are times over `{ref_name}` in this table.")
        out += [""] + [f"- {n}" for n in notes] + [""]
    notes = sorted({f"`{m.name}`: {m.note}" for m in METHODS if m.note and any(r.method == m.name for r in results)})
    if notes:
        out += ["## Methods", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _headline(results: Sequence[Result], infos: dict[str, ProblemInfo]) -> list[str]:
    """One row per full-Hessian problem: funchess's time and each peer's time as a multiple of it."""
    peers = ["nested loop (autograd.grad)", "autograd.functional.hessian", "autograd.functional.hessian vectorize",
             "torch.func.hessian", f"torch.func jacrev(jacrev) chunk {CHUNK}", "curvlinops H @ I"]
    groups = [(k, v) for k, v in _group(results).items() if k[0] == "hessian"]
    if not groups:
        return []
    lines = ["## Headline: full Hessians, peer time / funchess.hessian time (higher = funchess faster)", "",
             "| problem | N | dtype | funchess.hessian | " + " | ".join(f"`{p}`" for p in peers) + " |",
             "|" + "|".join("---" for _ in range(4 + len(peers))) + "|"]
    for (_, prob, dt), rows in groups:
        by = {r.method: r for r in rows}
        fun = by.get("funchess.hessian")
        if fun is None or not fun.has_time:
            continue
        cells = [prob, f"{infos[prob].n:,}", dt, _cell_time(fun)]
        for p in peers:
            r = by.get(p)
            if r is None:
                cells.append("")
            elif r.has_time and fun.has_time:
                mark = "~" if r.extrapolated else ""
                cells.append(f"{mark}{_ratio(r.time, fun.time)}x" + (" WRONG" if r.status == "WRONG" else ""))
            else:
                cells.append(r.status)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _cell_time(r: Result) -> str:
    if not r.has_time or r.time is None:
        return r.status
    return fmt_seconds(r.time) + ("" if r.status == "ok" else f" {r.status}")


def plot(results: Sequence[Result], infos: dict[str, ProblemInfo], path: Path) -> Path | None:
    """Full-Hessian time against N, log-log, one colour per method; one panel per dtype. MLPs
    are joined by lines; other families are single markers; hollow markers are extrapolated,
    crosses are wrong answers."""
    rows = [r for r in results if r.section == "hessian" and r.has_time]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    dtypes = sorted({r.dtype for r in rows}, key=list(DTYPES).index)
    names = [m.name for m in METHODS if m.section == "hessian" and any(r.method == m.name for r in rows)]
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    shapes = {"mlp": "o", "cnn": "s", "transformer": "^"}
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7.5 * len(dtypes), 6), squeeze=False)
    for ax, dt in zip(axes[0], dtypes, strict=True):
        for name in names:
            mine = sorted((r for r in rows if r.dtype == dt and r.method == name), key=lambda r: infos[r.problem].n)
            mlp = [r for r in mine if infos[r.problem].family == "mlp"]
            if len(mlp) > 1:
                ax.plot([infos[r.problem].n for r in mlp], [r.time for r in mlp], "-", color=colours[name], lw=1.3,
                        alpha=0.8)
            for r in mine:
                fam = infos[r.problem].family
                marker = "x" if r.status == "WRONG" else shapes.get(fam, "o")
                face = "none" if r.extrapolated or r.status == "WRONG" else colours[name]
                ax.plot(infos[r.problem].n, r.time, marker, color=colours[name], mfc=face, ms=7, mew=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # minor labels (2x10^3, 3x10^3, ...) collide: keep decades
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters N")
        ax.set_ylabel("time for the full Hessian (s)")
        ax.set_title(f"full Hessian, {dt}")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colours[n], marker="o", label=n) for n in names]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=f) for f, m in shapes.items()]
    handles += [Line2D([], [], color="grey", marker="o", mfc="none", ls="", label="extrapolated"),
                Line2D([], [], color="grey", marker="x", ls="", label="wrong answer")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
