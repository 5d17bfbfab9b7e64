"""Cost of compressing: time to compress / time to prefill, per method, prompt length and dtype,
and how each part grows with the prompt length.

One run measures everything as ratios within the run (this machine is noisy). For each dtype and
length, every repeat times, back to back: the plain prefill (sdpa, transformers' own cache, no
kvmerger), then one prefill that records what compression needs (`record_prefill`), then each
method compressing that recorded prefill with fresh attention statistics (`compress_prefill`).
So every method pays its own scoring, exactly as it would inside `compress(model, method)`, without
a prefill per method. "Compress" is what a user pays on top of the prefill:

* scoring: the attention statistics the method asks for (aggregated attention, SnapKV's window...),
  from the layer's query and key states: the aggregated attention by one fused pass from the
  prefill's log-normalisers where the engine kept them (CPU), else in float32 query chunks;
* method: the method itself (top-k, merging, gathers).

Reported: medians over repeats of per-repeat ratios (scoring + method) / prefill and
method / prefill, and the growth exponent of each part (slope of a log-log least-squares fit of
time against length: 1 is linear, 2 quadratic). Scoring is attention, so it grows like the
prefill's attention; the method itself must stay near-linear.

Score sources (`--sources`): the time of each statistic the methods rank tokens by, summed over
the layers, as a share of the plain prefill: the aggregated attention exact and estimated, SnapKV's
pooled window, Expected Attention's Gaussian score and KVzip's reconstruction (its repeat pass over
the context, then the largest attention per key).

    python benchmarks/overhead.py                                  # 2k/4k/8k, fp32 and bf16, every method
    python benchmarks/overhead.py --lengths 2048 4096 --methods kvmerger h2o:statistic=estimated --dtypes float32
    python benchmarks/overhead.py --sources-only --lengths 2048 8192 --dtypes float32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from kvmerger import compress_prefill, load_model, record_prefill
from kvmerger.evaluation.runner import MethodSpec, method_label
from kvmerger.methods import METHODS

from measure import (  # noqa: E402  (a helper beside this script)
    RESULTS,
    describe_machine,
    essay_ids,
    growth_exponent,
    machine,
    median,
    median_ratio,
    minutes,
    write_results,
)

# Measured on the 2-core VM (fp32): prefill 4.4 s at 2k, 10.8 s at 4k; scoring ~0.4-0.6 x prefill.
PREFILL_SECONDS_2K = 4.4
BF16_SLOWDOWN = 1.5  # CPU bf16 matmuls are slower than fp32 here


@torch.no_grad()
def time_plain_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    _synchronize(ids.device)
    return time.perf_counter() - start


def fresh_statistics(prefill):
    """The same prefill with attention statistics not yet computed, so the next method pays its own."""
    scores = [s.fresh() for s in prefill.scores]
    return dataclasses.replace(prefill, scores=scores)


def build_methods(names: list[str], budgets: list[float]) -> tuple[list, dict[str, str]]:
    """Methods to time (registered names or `name:param=value,...` specs), and why any could not be built."""
    methods, skipped = [], {}
    for name in names:
        if name == "full":
            continue
        try:
            methods.extend(MethodSpec.parse(name).variants(budgets))
        except (ValueError, TypeError) as error:
            skipped[name] = str(error)
    return methods, skipped


SOURCES = {  # label -> how to compute it from one layer's LayerScores
    "aggregated (exact)": lambda scores: scores.source("aggregated", "exact"),
    "aggregated (estimated)": lambda scores: scores.source("aggregated", "estimated"),
    "window": lambda scores: scores.source("window"),
    "expected": lambda scores: scores.source("expected"),
    "reconstruction": lambda scores: scores.source("reconstruction"),
}


def measure_sources(model, tokenizer, ids: torch.Tensor, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per score source: lists (one per repeat) of the plain prefill's and the source's seconds, all layers.

    Each source is computed on fresh statistics of one recorded prefill; the reconstruction's time is
    its repeat pass (a forward of the repeat prompt and the context on top of the cache) plus the
    per-layer scores it leaves.
    """
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _ in range(repeats):
        prefill_seconds = time_plain_prefill(model, ids)
        prefill = record_prefill(model, ids, tokenizer=tokenizer)
        for label, compute in SOURCES.items():
            layers = [s.fresh() for s in prefill.scores if s is not None]
            start = time.perf_counter()
            for scores in layers:
                compute(scores)
            _synchronize(ids.device)
            samples[label]["prefill"].append(prefill_seconds)
            samples[label]["source"].append(time.perf_counter() - start)
        del prefill
    return samples


def summarise_source(dtype: str, length: int, label: str, runs: dict[str, list[float]]) -> dict:
    return {
        "dtype": dtype,
        "length": length,
        "source": label,
        "repeats": len(runs["prefill"]),
        "prefill_s": median(runs["prefill"]),
        "source_s": median(runs["source"]),
        "source_ratio": median_ratio(runs["source"], runs["prefill"]),
    }


def source_growth(rows: list[dict]) -> list[dict]:
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(row["dtype"], row["source"])].append(row)
    return [
        {"dtype": dtype, "source": source, "lengths": [r["length"] for r in group],
         "source_exponent": growth_exponent([r["length"] for r in group], [r["source_s"] for r in group])}
        for (dtype, source), group in grouped.items() if len({r["length"] for r in group}) >= 2
    ]  # fmt: skip


def label(method) -> str:
    """The method's name, its non-default parameters and its budget: `h2o[statistic=estimated]@0.5`."""
    return f"{method_label(method)}@{method.budget:g}"


