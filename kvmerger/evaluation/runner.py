"""The evaluation loop: every task x length x sample, prefilled once, then every method x budget.

For each sample and protocol the prompt is prefilled once with the full cache (`record_prefill`);
every method at every budget then compresses that same prefill (`compress_prefill`, which shares
the memoised attention statistics), answers or scores from its compressed cache, and leaves one
record per cell in `records.jsonl` (see records.py). So a sample costs one prefill, one scoring
pass per kind of statistic, and then only compression and decoding per method.

* Question-answering tasks run under the protocols asked for: "query-aware" (context and question
  prefilled and compressed together; the first answer token comes from the full-cache prefill,
  see generation.py) and "query-agnostic" (the context compressed, the question fed after).
* Language modelling ("lm") has one protocol, "teacher-forced": the prefix is compressed, the
  continuation fed in one chunk, and the full cache's distributions (computed once per window) are
  the reference for the KL. Each record's `metrics` hold the task's `measure`: perplexity, NLL, the
  mean KL, its 99th percentile and worst token (`kl_p99`, `kl_max`), and the top-1 agreement and
  its complement `top1_changed`.
* "full" (no compression) runs once per sample, at budget 1.0, whatever the budgets.
* Resume: cells whose key is already in `records.jsonl` are skipped, and a sample is prefilled
  only if one of its cells is missing. A results folder holds one model: resuming with another
  model is refused.
* Executors: `Runner.run` runs the groups one after the other in this process, each record
  appended as soon as its cell is done. `Runner.compute_group` computes one group and hands each
  record to a callback, so that another executor (ray_executor.py: one Ray task per group) can
  collect a group's records and append them where it likes.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from kvmerger.engine.session import Prefill, compress_prefill, record_prefill
from kvmerger.evaluation.generation import Answer, answer_query_agnostic, answer_query_aware, feed, stop_token_ids
from kvmerger.evaluation.progress import CellProgress
from kvmerger.evaluation.records import RecordStore, cell_identity, cell_key, model_identity, provenance
from kvmerger.evaluation.tasks import get_task
from kvmerger.evaluation.tasks.base import Question, Sample, Task
from kvmerger.evaluation.tasks.language_modeling import LanguageModeling, Window
from kvmerger.methods import METHODS, CompressionMethod, FullCache, get_method

PROTOCOLS = ("query-aware", "query-agnostic")
TEACHER_FORCED = "teacher-forced"

Emit = Callable[[dict[str, Any]], None]  # receives each record as soon as its cell is done


# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------


def non_default_fields(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The dataclass fields of `obj` that differ from their defaults (fields without one count)."""
    changed = {}
    for f in fields(obj):
        if f.name in skip:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        value = getattr(obj, f.name)
        if default is MISSING or value != default:
            changed[f.name] = value
    return changed


def _label(name: str, params: dict[str, Any]) -> str:
    return name if not params else f"{name}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def task_label(task: Any) -> str:
    """The task's name with its non-default parameters, e.g. "passkey[chat=True]" (folders left out)."""
    skip = [f.name for f in fields(task) if f.name.endswith(("dir", "path"))]
    return _label(task.name, non_default_fields(task, skip))


def method_label(method: CompressionMethod) -> str:
    """The method's name with its non-default parameters except the budget, e.g. "kvmerger[mode=paper]"."""
    return _label(method.name, non_default_fields(method, ["budget"]))


def check_protocols(protocols: Iterable[str]) -> None:
    """Refuse an empty or unknown list of question protocols, naming the known ones."""
    protocols = tuple(protocols)
    if not protocols or any(protocol not in PROTOCOLS for protocol in protocols):
        raise ValueError(f"protocols must be some of {', '.join(PROTOCOLS)}; got {protocols}")


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """"kvmerger:mode=paper,sigma=5" -> ("kvmerger", {"mode": "paper", "sigma": 5}) (values as Python literals)."""
    from kvmerger.cli.options import parse_params

    name, _, rest = text.partition(":")
    pairs = [pair for pair in rest.split(",") if pair.strip()] if rest else []
    return name.strip(), parse_params(pairs)


