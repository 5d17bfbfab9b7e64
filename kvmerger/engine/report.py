"""Per-layer statistics of one compression, and their totals.

A model may have layers that no method compresses (sliding-window layers, whose cache transformers
already bounds to the window). Their bytes are reported apart: `bytes_before`, `bytes_after` and
`memory_ratio` are over the compressed layers (the budget's share), `cache_bytes_before`,
`cache_bytes_after` and `cache_memory_ratio` over the whole cache, kept layers included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    layer: int
    tokens: int  # prompt tokens seen by the layer
    slots_before: int  # per KV head
    slots_after: int  # per KV head (padded length when heads differ)
    bytes_before: int
    bytes_after: int
    seconds_scoring: float  # attention statistics for this layer
    seconds_compressing: float  # the method itself
    merge_set_sizes: dict[int, int] = field(default_factory=dict)  # size (> 1) -> number of sets, all heads
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def merge_sets(self) -> int:
        return sum(self.merge_set_sizes.values())


@dataclass
class KeptLayer:
    """A cache layer left as it is (a sliding-window layer): the same before and after compression."""

    layer: int
    kind: str  # "sliding_attention"
    slots: int  # per KV head
    bytes: int


@dataclass
class CompressionReport:
    """What one compression of a prompt did, layer by layer."""

    method: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)  # the compressed layers
    kept_layers: list[KeptLayer] = field(default_factory=list)  # the layers no method compresses

    @property
    def tokens(self) -> int:
        return self.layers[0].tokens if self.layers else 0

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def memory_ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def kept_bytes(self) -> int:
        return sum(layer.bytes for layer in self.kept_layers)

    @property
    def cache_bytes_before(self) -> int:
        """The whole cache without compression: compressed layers before, plus the kept layers."""
        return self.bytes_before + self.kept_bytes

    @property
    def cache_bytes_after(self) -> int:
        return self.bytes_after + self.kept_bytes

    @property
    def cache_memory_ratio(self) -> float:
        return self.cache_bytes_after / self.cache_bytes_before if self.cache_bytes_before else 1.0

    @property
    def seconds_scoring(self) -> float:
        return sum(layer.seconds_scoring for layer in self.layers)

    @property
    def seconds_compressing(self) -> float:
        return sum(layer.seconds_compressing for layer in self.layers)

    @property
    def seconds(self) -> float:
        return self.seconds_scoring + self.seconds_compressing

    def merge_set_sizes(self) -> dict[int, int]:
        total: Counter[int] = Counter()
        for layer in self.layers:
            total.update(layer.merge_set_sizes)
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tokens": self.tokens,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "memory_ratio": self.memory_ratio,
            "cache_bytes_before": self.cache_bytes_before,
            "cache_bytes_after": self.cache_bytes_after,
            "cache_memory_ratio": self.cache_memory_ratio,
            "seconds_scoring": self.seconds_scoring,
            "seconds_compressing": self.seconds_compressing,
            "merge_set_sizes": self.merge_set_sizes(),
            "layers": [asdict(layer) for layer in self.layers],
            "kept_layers": [asdict(layer) for layer in self.kept_layers],
        }

    def summary(self) -> str:
        sets = self.merge_set_sizes()
        merged = sum(sets.values())
        mean_size = sum(size * count for size, count in sets.items()) / merged if merged else 0.0
        slots = sorted({layer.slots_after for layer in self.layers})
        slot_text = str(slots[0]) if len(slots) == 1 else f"{slots[0]}-{slots[-1]}"
        cache = f"cache {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({self.memory_ratio:.1%})"
        if self.kept_layers:
            kinds = sorted({layer.kind.replace("_", " ") for layer in self.kept_layers})
            cache = (
                f"{len(self.layers)} compressed layers {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} "
                f"({self.memory_ratio:.1%}); whole cache {_mib(self.cache_bytes_before)} -> "
                f"{_mib(self.cache_bytes_after)} ({self.cache_memory_ratio:.1%}, {len(self.kept_layers)} "
                f"{' / '.join(kinds)} layers kept as they are)"
            )
        return (
            f"{self.method.get('method', '?')}: {self.tokens} tokens -> {slot_text} slots per head; {cache}; "
            f"{merged} merging sets (mean size {mean_size:.1f}); "
            f"scoring {self.seconds_scoring * 1e3:.0f} ms + compressing {self.seconds_compressing * 1e3:.0f} ms"
        )


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"
