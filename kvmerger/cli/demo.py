"""`kvmerger demo`: a long prompt answered with the full cache and KVMerger at 0.5 and 0.35."""

from __future__ import annotations

import argparse

from kvmerger.cli.generate import answer
from kvmerger.cli.options import add_model_options, load, mib


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("demo", help="a long prompt answered with the full cache and KVMerger at 0.5 and 0.35")
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length")
    return parser


def run(args: argparse.Namespace) -> int:
    from kvmerger.evaluation.tasks.passkey import passkey_sample
    from kvmerger.methods import FullCache, KVMerger

    model, tokenizer = load(args)
    sample = passkey_sample(tokenizer, args.tokens, depth=0.5, seed=0)
    print(f"A pass key ({sample.answers[0]}) hidden in {args.tokens} tokens of essays; plain completion prompt.\n")
    print(f"{'method':<16} {'answer':<12} {'cache before':>13} {'cache after':>12} {'compress':>9} {'total':>7}")
    for method in (FullCache(), KVMerger(budget=0.5), KVMerger(budget=0.35)):
        result = answer(model, tokenizer, method, sample.context, sample.question, "query-aware", 8)
        text = result["answer"].strip().split("\n")[0][:12]
        print(
            f"{method.label():<16} {text:<12} {mib(result['bytes_before']):>13} {mib(result['bytes_after']):>12} "
            f"{result['seconds_compressing'] * 1e3:>7.0f}ms {result['seconds_total']:>6.1f}s"
        )
    return 0
