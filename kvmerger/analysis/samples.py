"""The texts the merge analysis reads: several fixed-length samples of several kinds of text.

The paper's second observation (docs/METHOD.md section 1) is that the share of tokens merged per
layer persists across samples *and* tasks, so the analysis needs text of clearly different kinds:

* ``essays``: windows of the Paul Graham essays shipped in kvmerger/data (prose).
* ``drama``: windows of tiny Shakespeare (dialogue, short lines, speaker names).
* ``haystack``: RULER's synthetic noise haystack (its five sentences, `evaluation.texts.NOISE`,
  repeated) with RULER-style needles "One of the special magic numbers for {word} is: {7 digits}."
  at random depths. The repeats are counted here rather than by `texts.noise_haystack`, whose
  estimate (tokens of one sentence group encoded alone) falls short for SmolLM2's tokenizer, which
  encodes the group in fewer tokens when repeated: asked for 2048 tokens it returns 1992.
* any other entry is read as the path of a UTF-8 text file and cut into windows the same way.

Choices: windows of a text start at evenly spaced character offsets (sample i of n at i/n of the
text, moved back to the start of its paragraph, or of its sentence when no paragraph break is near)
and keep exactly ``tokens`` tokens of the model's own tokenizer (its special tokens included, as it
adds them). Haystack sample i draws its needles (words, numbers, depths) from ``Random(seed + i)``,
so the samples differ only by where and what the needles are, as in RULER. Needle depths lie in
[0.05, 0.9] of the noise the sample keeps, so the cut to ``tokens`` never drops a needle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvmerger.evaluation.texts import NOISE, essays, previous_sentence_end, shakespeare

KINDS = ("essays", "drama", "haystack")
NEEDLE = "One of the special magic numbers for {word} is: {number}."
NEEDLE_WORDS = (
    "apple", "river", "lantern", "pebble", "violin", "harbor", "meadow", "falcon", "copper", "saddle",
    "orchid", "thunder", "marble", "compass", "glacier", "kettle", "sparrow", "tunnel", "velvet", "anchor",
    "biscuit", "canyon", "dolphin", "ember", "fossil", "garnet", "hammock", "island", "juniper", "kayak",
    "ladder", "magnet", "nectar", "oyster", "parrot", "quartz", "ribbon", "satchel", "teapot", "umbrella",
)  # fmt: skip
CHARS_PER_TOKEN_BOUND = 8  # no text here averages more characters per token (essays 4.2, drama 3.2)
PARAGRAPH_SEARCH = 4000  # characters to look back for a paragraph break before using a sentence end


@dataclass
class TextSample:
    """One prompt to analyse: `ids` [1, tokens] of text kind `kind`; `meta` says where it came from."""

    kind: str
    index: int
    ids: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.ids.shape[-1]


def build_samples(
    tokenizer, texts: list[str], tokens: int, count: int, seed: int = 0, needles: int = 4
) -> list[TextSample]:
    """`count` samples of `tokens` tokens for each entry of `texts` (a kind of KINDS or a file path)."""
    if tokens < 2:
        raise ValueError(f"a sample needs at least 2 tokens, got {tokens}")
    if count < 1:
        raise ValueError(f"the number of samples per text must be at least 1, got {count}")
    if len(set(texts)) != len(texts) or not texts:
        raise ValueError(f"texts must be a non-empty list without repeats, got {texts}")
    samples: list[TextSample] = []
    for entry in texts:
        if entry == "haystack":
            samples += haystack_samples(tokenizer, tokens, count, seed, needles)
        elif entry in ("essays", "drama"):
            samples += window_samples(tokenizer, essays() if entry == "essays" else shakespeare(), entry, tokens, count)
        else:
            path = Path(entry)
            if not path.is_file():
                raise ValueError(f"{entry!r} is neither a text kind ({', '.join(KINDS)}) nor a readable file")
            samples += window_samples(tokenizer, path.read_text(encoding="utf-8"), path.stem, tokens, count)
    return samples


def window_samples(tokenizer, text: str, kind: str, tokens: int, count: int) -> list[TextSample]:
    """`count` windows of exactly `tokens` tokens from evenly spaced places of `text`."""
    span = tokens * CHARS_PER_TOKEN_BOUND
    last_start = max(0, len(text) - span)
    samples = []
    for index in range(count):
        start = paragraph_start(text, last_start * index // count)
        ids = tokenizer(text[start : start + span]).input_ids
        if len(ids) < tokens:
            ids = tokenizer(text[start:]).input_ids
        if len(ids) < tokens:
            raise ValueError(
                f"text {kind!r} has only {len(ids)} tokens from offset {start}, fewer than the {tokens} asked for"
            )
        samples.append(TextSample(kind, index, torch.tensor([ids[:tokens]]), {"char_offset": start}))
    return samples


def paragraph_start(text: str, index: int) -> int:
    """The start of the paragraph holding `index` if one begins close before it, else of its sentence."""
    if index == 0:
        return 0
    paragraph = text.rfind("\n\n", max(0, index - PARAGRAPH_SEARCH), index)
    return paragraph + 2 if paragraph >= 0 else previous_sentence_end(text, index)


def haystack_samples(tokenizer, tokens: int, count: int, seed: int, needles: int) -> list[TextSample]:
    """`count` noise haystacks of exactly `tokens` tokens, each with `needles` RULER-style needles."""
    if needles < 0:
        raise ValueError(f"the number of needles must be at least 0, got {needles}")
    noise = repeated_noise(tokenizer, tokens)
    samples = []
    for index in range(count):
        text, placed = insert_needles(tokenizer, noise, tokens, needles, random.Random(seed + index))
        ids = tokenizer(text).input_ids
        if len(ids) < tokens:
            raise ValueError(f"the haystack came out {len(ids)} tokens long, shorter than the {tokens} asked for")
        ids = ids[:tokens]
        samples.append(TextSample("haystack", index, torch.tensor([ids]), {"seed": seed + index, "needles": placed}))
    return samples


def repeated_noise(tokenizer, tokens: int) -> str:
    """RULER's noise sentences repeated until they encode to at least `tokens` tokens."""
    repeats = 1
    while True:
        text = " ".join([NOISE] * repeats)
        encoded = len(tokenizer(text, add_special_tokens=False).input_ids)
        if encoded >= tokens:
            return text
        repeats = max(repeats + 1, math.ceil(repeats * tokens / max(1, encoded)) + 1)


