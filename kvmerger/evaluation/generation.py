"""Greedy decoding from a cache compressed offline (`compress_prefill`), for the two protocols.

* Query-aware (the paper's protocol): context and question were prefilled and compressed
  together. The first answer token is the argmax of `prefill.last_logits`, the distribution the
  *full-cache* prefill gave after the prompt: the prompt is compressed after its prefill, so the
  first token is the same for every method, as in the paper's setting and kvpress's pipeline; the
  compressed cache produces every later token.
* Query-agnostic (kvpress's protocol): only the context was prefilled and compressed; the question
  is fed as one chunk on top of the compressed cache, whose last distribution gives the first
  answer token.

Decoding is greedy and stops at an end-of-sequence token (the tokenizer's and the model's
generation config's), at `max_new_tokens`, or once the answer, leading whitespace aside, contains
one of the task's stop strings; the answer is cut before it. Runs inside `kvmerger.attach(model)`
so that caches with per-slot biases are decoded correctly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmerger.engine.hf import CompressedCache
from kvmerger.engine.session import attach


@dataclass
class Answer:
    text: str  # cut before the first stop string
    tokens: list[int]  # every generated token, stop string included
    stop: str  # "eos", "stop string" or "length"
    seconds: float


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str | None:
    """`text` cut before the first stop string that follows its leading whitespace, or None if none does."""
    body = text.lstrip()
    hits = [body.find(stop) for stop in stop_strings if stop and stop in body]
    if not hits:
        return None
    return text[: len(text) - len(body) + min(hits)]


@torch.no_grad()
def greedy_answer(
    model: torch.nn.Module,
    tokenizer,
    cache: CompressedCache,
    first_logits: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    eos_ids: set[int] | None = None,
) -> Answer:
    """Greedy tokens from `first_logits` ([1, vocab], the distribution of the first answer token) on."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    eos_ids = stop_token_ids(model, tokenizer) if eos_ids is None else eos_ids
    start = time.perf_counter()
    tokens: list[int] = []
    logits = first_logits
    stop = "length"
    with attach(model):
        while True:
            token = int(logits[0].argmax())
            if token in eos_ids:
                stop = "eos"
                break
            tokens.append(token)
            if stop_strings and cut_at_stop(tokenizer.decode(tokens), stop_strings) is not None:
                stop = "stop string"
                break
            if len(tokens) >= max_new_tokens:
                break
            step = torch.tensor([[token]], device=first_logits.device)
            logits = model(input_ids=step, cache=cache, use_cache=True).logits[:, -1].float()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = cut_at_stop(text, stop_strings) if stop_strings else None
    return Answer(text if cut is None else cut, tokens, stop, time.perf_counter() - start)


@torch.no_grad()
def feed(model: torch.nn.Module, cache: CompressedCache, ids: torch.Tensor, *, last_only: bool) -> torch.Tensor:
    """Run `ids` [1, n] as one chunk on top of `cache` (which grows); float32 logits [1, n or 1, vocab]."""
    with attach(model):
        output = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
    return output.logits.float()


def answer_query_aware(
    model: torch.nn.Module, tokenizer, last_logits: torch.Tensor, cache: CompressedCache, **options
) -> Answer:
    """Answer after a compressed prompt that held the question (first token from the full prefill)."""
    return greedy_answer(model, tokenizer, cache, last_logits, **options)


def answer_query_agnostic(
    model: torch.nn.Module,
    tokenizer,
    last_logits: torch.Tensor,
    cache: CompressedCache,
    question_ids: torch.Tensor,
    **options,
) -> Answer:
    """Answer after feeding `question_ids` [1, n] on top of a compressed context.

    The question's forward pass counts in the answer's seconds. With an empty question the
    context's own last distribution (`last_logits`) starts the answer.
    """
    start = time.perf_counter()
    first = feed(model, cache, question_ids, last_only=True)[:, -1] if question_ids.shape[-1] else last_logits
    answer = greedy_answer(model, tokenizer, cache, first, **options)
    answer.seconds = time.perf_counter() - start
    return answer
