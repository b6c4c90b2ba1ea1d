"""Shell tasks over a prepared directory: the model calls a `shell` tool and is scored by what the directory holds
afterwards (the terminal environment of issue 14; Terminal-Bench checks its tasks the same way, by inspecting the
container's state after the agent stops, https://github.com/laude-institute/terminal-bench).

A task is a directory of a few small text files named with made-up words (`task.metadata["files"]`) and 1, 2 or 3
steps (the difficulty) drawn from: create a file holding a given line, rename a file, move a file into a new
folder, count a file's lines and write the count to a file, delete the files ending in .tmp, concatenate two files
into a new one. The generator applies each step to its own copy of the directory, so `task.answer` is the directory
the steps must leave (relative path -> text). The solution is one tool call per step, in the OpenAI tool-call shape
of `tasks/calculator.py`, each followed by the tool's real output (these commands print nothing: "[exit code 0]").
A command names a file it reads by its full name, or (`GLOB_SHARE` of the time, drawn by seed apart from the task
itself) by the glob of its stem, `fame.*`: the stems in a directory are unique, so the glob matches that one file,
and a model that cannot copy a suffix reliably has another way to the answer that works (the speedrun's SFT models
wrote `fame.txt` for `fame.log` in most of their terminal failures; benchmarks/README.md, issue 14).
`Terminal.recovery(task)` is another demonstration of a one-step task, for SFT data: a first command with a file name
copied wrongly (a message of weight 0: in the conversation, not a loss target), the sandbox's real error, then the
command that works, reasoned from the error. Without them the speedrun's SFT model never called the tool again after
a failed call, so RL had no retry to reinforce (benchmarks/README.md, issue 14 items 9 and 10).

Commands run only in the sandbox (`hybridmoe.envs.sandbox.ShellSession`), one session per task: `run_tool` opens it
on the task's first call (it closes when the task is garbage-collected, or with `close(task)`); the terminal
environment (`hybridmoe.envs.terminal`) holds its own per episode. `verify` ignores the final text and compares the
session's directory with `task.answer`: the same set of regular files, each with the same text up to surrounding
whitespace (so `wc -l < f` and `echo 3` write the same count). Reward 1 or 0; extra files fail the task.
"""

from __future__ import annotations

import json
import random
import re
import weakref

from ..envs.sandbox import ShellResult, ShellSession
from .base import Domain, Task
from .common import assistant, made_up_word, user

TOOL = {
    "type": "function",
    "function": {
        "name": "shell",
        "description": "Run one command with /bin/sh in the task's working directory; returns its output.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "for example: ls -l"}},
            "required": ["command"],
        },
    },
}
TIMEOUT_S = 5.0
SUFFIXES = ("txt", "log", "tmp")  # the prepared files' suffixes
# Of the wrong names in recovery demonstrations, the share that keeps the stem and swaps the suffix (`fame.txt` for
# `fame.log`): 34 of the 60 wrong names the speedrun's SFT model wrote in its first calls did that, the rest made up
# a stem (benchmarks/README.md, issue 14 item 10).
SUFFIX_SWAP_SHARE = 0.6
# Of the file names a solution's commands read, the share written as the glob of the stem (module docstring).
GLOB_SHARE = 0.25


def format_result(result: ShellResult) -> str:
    """What the model reads back: stdout, stderr, then the exit status."""
    status = "timed out" if result.timed_out else f"exit code {result.returncode}"
    return f"{result.stdout}{result.stderr}[{status}]"


def run_shell(session: ShellSession, arguments) -> str:
    """The shell tool's output for a call's arguments; a malformed call gets an error text, never an exception."""
    if not isinstance(arguments, dict) or not isinstance(arguments.get("command"), str):
        return 'error: call shell with {"command": "<one shell command>"}'
    return format_result(session.run(arguments["command"]))


def check_files(expected: dict[str, str], files: dict[str, str]) -> float:
    """1.0 when `files` (a directory read back) holds exactly the expected files, texts equal up to surrounding
    whitespace; else 0.0."""
    if set(files) != set(expected):
        return 0.0
    return 1.0 if all(files[path].strip() == text.strip() for path, text in expected.items()) else 0.0


