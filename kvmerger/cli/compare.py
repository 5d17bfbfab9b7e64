"""`kvmerger compare`: the main job. The full cache, KVMerger (the paper's, and its best variant for
each protocol) and the baselines (KVzip and Expected Attention included) at budgets 0.5 and 0.35 on
a small, meaningful suite (pass key, needle grid, language modelling, query-aware; pass keys
compressed once and asked one at a time, query-agnostic; see kvmerger/evaluation/suites.py), sized
to finish in under 15 minutes on a 2-core CPU with the default model. `--methods all` adds every
other registered method (slower). Prints the results table and writes a results folder (default
results/compare/<timestamp>): records.jsonl, summary.csv, figures/*.png and report.md. Run again
with the same --out to resume.
"""

from __future__ import annotations

import argparse

from kvmerger.cli.eval import add_executor_options, add_method_options, add_output_options, execute, method_specs
from kvmerger.cli.options import add_model_options, subcommand


def add_parser(sub) -> argparse.ArgumentParser:
    parser = subcommand(
        sub,
        "compare",
        help="the main job: full cache, KVMerger, its best variants and the baselines at 0.5 and 0.35, both protocols",
        description=__doc__,
    )
    add_model_options(parser)
    add_method_options(parser)
    parser.add_argument("--quick", action="store_true", help="toy sizes, to check the pipeline end to end")
    add_output_options(parser)
    add_executor_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from kvmerger.evaluation.suites import COMPARE, QUICK

    suite = QUICK if args.quick else COMPARE
    settings = suite.settings(method_specs(args.methods), args.budgets, args.seed)
    intro = f"kvmerger compare ({suite.name} suite): {suite.description}"
    return execute(args, settings, "compare", "kvmerger compare: KV cache compression at a budget", intro=intro)
