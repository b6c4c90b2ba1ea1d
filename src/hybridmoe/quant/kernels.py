"""Fused quantization kernels: the formats' element-wise code compiled with `torch.compile` (Inductor), which fuses a
dozen passes over memory into one or two loops, on CPUs (a C++ compiler) and GPUs (Triton) alike.

The compiled functions are the eager ones, so their twins are themselves: the tests check both give the same bits.
The choice is made once per process and logged; HYBRIDMOE_QUANT_KERNELS=auto|compiled|eager overrides it. `auto`
compiles and falls back to eager (with a warning) the first time compiling fails, e.g. without a C++ compiler.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_MODE: str | None = None
_BROKEN = False


def mode() -> str:
    global _MODE
    if _MODE is None:
        choice = os.environ.get("HYBRIDMOE_QUANT_KERNELS", "auto")
        if choice not in ("auto", "compiled", "eager"):
            raise ValueError(f"HYBRIDMOE_QUANT_KERNELS={choice!r}: use auto, compiled or eager")
        _MODE = choice
        log.info("hybridmoe quantization kernels: %s", "torch.compile, else eager" if choice == "auto" else choice)
    return _MODE


@functools.cache
def _compile(fn):
    return torch.compile(fn, dynamic=True)


def compiled(fn):
    """`fn` compiled (once, shapes dynamic) unless the mode says eager or compiling failed before under `auto`; run
    without autograd (values only)."""
    global _BROKEN
    if mode() == "eager" or _BROKEN:
        return fn
    fast = _compile(fn)

    def run(*args):
        global _BROKEN
        if _BROKEN:
            return fn(*args)
        try:
            # Values only (the training recipe's autograd Functions own the gradients), outside autocast and
            # contiguous: each of these would otherwise be another compiled variant.
            with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
                return fast(*(a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args))
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same function, eager
            if mode() == "compiled":
                raise
            _BROKEN = True
            log.warning("hybridmoe quantization kernels: torch.compile failed (%s); running eager", e)
            return fn(*args)

    return run
