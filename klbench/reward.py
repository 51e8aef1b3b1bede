"""Rewards: score one completion against its example.

`build_reward(cfg)` returns a `RewardFn(completion, finished, example) -> Scored`, chosen by `data.reward`:

  arithmetic           the synthetic task's checker: the exact final answer followed by EOS
                       (+ data.trait_bonus for π_ref's rare trailing space)
  math                 math-verify: the completion's answer (its last \\boxed{} first, else the
                       last expression) is parsed and checked against the gold answer for
                       mathematical equivalence; 1 if equivalent, + data.format_reward when the
                       completion puts an answer in \\boxed{}. A completion cut at max_new_tokens
                       (finished=False) is scored on its text like any other when
                       data.score_truncated=true (an answer boxed before the cut counts), and
                       gets 0 otherwise.
  auto                 arithmetic for the miniature's task, math for addition and datasets
  'module:function'    your own function with the RewardFn signature; it returns a Scored or a
                       number (then correct = number > 0). The module is imported from
                       PYTHONPATH or the current directory.

math-verify runs in a persistent helper process (`MathVerifier`), started when the reward is
built: math-verify's own timeouts are SIGALRM-based, which only works in a process's main thread
and cannot interrupt a computation stuck in C code (a huge power, a pathological regex). Here a
call that takes longer than data.reward_timeout_s kills the helper, scores 0 (reward/verify_timeout
counts them) and a fresh helper is started; the run never hangs or crashes on what a policy writes.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from klbench.config import ConfigError, DataConfig
from klbench.data import synthetic
from klbench.data.example import Example
from klbench.data.sources import last_boxed
from klbench.errors import KlbenchError

log = logging.getLogger(__name__)


@dataclass
class Scored:
    reward: float
    correct: bool
    extras: dict[str, float] = field(
        default_factory=dict
    )  # per-sample diagnostics, averaged into reward/<key>
    answer: str | None = None  # the completion's extracted final answer (evaluation files, maj@k), if known


RewardFn = Callable[[str, bool, Example], Scored]


def reward_kind(cfg: DataConfig) -> str:
    """arithmetic | math | custom: what `data.reward` means for this data."""
    if cfg.reward == "auto":
        return "arithmetic" if cfg.source == "synthetic" and cfg.task == "miniature" else "math"
    return cfg.reward if cfg.reward in ("arithmetic", "math") else "custom"


# -- the synthetic task ---------------------------------------------------------------------------
def arithmetic_reward(trait_bonus: float) -> RewardFn:
    """1 for the exact final answer followed by EOS; + trait_bonus for π_ref's rare trailing space."""

    def score(completion: str, finished: bool, example: Example) -> Scored:
        correct, trait = synthetic.check(completion, finished, example.answer)
        answer = completion.rstrip(synthetic.TRAIT).rsplit("=", 1)[-1] if finished else None
        return Scored(float(correct) + trait_bonus * trait, correct, {"trait": float(trait)}, answer)

    return score


# -- math-verify in a helper process ----------------------------------------------------------------
#: Seconds a fresh helper may take to import sympy + math-verify and say it is ready.
STARTUP_TIMEOUT_S = 120.0
#: Extracted answers longer than this are cut in messages and files (they are garbage anyway).
MAX_ANSWER_CHARS = 500


@dataclass(frozen=True)
class Verdict:
    correct: bool
    answer: str | None  # what math-verify extracted from the completion (its matched text)
    boxed: bool  # the completion has a non-empty \boxed{...}
    timed_out: bool = False


