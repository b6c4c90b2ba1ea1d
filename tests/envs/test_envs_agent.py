"""The agent loop (`hybridmoe.envs.agent.run_episodes`) with a scripted Generator: token-in-token-out assembly
(loss_mask 1 exactly on generated tokens, log-probs aligned, tool turns masked and rendered as the template writes
them), the step and token limits, error isolation, groups and weight versions; then one end-to-end run of a tiny
random model through `EngineGenerator`, whose log-probs must equal the model's own on the assembled sequence.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from itertools import groupby

import pytest
import torch
from test_server import make_checkpoint
from test_tasks_eval import ScriptedEngine

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.data.tokenizer import load_tokenizer
from hybridmoe.envs import Completion, EngineGenerator, Environment, Reward, make_envs, run_episodes
from hybridmoe.envs.agent import ENVIRONMENTS, play
from hybridmoe.envs.calculator import CalculatorEnv
from hybridmoe.serve.chat import render_chat
from hybridmoe.serve.sampling import SamplingParams
from hybridmoe.tasks import split_seeds

GREEDY = SamplingParams(temperature=0.0)
SEEDS = list(split_seeds("heldout", 4))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


class FakeGenerator:
    """Writes `script(prompt_text)` (text, then `<|im_end|>` unless the script returns (text, False)), with log-prob
    -(k + 1) / 1000 for its k-th token overall, so alignment is checkable; `fail(prompt_text)` gives an error."""

    def __init__(self, tok, script, fail=lambda text: False, version=0, bump=0):
        self.tok, self.script, self.fail, self.version, self.bump = tok, script, fail, version, bump
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []
        self.k = 0

    def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], params))
        out = []
        for p in prompts:
            text = self.tok.decode(p, skip_special_tokens=False)
            if self.fail(text):
                out.append(Completion([], [], "error", self.version))
                continue
            answer = self.script(text)
            answer, close = answer if isinstance(answer, tuple) else (answer, True)
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            finish = "length"
            if close:
                ids, finish = ids + [self.tok.convert_tokens_to_ids("<|im_end|>")], "stop"
            logprobs = [-(self.k + i + 1) / 1000 for i in range(len(ids))]
            self.k += len(ids)
            out.append(Completion(ids, logprobs, finish, self.version))
        self.version += self.bump
        return out


def question(text: str) -> str:
    return re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S)[0]


def call_block(name: str, **arguments) -> str:
    """A tool call as the chat template writes it (so the rendered conversation equals the assembled tokens)."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>\n"


def check_alignment(traj, generated_logprobs=None):
    """loss_mask is 1 exactly where log-probs were given; the masked-out positions carry 0.0."""
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    for m, lp in zip(traj.loss_mask, traj.logprobs):
        assert m in (0, 1) and (lp < 0 if m else lp == 0.0)
    if generated_logprobs is not None:
        assert [lp for m, lp in zip(traj.loss_mask, traj.logprobs) if m] == generated_logprobs


def test_one_turn_answer_is_prompt_then_generated_tokens(tok):
    env = make_envs("math")
    answers = {s: env["math"].reset(s).task.answer for s in SEEDS}
    by_question = {env["math"].reset(s).task.messages[0]["content"]: s for s in SEEDS}
    gen = FakeGenerator(tok, lambda text: f"thinking\n</think>\nThe answer is {answers[by_question[question(text)]]}.")
    trajs = run_episodes(env, [("math", s) for s in SEEDS], gen, tok, params=GREEDY, max_new_tokens=64)
    assert len(gen.calls) == 1 and len(gen.calls[0][0]) == 4  # one batched round
    params = gen.calls[0][1]
    assert params.logprobs == 0 and params.max_tokens == 64 and tok.convert_tokens_to_ids("<|im_end|>") in (
        params.stop_token_ids)  # fmt: skip
    k = 0
    for s, traj in zip(SEEDS, trajs):
        prompt = render_chat(tok, env["math"].reset(s).task.messages, reasoning=True)
        n = len(prompt.token_ids)
        assert traj.token_ids[:n] == prompt.token_ids and traj.loss_mask[:n] == [0] * n
        generated = traj.token_ids[n:]
        assert traj.loss_mask[n:] == [1] * len(generated)
        assert tok.decode(generated).startswith("thinking\n</think>")
        check_alignment(traj, [-(k + i + 1) / 1000 for i in range(len(generated))])
        k += len(generated)
        assert traj.reward == 1.0 and traj.components == {"correct": 1.0} and traj.finish_reason == "stop"
        assert traj.env == "math" and traj.seed == s and traj.num_tool_calls == 0
        assert traj.messages[-1] == {"role": "assistant", "content": f"The answer is {answers[s]}.",
                                     "reasoning_content": "thinking"}  # fmt: skip


