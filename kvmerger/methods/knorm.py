"""K-norm: keep the tokens whose keys have the lowest L2 norm.

Paper: Alessio Devoto, Yu Zhao, Simone Scardapane, Pasquale Minervini, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression", EMNLP 2024 (arXiv 2406.11430). Reference code:
kvpress's ``KnormPress`` (``kvpress/presses/knorm_press.py``: score = ``-keys.norm(dim=-1)``).

Per layer and KV head, with ``S`` slots: the ``S`` tokens whose cached (post-RoPE) keys have the
smallest L2 norm. The paper observes that low-norm keys draw high attention. No attention statistics
are needed, so this method costs nothing to score.

Choices:

* Norms are taken in float32 of the keys as cached (post-RoPE; RoPE is a rotation and leaves them
  unchanged). Ties go to the later token (`top_indices`).
* During generation (engine option ``hold_budget=True``), the same rule: the slot whose key has the
  largest norm is evicted. Padding slots (none in this method's own caches) go first.
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


def negative_key_norm(keys: torch.Tensor) -> torch.Tensor:
    """[..., N, d] keys -> [..., N] float32 scores, higher for smaller norms."""
    return -keys.float().norm(dim=-1)


@dataclass
class KNorm(CompressionMethod):
    """Keep the keys with the lowest L2 norm (Devoto et al., 2024)."""

    name: ClassVar[str] = "knorm"
    summary: ClassVar[str] = "K-norm (Devoto et al. 2024): keep the keys with the lowest L2 norm, no attention needed"

    budget: float = 0.5

    def compress(self, layer: LayerInput) -> LayerOutput:
        return keep_by_score(layer, negative_key_norm(layer.keys))

    def hold_budget(self, state: SlotState) -> SlotState:
        return keep_highest(state, negative_key_norm(state.keys))
