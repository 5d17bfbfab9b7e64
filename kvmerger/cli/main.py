"""The `kvmerger` command line. Each subcommand lives in its own module of this package, exposing
`add_parser(subparsers)` and `run(args) -> int`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["compare", "eval", "generate", "analyze", "methods", "demo"]  # module names in kvmerger.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmerger", description="Compress the KV cache of transformers models by merging, and measure it."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"kvmerger.cli.{name}")
        module.add_parser(sub).set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvmerger: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
