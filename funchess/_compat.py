"""Small shims over torch internals that differ across the supported versions (torch >= 2.4)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch


def inside_transform() -> bool:
    """Whether we are being called inside a torch.func transform (vmap, grad, jvp, ...).

    Inside a transform funchess must stay purely functional (no writes into preallocated buffers).
    When torch offers no way to tell, assume we are inside: the functional path is always correct.
    """
    functorch = getattr(torch._C, "_functorch", None)
    level = getattr(functorch, "maybe_current_level", None)
    if level is not None:
        return level() is not None
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None:
        return peek() is not None
    return True


class _FusedRnnSwitch:
    """cuDNN and oneDNN are switched by process-wide flags, so threads share one switch: the first
    thread in saves the flags and turns them off, the last one out restores them (a plain
    save/restore per thread interleaves and can leave oneDNN off for good)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved = (True, True)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.saved = (torch._C._get_mkldnn_enabled(), torch.backends.cudnn.enabled)
                torch._C._set_mkldnn_enabled(False)
                torch.backends.cudnn.enabled = False
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    torch._C._set_mkldnn_enabled(self.saved[0])
                    torch.backends.cudnn.enabled = self.saved[1]


_FUSED_RNN = _FusedRnnSwitch()


def fused_rnn_kernels_off() -> contextlib.AbstractContextManager[None]:
    """Turn cuDNN and oneDNN off for a block (without `backends.*.flags`, which warns on restore,
    and is not safe across threads). While any thread is inside, the flags stay off for all."""
    return _FUSED_RNN.off()


def vjp(fn: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
    """`torch.func.vjp`, typed loosely: its stubs do not know the 3-tuple returned with has_aux."""
    return torch.func.vjp(fn, *primals, has_aux=has_aux)


def jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...], *, has_aux: bool = False) -> Any:
    """`torch.func.jvp`, typed loosely (see `vjp`)."""
    return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)
