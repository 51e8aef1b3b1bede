"""Prompt sources: the synthetic arithmetic task and real datasets, behind one `Task`.

`build_task(cfg, tokenizer, seed)` returns a `Task` whose `batch(step, size)` is a pure function
of (seed, step): a run's data stream is reproducible and resumes from the step number alone.

For a dataset, the training rows are `data.split` (filtered, validated, then shuffled with the seed
when `data.shuffle`, and cut to `data.limit`). Steps walk through them epoch by epoch: position
p = (step - 1) * size + i of the stream is row `order_e[p mod n]` of epoch e = p // n, where
`order_e` is a fresh permutation drawn from (seed, e) (the identity when `data.shuffle=false`).
`build_eval_task` gives the held-out rows (`data.eval_split`, else `data.split`) in file order,
cut to `eval.limit`, so every seed and every checkpoint is evaluated on the same problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from klbench.config import DataConfig
from klbench.data import prompts, synthetic
from klbench.data.example import Example
from klbench.data.sources import load_examples
from klbench.errors import KlbenchError, warn

#: Held-out problems of the synthetic task when eval.limit is null.
SYNTHETIC_EVAL_SIZE = 500
# Stream tags of the data RNG (kept distinct from the synthetic task's streams).
_SUBSET_STREAM, _EPOCH_STREAM = 0x5EED, 0xE90C


@dataclass
class Task:
    name: str
    cfg: DataConfig
    seed: int
    tokenizer: object
    rows: list[Example] | None = None  # None: generated (synthetic)
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        if self.rows is None:
            raise TypeError("the synthetic task has no fixed size")
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch` (0-based): a permutation drawn from (seed, epoch)."""
        if epoch not in self._orders:
            n = len(self.rows)
            perm = (
                np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(n)
                if self.cfg.shuffle
                else np.arange(n)
            )
            if len(self._orders) >= 2:  # a batch spans at most two epochs once size <= n
                self._orders.pop(min(self._orders))
            self._orders[epoch] = perm
        return self._orders[epoch]

    def batch(self, step: int, size: int) -> list[Example]:
        """The `size` examples of training step `step` (1-based)."""
        if self.rows is None:
            return synthetic.problems(self.seed, step, size, self.cfg.task, self.cfg.digits)
        n = len(self.rows)
        start = (step - 1) * size
        return [self.rows[int(self.order(p // n)[p % n])] for p in range(start, start + size)]

    def prompt(self, ex: Example) -> str:
        return prompts.render(ex.question, self.cfg.prompt, self.tokenizer)

    def encode(self, ex: Example) -> list[int]:
        return prompts.encode(self.prompt(ex), self.cfg.prompt, self.tokenizer)


def _check_lengths(task: Task, max_tokens: int | None) -> Task:
    """Drop prompts longer than data.max_prompt_tokens, and (with a warning) those the model cannot take
    (`max_tokens`: its context beside the new tokens); none left is an error naming the longest."""
    if task.rows is None:
        return task
    limit = task.cfg.max_prompt_tokens
    lengths = [len(task.encode(ex)) for ex in task.rows]
    fits = [ex for ex, n in zip(task.rows, lengths) if (limit is None or n <= limit)
            and (max_tokens is None or n <= max_tokens)]
    too_long = [ex.id for ex, n in zip(task.rows, lengths) if max_tokens is not None and n > max_tokens
                and (limit is None or n <= limit)]
    if not fits:
        n, ex = max(zip(lengths, task.rows), key=lambda t: t[0])
        bound = f"data.max_prompt_tokens={limit}" if limit is not None and n > limit else \
            f"the model's context beside rollout.max_new_tokens ({max_tokens})"
        raise KlbenchError(f"{task.name}: no prompt fits: the longest, row {ex.id}, is {n} tokens, more than {bound}; "
                           "raise data.max_prompt_tokens, lower rollout.max_new_tokens or use a model with a longer "
                           "context")
    if too_long:
        warn(f"{task.name}: dropped {len(too_long)} prompt(s) longer than the model's context beside "
             f"rollout.max_new_tokens ({max_tokens} tokens), e.g. row {too_long[0]}; set data.max_prompt_tokens "
             "to choose the bound")
    task.rows = fits
    return task


def build_task(cfg: DataConfig, tokenizer, seed: int, *, rows: list[Example] | None = None,
               max_tokens: int | None = None) -> Task:
    """The training task of `cfg` (all rows loaded and checked now; `rows`: already loaded ones).
    `max_tokens`: the longest prompt the model can take (its context minus the new tokens)."""
    prompts.check(cfg.prompt, tokenizer)
    if cfg.source == "synthetic":
        return Task(cfg.name, cfg, seed, tokenizer)
    rows = load_examples(cfg, cfg.split) if rows is None else rows
    task = _check_lengths(Task(cfg.name, cfg, seed, tokenizer, list(rows)), max_tokens)
    if cfg.shuffle:
        perm = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(len(task.rows))
        task.rows = [task.rows[i] for i in perm]
    if cfg.limit is not None:
        task.rows = task.rows[: cfg.limit]
    return task


def build_eval_task(cfg: DataConfig, tokenizer, seed: int, limit: int | None) -> Task:
    """Held-out problems of `cfg`: `data.eval_split` (else `data.split`) in file order, the first `limit`.

    The synthetic task's held-out problems are its EVAL_STREAM (`limit` of them, else SYNTHETIC_EVAL_SIZE).
    """
    prompts.check(cfg.prompt, tokenizer)
    if cfg.source == "synthetic":
        rows = synthetic.problems(seed, synthetic.EVAL_STREAM, limit or SYNTHETIC_EVAL_SIZE, cfg.task, cfg.digits)
        return Task(cfg.name, cfg, seed, tokenizer, rows)
    task = _check_lengths(Task(cfg.name, cfg, seed, tokenizer, load_examples(cfg, cfg.eval_split or cfg.split)), None)
    task.rows = task.rows[:limit] if limit is not None else task.rows
    return task


__all__ = ["Example", "Task", "build_eval_task", "build_task"]
