"""What a compression method is: one small object with one job.

Given one layer's keys, values and attention statistics, a method returns the smaller keys and
values (and, when it needs them, per-slot logit biases). The engine, not the method, deals with
transformers, caches, hooks and timing.

Budget semantics (shared by every method, see docs/METHOD.md): at budget ``b`` the prompt part of
every layer keeps exactly ``slots_for_budget(T, b) = ceil(b * T)`` slots per KV head; methods that
also store a per-slot bias keep fewer, so that their bytes stay within the same budget.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from kvmerger.engine.scoring import POOLINGS, SCORE_SOURCES, STATISTICS, LayerScores

METHODS: dict[str, type[CompressionMethod]] = {}
BIAS_BYTES = 4  # one float32 logit per slot and KV head
HEAD_TAG_BYTES = 1  # one uint8 per slot: the KV head a slot of a packed (shared-budget) layer belongs to
HEAD_BUDGETS = ("equal", "shared")


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

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [B*Hkv, T, d] and values [B*Hkv, T, dv]: one row per batch element and KV head."""
        return self.keys.flatten(0, 1), self.values.flatten(0, 1)


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
    # set when the layer's heads share its budget (`keep_by_score_shared`): the heads hold different
    # numbers of slots, packed into one row: keys and values [B, 1, N, d], positions [B, 1, N], and
    # slot_heads[b, n] the KV head slot n belongs to (engine.hf.CompressedLayer, packed layout)
    slot_heads: torch.Tensor | None = None  # [B, N], uint8
    # attention each slot has received so far, to start holding the budget during generation
    # (None: the engine takes the aggregated attention of the token at `positions`)
    accumulated: torch.Tensor | None = None  # [B, Hkv, S], float32


@dataclass
class SlotState:
    """A layer's stored slots while the engine holds the budget during generation.

    The engine appends every new token as a slot (position = its index, set size 1, accumulated
    attention 0), adds the attention each slot receives from every new query to `accumulated`,
    and whenever a layer holds more than `target_slots` it asks the method to shrink it back.
    """

    keys: torch.Tensor  # [B, Hkv, N, d]
    values: torch.Tensor  # [B, Hkv, N, d]
    bias: torch.Tensor | None  # [B, Hkv, N], float32, or None
    positions: torch.Tensor  # [B, Hkv, N] long: token index each slot stands at (-1: padding)
    set_sizes: torch.Tensor  # [B, Hkv, N] long: tokens folded into each slot (0: padding)
    accumulated: torch.Tensor  # [B, Hkv, N] float32: attention received, prompt and generation
    last_attention: torch.Tensor  # [B, Hkv, N] float32: attention from the newest query
    target_slots: int
    prompt_length: int
    seen_tokens: int
    layer_idx: int

    @property
    def excess(self) -> int:
        return self.keys.shape[-2] - self.target_slots


def keep_slots(state: SlotState, keep: torch.Tensor) -> SlotState:
    """The state restricted to slots `keep` ([B, Hkv, S] indices, any order), in sequence order."""
    keep = keep.sort(dim=-1).values
    wide = keep.unsqueeze(-1).expand(*keep.shape, state.keys.shape[-1])
    return replace(
        state,
        keys=state.keys.gather(2, wide),
        values=state.values.gather(2, wide),
        bias=None if state.bias is None else state.bias.gather(2, keep),
        positions=state.positions.gather(2, keep),
        set_sizes=state.set_sizes.gather(2, keep),
        accumulated=state.accumulated.gather(2, keep),
        last_attention=state.last_attention.gather(2, keep),
    )


def keep_highest(state: SlotState, scores: torch.Tensor) -> SlotState:
    """Evict down to the budget: keep the `target_slots` slots with the highest `scores`
    ([B, Hkv, N]); padding slots (set size 0) go first."""
    ranked = scores.float().masked_fill(state.set_sizes == 0, float("-inf"))
    return keep_slots(state, top_indices(ranked, state.target_slots))


