"""From records to what a person reads: `summary.csv`, the figures and `report.md`.

* `summarize(records)`: one row per (task, protocol, method, budget): the number of cells, the
  mean score and its standard error with the name of the metric it is (`metric`: the task's, e.g.
  contains_answer for the pass key, keyword_recall for the needle, and top1_agreement, the share of
  tokens whose top prediction matches the full cache's, for language modelling), for language
  modelling the perplexity (exp of the mean NLL over all scored tokens), the mean KL to the full
  cache and the top-1 agreement, the mean memory ratio (over the compressed layers, and in
  `cache_memory_ratio` over the whole cache, layers kept as they are included, e.g. sliding-window
  layers), and timings in milliseconds per cell.
  `compressing_ms` is the method's own step and `decoding_ms` its answer or continuation.
  `shared_scoring_ms` is reported once per sample, in its own column, charged to no method: the
  attention statistics (H2O's aggregated attention, SnapKV's and TOVA's windows) are computed once
  per sample and shared by every method of the run that asks for them (KVMerger, H2O, CaM, SnapKV,
  TOVA, the fitted methods; not the full cache, K-norm, random or StreamingLLM); the column holds
  their total for the row's samples, the mean over its cells. A method run alone pays the
  statistics it needs in full.
* `report_markdown`: the results table (method x task), the figures, and plain sentences on where
  KVMerger wins and where it loses against the best other method at each budget. Differences in
  scores smaller than the standard errors are called ties, not wins. Language modelling is judged
  by the KL to the full cache (fidelity); its perplexity is shown but not judged, since a
  compressed cache can score a lower perplexity than the full one on a short continuation.
* `write_outputs`: all of it for a results folder, each file written atomically.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmerger.evaluation.records import RecordStore, write_atomically

SUMMARY_COLUMNS = [
    "task",
    "protocol",
    "method",
    "budget",
    "cells",
    "lengths",
    "metric",
    "score",
    "score_stderr",
    "perplexity",
    "kl",
    "top1_agreement",
    "memory_ratio",
    "cache_memory_ratio",
    "shared_scoring_ms",
    "compressing_ms",
    "decoding_ms",
]
KVMERGER = "kvmerger"


@dataclass
class Row:
    task: str
    protocol: str
    method: str  # the method's label (name and non-default parameters)
    method_name: str
    budget: float
    cells: int
    lengths: list[int]
    metric: str  # what `score` measures
    score: float
    score_stderr: float
    perplexity: float | None
    kl: float | None
    top1_agreement: float | None
    memory_ratio: float  # the compressed layers' bytes after over before
    cache_memory_ratio: float  # the same over the whole cache, layers kept as they are included
    shared_scoring_ms: float
    compressing_ms: float
    decoding_ms: float

    @property
    def is_language_modeling(self) -> bool:
        return self.kl is not None

    def as_csv(self) -> dict[str, Any]:
        values = {column: getattr(self, column) for column in SUMMARY_COLUMNS}
        values["lengths"] = " ".join(str(length) for length in self.lengths)
        return {k: _csv_number(v) for k, v in values.items()}


def _csv_number(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def method_order(label: str, name: str) -> tuple:
    """full first, then KVMerger variants, then the rest alphabetically."""
    return (name != "full", name != KVMERGER, label)


def summarize(records: Iterable[dict[str, Any]]) -> list[Row]:
    records = list(records)
    shared = shared_scoring_seconds(records)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    task_order: dict[str, int] = {}
    for record in records:
        task_order.setdefault(record["task"], len(task_order))
        groups[(record["task"], record["protocol"], record["method_label"], record["budget"])].append(record)
    rows = [_row(key, cells, shared) for key, cells in groups.items()]
    rows.sort(key=lambda r: (task_order[r.task], r.protocol, method_order(r.method, r.method_name), -r.budget))
    return rows


def sample_key(record: dict[str, Any]) -> tuple:
    """The sample (and protocol) a record belongs to: the cells that shared one prefill."""
    return (record["task"], record["length"], record["sample"], record.get("seed"), record["protocol"])


def shared_scoring_seconds(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """Per sample: the seconds spent on attention statistics, summed over its cells (each statistic
    is computed by the first cell that asks for it and counted there)."""
    totals: dict[tuple, float] = defaultdict(float)
    for record in records:
        totals[sample_key(record)] += float(record["seconds"]["scoring"])
    return totals


def metric_name(record: dict[str, Any]) -> str:
    """What a record's score measures (records written before the field existed: from its task)."""
    if "metric" in record:
        return record["metric"]
    if "kl" in record.get("metrics", {}):
        return "top1_agreement"
    from kvmerger.evaluation.tasks import TASKS

    metric = getattr(TASKS.get(record.get("task_name", "")), "metric", None)
    return metric if isinstance(metric, str) else "score"


