"""Run model-written Python against hidden tests in a separate, resource-limited process (never in this one).

`run_python(code, tests)` starts this same file as a script in a fresh `python -I -S` process (no PYTHON* variables,
no site-packages, no script directory on sys.path: the standard library only) and passes it the code, the tests
and a per-run nonce on stdin, so nothing of them is on disk for the code to read. Layers, none enough on its own
(human-eval's `reliability_guard` says as much of itself; the public write-ups of local code sandboxes combine
process isolation, `resource.setrlimit` and namespaces):

- process: an empty environment, no inherited file descriptors, a fresh temporary directory as the working
  directory (removed afterwards), its own session, and the whole process group killed at the wall-clock timeout
  and again after the run, so nothing it forked outlives it;
- network: a new network namespace when `unshare(1)` can make one (root: `unshare --net`; otherwise a user
  namespace too), else none, and sockets refused by the audit hook either way;
- user: when this process is root, the child drops to `nobody` before the code runs (if nobody can read the
  standard library; a Python installed under /root stays root, held by the hook and the limits alone);
- limits (soft = hard, so the code cannot raise them): CPU seconds, address space, processes (0: no fork and no
  threads, except for root, whom the kernel exempts), file size (also caps stdout and stderr, which go to files),
  open files, no core files;
- an audit hook (PEP 578) installed before the code runs refuses: sockets, new processes, ctypes, frame and gc
  introspection (the harness's locals stay out of reach; `sys._getframe` raises ValueError, as for a stack too
  shallow, which the standard library's callers handle), changing limits, file writes outside the working
  directory, and reads outside it except Python's own library.

The code runs first; then the tests, in a namespace of their own holding the code's names and `_check(got,
expected)` (equality with exact types, so an object that claims to equal everything fails). The run passes only
when the harness prints the nonce after the last test and the process exits 0; `sys.exit(0)` or `os._exit(0)` in
the code does not pass. Limits (the next issue hardens this): the tests share the code's interpreter; the hook
narrows, but does not close, what in-process code can reach.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

NOBODY = 65534


@dataclass
class SandboxResult:
    passed: bool  # every test passed (the harness reached its end and printed the nonce)
    returncode: int | None
    timed_out: bool
    stdout: str  # capped at max_output_bytes, the nonce removed
    stderr: str


@cache
def network_namespace() -> list[str]:
    """The `unshare` command prefix that gives the child an empty network namespace here, or [] when none can."""
    prefix = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--net"]
    if shutil.which("unshare") is None:
        return []
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


def run_python(
    code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 65536
) -> SandboxResult:
    """Run `code`, then `tests` (Python using `_check(got, expected)` or `assert`), in a sandboxed subprocess."""
    nonce = secrets.token_hex(16)
    limits = {
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)),
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_NPROC": 0,
        "RLIMIT_FSIZE": max_output_bytes,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    payload = json.dumps({"code": code, "tests": tests, "nonce": nonce, "limits": limits}).encode()
    with tempfile.TemporaryDirectory(prefix="hybridmoe-sandbox-") as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        if os.geteuid() == 0:  # the child runs as nobody: it may enter tmp and write in work only
            os.chmod(tmp, 0o711)
            os.chown(work, NOBODY, NOBODY)
        with open(os.path.join(tmp, "stdout"), "w+b") as out, open(os.path.join(tmp, "stderr"), "w+b") as err:
            argv = [*network_namespace(), sys.executable, "-I", "-S", os.path.abspath(__file__)]
            proc = subprocess.Popen(
                argv, cwd=work, env={}, stdin=subprocess.PIPE, stdout=out, stderr=err, close_fds=True,
                start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                proc.communicate(payload, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
            stdout, stderr = (_read_capped(f, max_output_bytes) for f in (out, err))
    lines = stdout.splitlines()
    passed = not timed_out and proc.returncode == 0 and bool(lines) and lines[-1] == nonce
    if passed:
        stdout = stdout[: stdout.rstrip("\n").rfind(nonce)].removesuffix("\n")
    return SandboxResult(passed, proc.returncode, timed_out, stdout, stderr)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, signal.SIGKILL)


def _read_capped(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


# The child side: everything below runs in the sandboxed process, before and around the model's code.

_DENIED_EVENTS = (
    "socket.", "subprocess.", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "os.kill", "os.killpg", "pty.", "ctypes.", "sys._current_frames", "sys.settrace",
    "sys.setprofile", "gc.get_", "resource.setrlimit", "resource.prlimit", "os.setuid",
    "os.setgid", "os.chroot",
)  # fmt: skip
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})  # audited as object.__getattr__
_DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "multiprocessing"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
_WRITE_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown", "os.truncate",
    "os.utime", "os.chflags", "os.lchflags", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
    "shutil.copytree", "shutil.rmtree", "shutil.move", "shutil.make_archive", "shutil.unpack_archive",
})  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _make_audit_hook(work: str, read_roots: tuple[str, ...]):
    realpath, fspath, startswith = os.path.realpath, os.fspath, str.startswith
    writable = (work, work + os.sep)
    readable = writable + tuple(r for root in read_roots for r in (root, root + os.sep))

    def inside(path, roots) -> bool:
        if isinstance(path, int) or path is None:  # an open descriptor, or the working directory
            return True
        path = realpath(fspath(path))
        path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        return path in roots or startswith(path, roots)

    def hook(event: str, args: tuple) -> None:
        if event == "sys._getframe":  # as if the stack had no such frame, which the standard library handles
            raise ValueError("sandbox: frames are not available")
        if startswith(event, _DENIED_EVENTS) or (event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in _DENIED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if not inside(path, writable if write else readable):
                raise PermissionError(f"sandbox: opening {path!r} is not allowed")
        elif event in _READ_EVENTS or event in _WRITE_EVENTS:
            roots = readable if event in _READ_EVENTS else writable
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg, roots):
                    raise PermissionError(f"sandbox: {event} on {arg!r} is not allowed")

    return hook


def _make_check(type=type, len=len, range=range, list=list, tuple=tuple, dict=dict, sorted=sorted, repr=repr):
    """`_check(got, expected)`: equal with the same types all the way down. The builtins are bound now, before the
    model's code could replace them."""
    error = AssertionError

    def same(a, b) -> bool:
        if type(a) is not type(b):
            return False
        if type(a) is list or type(a) is tuple:
            return len(a) == len(b) and not [i for i in range(len(a)) if not same(a[i], b[i])]
        if type(a) is dict:
            return sorted(map(repr, a)) == sorted(map(repr, b)) and not [k for k in b if not same(a.get(k), b[k])]
        return a == b  # both of the expected (built-in) type: no user-defined __eq__ runs

    def check(got, expected) -> None:
        if not same(got, expected):
            shown = repr(got) if type(got) in (int, float, str, bool, list, tuple, dict, type(None)) else "an object"
            raise error(f"got {shown} of type {type(got).__name__}, expected {expected!r}")

    return check