def hold_by_accumulated_attention(state: SlotState, recent: int) -> SlotState:
    """H2O's rule during generation: keep the `recent` newest slots and, among the others, those
    with the most accumulated attention (padding slots go first)."""
    length = state.keys.shape[-2]
    recent = min(recent, state.target_slots)
    ranked = state.accumulated.clone()
    ranked[..., length - recent :] = float("inf")
    return keep_highest(state, ranked)


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
        number = isinstance(self.budget, (int, float)) and not isinstance(self.budget, bool)  # True is not 1.0
        if not number or not 0.0 < float(self.budget) <= 1.0:
            raise ValueError(
                f"budget must be in (0, 1] (the share of the prompt's cache kept, a number), got {self.budget!r}"
            )

    def target_slots(self, length: int, slot_bytes: int = 0) -> int:
        """Slots per KV head for a prompt of `length` tokens.

        A method that stores a per-slot logit bias pays `BIAS_BYTES` per slot and KV head on top of
        the slot's key and value (`slot_bytes`), so it gets fewer slots: keys, values and biases
        together stay within the budget's bytes, the same memory as every other method.
        """
        slots = slots_for_budget(length, self.budget)
        extra = (BIAS_BYTES if self.stores_bias() else 0) + (HEAD_TAG_BYTES if self.shares_head_budget() else 0)
        if extra and slot_bytes and slots < length:
            slots = max(1, slots * slot_bytes // (slot_bytes + extra))
        return slots

    def stores_bias(self) -> bool:
        """Whether the compressed cache carries a per-slot logit bias (counted in its memory)."""
        return False

    def hold_budget(self, state: SlotState) -> SlotState:
        """Shrink a layer back to `state.target_slots` slots during generation (engine option
        `hold_budget=True`). Default, for methods whose paper defines no generation-time rule:
        H2O's rule, half recent window, half heavy hitters by accumulated attention."""
        return hold_by_accumulated_attention(state, recent=state.target_slots // 2)

    def shares_head_budget(self) -> bool:
        """Whether a layer's heads share its budget (`head_budget="shared"`): its slots are packed into one
        row with a KV-head tag per slot (one more byte per slot, counted in the budget like a bias)."""
        return getattr(self, "head_budget", "equal") == "shared"

    def can_hold_budget(self) -> bool:
        """Whether `hold_budget` makes sense for this method (the engine refuses it otherwise)."""
        return self.keeps_budget() and not self.shares_head_budget()

    def keeps_budget(self) -> bool:
        """Whether every layer and head ends with exactly `target_slots` slots (the engine checks it)."""
        return True

    def attention_received(self, scores: LayerScores) -> torch.Tensor:
        """[B, Hkv, T]: the attention each prompt token received, where holding the budget during
        generation starts from; computed as the method computes its own (its `statistic` field, if any)."""
        return scores.aggregated_attention(getattr(self, "statistic", "exact"))

    def needs_reconstruction(self) -> bool:
        """Whether this method's scores come from KVzip's reconstruction pass (engine.reconstruction),
        which runs the model again over the prompt once every layer is prefilled."""
        return False

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


def check_statistic(name: str) -> None:
    if name not in STATISTICS:
        raise ValueError(
            f"statistic must be one of {', '.join(STATISTICS)} (the aggregated attention from every query, or "
            f"estimated from a sample of them), got {name!r}"
        )


def check_head_budget(name: str, head_floor: float = 0.0) -> None:
    """`head_budget` and `head_floor` (Ada-KV's safeguard: a share in [0, 1] of the per-head budget every
    head keeps first, only with a shared budget)."""
    if name not in HEAD_BUDGETS:
        raise ValueError(
            f"head_budget must be one of {', '.join(HEAD_BUDGETS)} (every KV head keeps the budget's slots, or "
            f"a layer's heads share them by score, Ada-KV's and kvpress KVzip's rule), got {name!r}"
        )
    number = isinstance(head_floor, (int, float)) and not isinstance(head_floor, bool)
    if not number or not 0.0 <= float(head_floor) <= 1.0:
        raise ValueError(
            f"head_floor is the share of the per-head budget every head is guaranteed, a number in [0, 1]; got {head_floor!r}"
        )
    if head_floor and name != "shared":
        raise ValueError(
            "head_floor guarantees each head part of a shared budget; it needs head_budget='shared' "
            f"(with head_budget={name!r} every head already keeps the whole per-head budget)"
        )


def check_score_source(name: str, field_name: str = "score") -> None:
    parts = name.split("+") if isinstance(name, str) else [name]
    if any(part not in SCORE_SOURCES for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"{field_name} must be one of {', '.join(SCORE_SOURCES)} or several of them joined by '+' "
            f"(combined by rank; see docs/METHOD.md), got {name!r}"
        )


def check_pooling(
    kernel_size: int, pooling: str, kernel_field: str = "kernel_size", pooling_field: str = "pooling"
) -> None:
    """A 1-D pooling of scores along the sequence: an odd positive kernel (so it keeps the length)
    and one of POOLINGS."""
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{kernel_field} must be a positive odd integer (pooling keeps the length); got {kernel_size!r}"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"{pooling_field} must be one of {POOLINGS}, got {pooling!r}")


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


def shared_selection(
    scores: torch.Tensor, per_head: int, forced: torch.Tensor | None = None, floor: int = 0
) -> torch.Tensor:
    """[B, Hkv, T] bool: the `Hkv * per_head` highest `scores` ([B, Hkv, T]) over all heads of a layer
    (so scores must be comparable across heads), `forced` tokens first, then each head's `floor`
    highest (forced ones counted first; Ada-KV's safeguard), then the rest by score. Ties go to the
    later token, then the later head (`top_indices` over token-major pairs), so that tied forced
    tokens, such as a window, are shared out evenly."""
    batch, heads, length = scores.shape
    if heads > 256:
        raise ValueError(f"a shared head budget tags each slot with its KV head in one byte; this layer has {heads} KV heads")
    ranked = scores.float()
    if forced is not None:
        ranked = ranked.masked_fill(forced, float("inf"))
    if floor > 0:
        # above every score, below the forced tokens' +inf: the floor never displaces a forced token
        guaranteed = torch.zeros_like(ranked, dtype=torch.bool).scatter_(2, top_indices(ranked, min(floor, length)), True)
        ranked = ranked.masked_fill(guaranteed & ranked.isfinite(), torch.finfo(torch.float32).max)
    token_major = top_indices(ranked.transpose(1, 2).reshape(batch, length * heads), heads * per_head)
    chosen = torch.zeros(batch, length * heads, dtype=torch.bool, device=scores.device)
    return chosen.scatter_(1, token_major, True).reshape(batch, length, heads).transpose(1, 2)


def packed_output(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    real: torch.Tensor,
    set_sizes: torch.Tensor | None = None,
    notes: dict[str, Any] | None = None,
    bias: torch.Tensor | None = None,
) -> LayerOutput:
    """A packed LayerOutput from per-head slots [B, Hkv, S', ...] of which `real` [B, Hkv, S'] are
    kept (the same number in every batch element): one row per batch element, head by head, each
    head's slots in their order, tagged with their KV head (`LayerOutput.slot_heads`)."""
    batch, heads, width = real.shape
    kept = int(real[0].sum())
    head_of = torch.arange(heads, device=real.device).view(1, heads, 1).expand(batch, heads, width)

    def pack(x: torch.Tensor) -> torch.Tensor:
        return x[real].reshape(batch, 1, kept, *x.shape[3:])

    counts = real.sum(dim=-1)  # [B, Hkv]
    return LayerOutput(
        keys=pack(keys),
        values=pack(values),
        positions=pack(positions),
        set_sizes=None if set_sizes is None else pack(set_sizes),
        bias=None if bias is None else pack(bias),
        slot_heads=head_of[real].reshape(batch, kept).to(torch.uint8),
        notes={**(notes or {}), "head_slots": counts.tolist()},
    )


def keep_by_score_shared(
    layer: LayerInput, scores: torch.Tensor, forced: torch.Tensor | None = None, floor: int = 0
) -> LayerOutput:
    """Evict down to the layer's budget shared by its heads (`shared_selection` of `Hkv * slots`, each
    head guaranteed `floor` slots): each head keeps what it won, so heads hold different numbers of
    slots, packed into one row per batch element (`packed_output`), each head's slots in sequence order."""
    chosen = shared_selection(scores, layer.slots, forced, floor)
    positions = torch.arange(layer.length, device=scores.device).expand_as(chosen)
    return packed_output(layer.keys, layer.values, positions, chosen)


def keep_by_score_as(
    layer: LayerInput, head_budget: str, scores: torch.Tensor, forced: torch.Tensor | None = None, head_floor: float = 0.0
) -> LayerOutput:
    """`keep_by_score` (every head keeps `layer.slots`) or, with ``head_budget="shared"``,
    `keep_by_score_shared` with each head guaranteed `floor_share(head_floor, layer.slots)` slots."""
    if head_budget == "shared":
        return keep_by_score_shared(layer, scores, forced, floor_share(head_floor, layer.slots))
    return keep_by_score(layer, scores, forced)


def floor_share(share: float, count: int) -> int:
    """``floor(share * count)``, guarded against float noise (0.29 * 100 is 28.999999999999996 in floats)."""
    return int(math.floor(share * count + 1e-9))


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 1]: the largest |x| of each row of x [N, T, d] (at least 1e-30). Dividing by it keeps
    float32 arithmetic on huge or tiny inputs finite; multiplying back restores the scale."""
    return x.float().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)


def finite_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to `dtype`, with values beyond its range clamped (and NaN, which cannot arise from
    finite inputs, set to 0) so that a compressed cache never holds inf or NaN."""
    limit = torch.finfo(dtype).max
    return torch.nan_to_num(x, nan=0.0).clamp(-limit, limit).to(dtype)
