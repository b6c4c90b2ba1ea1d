"""What a new user copies from the READMEs works: every `hybridmoe` command in their shell blocks is one the CLI
accepts (recipes that load and validate with their overrides, task domains and environments that exist), every
`python benchmarks/...` command one its script's parser accepts, the README's set-up installs what CI installs, and
the weekly newest-releases job (.ci/newest) names test files that exist.

Commands are checked, not run: argparse, the recipe loader and the name resolvers each fail before any model loads.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybridmoe.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "benchmarks/README.md")


def arguments(command: str) -> list[str]:
    """The arguments of a README command, without what the READMEs write around them rather than into them: `&` (in
    the background), `...` (the flags above) and optional flags in brackets (`[--ep E]`)."""
    out, optional = [], False
    for token in shlex.split(command, comments=True)[1:]:
        optional = optional or token.startswith("[-")
        if not optional and token not in ("&", "..."):
            out.append(token)
        optional = optional and not token.endswith("]")
    return out


def shell_commands(text: str, program: str = "hybridmoe") -> list[str]:
    """The lines of the ```bash / ```sh / bare ``` blocks that start with `program`, continuation lines joined."""
    commands, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block = [] if line.strip() in ("```", "```bash", "```sh") else "other"
            else:
                if block != "other":
                    commands += _joined(block)
                block = None
        elif block is not None and block != "other":
            block.append(line)
    return [c for c in commands if c.startswith(program + " ")]


def _joined(lines: list[str]) -> list[str]:
    out, current = [], ""
    for line in lines:
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        out.append(current)
        current = ""
    return out + ([current] if current else [])


def _readme_commands() -> list[tuple[str, str]]:
    return [(name, c) for name in READMES for c in shell_commands((ROOT / name).read_text())]


def test_the_commands_are_found():
    found = _readme_commands()
    assert len(found) > 20 and any("hybridmoe speedrun" in c for _, c in found)
    text = "```bash\nhybridmoe sft r.yaml a=1 \\\n    b=2   # note\n```\n```python\nhybridmoe x\n```\n"
    assert shell_commands(text) == ["hybridmoe sft r.yaml a=1 b=2   # note"]
    assert arguments("hybridmoe x --a 1 [--b] [--c C] ... 'k=[1, 2]' &  # c") == ["x", "--a", "1", "k=[1, 2]"]


@pytest.mark.parametrize("readme,command", _readme_commands(), ids=lambda v: " ".join(v.split()[:3]))
def test_a_readme_command_is_one_the_cli_accepts(readme, command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes/... paths are relative to the repository
    argv = arguments(command)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{readme}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
    if args.command in ("pretrain", "sft", "rl", "distill"):
        from hybridmoe.train.config import DistillRecipe, Recipe, RLRecipe, SFTRecipe

        recipe_class = {"pretrain": Recipe, "sft": SFTRecipe, "rl": RLRecipe, "distill": DistillRecipe}[args.command]
        recipe_class.from_yaml(args.recipe, args.overrides).validate()
    if getattr(args, "domains", None) and args.command == "eval":
        from hybridmoe.eval.tasks import resolve_domains

        resolve_domains(args.domains, args.difficulty)
    if getattr(args, "domains", None) and args.command == "tasks" and args.domains != "all":
        from hybridmoe.tasks import get_domain

        for name in args.domains.split(","):
            get_domain(name.strip())
    if getattr(args, "envs", None):
        from hybridmoe.eval.envs import resolve_envs

        resolve_envs(args.envs, args.difficulty)


# Runs each benchmark script as `__main__` until its parser has parsed (argparse's own errors exit with 2 before
# that), in one subprocess: the scripts import their heavy modules and set threads at the top, none of which
# should reach the test process.
_PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(Exception):
    pass

parse_args = argparse.ArgumentParser.parse_args

def parse_and_stop(self, *args, **kwargs):
    parse_args(self, *args, **kwargs)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_and_stop
errors = {}
for i, argv in enumerate(json.loads(sys.argv[1])):
    sys.argv, err = argv, io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(argv[0], run_name="__main__")
        errors[i] = "ran to the end without parsing its arguments"
    except Parsed:
        pass
    except SystemExit as e:
        errors[i] = f"exit {e.code}: {err.getvalue().strip()[-500:]}"
print(json.dumps(errors))
"""


def test_the_benchmark_commands_are_ones_their_scripts_accept():
    commands = [
        (name, c)
        for name in READMES
        for c in shell_commands((ROOT / name).read_text(), program="python")
        if c.split()[1].startswith("benchmarks/")
    ]
    assert len(commands) > 30
    argvs = [arguments(c) for _, c in commands]
    missing = [c for (_, c), argv in zip(commands, argvs) if not (ROOT / argv[0]).is_file()]
    assert not missing, f"README commands name benchmark scripts that do not exist: {missing}"
    proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {f"{commands[int(i)][0]}: {commands[int(i)][1]}": e for i, e in errors.items()}
    assert not bad, bad


def test_the_readme_installs_what_ci_installs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    torch_pin = re.search(r"pip install --quiet (torch==\S+)", ci).group(1)
    assert f"pip install {torch_pin}\n" in readme
    assert '-c .ci/constraints.txt -e ".[test]"' in ci
    assert 'pip install -c .ci/constraints.txt -e ".[test]"' in readme
    # The pinned transformers lies in the range pyproject allows (the range .ci/newest tests the top of).
    from packaging.specifiers import SpecifierSet

    pinned = re.search(r"^transformers==(\S+)$", (ROOT / ".ci" / "constraints.txt").read_text(), re.M).group(1)
    allowed = re.search(r'"transformers([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned in SpecifierSet(allowed), (pinned, allowed)


def test_the_readme_runs_the_tests_as_ci_does():
    """The README's test command (in "First commands" and "Tests") is CI's, less CI's `-x` and `--durations`."""
    ci = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest"))
    ci_args = [a for a in shlex.split(ci, comments=True) if a != "-x" and not a.startswith("--durations")]
    readme = (ROOT / "README.md").read_text()
    tests = readme[readme.index("## Tests") :]
    block = tests[tests.index("```bash\n") + len("```bash\n") : tests.index("```", tests.index("```bash\n") + 7)]
    first = readme[readme.index("## First commands") :]
    first_line = next(line for line in first.splitlines() if line.startswith("python -m pytest"))
    for line in (block.strip(), first_line):
        assert shlex.split(line, comments=True) == ci_args, (line, ci)


def test_the_newest_releases_job_names_tests_that_exist():
    script = (ROOT / ".ci" / "newest").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if line.startswith("python -m pytest"))
    paths = [a for a in shlex.split(line) if a.startswith("tests")]
    assert paths
    missing = [p for p in paths if not list(ROOT.glob(p))]
    assert not missing, f".ci/newest runs tests that do not exist: {missing}"


def test_the_using_the_model_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using the model") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Using the model)", "exec"), namespace)
    tokens = namespace["tokens"]
    assert tokens.shape[0] == 2 and 16 < tokens.shape[1] <= 16 + 32 and (tmp_path / "ckpt" / "config.json").exists()
    assert namespace["big"].config.num_hidden_layers > 100
