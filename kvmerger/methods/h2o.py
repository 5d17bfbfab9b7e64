"""H2O: keep the heavy hitters (most attended tokens) and a window of recent tokens.

Paper: Zhenyu Zhang, Ying Sheng, Tianyi Zhou, Tianlong Chen, Lianmin Zheng, Ruisi Cai, Zhao Song,
Yuandong Tian, Christopher Re, Clark Barrett, Zhangyang Wang, Beidi Chen, "H2O: Heavy-Hitter Oracle
for Efficient Generative Inference of Large Language Models", NeurIPS 2023 (arXiv 2306.14048).
Reference code: FMInference/H2O, ``h2o_hf/utils_real_drop/modify_llama.py`` (``H2OKVCache_LayerWise``);
also kvpress's ``ObservedAttentionPress`` with a recent window.

Per layer and KV head, once the prompt is prefilled, with ``S`` slots:

* the ``recent = floor(recent_share * S)`` newest tokens are kept (H2O's ``recent_size``);
* among the others, the ``S - recent`` with the highest aggregated attention are kept (H2O's
  ``hh_size``): the attention each key received, summed over every prompt query, as the reference's
  ``attn_score_cache.sum(0).sum(1)`` (computed by `kvmerger.engine.scoring`, in float32).

Choices:

* ``recent_share=0.5`` (default): "half and half", the paper's and the reference's setting (equal
  heavy and recent ratios). With an odd ``S`` the recent window gets ``floor(S / 2)`` slots and the
  heavy hitters the extra one; the same rounding as the engine's generation-time default.
* Grouped-query attention: scores are averaged over the query heads that share a KV head (the
  reference ran multi-head models, one score row per head); each KV head keeps its own tokens.
* Ties between equal scores go to the later token (`top_indices`).
* During generation (engine option ``hold_budget=True``), H2O's native rule: every new token is
  appended, then the slot with the least accumulated attention outside the ``recent`` newest is
  evicted, the attention received from the new queries being added to the prompt's scores; the
  reference's ``evict_for_space`` / ``_update_hh_score``. Padding slots go first.
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
    check_statistic,
    floor_share,
    gather_tokens,
    keep_slots,
    top_indices,
)


def recent_slots(share: float, slots: int) -> int:
    """Slots of the recent window: ``floor(share * slots)`` (guarded against float noise)."""
    return min(slots, floor_share(share, slots))


def heavy_hitters_and_recent(attention: torch.Tensor, slots: int, recent: int) -> torch.Tensor:
    """[..., slots] indices in sequence order: the `recent` last tokens and the highest-`attention` others.

    attention: [..., T] aggregated attention.
    """
    length = attention.shape[-1]
    ranked = attention.float().clone()
    if recent:
        ranked[..., length - recent :] = float("inf")
    return top_indices(ranked, slots).sort(dim=-1).values


def hold_keep_indices(state: SlotState, recent: int) -> torch.Tensor:
    """[B, Hkv, target] slots H2O keeps during generation: the `recent` newest slots and, among the
    others, those with the most accumulated attention (padding slots first to go)."""
    length = state.keys.shape[-2]
    recent = min(recent, state.target_slots)
    ranked = state.accumulated.float().masked_fill(state.set_sizes == 0, float("-inf"))
    if recent:
        ranked[..., length - recent :] = float("inf")
    return top_indices(ranked, state.target_slots)


def check_recent_share(value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"recent_share is the share of the slots given to the recent window, in [0, 1]; got {value!r}")


@dataclass
class H2O(CompressionMethod):
    """Heavy hitters by aggregated attention plus a recent window (Zhang et al., 2023)."""

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = (
        "H2O (Zhang et al. 2023): heavy hitters by aggregated attention + recent window, half and half"
    )

    budget: float = 0.5
    recent_share: float = 0.5
    statistic: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_recent_share(self.recent_share)
        check_statistic(self.statistic)

    def compress(self, layer: LayerInput) -> LayerOutput:
        recent = recent_slots(self.recent_share, layer.slots)
        keep = heavy_hitters_and_recent(layer.scores.aggregated_attention(self.statistic), layer.slots, recent)
        output = gather_tokens(layer, keep)
        output.notes = {"recent": recent, "heavy_hitters": layer.slots - recent}
        return output

    def hold_budget(self, state: SlotState) -> SlotState:
        return keep_slots(state, hold_keep_indices(state, recent_slots(self.recent_share, state.target_slots)))
