"""How much of the prefill is attention, and what a full-attention statistic costs beside it.

Methods driven by the attention every key received from every prompt query (H2O, KVMerger, CaM,
the fitted merges) need one more pass over all query-key pairs: the model's fused sdpa kernel never
returns attention probabilities. This script puts that cost in proportion on the default model at
one prompt length, per layer shape: the whole prefill; the model's own causal sdpa over every layer
(random states of the layer's shape, so only the kernel is timed); the same flash kernel keeping
each row's log-normaliser (what a compressing prefill runs instead of sdpa); and the two ways
kvmerger computes the column sums over every layer: the fused pass from those log-normalisers
(the default on CPU) and the chunked float32 pass (the fallback elsewhere). If attention is most
of the prefill (small models, long prompts), a second pass over it cannot be "well under" the
prefill, however it is written; on large models the MLPs dominate and the same pass is a smaller
share.

    python benchmarks/attention_share.py                     # 8192 tokens, float32
    python benchmarks/attention_share.py --length 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kvmerger import load_model
from kvmerger.engine import kernels
from kvmerger.engine.scoring import aggregated_attention, aggregated_attention_from_lse

from measure import RESULTS, describe_machine, essay_ids, machine, median, minutes, write_results


def time_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def time_layers(config, length: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds over all layers, on random states of the model's shape, of: sdpa; the kernel keeping
    lse; the column sums from lse; the chunked column sums."""
    text = config.get_text_config(decoder=True)
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, length, dim, generator=generator).to(dtype)
    key = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
    value = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    group = heads // kv_heads
    steps = {
        "sdpa_s": lambda: torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True
        ),
        "sdpa_with_lse_s": lambda: kernels.causal_attention_with_lse(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), scale
        ),
        "column_sums_from_lse_s": lambda: aggregated_attention_from_lse(query, key, lse, scale),
        "column_sums_chunked_s": lambda: aggregated_attention(query, key, scale),
    }
    lse = steps["sdpa_with_lse_s"]()[1]
    seconds = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(text.num_hidden_layers):
            step()
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_share.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.length < 2:
        parser.error("--repeats must be at least 1 and --length at least 2")
    info = machine()
    print(f"# {describe_machine(info)}; {args.dtype}, {args.length} tokens, medians of {args.repeats}")
    print(f"# expected runtime on the 2-core VM: about {minutes(60 * args.repeats * (args.length / 8192) ** 1.6)}")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    ids = essay_ids(tokenizer, args.length)
    dtype = getattr(torch, args.dtype)
    time_prefill(model, ids[:, :64])  # warm-up: first calls pay for allocations and kernel selection
    runs = []
    for _ in range(args.repeats):
        prefill = time_prefill(model, ids)
        runs.append({"prefill_s": prefill, **time_layers(model.config, args.length, dtype)})
    row = {"length": args.length, "dtype": args.dtype, "prefill_s": median([r["prefill_s"] for r in runs])}
    for part in ("sdpa", "sdpa_with_lse", "column_sums_from_lse", "column_sums_chunked"):
        row[f"{part}_over_prefill"] = median([r[f"{part}_s"] / r["prefill_s"] for r in runs])
        row[f"{part}_over_sdpa"] = median([r[f"{part}_s"] / r["sdpa_s"] for r in runs])
    print(f"prefill {row['prefill_s']:.2f} s; over all layers, as a share of the prefill (and of sdpa):")
    for part, label in (
        ("sdpa", "the model's sdpa"),
        ("sdpa_with_lse", "the same kernel keeping lse"),
        ("column_sums_from_lse", "column sums from lse (default on CPU)"),
        ("column_sums_chunked", "chunked column sums (fallback)"),
    ):
        print(f"  {label:<40} {row[f'{part}_over_prefill']:.3f}  ({row[f'{part}_over_sdpa']:.2f} x sdpa)")
    command = "python benchmarks/attention_share.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {"command": command.strip(), "machine": info, "row": row, "runs": runs})


if __name__ == "__main__":
    main()
