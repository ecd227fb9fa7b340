"""A synthetic reasoning-trace corpus in the OpenThoughts3 ``conversations`` format.

Deterministic from a seed. Each trace is a math, code or science problem, a ``<think>``
trace that mixes planning, working, hesitation ("Wait", "Hmm"), self-correction
("Actually, that's wrong"), verification ("Let me check") and connectives, then an answer.
A small share of traces is cut off inside the thinking (no ``</think>``), as real
length-capped generations are, so that the collector's handling of them is exercised.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAIN_WEIGHTS = {"math": 0.7, "code": 0.2, "science": 0.1}
TRUNCATED_SHARE = 0.03


@dataclass(frozen=True)
class Problem:
    question: str
    steps: list[str]
    check: str
    answer: str


def _math_problem(rng: random.Random) -> Problem:
    kind = rng.randrange(3)
    if kind == 0:
        a, x, b = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        c = a * x + b
        return Problem(
            question=f"Find the integer x such that {a}x + {b} = {c}.",
            steps=[
                f"We subtract {b} from both sides, so {a}x = {c} - {b} = {c - b}.",
                f"Then x = {c - b} / {a} = {x}.",
            ],
            check=f"{a} * {x} + {b} = {a * x} + {b} = {c}.",
            answer=str(x),
        )
    if kind == 1:
        n = rng.randint(3, 15)
        total = n * (n + 1) // 2
        return Problem(
            question=f"What is the sum of the integers from 1 to {n}?",
            steps=[
                "The sum of the first n integers is n(n + 1) / 2, "
                f"so the sum is {n} * {n + 1} / 2.",
                f"That gives {n * (n + 1)} / 2 = {total}.",
            ],
            check=f"for n = {n} the equation gives {total}, and the sum is an integer.",
            answer=str(total),
        )
    base, height = rng.randint(2, 20), rng.randint(2, 20)
    area = base * height / 2
    return Problem(
        question=f"A triangle has base {base} and height {height}. What is its area?",
        steps=[
            "The area of a triangle is \\frac{1}{2} times base times height.",
            f"So the area = {base} * {height} / 2 = {area:g}.",
        ],
        check=f"\\frac{{1}}{{2}} * {base} * {height} = {area:g}.",
        answer=f"{area:g}",
    )


def _code_problem(rng: random.Random) -> Problem:
    name = rng.choice(["total", "count_even", "longest", "reverse_list"])
    if name == "total":
        body = "def total(xs):\n    return sum(xs)"
        question = "Write a Python function total(xs) that returns the sum of a list."
    elif name == "count_even":
        body = (
            "def count_even(xs):\n    n = 0\n    for v in xs:\n"
            "        if v % 2 == 0:\n            n += 1\n    return n"
        )
        question = "Write a Python function count_even(xs) that counts the even numbers."
    elif name == "longest":
        body = "def longest(words):\n    return max(words, key=len)"
        question = "Write a Python function longest(words) that returns the longest word."
    else:
        body = (
            "def reverse_list(xs):\n    out = []\n    for i in range(len(xs) - 1, -1, -1):\n"
            "        out.append(xs[i])\n    return out"
        )
        question = "Write a Python function reverse_list(xs) without using slicing."
    return Problem(
        question=question,
        steps=[
            "The function should loop over the list and return the result.",
            f"A first version:\n{body}",
        ],
        check=f"print({name}([1, 2, 3, 4])) on a small list, and the empty list.",
        answer=f"```python\n{body}\n```",
    )


def _science_problem(rng: random.Random) -> Problem:
    kind = rng.randrange(2)
    if kind == 0:
        mass, velocity = rng.randint(1, 10), rng.randint(1, 10)
        energy = mass * velocity**2 / 2
        return Problem(
            question=(
                f"A ball of mass {mass} kg moves with velocity {velocity} m/s. "
                "What is its kinetic energy?"
            ),
            steps=[
                "The kinetic energy is one half times the mass times the velocity squared.",
                f"So the energy is {mass} * {velocity}^2 / 2 = {energy:g} joules.",
            ],
            check=f"the units: kg times (m/s)^2 gives joules, and {energy:g} joules.",
            answer=f"{energy:g} J",
        )
    mass, accel = rng.randint(1, 20), rng.randint(1, 10)
    return Problem(
        question=(
            f"What force is needed to give a mass of {mass} kg an acceleration of {accel} m/s^2?"
        ),
        steps=[
            "The force equals the mass times the acceleration.",
            f"So the force is {mass} * {accel} = {mass * accel} newtons.",
        ],
        check=f"the force on the mass: {mass} kg * {accel} m/s^2 = {mass * accel} N.",
        answer=f"{mass * accel} N",
    )


PROBLEMS: dict[str, Callable[[random.Random], Problem]] = {
    "math": _math_problem,
    "code": _code_problem,
    "science": _science_problem,
}

OPENINGS = [
    "Okay, let me think about this problem.",
    "Alright, so we need to solve this.",
    "Let me think step by step.",
]
PLANS = [
    "First, I will write down what we know. Next, we compute the result.",
    "My plan: first set up the relation, then solve it step by step.",
    "The approach is simple. First, recall the rule, and then apply it.",
    "A good strategy is to work through it one step at a time.",
]
HESITATIONS = [
    "Wait, is that right?",
    "Hmm, maybe I should look at this again.",
    "Wait, perhaps there is a simpler way.",
    "Hmm, that seems too easy.",
    "Wait, it might be probably fine, but I am unsure.",
    "Hmm, possibly I missed something.",
]
CORRECTIONS = [
    "Actually, that's wrong. I made a mistake in the last step.",
    "Oops, that is a mistake. Instead, let me redo it.",
    "Actually, scratch that. I was mistaken, so let me fix it.",
]
VERIFICATIONS = [
    "Let me check: {check}",
    "Let me verify the result: {check}",
    "To double-check, {check} Yes, I can confirm it.",
    "A quick sanity check: {check}",
]
ALTERNATIVES = [
    "Alternatively, we could think about it another way.",
    "Another approach would give the same answer, so this is fine.",
]
CONNECTIVES = [
    "Therefore, the result follows.",
    "So this is the answer, because the steps are consistent.",
    "Thus we have the value we need.",
]


def _trace(rng: random.Random, problem: Problem) -> str:
    parts = [rng.choice(OPENINGS), rng.choice(PLANS)]
    for i, step in enumerate(problem.steps):
        parts.append(step)
        if rng.random() < 0.6:
            parts.append(rng.choice(HESITATIONS))
        if i == 0 and rng.random() < 0.35:
            parts.append(rng.choice(CORRECTIONS))
            parts.append(step)
    parts.append(rng.choice(VERIFICATIONS).format(check=problem.check))
    if rng.random() < 0.5:
        parts.append(rng.choice(HESITATIONS))
        parts.append(rng.choice(VERIFICATIONS).format(check=problem.check))
    if rng.random() < 0.4:
        parts.append(rng.choice(ALTERNATIVES))
    parts.append(rng.choice(CONNECTIVES))
    return "\n\n".join(parts)


def generate_traces(n: int, seed: int) -> Iterator[dict[str, object]]:
    """Yield ``n`` corpus records, deterministic from ``seed``."""
    rng = random.Random(seed)
    domains = list(DOMAIN_WEIGHTS)
    weights = [DOMAIN_WEIGHTS[d] for d in domains]
    for i in range(n):
        domain = rng.choices(domains, weights)[0]
        problem = PROBLEMS[domain](rng)
        thinking = _trace(rng, problem)
        if rng.random() < TRUNCATED_SHARE:
            cut = len(thinking) * 2 // 3
            response = f"<think>\n{thinking[:cut]}"
        else:
            if domain == "code":
                answer = problem.answer
            else:
                answer = f"**Final Answer**\n\\boxed{{{problem.answer}}}"
            response = f"<think>\n{thinking}\n</think>\n\n{answer}"
        yield {
            "id": f"synthetic-{i:05d}",
            "domain": domain,
            "conversations": [
                {"from": "human", "value": problem.question},
                {"from": "gpt", "value": response},
            ],
        }


def write_corpus(path: Path, n: int, seed: int) -> int:
    """Write ``n`` synthetic traces as JSONL to ``path``; returns the count written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in generate_traces(n, seed):
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