def _row(key: tuple, cells: list[dict[str, Any]], shared: dict[tuple, float]) -> Row:
    task, protocol, label, budget = key
    scores = [float(cell["score"]) for cell in cells]
    stderr = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
    language_modeling = all("kl" in cell.get("metrics", {}) for cell in cells)
    perplexity = kl = top1 = None
    if language_modeling:
        tokens = [cell.get("scored_tokens", 1) for cell in cells]
        nll = sum(cell["metrics"]["nll"] * n for cell, n in zip(cells, tokens)) / sum(tokens)
        perplexity = math.exp(nll)
        kl = statistics.fmean(cell["metrics"]["kl"] for cell in cells)
        top1 = statistics.fmean(cell["metrics"]["top1_agreement"] for cell in cells)
    return Row(
        task=task,
        protocol=protocol,
        method=label,
        method_name=cells[0]["method"],
        budget=float(budget),
        cells=len(cells),
        lengths=sorted({int(cell["length"]) for cell in cells}),
        metric="/".join(sorted({metric_name(cell) for cell in cells})),
        score=statistics.fmean(scores),
        score_stderr=stderr,
        perplexity=perplexity,
        kl=kl,
        top1_agreement=top1,
        memory_ratio=statistics.fmean(cell["cache"]["memory_ratio"] for cell in cells),
        cache_memory_ratio=statistics.fmean(
            cell["cache"].get("cache_memory_ratio", cell["cache"]["memory_ratio"]) for cell in cells
        ),
        shared_scoring_ms=1e3 * statistics.fmean(shared[sample_key(cell)] for cell in cells),
        compressing_ms=1e3 * statistics.fmean(cell["seconds"]["compressing"] for cell in cells),
        decoding_ms=1e3 * statistics.fmean(cell["seconds"]["decoding"] for cell in cells),
    )


def summary_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_csv())
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One number per method and budget: a task's score, or a language-modelling metric."""

    task: str
    protocol: str
    metric: str  # "score", "kl" or "perplexity"
    title: str

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "score"

    def value(self, row: Row) -> float:
        return getattr(row, self.metric)

    def format(self, value: float) -> str:
        if self.metric == "kl":
            return f"{value:.4f}"
        if self.metric == "perplexity":
            return f"{value:.2f}"
        return f"{value:.2f}"


def columns(rows: list[Row]) -> list[Column]:
    protocols_per_task: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        protocols_per_task[row.task].add(row.protocol)
    found: list[Column] = []
    for row in rows:
        suffix = f" ({row.protocol})" if len(protocols_per_task[row.task]) > 1 else ""
        metrics = ["kl", "perplexity"] if row.is_language_modeling else ["score"]
        for metric in metrics:
            title = f"{row.task}{suffix}" + ("" if metric == "score" else f" {'KL' if metric == 'kl' else 'ppl'}")
            column = Column(row.task, row.protocol, metric, title)
            if column not in found:
                found.append(column)
    return found


def variants(rows: list[Row]) -> list[tuple[str, str, float]]:
    """(label, method name, budget) of every method variant, in table order."""
    seen = {(row.method, row.method_name, row.budget) for row in rows}
    return sorted(seen, key=lambda v: (method_order(v[0], v[1]), -v[2]))


def has_kept_layers(rows: list[Row]) -> bool:
    """Whether some layers were not compressed (sliding-window layers), so the whole cache shrank less."""
    return any(abs(row.cache_memory_ratio - row.memory_ratio) > 1e-9 for row in rows)


