"""RULER's synthetic tasks, generated offline from a seed and sized with the model's own tokenizer.

Paper: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
COLM 2024, arXiv 2404.06654. Reference code: NVIDIA/RULER @ c3f5e3b4, `scripts/data/synthetic/`
(`niah.py`, `variable_tracking.py`, `common_words_extraction.py`, `freq_words_extraction.py`,
`constants.py`: templates, answer prefixes, generation lengths), `scripts/data/prepare.py` (how a
prompt is assembled) and `scripts/eval/synthetic/constants.py` (the metric). The configurations
are RULER's own, shipped in kvmerger/data/ruler/synthetic.yaml; `ruler_task(name)` builds the task
for any of its names (niah_single_1 ... niah_multiquery, vt, cwe, fwe).

One class per RULER family, the variant as fields:
* "ruler-niah": needles "One of the special magic {numbers|words|uuids} for {key} is: {value}."
  in a haystack of RULER's noise sentences, of essays, or of other needles; `variant` single
  (1 key, 1 value), multikey (4 keys, 1 asked; with the needle haystack every filler line is a
  distractor needle and one needle is inserted, as niah_multikey_2/3), multivalue (1 key, 4
  values), multiquery (4 keys, all asked).
* "ruler-vt": variable tracking, a chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) scattered
  through noise, after one worked example; the answer is every variable of the chain.
* "ruler-cwe": common words, a numbered list where 10 words appear 30 times and the rest 3
  (6 and 1, with a smaller example, when the whole sequence is under 4,096 tokens, as RULER does).
* "ruler-fwe": frequent words, coded 6-letter words drawn from a Zipf law (alpha 2); the answer is
  the 2nd to 4th most frequent (the 1st is '...', which the prompt says to ignore).
All are scored with RULER's `string_match_all` (share of the answers found in the output).

The prompt. RULER builds `model_template(task_template) + answer_prefix`. With `chat=True` (the
default, as RULER runs chat models) the task template is the user message of the model's chat
template and the answer prefix follows the assistant header; `chat=False` is RULER's "base"
template: the task template directly followed by the answer prefix.

Context and question. RULER puts the query after the haystack, so `context` is the prompt up to the
end of the haystack and `question` the rest: the question sentence, the chat template's closing
and the answer prefix. Query-aware protocol: both are compressed together; query-agnostic: the
context is compressed alone (it holds the instruction before the haystack, which for cwe and fwe
already says what will be asked), then the question is fed.

Sizes. `context_tokens` is the whole prompt, `context + question` with its chat markup, counted
without special tokens the tokenizer would add (RULER's `max_seq_length` also counts the tokens to
generate; ours does not). Each generator builds its filler to fit, measures, and corrects: niah
and vt cut their haystack at a token boundary (its last noise line or essay sentence may stop
short; RULER adds whole units and lands up to one unit under), cwe takes the shortest list that
reaches the target and drops its last entries (a word or two then appear once less), and so does
fwe. Prompts land within a few tokens of the target (tested); a target too small
for the fixed parts raises ValueError.

Where we differ from RULER (no network, no extra dependency):
* Word lists. RULER draws keys ("adjective-noun") and cwe words from the `wonderwords` package. We
  use `essay_words()`: the distinct lowercase alphabetic words of 4+ letters that occur at least
  twice in the shipped Paul Graham essays and are not stop words (about 3,700, sorted). niah keys
  are "word-word" pairs of two different words from it; keys within a sample are distinct.
* Essay haystack. RULER uses its PaulGrahamEssays.json (the same essays, 524k words), whitespace
  squeezed and split into sentences by nltk; we use the shipped essays (112k words, repeated when
  a target needs more, as RULER does), split after '.', '?' or '!' followed by a space.
* Randomness. Every sample draws from its own `random.Random` seeded by (task, seed, sample
  index): deterministic for a seed and independent of `count`. RULER shuffles some lists with the
  run's fixed seed and draws a few numbers with numpy.
* vt's worked example. RULER builds one of at most 500 tokens per run and renames its variables
  and value for each sample; we build a fresh one per sample (3-letter names, a random value, same
  500-token limit and layout).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, ClassVar

from kvmerger.evaluation.metrics import STOP_WORDS, ruler_postprocess, string_match_all
from kvmerger.evaluation.tasks.base import Question, Sample, Task
from kvmerger.evaluation.tasks.prompting import fit_filler, prompt_tokens, render_prompt, sample_tokens
from kvmerger.evaluation.texts import NOISE, cut_to_tokens, essays

# RULER constants.py: task templates and answer prefixes, verbatim (typos included).
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {num_cw} most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))

NIAH_COUNTS = {  # variant -> (keys, values per key, keys asked); RULER: num_needle_k/v/q
    "single": (1, 1, 1),
    "multikey": (4, 1, 1),
    "multivalue": (1, 4, 1),
    "multiquery": (4, 1, 4),
}
NEEDLE_TYPES = ("numbers", "words", "uuids")
ASK = ("together", "separately")  # keys asked in one question (RULER) or one question each (compress once, ask many)
HAYSTACKS = ("noise", "essay", "needle")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lowercase alphabetic words of 4+ letters seen at least twice in the essays, minus stop
    words, sorted: our stand-in for RULER's `wonderwords` lists."""
    counts = Counter(re.findall(r"\b[a-z]+\b", essay_haystack_text()))
    return tuple(sorted(w for w, n in counts.items() if n >= 2 and len(w) >= 4 and w not in STOP_WORDS))


