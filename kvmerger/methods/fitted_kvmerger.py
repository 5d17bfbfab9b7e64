"""Fitted KVMerger: KVMerger chooses the slots, attention matching fits their biases and values.

KVMerger (Wang et al., arXiv 2407.08454; kvmerger.methods.kvmerger) folds runs of adjacent tokens
with similar keys into one slot each, but a merged slot is one term of the softmax and its group
loses attention mass (docs/METHOD.md, sections 5-6). Attention matching (Zweiger, Fu, Guo, Kim,
arXiv 2602.16284; kvmerger.methods.attention_matching) fits one additive logit bias per slot by
non-negative least squares so that attention mass is preserved on reference queries, and the slot
values by least squares so that attention outputs are reproduced. Here, per layer and KV head:

1. Slots: KVMerger's own merging sets, pivots and Gaussian-kernel merge in ``exact`` mode
   (``KVMerger.identify`` and ``gaussian_merge``, reused), so exactly ``layer.slots`` slots per head.
   ``slot_keys="merged"`` (default) keeps the merged keys; ``slot_keys="pivot"`` each set's pivot key.
   Its score knobs pass through: ``score``, ``statistic``, ``window_kernel``, ``window_pooling``,
   ``score_kernel`` and ``score_pooling``, and so does its cap on the merging sets,
   ``max_set_size`` (None: no cap).
2. Prior: the size-aware merge, weight ``w_s = |S|`` (bias ``log |S|``) and the merged value.
3. Biases: ``min_{w} ||M w - y||^2 + lam ||w - |S| ||^2`` with ``|S| e^-r <= w <= |S| e^r``
   (``r = bias_range``), ``M_js = exp(q_j.k_s - m_j)``, ``y_j = sum_t exp(q_j.k_t - m_j)``, each
   query's equation divided by ``y_j`` (relative mass error: every reference query counts alike,
   whether its attention is peaked or flat). Closed-form ridge correction of the prior, clamped to the
   box, then ``nnls_steps`` projected-gradient steps (attention_matching.fit_slot_weights).
4. Values: ``min_C ||X C - Y||^2 + lam ||C - C_merged||^2`` with ``X = softmax(q.k_s + b_s)`` and
   ``Y`` the full cache's attention outputs (attention_matching.fit_slot_values).

Choices (each one a parameter). Tuning used only ``essays()`` windows from character offsets 300000,
400000, 500000 and 600000 (2048 tokens, KL to the full cache over the next 128), never the
evaluation windows; numbers are mean KL at budgets 0.5 / 0.35 / 0.1 on those four windows, where
the defaults give 0.0028 / 0.0079 / 0.0382 (H2O 0.0049 / 0.0123 / 0.0626, SnapKV 0.0076 / 0.0140 /
0.0644, the paper's KVMerger with size bias 0.0084 / 0.0206 / 0.1291).

* Protection (KVMerger's ``recent_ratio`` / ``topk_ratio``): by default a recent window of half the
  budget and heavy hitters (by aggregated attention) of a fifth of it, so 30% of the slots are
  merged sets. The paper's fractions (34% / 24% of the budget at 0.5, 23% / 6% at 0.35) were set for
  the plain merge; once the merged sets keep their mass and get fitted values, the budget is better
  spent on the recent window, as H2O spends it (paper's fractions: 0.0045 / 0.0095 / 0.0476).
* Reference queries: the prompt's own query states in that layer (post-RoPE, as attention saw them)
  at ``reference_queries`` prompt positions, of which the last ``recent_queries`` (at most all) are
  taken and the others drawn uniformly (``seed``); one query per query head, pooled per KV head.
  Default: the last 128 positions only. They have seen (nearly) the whole prompt, as every later
  query will, and they are the closest to the queries that come next (128 positions drawn over the
  whole prompt: 0.0040 / 0.0111 / 0.0509 on three of the windows; the last 64: 0.0031 / 0.0083 /
  0.0407; the last 256: 0.0025 / 0.0072 / 0.0390, at twice the rows).
* ``causal=True`` (default): a query at prompt position ``p`` only ever saw tokens ``t <= p``; scoring
  it against later keys gives logits at relative positions the model never produces. So each
  query's equations involve only the slots whose whole set lies at or before ``p``, and only the
  tokens of those sets (a set straddling ``p`` is left out of both sides): "the slots covering this
  prefix reproduce this prefix's mass and output". With the default (last) queries this only leaves
  out the few sets that end after ``p``. ``causal=False`` scores every query against the whole
  prompt, as the attention-matching reference code does with context-prefill queries; with queries
  drawn over the whole prompt that was far worse (0.10 against 0.0065 at budget 0.5 on an early
  tuning window).
* Ridge toward the prior, 0.1 for both fits (``bias_ridge``, ``ridge``; relative to the mean
  eigenvalue of the normal matrix): the systems are underdetermined at large budgets (384 query rows
  for 1024 slots at budget 0.5 of 2048 tokens), and slots the queries barely constrain should stay
  the size-aware merge rather than chase the reference queries (0.01: 0.0032 / 0.0087 / 0.0552;
  1e-3 with uniformly drawn queries: 0.0149 against 0.0066 at 0.5 on three windows).
* The box ``|S| e^{-r} .. |S| e^{r}`` (``bias_range`` r = 3, the reference code's +-3 nats) keeps every
  slot alive (finite bias) and the fitted weight within a factor ``e^r`` of the set's size.
* ``slot_keys="pivot"`` (keep each set's most attended key instead of the merged key) measured worse:
  0.0039 / 0.0122 / 0.0799.
* The bias is one float32 per slot and KV head; the engine counts it in the cache's bytes (budget
  0.5 of a 64-dim head: 0.5039 of the full cache's bytes).
* ``head_budget="shared"`` (default ``"equal"``; ``head_floor`` as in KVMerger): a layer's heads
  share its slots as in KVMerger's shared mode (each head merges down to what it won, protecting the
  same share of it), then every head is fitted on its own slots. Heads hold different numbers of
  slots; the fit pads them with zero features, a weight box of [0, 0] and each row's own count of
  slots in the ridge, which gives each head the fit it would get alone (tested), and the slots,
  values and biases are stored packed (one bias and one KV-head tag per slot, both paid from the
  budget). ``head_floor=1`` is the equal budget's fit exactly (tested).
* ``fit_slots="all"`` (default): both fits solve for every slot. ``"merged"`` solves only for the
  merged sets (size > 1): every single token keeps its own key, value and bias 0, its part of each
  query's mass and output moves to the targets' side, and the normal systems shrink to the merged
  columns; ``"merged-values"`` fits every bias but only the merged sets' values. Both raised the LM KL
  on the tuning seed (seed 1, 4 windows of 2048 tokens, 2026-12-02; paired against "all" at 0.5 /
  0.35 / 0.1: "merged" +0.0031 / +0.0049 / +0.0166, "merged-values" +0.0027 / +0.0069 / +0.0309, each
  2-4 paired standard errors, higher on 4 of 4 windows): fitting the single tokens too is what absorbs
  the merged sets' errors, so "all" stays.
* Numerics as in attention_matching: float32, per-query log-sum-exp shifts, values in units of the
  row's largest |value|, outputs cast back clamped to the dtype's finite range; batched over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.engine.scoring import POOL_KERNEL, POOLING
from kvmerger.methods.attention_matching import (
    Targets,
    check_reference,
    fit_report,
    fit_slot_values,
    fit_slot_weights,
    full_cache_targets,
    reference_queries,
    relative_scale,
    ridge_correction,
    slot_attention,
    slot_features,
    validate_fit_fields,
)
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, finite_as, packed_output, row_scale
from kvmerger.methods.kvmerger import KVMerger, gaussian_merge

KEY_CHOICES = ("merged", "pivot")
FIT_CHOICES = ("all", "merged", "merged-values")  # which slots each fit solves for
RECENT_SHARE = 0.5  # of the budget, kept as a recent window by default
TOPK_SHARE = 0.2  # of the budget, kept as heavy hitters by default


def leading_columns(chosen: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, width] indices of each row's chosen columns first (in order), then others as padding, and
    [N, width] bool marking the chosen ones; a permutation's prefix, so no index repeats in a row."""
    order = torch.sort(chosen.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    return order, torch.arange(width, device=chosen.device) < chosen.sum(dim=1, keepdim=True)


@dataclass
class MergedColumns:
    """Each row's merged sets (size > 1) as leading columns: what `fit_slots="merged"` solves for."""

    merged: torch.Tensor  # [N, S] bool
    columns: torch.Tensor  # [N, width] slot indices, the merged ones first
    valid: torch.Tensor  # [N, width] bool: a merged set, not padding
    count: torch.Tensor  # [N] merged sets per row

    @classmethod
    def of(cls, sizes: torch.Tensor) -> MergedColumns:
        merged = sizes > 1
        count = merged.sum(dim=1)
        columns, valid = leading_columns(merged, int(count.max()))
        return cls(merged, columns, valid, count)

    def gather(self, design: torch.Tensor) -> torch.Tensor:
        """[N, R, width]: `design` [N, R, S] at each row's merged columns, zero on padding."""
        return design.gather(2, self.columns.unsqueeze(1).expand(-1, design.shape[1], -1)) * self.valid.unsqueeze(1)


def weight_box(prior: torch.Tensor, bias_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's weight stays within a factor e^bias_range of its set's size."""
    return prior * math.exp(-bias_range), prior * math.exp(bias_range)


def fit_merged_weights(
    features: torch.Tensor, mass: torch.Tensor, prior: torch.Tensor, sets: MergedColumns, bias_range: float,
    ridge: float, steps: int,
) -> torch.Tensor:
    """The weight fit of `fit_slot_weights` (relative) with every slot outside the merged sets pinned at
    its prior: their mass is exact and moves to the target's side, and only the merged columns are
    solved (each row's ridge from its own merged columns)."""
    if sets.columns.shape[1] == 0:
        return prior
    scale = relative_scale(mass)
    pinned_mass = (features @ (prior * ~sets.merged).unsqueeze(-1)).squeeze(-1)
    at_columns = prior.gather(1, sets.columns)
    sub_prior = at_columns * sets.valid
    solved = fit_slot_weights(
        sets.gather(features) * scale.unsqueeze(-1), (mass - pinned_mass) * scale, sub_prior,
        *weight_box(sub_prior, bias_range), ridge, steps, relative=False, columns=sets.count,
    )
    return prior.scatter(1, sets.columns, torch.where(sets.valid, solved, at_columns))


def fit_merged_values(
    features: torch.Tensor, weights: torch.Tensor, outputs: torch.Tensor, prior: torch.Tensor, sets: MergedColumns,
    ridge: float,
) -> torch.Tensor:
    """`fit_slot_values` with every slot outside the merged sets keeping its prior value: the ridge
    correction is solved on the merged columns of the fitted attention only."""
    if sets.columns.shape[1] == 0:
        return prior
    attention = slot_attention(features, weights)
    residual = outputs - attention @ prior
    correction = ridge_correction(sets.gather(attention), residual, ridge, sets.count)
    index = sets.columns.unsqueeze(-1).expand_as(correction)
    return prior.scatter_add(1, index, correction * sets.valid.unsqueeze(-1))


@dataclass
class FittedKVMerger(CompressionMethod):
    """KVMerger's merging sets with attention-matched per-slot biases and values."""

    name: ClassVar[str] = "fitted-kvmerger"
    summary: ClassVar[str] = "KVMerger's merging sets with biases and values fitted by attention matching"

    budget: float = 0.5
    # KVMerger's own knobs (exact mode); see kvmerger.methods.kvmerger
    recent_ratio: float | None = None
    topk_ratio: float | None = None
    sigma: float | None = None
    slot_keys: str = "merged"
    # the fit
    reference_queries: int | None = 128
    recent_queries: int = 128
    causal: bool = True
    bias_range: float = 3.0
    nnls_steps: int = 2
    bias_ridge: float = 0.1
    ridge: float = 0.1
    seed: int = 0
    score: str = "aggregated"
    reference: str = "prompt"
    statistic: str = "exact"
    recent_share: float | None = None
    topk_share: float | None = None
    window_kernel: int = POOL_KERNEL
    window_pooling: str = POOLING
    max_set_size: int | None = None
    score_kernel: int = 1
    score_pooling: str = "max"
    head_budget: str = "equal"
    head_floor: float = 0.0
    fit_slots: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind in ("recent", "topk"):
            if getattr(self, f"{kind}_ratio") is not None and getattr(self, f"{kind}_share") is not None:
                raise ValueError(f"give {kind}_ratio (a share of the prompt) or {kind}_share (of the budget), not both")
        self.merger()  # validates KVMerger's knobs
        validate_fit_fields(self)
        check_reference(self.reference)
        if self.fit_slots not in FIT_CHOICES:
            raise ValueError(f"fit_slots must be one of {FIT_CHOICES}, got {self.fit_slots!r}")
        if self.slot_keys not in KEY_CHOICES:
            raise ValueError(f"slot_keys must be one of {KEY_CHOICES}, got {self.slot_keys!r}")
        if not isinstance(self.bias_range, (int, float)) or not 0 < self.bias_range <= 80:
            raise ValueError(f"bias_range must be in (0, 80] (weights within e^range of |S|), got {self.bias_range!r}")

    def protection(self) -> tuple[float, float]:
        """(recent_ratio, topk_ratio) as shares of the prompt: the ratio fields, else the share fields
        times the budget (by default half and a fifth of the budget)."""
        recent_share = RECENT_SHARE if self.recent_share is None else self.recent_share
        topk_share = TOPK_SHARE if self.topk_share is None else self.topk_share
        return (
            self.budget * recent_share if self.recent_ratio is None else self.recent_ratio,
            self.budget * topk_share if self.topk_ratio is None else self.topk_ratio,
        )

    def merger(self) -> KVMerger:
        """The KVMerger whose merging sets this method fits."""
        recent, topk = self.protection()
        return KVMerger(
            budget=self.budget, mode="exact", recent_ratio=recent, topk_ratio=topk, sigma=self.sigma, score=self.score,
            statistic=self.statistic, window_kernel=self.window_kernel, window_pooling=self.window_pooling,
            max_set_size=self.max_set_size, score_kernel=self.score_kernel, score_pooling=self.score_pooling,
            head_budget=self.head_budget, head_floor=self.head_floor,
        )

    def stores_bias(self) -> bool:
        return True

    def needs_reconstruction(self) -> bool:
        return "reconstruction" in self.score.split("+") or self.reference == "reconstruction"

    def fit(
        self, features: torch.Tensor, targets: Targets, prior: torch.Tensor, prior_values: torch.Tensor,
        sizes: torch.Tensor, count: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' weights, then their values, each fitted on the columns `fit_slots` names: every
        slot (`count` real ones per row), or only the merged sets (size > 1), every single token then
        keeping its own value (both fits) and weight 1 ("merged")."""
        sets = None if self.fit_slots == "all" else MergedColumns.of(sizes)
        if self.fit_slots == "merged":
            weights = fit_merged_weights(
                features, targets.mass, prior, sets, self.bias_range, self.bias_ridge, self.nnls_steps
            )
        else:
            weights = fit_slot_weights(
                features, targets.mass, prior, *weight_box(prior, self.bias_range), self.bias_ridge,
                self.nnls_steps, relative=True, columns=count,
            )
        if self.fit_slots == "all":
            return weights, fit_slot_values(features, weights, targets.outputs, prior_values, self.ridge, columns=count)
        return weights, fit_merged_values(features, weights, targets.outputs, prior_values, sets, self.ridge)

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, dim = layer.keys.shape
        rows = batch * heads
        keys, values = layer.rows()
        merger = self.merger()
        scores = merger.scores(layer)
        shared = self.head_budget == "shared"
        budgets = merger.shared_head_slots(scores, layer.slots).flatten() if shared else layer.slots
        attention = scores.flatten(0, 1)
        sets = merger.identify(keys, attention, budgets, layer_slots=layer.slots if shared else None)
        slots = int(sets.count.max())
        merged_keys, merged_values, pivots, sizes = gaussian_merge(
            keys, values, attention, sets.segment, slots, self.sigma, False
        )
        slot_keys = merged_keys
        if self.slot_keys == "pivot":
            slot_keys = keys.gather(1, pivots.unsqueeze(-1).expand(-1, -1, dim))

        position = torch.arange(length, device=keys.device).expand(rows, length)
        set_end = torch.full((rows, slots), -1, dtype=torch.long, device=keys.device)
        set_end = set_end.scatter_reduce(1, sets.segment, position, reduce="amax")  # [N, S]
        scale = row_scale(values)
        ref = reference_queries(layer.scores, self.reference_queries, self.recent_queries, self.seed, self.reference)
        token_from = set_end.gather(1, sets.segment) if self.causal else None
        targets = full_cache_targets(ref, keys, values.float() / scale, token_from, with_rms=False)
        features = slot_features(ref, slot_keys, targets.shift, set_end if self.causal else None)
        real = sizes > 0  # a head that won fewer slots than the widest has padding slots (shared budget)
        if shared:
            features.masked_fill_(~real.unsqueeze(1), 0.0)

        prior = sizes.float()  # 0 on padding, whose box is then [0, 0]
        prior_values = merged_values.float() / scale
        weights, fitted = self.fit(features, targets, prior, prior_values, sizes, sets.count)
        notes = fit_report(features, targets, prior, prior_values, weights, fitted)
        notes.update(sets.protection_notes(), reference_queries=int(ref.queries.shape[1]))
        if shared:
            shape = (batch, heads, slots)
            return packed_output(
                slot_keys.reshape(*shape, dim),
                finite_as(fitted * scale, layer.values.dtype).reshape(*shape, -1),
                pivots.reshape(shape),
                real.reshape(shape),
                set_sizes=sizes.reshape(shape),
                notes=notes,
                bias=weights.log().reshape(shape),
            )
        return LayerOutput(
            keys=slot_keys.reshape(batch, heads, slots, dim),
            values=finite_as(fitted * scale, layer.values.dtype).reshape(batch, heads, slots, -1),
            positions=pivots.reshape(batch, heads, slots),
            set_sizes=sizes.reshape(batch, heads, slots),
            bias=weights.log().reshape(batch, heads, slots),
            notes=notes,
        )
