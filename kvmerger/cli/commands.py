"""What each `kvmerger` subcommand does (argument parsing lives in cli.main)."""

from __future__ import annotations

import argparse
import time

import torch

from kvmerger.engine.session import compress
from kvmerger.methods import METHODS, get_method


def run(args: argparse.Namespace) -> int:
    handlers = {"methods": list_methods, "generate": generate, "demo": demo}
    return handlers[args.command](args)


def list_methods(args: argparse.Namespace) -> int:
    width = max(len(name) for name in METHODS)
    for name in sorted(METHODS):
        print(f"{name:<{width}}  {METHODS[name].summary}")
    return 0


def _load(args: argparse.Namespace):
    from kvmerger.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def generate(args: argparse.Namespace) -> int:
    from kvmerger.cli.main import parse_params

    context = args.prompt if args.prompt is not None else _read(args.file)
    params = parse_params(args.param)
    method = get_method(args.method, **({} if args.method == "full" else {"budget": args.budget}), **params)
    model, tokenizer = _load(args)
    question = args.question
    if args.chat:
        from kvmerger.evaluation.tasks.passkey import _chat_wrap

        context, question = _chat_wrap(tokenizer, context, question)
    result = answer(model, tokenizer, method, context, question, args.protocol, args.max_new_tokens)
    print(result["answer"])
    print(
        f"\n[{method.label()} {args.protocol}] prompt {result['prompt_tokens']} tokens; "
        f"cache after prefill {_mib(result['bytes_before'])} -> {_mib(result['bytes_after'])} "
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
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "seconds_compressing": report.seconds,
        "seconds_total": time.perf_counter() - start,
        "report": report,
    }


def demo(args: argparse.Namespace) -> int:
    from kvmerger.evaluation.tasks.passkey import passkey_sample
    from kvmerger.methods import FullCache, KVMerger

    model, tokenizer = _load(args)
    sample = passkey_sample(tokenizer, args.tokens, depth=0.5, seed=0)
    print(f"A pass key ({sample.answers[0]}) hidden in {args.tokens} tokens of essays; plain completion prompt.\n")
    print(f"{'method':<16} {'answer':<12} {'cache before':>13} {'cache after':>12} {'compress':>9} {'total':>7}")
    for method in (FullCache(), KVMerger(budget=0.5), KVMerger(budget=0.35)):
        result = answer(model, tokenizer, method, sample.context, sample.question, "query-aware", 8)
        text = result["answer"].strip().split("\n")[0][:12]
        print(
            f"{method.label():<16} {text:<12} {_mib(result['bytes_before']):>13} {_mib(result['bytes_after']):>12} "
            f"{result['seconds_compressing'] * 1e3:>7.0f}ms {result['seconds_total']:>6.1f}s"
        )
    return 0


def _read(path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path.read_text(encoding="utf-8")


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
