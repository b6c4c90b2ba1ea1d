"""Small shared helpers: atomic file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the final file gets the usual permissions
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


_EAGER_UNDER_COMPILE: list[Callable] = []


def eager_under_compile(fn: Callable) -> Callable:
    """Mark a module-level function to run eagerly under torch.compile (a graph break around it), as
    `torch.compiler.disable` does, but applied by `prepare_compile` rather than at import: the decorator imports
    torch._dynamo (and Triton, where it is installed), about 2 s added to every `import hybridmoe`."""
    _EAGER_UNDER_COMPILE.append(fn)
    return fn


def prepare_compile() -> None:
    """Rebind every `eager_under_compile` function in its module to its `torch.compiler.disable` version. Call before
    torch.compile traces hybridmoe code; idempotent."""
    import sys

    import torch

    while _EAGER_UNDER_COMPILE:
        fn = _EAGER_UNDER_COMPILE.pop()
        setattr(sys.modules[fn.__module__], fn.__name__, torch.compiler.disable(fn))
