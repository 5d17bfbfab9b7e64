"""KVMerger: adaptive KV cache merging of adjacent tokens with similar keys.

Paper: Zheng Wang, Boxiao Jin, Zhongzhi Yu, Minjia Zhang, "Model Tells You Where to Merge: Adaptive
KV Cache Merging for LLMs on Long-Context Tasks", arXiv 2407.08454 (2024). No official code exists;
this follows docs/METHOD.md section 2, which rebuilt the method from the paper.

Per layer and KV head, once the prompt is prefilled (keys post-RoPE, as the cache holds them):

1. Protected tokens: the most recent ``floor(recent_ratio * T)`` tokens, and among the rest the
   ``floor(topk_ratio * T)`` with the highest aggregated attention (H2O's score, averaged over the
   query heads of the KV head), are kept as they are, never merged, and break merging chains.
2. Merging sets: maximal runs of consecutive unprotected tokens whose adjacent keys are similar
   (cosine). Mode ``paper``: every adjacent pair with ``cos > eps`` (Algorithm 1, eps = 0.75);
   the achieved size is whatever the text gives, and heads of one layer are padded to the longest
   (padding slots carry a -inf logit bias and count against the memory). Mode ``exact`` (default):
   the ``T - ceil(budget * T)`` most similar eligible adjacent pairs, so every head keeps exactly the
   budget; this is Algorithm 1 with the threshold set to the similarity that meets the budget.
   A token in no set is a singleton and is kept unchanged (never evicted).
3. Gaussian-kernel merge of each set S: pivot ``p = argmax_{i in S} A[i]`` (ties: the later token);
   ``g_i = exp(-||k_i - k_p||^2 / (2 sigma^2))``, ``w_i = g_i / sum_j g_j``; merged key
   ``sum_i w_i k_i`` and merged value ``sum_i w_i v_i``, stored at the pivot's place (no re-rotation).

Choices where the paper is silent or uncertain (each one a parameter):

* ``sigma=None`` (default): ``sigma = mean_{i in S} ||k_i - k_p|| / sqrt(2)``, the mean taken over all
  members (the pivot's own distance 0 included), floored at 1e-6 of the row's largest |key|. The
  printed formula is circular; a number sets a fixed sigma (the paper reports ~5 on Llama-2).
* ``scale_values_by_set_size=False`` (default): the paper, as its readers report it, multiplies the
  value weights by |S|. A merged slot is still one term of the softmax, so that factor inflates the
  slot's output |S|-fold with nothing in the denominator to match (measured: perplexity 22.5 -> 74.5
  at budget 0.35 on the default model). Kept as a flag to reproduce the paper.
* Protected fractions: ``None`` takes the paper's settings, 0.17 / 0.12 at budget 0.5 and
  0.08 / 0.02 at 0.35; other budgets interpolate linearly through (0, 0, 0), (0.35, ...), (0.5, ...)
  and scale in proportion to budget / 0.5 above 0.5.
* ``exact`` mode when protection leaves no room: every unprotected run between protected tokens needs
  at least one slot, so a head reaches exactly ``S`` slots iff protected tokens plus unprotected runs
  are at most ``S``. The recent window is cut to ``S - 1`` if needed; then each head keeps the largest
  number ``k <= n_topk`` of its top-scored tokens that meets that bound (found by a binary search
  over ``k``, vectorised over heads; the count only grows with ``k``). Heavy hitters that sit next to
  each other (a number's digits, the sinks) split few runs, so heads keep most of what was asked;
  the statistics say how much was kept. (The paper's settings never reach the bound.)
* ``size_bias=False`` (default, as in the paper): a merged slot is one term of the softmax. With
  ``size_bias=True`` (docs/METHOD.md section 5, "size-aware attention", as in token merging for
  vision transformers) the slot carries an additive logit bias ``log |S|``, so the group keeps
  the attention mass of its |S| tokens in numerator and denominator; the bias is one float per
  slot and counts in the cache's bytes.
* ``score="aggregated"`` (default, the paper's): the attention statistic behind the protected top-k
  tokens and each set's pivot is H2O's, summed over every prompt query. The other score sources of
  the engine (docs/METHOD.md section 7b, `LayerScores.source`) can take its place: ``window`` (the
  last 32 prompt queries' attention, pooled over 5 keys, as SnapKV), ``reconstruction`` (KVzip's
  repeat pass: the largest attention a key gets while the model repeats the prompt) and
  ``expected`` (Expected Attention's Gaussian model of future queries). Only the ranking changes;
  the merge is the same.
* ``window_kernel=5``, ``window_pooling="avg"`` (defaults, SnapKV's): how the ``window`` source is
  pooled over neighbouring keys. A wide max (``window_kernel=31, window_pooling="max"``) gives every
  token the best window score within 15 positions of it, so the question's attention to a needle's
  key words protects the whole sentence around them, the value's digits included (ChunkKV, Liu et al.
  arXiv 2502.00299, keeps whole chunks for the same reason). Chosen on seed 1 (docs/BENCHMARKS.md
  section 9), not on the reported samples.
* ``score_kernel=1``, ``score_pooling="max"`` (defaults: no pooling, as the aggregated,
  reconstruction and expected sources' papers): the same pooling for the other sources, to study
  whether a sentence around a top-scored token should rank with it when no question is there. The
  sources' +inf sinks stay on the sinks. Off by default: compressing once on the tuning seed, a max
  over 31 keys kept more needles and lost the pass keys (docs/BENCHMARKS.md section 9).
* ``max_set_size=None`` (default, the paper's): a merging set is as long as its run of similar
  neighbours. Issue 12 asked whether capping the sets keeps more of what is asked (a number's
  digits have alike keys and fold into one slot). With a cap ``c``, runs are cut into pieces of at
  most ``c`` tokens from their first token on; in ``exact`` mode pairs are taken from the most
  similar down until, after that cut, exactly ``T - S`` remain merged (the cut adds at most one
  piece per added pair, so that count is met exactly; a binary search over the number of pairs,
  vectorised over rows). A row whose unprotected runs cannot reach the budget in pieces of ``c``
  is merged without the cap, and the statistics count it (``cap_relaxed_rows``). The cap applies
  to the prompt's merge, not to the merges that hold the budget during generation. Off by default:
  on the tuning seed it changed no pass-key answer and raised the LM KL (docs/BENCHMARKS.md
  section 9).
* ``head_budget="equal"`` (default, the paper's): every KV head merges down to ``S`` slots. With
  ``"shared"`` (exact mode only; KVzip's and Ada-KV's rule, docs/METHOD.md section 3) a layer's heads
  share its ``Hkv x S`` slots: each head's budget is what it wins in the shared selection of the score
  (its best token forced), it merges down to that, and the slots are packed with a one-byte head tag
  paid from the budget. Each head protects the same share of its own budget as an equal head would
  (recent and top-k counts scaled by its slots / ``S``): with the layer's counts instead, a head that
  wins few slots spends them all on the recent window and folds the rest of the prompt into one slot,
  which on the tuning seed raised the LM KL the more the larger the recent share (docs/BENCHMARKS.md
  section 9). ``head_floor`` (default 0: only each head's best token is guaranteed) is Ada-KV's
  safeguard (Feng et al., arXiv 2407.11550; 0.2 in kvpress's ``AdaKVPress``): every head first wins
  its ``floor(head_floor * S)`` best tokens, at least one.
* Ties: protected top-k and merged pairs prefer the later token / pair, as the backward scan does.
* Numerics: everything in float32, on the keys and values as they are (a set's kernel weights are in
  [0, 1] and sum to 1, so merged slots stay within their members' range and a token alone in its set
  is kept bit for bit); zero-norm keys, identical keys and a sigma that would be 0 give finite
  results, and keys beyond float32's squares (~1e18) are measured in units of their row's largest
  magnitude. The width's floor is 1e-6 of the row's largest |key|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from kvmerger.engine.scoring import POOL_KERNEL, POOLING
from kvmerger.methods.base import (
    CompressionMethod,
    LayerInput,
    LayerOutput,
    SlotState,
    check_head_budget,
    check_pooling,
    check_score_source,
    check_statistic,
    finite_as,
    floor_share,
    packed_output,
    shared_selection,
    top_indices,
)

MODES = ("exact", "paper")
SIGMA_FLOOR = 1e-6  # in units of the row's largest |key|
_PAPER_POINTS = ((0.0, 0.0, 0.0), (0.35, 0.08, 0.02), (0.5, 0.17, 0.12))


def paper_protection(budget: float) -> tuple[float, float]:
    """(recent_ratio, topk_ratio) of the paper's settings, interpolated to any budget."""
    if budget >= 0.5:
        return 0.17 * budget / 0.5, 0.12 * budget / 0.5
    for (b0, r0, t0), (b1, r1, t1) in zip(_PAPER_POINTS, _PAPER_POINTS[1:]):
        if budget <= b1:
            share = (budget - b0) / (b1 - b0)
            return r0 + share * (r1 - r0), t0 + share * (t1 - t0)
    raise AssertionError("unreachable")


