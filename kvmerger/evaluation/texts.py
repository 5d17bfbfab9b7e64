"""The texts shipped with the package (see kvmerger/data/README.md for sources and licences)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

SENTENCE_ENDS = (". ", ".\n", "? ", "?\n", "! ", "!\n")


def data_path(*parts: str) -> Path:
    """Path of a file shipped in kvmerger/data."""
    return Path(str(resources.files("kvmerger").joinpath("data", *parts)))


@lru_cache(maxsize=1)
def essays() -> str:
    """The Paul Graham essays concatenated in sorted file order (the standard NIAH haystack)."""
    folder = data_path("paul_graham")
    essays_only = [path for path in sorted(folder.glob("*.txt")) if not path.name.startswith("LICENSE")]
    return "".join(path.read_text(encoding="utf-8") for path in essays_only)


@lru_cache(maxsize=1)
def shakespeare() -> str:
    return data_path("shakespeare", "tinyshakespeare.txt").read_text(encoding="utf-8")


def previous_sentence_end(text: str, index: int) -> int:
    """The index just after the last sentence end at or before `index` (0 if there is none)."""
    best = max(text.rfind(end, 0, index + 1) for end in SENTENCE_ENDS)
    return 0 if best < 0 else best + 2


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default (Gemma's `<bos>`; none for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def cut_to_tokens(tokenizer, text: str, tokens: int) -> str:
    """The first `tokens` tokens of `text`, decoded (encoding only as much of the text as needed)."""
    chars = tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False).input_ids
        if len(ids) > tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < tokens:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than the {tokens} asked for")
    return tokenizer.decode(ids[:tokens])


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def noise_haystack(tokenizer, tokens: int) -> str:
    """RULER's noise haystack (its repeated five sentences), cut to `tokens` tokens."""
    # tokens per repetition, measured on a run of them (one alone encodes differently at its edges)
    per_repeat = len(tokenizer(" ".join([NOISE] * 20), add_special_tokens=False).input_ids) / 20
    repeats = int(tokens / per_repeat) + 3
    return cut_to_tokens(tokenizer, " ".join([NOISE] * repeats), tokens)
