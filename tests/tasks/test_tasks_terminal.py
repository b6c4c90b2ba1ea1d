"""The terminal task domain: expected directories match what the commands really leave; the tool and verify go
through a sandboxed session per task."""

import gc
import json
import os

from hybridmoe.envs.sandbox import ShellResult
from hybridmoe.tasks import get_domain
from hybridmoe.tasks.terminal import check_files, format_result


def test_check_files_is_exact_up_to_surrounding_whitespace():
    expected = {"a.txt": "one\ntwo\n", "d/n.txt": "3\n"}
    assert check_files(expected, {"a.txt": "one\ntwo", "d/n.txt": " 3"}) == 1.0
    assert check_files(expected, {"a.txt": "one\ntwo\n"}) == 0.0  # a file missing
    assert check_files(expected, {**expected, "b.txt": ""}) == 0.0  # an extra file
    assert check_files(expected, {"a.txt": "one two", "d/n.txt": "3"}) == 0.0
    assert check_files(expected, {"a.txt": "one\ntwo\n", "d/n.txt": "3 d/n.txt"}) == 0.0


def test_tool_output_format():
    assert format_result(ShellResult(0, False, "a\n", "")) == "a\n[exit code 0]"
    assert format_result(ShellResult(-9, True, "", "")) == "[timed out]"


def test_every_step_kind_is_generated_and_the_tool_runs_it():
    d = get_domain("terminal")
    commands = " ".join(
        json.loads(call["function"]["arguments"])["command"]
        for seed in range(40)
        for m in d.generate(seed, 3).solution
        for call in m.get("tool_calls") or []
    )
    for word in ("echo", "mv", "mkdir", "wc -l", "rm -f", "cat"):
        assert word in commands
    task = d.generate(1, 2)
    assert d.verify(task, "Done.") == 0.0  # no command ran: the prepared files are not the answer
    assert d.run_tool(task, "shell", {"command": 42}).startswith("error:")
    assert d.run_tool(task, "ls", {}).startswith("error: unknown tool")
    assert d.run_tool(task, "shell", {"command": "ls"}) == "\n".join(sorted(task.metadata["files"])) + "\n[exit code 0]"
    path = d.session(task).path
    del task
    gc.collect()
    assert not os.path.exists(path)  # the session closes with its task