@dataclass
class MergingSets:
    """Which tokens fold together, for a batch of rows (one row per batch element and KV head)."""

    segment: torch.Tensor  # [N, T] long: index of the set (= output slot) each token belongs to
    count: torch.Tensor  # [N] long: number of sets (slots) per row
    protected: torch.Tensor  # [N, T] bool
    merged_pairs: torch.Tensor  # [N, T-1] bool: pair (t, t+1) is in one set
    similarity: torch.Tensor  # [N, T-1] float32: cos(k_t, k_{t+1})
    n_recent: int
    n_topk: int  # top-scored tokens asked to be protected (each row kept `topk_kept` of them)
    protection_shrunk: bool
    topk_kept: torch.Tensor  # [N] long
    cap_relaxed_rows: int | None = None  # rows merged without `max_set_size` (could not reach the budget); None: no cap

    def protection_notes(self) -> dict[str, int | bool]:
        """What protection and the cap did, for a layer report's notes."""
        notes = {"n_recent": self.n_recent, "n_topk": self.n_topk, "protection_shrunk": self.protection_shrunk}
        if self.cap_relaxed_rows is not None:
            notes["cap_relaxed_rows"] = self.cap_relaxed_rows
        return notes


@dataclass
class KVMerger(CompressionMethod):
    """Merge runs of adjacent tokens with similar keys into one slot each (Wang et al., 2024)."""

    name: ClassVar[str] = "kvmerger"
    summary: ClassVar[str] = "KVMerger (Wang et al. 2024): Gaussian-kernel merging of adjacent similar keys"

    budget: float = 0.5
    mode: str = "exact"
    eps: float = 0.75
    recent_ratio: float | None = None
    topk_ratio: float | None = None
    sigma: float | None = None
    scale_values_by_set_size: bool = False
    size_bias: bool = False
    score: str = "aggregated"
    recent_share: float | None = None
    topk_share: float | None = None
    statistic: str = "exact"
    window_kernel: int = POOL_KERNEL
    window_pooling: str = POOLING
    max_set_size: int | None = None
    score_kernel: int = 1
    score_pooling: str = "max"
    head_budget: str = "equal"
    head_floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_score_source(self.score)
        check_head_budget(self.head_budget, self.head_floor)
        if self.head_budget == "shared" and (self.mode == "paper" or self.size_bias or self.max_set_size is not None):
            raise ValueError(
                "head_budget='shared' shares an exact budget among a layer's heads and packs their slots without "
                "per-slot biases: it needs mode='exact', size_bias=False and no max_set_size"
            )
        check_set_size_cap(self.max_set_size)
        check_pooling(self.score_kernel, self.score_pooling, "score_kernel", "score_pooling")
        check_statistic(self.statistic)
        check_pooling(self.window_kernel, self.window_pooling, "window_kernel", "window_pooling")
        if self.size_bias and self.scale_values_by_set_size:
            raise ValueError(
                "size_bias already gives a merged slot the weight of its |S| tokens in the softmax; "
                "scaling its value by |S| as well would count the set twice"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not -1.0 <= self.eps <= 1.0:
            raise ValueError(f"eps is a cosine similarity threshold and must be in [-1, 1], got {self.eps}")
        for field_name in ("recent_ratio", "topk_ratio", "recent_share", "topk_share"):
            value = getattr(self, field_name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{field_name} must be in [0, 1], got {value}")
        for kind in ("recent", "topk"):
            if getattr(self, f"{kind}_ratio") is not None and getattr(self, f"{kind}_share") is not None:
                raise ValueError(
                    f"give {kind}_ratio (a share of the prompt) or {kind}_share (a share of the budget), not both"
                )
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be a positive number (or None for the distance-based rule), got {self.sigma}")
        recent, topk = self.protection()
        if self.mode == "exact" and self.budget < 1.0 and recent + topk >= self.budget:
            raise ValueError(
                f"recent_ratio + topk_ratio = {recent + topk:g} leaves no room within budget {self.budget:g}: "
                "protected tokens alone would fill the cache; lower them below the budget"
            )
        if recent + topk > 1.0:
            raise ValueError(f"recent_ratio + topk_ratio = {recent + topk:g} exceeds 1")

    def keeps_budget(self) -> bool:
        return self.mode == "exact"

    def scores(self, layer: LayerInput) -> torch.Tensor:
        """[B, Hkv, T]: the score behind the protected top-k tokens and the pivots (`score`)."""
        return layer.scores.source(
            self.score, self.statistic, window_kernel=self.window_kernel, window_pooling=self.window_pooling,
            score_kernel=self.score_kernel, score_pooling=self.score_pooling,
        )

    def needs_reconstruction(self) -> bool:
        return "reconstruction" in self.score.split("+")

    def stores_bias(self) -> bool:
        return self.size_bias

    def hold_budget(self, state: SlotState) -> SlotState:
        """During generation: merge the `excess` most similar adjacent pairs of unprotected slots.

        Exact mode's rule applied as tokens arrive. Protected: the newest `n_recent` slots and the
        `n_topk` slots with the most accumulated attention (counts from the prompt's length, as at
        prefill). A pair's pivot is the slot with more accumulated attention; kernel weights are
        multiplied by the tokens each slot already stands for.
        """
        batch, heads, length, dim = state.keys.shape
        rows = batch * heads
        keys = state.keys.reshape(rows, length, dim)
        accumulated = state.accumulated.reshape(rows, length)
        recent_ratio, topk_ratio = self.protection()
        n_recent, n_topk, _ = _fit_protection(
            floor_share(recent_ratio, state.prompt_length), floor_share(topk_ratio, state.prompt_length), state.target_slots
        )
        protected = protected_tokens(accumulated, n_recent, n_topk)
        eligible = ~protected[:, 1:] & ~protected[:, :-1]
        merged = most_similar_pairs(adjacent_similarity(keys), eligible, state.excess)
        segment = segment_ids(merged)
        new_keys, new_values, pivot, sizes = gaussian_merge(
            keys,
            state.values.reshape(rows, length, -1),
            accumulated,
            segment,
            state.target_slots,
            self.sigma,
            self.scale_values_by_set_size,
            multiplicity=state.set_sizes.reshape(rows, length),
        )
        shape = (batch, heads, state.target_slots)
        bias = sizes.float().log().reshape(shape) if self.size_bias else None
        return replace(
            state,
            keys=new_keys.reshape(*shape, dim),
            values=new_values.reshape(*shape, -1),
            bias=bias,
            positions=state.positions.reshape(rows, length).gather(1, pivot).reshape(shape),
            set_sizes=sizes.reshape(shape),
            accumulated=_segment_sum(accumulated, segment, state.target_slots).reshape(shape),
            last_attention=_segment_sum(state.last_attention.reshape(rows, length), segment, state.target_slots).reshape(shape),
        )

    def protection(self) -> tuple[float, float]:
        """(recent_ratio, topk_ratio) as shares of the prompt: the fields, the budget shares times the
        budget, or the paper's settings."""
        recent, topk = paper_protection(self.budget)
        if self.recent_share is not None:
            recent = self.recent_share * self.budget
        if self.topk_share is not None:
            topk = self.topk_share * self.budget
        return (
            recent if self.recent_ratio is None else self.recent_ratio,
            topk if self.topk_ratio is None else self.topk_ratio,
        )

    # ------------------------------------------------------------------------------------------
    def identify(
        self, keys: torch.Tensor, attention: torch.Tensor, slots: int | torch.Tensor, layer_slots: int | None = None
    ) -> MergingSets:
        """Merging-set identification (Algorithm 1) on rows of keys [N, T, d] with scores [N, T].

        `slots`: the budget of every row, or of each row ([N] long, exact mode: a shared head budget).
        With per-row budgets and `layer_slots` (the slots of a head under an equal split), a row protects
        the same share of its own budget as such a head: the recent and top-k counts scaled by
        slots / layer_slots, rounded down."""
        length = keys.shape[1]
        recent_ratio, topk_ratio = self.protection()
        n_recent = floor_share(recent_ratio, length)
        n_topk = min(floor_share(topk_ratio, length), length - n_recent)
        topk_kept = torch.full((keys.shape[0],), n_topk, dtype=torch.long, device=keys.device)
        shrunk = False
        if isinstance(slots, torch.Tensor):  # rows with their own budgets: each row's recent window fits its own
            recent_rows, topk_rows, shrunk = _protection_per_row(n_recent, n_topk, slots, layer_slots, length)
            protected, topk_kept = protection_within_budget(attention, recent_rows, topk_rows, slots)
            shrunk = shrunk or bool((topk_kept < topk_rows).any())
        elif self.mode == "exact" and slots < length:
            shrunk = n_recent > slots - 1
            n_recent = min(n_recent, slots - 1)
            n_topk = min(n_topk, length - n_recent)
            protected, topk_kept = protection_within_budget(attention, n_recent, n_topk, slots)
            shrunk = shrunk or bool((topk_kept < n_topk).any())
        else:
            protected = protected_tokens(attention, n_recent, n_topk)
        similarity = adjacent_similarity(keys)
        eligible = ~protected[:, 1:] & ~protected[:, :-1]
        relaxed = None if self.max_set_size is None else 0
        if self.mode == "paper":
            merged = eligible & (similarity > self.eps)
            if self.max_set_size is not None:
                merged = cut_runs(merged, self.max_set_size)
        elif self.max_set_size is not None:
            merged, relaxed_rows = capped_similar_pairs(similarity, eligible, max(0, length - slots), self.max_set_size)
            relaxed = int(relaxed_rows.sum())
        else:
            excess = (length - slots).clamp_min(0) if isinstance(slots, torch.Tensor) else max(0, length - slots)
            merged = most_similar_pairs(similarity, eligible, excess)
        segment = segment_ids(merged)
        return MergingSets(
            segment=segment,
            count=segment[:, -1] + 1,
            protected=protected,
            merged_pairs=merged,
            similarity=similarity,
            n_recent=n_recent,
            n_topk=n_topk,
            protection_shrunk=shrunk,
            topk_kept=topk_kept,
            cap_relaxed_rows=relaxed,
        )

    def compress(self, layer: LayerInput) -> LayerOutput:
        if self.head_budget == "shared":
            return self._compress_shared(layer)
        batch, heads, _, dim = layer.keys.shape
        rows = batch * heads
        keys, values = layer.rows()
        attention = self.scores(layer).flatten(0, 1)
        sets = self.identify(keys, attention, layer.slots)
        merged_keys, merged_values, positions, sizes = gaussian_merge(
            keys, values, attention, sets.segment, int(sets.count.max()), self.sigma, self.scale_values_by_set_size
        )
        slots = merged_keys.shape[1]
        bias = None
        padded = bool((sets.count != slots).any())  # paper mode: heads differ in length, pad and mask
        if padded or self.size_bias:
            bias = sizes.float().log() if self.size_bias else torch.zeros(rows, slots, device=keys.device)
            bias = bias.masked_fill(sizes == 0, float("-inf")).reshape(batch, heads, slots)
        return LayerOutput(
            keys=merged_keys.reshape(batch, heads, slots, dim),
            values=merged_values.reshape(batch, heads, slots, -1),
            positions=positions.reshape(batch, heads, slots),
            set_sizes=sizes.reshape(batch, heads, slots),
            bias=bias,
            # attention received so far, to hold the budget while generating (another score is no such sum)
            accumulated=(
                _segment_sum(attention.float(), sets.segment, slots).reshape(batch, heads, slots)
                if self.score == "aggregated" and self.score_kernel == 1
                else None
            ),
            notes={
                **sets.protection_notes(),
                "topk_kept_mean": float(sets.topk_kept.float().mean()),
                "real_slots_mean": float(sets.count.float().mean()),
                "weakest_merged_similarity": _weakest_merged_similarity(sets),
                "largest_set_mean": float(sizes.amax(dim=-1).float().mean()),
            },
        )

    def shared_head_slots(self, scores: torch.Tensor, slots: int) -> torch.Tensor:
        """[B, Hkv] long: what each head wins of the layer's ``Hkv * slots`` in `shared_selection` of
        `scores` [B, Hkv, T], with its `head_floor` share of `slots` guaranteed, and at least its best token."""
        guaranteed = max(1, floor_share(self.head_floor, slots))
        return shared_selection(scores, slots, floor=guaranteed).sum(dim=-1)

    def _compress_shared(self, layer: LayerInput) -> LayerOutput:
        """A layer's heads share its ``Hkv * S`` slots: each head's budget is what it wins in
        `shared_head_slots` (so every head keeps a slot), then each head merges down to its own budget
        as in exact mode, protecting the same share of it as an equal head, and the slots are packed."""
        batch, heads, length, dim = layer.keys.shape
        scores = self.scores(layer)
        head_slots = self.shared_head_slots(scores, layer.slots)
        keys, values = layer.rows()
        attention = scores.flatten(0, 1)
        sets = self.identify(keys, attention, head_slots.flatten(), layer_slots=layer.slots)
        width = int(head_slots.max())
        merged_keys, merged_values, positions, sizes = gaussian_merge(
            keys, values, attention, sets.segment, width, self.sigma, self.scale_values_by_set_size
        )
        shape = (batch, heads, width)
        return packed_output(
            merged_keys.reshape(*shape, dim),
            merged_values.reshape(*shape, -1),
            positions.reshape(shape),
            sizes.reshape(shape) > 0,
            set_sizes=sizes.reshape(shape),
            notes={
                **sets.protection_notes(),
                "topk_kept_mean": float(sets.topk_kept.float().mean()),
                "weakest_merged_similarity": _weakest_merged_similarity(sets),
            },
        )


# --------------------------------------------------------------------------------------------
# The steps, vectorised over rows (no loop over tokens or heads)
# --------------------------------------------------------------------------------------------


def _weakest_merged_similarity(sets: MergingSets) -> float | None:
    """The least similarity among each row's merged pairs, averaged over rows that merged (None: none did)."""
    if not bool(sets.merged_pairs.any()):  # also a one-token row, which has no pairs
        return None
    weakest = sets.similarity.masked_fill(~sets.merged_pairs, float("inf")).amin(dim=-1)
    return float(weakest[weakest.isfinite()].mean())


def _fit_protection(n_recent: int, n_topk: int, slots: int) -> tuple[int, int, bool]:
    fitted_recent = min(n_recent, slots - 1)
    fitted_topk = min(n_topk, max(0, (slots - fitted_recent - 1) // 2))
    return fitted_recent, fitted_topk, (fitted_recent, fitted_topk) != (n_recent, n_topk)


def protection_within_budget(
    attention: torch.Tensor, n_recent: int | torch.Tensor, n_topk: int | torch.Tensor, slots: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, T] bool protected, [N] long top-k kept): the last `n_recent` tokens and, per row, the
    largest number k <= `n_topk` of the highest-`attention` others such that protected tokens plus
    the unprotected runs between them fit in `slots` (so exactly `slots` remain reachable by merging).
    `n_recent`, `n_topk` and `slots` may differ per row ([N] long).

    Protected tokens plus runs never decrease as k grows, so a binary search over k (vectorised over
    rows, log2(n_topk) steps) finds each row's largest feasible k. Requires n_recent <= slots - 1
    and n_topk <= T - n_recent.
    """
    rows, length = attention.shape
    device = attention.device
    recent = torch.as_tensor(n_recent, device=device).expand(rows)
    topk = torch.as_tensor(n_topk, device=device).expand(rows)
    most = int(topk.max()) if rows else 0
    in_recent = torch.arange(length, device=device) >= (length - recent).unsqueeze(1)  # [N, T]
    rank = torch.full((rows, length), most, dtype=torch.long, device=device)  # most: not a candidate
    if most:
        candidates = attention.float().masked_fill(in_recent, float("-inf"))
        order = top_indices(candidates, most)  # best first, never in the recent window (within a row's n_topk)
        rank.scatter_(1, order, torch.arange(most, device=device).expand(rows, -1))

    def need(k: torch.Tensor) -> torch.Tensor:  # protected tokens + unprotected runs, per row
        kept = rank < k.unsqueeze(1)
        free = ~kept & ~in_recent
        starts = free & torch.cat([torch.ones_like(free[:, :1]), kept[:, :-1]], dim=1)
        return recent + kept.sum(1) + starts.sum(1)

    low = torch.zeros(rows, dtype=torch.long, device=device)
    high = topk.clone()
    while bool((low < high).any()):
        middle = (low + high + 1) // 2
        fits = need(middle) <= slots
        low = torch.where(fits, middle, low)
        high = torch.where(fits, high, middle - 1)
    return in_recent | (rank < low.unsqueeze(1)), low


def _protection_per_row(
    n_recent: int, n_topk: int, slots: torch.Tensor, layer_slots: int | None, length: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """([N], [N] long, shrunk) recent and top-k counts of rows with their own budgets `slots`: the layer's
    counts scaled by slots / layer_slots (unscaled without `layer_slots`); the recent ones leave a row at
    least one slot for the rest of the prompt (shrunk: some row's did not), and the top-k ones fit in what
    the recent ones leave."""
    share = slots.double() / max(1, layer_slots) if layer_slots is not None else torch.ones_like(slots, dtype=torch.double)
    wanted_recent, topk = ((count * share + 1e-9).floor().long() for count in (n_recent, n_topk))
    recent = torch.minimum(wanted_recent, (slots - 1).clamp(min=0))
    return recent, torch.minimum(topk, length - recent), bool((recent < wanted_recent).any())


def protected_tokens(attention: torch.Tensor, n_recent: int, n_topk: int) -> torch.Tensor:
    """[N, T] bool: the last `n_recent` tokens and the `n_topk` highest-attention others."""
    length = attention.shape[-1]
    protected = torch.zeros_like(attention, dtype=torch.bool)
    if n_recent:
        protected[:, length - n_recent :] = True
    if n_topk:
        candidates = attention.float().masked_fill(protected, float("-inf"))
        protected.scatter_(1, top_indices(candidates, n_topk), True)
    return protected


def adjacent_similarity(keys: torch.Tensor) -> torch.Tensor:
    """[N, T-1] float32: cosine similarity of each key with the next (0 where a key has norm 0).

    Computed from the norms and the dot products of neighbours, without unit vectors. Rows whose
    norms leave float32's range (magnitudes beyond ~1e18) are rescaled by their largest |key| first.
    """
    keys = keys.float()
    norms = torch.linalg.vector_norm(keys, dim=-1)  # [N, T]
    if not bool(norms.isfinite().all()) or bool((norms[norms > 0] < 1e-18).any()):
        keys = keys / _largest_magnitude(keys).clamp_min(1e-30).view(-1, 1, 1)
        norms = torch.linalg.vector_norm(keys, dim=-1)
    dots = (keys[:, 1:] * keys[:, :-1]).sum(dim=-1)
    return (dots / (norms[:, 1:] * norms[:, :-1]).clamp_min(1e-30)).clamp(-1.0, 1.0)


def _largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """[N]: the largest |x| of each row of x [N, ...], from one min-max pass."""
    low, high = x.flatten(1).aminmax(dim=1)
    return torch.maximum(high, -low)


def most_similar_pairs(similarity: torch.Tensor, eligible: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """[N, T-1] bool: the `count` most similar eligible pairs per row (ties: the later pair); `count`
    may differ per row ([N] long)."""
    if isinstance(count, torch.Tensor):
        return eligible & (pair_ranks(similarity, eligible) < count.unsqueeze(1))
    merged = torch.zeros_like(eligible)
    if count:
        ranked = similarity.masked_fill(~eligible, float("-inf"))
        merged.scatter_(1, top_indices(ranked, count), True)
        merged &= eligible
    return merged


def pair_ranks(similarity: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[N, T-1] long: each pair's rank in its row, most similar eligible pair first (0), ties to the
    later pair, ineligible pairs last; the order `most_similar_pairs` takes pairs in."""
    ranked = similarity.float().masked_fill(~eligible, float("-inf"))
    order = top_indices(ranked, ranked.shape[-1])
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def check_set_size_cap(cap: int | None) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"max_set_size must be a whole number of tokens >= 1 (or None: no cap), got {cap!r}")


def cut_runs(merged_pairs: torch.Tensor, cap: int) -> torch.Tensor:
    """[N, T-1] bool: `merged_pairs` with every run cut into pieces of at most `cap` tokens, counted
    from the run's first token (the pair that would make a piece `cap + 1` tokens long is unmerged)."""
    index = torch.arange(merged_pairs.shape[-1], device=merged_pairs.device).expand_as(merged_pairs)
    last_break = torch.where(merged_pairs, -1, index).cummax(dim=-1).values  # last unmerged pair at or before
    within_run = index - last_break  # 1 for a run's first merged pair, 2 for its second, ...
    return merged_pairs & (within_run % cap != 0)


def capped_similar_pairs(
    similarity: torch.Tensor, eligible: torch.Tensor, count: int, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, T-1] bool merged, [N] bool relaxed): per row, the most similar eligible pairs, as many as
    leave exactly `count` merged once runs are cut into pieces of at most `cap` tokens (`cut_runs`).

    Adding a pair joins two pieces' runs, which lowers the number of pieces by 0 or 1, so the merged
    count after the cut grows by steps of 0 or 1 with the number of pairs taken, and a binary search
    over that number (vectorised over rows) finds the fewest pairs that reach `count`. Rows that
    cannot reach it even with every eligible pair are merged without the cap (`relaxed`).
    """
    rows = similarity.shape[0]
    rank = pair_ranks(similarity, eligible)
    uncapped = eligible & (rank < count)  # most_similar_pairs(similarity, eligible, count), from this ranking
    if count == 0:
        return uncapped, torch.zeros(rows, dtype=torch.bool, device=similarity.device)
    available = eligible.sum(dim=1)

    def merged_count(taken: torch.Tensor) -> torch.Tensor:
        return cut_runs(eligible & (rank < taken.unsqueeze(1)), cap).sum(dim=1)

    relaxed = merged_count(available) < count
    low = torch.zeros(rows, dtype=torch.long, device=rank.device)  # merged_count(low) < count
    high = available.clone()  # merged_count(high) >= count wherever the cap can reach the budget
    while bool((high - low > 1).any()):
        middle = (low + high) // 2
        enough = merged_count(middle) >= count
        high = torch.where(enough, middle, high)
        low = torch.where(enough, low, middle)
    capped = cut_runs(eligible & (rank < high.unsqueeze(1)), cap)
    return torch.where(relaxed.unsqueeze(1), uncapped, capped), relaxed


def segment_ids(merged_pairs: torch.Tensor) -> torch.Tensor:
    """[N, T] long: runs joined by merged pairs get one id, counting up along the sequence."""
    starts = torch.cumsum((~merged_pairs).long(), dim=-1)
    first = starts.new_zeros(starts.shape[0], 1)  # not starts[:, :1]: a one-token row has no pairs
    return torch.cat([first, starts], dim=-1)


def gaussian_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    attention: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    sigma: float | None,
    scale_values: bool,
    multiplicity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold each segment into one slot with Gaussian-kernel weights around its pivot.

    keys [N, T, d], values [N, T, dv], attention [N, T], segment [N, T]. Returns merged keys
    [N, S, d], merged values [N, S, dv], pivot index [N, S] (-1 for padding) and set sizes
    [N, S] (0 for padding), with S = num_segments. `multiplicity` [N, T] (default ones): how many
    tokens each input row already stands for (when merging slots that are merges themselves); it
    multiplies the kernel weights and adds up into the set sizes.
    """
    rows, length, dim = keys.shape
    device = keys.device
    position = torch.arange(length, device=device).expand(rows, length)
    score = attention.float()
    best = torch.full((rows, num_segments), float("-inf"), device=device)
    best = best.scatter_reduce(1, segment, score, reduce="amax")
    is_best = score == best.gather(1, segment)
    pivot = torch.full((rows, num_segments), -1, dtype=torch.long, device=device)
    pivot = pivot.scatter_reduce(1, segment, torch.where(is_best, position, -1), reduce="amax")
    counts = torch.ones_like(segment) if multiplicity is None else multiplicity.long()
    sizes = torch.zeros(rows, num_segments, dtype=torch.long, device=device).scatter_add(1, segment, counts)
    members = torch.zeros(rows, num_segments, dtype=torch.long, device=device)
    members = members.scatter_add(1, segment, torch.ones_like(segment))

    # Everything in float32 on the keys and values as they are: kernel weights are in [0, 1] and sum
    # to 1 per set, so merged keys and values stay within their members' range, and a singleton's
    # weight is exactly 1, which keeps it bit for bit.
    keys32, values32 = keys.float(), values.float()
    pivot_keys = keys32.gather(1, pivot.gather(1, segment).unsqueeze(-1).expand(-1, -1, dim))
    distance = torch.linalg.vector_norm(keys32 - pivot_keys, dim=-1)  # [N, T]
    if not bool(distance.isfinite().all()):  # magnitudes beyond float32's squares: measure in row units
        scale = _largest_magnitude(keys32).clamp_min(1e-30).view(-1, 1, 1)
        distance = torch.linalg.vector_norm((keys32 - pivot_keys) / scale, dim=-1) * scale.view(-1, 1)
    if sigma is None:
        mean_distance = _segment_sum(distance, segment, num_segments) / members.clamp_min(1)
        floor = SIGMA_FLOOR * _largest_magnitude(keys32).view(-1, 1)
        width = torch.maximum(mean_distance / math.sqrt(2.0), floor).clamp_min(1e-30)
        z = distance / width.gather(1, segment)
    else:
        z = distance / sigma
    kernel = torch.exp(-0.5 * z.square())
    if multiplicity is not None:
        kernel = kernel * multiplicity.float()
    weight = (kernel / _segment_sum(kernel, segment, num_segments).gather(1, segment)).unsqueeze(-1)

    merged_keys = _segment_sum(weight * keys32, segment, num_segments).to(keys.dtype)
    merged_values = _segment_sum(weight * values32, segment, num_segments)
    if scale_values:  # the paper's |S| factor can leave the dtype's range: clamp it
        merged_values = finite_as(merged_values * sizes.unsqueeze(-1), values.dtype)
    return merged_keys, merged_values.to(values.dtype), pivot, sizes


def _segment_sum(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum x [N, T, ...] over tokens of each segment -> [N, S, ...]."""
    out = x.new_zeros(x.shape[0], num_segments, *x.shape[2:])
    index = segment.view(*segment.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter_add(1, index, x)
