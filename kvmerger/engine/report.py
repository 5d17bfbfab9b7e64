"""Per-layer statistics of one compression, and their totals."""

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
class CompressionReport:
    """What one compression of a prompt did, layer by layer."""

    method: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)

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
            "seconds_scoring": self.seconds_scoring,
            "seconds_compressing": self.seconds_compressing,
            "merge_set_sizes": self.merge_set_sizes(),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def summary(self) -> str:
        sets = self.merge_set_sizes()
        merged = sum(sets.values())
        mean_size = sum(size * count for size, count in sets.items()) / merged if merged else 0.0
        slots = sorted({layer.slots_after for layer in self.layers})
        slot_text = str(slots[0]) if len(slots) == 1 else f"{slots[0]}-{slots[-1]}"
        return (
            f"{self.method.get('method', '?')}: {self.tokens} tokens -> {slot_text} slots per head; "
            f"cache {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({self.memory_ratio:.1%}); "
            f"{merged} merging sets (mean size {mean_size:.1f}); "
            f"scoring {self.seconds_scoring * 1e3:.0f} ms + compressing {self.seconds_compressing * 1e3:.0f} ms"
        )


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"
