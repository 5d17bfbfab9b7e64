"""`kvmerger generate`: answer one prompt (text or file) and an optional question with one method and
budget, then print the answer and what compression did to the cache.

The prompt goes through the model's chat template when the model has one (the question, if any,
after the context in the same user message), as an instruction-tuned model expects; `--no-chat`
feeds the plain text. Query-aware (default): context and question are prefilled and compressed
together, the paper's protocol. Query-agnostic: the context is compressed first, then the question
is fed on top of the compressed cache. Decoding is greedy. Progress (loading, prefill and
compression, decoding) goes to stderr; the answer and the report to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmerger.cli.options import (
    add_model_options,
    budget,
    check_model_options,
    load,
    mib,
    parse_params,
    positive_int,
    subcommand,
)

DEFAULT_BUDGET = 0.5


def add_parser(sub) -> argparse.ArgumentParser:
    parser = subcommand(sub, "generate", help="answer one prompt with one method and budget", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the context text")
    source.add_argument("--file", type=Path, help="a UTF-8 text file holding the context")
    parser.add_argument("--question", default="", help="asked after the context (none by default)")
    add_model_options(parser)
    parser.add_argument(
        "--method",
        default="kvmerger",
        metavar="METHOD[:NAME=VALUE,...]",
        help="compression method, with parameters after a colon (see `kvmerger methods`)",
    )
    parser.add_argument(
        "--budget",
        type=budget,
        default=None,
        help=f"share of the prompt's cache kept, in (0, 1] (default: {DEFAULT_BUDGET}; not for --method full)",
    )
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    parser.add_argument(
        "--protocol",
        choices=["query-aware", "query-agnostic"],
        default="query-aware",
        help="compress the question with the context (query-aware) or the context alone, question after",
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap context and question in the model's chat template (default: when the model has one)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer, in tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def run(args: argparse.Namespace) -> int:
    context = read_context(args.prompt, args.file)
    method = build_method(args.method, args.param, args.budget)
    check_model_options(args)
    model, tokenizer = load(args)
    chat = use_chat(tokenizer, args.chat)
    context, question = build_prompt(tokenizer, context, args.question, chat)
    progress = None if args.no_progress else Progress()
    result = answer(model, tokenizer, method, context, question, args.protocol, args.max_new_tokens, progress)
    print(result.text)
    print()
    print(describe(result, method.label(), args.protocol, chat))
    return 0


# --------------------------------------------------------------------------------------------
# Checks made before the model loads
# --------------------------------------------------------------------------------------------


def read_context(prompt: str | None, file: Path | None) -> str:
    if file is not None:
        if not file.exists():
            raise FileNotFoundError(f"--file {file}: no such file")
        if not file.is_file():
            raise FileNotFoundError(f"--file {file} is not a file")
        try:
            prompt = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--file {file} is not UTF-8 text") from None
        if not prompt.strip():
            raise ValueError(f"--file {file} is empty; give a file with the context to answer from")
    elif not prompt or not prompt.strip():
        raise ValueError("--prompt is empty; give the context text (or --file)")
    return prompt


def build_method(spec: str, pairs: list[str], budget_given: float | None):
    """The method of --method (with its "name:param=value" parameters and --param), at --budget."""
    from kvmerger.evaluation.runner import parse_spec
    from kvmerger.methods import get_method

    name, params = parse_spec(spec)
    params.update(parse_params(pairs))
    if "budget" in params:
        raise ValueError("give the budget with --budget, not as a method parameter")
    if name.lower() == "full":
        if budget_given is not None:
            raise ValueError("--method full keeps the whole cache, so --budget does not apply; drop --budget or pick a method")
        return get_method("full", **params)
    return get_method(name, budget=DEFAULT_BUDGET if budget_given is None else budget_given, **params)


# --------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------


def use_chat(tokenizer, asked: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if asked and not has_template:
        raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat")
    return has_template if asked is None else asked


def build_prompt(tokenizer, context: str, question: str, chat: bool) -> tuple[str, str]:
    """(context part, question part): with the chat template, one user message split where the context ends."""
    before = context + "\n\n" if question else context
    if chat:
        from kvmerger.evaluation.tasks.prompting import render_prompt

        return render_prompt(tokenizer, True, before, question)
    return before, question


# --------------------------------------------------------------------------------------------
# Answering
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    question_tokens: int  # fed after compression (query-agnostic), else 0
    new_tokens: int
    report: Any  # the CompressionReport, or None when the prompt was too short to compress
    seconds_prefill: float  # prefill and compression together
    seconds_decoding: float

    @property
    def bytes_before(self) -> int:
        return self.report.cache_bytes_before if self.report else 0  # the whole cache, sliding layers included

    @property
    def bytes_after(self) -> int:
        return self.report.cache_bytes_after if self.report else 0

    @property
    def seconds_compressing(self) -> float:
        return self.report.seconds if self.report else 0.0

    @property
    def seconds_total(self) -> float:
        return self.seconds_prefill + self.seconds_decoding


class Progress:
    """Progress lines on stderr: a stage with its duration, and a bar for the decoded tokens."""

    def stage(self, text: str) -> float:
        print(f"kvmerger: {text} ...", end="", file=sys.stderr, flush=True)
        return time.perf_counter()

    def done(self, start: float, note: str = "") -> None:
        print(f" {time.perf_counter() - start:.1f} s{note}", file=sys.stderr, flush=True)

    def streamer(self, total: int):
        from tqdm.auto import tqdm
        from transformers.generation.streamers import BaseStreamer

        class TokenBar(BaseStreamer):
            def __init__(self) -> None:
                self.bar = tqdm(total=total, desc="kvmerger: decoding", unit="token", leave=False, file=sys.stderr)
                self.prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # generate() passes the prompt first
                    self.prompt_seen = True
                else:
                    self.bar.update(value.numel())

            def end(self) -> None:
                self.bar.close()

        return TokenBar()


def answer(
    model,
    tokenizer,
    method,
    context: str,
    question: str,
    protocol: str,
    max_new_tokens: int,
    progress: Progress | None = None,
) -> Answer:
    """Greedy answer to `context` + `question`, the prompt compressed by `method` under `protocol`.

    The prefill (which compresses the prompt layer by layer) runs on its own, then `generate()`
    continues from the compressed cache: query-aware, from the prefill's first token (the same as
    the full cache's, since every layer attends to the whole prompt before it is compressed);
    query-agnostic, from the question, fed on top of the compressed context. A query-agnostic
    prompt without a question part is the query-aware one: the prompt is fed once, never twice.
    """
    import torch

    from kvmerger.engine.session import compress

    device = model.device
    context_ids = tokenizer(context, return_tensors="pt").input_ids.to(device)
    question_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if protocol == "query-agnostic" and question_ids.shape[1]:
        prefill_ids, after_ids = context_ids, question_ids
    else:
        prefill_ids, after_ids = torch.cat([context_ids, question_ids], dim=1), question_ids[:, :0]
    prompt_tokens = prefill_ids.shape[1] + after_ids.shape[1]
    if prefill_ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization; give some text")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} that is more than the "
            f"model's context of {limit} tokens"
        )
    eos = _eos_ids(model, tokenizer)
    with torch.no_grad(), compress(model, method) as session:
        stage = f"prefill and compression of {prefill_ids.shape[1]} tokens ({method.label()})"
        start = progress.stage(stage) if progress else 0.0
        began = time.perf_counter()
        output = model(input_ids=prefill_ids, use_cache=True)
        seconds_prefill = time.perf_counter() - began
        report = session.reports[-1] if session.reports else None
        if progress:
            progress.done(start, "" if report else " (a one-token prompt: nothing to compress)")
        began = time.perf_counter()
        generated = _decode(model, output, prefill_ids, after_ids, max_new_tokens, eos, progress)
        seconds_decoding = time.perf_counter() - began
    return Answer(
        text=tokenizer.decode(generated, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        question_tokens=after_ids.shape[1],
        new_tokens=len(generated),
        report=report,
        seconds_prefill=seconds_prefill,
        seconds_decoding=seconds_decoding,
    )


def _decode(model, output, prefill_ids, after_ids, max_new_tokens: int, eos: set[int], progress) -> list[int]:
    """Greedy tokens after the prefill `output` (its cache holds `prefill_ids`), `after_ids` fed first."""
    import torch

    if after_ids.shape[1]:
        inputs, generated = torch.cat([prefill_ids, after_ids], dim=1), []
    else:  # the prefill's last distribution gives the first token; generate() continues after it
        first = int(output.logits[0, -1].argmax())
        if first in eos:
            return []
        generated = [first]
        if max_new_tokens == 1:
            return generated
        inputs = torch.cat([prefill_ids, torch.tensor([[first]], device=prefill_ids.device)], dim=1)
    budget = max_new_tokens - len(generated)
    streamer = progress.streamer(budget) if progress else None
    out = model.generate(
        inputs,
        cache=output.cache,
        max_new_tokens=budget,
        do_sample=False,
        streamer=streamer,
        eos_token_id=sorted(eos) or None,
    )
    new = out[0, inputs.shape[1] :].tolist()
    cut = next((i for i, token in enumerate(new) if token in eos), len(new))
    return generated + new[:cut]


def _eos_ids(model, tokenizer) -> set[int]:
    from kvmerger.evaluation.generation import stop_token_ids

    return stop_token_ids(model, tokenizer)


def describe(result: Answer, label: str, protocol: str, chat: bool) -> str:
    """The report printed after the answer."""
    prompt = "chat template" if chat else "plain text"
    question = f", of which {result.question_tokens} question tokens fed after compression" if result.question_tokens else ""
    lines = [f"[{label}, {protocol}, {prompt}] prompt {result.prompt_tokens} tokens{question}"]
    if result.report is None:
        lines.append("cache: nothing compressed (a one-token prompt has nothing to compress)")
    else:
        lines.append(f"cache after prefill: {result.report.summary()}")
    lines.append(
        f"time: prefill and compression {result.seconds_prefill:.1f} s (scoring and compressing "
        f"{result.seconds_compressing * 1e3:.0f} ms of it), "
        f"decoding {result.new_tokens} tokens {result.seconds_decoding:.1f} s"
    )
    return "\n".join(lines)
