"""Repetitive texts that stress cache compression: every one is generated here, from a seed, or cut
from text shipped with the package or with Python itself.

Compression methods that merge or fit values (CaM, attention matching) failed on a long archaic text
with heavy repetition (issue 18) while essays looked fine. Repetition gives many tokens with nearly
the same key and the same attention pattern, which is exactly where a merge piles value into a few
slots or a least-squares fit becomes ill-conditioned. These sources reproduce that without the
held-out text:

* `noise`: RULER's noise haystack (its five repeated sentences, `texts.NOISE`), with a RULER-style
  needle ("One of the special magic numbers for {word} is: {number}.") between repetitions now and
  then, at seeded places (RULER: Hsieh et al. 2024, Apache-2.0, kvmerger/data/ruler).
* `repeated`: one passage of the Paul Graham essays (whole lines from a seeded start, at most
  400-1,600 characters) repeated, separated by blank lines.
* `lists`: a generated numbered inventory (quantity, colour, item, aisle, shelf from small
  vocabularies), one line per item.
* `verse`: generated verse with a refrain: stanzas of four short lines drawn from tinyshakespeare
  (public domain, kvmerger/data/shakespeare), each followed by the same two-line refrain, also drawn
  from it.
* `code`: Python source of a fixed list of standard-library modules (`CODE_MODULES`), read from the
  running interpreter's library (Python Software Foundation License; the text depends on the Python
  version, which the window's metadata records). Windows start at a seeded line.

Each generator takes a `random.Random` and a number of characters and returns a text at least that
long, starting at a line start; the same generator state gives the same text.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from kvmerger.evaluation.texts import NOISE, essays, shakespeare

CODE_MODULES = (
    "argparse", "ast", "calendar", "configparser", "csv", "dataclasses", "difflib", "enum", "fractions",
    "functools", "inspect", "ipaddress", "pathlib", "pprint", "shutil", "string", "tarfile", "textwrap",
    "typing", "zipfile",
)
NEEDLE = "One of the special magic numbers for {word} is: {number}."  # RULER's niah needle
NEEDLE_WORDS = ("apple", "river", "candle", "harbour", "lantern", "meadow", "violin", "granite", "thistle", "comet")
NEEDLE_EVERY = (4, 16)  # a needle after this many noise repetitions (drawn uniformly in the range)
PASSAGE_CHARS = (400, 1600)
LIST_WORDS = {
    "item": ("apples", "pears", "plums", "lemons", "figs", "nails", "screws", "candles", "ropes", "buckets"),
    "colour": ("red", "green", "yellow", "blue", "brown", "white"),
    "container": ("boxes", "crates", "bags", "jars"),
}
STANZA_LINES = 4
VERSE_LINE_CHARS = (20, 45)


def noise(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < chars:
        repeats = rng.randint(*NEEDLE_EVERY)
        parts.append(" ".join([NOISE] * repeats))
        parts.append(NEEDLE.format(word=rng.choice(NEEDLE_WORDS), number=rng.randrange(1_000_000, 10_000_000)))
        size += sum(len(part) + 1 for part in parts[-2:])
    return " ".join(parts)


def repeated(rng: random.Random, chars: int) -> str:
    text = essays()
    start = text.find("\n", rng.randrange(0, len(text) // 2)) + 1
    passage = text[start : start + rng.randint(*PASSAGE_CHARS)]
    passage = passage[: passage.rfind("\n")].strip()  # whole lines
    return "\n\n".join([passage] * (chars // (len(passage) + 2) + 1))


def lists(rng: random.Random, chars: int) -> str:
    lines: list[str] = []
    size = 0
    while size < chars:
        lines.append(
            f"{len(lines) + 1}. {rng.randint(1, 24)} {rng.choice(LIST_WORDS['container'])} of "
            f"{rng.choice(LIST_WORDS['colour'])} {rng.choice(LIST_WORDS['item'])}, aisle {rng.choice('ABCDEF')}, "
            f"shelf {rng.randint(1, 9)}"
        )
        size += len(lines[-1]) + 1
    return "\n".join(lines)


def verse(rng: random.Random, chars: int) -> str:
    lines = verse_lines()
    refrain = "\n".join(rng.sample(lines, 2))
    stanzas: list[str] = []
    size = 0
    while size < chars:
        stanzas.append("\n".join(rng.sample(lines, STANZA_LINES)) + "\n" + refrain)
        size += len(stanzas[-1]) + 2
    return "\n\n".join(stanzas)


def code(rng: random.Random, chars: int) -> str:
    text = python_source()
    if len(text) <= chars:
        raise ValueError(f"the standard-library source holds {len(text)} characters, fewer than the {chars} asked for")
    return text[text.find("\n", rng.randrange(0, len(text) - chars)) + 1 :]


@lru_cache(maxsize=1)
def verse_lines() -> list[str]:
    """tinyshakespeare's short verse lines (no speaker names, which end in a colon)."""
    low, high = VERSE_LINE_CHARS
    lines = (line.strip() for line in shakespeare().split("\n"))
    return [line for line in lines if low <= len(line) <= high and not line.endswith(":") and line[0].isupper()]


@lru_cache(maxsize=1)
def python_source() -> str:
    """The source of the `CODE_MODULES`, concatenated in that order."""
    texts = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise ValueError(f"the standard-library module {name} has no Python source in this interpreter")
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n\n".join(texts)


GENERATORS: dict[str, Callable[[random.Random, int], str]] = {
    "noise": noise,
    "repeated": repeated,
    "lists": lists,
    "verse": verse,
    "code": code,
}
