"""`kvmerger analyze`: where the model says to merge. Prefills samples of several kinds of text and
writes key/value similarity heatmaps, per-layer adjacent-cosine distributions, the per-layer share
of tokens KVMerger merges (eps = 0.75, paper mode) with its persistence across samples and text
kinds, and a Markdown summary (see kvmerger/analysis/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmerger.cli.options import (
    add_model_options,
    budget,
    check_model_options,
    check_output_folder,
    load,
    positive_int,
    subcommand,
)

DEFAULT_TEXTS = ["essays", "drama", "haystack"]


def add_parser(sub) -> argparse.ArgumentParser:
    parser = subcommand(
        sub,
        "analyze",
        help="where the model says to merge: key-similarity maps and per-layer merge shares",
        description=__doc__,
    )
    add_model_options(parser)
    parser.add_argument(
        "--texts",
        nargs="+",
        default=DEFAULT_TEXTS,
        metavar="KIND_OR_FILE",
        help="text kinds (essays, drama, haystack) and/or paths of UTF-8 text files",
    )
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens per sample")
    parser.add_argument("--samples", type=positive_int, default=4, help="samples per text")
    parser.add_argument("--eps", type=float, default=0.75, help="KVMerger's threshold (0.75 is the paper's)")
    parser.add_argument(
        "--budget", type=budget, default=0.5, help="budget whose paper protection the 'paper protection' variant uses"
    )
    parser.add_argument("--needles", type=int, default=4, help="needles per haystack sample")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layers of the heatmaps (default: first, middle, last)"
    )
    parser.add_argument("--heads", type=int, nargs="+", default=[0], help="KV heads of the heatmaps")
    parser.add_argument("--window", type=int, default=256, help="tokens in the heatmaps' window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the haystack needles")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/analyze/<model name>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from kvmerger.analysis import analyze, build_samples, summary_markdown, write_all

    from kvmerger.analysis.samples import KINDS

    if not -1.0 <= args.eps <= 1.0:
        raise ValueError(f"--eps is a cosine threshold in [-1, 1], got {args.eps}")
    for text in args.texts:
        if text not in KINDS and not Path(text).is_file():
            raise FileNotFoundError(f"--texts {text!r} is neither a text kind ({', '.join(KINDS)}) nor a file")
    name = model_name(args.model)
    out = args.out if args.out is not None else Path("results") / "analyze" / name
    check_output_folder(out, "--out" if args.out is not None else "the output folder")
    check_model_options(args)
    model, tokenizer = load(args)
    samples = build_samples(tokenizer, args.texts, args.tokens, args.samples, args.seed, args.needles)
    profile = analyze(
        model,
        samples,
        model_name=name,
        eps=args.eps,
        budget=args.budget,
        heatmap_layers=args.layers,
        heatmap_heads=args.heads,
        window=args.window,
        progress=not args.no_progress,
    )
    write_all(profile, out)
    print(summary_markdown(profile))
    print(f"Written to {out}/")
    return 0


def model_name(model: str | None) -> str:
    """A folder-safe name for --model: the default model's name, or the last part of the path or id."""
    from kvmerger.models import DEFAULT_MODEL

    if model is None or model in ("default", DEFAULT_MODEL):
        return DEFAULT_MODEL
    path = Path(str(model).rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name
