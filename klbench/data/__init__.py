"""Prompt sources: the synthetic arithmetic task and real datasets, behind one `Task`.

`build_task(cfg, tokenizer, seed)` returns a `Task` whose `batch(step, size)` is a pure function
of (seed, step): a run's data stream is reproducible and resumes from the step number alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from klbench.config import DataConfig
from klbench.data import synthetic
from klbench.data.example import Example


@dataclass
class Task:
    name: str
    cfg: DataConfig
    seed: int
    tokenizer: object
    rows: list[Example] | None = None  # None: generated (synthetic)

    def batch(self, step: int, size: int) -> list[Example]:
        """The `size` examples of training step `step` (1-based)."""
        if self.rows is None:
            return synthetic.problems(self.seed, step, size)
        raise NotImplementedError("dataset sources are added by klbench.data.sources")

    def prompt(self, ex: Example) -> str:
        return ex.question

    def encode(self, ex: Example) -> list[int]:
        return self.tokenizer.encode(self.prompt(ex), add_special_tokens=False)


def build_task(cfg: DataConfig, tokenizer, seed: int) -> Task:
    if cfg.source == "synthetic":
        return Task(cfg.name, cfg, seed, tokenizer)
    raise NotImplementedError(f"data.source={cfg.source}")
