"""TOVA: keep the tokens the newest query attends to most, averaged over all heads of the layer.

Paper: Matanel Oren, Michael Hassid, Nir Yarden, Yossi Adi, Roy Schwartz, "Transformers are Multi-State
RNNs", EMNLP 2024 (arXiv 2401.06104); TOVA = Token Omission Via Attention. Reference code:
schwartz-lab-NLP/TOVA, ``src/tova_cache.py`` (``TOVACache.reduce``); kvpress's ``TOVAPress``.

Per layer, with ``S`` slots: the attention of the last prompt query over every prompt token
(`LayerScores.window_attention(1)`), averaged over all the layer's heads; the ``S`` tokens with
the highest average are kept, the same tokens in every KV head (the reference's
``torch.mean(attn_weights[:, :, -1, :], dim=1)`` and one ``topk`` for all heads).

Choices:

* Grouped-query attention: the statistics come per KV head, already averaged over the query heads
  of its group; averaging those over the KV heads (groups have equal size) is the average over all
  query heads, as in the reference.
* The last token is not forced into the cache (the reference does not force it; kvpress does). It
  attends to itself, so it is usually kept anyway.
* Ties go to the later token (`top_indices`).
* During generation (engine option ``hold_budget=True``), TOVA's native rule: after each new token,
  the slot with the least attention from the newest query, averaged over all heads, is evicted
  (``SlotState.last_attention``). Padding slots (none in this method's own caches) go first.
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
    keep_by_score,
    keep_highest,
)


def head_average(attention: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, N] -> the mean over KV heads, repeated for every head (float32)."""
    return attention.float().mean(dim=1, keepdim=True).expand_as(attention)


@dataclass
class TOVA(CompressionMethod):
    """Keep the tokens with the most attention from the newest query, averaged over heads (Oren et al., 2024)."""

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = (
        "TOVA (Oren et al. 2024): the last query's attention averaged over all heads, one selection per layer"
    )

    budget: float = 0.5

    def compress(self, layer: LayerInput) -> LayerOutput:
        return keep_by_score(layer, head_average(layer.scores.window_attention(1)))

    def hold_budget(self, state: SlotState) -> SlotState:
        return keep_highest(state, head_average(state.last_attention))
