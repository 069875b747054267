"""`python -m funchess bench`: funchess against its peers, in one reproducible run.

The benchmark is a registry of problems (`funchess.cli.models.PROBLEMS`) times methods
(`funchess.cli.methods.METHODS`) in four sections: full Hessians, Hessian-vector products,
diagonals and per-sample Hessians. This module plans the (section, problem, dtype, method) jobs,
skips what would not fit in memory or time (and says so), and runs each job in a fresh process
forked from a server that has imported torch, so that peak memory is that method's alone: RSS
above the process's start on CPU, the CUDA allocator's peak on GPU. Reports come from
`funchess.cli.report`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import multiprocessing
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import funchess

from .measure import PeakMemory, available_memory, fmt_bytes, fmt_seconds, machine, matmul_gflops, sync
from .methods import BENCH_EXTRA, METHODS, SECTIONS, TOLERANCE, Method, _probe, check, find_method
from .models import DTYPES, PROBLEMS, TINY, make_problem
from .progress import Bar
from .report import ProblemInfo, Result, markdown, plot, status_text

__all__ = ["Job", "Settings", "run_job", "run_jobs", "plan", "problem_info", "main"]

# ----------------------------------------------------------------------------- one job, in a fresh process


@dataclass
class Job:
    """One (section, problem, dtype, method) measurement and how to time it."""

    section: str
    problem: str
    dtype: str
    method: str
    device: str = "cpu"
    min_time: float = 1.0  # keep repeating until this many seconds have been timed ...
    min_reps: int = 3  # ... and at least this many runs (after the warm-up) ...
    max_reps: int = 200  # ... but no more than this many
    long_run: float = 5.0  # a run longer than this is not repeated
    row_budget: float = 2.0  # seconds of rows for partial methods before extrapolating
    flop_budget: float = 60.0  # count the method's FLOPs (one more, slower run) if that fits in this many seconds
    threads: int | None = None  # torch.set_num_threads in the worker (None: torch's default)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _worker(job_fields: dict[str, Any], conn: Connection) -> None:
    """Run one job in this (fresh) process; report through `conn` as it goes."""
    try:
        job = Job(**job_fields)
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would fail float32 checks on GPUs
        torch.backends.cudnn.allow_tf32 = False
        if job.threads:
            torch.set_num_threads(job.threads)
        device = torch.device(job.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        method = find_method(job.section, job.method)
        dtype = DTYPES[job.dtype]
        problem = make_problem(job.problem, dtype, device)
        n = problem.num_params

        def once(run: Callable[..., Any]) -> Any:
            return run(job.row_budget) if method.partial else run()

        def timed(run: Callable[..., Any]) -> tuple[Any, float]:
            sync(device)
            t0 = time.perf_counter()
            out = once(run)
            sync(device)
            return out, time.perf_counter() - t0

        tiny = make_problem(TINY[problem.family], dtype, device)
        with contextlib.suppress(Exception):  # warm-up (one-time setup, caches); the real run reports errors
            once(method.build(tiny, _probe(tiny)))
        run = method.build(problem, _probe(problem))
        conn.send(("start", {}))
        out: Any = None
        times: list[float] = []
        rows: int | None = None
        extrapolated = False
        with PeakMemory(device) as mem:
            out, t = timed(run)
        if method.partial:
            out, rows, setup_s, rows_s = out
            if rows is not None and rows < n:
                extrapolated = True
                t = setup_s + rows_s * n / rows
        times.append(t)
        while (
            not extrapolated
            and t < job.long_run
            and (len(times) < job.min_reps or sum(times) < job.min_time)
            and len(times) < job.max_reps
        ):
            out = None  # free the previous result first: peak memory stays one result
            out, t = timed(run)
            if method.partial:
                out = out[0]
            times.append(t)
        if method.partial and isinstance(out, tuple):
            out = out[0]
        conn.send(("timed", {
            "n": n, "time": statistics.median(times), "times": times, "extrapolated": extrapolated,
            "rows": rows, "peak_memory": mem.peak, "memory_kind": mem.what,
        }))
        slowdown = 12 if method.loop else 3  # counting FLOPs costs per operation: loops suffer most
        if not extrapolated and slowdown * statistics.median(times) <= job.flop_budget:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                run(0.0) if method.partial else run()  # all rows: the timed run finished them in time
            conn.send(("flops", {"flops": float(counter.get_total_flops())}))
        value = method.output(out)
        del out
        err = check(method, problem, value, rows if extrapolated else None)
        conn.send(("checked", {"error": err}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never hidden
        with contextlib.suppress(Exception):
            conn.send(("error", {"message": _first_line(exc), "traceback": traceback.format_exc()}))
    finally:
        conn.close()


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # torch._dynamo is what the first torch.func call imports (seconds); import it once here
        ctx.set_forkserver_preload(["torch._dynamo", "funchess.cli.bench"])
        return ctx
    return multiprocessing.get_context("spawn")


def _signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_job(ctx: Any, job: Job, time_limit: float, setup_limit: float = 120.0) -> Result:
    """Run `job` in a fresh process; stop it after `time_limit` seconds of timed work."""
    res = Result(job.section, job.problem, job.dtype, job.method, job.device, "crashed",
                 tolerance=TOLERANCE[job.dtype])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(asdict(job), send), daemon=True)
    proc.start()
    send.close()
    deadline = time.monotonic() + setup_limit
    phase = "setup"
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not recv.poll(remaining):
                if phase == "timing":
                    res.status, res.message = "timeout", f"stopped after {time_limit:.0f} s (--time-limit)"
                elif phase == "check":
                    res.status, res.message = "unchecked", "the oracle check did not finish in time"
                else:
                    res.status, res.message = "timeout", f"setup took more than {setup_limit:.0f} s"
                break
            try:
                kind, data = recv.recv()
            except EOFError:
                proc.join(5)
                code = proc.exitcode
                why = "killed (SIGKILL: out of memory?)" if code == -9 else (
                    _signal_name(code) if code is not None and code < 0 else f"exit status {code}")
                if phase == "check":
                    res.status, res.message = "unchecked", f"the process died while checking: {why}"
                else:
                    res.status, res.message = "crashed", f"the process died: {why}"
                break
            if kind == "start":
                phase, deadline = "timing", time.monotonic() + time_limit
            elif kind in ("timed", "flops"):
                for k, v in data.items():
                    setattr(res, k, v)
                if kind == "timed":
                    phase, deadline = "check", time.monotonic() + max(120.0, time_limit)
            elif kind == "checked":
                res.error = data["error"]
                ok = res.error is not None and res.error <= TOLERANCE[job.dtype]
                res.status = "ok" if ok else "WRONG"
                break
            else:
                res.status, res.message = "fails", data["message"]
                break
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    return res


# ----------------------------------------------------------------------------- planning


def problem_info(name: str) -> ProblemInfo:
    """N, batch, activation entries of one forward, and the FLOPs of one HVP (float32, CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from funchess.testing import reference_hvp

    problem = make_problem(name)
    count = [problem.inputs.numel()]

    def hook(_: nn.Module, __: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, Tensor):
                count[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in problem.model.modules() if not list(m.children())]
    with torch.no_grad():
        problem.model(problem.inputs)
    for h in handles:
        h.remove()
    f, params = problem.function()
    v = {k: torch.ones_like(p) for k, p in params.items()}
    with FlopCounterMode(display=False) as counter:  # the oracle's HVP: plain double backward, math attention
        reference_hvp(lambda p: f(p, problem.inputs, problem.targets), (params,), (v,))
    return ProblemInfo(name, problem.family, problem.description, problem.num_params, problem.batch_size,
                       count[0], float(counter.get_total_flops()))


#: What `bench` runs by default (about ten minutes on 2 CPU cores): section -> [(problem, dtypes)].
FULL_PLAN: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "hessian": [
        ("mlp-2k", ("float32", "float64")),
        ("mlp-8k", ("float32",)),
        ("mlp-20k", ("float32",)),
        ("mlp-50k", ("float32",)),
        ("cnn-2k", ("float32",)),
        ("transformer-2k", ("float32",)),
        ("transformer-fused-2k", ("float32",)),
    ],
    "hvp": [(p, ("float32",)) for p in ("mlp-2k", "mlp-20k", "cnn-2k", "transformer-2k")],
    "diagonal": [("mlp-8k", ("float32",)), ("cnn-2k", ("float32",))],
    "ggn-diagonal": [("mlp-8k", ("float32",)), ("cnn-2k", ("float32",))],
    "per-sample": [("mlp-500", ("float32", "float64")), ("mlp-2k", ("float32",))],
    "per-sample-diagonal": [("mlp-8k", ("float32",)), ("cnn-2k", ("float32",))],
    "per-sample-ggn-diagonal": [("mlp-8k", ("float32",)), ("cnn-2k", ("float32",))],
}
#: What `--large` adds: the bigger conv net and transformer, where every peer takes minutes.
LARGE_PLAN: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "hessian": [("transformer-2k", ("float64",)), ("cnn-5k", ("float32",)), ("transformer-9k", ("float32",))],
    "hvp": [(p, ("float32",)) for p in ("cnn-5k", "transformer-9k")],
    "diagonal": [("cnn-5k", ("float32",))],
}
QUICK_PLAN: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "hessian": [("mlp-2k", ("float32", "float64")), ("transformer-tiny", ("float32",))],
    "hvp": [("mlp-2k", ("float32",))],
    "diagonal": [("mlp-2k", ("float32",))],
    "ggn-diagonal": [("mlp-2k", ("float32",))],
    "per-sample": [("mlp-tiny", ("float32",))],
    "per-sample-diagonal": [("mlp-2k", ("float32",))],
    "per-sample-ggn-diagonal": [("mlp-2k", ("float32",))],
}
#: Problems so large that only the methods marked `core` run on them (in the "hessian" section).
CORE_ONLY = {"mlp-20k", "mlp-50k"}


