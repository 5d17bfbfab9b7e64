"""What a compression method is: one small object with one job.

Given one layer's keys, values and attention statistics, a method returns the smaller keys and
values (and, when it needs them, per-slot logit biases). The engine, not the method, deals with
transformers, caches, hooks and timing.

Budget semantics (shared by every method, see docs/METHOD.md): at budget ``b`` the prompt part of
every layer keeps exactly ``slots_for_budget(T, b) = ceil(b * T)`` slots per KV head.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from kvmerger.engine.scoring import LayerScores

METHODS: dict[str, type[CompressionMethod]] = {}


def slots_for_budget(length: int, budget: float) -> int:
    """Slots per KV head kept for a prompt of `length` tokens at `budget` (at least one).

    `ceil`, guarded against float noise: 0.35 * 20 is 7.000000000000001 in binary, and means 7.
    """
    return max(1, min(length, math.ceil(budget * length - 1e-9 * max(1, length))))


@dataclass
class LayerInput:
    """One layer's prompt cache, as a method sees it."""

    keys: torch.Tensor  # [B, Hkv, T, d], post-RoPE
    values: torch.Tensor  # [B, Hkv, T, d]
    scores: LayerScores
    layer_idx: int
    num_layers: int
    slots: int  # slots per KV head the budget allows for this prompt

    @property
    def length(self) -> int:
        return self.keys.shape[-2]


@dataclass
class LayerOutput:
    """One layer's compressed cache.

    `positions[b, h, s]` is the prompt index of the token slot s stands at (the pivot for a merged
    slot, -1 for padding); `set_sizes` counts the prompt tokens folded into each slot (1 for a kept
    token, 0 for padding; None means every slot is one kept token).
    """

    keys: torch.Tensor  # [B, Hkv, S, d]
    values: torch.Tensor  # [B, Hkv, S, d]
    positions: torch.Tensor  # [B, Hkv, S], long
    set_sizes: torch.Tensor | None = None  # [B, Hkv, S], long
    bias: torch.Tensor | None = None  # [B, Hkv, S], float32 additive attention logits
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionMethod(ABC):
    """Base class. Subclasses are dataclasses with typed, validated fields and a class-level
    `name` (how users and the command line call them) and `summary` (one line for `kvmerger methods`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    budget: float = 0.5

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    def __post_init__(self) -> None:
        if not isinstance(self.budget, (int, float)) or not 0.0 < float(self.budget) <= 1.0:
            raise ValueError(f"budget must be in (0, 1] (the share of the prompt's cache kept), got {self.budget!r}")

    def target_slots(self, length: int) -> int:
        return slots_for_budget(length, self.budget)

    def keeps_budget(self) -> bool:
        """Whether every layer and head ends with exactly `target_slots` slots (the engine checks it)."""
        return True

    @abstractmethod
    def compress(self, layer: LayerInput) -> LayerOutput:
        """Return the compressed keys and values of one layer. Must not modify the inputs."""

    def describe(self) -> dict[str, Any]:
        """The method's name and every parameter, for records and reports."""
        return {"method": self.name, **asdict(self)}

    def label(self) -> str:
        return f"{self.name}@{self.budget:g}"


def get_method(name: str, **params: Any) -> CompressionMethod:
    """Build a registered method by name, e.g. ``get_method("kvmerger", budget=0.35)``."""
    import kvmerger.methods  # noqa: F401  (registers every method)

    key = name.lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{key} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(known))}")
    return cls(**params)


# --------------------------------------------------------------------------------------------
# Helpers shared by methods
# --------------------------------------------------------------------------------------------


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest entries along the last dim; ties go to the later index.

    Deterministic (the reference implementations in the tests rely on the same rule).
    """
    if count <= 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    flipped = scores.flip(-1)
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices[..., :count]
    return scores.shape[-1] - 1 - order


def gather_tokens(layer: LayerInput, keep: torch.Tensor) -> LayerOutput:
    """Keep the tokens at `keep` ([B, Hkv, S] indices, any order), in sequence order."""
    keep = keep.sort(dim=-1).values
    index = keep.unsqueeze(-1).expand(*keep.shape, layer.keys.shape[-1])
    return LayerOutput(
        keys=layer.keys.gather(2, index),
        values=layer.values.gather(2, index),
        positions=keep,
    )


def keep_by_score(layer: LayerInput, scores: torch.Tensor, forced: torch.Tensor | None = None) -> LayerOutput:
    """Evict down to the budget: keep `forced` tokens, then the highest `scores` ([B, Hkv, T])."""
    ranked = scores.float()
    if forced is not None:
        ranked = ranked.masked_fill(forced, float("inf"))
    return gather_tokens(layer, top_indices(ranked, layer.slots))
