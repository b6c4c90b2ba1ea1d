"""The sandbox for model-written Python: abuses are contained (reward 0) and leave this process and host alone."""

import os

import pytest

from hybridmoe.tasks.sandbox import run_python

FAST = {"timeout_s": 1.5, "memory_mb": 256, "max_output_bytes": 4096}


def run(code: str, tests: str = "") -> object:
    return run_python(code, tests, **FAST)


def test_passing_and_failing_tests():
    ok = run("def f(x):\n    print('hi')\n    return x + 1\n", "_check(f(1), 2)\nassert f(2) == 3\n")
    assert ok.passed and ok.returncode == 0 and ok.stdout == "hi\nhi\n"
    bad = run("def f(x):\n    return x\n", "_check(f(1), 2)")
    assert not bad.passed and "AssertionError" in bad.stderr
    assert not run("def f(x) return x", "_check(f(1), 1)").passed  # a syntax error


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos._exit(0)",  # leaving early with success must not pass
        "import sys\nsys.exit(0)",
        "class A:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return A()",  # equal to anything
        "def f(x):\n    return 2.0",  # right value, wrong type
        "import builtins\nbuiltins.AssertionError = KeyboardInterrupt\nbuiltins.type = lambda x: int\ndef f(x): pass",
    ],
)
def test_cheats_do_not_pass(code):
    assert not run(code, "_check(f(1), 2)").passed


def test_infinite_loop_and_sleep_are_killed():
    for code in ("while True:\n    pass", "import time\ntime.sleep(30)"):
        r = run(code)
        assert not r.passed and r.timed_out


def test_memory_bomb_is_refused():
    r = run("x = bytearray(2 * 1024**3)")
    assert not r.passed and "MemoryError" in r.stderr


def test_huge_output_is_capped():
    for code in ("print('x' * 10**8)", "while True:\n    print('y' * 1000)"):
        r = run(code)
        assert not r.passed and len(r.stdout.encode()) <= FAST["max_output_bytes"]


def test_no_new_processes():
    for code in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import os\nos.posix_spawn('/bin/true', ['true'], {})", "import ctypes"):  # fmt: skip
        assert not run(code).passed, code


def test_no_network():
    for code in ("import socket\nsocket.socket()", "import socket\nsocket.create_connection(('127.0.0.1', 80), 1)"):
        r = run(code)
        assert not r.passed and ("not allowed" in r.stderr or "Error" in r.stderr), r.stderr


def test_files_outside_the_working_directory_are_out_of_reach(tmp_path):
    outside = tmp_path / "pwned.txt"
    assert not run(f"open({str(outside)!r}, 'w').write('x')").passed
    assert not outside.exists()
    assert not run("import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())").passed
    assert not run("print(open('/etc/passwd').read())").passed
    inside = run(
        "open('note.txt', 'w').write('x')\nassert open('note.txt').read() == 'x'\nimport os\nprint(os.getcwd())"
    )
    assert inside.passed
    assert not os.path.exists(inside.stdout.strip())  # the temporary directory is gone


def test_the_host_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("HYBRIDMOE_SANDBOX_SECRET", "s3cret")
    assert not run(
        "import os\ndef f():\n    return os.environ.get('HYBRIDMOE_SANDBOX_SECRET')", "_check(f(), 's3cret')"
    ).passed
    assert not run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())").passed


def test_the_standard_library_still_works():
    code = (
        "import collections, dataclasses, enum, fractions, itertools, json, math, re, typing\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "@dataclasses.dataclass\nclass D:\n    x: int\n"
        "def f(x):\n    return D(P(x, 1).x).x + math.floor(2.5)\n"
    )
    assert run(code, "_check(f(1), 3)").passed
