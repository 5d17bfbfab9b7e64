"""`kvmerger demo`: a pass key hidden in a long prompt of essays, answered with the full cache and with
KVMerger at budgets 0.5 and 0.35, with the memory and time each took."""

from __future__ import annotations

import argparse

from kvmerger.cli.options import add_model_options, check_model_options, load, mib, positive_int, subcommand


def add_parser(sub) -> argparse.ArgumentParser:
    parser = subcommand(
        sub, "demo", help="a long prompt answered with the full cache and KVMerger at 0.5 and 0.35", description=__doc__
    )
    add_model_options(parser)
    parser.add_argument("--tokens", type=positive_int, default=2000, help="prompt length in tokens")
    return parser


def run(args: argparse.Namespace) -> int:
    from kvmerger.cli.generate import answer
    from kvmerger.evaluation.tasks.passkey import passkey_sample
    from kvmerger.methods import FullCache, KVMerger

    check_model_options(args)
    model, tokenizer = load(args)
    sample = passkey_sample(tokenizer, args.tokens, depth=0.5, seed=0)
    print(f"A pass key ({sample.answers[0]}) hidden in {args.tokens} tokens of essays; plain completion prompt.\n")
    print(f"{'method':<16} {'answer':<12} {'cache before':>13} {'cache after':>12} {'compress':>9} {'total':>7}")
    for method in (FullCache(), KVMerger(budget=0.5), KVMerger(budget=0.35)):
        result = answer(model, tokenizer, method, sample.context, sample.question, "query-aware", 8)
        text = result.text.strip().split("\n")[0][:12]
        print(
            f"{method.label():<16} {text:<12} {mib(result.bytes_before):>13} {mib(result.bytes_after):>12} "
            f"{result.seconds_compressing * 1e3:>7.0f}ms {result.seconds_total:>6.1f}s"
        )
    return 0