@lru_cache(maxsize=1)
def essay_haystack_text() -> str:
    """The shipped essays in sorted file order, whitespace squeezed to single spaces (RULER's essay haystack)."""
    return re.sub(r"\s+", " ", essays()).strip()


def essay_sentences(tokenizer, tokens: int) -> list[str]:
    """The first `tokens` tokens of the essay haystack (repeated if needed), split into sentences."""
    text = essay_haystack_text()
    text = " ".join([text] * (tokens * 8 // len(text) + 1))
    return [s for s in re.split(r"(?<=[.?!]) ", cut_to_tokens(tokenizer, text, tokens)) if s]


def noise_lines(tokenizer, tokens: int) -> list[str]:
    """RULER's noise haystack, one noise paragraph per line, cut at `tokens` tokens."""
    line_tokens = prompt_tokens(tokenizer, NOISE + "\n")
    return cut_to_tokens(tokenizer, "\n".join([NOISE] * (tokens // line_tokens + 2)), tokens).split("\n")


def insert_at_lines(lines: list[str], items: Sequence[str], rng: random.Random) -> list[str]:
    """RULER (noise and needle haystacks): each item goes in before a distinct random line."""
    if len(lines) < len(items):
        raise ValueError(f"the haystack has {len(lines)} lines, fewer than the {len(items)} to insert")
    lines = list(lines)
    for index, item in zip(sorted(rng.sample(range(len(lines)), len(items)), reverse=True), items):
        lines.insert(index, item)
    return lines


def insert_at_depths(sentences: list[str], items: Sequence[str], rng: random.Random) -> str:
    """RULER (essay haystack): items at distinct random depths of `DEPTHS`, between sentences."""
    cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(items)))
    bounds = [0, *cuts, len(sentences)]
    parts: list[str] = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sentences[bounds[i - 1] : bounds[i]]))
        if i - 1 < len(items):
            parts.append(items[i - 1])
    return " ".join(parts)


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{task}/{seed}/{index}")


def _check_choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _check_positive(**values: float) -> None:
    for field, value in values.items():
        if value < 1:
            raise ValueError(f"{field} must be at least 1; got {value}")


@dataclass
class RulerTask(Task):
    """What every RULER family shares: the chat switch, samples from per-index seeds, the metric."""

    metric: ClassVar[str] = "string_match_all"

    chat: bool = True

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        if context_tokens < 1 or count < 0:
            raise ValueError(f"context_tokens must be positive and count non-negative; got {context_tokens}, {count}")
        samples = []
        for index in range(count):
            sample = self.sample(tokenizer, context_tokens, sample_rng(self.name, seed, index))
            sample.meta.update(seed=seed, index=index, chat=self.chat, config=self.ruler_config())
            samples.append(sample)
        return samples

    @abstractmethod
    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        """One sample of about `context_tokens` tokens, every draw taken from `rng`."""

    def score(self, prediction: str, sample: Sample) -> float:
        """RULER's string_match_all after its post-processing."""
        return string_match_all(ruler_postprocess(prediction), sample.answers)

    def generation_length(self) -> int:
        """New tokens to generate (RULER's `tokens_to_generate`)."""
        return self.max_new_tokens

    def ruler_config(self) -> str | None:
        """The name of the RULER configuration this task reproduces, if any."""
        plain = replace(self, chat=True)
        return next((name for name, task in RULER_CONFIGS.items() if task == plain), None)


# ---------------------------------------------------------------------------------------------
# Needle in a haystack
# ---------------------------------------------------------------------------------------------


def random_needle_part(kind: str, rng: random.Random) -> str:
    """A key or value as RULER draws it: a 7-digit number, a word pair, or a version-4 UUID."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return "-".join(rng.sample(essay_words(), 2))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def singular(template: str) -> str:
    """RULER's rewording when one value is asked for (num_needle_q * num_needle_v == 1)."""
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(plural, single)
    return template


@dataclass
class RulerNIAH(RulerTask):
    """RULER needle-in-a-haystack (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery).

    Default: niah_single_2 (one word key, one 7-digit number, in essays).
    """

    name: ClassVar[str] = "ruler-niah"
    summary: ClassVar[str] = "RULER needle in a haystack: single / multikey / multivalue / multiquery"
    max_new_tokens: ClassVar[int] = 128

    variant: str = "single"
    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    ask: str = "together"

    def __post_init__(self) -> None:
        _check_choice("ask", self.ask, ASK)
        _check_choice("variant", self.variant, tuple(NIAH_COUNTS))
        _check_choice("haystack", self.haystack, HAYSTACKS)
        _check_choice("key_type", self.key_type, NEEDLE_TYPES)
        _check_choice("value_type", self.value_type, NEEDLE_TYPES)

    def counts(self) -> tuple[int, int, int]:
        """(keys, values per key, keys asked). With the needle haystack the filler lines are the other
        keys, so multikey inserts a single needle (RULER's niah_multikey_2/3)."""
        if self.variant == "multikey" and self.haystack == "needle":
            return 1, 1, 1
        return NIAH_COUNTS[self.variant]

    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        n_keys, n_values, n_queries = self.counts()
        keys = _distinct(lambda: random_needle_part(self.key_type, rng), n_keys)
        values = [[random_needle_part(self.value_type, rng) for _ in range(n_values)] for _ in keys]
        needles = [
            NEEDLE.format(type_needle_v=self.value_type, key=key, value=value)
            for key, key_values in zip(keys, values)
            for value in key_values
        ]
        rng.shuffle(needles)
        asked = rng.sample(range(n_keys), n_queries)
        query_keys = [keys[i] for i in asked]
        groups = [asked] if self.ask == "together" else [[i] for i in asked]
        prompts = [self.question_prompt([keys[i] for i in group], n_values) for group in groups]
        before = self.question_prompt(query_keys, n_values)[0]  # the context announces every needle asked about
        state = rng.getstate()  # the filler's draws restart from here at every size tried

        def build(filler_tokens: int) -> Sample:
            rng.setstate(state)
            haystack = self.haystack_with_needles(tokenizer, filler_tokens, needles, set(keys), rng)
            rendered = [render_prompt(tokenizer, self.chat, before + haystack, after, prefix) for _, after, prefix in prompts]
            context = rendered[0][0]
            answers = [[value for i in group for value in values[i]] for group in groups]
            depths = [round(context.index(needle) / len(context), 3) for needle in needles]
            more = [Question(question, group_answers) for (_, question), group_answers in zip(rendered[1:], answers[1:])]
            meta = {"query_keys": query_keys, "needle_depths": depths}
            return Sample(self.name, context, rendered[0][1], answers[0], meta, more)

        return fit_filler(build, tokenizer, context_tokens)

    def question_prompt(self, query_keys: list[str], n_values: int) -> tuple[str, str, str]:
        """(text before the haystack, question after it, answer prefix) asking for `query_keys`' values."""
        query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]
        template, answer_prefix, type_needle_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, self.value_type
        if len(query_keys) * n_values == 1:
            template, answer_prefix, type_needle_v = singular(template), singular(answer_prefix), type_needle_v[:-1]
        before, after = template.split("{context}")
        return (
            before.format(type_needle_v=type_needle_v),
            after.format(type_needle_v=type_needle_v, query=query),
            answer_prefix.format(type_needle_v=type_needle_v, query=query),
        )

    def haystack_with_needles(
        self, tokenizer, tokens: int, needles: list[str], keys: set[str], rng: random.Random
    ) -> str:
        if self.haystack == "essay":
            return insert_at_depths(essay_sentences(tokenizer, tokens), needles, rng)
        if self.haystack == "noise":
            lines = noise_lines(tokenizer, tokens)
        else:
            lines = self.distractor_lines(tokenizer, tokens, keys, rng)
        return "\n".join(insert_at_lines(lines, needles, rng))

    def distractor_lines(self, tokenizer, tokens: int, keys: set[str], rng: random.Random) -> list[str]:
        """RULER's needle haystack: lines that are needles with other random keys and values."""

        def distractor() -> str:
            key = _distinct(lambda: random_needle_part(self.key_type, rng), 1, exclude=keys)[0]
            return NEEDLE.format(type_needle_v=self.value_type, key=key, value=random_needle_part(self.value_type, rng))

        first = distractor()
        count = 2 * (tokens // prompt_tokens(tokenizer, first + "\n")) + 4  # lines vary in length
        lines = [first, *(distractor() for _ in range(count))]
        return cut_to_tokens(tokenizer, "\n".join(lines), tokens).split("\n")


def _distinct(draw: Callable[[], str], count: int, exclude: Container[str] = frozenset()) -> list[str]:
    """`count` different draws, none of them in `exclude`."""
    found: list[str] = []
    while len(found) < count:
        item = draw()
        if item not in exclude and item not in found:
            found.append(item)
    return found


# ---------------------------------------------------------------------------------------------
# Variable tracking
# ---------------------------------------------------------------------------------------------

VT_EXAMPLE_TOKENS = 500  # RULER builds its worked example with max_seq_length=500


@dataclass
class RulerVT(RulerTask):
    """RULER variable tracking (config vt: one chain of 4 hops in noise), after one worked example."""

    name: ClassVar[str] = "ruler-vt"
    summary: ClassVar[str] = "RULER variable tracking: find every variable a chain of assignments gives a value"
    max_new_tokens: ClassVar[int] = 30

    num_chains: int = 1
    num_hops: int = 4
    haystack: str = "noise"

    def __post_init__(self) -> None:
        _check_positive(num_chains=self.num_chains, num_hops=self.num_hops)
        _check_choice("haystack", self.haystack, ("noise", "essay"))

    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        names, chains = variable_chains(rng, self.num_chains, self.num_hops, name_length=5)
        value = chains[0][0].split("=")[-1].strip()
        example = self.worked_example(tokenizer, rng)
        before, after = VT_TEMPLATE.split("{context}")
        after = after.format(query=value)
        answer_prefix = VT_ANSWER_PREFIX.format(num_v=self.num_hops + 1, query=value)
        state = rng.getstate()

        def build(filler_tokens: int) -> Sample:
            rng.setstate(state)
            haystack = self.haystack_with_chains(tokenizer, filler_tokens, chains, rng)
            user_before = example + "\n" + before + haystack
            context, question = render_prompt(tokenizer, self.chat, user_before, after, answer_prefix)
            return Sample(self.name, context, question, names[0], {"value": value})

        return fit_filler(build, tokenizer, context_tokens)

    def haystack_with_chains(self, tokenizer, tokens: int, chains: list[list[str]], rng: random.Random) -> str:
        if self.haystack == "essay":
            statements = [statement.strip() + "." for statement in interleave(chains, rng)]
            return insert_at_depths(essay_sentences(tokenizer, tokens), statements, rng)
        lines = noise_lines(tokenizer, tokens)
        for chain in chains:
            if len(lines) < len(chain):
                raise ValueError(f"the haystack has {len(lines)} lines, fewer than the {len(chain)} to insert")
            for offset, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(position + offset, chain[offset])
        return "\n".join(lines).replace(". \n", ".\n")

    def worked_example(self, tokenizer, rng: random.Random) -> str:
        """RULER's in-context example: a smaller vt prompt (3-letter names, at most 500 tokens, base
        template), its answer appended, ending with a newline."""
        names, chains = variable_chains(rng, self.num_chains, min(10, self.num_hops), name_length=3)
        value = chains[0][0].split("=")[-1].strip()

        def prompt(lines: list[str]) -> str:
            return VT_TEMPLATE.format(context="\n".join(lines), query=value) + VT_ANSWER_PREFIX.format(
                num_v=len(names[0]), query=value
            )

        statements = [statement for chain in chains for statement in chain]
        noise = max_fitting(lambda n: prompt([NOISE] * n + statements), tokenizer, VT_EXAMPLE_TOKENS, start=5)
        lines = [NOISE] * noise
        for chain in chains:
            for offset, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(position + offset, chain[offset])
        return prompt(lines).replace(". \n", ".\n") + " " + " ".join(names[0]) + "\n"


def variable_chains(
    rng: random.Random, num_chains: int, num_hops: int, name_length: int
) -> tuple[list[list[str]], list[list[str]]]:
    """RULER's chains: distinct upper-case names; "VAR A = 12345", then "VAR B = VAR A " per hop."""

    def name() -> str:
        return "".join(rng.choices(string.ascii_uppercase, k=name_length))

    names = _distinct(name, num_chains * (num_hops + 1), exclude={"VAR"})
    groups = [names[i : i + num_hops + 1] for i in range(0, len(names), num_hops + 1)]
    chains = []
    for group in groups:
        chain = [f"VAR {group[0]} = {rng.randrange(10000, 99999)}"]
        chain += [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(num_hops)]
        chains.append(chain)
    return groups, chains


def interleave(chains: list[list[str]], rng: random.Random) -> list[str]:
    """RULER's `shuffle_sublists_heap`: chains merged in random order, each keeping its own order."""
    heads = {i: rng.random() for i in range(len(chains))}
    position = [0] * len(chains)
    merged = []
    while heads:
        chain = min(heads, key=lambda i: (heads[i], i))
        merged.append(chains[chain][position[chain]])
        position[chain] += 1
        if position[chain] < len(chains[chain]):
            heads[chain] = rng.random()
        else:
            del heads[chain]
    return merged


def max_fitting(prompt: Callable[[int], str], tokenizer, limit: int, start: int) -> int:
    """The largest n >= 1 with prompt(n) at most `limit` tokens (binary search; `start` is a first guess)."""
    low, high = 0, max(1, start)
    while prompt_tokens(tokenizer, prompt(high)) <= limit:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if prompt_tokens(tokenizer, prompt(middle)) <= limit else (low, middle)
    if low == 0:
        raise ValueError(f"even the smallest prompt is longer than {limit} tokens")
    return low


# ---------------------------------------------------------------------------------------------
# Common words extraction
# ---------------------------------------------------------------------------------------------

SHORT_SEQUENCE = 4096  # RULER: below this max_seq_length, cwe uses fewer repeats and a smaller example


@dataclass
class RulerCWE(RulerTask):
    """RULER common words extraction (config cwe: 10 words x 30 among words x 3), after one example.

    As RULER, when `context_tokens + max_new_tokens` (RULER's max_seq_length) is under 4,096 the
    common words appear 6 times and the others once, and the example has 20 words (3 / 1 repeats);
    otherwise `common_repeats` / `uncommon_repeats` and a 40-word example (10 / 3 repeats).
    """

    name: ClassVar[str] = "ruler-cwe"
    summary: ClassVar[str] = "RULER common words: name the 10 most frequent words of a long numbered list"
    max_new_tokens: ClassVar[int] = 120

    common_repeats: int = 30
    uncommon_repeats: int = 3
    common_words: int = 10

    def __post_init__(self) -> None:
        _check_positive(
            common_repeats=self.common_repeats, uncommon_repeats=self.uncommon_repeats, common_words=self.common_words
        )
        if self.common_repeats <= self.uncommon_repeats:
            raise ValueError("common_repeats must be larger than uncommon_repeats")

    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        pool = essay_words()
        short = context_tokens + self.max_new_tokens < SHORT_SEQUENCE
        example_size, example_repeats = (20, (3, 1)) if short else (40, (10, 3))
        repeats = (6, 1) if short else (self.common_repeats, self.uncommon_repeats)
        example_words = rng.sample(pool, example_size)
        example_list = numbered(self.word_list(example_words, *example_repeats, rng.getrandbits(64)))
        example_answer = numbered(example_words[: self.common_words])
        order = rng.sample(pool, len(pool))
        shuffle_seed = rng.getrandbits(64)
        before, after = CWE_TEMPLATE.format(num_cw=self.common_words, context="\0").split("\0")
        answer_prefix = CWE_ANSWER_PREFIX.format(num_cw=self.common_words)
        if self.chat:
            history = [
                {"role": "user", "content": before + example_list + after},
                {"role": "assistant", "content": answer_prefix + " " + example_answer},
            ]
            lead = ""
        else:
            history, lead = [], before + example_list + after + answer_prefix + " " + example_answer + "\n"

        def build(words: int, dropped: int = 0) -> Sample:
            entries = self.word_list(order[:words], *repeats, shuffle_seed)
            listed = numbered(entries[: len(entries) - dropped])
            user_before = lead + before + listed
            context, question = render_prompt(tokenizer, self.chat, user_before, after, answer_prefix, history)
            answers = list(order[: self.common_words])
            return Sample(self.name, context, question, answers, {"num_words": words, "dropped": dropped})

        return fit_entries(build, tokenizer, context_tokens, self.common_words + 1, len(pool))

    def word_list(self, words: Sequence[str], common: int, uncommon: int, shuffle_seed: int) -> list[str]:
        """The first `common_words` words `common` times, the rest `uncommon` times, shuffled."""
        entries = list(words[: self.common_words]) * common + list(words[self.common_words :]) * uncommon
        random.Random(shuffle_seed).shuffle(entries)
        return entries


def fit_entries(build: Callable[[int, int], Sample], tokenizer, target: int, low: int, high: int) -> Sample:
    """For list tasks: the smallest size n in [low, high] whose prompt reaches `target` tokens, then
    the last entries of its (shuffled) list dropped until it fits. `build(n, dropped)`."""

    def size(n: int, dropped: int = 0) -> int:
        return sample_tokens(tokenizer, build(n, dropped))

    if size(low) > target:
        raise ValueError(f"context_tokens={target} is too small for this task: {size(low)} tokens at least")
    if size(high) < target:
        raise ValueError(f"context_tokens={target} is too large for this task: {size(high)} tokens at most")
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if size(middle) < target else (low, middle)
    dropped = 0
    while size(low, dropped) > target:
        dropped += 1
    sample = build(low, dropped)
    sample.meta["prompt_tokens"] = size(low, dropped)
    return sample


def numbered(words: Sequence[str]) -> str:
    """RULER's list format: "1. word 2. word ..."."""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


# ---------------------------------------------------------------------------------------------
# Frequent words extraction
# ---------------------------------------------------------------------------------------------


@dataclass
class RulerFWE(RulerTask):
    """RULER frequent words extraction (config fwe: alpha 2.0; coded words of 6 letters).

    The vocabulary has (RULER's max_seq_length) // 50 words, here (context_tokens + max_new_tokens)
    // 50; the word of rank k appears floor(n k^-alpha / zeta(alpha)) times, in random order, with
    the smallest n that reaches the target and the last few words dropped to fit (as cwe); rank 1
    is '...' (noise the prompt says to ignore) and ranks 2-4 are the answer.
    """

    name: ClassVar[str] = "ruler-fwe"
    summary: ClassVar[str] = "RULER frequent words: name the 3 most frequent coded words of a Zipf-distributed text"
    max_new_tokens: ClassVar[int] = 50

    alpha: float = 2.0
    coded_word_length: int = 6

    def __post_init__(self) -> None:
        if self.alpha <= 1:
            raise ValueError(f"alpha must be above 1 (the zeta function diverges at 1); got {self.alpha}")
        _check_positive(coded_word_length=self.coded_word_length)

    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        vocab_size = (context_tokens + self.max_new_tokens) // 50
        if vocab_size < 5:
            raise ValueError(f"context_tokens={context_tokens} is too small for ruler-fwe (under 5 coded words)")
        def coded_word() -> str:
            return "".join(rng.choices(string.ascii_lowercase, k=self.coded_word_length))

        vocab = sorted(_distinct(coded_word, vocab_size))
        rng.shuffle(vocab)
        vocab[0] = "..."
        shuffle_seed = rng.getrandbits(64)
        before, after = FWE_TEMPLATE.split("{context}")
        zeta = riemann_zeta(self.alpha)

        def build(words: int, dropped: int = 0) -> Sample:
            entries = [w for rank, w in enumerate(vocab, start=1) for _ in range(int(words * rank**-self.alpha / zeta))]
            random.Random(shuffle_seed).shuffle(entries)
            text = " ".join(entries[: len(entries) - dropped])
            context, question = render_prompt(tokenizer, self.chat, before + text, after, FWE_ANSWER_PREFIX)
            return Sample(self.name, context, question, vocab[1:4], {"num_words": words, "dropped": dropped})

        sample = fit_entries(build, tokenizer, context_tokens, 1, 4 * context_tokens)
        if any(answer not in sample.context for answer in sample.answers):
            raise ValueError(f"context_tokens={context_tokens} is too small for ruler-fwe: not every answer appears")
        return sample


def riemann_zeta(s: float, terms: int = 64) -> float:
    """zeta(s) for s > 1: a partial sum plus the Euler-Maclaurin tail (error far below 1e-12)."""
    n = float(terms)
    head = sum(k**-s for k in range(1, terms))
    tail = n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    return head + tail


# ---------------------------------------------------------------------------------------------
# RULER's configurations (kvmerger/data/ruler/synthetic.yaml)
# ---------------------------------------------------------------------------------------------

RULER_CONFIGS: dict[str, RulerTask] = {
    "niah_single_1": RulerNIAH(variant="single", haystack="noise", key_type="words", value_type="numbers"),
    "niah_single_2": RulerNIAH(variant="single", haystack="essay", key_type="words", value_type="numbers"),
    "niah_single_3": RulerNIAH(variant="single", haystack="essay", key_type="words", value_type="uuids"),
    "niah_multikey_1": RulerNIAH(variant="multikey", haystack="essay", key_type="words", value_type="numbers"),
    "niah_multikey_2": RulerNIAH(variant="multikey", haystack="needle", key_type="words", value_type="numbers"),
    "niah_multikey_3": RulerNIAH(variant="multikey", haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": RulerNIAH(variant="multivalue", haystack="essay", key_type="words", value_type="numbers"),
    "niah_multiquery": RulerNIAH(variant="multiquery", haystack="essay", key_type="words", value_type="numbers"),
    "vt": RulerVT(num_chains=1, num_hops=4, haystack="noise"),
    "cwe": RulerCWE(common_repeats=30, uncommon_repeats=3, common_words=10),
    "fwe": RulerFWE(alpha=2.0),
}
"""RULER's synthetic configurations (its qa_1 / qa_2 need SQuAD and HotpotQA, not shipped)."""


def ruler_task(config: str, chat: bool = True) -> RulerTask:
    """The task for one of RULER's configuration names, e.g. `ruler_task("niah_multikey_2")`."""
    _check_choice("config", config, tuple(RULER_CONFIGS))
    return replace(RULER_CONFIGS[config], chat=chat)
