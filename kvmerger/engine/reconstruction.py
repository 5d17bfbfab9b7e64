"""KVzip's context reconstruction: how much each prompt key matters for repeating the prompt.

Paper: Jang-Hyun Kim, Jinuk Kim, Sangwoo Kwon, Jae W. Lee, Sangdoo Yun, Hyun Oh Song, "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416 (2025).
Reference code: snu-mllab/KVzip (``attention/score.py``, ``KVScore._get_score``) and kvpress's
``KVzipPress`` (read, not copied).

Once the prompt is prefilled (full cache), the model is fed on top of that cache, teacher-forced, an
instruction to repeat the context followed by the context itself, chunk by chunk of `chunk_tokens`:

* chunk 0: "\\n\\nRepeat the previous context exactly." + suffix + the chunk's tokens;
* chunk i > 0: "\\n\\nRepeat the part of the previous context exactly, starting with" + the last 8
  tokens of chunk i - 1 + suffix + the chunk's tokens,

where the suffix is the chat template's assistant header when the tokenizer has a chat template
(the model is asked, and then answers), "\\n" otherwise (the reference code's prompts). In every
layer each of these queries takes its softmax over the sink keys (the prompt's first
`sink_tokens`), the keys of the chunk being repeated and the reconstruction's own keys (causal): the
reference code's restriction, which bounds the work per chunk. A chunk key's score is the largest
probability it receives from any query of its chunk and any query head of its KV head's group
(`scoring.largest_attention`). The repeat tokens are cropped from the cache after each chunk, so
the prompt's cache ends as it was. Sinks score +inf (always kept, as the reference keeps them).

Our choices:
* The "context" is the whole prompt after the sinks: the engine sees token ids, not which part of
  a chat-formatted prompt is the system header (the reference repeats the text after that header).
* Along with the scores, the reconstruction's query states at up to `reference_queries` positions,
  evenly spaced over the repeated tokens, are kept per layer (post-RoPE, as attention saw them): the
  attention-matching fits may take them as reference queries (the paper's "repeat-prefill" queries,
  arXiv 2602.16284). Each of them has seen the whole prompt.
* Cost: one more forward pass over the prompt (plus a few dozen instruction tokens per chunk) on
  top of the full cache. Where `kernels.available`, each layer's attention over the cache runs as
  flash passes over the sinks and the chunk, over the rest of the cache and over the own keys
  (`kernels.attention_with_part_lse`): the same output, and each query's normaliser over the
  score's keys comes with it, so a score is one product over the chunk's keys and a max
  (`scoring.largest_probability`). Measured 2.2 / 2.0 prefills at 2k / 8k tokens on the default
  model, fp32, 2 CPU cores (docs/BENCHMARKS.md section 9), within the 2-3 the paper reports; it
  was 3.2-3.5 / 3.0 when the normalisers were recomputed in float32 chunks (`largest_attention`,
  still the path on other devices).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvmerger.engine.hf import CompressedCache, install_session, is_compressed, restorer
from kvmerger.engine.scoring import SINK_TOKENS, largest_attention, largest_probability
from kvmerger.engine.session import Session

CHUNK_TOKENS = 2048  # the reference code's chunk size
CARRIED_TOKENS = 8  # the reference code's `prev_postfix_size`: tokens of the previous chunk repeated
REFERENCE_QUERIES = 512  # reconstruction query positions kept per layer for the fitted methods
FIRST_INSTRUCTION = "\n\nRepeat the previous context exactly."
LATER_INSTRUCTION = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of the reconstruction instructions, for one tokenizer."""

    first: list[int]
    later: list[int]
    suffix: list[int]

    @classmethod
    def for_tokenizer(cls, tokenizer) -> RepeatPrompt:
        encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        return cls(encode(FIRST_INSTRUCTION), encode(LATER_INSTRUCTION), encode(assistant_header(tokenizer)))


def assistant_header(tokenizer) -> str:
    """What the chat template puts after a user message to start the assistant's answer ("\\n" without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    marker = "\x00END\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    return rendered.split(marker, 1)[1]


def load_tokenizer(model: torch.nn.Module):
    """The tokenizer saved with `model` (its `name_or_path`), for when none was given."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # any failure means the same thing to the user
        raise ValueError(
            "the reconstruction score feeds the model an instruction to repeat the prompt, which needs its "
            f"tokenizer; none was given and none could be loaded from {source!r}: pass tokenizer= to "
            "compress() or record_prefill()"
        ) from error