@dataclass
class Settings:
    device: str
    dtypes: tuple[str, ...]
    sections: tuple[str, ...]
    problems: tuple[str, ...] | None
    methods: tuple[str, ...] | None
    min_time: float
    min_reps: int
    time_limit: float
    row_budget: float
    max_memory: float
    threads: int | None
    quick: bool
    progress: bool
    out: Path
    large: bool = False


def plan(settings: Settings) -> list[tuple[str, str, str]]:
    """(section, problem, dtype) triples in run order: by section, then family and size."""
    table = QUICK_PLAN if settings.quick else FULL_PLAN
    triples: list[tuple[str, str, str]] = []
    for section in settings.sections:
        entries = (
            [(p, settings.dtypes) for p in settings.problems]
            if settings.problems is not None
            else table.get(section, []) + (LARGE_PLAN.get(section, []) if settings.large else [])
        )
        for name, dtypes in entries:
            for dt in dtypes:
                if dt in settings.dtypes:
                    triples.append((section, name, dt))
    return triples


def _flop_budget(method: Method, quick: bool) -> float:
    """Seconds the FLOP-counting run may take: generous for funchess's own methods (their share of
    the matmul peak is the point), tight for the peers (their counts fill in a column; time matters)."""
    if quick:
        return 5.0
    return 20.0 if method.name.startswith("funchess") else 8.0