def results_table(rows: list[Row]) -> str:
    """A Markdown table: one line per method and budget, one column per task (or LM metric); memory
    over the compressed layers, and over the whole cache too when some layers were kept as they are."""
    cols = columns(rows)
    index = {(row.task, row.protocol, row.method, row.budget): row for row in rows}
    whole = has_kept_layers(rows)
    header = ["method", "budget", *(column.title for column in cols), "memory"] + (["whole cache"] if whole else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, _, budget in variants(rows):
        cells, memory, cache = [], [], []
        for column in cols:
            row = index.get((column.task, column.protocol, label, budget))
            cells.append("" if row is None else column.format(column.value(row)))
            if row is not None:
                memory.append(row.memory_ratio)
                cache.append(row.cache_memory_ratio)
        ratios = [memory, cache] if whole else [memory]
        texts = [f"{statistics.fmean(values):.0%}" if values else "" for values in ratios]
        lines.append("| " + " | ".join([label, f"{budget:g}", *cells, *texts]) + " |")
    return "\n".join(lines)


def question_table(records: Iterable[dict[str, Any]]) -> str:
    """Markdown: for tasks with several questions per context (compress once, ask many), the mean score
    of each question, in the order the task asks them, per task, protocol, method and budget ("" if none)."""
    scores: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    names: dict[tuple, str] = {}
    for record in records:
        for number, question in enumerate(record.get("questions") or [], start=1):
            key = (record["task"], record["protocol"], record["method_label"], record["budget"])
            names[key] = record["method"]
            scores[key][number].append(float(question["score"]))
    if not scores:
        return ""
    count = max(max(per_question) for per_question in scores.values())
    header = ["task", "protocol", "method", "budget", *(f"question {n}" for n in range(1, count + 1))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(scores, key=lambda k: (k[0], k[1], method_order(k[2], names[k]), -k[3]))
    for task, protocol, label, budget in ordered:
        per_question = scores[(task, protocol, label, budget)]
        cells = [f"{statistics.fmean(per_question[n]):.2f}" if n in per_question else "" for n in range(1, count + 1)]
        lines.append("| " + " | ".join([task, protocol, label, f"{budget:g}", *cells]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Where KVMerger wins and loses
# --------------------------------------------------------------------------------------------


def verdicts(rows: list[Row]) -> list[str]:
    """One paragraph per KVMerger variant and budget, comparing it with the best other method of
    each column (the full cache aside)."""
    cols = columns(rows)
    index = {(row.task, row.protocol, row.method, row.budget): row for row in rows}
    paragraphs = []
    for label, name, budget in variants(rows):
        if name != KVMERGER:
            continue
        outcomes: dict[str, list[str]] = {"wins": [], "ties (within the standard errors)": [], "loses": []}
        for column in cols:
            if column.metric == "perplexity":
                continue  # fidelity is the KL; a perplexity below the full cache's is not a win
            mine = index.get((column.task, column.protocol, label, budget))
            others = [
                row
                for (task, protocol, _, other_budget), row in index.items()
                if (task, protocol, other_budget) == (column.task, column.protocol, budget)
                and row.method_name not in ("full", KVMERGER)
            ]
            if mine is None or not others:
                continue
            sign = 1 if column.higher_is_better else -1
            best = max(others, key=lambda row: sign * column.value(row))
            rank = 1 + sum(sign * column.value(row) > sign * column.value(mine) for row in others)
            difference = sign * (column.value(mine) - column.value(best))
            text = (
                f"{column.title} {column.format(column.value(mine))}, rank {rank} of {len(others) + 1} "
                f"(best other: {best.method} {column.format(column.value(best))})"
            )
            if abs(difference) <= _noise(column, mine, best):
                outcomes["ties (within the standard errors)"].append(text)
            elif difference > 0:
                outcomes["wins"].append(text)
            else:
                outcomes["loses"].append(text)
        if any(outcomes.values()):
            lines = [f"**{label} at budget {budget:g}**, against the best other method of each column:"]
            lines += [f"- {outcome}: {_listing(items)}" for outcome, items in outcomes.items()]
            paragraphs.append("\n".join(lines))
    return paragraphs


def _noise(column: Column, a: Row, b: Row) -> float:
    """The difference below which two rows count as tied: their standard errors combined."""
    if column.metric != "score":
        return 1e-12  # KL and perplexity come from hundreds of tokens per window; compared as they are
    errors = [row.score_stderr for row in (a, b) if not math.isnan(row.score_stderr)]
    return math.sqrt(sum(e * e for e in errors)) if errors else 1e-12


def _listing(items: list[str]) -> str:
    return "; ".join(items) if items else "none"


# --------------------------------------------------------------------------------------------
# The report and all outputs
# --------------------------------------------------------------------------------------------


def report_markdown(
    rows: list[Row], figures: list[tuple[str, Path]], folder: Path, info: dict[str, Any], per_question: str = ""
) -> str:
    lines = [f"# {info.get('title', 'KV cache compression: quality at a budget')}", ""]
    model = info.get("model", {})
    if model:
        lines.append(
            f"Model: {model.get('name')} ({model.get('class')}, {model.get('parameters', 0) / 1e6:.0f}M parameters, "
            f"{model.get('dtype')}). Cells: {sum(row.cells for row in rows)}. "
            f"Code: kvmerger {info.get('versions', {}).get('kvmerger')}, commit {info.get('git', {}).get('commit')}"
            f"{' (with local changes)' if info.get('git', {}).get('dirty') else ''}."
        )
        lines.append("")
    lines += [
        score_explanation(rows),
        "",
        results_table(rows),
        "",
        "## Where KVMerger wins and loses",
        "",
    ]
    verdict = verdicts(rows)
    if verdict:
        lines += "\n\n".join(verdict).split("\n")
    elif any(row.method_name == KVMERGER for row in rows):
        lines.append("No method other than the full cache ran beside KVMerger, so there is nothing to compare it with.")
    else:
        lines.append("KVMerger was not among the methods of this run.")
    if verdict:
        lines += [
            "",
            f"Samples per method and budget: {_sample_counts(rows)}. With n samples a score moves in steps of 1/n, so "
            "small differences on retrieval tasks are within noise; the language-modelling numbers are the "
            "finer signal.",
        ]
    if per_question:
        lines += [
            "",
            "## Per question",
            "",
            "Tasks with several questions over one context: the mean score of each question, in the order the "
            "task asks them. Query-agnostic: the context compressed once, each question answered from its own copy "
            "of that compressed cache (compress once, ask many); query-aware: one prefill per question.",
            "",
            per_question,
        ]
    lines += ["", "## Figures", ""]
    for title, path in figures:
        alt = title.replace("[", "(").replace("]", ")")
        lines += [f"### {title}", "", f"![{alt}]({path.relative_to(folder).as_posix()})", ""]
    lines += ["## Files", "", "* `records.jsonl`: one record per cell, with its provenance", "* `summary.csv`: the rows above, with timings", ""]
    return "\n".join(lines)


METRIC_TEXT = {
    "contains_answer": "the key (or answer) found in the answer",
    "keyword_recall": "recall of the needle's words",
    "string_match_all": "share of the expected values found (RULER's string_match_all)",
}


def score_explanation(rows: list[Row]) -> str:
    """What the numbers of the table mean, for the tasks and protocols of these rows only."""
    metrics: dict[str, str] = {}
    for row in rows:
        if not row.is_language_modeling:
            metrics.setdefault(row.task, row.metric)
    parts = []
    if metrics:
        described = "; ".join(f"{task}: {METRIC_TEXT.get(metric, metric)}" for task, metric in metrics.items())
        parts.append(f"Scores are means over samples, in [0, 1], higher is better ({described}).")
    if any(row.is_language_modeling for row in rows):
        parts.append(
            "Language modelling: KL is the mean KL divergence from the full cache's next-token distribution per "
            "token (nats, lower is better); ppl is the perplexity of the continuation."
        )
    parts.append(
        "Memory is the compressed prompt cache over the full one"
        + (
            " in the compressed (full-attention) layers; whole cache also counts the sliding-window layers, which "
            "keep transformers' own cache of at most the window and are never compressed."
            if has_kept_layers(rows)
            else "."
        )
    )
    if any(row.protocol == "query-aware" for row in rows):
        needle = any(metric == "keyword_recall" for metric in metrics.values())
        parts.append(
            "Query-aware: the first answer token comes from the full-cache prefill, every later one from the "
            "compressed cache"
            + (" (so on the needle a method that lost it can still score 1/7, from that first word)." if needle else ".")
        )
    return " ".join(parts)


def _sample_counts(rows: list[Row]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        if row.method_name != "full":
            counts.setdefault(f"{row.task} ({row.protocol})", row.cells)
    return ", ".join(f"{task} {count}" for task, count in counts.items())


@dataclass
class Outputs:
    rows: list[Row]
    table: str
    summary: Path
    report: Path
    figures: list[tuple[str, Path]]


def write_outputs(folder: Path, info: dict[str, Any] | None = None) -> Outputs:
    """summary.csv, the figures and report.md for every record in `folder`/records.jsonl."""
    from kvmerger.evaluation.plots import write_figures

    folder = Path(folder)
    records = RecordStore(folder).load().records
    if not records:
        raise ValueError(f"{folder} holds no records to report on")
    rows = summarize(records)
    info = dict(info or {})
    provenance = records[-1].get("provenance", {})
    for key in ("model", "versions", "git"):
        info.setdefault(key, provenance.get(key, {}))
    figures = write_figures(records, rows, folder / "figures")
    summary = folder / "summary.csv"
    write_atomically(summary, summary_csv(rows))
    report = folder / "report.md"
    write_atomically(report, report_markdown(rows, figures, folder, info, question_table(records)))
    return Outputs(rows, results_table(rows), summary, report, figures)
