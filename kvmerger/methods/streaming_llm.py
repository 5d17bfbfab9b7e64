"""StreamingLLM: keep the first tokens (attention sinks) and a window of the most recent ones.

Paper: Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis, "Efficient Streaming Language
Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453). Reference code: mit-han-lab/streaming-llm,
``streaming_llm/kv_cache.py`` (``StartRecentKVCache``, ``start_size=4``); kvpress's
``StreamingLLMPress`` (``n_sink=4``).

Per layer and KV head, with ``S`` slots: the first ``sinks`` prompt tokens and the ``S - sinks``
most recent ones. No scores are needed.

Choices:

* ``n_sink=4`` (default), the paper's setting.
* ``sinks = min(n_sink, S - 1)``: at least one recent slot is always kept, so a budget of fewer than
  ``n_sink + 1`` slots keeps ``S - 1`` sinks and the last token (the reference assumes a cache of
  ``start_size + recent_size`` with a positive ``recent_size`` and never meets this case).
* No position shift: the reference's streaming mode re-rotates keys to their cache index
  ("pos_shift"); here, as in every method of this package, keys keep their true RoPE positions.
* During generation (engine option ``hold_budget=True``), the reference's ``evict_for_space``:
  the sinks stay, and the oldest other slots are evicted (the window slides). Slots are ranked by the
  token position they stand at; padding slots (none in this method's own caches) go first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.methods.base import (
    CompressionMethod,
    LayerInput,
    LayerOutput,
    SlotState,
    gather_tokens,
    keep_highest,
)


def sink_count(n_sink: int, slots: int) -> int:
    """Sinks kept at `slots` slots: ``n_sink``, but at least one slot stays for recent tokens."""
    return max(0, min(n_sink, slots - 1))


@dataclass
class StreamingLLM(CompressionMethod):
    """The first `n_sink` tokens plus the most recent ones (Xiao et al., 2024)."""

    name: ClassVar[str] = "streaming-llm"
    summary: ClassVar[str] = "StreamingLLM (Xiao et al. 2024): 4 attention sinks + the most recent tokens"

    budget: float = 0.5
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_sink, int) or isinstance(self.n_sink, bool) or self.n_sink < 0:
            raise ValueError(f"n_sink is a number of first tokens kept, a non-negative integer; got {self.n_sink!r}")

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, _ = layer.keys.shape
        sinks = sink_count(self.n_sink, layer.slots)
        device = layer.keys.device
        keep = torch.cat(
            [torch.arange(sinks, device=device), torch.arange(length - (layer.slots - sinks), length, device=device)]
        )
        output = gather_tokens(layer, keep.expand(batch, heads, -1))
        output.notes = {"sinks": sinks, "recent": layer.slots - sinks}
        return output

    def hold_budget(self, state: SlotState) -> SlotState:
        sinks = sink_count(self.n_sink, state.target_slots)
        ranked = state.positions.float()
        ranked = ranked.masked_fill((state.positions >= 0) & (state.positions < sinks), float("inf"))
        return keep_highest(state, ranked)