def _lines(rng: random.Random, n: int) -> str:
    return "".join(" ".join(made_up_word(rng) for _ in range(rng.randint(1, 3))) + "\n" for _ in range(n))


def _call(i: int, command: str) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": "shell", "arguments": json.dumps({"command": command})}}  # fmt: skip


def _output(i: int, text: str) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "name": "shell", "content": text}


class _Steps:
    """The directory as the generator tracks it, and the steps that change it; each step returns (instruction,
    command, reasoning) or None when it does not apply to the directory as it is. `globs` draws which names a command
    writes as a glob of the stem; it is not `rng`, so that the draws change the solutions only, never the tasks."""

    def __init__(self, rng: random.Random, files: dict[str, str], globs: random.Random):
        self.rng, self.files, self.globs = rng, dict(files), globs
        self.used = {name.split(".")[0] for name in files}

    def read(self, name: str) -> str:
        """How a command names the existing top-level file `name`: itself, or `GLOB_SHARE` of the time `stem.*`."""
        return f"{name.rsplit('.', 1)[0]}.*" if self.globs.random() < GLOB_SHARE else name

    def new_name(self) -> str:
        while (word := made_up_word(self.rng)) in self.used:
            pass
        self.used.add(word)
        return word

    def top(self, *suffixes: str) -> list[str]:
        return sorted(p for p in self.files if "/" not in p and p.endswith(suffixes))

    def create(self):
        name, word = f"{self.new_name()}.txt", made_up_word(self.rng, 3)
        self.files[name] = f"{word}\n"
        return f"Create a file {name} holding the line {word}.", f"echo {word} > {name}", "echo writes the line."

    def rename(self):
        a = self.rng.choice(self.top(".txt", ".log"))
        b = f"{self.new_name()}.{a.rsplit('.', 1)[1]}"
        self.files[b] = self.files.pop(a)
        return f"Rename {a} to {b}.", f"mv {self.read(a)} {b}", "mv renames it."

    def move(self):
        a, folder = self.rng.choice(self.top(".txt", ".log")), self.new_name()
        self.files[f"{folder}/{a}"] = self.files.pop(a)
        command = f"mkdir {folder} && mv {self.read(a)} {folder}/"
        return f"Move {a} into a new folder {folder}.", command, "mkdir, then mv."

    def count(self):
        a, out = self.rng.choice(self.top(".txt", ".log")), f"{self.new_name()}.txt"
        self.files[out] = f"{self.files[a].count(chr(10))}\n"
        source = self.read(a)  # sh does not expand a glob after <, so a glob is read by cat
        command = f"wc -l < {a} > {out}" if source == a else f"cat {source} | wc -l > {out}"
        return (f"Count the lines of {a} and write only the number to {out}.", command,
                "wc -l reading stdin prints just the number.")  # fmt: skip

    def delete(self):
        if not self.top(".tmp"):
            return None
        for name in self.top(".tmp"):
            del self.files[name]
        return "Delete every file ending in .tmp.", "rm -f -- *.tmp", "A glob matches them all."

    def concat(self):
        sources = self.top(".txt", ".log")
        if len(sources) < 2:
            return None
        a, b = self.rng.sample(sources, 2)
        out = f"{self.new_name()}.txt"
        self.files[out] = self.files[a] + self.files[b]
        command = f"cat {self.read(a)} {self.read(b)} > {out}"
        return f"Concatenate {a} and {b}, in that order, into a new file {out}.", command, "cat joins."