def chunk_bounds(length: int, first: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of the repeated chunks of prompt tokens first..length."""
    return [(start, min(length, start + chunk_tokens)) for start in range(first, length, chunk_tokens)]


class Reconstruction:
    """KVzip's repeat pass over one prefilled prompt, run once, on first request, for every layer.

    `cache` holds the prompt's full keys and values (it is grown by each chunk, then cropped back);
    `prompt_ids` [B, T] are the prompt's token ids.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: CompressedCache,
        prompt_ids: torch.Tensor,
        tokenizer=None,
        *,
        chunk_tokens: int = CHUNK_TOKENS,
        sink_tokens: int = SINK_TOKENS,
        reference_queries: int = REFERENCE_QUERIES,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
        self.model = model
        self.cache = cache
        self.prompt_ids = prompt_ids
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.sink_tokens = sink_tokens
        self.reference_queries = reference_queries
        self._scores: dict[int, torch.Tensor] | None = None  # per compressed layer index
        self._queries: dict[int, list[torch.Tensor]] = {}
        self.seconds = 0.0

    @property
    def length(self) -> int:
        return self.prompt_ids.shape[-1]

    @property
    def sinks(self) -> int:
        """Prompt tokens at the start that are never repeated and always kept."""
        return min(self.sink_tokens, self.length - 1)

    def scores(self, layer_idx: int) -> torch.Tensor:
        """[B, Hkv, T] float32: the largest attention each prompt key received while repeating (sinks +inf)."""
        self.run()
        return self._scores[layer_idx]

    def queries(self, layer_idx: int) -> torch.Tensor:
        """[B, Hq, R, d]: the reconstruction's query states at R evenly spaced repeated positions."""
        self.run()
        return torch.cat(self._queries[layer_idx], dim=2)

    def run(self) -> None:
        if self._scores is not None:
            return
        start = time.perf_counter()
        compressed = {index: layer for index, layer in enumerate(self.cache.layers) if is_compressed(layer)}
        if any(layer.compressed_slots for layer in compressed.values()):
            raise ValueError("the reconstruction pass needs the prompt's full, uncompressed cache")
        prompt = RepeatPrompt.for_tokenizer(self.tokenizer if self.tokenizer is not None else load_tokenizer(self.model))
        sinks = self.sinks
        chunks = chunk_bounds(self.length, sinks, self.chunk_tokens)
        batch, kv_heads = next(iter(compressed.values())).keys.shape[:2]
        self._scores = {}
        for index, layer in compressed.items():
            self._scores[index] = torch.zeros(batch, kv_heads, self.length, device=layer.keys.device)
            self._scores[index][..., :sinks] = math.inf
        self._queries = {index: [] for index in compressed}
        stride = max(1, math.ceil((self.length - sinks) / max(1, self.reference_queries)))
        session = _RepeatSession(self.model, self)
        with torch.no_grad(), install_session(self.model, session):
            for index, (first, last) in enumerate(chunks):
                instruction = prompt.first if index == 0 else prompt.later
                carried = [] if index == 0 else self.prompt_ids[0, max(sinks, first - CARRIED_TOKENS) : first].tolist()
                head = instruction + carried + prompt.suffix
                ids = torch.cat(
                    [torch.tensor([head], device=self.prompt_ids.device).expand(batch, -1), self.prompt_ids[:, first:last]],
                    dim=1,
                )
                session.chunk = (first, last, len(head), _kept_rows(first, last, sinks, stride))
                # a sliding-window layer cannot be cropped back once the chunk slid it forward: restore it
                restores = [restorer(layer) for layer in self.cache.layers if not is_compressed(layer)]
                self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
                for layer in compressed.values():
                    layer.crop(-ids.shape[1])
                for restore in restores:
                    restore()
        self.seconds = time.perf_counter() - start


def _kept_rows(first: int, last: int, sinks: int, stride: int) -> torch.Tensor:
    """Offsets, within a chunk's repeated tokens, of the positions whose queries are kept."""
    offsets = torch.arange(first, last)
    return offsets[(offsets - sinks) % stride == stride - 1] - first


class _RepeatSession(Session):
    """Scores each layer's attention during one reconstruction chunk (see `Reconstruction.run`)."""

    def __init__(self, model: torch.nn.Module, owner: Reconstruction) -> None:
        super().__init__(model)
        self.owner = owner
        self.chunk: tuple[int, int, int, torch.Tensor] = (0, 0, 0, torch.empty(0, dtype=torch.long))

    def normaliser_part(self, module: torch.nn.Module) -> torch.Tensor:
        """The sinks and the chunk being repeated: with the own keys, what each score's softmax spans."""
        first, last = self.chunk[:2]
        return torch.cat([torch.arange(self.owner.sinks), torch.arange(first, last)]).to(self.owner.prompt_ids.device)

    def after_attention(self, layer, module, query, key, value, scaling, lse=None) -> None:
        first, last, head, kept = self.chunk
        if lse is not None:  # the attention's flash passes gave each query's normaliser over the part
            scores = largest_probability(query, key[:, :, first:last], scaling, lse)
        else:
            sinks = self.owner.sinks
            own = query.shape[2]
            keys = torch.cat([key[:, :, :sinks], key[:, :, first:last], key[:, :, key.shape[2] - own :]], dim=2)
            scores = largest_attention(query, keys, scaling, sinks + last - first, slice(sinks, sinks + last - first))
        self.owner._scores[module.layer_idx][..., first:last] = scores
        self.owner._queries[module.layer_idx].append(query[:, :, head + kept.to(query.device)])
