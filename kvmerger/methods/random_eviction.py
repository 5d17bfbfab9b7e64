"""Random eviction: keep a uniformly random subset of the prompt's tokens, seeded.

The floor every scoring rule must beat, as in kvpress's ``RandomPress`` (NVIDIA/kvpress,
``kvpress/presses/random_press.py``); no paper of its own.

Choices:

* Every KV head of every layer draws its own subset: one uniform score per token from a CPU
  ``torch.Generator`` seeded with ``(seed, layer_idx)``, and the ``slots`` highest scores are kept
  (`keep_by_score`; ties, which have probability 0, go to the later token). The same seed gives
  the same cache on every run and every device; layers differ from one another.
* While the engine holds the budget during generation, the slots to drop are random too: fresh
  uniform scores from a generator seeded with ``(seed, layer_idx, tokens seen)``, so a generation
  is reproducible step by step. Padding slots (none in this method's own caches) go first.
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

_SEED_MIX = 1_000_003  # a prime: (seed, layer) pairs map to distinct generator seeds
_SEED_MODULUS = 2**62


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed is derived from `parts` (e.g. a method's seed and the layer index)."""
    value = 0
    for part in parts:
        value = (value * _SEED_MIX + int(part)) % _SEED_MODULUS
    return torch.Generator().manual_seed(value)


def uniform_draws(shape: tuple[int, ...], device: torch.device, *parts: int) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers of `shape` from `seeded_generator(*parts)`, moved to `device`."""
    return torch.rand(shape, generator=seeded_generator(*parts)).to(device)


@dataclass
class RandomEviction(CompressionMethod):
    """Keep a uniformly random subset of tokens per KV head, reproducible from `seed`."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "Random eviction: a uniform, seeded subset of tokens per head (the floor to beat)"

    budget: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, _ = layer.keys.shape
        scores = uniform_draws((batch, heads, length), layer.keys.device, self.seed, layer.layer_idx)
        return keep_by_score(layer, scores)

    def hold_budget(self, state: SlotState) -> SlotState:
        shape = tuple(state.set_sizes.shape)
        scores = uniform_draws(shape, state.keys.device, self.seed, state.layer_idx, state.seen_tokens)
        return keep_highest(state, scores)
