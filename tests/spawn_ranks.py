"""Run a function on a few gloo ranks in spawned processes, for the distributed tests.

`run(fn, world_size, *args)` starts `world_size` processes (the `spawn` start method), each
joining a process group (gloo unless `backend=` says otherwise) at `tcp://127.0.0.1:<free port>` with one torch thread, and returns
every rank's `fn(rank, world_size, *args)` in rank order. The first rank that raises fails the
test with its traceback; ranks that do not report within `timeout` seconds fail it too; the
remaining processes are terminated either way, so a hung rank never outlives the test.

`scenarios(rank, world_size, names, module)` runs several named scenarios in one process group
(one spawn for many tests) and reports each one's outcome: `("ok", value)` or `("error",
traceback)`; after a scenario, a barrier re-aligns the ranks, and if it fails the remaining
scenarios are reported as not run.
"""

from __future__ import annotations

import datetime
import importlib
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any], rank: int, world: int, port: int, group_timeout: float, backend: str, args: tuple[Any, ...], out: Any
) -> None:
    try:
        import faulthandler

        import torch
        import torch.distributed as dist

        faulthandler.enable()  # a crash in native code prints where Python was
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=group_timeout),
        )
        try:
            value = fn(rank, world, *args)
            dist.barrier()  # tear gloo down together: a rank leaving early can abort a peer's exit
        finally:
            dist.destroy_process_group()
        out.put(("ok", rank, value))
    except BaseException:  # noqa: BLE001 - reported to the test with its traceback
        out.put(("error", rank, traceback.format_exc()))
    # flush the report before the interpreter shuts down: a rare abort while a gloo process
    # tears down (seen on this machine, after all its work) must not lose it
    out.close()
    out.join_thread()


def run(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0, group_timeout: float = 20.0, backend: str = "gloo"
) -> list[Any]:
    """Every rank's `fn(rank, world_size, *args)`, in rank order (see the module docstring)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, group_timeout, backend, args, out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world_size) if r not in results]
                raise AssertionError(f"ranks {missing} did not finish within {timeout:g} s (a hang?)")
            try:
                kind, rank, value = out.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"rank {dead[0][0]} died with exit code {dead[0][1]} without reporting") from None
                continue
            if kind == "error":
                raise AssertionError(f"rank {rank} raised:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(results) == world_size else 0.2)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():  # pragma: no cover - terminate ignored
                p.kill()
    return [results[r] for r in range(world_size)]


def scenarios(rank: int, world: int, names: list[str], module: str) -> dict[str, tuple[str, Any]]:
    """Run `module.<name>(rank, world)` for each name; see the module docstring."""
    import torch.distributed as dist

    mod = importlib.import_module(module)
    outcomes: dict[str, tuple[str, Any]] = {}
    for i, name in enumerate(names):
        try:
            outcomes[name] = ("ok", getattr(mod, name)(rank, world))
        except BaseException:  # noqa: BLE001
            outcomes[name] = ("error", traceback.format_exc())
        try:
            dist.barrier()
        except RuntimeError:
            for later in names[i + 1 :]:
                outcomes[later] = ("error", f"not run: the ranks lost each other after {name!r}")
            break
    return outcomes
