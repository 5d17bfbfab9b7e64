"""`kvmerger methods`: every compression method, its one-line summary, and its parameters with their
defaults (from kvmerger/cli/catalog.py, so that listing them imports no torch)."""

from __future__ import annotations

import argparse

from kvmerger.cli.catalog import SYNTAX, listing
from kvmerger.cli.options import subcommand


def add_parser(sub) -> argparse.ArgumentParser:
    return subcommand(
        sub,
        "methods",
        help="list the compression methods with their parameters and defaults",
        description="List every compression method, its summary, and its parameters with their defaults.\n\n" + SYNTAX,
    )


def run(args: argparse.Namespace) -> int:
    print(listing())
    return 0
