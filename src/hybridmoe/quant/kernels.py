"""Fused quantization kernels: the formats' element-wise code compiled with `torch.compile` (Inductor), which fuses a
dozen passes over memory into one or two loops, on CPUs (a C++ compiler) and GPUs (Triton) alike.

The compiled functions are the eager ones, so their twins are themselves: the tests check both give the same bits.
On GPUs that needs Inductor's eager-numerics options (`exact_options`): by default its Triton code divides with
`div.full.f32` (within 2 ulp, not correctly rounded), flushes fp32 subnormals to zero and contracts a*b+c into FMAs,
any of which can move a block scale or an element across a rounding boundary; PyTorch's eager CUDA kernels do none
of these. Compiled for a CPU (C++), the code rounds as eager does without them and runs faster, so they are set for
GPU tensors only.

The choice is made once per process and logged; HYBRIDMOE_QUANT_KERNELS=auto|compiled|eager overrides it. `auto`
compiles and falls back to eager (with a warning) the first time compiling fails, e.g. without a C++ compiler.
"""

from __future__ import annotations

import contextlib
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


# Inductor options that make compiled code round as eager code does (torch 2.11 and 2.13 have all three).
_EAGER_NUMERICS = (
    "eager_numerics.division_rounding",  # x / y as div_rn, not div.full
    "eager_numerics.disable_ftz",  # keep fp32 subnormals (tiny amaxes, MXFP8's 2^-127)
    "emulate_precision_casts",  # no FMA contraction (Triton's enable_fp_fusion)
)


def exact_options() -> dict[str, bool]:
    """The eager-numerics options (module docstring) this torch's Inductor knows, for `torch.compile(options=)`."""
    from torch._inductor import config

    known = config.get_config_copy()
    return {name: True for name in _EAGER_NUMERICS if name in known}


@functools.cache
def _compile(fn, device_type: str):
    return torch.compile(fn, dynamic=True, options=None if device_type == "cpu" else exact_options())


@functools.cache
def _shape_config():
    """torch.fx.experimental._config where it has the duck-shaping switch (torch 2.1 and later), else None."""
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - a torch without the module
        return None
    return _config if hasattr(_config, "use_duck_shape") else None


def _no_duck_shapes():
    """Dynamo gives dimensions of equal size one symbol ("duck shaping") and guards on their equality, so a kernel
    first compiled for 16 blocks of 16, or a square weight, is compiled again for the next shape. These kernels take
    any shapes, so while they compile each dimension gets a symbol of its own (without the switch, nothing changes)."""
    config = _shape_config()
    return contextlib.nullcontext() if config is None else config.patch(use_duck_shape=False)


def compiled(fn):
    """`fn` compiled (once, shapes dynamic) unless the mode says eager or compiling failed before under `auto`; run
    without autograd (values only)."""
    global _BROKEN
    if mode() == "eager" or _BROKEN:
        return fn

    def run(*args):
        global _BROKEN
        if _BROKEN:
            return fn(*args)
        fast = _compile(fn, args[0].device.type)
        try:
            # Values only (the training recipe's autograd Functions own the gradients), outside autocast and
            # contiguous: each of these would otherwise be another compiled variant.
            with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False), _no_duck_shapes():
                return fast(*(a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args))
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same function, eager
            if mode() == "compiled":
                raise
            _BROKEN = True
            log.warning("hybridmoe quantization kernels: torch.compile failed (%s); running eager", e)
            return fn(*args)

    return run
