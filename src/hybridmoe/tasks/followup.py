"""Multi-turn follow-ups: the prompt holds an earlier user/assistant exchange and a follow-up question about it.

Difficulty 1: continue a calculation ("Now multiply that by 3.") or recall a fact the user gave; 2: a sorted list
the assistant gave and a question about it, or a fact plus a small calculation (age in N years); 3: two earlier
exchanges and a follow-up that needs both answers. The trace names what it takes from the history. Numbers are
compared exactly; recalled names must be the answer, or a sentence holding it and none of the other facts given.
"""

from __future__ import annotations

import random

from .base import Domain, Task
from .common import NAMES, assistant, made_up_name, user, value_reward

PETS = ("dog", "cat", "parrot", "rabbit", "horse", "goat")
_THEN = {"*": "Now multiply that by {c}.", "+": "Now add {c} to that.", "-": "Now subtract {c} from that."}
_APPLY = {"*": lambda x, c: x * c, "+": lambda x, c: x + c, "-": lambda x, c: x - c}


def _calculation(rng: random.Random):
    a, b, c, op = rng.randint(1, 50), rng.randint(1, 50), rng.randint(2, 20), rng.choice("*+-")
    first, result = a + b, _APPLY[op](a + b, c)
    history = [user(f"What is {a} + {b}?"), assistant(str(first))]
    trace = f"The last answer was {first}. {first} {op} {c} = {result}."
    return history, _THEN[op].format(c=c), str(result), trace, None


def _recall(rng: random.Random):
    name, town, pet_name = rng.choice(NAMES), made_up_name(rng, rng.randint(2, 3)), made_up_name(rng)
    pet = rng.choice(PETS)
    history = [user(f"My name is {name}, I live in {town}, and my {pet} is called {pet_name}."),
               assistant(f"Nice to meet you, {name}!")]  # fmt: skip
    facts = {"name": name, "town": town, "pet": pet_name}
    key, question, said = rng.choice([
        ("name", "What is my name?", f"your name is {name}"),
        ("town", "Where do I live?", f"you live in {town}"),
        ("pet", f"What is my {pet} called?", f"your {pet} is called {pet_name}"),
    ])  # fmt: skip
    distractors = [v for k, v in facts.items() if k != key]
    return history, question, facts[key], f"Earlier you said {said}.", distractors  # a name: distractors, not None


def _sorted_list(rng: random.Random):
    xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 6))]
    s = sorted(xs)
    history = [user(f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}."),
               assistant(", ".join(map(str, s)))]  # fmt: skip
    i = rng.randrange(len(s) - 1)
    question = f"What is the sum of the numbers in positions {i + 1} and {i + 2} of your answer?"
    trace = f"My answer was {', '.join(map(str, s))}. {s[i]} + {s[i + 1]} = {s[i] + s[i + 1]}."
    return history, question, str(s[i] + s[i + 1]), trace, None


def _age(rng: random.Random):
    name, age, years = rng.choice(NAMES), rng.randint(5, 80), rng.randint(2, 30)
    history = [user(f"I am {name} and I am {age} years old."), assistant(f"Hello {name}!")]
    trace = f"You said you are {age}. {age} + {years} = {age + years}."
    return history, f"How old will I be in {years} years?", str(age + years), trace, None


def _two_answers(rng: random.Random):
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    x, y = a * b, c + d
    history = [user(f"What is {a} * {b}?"), assistant(str(x)), user(f"And {c} + {d}?"), assistant(str(y))]
    if rng.random() < 0.5:
        trace = f"The answers were {x} and {y}. {x} + {y} = {x + y}."
        return history, "Add your two answers together.", str(x + y), trace, None
    trace = f"The answers were {x} and {y}. {x} - {y} = {x - y}."
    return history, "Subtract your second answer from your first.", str(x - y), trace, None


LEVELS = {1: (_calculation, _recall), 2: (_sorted_list, _age), 3: (_two_answers,)}


class Followup(Domain):
    name = "followup"
    description = "answer a follow-up question about an earlier exchange in the conversation"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        history, question, answer, trace, distractors = rng.choice(LEVELS[difficulty])(rng)
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[*history, user(question)],
            answer={"value": answer, "numeric": distractors is None, "distractors": distractors or []},
            solution=[assistant(answer, trace)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return value_reward(task.answer, completion)
