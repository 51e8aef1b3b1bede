"""One prompt with its gold answer: what every data source yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    id: str
    question: str  # the problem text as the dataset gives it
    answer: str  # the gold final answer (a string math-verify or the task checker understands)
