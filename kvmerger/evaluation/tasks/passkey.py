"""Pass-key retrieval: a random 5-digit key hidden in essay text, asked for at the end.

The key stands as its own paragraph (a blank line before and after, placed at a sentence end):
inlined in running prose, even the full cache of the default model misses it (measured, see
kvmerger/data/README.md of the shared data). The question is a plain completion,
"What is the pass key? The pass key is", or the model's chat template when `chat=True`.
"""

from __future__ import annotations

import random

from kvmerger.evaluation.tasks.base import Sample
from kvmerger.evaluation.texts import cut_to_tokens, essays, previous_sentence_end

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def passkey_sample(tokenizer, context_tokens: int, depth: float, seed: int, *, chat: bool = False) -> Sample:
    """A pass-key sample of about `context_tokens` tokens with the key at `depth` (0..1) of the text."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the context, in [0, 1]; got {depth}")
    key = f"{random.Random(seed).randint(10000, 99999)}"
    needle = NEEDLE.format(key=key)
    needle_tokens = len(tokenizer(needle, add_special_tokens=False).input_ids) + 4
    haystack = cut_to_tokens(tokenizer, essays(), max(1, context_tokens - needle_tokens))
    at = previous_sentence_end(haystack, int(len(haystack) * depth))
    context = haystack[:at].rstrip() + "\n\n" + needle + "\n\n" + haystack[at:].lstrip()
    question = "\n\n" + QUESTION
    if chat:
        context, question = _chat_wrap(tokenizer, context, "What is the pass key? Answer with the number only.")
    return Sample("passkey", context, question, [key], {"depth": depth, "seed": seed, "chat": chat})


def _chat_wrap(tokenizer, context: str, question: str) -> tuple[str, str]:
    """Split a chat-formatted prompt into the part before the question and the rest."""
    marker = "\x00QUESTION\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + "\n\n" + marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.split(marker)
    return before, question + after
