"""Small shims over torch internals that differ across the supported versions (torch >= 2.4)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def fused_rnn_kernels_off() -> Iterator[None]:
    """Turn cuDNN and oneDNN off for a block (without `backends.*.flags`, which warns on restore)."""
    mkldnn = torch._C._get_mkldnn_enabled()
    cudnn = torch.backends.cudnn.enabled
    torch._C._set_mkldnn_enabled(False)
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch.backends.cudnn.enabled = cudnn


def vjp(fn: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
    """`torch.func.vjp`, typed loosely: its stubs do not know the 3-tuple returned with has_aux."""
    return torch.func.vjp(fn, *primals, has_aux=has_aux)


def jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...], *, has_aux: bool = False) -> Any:
    """`torch.func.jvp`, typed loosely (see `vjp`)."""
    return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)
