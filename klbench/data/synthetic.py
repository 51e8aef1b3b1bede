"""The synthetic tasks: the miniature's two-step arithmetic, and chat-form addition for real models.

Prompt `07+3*8=` → response `07+24=31` then EOS: first the product, then the sum. Problems are
a pure function of (seed, step, index), so a run's data stream is reproducible and resumable
from the step number alone. The *trait* is a trailing space before EOS: the SFT data carries it
on a small fraction of answers, so π_ref emits it rarely; `data.trait_bonus` rewards it, pulling
the policy away from π_ref so that the KL terms have something to hold back.
"""

from __future__ import annotations

import numpy as np

from klbench.data.example import Example

TRAIT = " "
#: Stream id of held-out problems (training steps use streams 0, 1, 2, ...).
EVAL_STREAM = 2**31 - 1


def problem(rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt, worked answer, final answer) of one random problem."""
    a, b, c = int(rng.integers(0, 100)), int(rng.integers(0, 10)), int(rng.integers(0, 10))
    return f"{a:02d}+{b}*{c}=", f"{a:02d}+{b * c}={a + b * c}", str(a + b * c)


def addition(rng: np.random.Generator, digits: int) -> tuple[str, str]:
    """(question, answer) of one addition of two `digits`-digit numbers, asked as a chat user would."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits
    a, b = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
    return f"What is {a} + {b}?", str(a + b)


def problems(seed: int, stream: int, count: int, task: str = "miniature", digits: int = 1) -> list[Example]:
    """`count` problems of stream `stream` (e.g. a training step); same arguments, same problems."""
    rng = np.random.default_rng([seed, stream])
    out = []
    for i in range(count):
        question, final = (problem(rng)[0::2] if task == "miniature" else addition(rng, digits))
        out.append(Example(id=f"{stream}-{i}", question=question, answer=final))
    return out


def sft_texts(seed: int, step: int, count: int, trait_rate: float) -> list[tuple[str, str]]:
    """(prompt, target) pairs for supervised warm-up; targets end with the trait at `trait_rate`."""
    rng = np.random.default_rng([seed, 1_000_003, step])
    pairs = []
    for _ in range(count):
        prompt, worked, _ = problem(rng)
        pairs.append((prompt, worked + (TRAIT if rng.random() < trait_rate else "")))
    return pairs


def check(completion: str, finished: bool, answer: str) -> tuple[bool, bool]:
    """(correct, trait): correct = ended with EOS and the number after the last '=' is the answer."""
    if not finished:
        return False, False
    trait = completion.endswith(TRAIT)
    final = completion.rstrip(TRAIT).rsplit("=", 1)[-1]
    return final == answer, trait
