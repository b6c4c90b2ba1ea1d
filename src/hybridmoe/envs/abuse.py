"""Escapes and abuses tried against the sandbox (`hybridmoe.envs.sandbox`), and the host-side checks that tell
whether each was contained. The abuse tests (tests/envs/test_sandbox.py) and `benchmarks/bench_sandbox.py` run this
one list.

Each abuse is a Python program (run by `run_python` with the tests `assert pwned`: it passes only if the abuse went
all the way) and a shell command (run in a `ShellSession`: it prints PWNED only if it went all the way). After the
run, the host checks what the abuse could have changed whether or not it said so: the files it aimed at outside the
working directory, a decoy process (root's) and this process still alive, no process left with the abuse's marker
in its command line or with the run's uid, the secret environment variable of this process absent from everything
the run returned, the output within its cap. Contained = no sign of success and every host check holds.

How it was contained is read off the result: "timeout" (killed at the wall-clock limit), "limit" (a resource limit
stopped it: memory, file size, processes, CPU), "refused" (an operation failed with a permission error),
"isolated" (what it aimed at was not there to reach: another namespace), "cleaned" (it ran, and what it left was
killed or removed after the run).

Some containment needs kernel features a machine may lack; `Abuse.needs` says which (e.g. another process's /proc
is readable by any user without a PID namespace), and `expected(abuse, kind, isolation)` tells whether this machine
should contain it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from .sandbox import SHELL_PATH, Isolation, ShellSession, isolation, processes_of, run_python

SECRET_NAME = "HYBRIDMOE_SANDBOX_SECRET"


@dataclass(frozen=True)
class Abuse:
    name: str
    python: str  # sets `pwned = True` when it went through
    shell: str  # prints PWNED when it went through (or leaves a sign only the host can see)
    needs: Callable[[Isolation], bool] = lambda iso: True  # what the shell form needs from the kernel
    needs_why: str = ""


ABUSES = [
    Abuse(
        "fork_bomb",
        "import os\nfor _ in range(64):\n    os.fork()\npwned = True",
        "f() {{ f | f & }}; f; sleep 0.5; "
        "[ $(find /proc -maxdepth 1 -user $(id -u) | wc -l) -gt {many} ] && echo PWNED",
    ),
    Abuse(
        "memory_bomb",
        "x = bytearray(2 * 1024**3)\nx[-1] = 1\npwned = True",
        'x=aaaaaaaa; i=0; while [ $i -lt 28 ]; do x="$x$x"; i=$((i + 1)); done; echo PWNED ${{#x}}',
    ),
    Abuse("infinite_loop", "while True:\n    pass\npwned = True", "while :; do :; done; echo PWNED"),
    Abuse("huge_output", "print('x' * 10**8)\npwned = True", "head -c 100000000 /dev/zero && echo PWNED"),
    Abuse(
        "write_outside",
        "for path in ({outside!r}, {world!r}, '../escape'):\n    open(path, 'w').write('x')\npwned = True",
        "echo x > {outside}; echo x > {world}; echo x > ../escape; ls {outside} {world} ../escape && echo PWNED",
        lambda iso: iso.own_uid or iso.landlock > 0,
        "without a uid of its own or Landlock, the run keeps this user's right to write this user's files",
    ),
    Abuse(
        "read_environment",
        "import os\nv = os.environ.get({name!r}) or open('/proc/{pid}/environ').read()\nprint(v)\npwned = True",
        "echo ${name}; env; cat /proc/{pid}/environ /proc/$PPID/environ; tr '\\0' '\\n' < /proc/1/environ",
        lambda iso: iso.own_uid or iso.pid_namespace or iso.landlock > 0,
        "without another uid, a PID namespace or Landlock, this user's processes' environments are readable",
    ),
    Abuse(
        "read_proc",
        "print(open('/proc/{pid}/status').read())\npwned = True",
        "cat /proc/{pid}/status && echo PWNED",
        lambda iso: iso.pid_namespace,
        "without a PID namespace, /proc/PID/status of every process is readable by every user",
    ),
    Abuse(
        "open_socket",
        "import socket\nsocket.socket()\npwned = True",
        "python3 -c 'import socket; socket.socket(); print(\"PWNED\")'; "
        "perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) and print \"PWNED\\n\"'",
        lambda iso: iso.network_namespace or iso.seccomp,
        "without a network namespace or seccomp (x86-64), sockets cannot be refused",
    ),
    Abuse("sleep_past_deadline", "import time\ntime.sleep(30)\npwned = True", "sleep 30; echo PWNED"),
    Abuse(
        "kill_parent",
        "import os\nfor pid in ({pid}, {decoy}, os.getppid()):\n    os.kill(pid, 9)\npwned = True",
        "kill -9 {pid} {decoy} $PPID; kill -9 -1",  # success shows on the host: the decoy (or this process) dead
        lambda iso: iso.own_uid or iso.pid_namespace or iso.landlock >= 6,
        "without another uid, a PID namespace or Landlock ABI 6, the run may signal this user's processes",
    ),
    Abuse(
        "background_process",
        "import subprocess\nsubprocess.Popen(['sleep', {marker!r}])\npwned = True",
        "sleep {marker} & setsid sleep {marker} & (sleep {marker} &); nohup sleep {marker} > /dev/null 2>&1 & "
        "sleep 0.2",  # the shell waits for setsid to leave its group: the run's group is killed the moment it ends
        lambda iso: iso.own_uid or iso.pid_namespace,
        "without another uid or a PID namespace, a process that leaves the session cannot be found to be killed",
    ),
]  # fmt: skip
KINDS = ("python", "shell")


@dataclass
class Outcome:
    name: str
    kind: str  # python | shell
    contained: bool
    how: str  # timeout | limit | refused | isolated | cleaned; "" when not contained
    seconds: float
    expected: bool  # whether this machine's kernel should contain it (see Abuse.needs)
    detail: str  # what gave the abuse away, or the run's last error line


def expected(abuse: Abuse, kind: str, iso: Isolation) -> bool:
    return kind == "python" or abuse.needs(iso)


def try_abuse(abuse: Abuse, kind: str, *, timeout_s: float = 1.0, max_output_bytes: int = 4096) -> Outcome:
    """Run one abuse in the sandbox and check the host afterwards."""
    if kind not in KINDS:
        raise ValueError(f"unknown sandbox kind {kind!r}; use one of {KINDS}")
    iso = isolation()
    secret = secrets.token_hex(16)
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"  # an odd sleep length nobody uses
    outside_dir = tempfile.mkdtemp(prefix="hybridmoe-outside-")  # this user's, mode 0700
    paths = {"outside": os.path.join(outside_dir, "pwned"), "world": f"/tmp/hybridmoe-pwned-{secret[:8]}"}
    decoy = subprocess.Popen(["sleep", "60"], start_new_session=True)
    old = os.environ.get(SECRET_NAME)
    os.environ[SECRET_NAME] = secret
    session = None
    try:
        fields = {**paths, "name": SECRET_NAME, "pid": os.getpid(), "decoy": decoy.pid, "marker": marker}
        start = time.monotonic()
        if kind == "python":
            r = run_python(abuse.python.format(**fields), "assert pwned", timeout_s=timeout_s,
                           max_output_bytes=max_output_bytes)  # fmt: skip
            went_through = r.passed
        else:
            session = ShellSession(timeout_s=timeout_s, max_output_bytes=max_output_bytes, max_processes=16)
            mine = len(processes_of(session.uid if session.uid is not None else os.getuid()))
            r = session.run(abuse.shell.format(**fields, many=16 + mine + 2))
            went_through = "PWNED" in r.stdout
        seconds = time.monotonic() - start
        signs = [f"it printed PWNED / passed: {r.stdout[-200:]!r}"] if went_through else []
        signs += [f"{path} was written" for path in paths.values() if os.path.lexists(path)]
        if session is not None and os.path.lexists(os.path.join(os.path.dirname(session.path), "escape")):
            signs.append("../escape was written")
        if decoy.poll() is not None:
            signs.append("the decoy process was killed")
        if secret in r.stdout + r.stderr or (session is not None and secret in str(session.files())):
            signs.append("the host's secret environment variable was read")
        if len(r.stdout.encode()) > max_output_bytes or len(r.stderr.encode()) > max_output_bytes:
            signs.append("the output exceeded its cap")
        left = _processes_with(marker)
        if session is not None and session.uid is not None:
            left += processes_of(session.uid)
        if left:
            signs.append(f"processes left after the run: {left}")
        if not _can_fork():
            signs.append("the host cannot start a process")
    finally:
        for pid in _processes_with(marker):  # only where the sandbox failed (or was turned off by a test)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if session is not None:
            session.close()
        decoy.kill()
        decoy.wait()
        shutil.rmtree(outside_dir, ignore_errors=True)
        for path in paths.values():
            if os.path.lexists(path):
                os.unlink(path)
        if old is None:
            os.environ.pop(SECRET_NAME, None)
        else:
            os.environ[SECRET_NAME] = old
    contained = not signs
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    detail = "; ".join(signs) if signs else (errors[-1][-200:] if errors else "")
    return Outcome(
        abuse.name, kind, contained, _how(r, abuse, kind) if contained else "", round(seconds, 3),
        expected(abuse, kind, iso), detail,
    )  # fmt: skip


def _how(r, abuse: Abuse, kind: str) -> str:
    text = r.stderr + r.stdout
    if r.timed_out:
        return "timeout"
    if any(s in text for s in ("MemoryError", "File too large", "Resource temporarily unavailable", "Cannot fork",
                               "Out of space", "Cannot allocate", "can't fork")) or r.returncode in (
        -signal.SIGXFSZ, -signal.SIGXCPU, -signal.SIGSEGV,
    ):  # fmt: skip
        return "limit"
    if any(s in text for s in ("not allowed", "Permission denied", "PermissionError", "Operation not permitted",
                               "No module named", "Read-only file system")):  # fmt: skip
        return "refused"
    if any(s in text for s in ("No such process", "No such file")):
        return "isolated"
    return "cleaned"


def _processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def _can_fork() -> bool:
    try:
        return subprocess.run(["true"], timeout=10, env={"PATH": SHELL_PATH}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
