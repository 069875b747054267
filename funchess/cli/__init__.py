"""The command line: `python -m funchess demo` and `python -m funchess bench` (also `funchess ...`).

`main(argv)` parses the arguments and dispatches to `funchess.cli.demo` and `funchess.cli.bench`;
it returns the process exit status (0 on success, 2 on a usage error, a missing extra or an
unusable `--out`; the bench returns 1 when one of funchess's own answers was wrong).

This subpackage sits on top of the library: it imports funchess only through its public names
(`import funchess`, `funchess.testing`), and the library never imports it. Its own dependencies
(matplotlib for the pictures, tqdm for the progress bars) come with the `cli` extra,
`pip install "funchess[cli]"`; they are imported only when a command needs them, so `--help`,
`--version` and `bench --list` work without them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import funchess

from .models import DEMOS, DTYPES, PROBLEMS

__all__ = ["main"]

#: How to get what the commands need beyond funchess itself (said when it is missing).
CLI_EXTRA = 'pip install "funchess[cli]"'
#: The packages of that extra, imported only by the commands that draw or show progress.
CLI_PACKAGES = ("matplotlib", "tqdm")
#: The demo's picture formats (matplotlib writes all three; pdf and svg are vector graphics).
FORMATS = ("png", "pdf", "svg")


def _device(call: str, name: str) -> str:
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise funchess.InvalidArgumentError(
            f"{call} --device {name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', "
            f"got {name!r} ({exc}). Pass --device cpu or --device cuda."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise funchess.InvalidArgumentError(
            f"{call} --device {name}: expected a machine with CUDA, but torch {torch.__version__} "
            f"sees no GPU here. Run with --device cpu, or install a CUDA build of torch."
        )
    if dev.type not in ("cpu", "cuda"):
        raise funchess.InvalidArgumentError(
            f"{call} --device {name}: expected 'cpu' or a CUDA device, got {dev.type!r}. "
            f"Pass --device cpu or --device cuda."
        )
    return name


def _missing_packages(call: str) -> str | None:
    """The one-line complaint when the `cli` extra is not installed, else None."""
    missing = []
    for name in CLI_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    what = " and ".join(missing)
    return (f"{call} needs {what}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install the command line's extra: {CLI_EXTRA} (from a checkout: pip install \".[cli]\").")


def _output_folder(call: str, path: Path) -> Path:
    """Create `path` (and its parents) now, before minutes of work, or say why it cannot be used."""
    if path.exists() and not path.is_dir():
        raise funchess.InvalidArgumentError(
            f"{call} --out {path}: expected a folder to write into, got an existing file. "
            f"Pass --out with a new or existing folder, e.g. --out {path.with_suffix('')}-out."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise funchess.InvalidArgumentError(
            f"{call} --out {path}: expected a folder that can be created, got "
            f"{type(exc).__name__}: {exc.strerror or exc}. Pass --out with a writable folder."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise funchess.InvalidArgumentError(
            f"{call} --out {path}: expected a folder this user can write into; it is read-only here. "
            f"Pass --out with a writable folder."
        )
    return path


_PROGRESS_HELP = "no progress bars (they are drawn only when stderr is a terminal anyway)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m funchess",
        description="funchess: Hessians of PyTorch models. Try `python -m funchess demo`.",
    )
    parser.add_argument("--version", action="version", version=f"funchess {funchess.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")

    demo = sub.add_parser(
        "demo",
        help="train a built-in model on synthetic data, take its Hessian, print a summary and draw it",
        description="Train a small built-in model on synthetic data (generated in code, fixed seed), "
        "compute the full Hessian of its training loss with funchess.hessian, print a summary "
        "and write pictures to --out.",
    )
    demo.add_argument("--model", choices=sorted(DEMOS), default="mlp", help="built-in model (default: mlp)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="default: float64")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training (default: 0)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 400, 60 with --quick)")
    demo.add_argument("--quick", action="store_true", help="a short training run (for tests and a first look)")
    demo.add_argument("--out", type=Path, default=Path("funchess-demo"), help="output folder (default: ./funchess-demo)")
    demo.add_argument("--format", choices=FORMATS, default="png",
                      help="picture format: png, or pdf/svg (vector, for papers) (default: png)")
    demo.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)

    bench = sub.add_parser(
        "bench",
        help="time funchess against its peers (nested loops, torch.autograd.functional, torch.func, ...)",
        description="Benchmark full Hessians, Hessian-vector products, Hessian and GGN diagonals (of the batch and per "
        "sample) and per-sample Hessians: funchess against nested double-backward loops, torch.autograd.functional, "
        "torch.func and (when installed: pip install funchess[bench]) curvlinops and BackPACK. "
        "Each method runs in a fresh process; every answer is checked against the oracle.",
    )
    bench.add_argument("--quick", action="store_true", help="small problems only (about a minute)")
    bench.add_argument("--large", action="store_true", help="add the larger conv net and transformer (cnn-5k, transformer-9k): a much longer run")
    bench.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench.add_argument("--dtype", default=None, help="comma-separated dtypes (default: float32,float64)")
    bench.add_argument(
        "--problems", default=None,
        help=f"comma-separated problems (default: depends on --quick); known: {', '.join(PROBLEMS)}",
    )
    bench.add_argument("--sections", default=None, help="comma-separated: hessian,hvp,diagonal,ggn-diagonal,per-sample,per-sample-diagonal,per-sample-ggn-diagonal (default: all)")
    bench.add_argument("--methods", default=None, help="comma-separated substrings; run only methods whose name contains one")
    bench.add_argument("--min-time", type=float, default=None, help="seconds of repeated timing per method (default: 1, 0.3 with --quick)")
    bench.add_argument("--time-limit", type=float, default=None, help="seconds before a method is stopped (default: 60, 20 with --quick; 3x on the largest problems)")
    bench.add_argument("--max-memory", type=float, default=None, help="GiB a method may be expected to use (default: 60%% of available memory)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads per method (default: torch's default)")
    bench.add_argument("--out", type=Path, default=Path("funchess-bench"), help="output folder (default: ./funchess-bench)")
    bench.add_argument("--list", action="store_true", help="list problems and methods, then exit")
    bench.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    return parser


def _demo(args: argparse.Namespace) -> int:
    call = "funchess demo"
    steps = args.steps if args.steps is not None else (60 if args.quick else 400)
    if steps < 0:
        raise funchess.InvalidArgumentError(
            f"{call} --steps {steps}: expected a non-negative number of training "
            f"steps, got {steps}. Pass e.g. --steps 400."
        )
    device = _device(call, args.device)
    missing = _missing_packages(call)
    if missing:
        print(f"funchess: error: {missing}", file=sys.stderr)
        return 2
    from .demo import DemoOptions, run

    run(DemoOptions(model=args.model, device=device, dtype=DTYPES[args.dtype], seed=args.seed, steps=steps,
                    out=_output_folder(call, args.out), format=args.format, progress=not args.no_progress))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    call = "funchess bench"
    if args.list:
        bench.list_all()
        return 0
    if args.device != "cpu":
        _device(call, args.device)
    missing = _missing_packages(call)
    if missing:
        print(f"funchess: error: {missing}", file=sys.stderr)
        return 2
    settings = bench.settings_from(args)
    _output_folder(call, settings.out)
    return bench.main(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m funchess` and the `funchess` console script.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 on success (and for `--help`, `--version`), 2 on a usage error (the
        message goes to stderr, one line), 1 when the benchmark found a wrong funchess answer.

    Example:
        >>> from funchess.cli import main
        >>> main(["--version"])  # doctest: +ELLIPSIS
        funchess 0...
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors: a status here
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _demo(args) if args.command == "demo" else _bench(args)
    except funchess.FunchessError as exc:
        print(f"funchess: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` stopped reading: quiet, as Python's docs advise (no traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
