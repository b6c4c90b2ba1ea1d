"""SFT files from the task domains, and the `hybridmoe tasks` commands."""

import json
import re

import pytest

from hybridmoe.cli import main
from hybridmoe.tasks import DOMAINS, get_domain, write_sft_jsonl


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_write_sft_jsonl_interleaves_domains(tmp_path):
    path = tmp_path / "sft.jsonl"
    summary = write_sft_jsonl(path, {"arithmetic": 3, "calculator": 2}, difficulty=2, offset=5)
    records = read(path)
    assert summary["records"] == 5 and len(records) == 5
    assert [r["domain"] for r in records] == ["arithmetic", "calculator", "arithmetic", "calculator", "arithmetic"]
    assert [r["seed"] for r in records if r["domain"] == "arithmetic"] == [5, 6, 7]
    assert records[0] == get_domain("arithmetic").generate(5, 2).to_sft()
    assert records[1]["tools"][0]["function"]["name"] == "calculator"
    assert [p.name for p in tmp_path.iterdir()] == ["sft.jsonl"]  # no temporary file left behind


def test_heldout_split_and_bad_arguments(tmp_path):
    path = tmp_path / "heldout.jsonl"
    write_sft_jsonl(path, {"lists": 2}, split="heldout")
    assert [r["seed"] for r in read(path)] == [1_000_000_000, 1_000_000_001]
    with pytest.raises(ValueError, match="unknown task domain"):
        write_sft_jsonl(tmp_path / "x.jsonl", {"lists": 1, "nope": 1})
    with pytest.raises(ValueError, match="whole number"):
        write_sft_jsonl(tmp_path / "x.jsonl", {"lists": -1})
    with pytest.raises(ValueError, match="unknown split"):
        write_sft_jsonl(tmp_path / "x.jsonl", {"lists": 1}, split="test")
    with pytest.raises(ValueError, match=r"recovery_share=1.5 must be in \[0, 1\]"):
        write_sft_jsonl(tmp_path / "x.jsonl", {"lists": 1}, recovery_share=1.5)
    assert not (tmp_path / "x.jsonl").exists()


def test_recovery_share_replaces_terminal_demonstrations_only(tmp_path):
    plain = write_sft_jsonl(tmp_path / "plain.jsonl", {"terminal": 40, "lists": 5})
    mixed = write_sft_jsonl(tmp_path / "mixed.jsonl", {"terminal": 40, "lists": 5}, recovery_share=0.5)
    assert plain["recovery_demonstrations"] == {}
    a, b = read(tmp_path / "plain.jsonl"), read(tmp_path / "mixed.jsonl")
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert 5 < len(changed) == mixed["recovery_demonstrations"]["terminal"] < 30
    for x, y in changed:
        assert x["domain"] == "terminal" and x["seed"] == y["seed"]
        prompt = len(x["messages"]) - 3  # a one-step solution: call, output, answer
        assert y["messages"][:prompt] == x["messages"][:prompt] and y["messages"][prompt]["weight"] == 0
    all_of_them = write_sft_jsonl(tmp_path / "all.jsonl", {"terminal": 40}, recovery_share=1.0)
    # every one-step task whose command names a file it reads (not create, delete, or reading by a glob only)
    terminal = get_domain("terminal")
    names_a_file = 0
    for r in a:
        if r["domain"] == "terminal":
            files = terminal.generate(r["seed"], 1).metadata["files"]
            command = json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"])["command"]
            names_a_file += any(w in files for w in re.split(r"[\s/]+", command))
    assert all_of_them["recovery_demonstrations"]["terminal"] == names_a_file > 15


def test_cli_tasks_write_and_show(tmp_path, capsys):
    out = tmp_path / "tasks.jsonl"
    assert main(["tasks", "write", str(out), "--domains", "strings,followup", "--per-domain", "2"]) == 0
    assert [r["domain"] for r in read(out)] == ["strings", "followup", "strings", "followup"]
    assert main(["tasks", "write", str(out), "--per-domain", "1"]) == 0  # all domains
    assert len(read(out)) == len(DOMAINS)
    capsys.readouterr()
    args = ["tasks", "write", str(out), "--domains", "terminal", "--per-domain", "10", "--recovery-share", "1"]
    assert main(args) == 0
    assert "(1 domains x 10, train split, difficulty 1, 5 of terminal recovering from a failed call)" in (
        capsys.readouterr().out
    )
    assert sum(any(m.get("weight") == 0 for m in r["messages"]) for r in read(out)) > 0
    assert main(["tasks", "show", "calculator", "--seed", "3", "--difficulty", "3"]) == 0
    shown = capsys.readouterr().out
    assert "tool call] calculator" in shown and "[tool]" in shown and "difficulty 3" in shown
    assert main(["tasks", "show", "lists", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["domain"] == "lists"
    assert main(["tasks", "show", "nope"]) == 2
    assert "unknown task domain" in capsys.readouterr().err