def _readable_by_all(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) can read `path`: every directory above it searchable."""
    import stat

    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _child() -> None:
    import builtins
    import resource
    import types

    job = json.loads(sys.stdin.buffer.read())  # all of it, before the code could read stdin
    nonce, code, tests = job["nonce"], job["code"], job["tests"]
    run, compile_, write, flush = builtins.exec, builtins.compile, sys.stdout.write, sys.stdout.flush
    check = _make_check()
    work = os.path.realpath(os.getcwd())
    read_roots = tuple(os.path.realpath(p) for p in sys.path if p)
    if os.geteuid() == 0 and all(_readable_by_all(p) for p in read_roots if os.path.exists(p)):
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    for name, value in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    del job
    sys.addaudithook(_make_audit_hook(work, read_roots))
    solution = types.ModuleType("solution")  # a real module, so dataclasses, pickle and the like find it
    sys.modules["solution"] = solution
    namespace = solution.__dict__
    run(compile_(code, "solution.py", "exec"), namespace)
    test_namespace = {k: v for k, v in namespace.items() if not k.startswith("__")}
    test_namespace.update({"__name__": "tests", "_check": check})
    run(compile_(tests, "tests.py", "exec"), test_namespace)
    write(f"\n{nonce}\n")
    flush()


if __name__ == "__main__":
    _child()
