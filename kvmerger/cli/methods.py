"""`kvmerger methods`: list the compression methods with a one-line description."""

from __future__ import annotations

import argparse

from kvmerger.methods import METHODS


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("methods", help="list the compression methods")


def run(args: argparse.Namespace) -> int:
    width = max(len(name) for name in METHODS)
    for name in sorted(METHODS):
        print(f"{name:<{width}}  {METHODS[name].summary}")
    return 0