class Terminal(Domain):
    name = "terminal"
    description = "change files in a directory with shell commands; checked by inspecting the directory"

    def __init__(self):
        self._sessions: dict[int, ShellSession] = {}  # id(task) -> its session, while the task lives

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        files: dict[str, str] = {}
        steps = _Steps(rng, files, random.Random(f"terminal-glob-{seed}"))
        for suffix in ["txt", "txt", "log", "tmp"] + rng.sample(SUFFIXES, difficulty - 1):
            steps.files[f"{steps.new_name()}.{suffix}"] = _lines(rng, rng.randint(1, 5))
        initial = dict(steps.files)
        kinds = ["create", "rename", "move", "count", "delete", "concat"]
        planned = []
        while len(planned) < difficulty:
            step = getattr(steps, rng.choice(kinds))()
            if step is not None:
                planned.append(step)
        listing = ", ".join(sorted(initial))
        if difficulty == 1:
            todo = planned[0][0]
        else:
            todo = " ".join(f"{i + 1}. {instruction}" for i, (instruction, _, _) in enumerate(planned))
        question = f"The current directory holds {listing}. {todo} Use the shell tool; change nothing else."
        solution = []
        for i, (_, command, why) in enumerate(planned):
            reasoning = f"Step {i + 1}: {why}" if difficulty > 1 else why
            solution.append(assistant("", reasoning) | {"tool_calls": [_call(i + 1, command)]})
            solution.append(_output(i + 1, format_result(ShellResult(0, False, "", ""))))  # they print nothing
        solution.append(assistant("Done.", "Every command exited with code 0."))
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=steps.files,
            solution=solution, tools=[TOOL], metadata={"files": initial},
        )  # fmt: skip

    def recovery(self, task: Task) -> list[dict] | None:
        """The solution of a one-step task as a recovery from a failed call (module docstring): which file is named
        wrongly and how (its suffix swapped, `SUFFIX_SWAP_SHARE` of the time, else a made-up stem) are drawn from the
        task's seed. None where it does not apply: tasks of more than one step, steps that name no file they read
        (create, delete, and the solutions that read a file by a glob), or (never seen) an error-free or unrecoverable
        first try."""
        if task.difficulty != 1:
            return None
        first = task.solution[0]
        command = json.loads(first["tool_calls"][0]["function"]["arguments"])["command"]
        initial = task.metadata["files"]
        sources = [w for w in re.split(r"[\s/]+", command) if w in initial]
        if not sources:
            return None
        rng = random.Random(f"terminal-recovery-{task.seed}")
        right = rng.choice(sources)
        stem, suffix = right.rsplit(".", 1)
        others = [s for s in SUFFIXES if s != suffix and f"{stem}.{s}" not in initial]
        if others and rng.random() < SUFFIX_SWAP_SHARE:
            wrong = f"{stem}.{rng.choice(others)}"
        else:
            taken = {w.split(".")[0] for w in re.split(r"[\s/]+", command)} | {n.split(".")[0] for n in initial}
            while (stem := made_up_word(rng)) in taken:
                pass
            wrong = f"{stem}.{suffix}"
        failed = re.sub(rf"(?<![\w.]){re.escape(right)}(?![\w.])", wrong, command, count=1)
        fix, why = command, f"There is no {wrong}: the file is {right}."
        if command.startswith("mkdir ") and " && " in command:  # the folder was made before mv failed
            fix, why = command.split(" && ", 1)[1], f"{why} The folder exists now, so only mv is left."
        with ShellSession(initial, timeout_s=TIMEOUT_S) as session:
            error = session.run(failed)
            done = session.run(fix)
            if error.returncode == 0 or done.returncode != 0 or not check_files(task.answer, session.files()):
                return None
        return [
            assistant("", first.get("reasoning_content")) | {"tool_calls": [_call(1, failed)], "weight": 0},
            _output(1, format_result(error)),
            assistant("", why) | {"tool_calls": [_call(2, fix)]},
            _output(2, format_result(done)),
            assistant("Done.", "The second command exited with code 0."),
        ]

    def session(self, task: Task) -> ShellSession:
        """The task's shell session, opened on first use over `task.metadata["files"]`."""
        key = id(task)
        if key not in self._sessions:
            self._sessions[key] = ShellSession(task.metadata["files"], timeout_s=TIMEOUT_S)
            weakref.finalize(task, self.close_key, key)
        return self._sessions[key]

    def close_key(self, key: int) -> None:
        session = self._sessions.pop(key, None)
        if session is not None:
            session.close()

    def close(self, task: Task) -> None:
        self.close_key(id(task))

    def run_tool(self, task: Task, name: str, arguments: dict) -> str:
        if name != "shell":
            return f"error: unknown tool {name!r}; the only tool is shell"
        return run_shell(self.session(task), arguments)

    def verify(self, task: Task, completion: str) -> float:
        """The directory of the task's session (the prepared files when no command ran) against `task.answer`."""
        session = self._sessions.get(id(task))
        return check_files(task.answer, session.files() if session is not None else task.metadata["files"])
