"""SnapKV: keep the tokens the last prompt queries (the observation window) attend to, and the window.

Paper: Yuhong Li, Yingbing Huang, Bowen Yang, Bharat Venkitesh, Acyr Locatelli, Hanchen Ye, Tianle Cai,
Patrick Lewis, Deming Chen, "SnapKV: LLM Knows What You are Looking for Before Generation",
NeurIPS 2024 (arXiv 2404.14469). Reference code: FasterDecoding/SnapKV,
``snapkv/monkeypatch/snapkv_utils.py`` (``SnapKVCluster.update_kv``; defaults ``window_size=32``,
``kernel_size=5``, ``pooling='avgpool'``); kvpress's ``SnapKVPress``.

Per layer and KV head, with ``S`` slots and a window of ``w`` queries:

1. Scores: the attention each key before the window received from the last ``w`` prompt queries,
   summed over those queries (softmax over the whole causal row, as the reference computes it;
   `LayerScores.window_attention`).
2. Pooling: the scores of the tokens before the window are smoothed with a 1-D pooling of kernel
   ``k`` along the sequence, stride 1, zero padding ``k // 2`` (the reference's ``avg_pool1d`` /
   ``max_pool1d``; average pooling counts the zero padding, as PyTorch's default does).
3. Keep the ``S - w`` tokens with the highest pooled scores, and the ``w`` window tokens.

Choices:

* ``window=32``, ``kernel_size=5``, ``pooling="avg"`` (defaults): the reference repository's
  defaults (``init_snapkv``). ``pooling="max"`` selects its other option. The kernel must be odd,
  so that pooling keeps the sequence length.
* Grouped-query attention: the scores are averaged over the query heads of each KV head before
  pooling, as kvpress does (the reference ran multi-head models). For average pooling the order of
  averaging and pooling does not matter; for max pooling it does, and this is the order used.
* The window is always kept. If the budget cannot hold it (``S < w``) or the prompt is shorter than
  the window, the ``S`` newest tokens are kept (the window is ranked first; ties go to the later
  token). The reference instead leaves prompts shorter than its capacity uncompressed; here every
  method keeps exactly ``S`` slots.
* ``head_budget="shared"`` (Ada-KV's idea, Feng et al., arXiv 2407.11550): a layer's heads share its
  ``Hkv * S`` slots by pooled score, the window forced in every head, stored packed (engine.hf);
  default ``"equal"``, the paper's ``S`` per head. ``head_floor`` (default 0, none) is Ada-KV's
  safeguard: every head first keeps its ``floor(head_floor * S)`` best (kvpress's ``AdaKVPress``
  uses 0.2).
* During generation (engine option ``hold_budget=True``): SnapKV compresses the prompt once and
  defines no rule, so the engine's default applies (H2O's eviction by accumulated attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.engine.scoring import pool_scores
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, check_head_budget, check_pooling, keep_by_score_as


@dataclass
class SnapKV(CompressionMethod):
    """Top tokens by pooled attention from the observation window, plus the window (Li et al., 2024)."""

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = (
        "SnapKV (Li et al. 2024): attention from the last 32 queries, pooled (kernel 5), top-k + window"
    )

    budget: float = 0.5
    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    head_budget: str = "equal"
    head_floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head_budget(self.head_budget, self.head_floor)
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window is a number of last prompt queries, a positive integer; got {self.window!r}")
        check_pooling(self.kernel_size, self.pooling)

    def compress(self, layer: LayerInput) -> LayerOutput:
        length = layer.length
        window = min(self.window, length)
        observed = layer.scores.window_attention(self.window)  # [B, Hkv, T]
        past = observed[..., : length - window]
        if past.shape[-1]:
            past = pool_scores(past, self.kernel_size, self.pooling)
        window_first = torch.full_like(observed[..., length - window :], float("inf"), dtype=torch.float32)
        ranked = torch.cat([past.float(), window_first], dim=-1)
        output = keep_by_score_as(layer, self.head_budget, ranked, head_floor=self.head_floor)
        output.notes = {**output.notes, "window_kept": min(window, layer.slots)}
        return output