class MathVerifier:
    """Client of a helper process that runs math-verify's `parse` and `verify` (see module docstring).

    Thread-safe (one request at a time). The helper exits when this process does (its stdin closes).
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._buf = b""
        self._ready = False
        self._lock = threading.Lock()
        self.timeouts = 0
        self.restarts = 0

    # helper lifecycle
    def start(self) -> None:
        """Start the helper now (it imports in the background while the caller goes on)."""
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the helper
        self._proc = subprocess.Popen([sys.executable, "-m", "klbench.reward", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=root,
            close_fds=True)
        self._buf = b""
        self._ready = False

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._proc.stdin.close()
                    self._proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            return lines[-1] if lines else "no output"
        except (OSError, ValueError, AttributeError):
            return "no output"

    def _readline(self, deadline: float) -> bytes | None:
        """One line from the helper before `deadline`; None on timeout; b'' if it died."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _ensure_ready(self) -> None:
        self._spawn()
        if self._ready:
            return
        line = self._readline(time.monotonic() + STARTUP_TIMEOUT_S)
        if not line:
            tail = self._stderr_tail()
            self._kill()
            raise KlbenchError(
                f"the math-verify helper process did not start ({tail}); "
                "check that `python -c 'import math_verify'` works (pip install math-verify)"
            )
        self._ready = True

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The helper's answer to `payload`, or None when it took longer than `timeout_s` (helper restarted)."""
        with self._lock:
            self._ensure_ready()
            data = json.dumps(payload).encode() + b"\n"
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
                line = self._readline(time.monotonic() + timeout_s)
            except (BrokenPipeError, OSError):
                line = b""
            if line:
                return json.loads(line)
            if line is None:
                self.timeouts += 1
                log.warning(
                    "math-verify took longer than data.reward_timeout_s=%gs; scored 0, helper restarted "
                    "(%d time(s) so far)",
                    timeout_s,
                    self.timeouts,
                )
            else:
                log.warning("the math-verify helper died (%s); scored 0, helper restarted",
                    self._stderr_tail())
            self.restarts += 1
            self._kill()
            self._spawn()  # warm up the next helper while the caller goes on
            return None

    # the operations
    def judge(self, gold: str, completion: str, timeout_s: float) -> Verdict:
        """Is `completion`'s answer equivalent to `gold` (a final answer such as `\\frac{1}{2}` or `18`)?"""
        res = self.request({"op": "judge", "gold": gold, "pred": completion}, timeout_s)
        if res is None:
            return Verdict(False, None, _has_box(completion), timed_out=True)
        return Verdict(bool(res["correct"]), res["answer"], _has_box(completion))

    def extract(self, completion: str, timeout_s: float) -> str | None:
        """The answer math-verify extracts from `completion` (None if none)."""
        res = self.request({"op": "extract", "pred": completion}, timeout_s)
        return None if res is None else res["answer"]

    def same(self, a: str, b: str, timeout_s: float) -> bool:
        """Are two extracted answers mathematically equivalent (for majority voting)? False on timeout."""
        if a == b:
            return True
        res = self.request({"op": "same", "a": a, "b": b}, timeout_s)
        return bool(res and res["same"])


def _has_box(text: str) -> bool:
    return last_boxed(text) is not None


_VERIFIER: MathVerifier | None = None


def verifier() -> MathVerifier:
    """The process-wide math-verify helper (started on first use)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = MathVerifier()
        atexit.register(_VERIFIER.close)
    return _VERIFIER


def math_reward(timeout_s: float = 5.0, format_reward: float = 0.0, score_truncated: bool = True) -> RewardFn:
    """1 when math-verify finds the completion's answer equivalent to the gold one (+ format_reward if boxed)."""
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise KlbenchError("data.reward=math needs math-verify: pip install 'math-verify>=0.7'")
    mv = verifier()
    mv.start()

    def score(completion: str, finished: bool, example: Example) -> Scored:
        if not finished and not score_truncated:
            return Scored(0.0, False, {"boxed": 0.0, "verify_timeout": 0.0})
        v = mv.judge(example.answer, completion, timeout_s)
        reward = float(v.correct) + format_reward * v.boxed
        return Scored(reward, v.correct, {"boxed": float(v.boxed), "verify_timeout": float(v.timed_out)},
            v.answer)

    return score