def calculator_script(text: str) -> str:
    """Calls the calculator with the task's expression, then answers with the tool's result."""
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
    if results:
        return f"I read it.\n</think>\n{results[-1]}"
    expression = re.search(r"compute (.*?)\.", question(text)).group(1)
    return "I will call it.\n</think>\n" + call_block("calculator", expression=expression)


def test_tool_turns_are_rendered_by_the_template_and_masked(tok):
    envs = make_envs(["calculator"])
    gen = FakeGenerator(tok, calculator_script, version=3, bump=1)
    trajs = run_episodes(envs, [("calculator", s) for s in SEEDS], gen, tok, params=GREEDY, max_new_tokens=200,
                         group_offset=10)  # fmt: skip
    assert len(gen.calls) == 2  # two rounds, every episode in each
    for i, (s, traj) in enumerate(zip(SEEDS, trajs)):
        task = envs["calculator"].reset(s).task
        assert traj.reward == 1.0 and traj.components == {"answer": 1.0, "arguments": 1.0}
        assert traj.num_tool_calls == 1 and traj.finish_reason == "stop" and traj.group == 10 + i
        assert traj.weight_version == 3  # the oldest of the two rounds' versions (3 and 4)
        # The assembled tokens are exactly the template's rendering of the whole conversation (which the final
        # stop token ends)...
        rendered = render_chat(tok, traj.messages, tools=task.tools, add_generation_prompt=False).text
        assert tok.decode(traj.token_ids, skip_special_tokens=False) + "\n" == rendered
        assistant, tool, final = traj.messages[len(task.messages) :]
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"])["expression"] in task.messages[0][
            "content"]  # fmt: skip
        assert tool["role"] == "tool" and tool["content"] == task.answer and final["content"] == task.answer
        # ...and loss_mask marks the two generated turns: prompt 0, turn 1, tool turn + header 0, turn 2, then end.
        spans = [(m, len(list(g))) for m, g in groupby(traj.loss_mask)]
        assert [m for m, _ in spans] == [0, 1, 0, 1]
        masked = tok.decode([t for t, m in zip(traj.token_ids, traj.loss_mask) if not m], skip_special_tokens=False)
        assert "<tool_response>" in masked and "I will call it" not in masked
        tool_part = tok.decode(traj.token_ids[sum(n for _, n in spans[:2]) : sum(n for _, n in spans[:3])],
                               skip_special_tokens=False)  # fmt: skip
        assert tool_part == f"\n<|im_start|>user\n<tool_response>\n{task.answer}\n</tool_response>\n<|im_end|>\n" \
                            "<|im_start|>assistant\n<think>\n"  # fmt: skip
        check_alignment(traj)
    # the second round's prompts are the first round's prompts + generated turn + tool turn, token for token
    first, second = gen.calls
    for p1, p2 in zip(first[0], second[0]):
        assert p2[: len(p1)] == p1


class Gathering(CalculatorEnv):
    """A calculator whose tool waits until `n` calls are in flight at once (a barrier): its episodes get their
    tool's result only when the agent loop runs a round's tool calls side by side."""

    def __init__(self, n: int):
        super().__init__()
        self.barrier = threading.Barrier(n, timeout=5)

    def call_tool(self, episode, name, arguments):
        self.barrier.wait()  # raises BrokenBarrierError (the episode fails) when fewer than n calls arrive
        return super().call_tool(episode, name, arguments)