def insert_needles(
    tokenizer, noise: str, tokens: int, needles: int, rng: random.Random
) -> tuple[str, list[dict[str, Any]]]:
    """`noise` with `needles` needles at sentence ends; returns the text and what was placed where."""
    chosen = [
        {"word": word, "number": str(rng.randint(1_000_000, 9_999_999)), "depth": round(rng.uniform(0.05, 0.9), 4)}
        for word in rng.sample(NEEDLE_WORDS, needles)
    ]
    sentences = [NEEDLE.format(word=n["word"], number=n["number"]) for n in chosen]
    needle_tokens = sum(len(tokenizer(" " + s, add_special_tokens=False).input_ids) for s in sentences)
    if needle_tokens >= tokens:
        raise ValueError(f"{needles} needles take {needle_tokens} tokens, too many for samples of {tokens} tokens")
    noise_tokens = len(tokenizer(noise, add_special_tokens=False).input_ids)
    kept_chars = len(noise) * (tokens - needle_tokens) / noise_tokens  # the noise that stays after the final cut
    text = noise
    for needle, sentence in sorted(zip(chosen, sentences), key=lambda pair: -pair[0]["depth"]):
        at = previous_sentence_end(text, int(kept_chars * needle["depth"]))
        text = text[:at] + sentence + " " + text[at:]
    return text, sorted(chosen, key=lambda n: n["depth"])
