"""The serving commands of the CLI: `hybridmoe generate`, `hybridmoe chat` (fed through stdin) and `hybridmoe serve`
(a subprocess on a free loopback port, queried with the openai client, then stopped with SIGTERM).

The checkpoint is test_server's: the `debug` preset with random weights and a small BPE tokenizer.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from test_server import make_checkpoint

from hybridmoe.cli import build_parser, main
from hybridmoe.serve import SamplingParams
from hybridmoe.serve.load import load_engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_generate_streams_the_engine_output(checkpoint, capsys):
    assert main(["generate", checkpoint, "--prompt", "The weather in", "--max-tokens", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    engine, tok = load_engine(checkpoint, max_num_seqs=1)
    (r,) = engine.generate([tok("The weather in", add_special_tokens=False)["input_ids"]],
                           SamplingParams(temperature=0, max_tokens=6))  # fmt: skip
    ids = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
    assert out == tok.decode(ids) + "\n"
    assert re.search(r"\[\d+ tokens in [\d.]+ s, [\d.]+ tokens/s; finish: (stop|length)\]", err)


def test_generate_speculative_prints_the_greedy_output_and_acceptance(checkpoint, tmp_path, capsys):
    assert main(["generate", checkpoint, "--prompt", "Hi", "--speculative", "2"]) == 2  # no MTP layer: clear error
    assert "num_nextn_predict_layers=0" in capsys.readouterr().err
    with_mtp = make_checkpoint(tmp_path / "mtp", mtp=True)
    args = ["generate", with_mtp, "--prompt", "The weather in", "--max-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == plain  # greedy speculation changes the speed, never the tokens
    assert re.search(r"2 drafts per step, acceptance [\d.]+%, [\d.]+ tokens per verification", err), err


def test_generate_chat_with_reasoning_budget(checkpoint, capsys):
    args = ["generate", checkpoint, "--prompt", "Weather?", "--chat", "--max-tokens", "8", "--temperature", "0"]
    assert main(args + ["--reasoning-budget", "0"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("<think>")  # budget 0: the thinking block closes at once; only the answer shows
    assert main(args + ["--reasoning-budget", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<think>\n") and "\n</think>\n" in out  # non-tty output marks the reasoning


def test_chat_reads_turns_and_commands_from_stdin(checkpoint, capsys, monkeypatch):
    turns = "Hello there\n/think off\nWhat is the weather in Paris?\n/bogus\n/reset\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    assert main(["chat", checkpoint, "--max-tokens", "5", "--temperature", "0", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert "reasoning on" in out and "reasoning off" in out and "conversation cleared" in out
    assert "unknown command /bogus" in out
    assert out.count("> ") == 6 and len(re.findall(r"tokens in", err)) == 2  # two replies, then /exit
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # end of input also ends the chat
    assert main(["chat", checkpoint, "--max-tokens", "2", "--no-reasoning"]) == 0


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "ckpt"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_an_address_it_cannot_listen_on_is_one_error_line_before_the_model_loads(checkpoint, capsys, monkeypatch):
    """A port in use, a host name that does not resolve: before, a traceback after the load (and an OverflowError
    for a port above 65535, now refused by the parser)."""
    import socket

    from hybridmoe.serve import load

    def not_yet(*args, **kwargs):
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(load, "load_engine", not_yet)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", checkpoint, "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    assert main(["serve", checkpoint, "--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert "error: cannot listen on no-such-host.invalid:0: " in capsys.readouterr().err


def test_serve_subprocess_answers_and_stops_on_sigterm(checkpoint):
    cmd = [sys.executable, "-m", "hybridmoe.cli", "serve", checkpoint, "--port", "0", "--max-model-len", "512",
           "--served-model-name", "tiny", "--grace", "5", "--max-stop", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYBRIDMOE_API_KEY="k3y")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "".join(seen)
        for _ in range(100):  # the line is printed just before uvicorn starts listening
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.05)
        with pytest.raises(openai.AuthenticationError):  # the key comes from HYBRIDMOE_API_KEY
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="at most 1"):  # --max-stop 1
            client.completions.create(model="tiny", prompt="Hi", stop=["a", "b"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_importing_the_package_does_not_import_the_web_stack():
    code = (
        "import sys, hybridmoe, hybridmoe.serve, hybridmoe.cli\n"
        "print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
