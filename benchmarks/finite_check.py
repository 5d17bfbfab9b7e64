"""Cost of the engine's non-finite check (kvmerger/engine/finite.py) against compression and prefill.

Before any method sees a layer, the engine checks that the layer's keys, values and query states
are finite: one `torch.aminmax` per tensor (`finite.is_finite`). This measures, on the default model,
in one run: that check over every layer of a recorded prefill, the obvious alternative
`torch.isfinite(x).all()` over the same tensors, each method compressing that prefill with fresh
attention statistics (`compress_prefill`, which runs the check too, outside its timed part), and
the prefill itself, interleaved per repeat. Reported: medians over repeats of per-repeat ratios
check / (scoring + method) and check / prefill, for both checks. Then, while generating with the
budget held (`--decode-method`, H2O by default), the share of a decode step that the check of the
newest token's states in every layer takes.

    python benchmarks/finite_check.py                    # 2048 tokens, float32, kvmerger h2o streaming-llm
    python benchmarks/finite_check.py --lengths 2048 8192 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from measure import RESULTS, describe_machine, essay_ids, machine, median, median_ratio, minutes, write_results

from kvmerger import compress, compress_prefill, get_method, load_model, record_prefill
from kvmerger.engine.finite import check_finite

PREFILL_SECONDS_2K = 4.4  # fp32 on the 2-core VM (benchmarks/overhead.py)


def time_check(prefill) -> float:
    """Seconds to check every layer's keys, values and query states, as `compress_layer` does."""
    start = time.perf_counter()
    for index, (layer, scores) in enumerate(zip(prefill.cache.layers, prefill.scores)):
        check_finite(index, {"keys": layer.keys, "values": layer.values, "query states": scores.query})
    return time.perf_counter() - start


def time_isfinite_all(prefill) -> float:
    """Seconds for `torch.isfinite(x).all()` over the same tensors (the alternative not taken)."""
    start = time.perf_counter()
    for layer, scores in zip(prefill.cache.layers, prefill.scores):
        for tensor in (layer.keys, layer.values, scores.query):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError("the prefill holds NaN or inf")
    return time.perf_counter() - start


@torch.no_grad()
def measure_decode(model, ids, method, repeats: int, tokens: int = 8) -> dict:
    """Share of a decode step, holding the budget, spent checking the newest token's states in every layer."""
    steps, checks = [], []
    for _ in range(repeats):
        with compress(model, method, hold_budget=True):
            out = model(ids, logits_to_keep=1)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(tokens):
                out = model(token, cache=cache)
                token = out.logits[:, -1:].argmax(-1)
            steps.append((time.perf_counter() - start) / tokens)
        query_shape = (1, model.config.num_attention_heads, 1, cache.layers[0].keys.shape[-1])
        query = torch.randn(query_shape)
        newest = [
            {"keys": layer.keys[..., -1:, :], "values": layer.values[..., -1:, :], "query states": query}
            for layer in cache.layers
        ]
        start = time.perf_counter()
        for _ in range(tokens):
            for index, tensors in enumerate(newest):
                check_finite(index, tensors, "the newest tokens'")
        checks.append((time.perf_counter() - start) / tokens)
    return {
        "method": method.label(),
        "decode_step_ms": median(steps) * 1e3,
        "check_over_decode_step": median_ratio(checks, steps),
    }


def measure(model, ids, methods, repeats: int) -> list[dict]:
    runs = {method.label(): {"check": [], "isfinite": [], "compress": [], "prefill": []} for method in methods}
    for _ in range(repeats):
        prefill = record_prefill(model, ids)
        for method in methods:
            check = time_check(prefill)
            isfinite = time_isfinite_all(prefill)
            fresh = dataclasses.replace(prefill, scores=[s.fresh() for s in prefill.scores])
            _, report = compress_prefill(fresh, method)
            row = runs[method.label()]
            row["check"].append(check)
            row["isfinite"].append(isfinite)
            row["compress"].append(report.seconds)
            row["prefill"].append(prefill.seconds)
        del prefill
    return [
        {
            "method": label,
            "repeats": repeats,
            "check_ms": median(row["check"]) * 1e3,
            "compress_ms": median(row["compress"]) * 1e3,
            "prefill_ms": median(row["prefill"]) * 1e3,
            "check_over_compress": median_ratio(row["check"], row["compress"]),
            "check_over_prefill": median_ratio(row["check"], row["prefill"]),
            "isfinite_ms": median(row["isfinite"]) * 1e3,
            "isfinite_over_compress": median_ratio(row["isfinite"], row["compress"]),
            "isfinite_over_check": median_ratio(row["isfinite"], row["check"]),
        }
        for label, row in runs.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt tokens")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=["kvmerger", "h2o", "streaming-llm"])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--decode-method", default="h2o", help="method holding the budget while decoding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "finite_check.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    methods = [get_method(name, budget=args.budget) for name in args.methods]
    info = machine()
    print(f"# {describe_machine(info)}; medians of {args.repeats}")
    estimate = sum(args.repeats * PREFILL_SECONDS_2K * (n / 2048) ** 1.3 * 3 for n in args.lengths) * len(args.dtypes)
    print(f"# expected runtime on the 2-core VM: about {minutes(estimate)}")
    rows = []
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype)
        for length in args.lengths:
            for row in measure(model, essay_ids(tokenizer, length), methods, args.repeats):
                rows.append({"dtype": dtype, "length": length, **row})
                print(
                    f"{dtype:<9} {length:>6} {row['method']:<18} check/(scoring+method) {row['check_over_compress']:.4f}"
                    f"  check/prefill {row['check_over_prefill']:.5f}  isfinite().all()/(scoring+method) "
                    f"{row['isfinite_over_compress']:.4f}  isfinite().all()/check {row['isfinite_over_check']:.2f}",
                    flush=True,
                )
            decode_method = get_method(args.decode_method, budget=args.budget)
            decode = measure_decode(model, essay_ids(tokenizer, length), decode_method, args.repeats)
            rows.append({"dtype": dtype, "length": length, "phase": "decode, holding the budget", **decode})
            print(f"{dtype:<9} {length:>6} {decode['method']:<18} decode holding the budget: check/step "
                  f"{decode['check_over_decode_step']:.4f}", flush=True)
        del model
    command = "python benchmarks/finite_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