@functools.cache
def _built(name: str) -> Any:
    return make_problem(name)


def _wanted(method: Method, settings: Settings) -> bool:
    return settings.methods is None or any(s.lower() in method.name.lower() for s in settings.methods)


def _installed(method: Method) -> bool:
    return all(importlib.util.find_spec(mod) is not None for mod in method.requires)


# ----------------------------------------------------------------------------- the run


def run_jobs(settings: Settings, infos: dict[str, ProblemInfo], print_fn: Callable[[str], None] = print) -> list[Result]:
    """Plan, skip what cannot fit, run the rest one process at a time."""
    triples = plan(settings)
    work: list[tuple[Method, str, str, str]] = [
        (m, section, prob, dt)
        for section, prob, dt in triples
        for m in METHODS
        if m.section == section and _wanted(m, settings)
    ]
    ctx = _context()
    results: list[Result] = []
    # (section, family, dtype, method) -> (seconds per parameter, problem, its N, timed out)
    seen: dict[tuple[str, str, str, str], tuple[float, str, int, bool]] = {}
    with Bar(work, desc="bench", unit="method", enabled=settings.progress, leave=False, print_fn=print_fn) as bar:
        for method, section, prob, dt in bar:
            info = infos[prob]
            bar.describe(f"{section} {prob} {dt}: {method.name}"[:70])
            res = Result(section, prob, dt, method.name, settings.device, "skipped", n=info.n, tolerance=TOLERANCE[dt])
            # a lower bound on the time from a smaller problem: N rows, each no cheaper than before
            cost = 0.0 if section == "hvp" else float(info.n)
            key = (section, info.family, dt, method.name)
            prior = seen.get(key) if key in seen and seen[key][2] <= info.n else None  # a smaller problem
            estimate = method.memory(info.sizes(dt))
            res.estimate = estimate
            core_only = section == "hessian" and prob in CORE_ONLY
            limit = settings.time_limit * (3 if core_only else 1)  # the few methods on the largest get longer
            if not _installed(method):
                res.status, res.message = "not installed", f"needs {', '.join(method.requires)}: {BENCH_EXTRA}"
            elif not method.applies(_built(prob)):
                res.message = "not supported by this method"
            elif core_only and not method.core:
                res.message = "largest problem: only the core methods run"
            elif estimate > settings.max_memory:
                res.message = f"needs ~{fmt_bytes(estimate)}, over the {fmt_bytes(settings.max_memory)} limit (--max-memory)"
            elif prior is not None and prior[3]:
                res.message = f"timed out on the smaller {prior[1]}"
            elif prior is not None and not method.partial and prior[0] * cost > limit:
                res.message = (f"at least ~{fmt_seconds(prior[0] * cost)} (its time on {prior[1]} x the "
                               f"ratio of parameter counts), over the {limit:.0f} s limit (--time-limit)")
            else:
                job = Job(section, prob, dt, method.name, settings.device, min_time=settings.min_time,
                          min_reps=settings.min_reps, long_run=max(2.0, settings.time_limit / 20),
                          row_budget=settings.row_budget, flop_budget=_flop_budget(method, settings.quick),
                          threads=settings.threads)
                res = run_job(ctx, job, limit)
                res.n, res.estimate = res.n or info.n, estimate
                if res.has_time and res.time is not None and cost:
                    seen[key] = (res.time / cost, prob, info.n, False)
                elif res.status == "timeout":
                    seen[key] = (math.inf, prob, info.n, True)
            results.append(res)
            bar.write(f"{section:10s} {prob:20s} {dt:7s} {method.name:42s} {status_text(res, short=True)}")
    return results


