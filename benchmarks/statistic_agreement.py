"""How far the fused aggregated attention is from the exact one, and whether methods notice.

From 2048 tokens on, on CPU, the aggregated attention (H2O's score, KVMerger's pivots and protected
tokens, CaM's eviction) comes from one flash pass over the prefill's log-normalisers, run in the
model's dtype: exact to 1e-6 for float32 states, not bit-exact for bf16 ones. This script prefills
one prompt of the shipped essays, computes every layer's statistic both ways (fused, and the
float32 chunked pass as the truth) and reports the largest relative error, then lets each method
choose its slots from either statistic and reports the share of slots both choices keep.

    python benchmarks/statistic_agreement.py                         # bf16, 4096 tokens, h2o and kvmerger
    python benchmarks/statistic_agreement.py --dtype float32 --length 2048 --methods h2o cam
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvmerger import get_method, load_model, record_prefill
from kvmerger.engine.scoring import LayerScores
from kvmerger.methods.base import LayerInput

from measure import RESULTS, describe_machine, essay_ids, machine, minutes, write_results  # noqa: E402


def kept_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[B, Hkv, slots] positions -> [B, Hkv, length] bool: which tokens some slot keeps."""
    mask = torch.zeros(*positions.shape[:2], length, dtype=torch.bool, device=positions.device)
    return mask.scatter_(2, positions.clamp_min(0), True)


def shared_slots(layer, index: int, layers: int, method, candidate: torch.Tensor, reference: torch.Tensor) -> tuple[int, int]:
    """(tokens kept from both statistics, tokens kept from `reference`) by `method` on one cache layer."""
    length = layer.keys.shape[-2]
    slot_bytes = layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()
    slots = method.target_slots(length, slot_bytes)
    masks = [
        kept_mask(
            method.compress(
                LayerInput(layer.keys, layer.values, LayerScores.precomputed(layer.keys, aggregated=a), index, layers, slots)
            ).positions,
            length,
        )
        for a in (candidate, reference)
    ]
    return int((masks[0] & masks[1]).sum()), int(masks[1].sum())


def agreement(prefill, methods: list) -> tuple[float, dict[str, float]]:
    """(largest relative error of the fused statistic over all layers, per method label: share of
    the slots chosen from the exact statistic that the fused one also keeps)."""
    layers = len(prefill.scores)
    worst = 0.0
    same = dict.fromkeys((m.label() for m in methods), 0)
    total = dict.fromkeys(same, 0)
    for index, (scores, layer) in enumerate(zip(prefill.scores, prefill.cache.layers)):
        if not scores.uses_fused_path:
            raise ValueError("this prefill did not keep its log-normalisers (prompt under 2048 tokens, or not on CPU)")
        fused = scores.aggregated_attention()
        exact = LayerScores(scores.query, scores.key, scores.scaling).aggregated_attention()
        worst = max(worst, float(((fused - exact).abs() / exact).max()))
        for method in methods:
            both, kept = shared_slots(layer, index, layers, method, fused, exact)
            same[method.label()] += both
            total[method.label()] += kept
    return worst, {label: same[label] / total[label] for label in same}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--methods", nargs="+", default=["h2o", "kvmerger"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--out", type=Path, default=RESULTS / "statistic_agreement.json")
    args = parser.parse_args(argv)
    if args.length < 2048:
        parser.error("--length must be at least 2048: shorter prompts take the exact chunked pass")
    methods = [get_method(name, budget=budget) for name in args.methods for budget in args.budgets]
    info = machine()
    print(f"# {describe_machine(info)}; {args.dtype}, {args.length} tokens")
    print(f"# expected runtime on the 2-core VM: about {minutes(40 * (args.length / 4096) ** 1.6)}")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    prefill = record_prefill(model, essay_ids(tokenizer, args.length))
    worst, shares = agreement(prefill, methods)
    print(f"largest relative error of the fused statistic, all layers and heads: {worst:.2e}")
    for label, share in shares.items():
        print(f"  {label:<16} slots kept from both statistics / slots: {share:.4f}")
    command = "python benchmarks/statistic_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(
        args.out,
        {"command": command.strip(), "machine": info, "dtype": args.dtype, "length": args.length,
         "max_relative_error": worst, "same_slots": shares},
    )


if __name__ == "__main__":
    main()