# -- your own ----------------------------------------------------------------------------------------
def _import(spec: str):
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # after PYTHONPATH and site-packages: a local file never shadows them
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if module_name != e.name and not module_name.startswith(f"{e.name}."):
            raise ConfigError(f"data.reward={spec!r}: importing {module_name} failed ({e})") from e
        raise ConfigError(
            f"data.reward={spec!r}: no module {module_name!r} on PYTHONPATH or in the current "
            "directory; set data.reward='package.module:function'"
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(
            f"data.reward={spec!r}: importing {module_name} failed ({type(e).__name__}: {e})"
        ) from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"data.reward={spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def custom_reward(spec: str) -> RewardFn:
    """Import 'module:function' and check that it can be called as fn(completion, finished, example)."""
    fn = _import(spec)
    if not callable(fn):
        raise ConfigError(f"data.reward={spec!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("", True, Example("0", "", ""))
    except TypeError as e:
        raise ConfigError(
            f"data.reward={spec!r} must accept (completion: str, finished: bool, example: Example); "
            f"its signature is {inspect.signature(fn)}"
        ) from e
    except ValueError:  # builtins without a signature: let them be
        pass

    def score(completion: str, finished: bool, example: Example) -> Scored:
        try:
            out = fn(completion, finished, example)
        except Exception as e:  # noqa: BLE001 - the user's code: name it, the example and the error
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise KlbenchError(f"data.reward={spec!r} raised {type(e).__name__}: {first} on example {example.id!r}; "
                               "fix the function (klbench passes (completion, finished, example))") from e
        if isinstance(out, Scored):
            return out
        if isinstance(out, (bool, int, float)):
            return Scored(float(out), float(out) > 0)
        raise KlbenchError(
            f"data.reward={spec!r} returned a {type(out).__name__}; return klbench.reward.Scored or a number"
        )

    return score


def build_reward(cfg: DataConfig) -> RewardFn:
    kind = reward_kind(cfg)
    if kind == "arithmetic":
        return arithmetic_reward(cfg.trait_bonus)
    if kind == "math":
        return math_reward(cfg.reward_timeout_s, cfg.format_reward, cfg.score_truncated)
    return custom_reward(cfg.reward)


# -- the helper process's side -------------------------------------------------------------------------
def _serve() -> None:
    """Answer judge/extract/same requests, one JSON object per line on stdin/stdout, until stdin closes."""
    from collections import OrderedDict
    from functools import lru_cache

    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing but protocol lines on the pipe
    logging.disable(logging.CRITICAL)  # math-verify logs every failed parse with its whole input
    from math_verify import parse, verify

    def answer_of(parsed: list) -> str | None:
        if not parsed:
            return None
        text = parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])
        return text[:MAX_ANSWER_CHARS]

    @lru_cache(maxsize=4096)
    def parse_boxed(answer: str) -> list:
        return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)

    parsed_preds: OrderedDict[str, list] = OrderedDict()  # extracted answer -> parse, for `same`

    def parse_pred(pred: str) -> tuple[list, str | None]:
        parsed = parse(pred, parsing_timeout=None)
        answer = answer_of(parsed)
        if answer is not None:
            parsed_preds[answer] = parsed
            parsed_preds.move_to_end(answer)
            while len(parsed_preds) > 4096:
                parsed_preds.popitem(last=False)
        return parsed, answer

    def judge(req: dict) -> dict:
        pred, answer = parse_pred(req["pred"])
        gold = parse_boxed(req["gold"])
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        return {"correct": bool(ok), "answer": answer}

    def extract(req: dict) -> dict:
        return {"answer": parse_pred(req["pred"])[1]}

    def same(req: dict) -> dict:
        a = parsed_preds.get(req["a"]) or parse_boxed(req["a"])
        b = parsed_preds.get(req["b"]) or parse_boxed(req["b"])
        return {"same": bool(a) and bool(b) and bool(verify(a, b, timeout_seconds=None))}

    ops = {"judge": judge, "extract": extract, "same": same}
    judge(
        {"gold": "\\frac{1}{2}", "pred": "so $x = \\boxed{0.5}$"}
    )  # pay sympy's first-call costs before "ready"
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            res = ops[req["op"]](req)
        except Exception as e:  # noqa: BLE001 - a bad input scores 0, it never stops the helper
            res = {"correct": False, "answer": None, "same": False, "error": f"{type(e).__name__}: {e}"[:200]}
        proto.write(json.dumps(res) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
