"""The `kvmerger` command line."""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path
from typing import Any

from kvmerger.cli import commands


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """["sigma=5", "mode=paper"] -> {"sigma": 5, "mode": "paper"} (values read as Python literals)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param takes NAME=VALUE, got {pair!r}")
        name, raw = pair.split("=", 1)
        try:
            params[name.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            params[name.strip()] = raw
    return params


def budget(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is the share of the cache kept, in (0, 1]; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmerger", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the compression methods")

    generate = sub.add_parser("generate", help="answer one prompt with one method and budget")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the context text")
    source.add_argument("--file", type=Path, help="a file holding the context")
    generate.add_argument("--question", default="", help="appended after the context")
    _model_options(generate)
    generate.add_argument("--method", default="kvmerger")
    generate.add_argument("--budget", type=budget, default=0.5)
    generate.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter")
    generate.add_argument(
        "--protocol",
        choices=["query-aware", "query-agnostic"],
        default="query-aware",
        help="compress the question with the context (query-aware) or the context alone, question after",
    )
    generate.add_argument("--chat", action="store_true", help="wrap context and question in the chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64)

    demo = sub.add_parser("demo", help="a long prompt answered with the full cache and KVMerger at 0.5 and 0.35")
    _model_options(demo)
    demo.add_argument("--tokens", type=int, default=2000, help="prompt length")
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder, id or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return commands.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvmerger: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