def test_a_rounds_tool_calls_run_side_by_side(tok):
    requests = [("calculator", s) for s in SEEDS]
    serial = run_episodes(make_envs(["calculator"]), requests, FakeGenerator(tok, calculator_script), tok,
                          params=GREEDY, max_new_tokens=200, workers=1)  # fmt: skip
    gathered = run_episodes({"calculator": Gathering(len(SEEDS))}, requests, FakeGenerator(tok, calculator_script),
                            tok, params=GREEDY, max_new_tokens=200, workers=len(SEEDS))  # fmt: skip
    assert [t.finish_reason for t in gathered] == ["stop"] * len(SEEDS)  # every call passed the barrier

    def same(t):  # the tool call ids are random
        return {k: v for k, v in dataclasses.asdict(t).items() if k != "messages"}, [m["content"] for m in t.messages]

    assert [same(t) for t in gathered] == [same(t) for t in serial]
    assert all(t.reward == 1.0 for t in serial)
    with pytest.raises(ValueError, match="workers >= 1"):
        run_episodes(make_envs(["calculator"]), requests, FakeGenerator(tok, calculator_script), tok, params=GREEDY,
                     workers=0)  # fmt: skip


def test_reasoning_off_renders_an_empty_thinking_block(tok):
    envs = make_envs(["calculator"])
    script = lambda text: calculator_script(text).split("</think>\n", 1)[1]  # noqa: E731
    trajs = run_episodes(envs, [("calculator", SEEDS[0])], FakeGenerator(tok, script), tok, params=GREEDY,
                         reasoning=False)  # fmt: skip
    traj = trajs[0]
    text = tok.decode(traj.token_ids, skip_special_tokens=False)
    assert text.count("<|im_start|>assistant\n<think></think>") == 2 and traj.reward == 1.0


def test_step_limit_ends_the_episode_and_bad_arguments_get_an_error_text(tok):
    envs = make_envs(["calculator"])
    envs["calculator"].max_tool_calls = 2
    gen = FakeGenerator(tok, lambda text: '</think>\n<tool_call>\n{"name": "calculator", "arguments": "1+1"}\n'
                                          "</tool_call>")  # fmt: skip
    (traj,) = run_episodes(envs, [("calculator", SEEDS[0])], gen, tok, params=GREEDY, max_new_tokens=500)
    assert len(gen.calls) == 3 and traj.num_tool_calls == 3 and traj.finish_reason == "length"
    tools = [m for m in traj.messages if m["role"] == "tool"]
    assert len(tools) == 2 and all(m["content"].startswith("error: the arguments of calculator")
                                   for m in tools)  # fmt: skip
    assert traj.reward == 0.0 and traj.components["arguments"] == 0.0
    assert [m for m, _ in groupby(traj.loss_mask)] == [0, 1, 0, 1, 0, 1]


def test_token_limit_cuts_the_turn(tok):
    envs = make_envs("math")
    gen = FakeGenerator(tok, lambda text: "word " * 50)
    (traj,) = run_episodes(envs, [("math", SEEDS[0])], gen, tok, params=GREEDY, max_new_tokens=7)
    assert sum(traj.loss_mask) == 7 and traj.finish_reason == "length" and traj.reward == 0.0
    check_alignment(traj, [-(i + 1) / 1000 for i in range(7)])
    # a tool-calling turn that hits the limit is not run: the episode ends
    envs = make_envs(["calculator"])
    gen = FakeGenerator(tok, calculator_script)
    (traj,) = run_episodes(envs, [("calculator", SEEDS[0])], gen, tok, params=GREEDY, max_new_tokens=3)
    assert len(gen.calls) == 1 and traj.finish_reason == "length" and sum(traj.loss_mask) == 3


class Flaky(Environment):
    """Seed 1: the tool raises; seed 2: verify raises; seed 3: reset raises; others: fine."""

    name, max_tool_calls = "flaky", 2

    def reset(self, seed, difficulty=1):
        if seed == 3:
            raise RuntimeError("no such task")
        env = make_envs(["calculator"])["calculator"]
        episode = env.reset(SEEDS[0], difficulty)
        episode.env, episode.state["seed"] = self.name, seed
        return episode

    def call_tool(self, episode, name, arguments):
        if episode.state["seed"] == 1:
            raise RuntimeError("tool crashed")
        return "42"

    def verify(self, episode, answer):
        if episode.state["seed"] == 2:
            raise ValueError("verifier tripped")
        return Reward(float(answer == "42"))

    def close(self, episode):
        episode.state["closed"] = True


