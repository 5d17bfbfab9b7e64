"""Prompt building shared by the tasks: chat templates split between context and question, token
counts, and haystacks sized to a target number of tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvmerger.evaluation.tasks.base import Sample

CHAT_MARKER = "\x00QUESTION\x00"
PROBE_TOKENS = 256  # filler of the first build, to measure the fixed parts of a prompt


def render_prompt(
    tokenizer,
    chat: bool,
    before: str,
    after: str,
    answer_prefix: str = "",
    history: Sequence[dict[str, str]] = (),
) -> tuple[str, str]:
    """(context, question) of a prompt whose user message is `before + after`.

    `chat=False`: `before` and `after + answer_prefix`. `chat=True`: the model's chat template
    around `history` (earlier turns) and the user message, split where `before` ends, with the
    answer prefix after the assistant header.
    """
    if not chat:
        return before, after + answer_prefix
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use chat=False")
    messages = [*history, {"role": "user", "content": before + CHAT_MARKER + after}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, tail = rendered.split(CHAT_MARKER)
    return head, tail + answer_prefix


def prompt_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` with no special tokens added (chat markup in the text is counted)."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def sample_tokens(tokenizer, sample: Sample) -> int:
    return prompt_tokens(tokenizer, sample.context + sample.question)


def fit_filler(build: Callable[[int], Sample], tokenizer, target: int) -> Sample:
    """The sample whose prompt is closest to `target` tokens (ties: the shorter), `build(filler_tokens)`
    measured once with a probe filler to find the fixed parts, then corrected a few times."""
    probe = build(PROBE_TOKENS)
    fixed = sample_tokens(tokenizer, probe) - PROBE_TOKENS
    budget = target - fixed
    if budget < PROBE_TOKENS:
        raise ValueError(
            f"context_tokens={target} is too small: this task's fixed parts take about {fixed} tokens "
            f"and its haystack needs at least {PROBE_TOKENS}; ask for {fixed + PROBE_TOKENS} or more"
        )
    best, best_miss = probe, None
    for _ in range(4):
        sample = build(budget)
        size = sample_tokens(tokenizer, sample)
        miss = size - target
        if best_miss is None or (abs(miss), miss) < (abs(best_miss), best_miss):
            best, best_miss = sample, miss
        if miss == 0:
            break
        budget -= miss
    best.meta["prompt_tokens"] = target + best_miss
    return best
