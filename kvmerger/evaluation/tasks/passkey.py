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
* Several keys (`keys=K > 1`, for the compress-once, ask-many protocol): K doors, each with its own
  key, "The pass key of the red door is 71432. Remember it. 71432 is the pass key of the red door.",
  at depths spread evenly around the context (key j at ``(depth_i + j / K) mod 1``, depth_i the
  sample's depth), and one question per door, "What is the pass key of the red door? The pass key
  of the red door is". Each question is scored on its own key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kvmerger.evaluation.metrics import contains_answer
from kvmerger.evaluation.tasks.base import Question, Sample, Task
from kvmerger.evaluation.tasks.needle import insert_at_depth
from kvmerger.evaluation.tasks.prompting import fit_filler, render_prompt
from kvmerger.evaluation.texts import cut_to_tokens, essays

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CHAT_QUESTION = "What is the pass key? Answer with the number only."
DOOR_NEEDLE = "The pass key of the {door} door is {key}. Remember it. {key} is the pass key of the {door} door."
DOOR_QUESTION = "What is the pass key of the {door} door? The pass key of the {door} door is"
DOOR_CHAT_QUESTION = "What is the pass key of the {door} door? Answer with the number only."
DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


def passkey_sample(
    tokenizer, context_tokens: int, depth: float, seed: int, *, chat: bool = False, keys: int = 1
) -> Sample:
    """A pass-key sample of about `context_tokens` tokens with the key at `depth` (0..1) of the text
    (with `keys > 1`, one key per door, spread from `depth` on; see the module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the context, in [0, 1]; got {depth}")
    rng = random.Random(seed)
    values = [f"{rng.randint(10000, 99999)}" for _ in range(keys)]
    if keys == 1:
        needles, asked = [NEEDLE.format(key=values[0])], [CHAT_QUESTION if chat else QUESTION]
    else:
        needles = [DOOR_NEEDLE.format(door=door, key=key) for door, key in zip(DOORS, values)]
        asked = [(DOOR_CHAT_QUESTION if chat else DOOR_QUESTION).format(door=door) for door in DOORS[:keys]]
    depths = [(depth + index / keys) % 1.0 for index in range(keys)] if keys > 1 else [depth]

    def build(haystack_tokens: int) -> Sample:
        context = cut_to_tokens(tokenizer, essays(), haystack_tokens)
        for needle, needle_depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):  # deepest first
            context = insert_at_depth(tokenizer, context, needle, needle_depth, paragraph=True)
        questions = []
        for text in asked:
            if chat:
                context_part, question = render_prompt(tokenizer, True, context + "\n\n", text)
            else:
                context_part, question = context, "\n\n" + text
            questions.append(question)
        meta = {"depth": depth, "seed": seed, "chat": chat}
        if keys > 1:
            meta["depths"] = depths
        more = [Question(question, [key]) for question, key in zip(questions[1:], values[1:])]
        return Sample("passkey", context_part, questions[0], [values[0]], meta, more)

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
    keys: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.keys, int) or isinstance(self.keys, bool) or not 1 <= self.keys <= len(DOORS):
            raise ValueError(f"keys is the number of pass keys (one question each), 1 to {len(DOORS)}; got {self.keys!r}")

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        if count < 0:
            raise ValueError(f"count must be non-negative; got {count}")
        return [
            passkey_sample(
                tokenizer, context_tokens, (index + 0.5) / count, seed * 100_003 + index, chat=self.chat, keys=self.keys
            )
            for index in range(count)
        ]

    def score(self, prediction: str, sample: Sample) -> float:
        return contains_answer(prediction, sample.answers[0])
