"""Cost of compressing: time to compress / time to prefill, per method and prompt length.

One run measures everything as ratios within the run (this machine is noisy): for each length the
plain sdpa prefill and each method's compressing prefill are timed `--repeats` times, interleaved,
and medians are compared. "Compress" is what a user pays on top of the prefill: the attention
statistics (scoring) plus the method itself, both taken from the engine's per-layer report.

    python benchmarks/overhead.py --lengths 2048 4096 --methods kvmerger h2o --budgets 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvmerger import compress, get_method, load_model
from kvmerger.evaluation.texts import essays
from kvmerger.methods import METHODS


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(essays(), return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ValueError(f"the essays hold {ids.shape[1]} tokens, fewer than {length}")
    return ids[:, :length]


@torch.no_grad()
def time_plain_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def time_compressing_prefill(model, ids: torch.Tensor, method) -> tuple[float, float, float]:
    """(whole forward, scoring, method) seconds of one prefill that compresses."""
    start = time.perf_counter()
    with compress(model, method) as session:
        model(ids, use_cache=True, logits_to_keep=1)
    total = time.perf_counter() - start
    report = session.report
    return total, report.seconds_scoring, report.seconds_compressing


def measure(model, tokenizer, lengths, method_names, budgets, repeats) -> list[dict]:
    rows = []
    for length in lengths:
        ids = prompt_ids(tokenizer, length).to(model.device)
        time_plain_prefill(model, ids[:, :256])  # warm-up
        samples: dict[str, list] = {"prefill": []}
        methods = [get_method(name, budget=b) for name in method_names for b in budgets if name != "full"]
        for _ in range(repeats):
            samples["prefill"].append(time_plain_prefill(model, ids))
            for method in methods:
                samples.setdefault(method.label(), []).append(time_compressing_prefill(model, ids, method))
        prefill = statistics.median(samples["prefill"])
        for method in methods:
            runs = samples[method.label()]
            scoring = statistics.median(r[1] for r in runs)
            compressing = statistics.median(r[2] for r in runs)
            rows.append(
                {
                    "length": length,
                    "method": method.label(),
                    "prefill_s": prefill,
                    "scoring_s": scoring,
                    "compressing_s": compressing,
                    "overhead_ratio": (scoring + compressing) / prefill,
                    "method_only_ratio": compressing / prefill,
                }
            )
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    return (
        f"{row['length']:>6} {row['method']:<18} prefill {row['prefill_s']:7.2f}s  scoring {row['scoring_s'] * 1e3:7.0f}ms"
        f"  method {row['compressing_s'] * 1e3:6.0f}ms  (scoring+method)/prefill {row['overhead_ratio']:.3f}"
        f"  method/prefill {row['method_only_ratio']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=sorted(set(METHODS) - {"full"}))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/overhead.json"))
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, medians of {args.repeats}")
    rows = measure(model, tokenizer, args.lengths, args.methods, args.budgets, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dtype": args.dtype, "rows": rows}, indent=2))
    print(f"# written to {args.out}")


if __name__ == "__main__":
    main()
