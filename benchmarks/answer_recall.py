"""Do the score sources rank the answer's tokens high? The share of them in each head's top budget.

A method that keeps each KV head's S highest-scored tokens can only answer from what it kept. This
script prefills a task's samples (the context alone for the compress-once protocol, context and
question for the query-aware one) and, for every score source (`engine.scoring.SCORE_SOURCES`),
reports over all layers and KV heads:

* `recall`: the share of the answer's tokens in the context (every occurrence of every answer,
  found by their token ids) that are among the head's S = ceil(budget x T) highest-scored tokens;
  a score blind to the answer keeps about `budget` of them;
* `whole`: the share of (layer, head) pairs that keep every one of them.

With `--head-budgets layer`, each layer keeps its H x S highest-scored (head, token) pairs wherever
they fall, as KVzip's reference and kvpress's KVzipPress do (``layerwise=True``), instead of S per
head; `padded` is then the memory a dense cache would need to hold that selection, the largest head's
count over T, averaged over layers (with S per head it is S / T).

Answers must appear verbatim in the context: pass key (one or several keys) and RULER's NIAH.
Nothing here is tuned; it shows why evicting by a score loses what a later question needs.

    python benchmarks/answer_recall.py                       # pass key with 3 keys, compress-once, 0.35
    python benchmarks/answer_recall.py --tasks ruler-niah --protocol query-aware --budgets 0.5 0.35 0.1
    python benchmarks/answer_recall.py --protocol query-aware --sources window --window-kernel 31 --window-pooling max
    python benchmarks/answer_recall.py --tasks passkey needle --sources reconstruction --budgets 0.5 0.35 --head-budgets layer
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from kvmerger import load_model, record_prefill
from kvmerger.cli import options
from kvmerger.evaluation.runner import parse_spec
from kvmerger.engine.scoring import POOL_KERNEL, POOLING, POOLINGS, SCORE_SOURCES
from kvmerger.evaluation.tasks import Sample, get_task
from kvmerger.methods.base import check_pooling, shared_selection, slots_for_budget, top_indices

from measure import RESULTS, describe_machine, machine, minutes, write_results  # noqa: E402

PROTOCOLS = ("query-agnostic", "query-aware")
HEAD_BUDGETS = ("head", "layer")  # S slots per KV head (kvmerger's rule), or H x S per layer shared by its heads


def answer_positions(ids: list[int], tokenizer, answers: list[str]) -> list[int]:
    """Positions in `ids` of every occurrence of each answer's tokens (tokenized with and without a
    leading space, as it may follow a space or start a line)."""
    found: set[int] = set()
    for answer in answers:
        for text in (answer, " " + answer):
            pattern = list(tokenizer(text, add_special_tokens=False).input_ids)
            for start in range(len(ids) - len(pattern) + 1):
                if ids[start : start + len(pattern)] == pattern:
                    found.update(range(start, start + len(pattern)))
    return sorted(found)


def prompt_ids(tokenizer, sample: Sample, protocol: str) -> torch.Tensor:
    """The prompt the runner compresses: the context, then (query-aware) the first question."""
    ids = list(tokenizer(sample.context, add_special_tokens=True).input_ids)
    if protocol == "query-aware":
        ids += list(tokenizer(sample.question, add_special_tokens=False).input_ids)
    return torch.tensor([ids])


def kept_in_top(scores: torch.Tensor, slots: int, head_budgets: str = "head") -> torch.Tensor:
    """[Hkv, T] bool: what one layer's scores [1, Hkv, T] keep, `slots` per head ("head", `top_indices`
    as every method) or the layer's Hkv x `slots` highest pairs wherever they fall ("layer", the
    library's `shared_selection`, as ``head_budget="shared"``)."""
    if head_budgets == "layer":
        return shared_selection(scores, slots)[0]
    top = top_indices(scores[0], slots)
    return torch.zeros_like(scores[0], dtype=torch.bool).scatter_(1, top, True)


def recall_in_top(scores: torch.Tensor, positions: list[int], slots: int, head_budgets: str = "head") -> torch.Tensor:
    """[Hkv]: per KV head of one layer's scores [1, Hkv, T], the share of `positions` among what it keeps."""
    return kept_in_top(scores, slots, head_budgets)[:, positions].float().mean(dim=1)


def padded_share(scores: torch.Tensor, slots: int, head_budgets: str) -> float:
    """The largest head's kept count over T: the memory a dense [Hkv, S'] tensor of the layer needs."""
    return kept_in_top(scores, slots, head_budgets).sum(dim=1).max().item() / scores.shape[-1]


def source_label(source: str, window_kernel: int, window_pooling: str) -> str:
    """The source's name, with the window's pooling where it is not SnapKV's."""
    if source == "window" and (window_kernel, window_pooling) != (POOL_KERNEL, POOLING):
        return f"window ({window_pooling} {window_kernel})"
    return source


