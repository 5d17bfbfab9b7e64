"""The `kvmerger` command line. Each subcommand lives in its own module of this package, exposing
`add_parser(subparsers)` and `run(args) -> int`; this file only wires them together.

Building the parsers imports no torch or transformers (each `run` imports what it needs), so
`kvmerger --help` and every subcommand's `--help` answer at once. Errors a user can act on (bad
input, missing files, a model that cannot be loaded) are one line on stderr and exit status 2;
Ctrl-C is one line and exit status 130. `-v` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from kvmerger.cli.options import Parser

SUBCOMMANDS = ["compare", "eval", "generate", "demo", "analyze", "methods", "cache"]  # module names in kvmerger.cli
USER_ERRORS = (ValueError, OSError, ImportError)  # OSError: missing, unreadable or unwritable files and models


def build_parser() -> Parser:
    parser = Parser(
        prog="kvmerger",
        description="Compress the KV cache of transformers models by merging, and measure it. Offline: nothing is "
        "fetched from the network. `kvmerger COMMAND --help` for each command's options and defaults.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"kvmerger.cli.{name}")
        module.add_parser(sub).set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging  # here: `--help` exits before, and logging costs a noticeable share of its time

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"\nkvmerger {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`kvmerger methods | head`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush stays quiet
        return 1
    except USER_ERRORS as error:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"kvmerger {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line (library messages can span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    sys.exit(main())
