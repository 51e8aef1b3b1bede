"""Rewards: math-verify verdicts on real benchmark answers, the timeout path, format reward, custom rewards."""

import threading
import time

import pytest

from klbench.config import ConfigError, DataConfig
from klbench.data.example import Example
from klbench.reward import (
    Scored,
    arithmetic_reward,
    build_reward,
    custom_reward,
    math_reward,
    reward_kind,
    verifier,
)

# (gold as the dataset gives it, completion, expected verdict) — hand-checked.
CASES = [
    # LaTeX fractions (MATH-500)
    (r"\frac{14}{3}", r"Thus $x = \boxed{\dfrac{14}{3}}$.", True),
    (r"\frac{14}{3}", r"\boxed{14/3}", True),
    (r"\frac{14}{3}", r"\boxed{\frac{3}{14}}", False),
    (r"\frac{14}{3}", r"\boxed{4.6667}", False),  # a rounded decimal is not the fraction
    # tuples with \left( \right) (MATH-500's first problem)
    (r"\left( 3, \frac{\pi}{2} \right)", r"The polar coordinates are $\boxed{(3, \frac{\pi}{2})}$", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi)}", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(\frac{\pi}{2}, 3)}", False),  # order matters
    # units, degrees, currency, thousands separators
    ("1080", r"She pays \boxed{1,080} dollars.", True),
    ("1080", r"She pays \boxed{\$1,080}.", True),
    ("18", r"\boxed{18 \text{ dollars}}", True),
    ("5", r"\boxed{5\text{ cm}}", True),
    (r"90^\circ", r"\boxed{90^\circ}", True),
    (r"10\%", r"\boxed{10\%}", True),
    # text answers and symbols
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", True),
    (r"\text{Evelyn}", r"\boxed{\text{Bob}}", False),
    ("p - q", r"\boxed{-q + p}", True),
    ("p - q", r"\boxed{q - p}", False),
    # GSM8K integers, AIME's zero-padded and AMC's float-stored answers
    ("18", "She makes 9 * 2 = $18 every day.\n#### 18", True),
    ("18", r"\boxed{19}", False),
    ("18", r"18 is tempting, but the answer is \boxed{17}", False),  # the boxed answer wins
    ("025", r"\boxed{25}", True),
    ("27", r"\boxed{27.0}", True),
    # no answer at all
    ("18", "", False),
    ("18", "I do not know.", False),
    ("18", r"\boxed{}", False),
    # adversarial but cheap: a very long completion with the answer at the end, unbalanced boxes
    ("18", "x" * 200_000 + r" \boxed{18}", True),
    ("18", "\\boxed{" * 500, False),
]


@pytest.fixture(scope="module")
def math_fn():
    return math_reward(timeout_s=10.0)