@dataclass
class TaskPlan:
    """One task, the context lengths to run it at, and how many samples per length."""

    task: Task | LanguageModeling
    lengths: tuple[int, ...]
    samples: int
    protocols: tuple[str, ...] | None = None  # None: the run's protocols

    def __post_init__(self) -> None:
        if self.protocols is not None:
            check_protocols(self.protocols)
        self.lengths = tuple(int(length) for length in self.lengths)
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"context lengths must be at least 2 tokens; got {list(self.lengths)}")
        if self.samples < 1:
            raise ValueError(f"the number of samples must be at least 1; got {self.samples}")

    @classmethod
    def parse(
        cls,
        text: str,
        lengths: Iterable[int],
        samples: int,
        shared: dict[str, Any] | None = None,
        protocols: tuple[str, ...] | None = None,
    ) -> TaskPlan:
        """From a spec "name:param=value,..."; `shared` parameters go to the tasks that have them."""
        from kvmerger.evaluation.tasks import TASKS

        name, params = parse_spec(text)
        if name in TASKS:
            known = {f.name for f in fields(TASKS[name])}
            params = {**{k: v for k, v in (shared or {}).items() if k in known}, **params}
        return cls(get_task(name, **params), tuple(lengths), samples, protocols)

    @property
    def label(self) -> str:
        return task_label(self.task)

    @property
    def is_language_modeling(self) -> bool:
        return isinstance(self.task, LanguageModeling)


@dataclass
class MethodSpec:
    """A registered method with fixed parameters; `variants(budgets)` builds it at each budget."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    # The question protocols it runs under (None: the task's). Language modelling runs every method:
    # its continuation is no question, so it reads the same under both.
    protocols: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        import kvmerger.methods  # noqa: F401  (registers every method)

        self.name = self.name.lower().replace("_", "-")
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; known methods: {', '.join(sorted(METHODS))}")
        if self.protocols is not None:
            check_protocols(self.protocols)
        if "budget" in self.params:
            raise ValueError(f"give budgets with --budgets, not as a parameter of {self.name}")
        self.variants([0.5])  # build once now, so that a bad parameter fails before any work

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, params = parse_spec(text)
        return cls(name, params)

    def runs_under(self, protocol: str) -> bool:
        return self.protocols is None or protocol == TEACHER_FORCED or protocol in self.protocols

    def variants(self, budgets: Iterable[float]) -> list[CompressionMethod]:
        if self.name == FullCache.name:
            return [FullCache(**self.params)]
        return [get_method(self.name, budget=budget, **self.params) for budget in budgets]


def all_methods() -> list[MethodSpec]:
    """"full", then every registered method with its default parameters (KVMerger first)."""
    names = sorted(METHODS, key=lambda name: (name != "kvmerger", name))
    return [MethodSpec("full")] + [MethodSpec(name) for name in names if name != "full"]


@dataclass
class RunSettings:
    plans: list[TaskPlan]
    methods: list[MethodSpec]
    budgets: list[float]
    protocols: list[str] = field(default_factory=lambda: ["query-aware"])
    seed: int = 0

    def __post_init__(self) -> None:
        check_protocols(self.protocols)
        for budget in self.budgets:
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"a budget is the share of the prompt's cache kept, in (0, 1]; got {budget}")
        if not self.methods:
            raise ValueError("no method to evaluate")
        if not self.plans:
            raise ValueError("no task to evaluate")

    def spec_variants(self) -> list[tuple[MethodSpec, CompressionMethod]]:
        """Every method at every budget, with the spec it was built from."""
        return [(spec, method) for spec in self.methods for method in spec.variants(self.budgets)]

    def variants(self) -> list[CompressionMethod]:
        return [method for _, method in self.spec_variants()]

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": [
                {"task": plan.task.describe(), "lengths": plan.lengths, "samples": plan.samples, "protocols": plan.protocols}
                for plan in self.plans
            ],
            "methods": [
                {"method": spec.name, "params": spec.params} | ({"protocols": spec.protocols} if spec.protocols else {})
                for spec in self.methods
            ],
            "budgets": self.budgets,
            "protocols": self.protocols,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------------------------
# Cells and groups (one prefill each)
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    method: CompressionMethod
    label: str
    key: str


@dataclass
class Group:
    """One sample under one protocol: one prefill, shared by its cells."""

    plan: TaskPlan
    length: int
    index: int
    sample: Sample | Window
    protocol: str
    cells: list[Cell]

    @property
    def title(self) -> str:
        return f"{self.plan.label} {self.length} #{self.index} {self.protocol}"


@dataclass
class RunOutcome:
    folder: Path
    cells: int  # in the plan
    skipped: int  # found finished in records.jsonl
    ran: int
    truncated: str | None  # the incomplete last line a crash had left, if any
    seconds: float


def context_limit(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def check_same_model(folder: Path, model_info: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Refuse to add results of the model `model_info` describes to a folder of another model's."""
    mine = {k: model_info[k] for k in ("config_hash", "weights_fingerprint")}
    for record in records:
        theirs = record.get("provenance", {}).get("model", {})
        if {k: theirs.get(k) for k in mine} != mine:
            raise ValueError(
                f"{folder} holds results of another model ({theirs.get('name')}, weights "
                f"{theirs.get('weights_fingerprint')}); choose another --out for {model_info['name']}"
            )


