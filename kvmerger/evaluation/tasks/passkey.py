"""Pass-key retrieval: a random 5-digit key hidden in essay text, asked for at the end.

Task of Mohtashami and Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (arXiv 2305.16300), used since by most long-context and KV-cache papers: "The pass
key is 71432. Remember it. 71432 is the pass key." hidden in filler, then "What is the pass key?".

Our choices:
* Haystack: the shipped Paul Graham essays (the needle-in-a-haystack haystack)
  instead of the paper's repeated filler sentence, so that compression has real text to work on.
* The key stands as its own paragraph (a blank line before and after, placed at a sentence end):
  inlined in running prose, even the full cache of the default model missed it every time; as a
  paragraph it found it 10/10 at ~2k tokens (measured, see kvmerger/data/README.md).
* Prompt: a plain completion, "What is the pass key? The pass key is" (the default model, asked
  through its chat template, did markedly worse with the full cache); `chat=True` asks through the
  model's chat template instead, "Answer with the number only".
* Grid: `samples(count=n)` puts sample i at depth (i + 0.5) / n of the haystack, each with its own
  key drawn from the seed and the sample index.
* Size: the whole prompt (context plus question, chat markup included, no special tokens added)
  lands within a few tokens of `context_tokens`.
* Score: 1 if the key appears in the answer (`contains_answer`), else 0. Generation stops at the
  first newline or '.' of the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kvmerger.evaluation.metrics import contains_answer
from kvmerger.evaluation.tasks.base import Sample, Task
from kvmerger.evaluation.tasks.needle import insert_at_depth
from kvmerger.evaluation.tasks.prompting import fit_filler, render_prompt
from kvmerger.evaluation.texts import cut_to_tokens, essays

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CHAT_QUESTION = "What is the pass key? Answer with the number only."


def passkey_sample(tokenizer, context_tokens: int, depth: float, seed: int, *, chat: bool = False) -> Sample:
    """A pass-key sample of about `context_tokens` tokens with the key at `depth` (0..1) of the text."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the context, in [0, 1]; got {depth}")
    key = f"{random.Random(seed).randint(10000, 99999)}"

    def build(haystack_tokens: int) -> Sample:
        haystack = cut_to_tokens(tokenizer, essays(), haystack_tokens)
        context = insert_at_depth(tokenizer, haystack, NEEDLE.format(key=key), depth, paragraph=True)
        if chat:
            context, question = render_prompt(tokenizer, True, context + "\n\n", CHAT_QUESTION)
        else:
            question = "\n\n" + QUESTION
        return Sample("passkey", context, question, [key], {"depth": depth, "seed": seed, "chat": chat})

    return fit_filler(build, tokenizer, context_tokens)


@dataclass
class PassKey(Task):
    """Pass-key retrieval; one sample per depth, each with its own key (see the module docstring)."""

    name: ClassVar[str] = "passkey"
    metric: ClassVar[str] = "contains_answer"
    summary: ClassVar[str] = "pass-key retrieval: a 5-digit key as its own paragraph in essays, found or not"
    max_new_tokens: ClassVar[int] = 12
    stop_strings: ClassVar[tuple[str, ...]] = ("\n", ".")

    chat: bool = False

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        if count < 0:
            raise ValueError(f"count must be non-negative; got {count}")
        return [
            passkey_sample(tokenizer, context_tokens, (index + 0.5) / count, seed * 100_003 + index, chat=self.chat)
            for index in range(count)
        ]

    def score(self, prediction: str, sample: Sample) -> float:
        return contains_answer(prediction, sample.answers[0])
