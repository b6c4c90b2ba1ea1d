"""The sandbox's launcher: the file the host runs as a script (`python -I -S sandbox_child.py`, see
`hybridmoe.envs.sandbox` for the layers and the job it passes on stdin). It reads the job, confines itself, then runs
the harness (Python) or execs the shell.

It imports only what the sandboxed side needs (json, os, stat, sys; ctypes, resource and the rest inside the
functions that use them): every shell command and every code run starts a fresh interpreter on this file, and the
host side's modules (subprocess, tempfile, threading, dataclasses) took ~25 ms of a ~45 ms run to import.
"""

from __future__ import annotations

import json
import os
import stat
import sys

SHELL_PATH = "/usr/local/bin:/usr/bin:/bin"
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: private tmpfs mounts, or cleaned after the run
PRELOADED = (
    "abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools",
    "json", "math", "numbers", "operator", "random", "re", "statistics", "string", "struct", "textwrap", "types",
    "typing", "unicodedata",
)  # fmt: skip


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


# Linux constants (x86-64 numbering for system calls; the seccomp filter is installed on x86-64 only).
_MS_NOSUID, _MS_NODEV, _MS_BIND = 2, 4, 4096
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_SYS_SOCKET, _SYS_IO_URING_SETUP, _SYS_IO_URING_ENTER, _SYS_IO_URING_REGISTER = 41, 425, 426, 427
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_AUDIT_ARCH_X86_64 = 0xC000003E
_EACCES = 13


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _syscall(number: int, *args) -> int:
    ctypes, libc = _libc()
    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def _private_tmp(work: str) -> bool:
    """In our own mount namespace: fresh tmpfs over the world-writable directories, the working directory (which
    may lie under one of them) bound back at its path."""
    _, libc = _libc()
    keep = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    for root in PRIVATE_TMP:
        if os.path.isdir(root):
            flags = _MS_NOSUID | _MS_NODEV
            if libc.mount(b"tmpfs", root.encode(), b"tmpfs", flags, b"size=16m,mode=1777") != 0:
                return False
    if not os.path.isdir(work):
        os.makedirs(work)
        if libc.mount(f"/proc/self/fd/{keep}".encode(), work.encode(), None, _MS_BIND, None) != 0:
            return False
    os.close(keep)
    return True


def _seccomp() -> bool:
    """Refuse socket(2) and io_uring (which can open sockets past seccomp) with EACCES; 32-bit and x32 calls too."""
    import platform
    import struct

    if platform.machine() != "x86_64":
        return False
    ctypes, libc = _libc()
    allow, refuse = 0x7FFF0000, 0x00050000 | _EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program = [  # (code, jump if true, jump if false, k); jumps count the instructions skipped
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH_X86_64),
        (ret, 0, 0, refuse),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, 5, 0, 0x40000000),  # the x32 ABI
        (jeq, 4, 0, _SYS_SOCKET),
        (jeq, 3, 0, _SYS_IO_URING_SETUP),
        (jeq, 2, 0, _SYS_IO_URING_ENTER),
        (jeq, 1, 0, _SYS_IO_URING_REGISTER),
        (ret, 0, 0, allow),
        (ret, 0, 0, refuse),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *ins) for ins in program))
    prog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(code)))  # sock_fprog
    return libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), prog, None, None) == 0


def _landlock(work: str) -> int:
    """Read-only file system but `work` (and /dev/null); by ABI: TCP refused (4), signals and abstract Unix sockets
    scoped to the run (6). Returns the ABI applied, 0 when Landlock is not available."""
    import struct

    abi = _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    execute, write_file, read_file, read_dir = 1, 2, 4, 8
    truncate, ioctl_dev = (1 << 14) * (abi >= 3), (1 << 15) * (abi >= 5)
    fs = (1 << 13) - 1 | (1 << 13) * (abi >= 2) | truncate | ioctl_dev  # every file-system right this ABI knows
    net = 3 if abi >= 4 else 0  # LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP
    scoped = 3 if abi >= 6 else 0  # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("<QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    if ruleset < 0:
        return 0
    try:
        null = write_file | read_file | truncate | ioctl_dev
        for path, access in (("/", execute | read_file | read_dir), (work, fs), (os.devnull, null)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("<Qi", access, fd)  # struct landlock_path_beneath_attr (packed)
                if _syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) != 0:
                    return 0
            finally:
                os.close(fd)
        return abi if _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0 else 0
    finally:
        os.close(ruleset)


def _readable_by(uid: int | None, path: str) -> bool:
    """Whether a user with no rights of its own can read `path`: every directory above it searchable by others."""
    if uid is None:
        return True
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _confine(job: dict) -> dict:
    """Apply every layer this process can (see the module docstring), in the order that keeps each possible:
    mounts and the uid change need root, the seccomp filter needs no-new-privileges."""
    import platform  # noqa: F401  (imported while the interpreter is still readable: see PRELOADED)
    import resource
    import struct  # noqa: F401

    ctypes, libc = _libc()
    work = job["work"]
    applied = {"private_tmp": job["private_tmp"] and _private_tmp(work)}
    os.chdir(work)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    for name, value in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), None, None, None) != 0:
        raise OSError("sandbox: cannot set no_new_privs")
    applied["landlock"] = _landlock(work) if job["landlock"] else 0
    applied["seccomp"] = job["seccomp"] and _seccomp()
    return applied


def _child() -> None:
    import builtins
    import importlib
    import types

    job = json.loads(sys.stdin.buffer.read())  # all of it, before the code could read stdin
    if job["kind"] == "python":
        read_roots = tuple(os.path.realpath(p) for p in sys.path if p)
        if not all(_readable_by(job["uid"], p) for p in read_roots if os.path.exists(p)):
            for name in PRELOADED:  # what the run's uid could not import itself
                importlib.import_module(name)
    applied = _confine(job)
    for name in [m for m in sys.modules if m.startswith(("ctypes", "_ctypes"))]:  # the launcher's, not the code's
        del sys.modules[name]
    if job["kind"] == "probe":
        sys.stdout.write(json.dumps(applied))
        return
    if job["kind"] == "shell":
        env = {"PATH": SHELL_PATH, "HOME": job["work"], "PWD": job["work"], "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp"}
        os.execve("/bin/sh", ["sh", "-c", job["command"]], env)
    nonce, code, tests = job["nonce"], job["code"], job["tests"]
    run, compile_, write, flush = builtins.exec, builtins.compile, sys.stdout.write, sys.stdout.flush
    check = _make_check()
    del job
    sys.addaudithook(_make_audit_hook(os.path.realpath(os.getcwd()), read_roots))
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