# ----------------------------------------------------------------------------- entry point


def settings_from(args: argparse.Namespace) -> Settings:
    def split(value: str | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())

    dtypes = split(args.dtype) or ("float32", "float64")
    sections = split(args.sections) or SECTIONS
    problems = split(args.problems)
    for what, given, known in (("--dtype", dtypes, tuple(DTYPES)), ("--sections", sections, SECTIONS),
                               ("--problems", problems or (), tuple(PROBLEMS))):
        bad = [g for g in given if g not in known]
        if bad:
            raise funchess.InvalidArgumentError(
                f"funchess bench {what} {','.join(given)}: expected a comma-separated list of "
                f"{', '.join(known)}; got {', '.join(map(repr, bad))}. See `python -m funchess bench --list`."
            )
    free = available_memory(args.device)
    return Settings(
        device=args.device,
        dtypes=dtypes,
        sections=sections,
        problems=problems,
        methods=split(args.methods),
        min_time=args.min_time if args.min_time is not None else (0.3 if args.quick else 1.0),
        min_reps=2 if args.quick else 3,
        time_limit=args.time_limit if args.time_limit is not None else (20.0 if args.quick else 60.0),
        row_budget=1.0 if args.quick else 3.0,
        max_memory=args.max_memory * 2**30 if args.max_memory is not None else 0.6 * free,
        threads=args.threads,
        quick=args.quick,
        large=args.large,
        progress=not args.no_progress,
        out=args.out,
    )