class Runner:
    """Runs `settings` on `model` and appends one record per cell to `folder`/records.jsonl."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        settings: RunSettings,
        folder: Path,
        *,
        model_name: str,
        progress: bool = True,
        command: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.store = RecordStore(folder)
        self.progress = progress
        self.device = next(model.parameters()).device
        self.model_info = model_identity(model, model_name)
        self.provenance = provenance(self.model_info, self.device, command)
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.check_lengths()

    # -- checks ----------------------------------------------------------------------------
    def check_lengths(self) -> None:
        limit = context_limit(self.model)
        if limit is None:
            return
        for plan in self.settings.plans:
            extra = plan.task.continuation if plan.is_language_modeling else plan.task.max_new_tokens
            for length in plan.lengths:
                if length + extra > limit:
                    raise ValueError(
                        f"{plan.label} at {length} tokens needs {length + extra} positions ({extra} "
                        f"{'continuation' if plan.is_language_modeling else 'answer'} tokens included), more than "
                        f"this model's context of {limit} tokens; use lengths up to {limit - extra}"
                    )

    def check_model(self, records: list[dict[str, Any]]) -> None:
        check_same_model(self.store.folder, self.model_info, records)

    # -- planning --------------------------------------------------------------------------
    def groups(self, done: set[str]) -> tuple[list[Group], int]:
        """The groups with at least one cell to run, and the number of cells in the plan."""
        variants = self.settings.spec_variants()
        labels = [method_label(method) for _, method in variants]
        groups, total = [], 0
        for plan in self.settings.plans:
            if plan.is_language_modeling:
                protocols = [TEACHER_FORCED]
            else:
                protocols = list(plan.protocols) if plan.protocols is not None else self.settings.protocols
            task_info, label = plan.task.describe(), plan.label
            for length in plan.lengths:
                samples = plan.task.samples(self.tokenizer, length, plan.samples, self.settings.seed)
                for index, sample in enumerate(samples):
                    for protocol in protocols:
                        cells = []
                        for (spec, method), name in zip(variants, labels, strict=True):
                            if not spec.runs_under(protocol):
                                continue
                            identity = cell_identity(
                                self.model_info, task_info, length, index, self.settings.seed, protocol, method.describe()
                            )
                            cells.append(Cell(method, name, cell_key(identity, label, _budget_label(name, method))))
                        total += len(cells)
                        pending = [cell for cell in cells if cell.key not in done]
                        if pending:
                            groups.append(Group(plan, length, index, sample, protocol, pending))
        return groups, total

    # -- running ---------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        start = time.perf_counter()
        loaded = self.store.load()
        self.check_model(loaded.records)
        groups, total = self.groups(loaded.keys)
        pending = sum(len(group.cells) for group in groups)
        bar = CellProgress(groups, enabled=self.progress)
        try:
            for group in groups:
                bar.set_description(group.title)
                self.compute_group(group, self.store.append, bar)
                bar.group_done(group)
        finally:
            bar.close()
        return RunOutcome(self.store.folder, total, total - pending, pending, loaded.truncated, time.perf_counter() - start)

    def compute_group(self, group: Group, emit: Emit, bar: CellProgress | None = None) -> None:
        """Run every cell of `group` (one prefill), handing each cell's record to `emit` as soon as the
        cell is done; `bar`, if given, advances by one per cell."""
        bar = bar or CellProgress([], enabled=False)
        if group.plan.is_language_modeling:
            self.run_language_modeling(group, bar, emit)
        else:
            self.run_question_answering(group, bar, emit)

    def run_question_answering(self, group: Group, bar: CellProgress, emit: Emit) -> None:
        """Query-aware: one prefill of context + question per question, every cell compressing it.
        Query-agnostic (compress once, ask many): one prefill of the context, compressed once per
        cell, every question asked from its own copy of that compressed cache."""
        task, sample = group.plan.task, group.sample
        questions = sample.questions()
        context_ids = self._ids(sample.context, special=True)
        question_ids = [self._ids(question.question, special=False) for question in questions]
        longest = max(ids.shape[1] for ids in question_ids)
        self._check_fits(group, context_ids.shape[1] + longest + task.max_new_tokens)
        options = dict(max_new_tokens=task.max_new_tokens, stop_strings=task.stop_strings, eos_ids=self.eos_ids)
        outcomes: dict[str, CellOutcome] = {cell.key: CellOutcome() for cell in group.cells}

        def finish(cell: Cell) -> None:  # each cell is written as soon as its last question is answered
            outcome = outcomes[cell.key]
            emit(self._record(group, cell, outcome, outcome.result(task.metric), longest))
            bar.update(1)

        if group.protocol == "query-aware":
            for number, (question, ids) in enumerate(zip(questions, question_ids, strict=True), start=1):
                prefill = record_prefill(self.model, torch.cat([context_ids, ids], dim=1), tokenizer=self.tokenizer)
                for cell in group.cells:
                    bar.set_postfix_str(cell.label + _budget_suffix(cell.method), refresh=False)
                    cache, report = compress_prefill(prefill, cell.method)
                    answer = answer_query_aware(self.model, self.tokenizer, prefill.last_logits, cache, **options)
                    outcomes[cell.key].add(prefill, report, question, answer, task.score(answer.text, sample.asking(question)))
                    del cache
                    if number == len(questions):
                        finish(cell)
        else:
            prefill = record_prefill(self.model, context_ids, tokenizer=self.tokenizer)
            for cell in group.cells:
                bar.set_postfix_str(cell.label + _budget_suffix(cell.method), refresh=False)
                cache, report = compress_prefill(prefill, cell.method)
                for question, ids in zip(questions, question_ids, strict=True):
                    answer = answer_query_agnostic(
                        self.model, self.tokenizer, prefill.last_logits, cache.fork(), ids, **options
                    )
                    outcomes[cell.key].add(prefill, report, question, answer, task.score(answer.text, sample.asking(question)))
                del cache
                finish(cell)

    def run_language_modeling(self, group: Group, bar: CellProgress, emit: Emit) -> None:
        task, window = group.plan.task, group.sample
        prefix = torch.tensor([window.prefix_ids], device=self.device)
        fed, targets = window.fed.to(self.device), window.targets.to(self.device)
        self._check_fits(group, prefix.shape[1] + fed.shape[1])
        prefill = record_prefill(self.model, prefix, tokenizer=self.tokenizer)
        full_cache, full_report = compress_prefill(prefill, FullCache())
        started = time.perf_counter()
        reference = feed(self.model, full_cache, fed, last_only=False)
        reference_seconds = time.perf_counter() - started
        del full_cache
        for cell in group.cells:
            bar.set_postfix_str(cell.label + _budget_suffix(cell.method), refresh=False)
            if isinstance(cell.method, FullCache):
                logits, report, seconds = reference, full_report, reference_seconds
            else:
                cache, report = compress_prefill(prefill, cell.method)
                started = time.perf_counter()
                logits = feed(self.model, cache, fed, last_only=False)
                seconds = time.perf_counter() - started
                del cache
            metrics = task.measure(reference, logits, targets)
            result = {
                "score": metrics["top1_agreement"],
                "metric": "top1_agreement",
                "metrics": metrics,
                "scored_tokens": targets.shape[1],
            }
            emit(self._record(group, cell, CellOutcome.single(prefill, report, seconds), result, fed.shape[1]))
            bar.update(1)

    # -- helpers ---------------------------------------------------------------------------
    def _ids(self, text: str, *, special: bool) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids
        return ids.to(self.device)

    def _check_fits(self, group: Group, positions: int) -> None:
        limit = context_limit(self.model)
        if limit is not None and positions > limit:
            raise ValueError(
                f"a {group.plan.label} sample of length {group.length} needs {positions} positions, more than this "
                f"model's context of {limit} tokens; ask for shorter lengths"
            )

    def _record(
        self, group: Group, cell: Cell, outcome: CellOutcome, result: dict[str, Any], question_tokens: int
    ) -> dict[str, Any]:
        report = outcome.report
        merged = report.merge_set_sizes()
        merged_sets = sum(merged.values())
        record = {
            "key": cell.key,
            "task": group.plan.label,
            "task_name": group.plan.task.name,
            "task_params": group.plan.task.describe(),
            "length": group.length,
            "sample": group.index,
            "seed": self.settings.seed,
            "protocol": group.protocol,
            "method": cell.method.name,
            "method_label": cell.label,
            "method_params": cell.method.describe(),
            "budget": float(cell.method.budget),
            "prefill_tokens": outcome.prefill_tokens,
            "question_tokens": question_tokens,
            "sample_meta": group.sample.meta,
            **result,
            "cache": {
                "bytes_before": report.bytes_before,
                "bytes_after": report.bytes_after,
                "memory_ratio": report.memory_ratio,
                "cache_bytes_before": report.cache_bytes_before,
                "cache_bytes_after": report.cache_bytes_after,
                "cache_memory_ratio": report.cache_memory_ratio,
                "kept_layers": [layer.layer for layer in report.kept_layers],
                "slots_after": [layer.slots_after for layer in report.layers],
                "merge_sets": merged_sets,
                "mean_merge_set_size": (sum(s * n for s, n in merged.items()) / merged_sets) if merged_sets else None,
            },
            "seconds": {
                "prefill": outcome.prefill_seconds,
                "scoring": outcome.scoring_seconds,
                "compressing": outcome.compressing_seconds,
                "decoding": outcome.decoding_seconds,
            },
            "provenance": {**self.provenance, "date": _now()},
        }
        return record


@dataclass
class CellOutcome:
    """What one cell did over its sample's questions: the first compression's report, summed times
    (prefills, statistics, compression, answers) and one result per question."""

    report: Any = None
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    scoring_seconds: float = 0.0
    compressing_seconds: float = 0.0
    decoding_seconds: float = 0.0
    answers: list[dict[str, Any]] = field(default_factory=list)
    _reports: set[int] = field(default_factory=set)
    _prefills: set[int] = field(default_factory=set)

    @classmethod
    def single(cls, prefill: Prefill, report, decoding_seconds: float) -> CellOutcome:
        outcome = cls()
        outcome.count(prefill, report)
        outcome.decoding_seconds = decoding_seconds
        return outcome

    def count(self, prefill: Prefill, report) -> None:
        """Add a prefill's and a compression's times, once each."""
        if self.report is None:
            self.report, self.prefill_tokens = report, prefill.length
        if id(prefill) not in self._prefills:
            self._prefills.add(id(prefill))
            self.prefill_seconds += prefill.seconds
        if id(report) not in self._reports:
            self._reports.add(id(report))
            self.scoring_seconds += report.seconds_scoring
            self.compressing_seconds += report.seconds_compressing

    def add(self, prefill: Prefill, report, question: Question, answer: Answer, score: float) -> None:
        self.count(prefill, report)
        self.decoding_seconds += answer.seconds
        self.answers.append(
            {
                "question": question.question,
                "answers": question.answers,
                "prediction": answer.text,
                "stop": answer.stop,
                "generated_tokens": len(answer.tokens),
                "score": float(score),
            }
        )

    def result(self, metric: str) -> dict[str, Any]:
        """The record's result fields: the first question's answer, the mean score (`metric`, the
        task's), and with several questions every question's own result (`questions`)."""
        first = self.answers[0]
        result = {
            "answers": first["answers"],
            "prediction": first["prediction"],
            "stop": first["stop"],
            "generated_tokens": first["generated_tokens"],
            "score": statistics.fmean(answer["score"] for answer in self.answers),
            "metric": metric,
            "metrics": {},
        }
        if len(self.answers) > 1:
            result["questions"] = self.answers
        return result


def _budget_label(label: str, method: CompressionMethod) -> str:
    return label + _budget_suffix(method)


def _budget_suffix(method: CompressionMethod) -> str:
    return f"@{method.budget:g}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
