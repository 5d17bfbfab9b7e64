"""`kvmerger generate`: one prompt (or file) plus a question, one method and budget; prints the
answer and the memory before and after."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvmerger.cli.options import add_model_options, budget, load, mib, parse_params
from kvmerger.engine.session import compress
from kvmerger.methods import get_method


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("generate", help="answer one prompt with one method and budget")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the context text")
    source.add_argument("--file", type=Path, help="a file holding the context")
    parser.add_argument("--question", default="", help="appended after the context")
    add_model_options(parser)
    parser.add_argument("--method", default="kvmerger")
    parser.add_argument("--budget", type=budget, default=0.5)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter")
    parser.add_argument(
        "--protocol",
        choices=["query-aware", "query-agnostic"],
        default="query-aware",
        help="compress the question with the context (query-aware) or the context alone, question after",
    )
    parser.add_argument("--chat", action="store_true", help="wrap context and question in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def run(args: argparse.Namespace) -> int:
    context = args.prompt if args.prompt is not None else _read(args.file)
    params = parse_params(args.param)
    if args.method != "full":
        params.setdefault("budget", args.budget)
    method = get_method(args.method, **params)
    model, tokenizer = load(args)
    question = args.question
    if args.chat:
        from kvmerger.evaluation.tasks.prompting import render_prompt

        context, question = render_prompt(tokenizer, True, context + "\n\n", question)
    result = answer(model, tokenizer, method, context, question, args.protocol, args.max_new_tokens)
    print(result["answer"])
    print(
        f"\n[{method.label()} {args.protocol}] prompt {result['prompt_tokens']} tokens; "
        f"cache after prefill {mib(result['bytes_before'])} -> {mib(result['bytes_after'])} "
        f"({result['bytes_after'] / result['bytes_before']:.1%}); "
        f"compressing {result['seconds_compressing'] * 1e3:.0f} ms, generating {result['seconds_total']:.1f} s"
    )
    return 0


def answer(model, tokenizer, method, context: str, question: str, protocol: str, max_new_tokens: int) -> dict:
    """Greedy answer to `question` over `context`, compressed by `method` under `protocol`."""
    context_ids = tokenizer(context, return_tensors="pt").input_ids.to(model.device)
    question_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    full_ids = torch.cat([context_ids, question_ids], dim=1)
    if full_ids.shape[1] > model.config.max_position_embeddings:
        raise ValueError(
            f"the prompt has {full_ids.shape[1]} tokens, more than the model's context "
            f"({model.config.max_position_embeddings})"
        )
    start = time.perf_counter()
    with torch.no_grad(), compress(model, method) as session:
        if protocol == "query-agnostic":
            cache = model(context_ids).cache
            out = model.generate(full_ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            out = model.generate(full_ids, max_new_tokens=max_new_tokens, do_sample=False)
    report = session.report
    return {
        "answer": tokenizer.decode(out[0, full_ids.shape[1] :], skip_special_tokens=True),
        "prompt_tokens": full_ids.shape[1],
        "bytes_before": report.cache_bytes_before,  # the whole cache: sliding-window layers included
        "bytes_after": report.cache_bytes_after,
        "seconds_compressing": report.seconds,
        "seconds_total": time.perf_counter() - start,
        "report": report,
    }


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path.read_text(encoding="utf-8")
