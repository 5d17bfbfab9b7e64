"""`kvmerger cache`: the converted models kvmerger keeps (see kvmerger/model_cache.py), with their
sizes and the GGUF files they serve; `kvmerger cache clear` removes them (`--stale`: only folders
this version never uses, from an older layout or a conversion that died)."""

from __future__ import annotations

import argparse

from kvmerger.cli.options import mib, subcommand


def add_parser(sub) -> argparse.ArgumentParser:
    parser = subcommand(
        sub,
        "cache",
        help="list (or clear) the converted models kvmerger keeps",
        description=__doc__
        + "\n\nThe cache is $KVMERGER_CACHE, else $XDG_CACHE_HOME/kvmerger, else ~/.cache/kvmerger. A model is "
        "converted again (about 30 s for the default one) the next time it is loaded.",
    )
    parser.add_argument("action", nargs="?", choices=["list", "clear"], default="list", help="what to do")
    parser.add_argument("--stale", action="store_true", help="with clear: remove only the folders no longer used")
    return parser


def run(args: argparse.Namespace) -> int:
    from kvmerger import model_cache

    if args.stale and args.action != "clear":
        raise ValueError("--stale goes with `kvmerger cache clear`")
    if args.action == "clear":
        removed = model_cache.clear(stale_only=args.stale)
        freed = sum(entry.bytes for entry in removed)
        folders = f"{len(removed)} folder{'s' if len(removed) != 1 else ''}"
        print(f"removed {folders} ({mib(freed)}) from {model_cache.models_dir()}")
        return 0
    found = model_cache.entries()
    print(f"kvmerger's model cache: {model_cache.models_dir()}")
    if not found:
        print("  (empty: the default model is converted there on first use)")
        return 0
    width = max(len(entry.path.name) for entry in found)
    for entry in found:
        print(f"  {entry.path.name:<{width}}  {mib(entry.bytes):>10}  {entry.state}{'  (stale)' if entry.stale else ''}")
        for source in entry.sources:
            print(f"      from {source}")
    total = sum(entry.bytes for entry in found)
    print(f"  total {mib(total)}; `kvmerger cache clear` removes it all, `kvmerger cache clear --stale` the stale folders")
    return 0