def measure_sample(
    model, tokenizer, sample: Sample, protocol: str, sources: list[str], budgets: list[float],
    window_kernel: int = POOL_KERNEL, window_pooling: str = POOLING, head_budgets: str = "head",
) -> list[dict]:
    """One row per source and budget for one sample: recall and whole, averaged over layers and heads."""
    ids = prompt_ids(tokenizer, sample, protocol)
    answers = [answer for question in sample.questions() for answer in question.answers]
    positions = answer_positions(ids[0].tolist(), tokenizer, answers)
    if not positions:
        raise ValueError(f"no answer of this {sample.task} sample appears verbatim in its prompt: {answers}")
    prefill = record_prefill(model, ids, tokenizer=tokenizer)
    length = ids.shape[1]
    rows = []
    pooled = {"window_kernel": window_kernel, "window_pooling": window_pooling}
    for source in sources:
        per_layer = [layer.source(source, **pooled) for layer in prefill.scores if layer is not None]
        label = source_label(source, window_kernel, window_pooling)
        for budget in budgets:
            slots = slots_for_budget(length, budget)
            recalls = torch.stack([recall_in_top(scores, positions, slots, head_budgets) for scores in per_layer])
            padded = statistics.mean(padded_share(scores, slots, head_budgets) for scores in per_layer)
            rows.append({
                "source": label, "budget": budget, "tokens": length, "answer_tokens": len(positions),
                "recall": recalls.mean().item(), "whole": (recalls == 1).float().mean().item(), "padded": padded,
            })
    return rows


def task_samples(task, tokenizer, length: int, count: int, seed: int) -> list[Sample]:
    """The task's samples, as `kvmerger eval` draws them for this length, count and seed."""
    return task.samples(tokenizer, length, count, seed)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean recall and whole over the samples, per source and budget."""
    keys = sorted({(row["source"], row["budget"]) for row in rows}, key=lambda key: (-key[1], key[0]))
    summary = []
    for source, budget in keys:
        mine = [row for row in rows if row["source"] == source and row["budget"] == budget]
        summary.append({
            "source": source, "budget": budget, "samples": len(mine),
            "recall": statistics.mean(row["recall"] for row in mine),
            "whole": statistics.mean(row["whole"] for row in mine),
            "padded": statistics.mean(row["padded"] for row in mine),
        })
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", nargs="+", default=["passkey:keys=3"], help="tasks whose answers are in the context")
    parser.add_argument("--protocol", default="query-agnostic", choices=PROTOCOLS)
    parser.add_argument("--sources", nargs="+", default=list(SCORE_SOURCES), choices=SCORE_SOURCES)
    parser.add_argument("--budgets", nargs="+", type=options.budget, default=[0.35])
    parser.add_argument("--window-kernel", type=options.positive_int, default=POOL_KERNEL, help="odd; SnapKV's 5")
    parser.add_argument("--window-pooling", default=POOLING, choices=POOLINGS)
    parser.add_argument(
        "--head-budgets", default="head", choices=HEAD_BUDGETS,
        help="S slots per KV head (kvmerger's rule), or the layer's H x S shared by its heads (KVzip's reference)",
    )
    parser.add_argument("--length", type=options.positive_int, default=2048)
    parser.add_argument("--samples", type=options.positive_int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "answer_recall.json")
    args = parser.parse_args(argv)
    try:
        check_pooling(args.window_kernel, args.window_pooling, "--window-kernel", "--window-pooling")
    except ValueError as error:
        parser.error(str(error))
    tasks = [get_task(name, **params) for name, params in map(parse_spec, args.tasks)]
    model, tokenizer = load_model(args.model)
    info = machine()
    print(
        f"# {describe_machine(info)}; {args.protocol}; {args.length} tokens, {args.samples} samples, seed {args.seed}; "
        f"budgets per {args.head_budgets}"
    )
    per_sample = 5.0 + (25.0 if "reconstruction" in args.sources else 3.0)  # seconds at 2k on the idle 2-core VM
    print(f"# expected runtime on the idle 2-core VM: about {minutes(len(tasks) * args.samples * per_sample * (args.length / 2048) ** 1.5)}")
    print("| task | source | budget | recall of the answer's tokens | heads keeping all of them | padded memory |")
    print("|---|---|---|---|---|---|")
    results = []
    for spec, task in zip(args.tasks, tasks, strict=True):
        rows = []
        samples = task_samples(task, tokenizer, args.length, args.samples, args.seed)
        for number, sample in enumerate(samples, start=1):
            rows += measure_sample(
                model, tokenizer, sample, args.protocol, args.sources, args.budgets, args.window_kernel, args.window_pooling,
                args.head_budgets,
            )
            print(f"# {spec}: sample {number}/{len(samples)} done", file=sys.stderr, flush=True)
        for row in summarise(rows):
            print(
                f"| {spec} | {row['source']} | {row['budget']} | {row['recall']:.2f} | {row['whole']:.2f} | {row['padded']:.3f} |",
                flush=True,
            )
            results.append({"task": spec, **row})
    write_results(args.out, {"machine": info, "settings": vars(args) | {"out": str(args.out)}, "rows": results})


if __name__ == "__main__":
    sys.exit(main())
