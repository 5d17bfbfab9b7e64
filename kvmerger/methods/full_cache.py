"""Full cache: no compression, the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput


@dataclass
class FullCache(CompressionMethod):
    """Keep every token (budget is always 1.0)."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "Full cache: no compression (the reference)"

    budget: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget != 1.0:
            raise ValueError(f"the full cache keeps everything; its budget is 1.0, got {self.budget}")

    def can_hold_budget(self) -> bool:
        return False  # the full cache keeps every token; holding a budget would make it evict

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, _ = layer.keys.shape
        positions = torch.arange(length, device=layer.keys.device).expand(batch, heads, length)
        return LayerOutput(keys=layer.keys, values=layer.values, positions=positions)