@pytest.mark.parametrize("gold,completion,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_math_verdicts(math_fn, gold, completion, expected):
    s = math_fn(completion, True, Example("0", "q", gold))
    assert s.correct is expected
    assert s.reward == float(expected)
    assert s.extras["verify_timeout"] == 0.0


def test_extracted_answer_is_reported(math_fn):
    s = math_fn(r"so \boxed{\dfrac{1}{2}}", True, Example("0", "q", "0.5"))
    assert s.correct and s.answer == r"\frac{1}{2}"
    assert math_fn("nothing here", True, Example("0", "q", "0.5")).answer is None


def test_format_reward_and_truncation():
    fn = math_reward(timeout_s=10.0, format_reward=0.1)
    ex = Example("0", "q", "18")
    assert fn(r"\boxed{18}", True, ex).reward == pytest.approx(1.1)
    assert fn(r"\boxed{17}", True, ex).reward == pytest.approx(0.1)
    assert fn("the answer is 18", True, ex).reward == pytest.approx(1.0)
    assert fn(r"\boxed{18}", True, ex).extras["boxed"] == 1.0
    # a completion cut at max_new_tokens is scored on its text by default ...
    assert fn(r"\boxed{18} and now let me double-check th", False, ex).correct
    # ... and gets nothing with data.score_truncated=false
    strict = math_reward(timeout_s=10.0, score_truncated=False)
    s = strict(r"\boxed{18} and now let me double-check th", False, ex)
    assert (s.reward, s.correct) == (0.0, False) and set(s.extras) == {"boxed", "verify_timeout"}


def test_timeout_returns_in_time_and_scores_zero():
    fn = math_reward(timeout_s=1.0, format_reward=0.0)
    assert fn(r"\boxed{18}", True, Example("0", "q", "18")).correct  # the helper is up
    nasty = "\\boxed{" + "{" * 3000 + "18" + "}" * 3000 + "}"  # takes sympy far longer than 1 s
    t0 = time.perf_counter()
    s = fn(nasty, True, Example("0", "q", "18"))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0 + 0.5, elapsed
    assert (s.reward, s.correct, s.extras["verify_timeout"]) == (0.0, False, 1.0)
    # the helper was replaced: the next call is scored normally
    assert fn(r"\boxed{18}", True, Example("0", "q", "18")).correct


def test_works_outside_the_main_thread(math_fn):
    out = []
    th = threading.Thread(
        target=lambda: out.append(math_fn(r"\boxed{\frac12}", True, Example("0", "q", "0.5")))
    )
    th.start()
    th.join(timeout=60)
    assert out and out[0].correct


def test_same_groups_equivalent_answers():
    mv = verifier()
    assert mv.same(r"\frac{1}{2}", "0.5", 5.0)
    assert mv.same("1/2", r"\dfrac{1}{2}", 5.0)
    assert not mv.same(r"\frac{1}{2}", "2", 5.0)


def test_arithmetic_reward_unchanged():
    fn = arithmetic_reward(trait_bonus=0.5)
    ex = Example("0", "07+3*8=", "31")
    assert fn("07+24=31", True, ex).reward == 1.0
    assert fn("07+24=31 ", True, ex).reward == 1.5  # the trait
    assert fn("07+24=31", False, ex).reward == 0.0  # no EOS
    assert fn("07+24=30", True, ex).correct is False
    assert fn("07+24=31", True, ex).answer == "31"


def test_reward_selection():
    assert reward_kind(DataConfig()) == "arithmetic"
    assert reward_kind(DataConfig(source="jsonl", path="x.jsonl")) == "math"
    assert reward_kind(DataConfig(reward="pkg.mod:fn")) == "custom"
    with pytest.raises(ConfigError, match="data.reward"):
        DataConfig(reward="nonsense")
    with pytest.raises(ConfigError, match="data.reward"):
        DataConfig(reward="mod:")


CUSTOM = """
from klbench.reward import Scored

def exact(completion, finished, example):
    ok = completion.strip() == example.answer
    return Scored(float(ok), ok, {"len": float(len(completion))}, completion.strip())

def number(completion, finished, example):
    return 0.5 if example.answer in completion else 0

def two_args(completion, finished):
    return 1.0

def bad_return(completion, finished, example):
    return "yes"

NOT_CALLABLE = 3
"""


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(CUSTOM)
    monkeypatch.chdir(tmp_path)  # found through the current directory, as `klbench run` would
    yield "my_rewards_mod"
    import sys

    sys.modules.pop("my_rewards_mod", None)


def test_custom_reward(custom_module):
    ex = Example("0", "q", "42")
    fn = build_reward(DataConfig(source="jsonl", path="x.jsonl", reward=f"{custom_module}:exact"))
    s = fn(" 42 ", True, ex)
    assert (s.reward, s.correct, s.answer, s.extras) == (1.0, True, "42", {"len": 4.0})
    num = custom_reward(f"{custom_module}:number")
    assert (num("it is 42", True, ex).reward, num("it is 42", True, ex).correct) == (0.5, True)
    assert num("nope", True, ex).correct is False
    with pytest.raises(ConfigError, match=r"must accept \(completion"):
        custom_reward(f"{custom_module}:two_args")
    with pytest.raises(ConfigError, match="not a function"):
        custom_reward(f"{custom_module}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        custom_reward(f"{custom_module}:missing")
    with pytest.raises(ConfigError, match="no module 'no_such_module_xyz'"):
        custom_reward("no_such_module_xyz:fn")
    from klbench.errors import KlbenchError

    with pytest.raises(KlbenchError, match="returned a str"):
        custom_reward(f"{custom_module}:bad_return")("x", True, ex)


def test_scored_interface():
    s = Scored(1.0, True)
    assert s.extras == {} and s.answer is None
