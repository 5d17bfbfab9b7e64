"""What every question-answering task provides: samples of (context, question, answers), and a score.

A task is a small dataclass registered by its `name` (like methods): `get_task("needle")`.
Samples are deterministic for a seed and sized with the model's own tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

TASKS: dict[str, type[Task]] = {}


@dataclass
class Question:
    """One question over a sample's context, with its reference answers."""

    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One or more questions over one context.

    Query-aware protocol: `context + question` is prefilled and compressed, then the answer is
    generated (once per question). Query-agnostic (compress once, ask many): `context` is prefilled
    and compressed once, then every question is asked from its own copy of that compressed cache.
    `question` and `answers` are the first question; `more` holds the others of multi-question tasks.
    """

    task: str
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    more: list[Question] = field(default_factory=list)

    def questions(self) -> list[Question]:
        """Every question of the sample, the first one first."""
        return [Question(self.question, self.answers), *self.more]

    def asking(self, question: Question) -> Sample:
        """This context with `question` as its only question (what a task scores an answer against)."""
        return replace(self, question=question.question, answers=question.answers, more=[])


@dataclass
class Task(ABC):
    """Base class; subclasses set `name`, `summary`, `metric` and `max_new_tokens`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    metric: ClassVar[str] = "score"  # the name of what `score` measures, for summaries
    max_new_tokens: ClassVar[int] = 32
    stop_strings: ClassVar[tuple[str, ...]] = ()  # generation stops at the first of these in the answer

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            TASKS[cls.name] = cls

    @abstractmethod
    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        """`count` samples whose prompt is about `context_tokens` tokens long, deterministic in `seed`."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """The score of one generated answer, in [0, 1]."""

    def check_data(self) -> None:
        """Raise (FileNotFoundError, saying where to get them) if the task's data are not at hand;
        `kvmerger eval` calls it before loading the model. Tasks with shipped or generated data pass."""

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


def get_task(name: str, **params: Any) -> Task:
    """Build a registered task by name, e.g. ``get_task("passkey", chat=True)``; unknown parameters are
    refused with the task's own list, as `get_method` does for methods."""
    import kvmerger.evaluation.tasks  # noqa: F401  (registers every task)

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        listed = ", ".join(known) if known else "none"
        raise ValueError(f"task {name} has no parameter {', '.join(unknown)}; its parameters: {listed}")
    return cls(**params)
