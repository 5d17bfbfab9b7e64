"""LongBench, run the way its reference code runs it, on data from a local folder.

Paper: Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
ACL 2024, arXiv 2308.14508. Reference code: THUDM/LongBench @ 2e00731f, `pred.py` (prompt, middle
truncation, chat template, greedy decoding), `eval.py` (first-line rule, best over answers) and
`metrics.py`; its `config/dataset2prompt.json` and `config/dataset2maxlen.json` are shipped in
kvmerger/data/longbench/ and used verbatim.

Task "longbench", fields:
* `dataset`: a LongBench task name (narrativeqa, qasper, ..., lcc, repobench-p), or a LongBench-E
  one (`hotpotqa_e`, ...), which has the same prompt, length and metric.
* `data_dir`: a folder of `{dataset}.jsonl` files in LongBench's schema (`input`, `context`,
  `answers`, `length`, `dataset`, `language`, `all_classes`, `_id`): the `data/` folder of
  `data.zip` in the THUDM/LongBench dataset on the Hugging Face hub. Required to read samples:
  kvmerger never downloads anything, so without it `check_data()` (run by `kvmerger eval` before
  the model loads) and `samples()` raise a FileNotFoundError that says where to get the files.
* `chat`: wrap the prompt in the model's chat template; default as LongBench: on, except trec,
  triviaqa, samsum, lsht, lcc and repobench-p.
* `random_subset`: `samples(count=n)` takes the first n rows in file order (default), or n rows
  drawn with the seed (kept in file order). The seed plays no other part: the data are fixed.

Prompt. `dataset2prompt[dataset].format(context=..., input=...)`; when it has more tokens than
`context_tokens` (LongBench's max_length, model2maxlen), it keeps the first and the last
int(context_tokens / 2) tokens, each half decoded without special tokens (pred.py). The chat template
is applied after truncation, so a chat prompt is longer than `context_tokens` by its markup, as in
LongBench. Tokens are counted with the tokenizer's own special tokens, as pred.py does.

Context and question (the two protocols). `context` is the prompt up to the end of the row's
context, `question` is everything after it, formatted: for the QA tasks the repeated instruction,
"Question: {input}" and "Answer:"; for few-shot tasks (trec, triviaqa, samsum, lsht) the test item;
for repobench-p the in-file code; for tasks with no `{input}` (gov_report, multi_news, vcsum,
passage_count, lcc) only the closing instruction. Query-agnostic then compresses the opening
instruction with the context. Every official template puts `{input}` after `{context}` only; their
opening instructions describe the task (qasper's and narrativeqa's even announce "a question")
without giving it. A template with `{input}` before the context would carry the question inside
the compressed part, and query-agnostic would then not be blind to it. When truncation cuts into
the question itself (a question longer than half the budget), `context` is the first half and
`question` the last, and `meta["question_cut"]` is set.

Generation: `generation_length()` (also `max_new_tokens`) is dataset2maxlen[dataset] (32 to 512
new tokens), to be used with greedy decoding; `stop_strings` is ("\n",) for samsum, which pred.py
stops at a newline, and empty otherwise.

Scoring: the dataset's metric from eval.py, best over the gold answers, in [0, 1] (LongBench
reports the mean x 100); for trec, triviaqa, samsum and lsht only the first line of the
prediction (after leading newlines) is scored. The metrics live in kvmerger.evaluation.metrics;
the Chinese qa-F1 and ROUGE (multifieldqa_zh, dureader, vcsum) need jieba, which kvmerger does not
install: those datasets raise ImportError at construction when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from kvmerger.evaluation.metrics import (
    best_over_answers,
    classification_score,
    code_sim_score,
    count_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l,
    rouge_zh_score,
)
from kvmerger.evaluation.tasks.base import Sample, Task
from kvmerger.evaluation.tasks.prompting import render_prompt
from kvmerger.evaluation.texts import data_path

METRICS: dict[str, Callable[..., float]] = {  # eval.py dataset2metric
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # pred.py
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})  # eval.py
NEEDS_JIEBA = frozenset({"multifieldqa_zh", "dureader", "vcsum"})
LONGBENCH_E = frozenset(
    {
        "qasper",
        "multifieldqa_en",
        "hotpotqa",
        "2wikimqa",
        "gov_report",
        "multi_news",
        "trec",
        "triviaqa",
        "samsum",
        "passage_count",
        "passage_retrieval_en",
        "lcc",
        "repobench-p",
    }
)
REQUIRED_FIELDS = ("input", "context", "answers")
HOW_TO_GET_DATA = (
    "Download data.zip from the Hugging Face dataset THUDM/LongBench "
    "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it, and pass its "
    "data/ folder (it holds one {task}.jsonl file per task) as --data-dir on the command line, data_dir in Python."
)


@lru_cache(maxsize=1)
def prompts() -> dict[str, str]:
    """LongBench's dataset2prompt.json."""
    return json.loads(data_path("longbench", "dataset2prompt.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def generation_lengths() -> dict[str, int]:
    """LongBench's dataset2maxlen.json."""
    return json.loads(data_path("longbench", "dataset2maxlen.json").read_text(encoding="utf-8"))


def datasets() -> list[str]:
    """Every dataset name the task accepts: LongBench's 21 and the 13 LongBench-E ones."""
    return [*prompts(), *(f"{name}_e" for name in sorted(LONGBENCH_E))]


@dataclass
class LongBench(Task):
    """A LongBench dataset from a local folder of `{dataset}.jsonl` (see the module docstring)."""

    name: ClassVar[str] = "longbench"
    summary: ClassVar[str] = "LongBench (official prompts, middle truncation and metrics) from a folder of {task}.jsonl"

    dataset: str = "hotpotqa"
    data_dir: str | None = None
    chat: bool | None = None
    random_subset: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in datasets():
            raise ValueError(f"unknown LongBench dataset {self.dataset!r}; known: {', '.join(datasets())}")
        if self.chat is None:
            self.chat = self.base not in NO_CHAT
        if self.base in NEEDS_JIEBA and importlib.util.find_spec("jieba") is None:
            raise ImportError(
                f"scoring {self.dataset} segments Chinese words with jieba, which is not installed: pip install jieba"
            )

    @property
    def base(self) -> str:
        """The LongBench task name (a LongBench-E name without its `_e`)."""
        return self.dataset if self.dataset in prompts() else self.dataset.removesuffix("_e")

    def generation_length(self) -> int:
        """New tokens to generate for this dataset (LongBench's dataset2maxlen)."""
        return generation_lengths()[self.base]

    @property
    def metric(self) -> str:  # type: ignore[override]  # depends on the dataset
        """The name of the dataset's LongBench metric (eval.py's dataset2metric)."""
        return METRICS[self.base].__name__

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]  # depends on the dataset
        return self.generation_length()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """pred.py ends samsum answers at a newline (the model would go on with another "Dialogue");
        every other dataset runs to end-of-sequence or the generation length."""
        return ("\n",) if self.base == "samsum" else ()

    # -- data ------------------------------------------------------------------------------------

    def check_data(self) -> None:
        """The dataset's file is in `data_dir` (FileNotFoundError otherwise); the rows are read later."""
        self.data_file()

    def data_file(self) -> Path:
        """The `{dataset}.jsonl` file in `data_dir` (FileNotFoundError saying where to get it)."""
        if self.data_dir is None:
            raise FileNotFoundError(
                f"LongBench's {self.dataset} needs its data, which kvmerger does not download. {HOW_TO_GET_DATA}"
            )
        path = Path(self.data_dir).expanduser() / f"{self.dataset}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"LongBench data for {self.dataset!r} not found: expected the file {path.name} in the folder "
                f"{path.parent}. {HOW_TO_GET_DATA}"
            )
        return path

    def rows(self) -> list[dict[str, Any]]:
        """The dataset's rows in file order, each checked for the fields the prompt and metric need."""
        path = self.data_file()
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON object: {error}") from error
            missing = [field for field in REQUIRED_FIELDS if field not in row]
            if missing:
                raise ValueError(f"{path}:{number} lacks the LongBench field(s) {', '.join(missing)}")
            rows.append(row)
        return rows

    # -- samples and scores --------------------------------------------------------------------

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
        """Up to `count` samples (fewer if the file has fewer rows), prompts cut to `context_tokens`."""
        if context_tokens < 2 or count < 0:
            raise ValueError(f"context_tokens must be at least 2 and count non-negative; got {context_tokens}, {count}")
        rows = self.rows()
        count = min(count, len(rows))
        if self.random_subset:
            indices = sorted(random.Random(f"{self.name}/{self.dataset}/{seed}").sample(range(len(rows)), count))
        else:
            indices = list(range(count))
        return [self.sample(tokenizer, rows[index], index, context_tokens) for index in indices]

    def sample(self, tokenizer, row: dict[str, Any], index: int, context_tokens: int) -> Sample:
        head, tail = prompts()[self.base].split("{context}")
        question = tail.replace("{input}", row["input"])
        prompt = head.replace("{input}", row["input"]) + row["context"] + question
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        truncated = len(ids) > context_tokens
        question_cut = False
        if truncated:
            first, last = middle_truncation(tokenizer, ids, context_tokens)
            question_cut = not last.endswith(question)
            context, question = (first, last) if question_cut else (first + last[: len(last) - len(question)], question)
        else:
            context = prompt[: len(prompt) - len(question)]
        if self.chat:
            context, question = render_prompt(tokenizer, True, context, question)
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        meta = {
            "dataset": self.dataset,
            "row": index,
            "_id": row.get("_id"),
            "length": row.get("length"),
            "language": row.get("language"),
            "all_classes": row.get("all_classes") or [],
            "truncated": truncated,
            "question_cut": question_cut,
            "chat": self.chat,
        }
        return Sample(self.name, context, question, [str(answer) for answer in answers], meta)

    def score(self, prediction: str, sample: Sample) -> float:
        """The dataset's LongBench metric, best over the gold answers, in [0, 1]."""
        if self.base in FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        metric = METRICS[self.base]
        extra = {"all_classes": sample.meta["all_classes"]} if metric is classification_score else {}
        return best_over_answers(metric, prediction, sample.answers, **extra)


def middle_truncation(tokenizer, ids: list[int], max_length: int) -> tuple[str, str]:
    """LongBench pred.py: the first and the last int(max_length / 2) tokens, each decoded without
    special tokens; the prompt is their concatenation."""
    half = int(max_length / 2)
    return (
        tokenizer.decode(ids[:half], skip_special_tokens=True),
        tokenizer.decode(ids[-half:], skip_special_tokens=True),
    )