def list_all(print_fn: Callable[[str], None] = print) -> None:
    """Print the registered problems and each section's methods (`bench --list`)."""
    print_fn("problems:")
    for name, make in PROBLEMS.items():
        p = make()
        print_fn(f"  {name:22s} N = {p.num_params:>7,}  {p.description}")
    for section in SECTIONS:
        print_fn(f"{section} methods:")
        for m in METHODS:
            if m.section == section:
                extra = "" if _installed(m) else f"  (not installed: {BENCH_EXTRA})"
                print_fn(f"  {m.name}{extra}")


def main(settings: Settings, print_fn: Callable[[str], None] = print) -> int:
    """Run the benchmark with `settings` (see `settings_from`); 1 if a funchess method was wrong or failed."""
    triples = plan(settings)
    names = sorted({p for _, p, _ in triples}, key=list(PROBLEMS).index)
    print_fn(f"funchess bench ({'quick' if settings.quick else 'full'}): {len(triples)} tables on {settings.device}; "
             f"each method in a fresh process; memory limit {fmt_bytes(settings.max_memory)}, "
             f"time limit {settings.time_limit:.0f} s per method")
    if settings.threads:
        torch.set_num_threads(settings.threads)  # the matmul rate is measured with the same threads
    infos = {p: problem_info(p) for p in names}
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "quick": settings.quick,
        "device": settings.device,
        "machine": machine(settings.device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "matmul_gflops": {dt: matmul_gflops(DTYPES[dt], settings.device) for dt in settings.dtypes},
    }
    results = run_jobs(settings, infos, print_fn)
    for dt in settings.dtypes:  # measured again at the end; the faster is the machine's limit
        meta["matmul_gflops"][dt] = max(meta["matmul_gflops"][dt], matmul_gflops(DTYPES[dt], settings.device))
    meta["seconds"] = time.perf_counter() - started
    settings.out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, infos, meta)
    (settings.out / "results.md").write_text(md + f"\nTotal wall time: {meta['seconds']:.0f} s.\n")
    payload = {"meta": meta, "problems": {k: asdict(v) for k, v in infos.items()},
               "results": [asdict(r) for r in results]}
    (settings.out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    picture = plot(results, infos, settings.out / "bench.png")
    print_fn("")
    print_fn(md)
    print_fn(f"wrote {settings.out / 'results.md'}, {settings.out / 'results.json'}"
             + (f", {picture}" if picture else "") + f" ({meta['seconds']:.0f} s)")
    bad = [r for r in results if r.method.startswith(("funchess", "vmap(funchess", "loop of funchess"))
           and r.status in ("WRONG", "fails", "crashed")]
    for r in bad:
        print_fn(f"funchess: {r.section} {r.problem} {r.dtype} {r.method}: {r.status} {r.message}")
    return 1 if bad else 0


def iter_results(path: Path) -> Iterable[Result]:
    """Read `results.json` back (for scripts that compare runs)."""
    data = json.loads(Path(path).read_text())
    for r in data["results"]:
        yield Result(**r)
