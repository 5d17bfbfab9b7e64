"""Language modelling on long text: compress a long prefix, then score the tokens that follow.

The most sensitive signal on a small model: pass keys and needles are found or not, while the
next-token distributions move with every slot a method drops or blends. The protocol follows the
KV-cache compression literature's perplexity runs (H2O, StreamingLLM, kvpress's benchmarks): the
prefix is prefilled and compressed once, then the continuation is teacher-forced from the
compressed cache.

Our choices:
* Windows. Sample i reads `sources[i % len(sources)]` ("essays": the shipped Paul Graham essays;
  "shakespeare": tinyshakespeare), from a line start at a seeded random offset, and takes
  `context_tokens + continuation + 1` tokens: the first `context_tokens` are the prefix. The
  tokens the tokenizer puts before any text (Gemma's `<bos>`; none for the default model) come
  first and count in the prefix: models trained with them go astray without them.
* Scoring. The `continuation` tokens after the prefix are fed in one chunk from the compressed
  cache; their `continuation` output distributions predict the tokens one further on. So every
  scored prediction comes from the compressed cache (the first token after the prefix is predicted
  by the prefill, which is uncompressed; it is fed, not scored).
* Metrics, over those predictions: perplexity exp(mean NLL), mean KL(full || compressed) per token
  in nats (the full cache's distributions from the same prefill, teacher-forced the same way), and
  top-1 agreement, the share of positions where both caches' most likely token is the same; the
  runner records the top-1 agreement as the cell's score (1 for the full cache).

This is not a question-answering `Task`: it has no question, no generation and no string to score,
so it has its own small interface (`samples`, `measure`) and the runner dispatches on its type. It
is registered in the same `TASKS` table, so `get_task("lm")` and the command line find it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from kvmerger.evaluation.metrics import kl_divergence, token_nll
from kvmerger.evaluation.tasks.base import TASKS
from kvmerger.evaluation.texts import essays, leading_special_ids, shakespeare

SOURCES = {"essays": essays, "shakespeare": shakespeare}
CHARS_PER_TOKEN = 8  # generous: the essays take ~4.2 characters per token with the default tokenizer


@dataclass
class Window:
    """One language-modelling sample: a prefix to compress and the tokens after it."""

    task: str
    prefix_ids: list[int]  # the prompt to prefill and compress
    continuation_ids: list[int]  # `continuation + 1` tokens: the first `continuation` are fed, the last scored
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fed(self) -> torch.Tensor:
        return torch.tensor([self.continuation_ids[:-1]])

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([self.continuation_ids[1:]])


@dataclass
class LanguageModeling:
    """Perplexity, KL to the full cache and top-1 agreement on text after a compressed prefix."""

    name: ClassVar[str] = "lm"
    summary: ClassVar[str] = (
        "language modelling: a long prefix compressed, the next tokens scored (perplexity, KL to the full cache)"
    )

    continuation: int = 256
    sources: tuple[str, ...] = ("essays", "shakespeare")

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        self.sources = tuple(self.sources)
        unknown = [source for source in self.sources if source not in SOURCES]
        if not self.sources or unknown:
            raise ValueError(f"sources must be some of {', '.join(SOURCES)}; got {self.sources!r}")
        if not isinstance(self.continuation, int) or self.continuation < 1:
            raise ValueError(f"continuation is a number of tokens, at least 1; got {self.continuation!r}")

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def tokens_needed(self, context_tokens: int) -> int:
        """Positions one window takes in the model: prefix plus the fed continuation."""
        return context_tokens + self.continuation

    def samples(self, tokenizer, context_tokens: int, count: int, seed: int) -> list[Window]:
        if context_tokens < 2 or count < 0:
            raise ValueError(f"context_tokens must be at least 2 and count non-negative; got {context_tokens}, {count}")
        return [self.window(tokenizer, context_tokens, seed, index) for index in range(count)]

    def window(self, tokenizer, context_tokens: int, seed: int, index: int) -> Window:
        source = self.sources[index % len(self.sources)]
        text = SOURCES[source]()
        total = context_tokens + self.continuation + 1
        span = total * CHARS_PER_TOKEN
        if span >= len(text):
            raise ValueError(f"the {source} text is too short for a window of {total} tokens")
        start = random.Random(f"{self.name}/{seed}/{index}").randrange(0, len(text) - span)
        start = text.find("\n", start) + 1  # begin at a line start (find never fails: span lies ahead)
        text_ids = tokenizer(text[start : start + span], add_special_tokens=False).input_ids
        ids = leading_special_ids(tokenizer) + text_ids
        if len(ids) < total:
            raise ValueError(f"{span} characters of {source} gave only {len(ids)} tokens, fewer than {total}")
        return Window(
            self.name,
            ids[:context_tokens],
            ids[context_tokens:total],
            {"source": source, "offset": start, "index": index, "seed": seed},
        )

    @staticmethod
    def measure(reference_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Metrics of one window from the full cache's and the compressed cache's logits [1, M, vocab]."""
        nll = token_nll(logits, targets)
        return {
            "perplexity": float(nll.mean().exp()),
            "nll": float(nll.mean()),
            "kl": float(kl_divergence(reference_logits, logits).mean()),
            "top1_agreement": float((reference_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
        }


TASKS[LanguageModeling.name] = LanguageModeling  # type: ignore[assignment]  # not a question-answering Task