def test_errors_stay_with_their_episode(tok):
    env = Flaky()

    def script(text):
        if "<tool_response>" in text:
            return "</think>\n42"
        return "</think>\n" + call_block("calculator", expression="6 * 7")

    gen = FakeGenerator(tok, script)
    rollouts = play({"flaky": env}, [("flaky", s) for s in range(5)], gen, tok, params=GREEDY, max_new_tokens=200)
    by_seed = {r.seed: r for r in rollouts}
    assert by_seed[0].finish_reason == "stop" and by_seed[0].reward.total == 1.0 and by_seed[0].error is None
    assert "tool crashed" in by_seed[1].error and "verifier tripped" in by_seed[2].error
    assert "no such task" in by_seed[3].error and by_seed[3].episode is None
    for s in (1, 2, 3):
        traj = by_seed[s].trajectory()
        assert traj.finish_reason == "error" and traj.reward == 0.0
        check_alignment(traj)
    assert all(r.episode.state["closed"] for r in rollouts if r.episode is not None)
    # a generator error for one request ends only that episode
    gen = FakeGenerator(tok, script, fail=lambda text: "<tool_response>" in text)
    trajs = run_episodes({"flaky": env, **make_envs("math")}, [("flaky", 0), ("math", SEEDS[0])], gen, tok,
                         params=GREEDY, max_new_tokens=200)  # fmt: skip
    assert trajs[0].finish_reason == "error" and trajs[0].reward == 0.0 and sum(trajs[0].loss_mask) > 0
    assert trajs[1].finish_reason == "stop"


def test_groups_and_bad_requests(tok):
    gen = FakeGenerator(tok, lambda text: "</think>\n1")
    trajs = run_episodes(make_envs("math"), [("math", SEEDS[0]), ("math", SEEDS[1])], gen, tok, params=GREEDY,
                         group_size=3, group_offset=5)  # fmt: skip
    assert [(t.seed, t.group) for t in trajs] == [(SEEDS[0], 5)] * 3 + [(SEEDS[1], 6)] * 3
    with pytest.raises(ValueError, match="environment 'code', which is not among the given ones: math"):
        run_episodes(make_envs("math"), [("code", 1)], gen, tok, params=GREEDY)
    with pytest.raises(ValueError, match="difficulty 4 is outside 1..3 for environment 'math'"):
        run_episodes(make_envs("math"), [("math", 1)], gen, tok, params=GREEDY, difficulty=4)
    with pytest.raises(ValueError, match="unknown environment 'nope'; known: math"):
        make_envs("math,nope")
    assert set(make_envs()) == set(ENVIRONMENTS) >= {"math", "code", "calculator", "retrieval", "structured",
                                                     "instructions"}  # fmt: skip


def test_end_to_end_with_a_tiny_random_model(checkpoint, tok):
    model = HybridMoEForCausalLM.from_pretrained(checkpoint)

    def script(text, params):  # the calculator task is forced through a tool round; math is the model's own
        if "Use the calculator" not in text:
            return None
        results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
        expression = re.search(r"compute (.*?)\.", text).group(1)
        return results[-1] if results else call_block("calculator", expression=expression)

    engine = ScriptedEngine(model, tok, script, max_num_seqs=4, max_model_len=1024, prefill_chunk=256)
    gen = EngineGenerator(engine, weight_version=7)
    envs = make_envs(["math", "calculator"])
    trajs = run_episodes(envs, [("math", SEEDS[0]), ("calculator", SEEDS[1])], gen, tok, params=GREEDY,
                         group_size=2, max_new_tokens=96)  # fmt: skip
    assert len(trajs) == 4 and not engine.has_unfinished()
    assert trajs[0].token_ids == trajs[1].token_ids  # greedy: a group's samples agree
    calc = trajs[2]
    assert calc.num_tool_calls == 1 and calc.reward == 1.0 and calc.finish_reason == "stop"
    for traj in trajs:
        assert traj.weight_version == 7 and 0 < sum(traj.loss_mask) <= 96
        check_alignment(traj)
        # the engine's log-probs are the model's own on the assembled sequence, at every generated token
        with torch.no_grad():
            logits = model(torch.tensor([traj.token_ids])).logits[0].float()
        own = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(traj.token_ids[1:])[:, None])[:, 0]
        mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(traj.logprobs[1:])[mask], own[mask], atol=2e-4, rtol=1e-4)
