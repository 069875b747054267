"""The command line: `python -m funchess demo` and `python -m funchess bench` (also `funchess ...`).

`main(argv)` parses the arguments and dispatches to `funchess._demo` and `funchess._bench`; it
returns the process exit status (0 on success, 2 on a usage error).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._errors import FunchessError, InvalidArgumentError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _device(call: str, name: str) -> str:
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"{call} --device {name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', "
            f"got {name!r} ({exc}). Pass --device cpu or --device cuda."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"{call} --device {name}: expected a machine with CUDA, but torch {torch.__version__} "
            f"sees no GPU here. Run with --device cpu, or install a CUDA build of torch."
        )
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(
            f"{call} --device {name}: expected 'cpu' or a CUDA device, got {dev.type!r}. "
            f"Pass --device cpu or --device cuda."
        )
    return name


def _parser() -> argparse.ArgumentParser:
    from ._models import DEMOS, PROBLEMS

    parser = argparse.ArgumentParser(
        prog="python -m funchess",
        description="funchess: Hessians of PyTorch models. Try `python -m funchess demo`.",
    )
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
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default="float64", help="default: float64")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training (default: 0)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 400, 60 with --quick)")
    demo.add_argument("--quick", action="store_true", help="a short training run (for tests and a first look)")
    demo.add_argument("--out", type=Path, default=Path("funchess-demo"), help="output folder (default: ./funchess-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = sub.add_parser(
        "bench",
        help="time funchess against its peers (nested loops, torch.autograd.functional, torch.func, ...)",
        description="Benchmark full Hessians, Hessian-vector products, diagonals and per-sample "
        "Hessians: funchess against nested double-backward loops, torch.autograd.functional, "
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
    bench.add_argument("--sections", default=None, help="comma-separated: hessian,hvp,diagonal,per-sample (default: all)")
    bench.add_argument("--methods", default=None, help="comma-separated substrings; run only methods whose name contains one")
    bench.add_argument("--min-time", type=float, default=None, help="seconds of repeated timing per method (default: 1, 0.3 with --quick)")
    bench.add_argument("--time-limit", type=float, default=None, help="seconds before a method is stopped (default: 60, 20 with --quick; 3x on the largest problems)")
    bench.add_argument("--max-memory", type=float, default=None, help="GiB a method may be expected to use (default: 60%% of available memory)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads per method (default: torch's default)")
    bench.add_argument("--out", type=Path, default=Path("funchess-bench"), help="output folder (default: ./funchess-bench)")
    bench.add_argument("--list", action="store_true", help="list problems and methods, then exit")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m funchess` and the `funchess` console script.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 on success, 2 on a usage error (the message goes to stderr).

    Example:
        >>> from funchess.__main__ import main
        >>> main(["bench", "--list"])  # doctest: +ELLIPSIS
        problems:
        ...
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from ._demo import DemoOptions, run

            steps = args.steps if args.steps is not None else (60 if args.quick else 400)
            if steps < 0:
                raise InvalidArgumentError(
                    f"funchess demo --steps {steps}: expected a non-negative number of training "
                    f"steps, got {steps}. Pass e.g. --steps 400."
                )
            run(
                DemoOptions(
                    model=args.model,
                    device=_device("funchess demo", args.device),
                    dtype=_DTYPES[args.dtype],
                    seed=args.seed,
                    steps=steps,
                    out=args.out,
                    progress=not args.no_progress,
                )
            )
            return 0
        from . import _bench

        if args.device != "cpu":
            _device("funchess bench", args.device)
        return _bench.main(args)
    except FunchessError as exc:
        print(f"funchess: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
