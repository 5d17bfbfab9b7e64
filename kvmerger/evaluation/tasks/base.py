"""What every task produces: samples of (context, question, answers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One question over one context.

    Query-aware protocol: `context + question` is prefilled and compressed, then the answer is
    generated. Query-agnostic: `context` is prefilled and compressed first, `question` comes after.
    """

    task: str
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