def measure_length(model, ids: torch.Tensor, methods: list, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per label: lists (one entry per repeat) of prefill, scoring and method seconds."""
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _ in range(repeats):
        prefill_seconds = time_plain_prefill(model, ids)
        prefill = record_prefill(model, ids)
        for method in methods:
            _, report = compress_prefill(fresh_statistics(prefill), method)
            row = samples[label(method)]
            row["prefill"].append(prefill_seconds)
            row["recorded_prefill"].append(prefill.seconds)
            row["scoring"].append(report.seconds_scoring)
            row["method"].append(report.seconds_compressing)
        del prefill
    return samples


def summarise(dtype: str, length: int, label: str, runs: dict[str, list[float]]) -> dict:
    compress_seconds = [s + m for s, m in zip(runs["scoring"], runs["method"])]
    return {
        "dtype": dtype,
        "length": length,
        "method": label,
        "repeats": len(runs["prefill"]),
        "prefill_s": median(runs["prefill"]),
        "recorded_prefill_s": median(runs["recorded_prefill"]),
        "scoring_s": median(runs["scoring"]),
        "method_s": median(runs["method"]),
        "overhead_ratio": median_ratio(compress_seconds, runs["prefill"]),
        "scoring_ratio": median_ratio(runs["scoring"], runs["prefill"]),
        "method_ratio": median_ratio(runs["method"], runs["prefill"]),
    }


def growth(rows: list[dict]) -> list[dict]:
    """Per dtype and method, the growth exponent of each part (needs two lengths or more)."""
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(row["dtype"], row["method"])].append(row)
    fits = []
    for (dtype, method), group in grouped.items():
        lengths = [r["length"] for r in group]
        if len(set(lengths)) < 2:
            continue
        fit = {"dtype": dtype, "method": method, "lengths": lengths}
        for part in ("prefill_s", "scoring_s", "method_s", "overhead_ratio"):
            values = [r[part] for r in group]
            fit[part.removesuffix("_s") + "_exponent"] = growth_exponent(lengths, values) if min(values) > 0 else None
        fits.append(fit)
    return fits


def format_row(row: dict) -> str:
    return (
        f"{row['dtype']:<9} {row['length']:>6} {row['method']:<34} prefill {row['prefill_s']:7.2f}s"
        f"  scoring {row['scoring_s'] * 1e3:8.0f}ms  method {row['method_s'] * 1e3:7.1f}ms"
        f"  (scoring+method)/prefill {row['overhead_ratio']:6.3f}  method/prefill {row['method_ratio']:.4f}"
    )


def format_fit(fit: dict) -> str:
    def show(value):
        return "  n/a" if value is None else f"{value:5.2f}"

    return (
        f"{fit['dtype']:<9} {fit['method']:<34} time ~ length^k: prefill {show(fit['prefill_exponent'])}"
        f"  scoring {show(fit['scoring_exponent'])}  method {show(fit['method_exponent'])}"
        f"  overhead ratio {show(fit['overhead_ratio_exponent'])}"
    )


def estimate_seconds(lengths: list[int], dtypes: list[str], methods: int, repeats: int, sources: bool = False) -> float:
    """A rough runtime on the 2-core VM, from prefill speeds measured there. The score sources cost
    about 7 prefills a repeat: their own two, and KVzip's reconstruction alone about 4 (measured
    2026-12-01, idle VM)."""
    total = 0.0
    for dtype in dtypes:
        slowdown = BF16_SLOWDOWN if dtype == "bfloat16" else 1.0
        for length in lengths:
            prefill = PREFILL_SECONDS_2K * (length / 2048) ** 1.3 * slowdown
            total += repeats * (2 * prefill + methods * 0.4 * prefill * (length / 2048) ** 0.4)
            total += repeats * 7 * prefill if sources else 0.0
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="registered names or NAME:PARAM=VALUE specs (default: all but full)"
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", action="store_true", help="also time every score source")
    parser.add_argument("--sources-only", action="store_true", help="time the score sources, no method")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    names = [] if args.sources_only else args.methods or sorted(set(METHODS) - {"full"})
    methods, skipped = build_methods(names, args.budgets)
    info = machine()
    print(f"# {describe_machine(info)}; medians of {args.repeats}")
    estimate = estimate_seconds(args.lengths, args.dtypes, len(methods), args.repeats, args.sources or args.sources_only)
    print(f"# expected runtime on the 2-core VM: about {minutes(estimate)}")
    for name, reason in skipped.items():
        print(f"# skipped {name}: {reason}")
    rows, source_rows = [], []
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype)
        for length in args.lengths:
            ids = essay_ids(tokenizer, length)
            time_plain_prefill(model, ids[:, :256])  # warm-up
            samples = measure_length(model, ids, methods, args.repeats) if methods else {}
            for method in methods:
                rows.append(summarise(dtype, length, label(method), samples[label(method)]))
                print(format_row(rows[-1]), flush=True)
            if args.sources or args.sources_only:
                for source, runs in measure_sources(model, tokenizer, ids, args.repeats).items():
                    source_rows.append(summarise_source(dtype, length, source, runs))
                    row = source_rows[-1]
                    print(
                        f"{dtype:<9} {length:>6} source {source:<24} {row['source_s']:8.2f}s  "
                        f"/ prefill {row['source_ratio']:.3f}",
                        flush=True,
                    )
        del model
    fits = growth(rows)
    for fit in fits:
        print(format_fit(fit))
    source_fits = source_growth(source_rows)
    for fit in source_fits:
        print(f"{fit['dtype']:<9} source {fit['source']:<24} time ~ length^{fit['source_exponent']:.2f}")
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {
        "command": command.strip(), "machine": info, "skipped": skipped, "rows": rows, "growth": fits,
        "sources": source_rows, "source_growth": source_fits,
    })  # fmt: skip


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
