"""The terminal task domain: expected directories match what the commands really leave; the tool and verify go
through a sandboxed session per task."""

import gc
import json
import os

from hybridmoe.envs.sandbox import ShellResult
from hybridmoe.tasks import get_domain, terminal
from hybridmoe.tasks.terminal import SUFFIXES, check_files, format_result


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


def test_recovery_demonstrations_fail_for_real_then_leave_the_answer():
    d = get_domain("terminal")
    kinds, mistakes, none = set(), [], 0
    for seed in range(30):
        task = d.generate(seed, 1)
        demo = d.recovery(task)
        command = json.loads(task.solution[0]["tool_calls"][0]["function"]["arguments"])["command"]
        if demo is None:  # only the steps that name no file they read: create, delete, and reading by a glob
            assert command.startswith(("echo ", "rm -f")) or ".* " in command, command
            none += 1
            continue
        failed, error, fix, done, final = demo
        assert failed["weight"] == 0 and "weight" not in fix and "weight" not in final  # the retry is the target
        assert error["content"].endswith(("[exit code 1]", "[exit code 2]")) and "No such file" in error["content"]
        assert (
            done["content"] == "[exit code 0]"
            and error["tool_call_id"] == "call_1"
            and done["tool_call_id"] == "call_2"
        )
        wrong = json.loads(failed["tool_calls"][0]["function"]["arguments"])["command"]
        right = json.loads(fix["tool_calls"][0]["function"]["arguments"])["command"]
        assert wrong != command and right in command and wrong.split()[0] == command.split()[0]
        assert right == command or command.startswith("mkdir ")  # move: the folder was made before mv failed
        kinds.add(command.split()[0])
        (gone,) = set(command.split()) - set(wrong.split())  # the one name copied wrongly
        (typed,) = set(wrong.split()) - set(command.split())
        mistakes.append("suffix" if gone.rsplit(".", 1)[0] == typed.rsplit(".", 1)[0] else "stem")
        assert typed.rsplit(".", 1)[1] in SUFFIXES
        assert f"There is no {typed}: the file is {gone}." in fix["reasoning_content"]
        # replayed in the task's own session, the two commands leave exactly the expected directory
        d.run_tool(task, "shell", {"command": wrong})
        d.run_tool(task, "shell", {"command": right})
        assert d.verify(task, "Done.") == 1.0
        assert d.recovery(task) == demo  # drawn from the task's seed
        d.close(task)
    assert kinds == {"mv", "mkdir", "wc", "cat"} and 0 < none < 30
    assert 0.4 < mistakes.count("suffix") / len(mistakes) < 0.8 and "stem" in mistakes  # SUFFIX_SWAP_SHARE 0.6
    assert d.recovery(d.generate(0, 2)) is None  # one-step tasks only


def test_solutions_read_some_files_by_a_glob_that_leaves_the_answer(monkeypatch):
    d = get_domain("terminal")

    def generate(share: float) -> list:
        monkeypatch.setattr(terminal, "GLOB_SHARE", share)
        return [d.generate(seed, 3) for seed in range(60)]

    def globs(tasks) -> int:
        return sum(w.endswith(".*") for t in tasks for c in solution_commands(t) for w in c.split())

    default, plain, every = generate(terminal.GLOB_SHARE), generate(0.0), generate(1.0)
    assert globs(plain) == 0 and 0.15 < globs(default) / globs(every) < 0.35  # GLOB_SHARE 0.25 of the names read
    # the tasks themselves do not change with the share: only how the solutions name the files they read
    for task, other in zip(default, plain):
        assert (task.messages, task.answer, task.metadata) == (other.messages, other.answer, other.metadata)
    # every kind that reads a file, by a glob, run in the sandbox leaves the answer (count reads it through cat: sh
    # expands no glob after <)
    kinds = set()
    for task in every[:8]:
        for command in solution_commands(task):
            kinds.add(command.split()[0])
            assert d.run_tool(task, "shell", {"command": command}) == "[exit code 0]", command
        assert d.verify(task, "Done.") == 1.0, solution_commands(task)
        d.close(task)
    assert {"mkdir", "cat", "mv"} <= kinds and any("| wc -l >" in c for t in every for c in solution_commands(t))


def solution_commands(task) -> list[str]:
    return [json.loads(c["function"]["arguments"])["command"] for m in task.solution for c in m.get("tool_calls") or []]
