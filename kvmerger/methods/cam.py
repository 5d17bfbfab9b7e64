"""CaM: evict like H2O, but first merge each evicted token's value into the values that follow it.

Paper: Yuxin Zhang, Yuxuan Du, Gen Luo, Yunshan Zhong, Zhenyu Zhang, Shiwei Liu, Rongrong Ji, "CaM:
Cache Merging for Memory-efficient LLMs Inference", ICML 2024 (https://openreview.net/forum?id=LCTmppB165).
Reference code: zyxxmu/cam (``cam_hf/utils_lm_eval/modify_llama_cam.py``: ``local_cam_mask``;
``cam_hf/utils_hh/modify_llama_cam.py``, ``merge_budget = 32``); kvpress's ``CAMPress``.

The rule (docs/METHOD.md section 4). Which tokens are evicted is H2O's decision (`kvmerger.methods.h2o`:
the ``floor(S / 2)`` newest tokens and the heavy hitters by aggregated attention ``A``). Before a
token ``i`` leaves the cache, its value is merged into the values of the next ``m = 32`` tokens in
the cache after it (fewer at the end of the sequence: ``n_i = min(m, T - 1 - i)``): each receives
``v_i / n_i``, but only if a Bernoulli draw with probability
``p_i = clamp(A_i / mean(A over those n_i tokens), 0, 1)`` says so. Keys are not merged.

The cadence. CaM's reference applies this one token at a time, as each token leaves the recent window
while the sequence streams in; a token that later leaves the cache itself carries on everything
merged into it so far (the reference adds to ``value_states`` in place). We reproduce that cadence
over the prompt: the evicted tokens leave in sequence order, each merging its *current* value into
the ``n_i`` tokens after it, all of which are still cached at that moment (later tokens have not
been evicted yet). Merging every evicted token's original value in one shot into the next ``m``
*finally kept* tokens (kvpress's bulk mode) is a different operator: every token of a long run of
evicted prompt tokens lands on the same few kept values after the run, which grow with the run's
length. In the sequential cadence an evicted token spreads over the next ``m`` tokens of any kind;
the kept ones keep their share, and an evicted one whose gate is closed drops what it received, so
value carried along a run decays instead of piling up. Measured on the default model (1,500-token
essay prefix, the next 128 tokens, mean KL to the full cache at budgets 0.5 / 0.35 / 0.2): this
cadence 0.043 / 0.13 / 0.33 (largest value 1.6 / 2.1 / 2.8 times the largest original), one shot
0.075 / 0.80 / 6.2 (up to 12 times); H2O's eviction alone 0.006 / 0.024 / 0.054.

Repetitive text, and the ``merge="average"`` guard (issue 18). The sequential cadence still lets the
merged values grow wherever aggregated attention is flat, and on repetitive text it is: with
``A_i`` close to the mean of its followers' ``A``, ``p_i`` is near 1 and 50-80% of the evicted
tokens merge in every layer (the lm-stress tuning windows, below). CaM's additive rule conserves
each merged value in full (a token that is evicted itself passes on all it received), so the
values of a run of evicted tokens travel forward until kept tokens absorb them; and the softmax over
the kept slots already hands those slots the evicted tokens' share of attention, so the merged
values are counted twice: with flat attention and every gate open a kept value stands for about
``T / S`` tokens' values summed, where the attention output wanted their mean. Measured on the
default model (2048-token prefixes of the five lm-stress sources at seed 1, the next 128 tokens):
the largest kept value grows to 9.6 / 11.7 / 5.6 times the largest original in some layer at budgets
0.5 / 0.35 / 0.1 (repeated passage), and CaM's mean KL over the five windows is 7.9 / 7.4 / 2.4
times H2O's (0.089 / 0.255 / 0.858 against 0.011 / 0.035 / 0.362). ``merge="average"`` makes each
token's value the attention-weighted mean of its own value (weight ``A_j``) and the values it
receives (weight ``c_k A_k`` each) instead of their sum:
``x_j = (A_j v_j + sum_k c_k A_k x_k) / (A_j + sum_k c_k A_k)``. For flat attention with every gate
open a kept token then keeps about ``S / T`` of its own value and takes the rest from the tokens it
stands for, the first-order correction for the softmax's renormalisation; every value stays in the
convex hull of the originals (growth at most 1), and a heavy hitter barely moves for the few
low-attention tokens merged into it. It is the same triangular system with coefficients
``c_k A_k``, right-hand side ``A_j v_j`` and row ``j`` scaled by ``1 / (A_j + sum_k c_k A_k)``, solved
the same two ways. On those windows: mean KL 1.18 / 1.36 / 1.14 times H2O's (0.013 / 0.047 / 0.411);
the plain mean (weight 1 for the own value, ``c_k`` for each received one) 1.49 / 1.54 / 1.30; merging
only the original values without the cascade 1.69 / 1.91 / 1.07. CaM's own additive rule stays the
default (``merge="add"``): it is the paper's rule and the reference code's, and the baseline the
comparison runs; ``merge="average"`` is a guard of ours, and the variant to use on real text.

The mixing matrix (why this is one triangular solve, not a loop over tokens). Let ``g_i`` in {0, 1}
be the gate of token ``i`` (0 for kept tokens) and ``c_i = g_i / n_i``. When token ``i`` is
processed, every token that merges into it (``k < i``) has already been processed, so its value is
final: ``x_i = v_i + sum_{k < i, i - k <= n_k} c_k x_k``. In matrix form ``x = v + N x`` with
``N[j, k] = c_k`` for ``0 < j - k <= n_k``: strictly lower-triangular with bandwidth ``m``. Hence
``x = (I - N)^{-1} v``, one unit lower-triangular solve per KV head, and the cache keeps the rows of
``x`` at the kept tokens. The solve is computed two ways, both exact:

* blocked (prompts): the sequence is cut into blocks of ``L >= m`` tokens. Only the last ``m``
  entries of a block reach into the next one, so ``x_b = Z_b + G_b y_{b-1}`` where ``Z_b`` and
  ``G_b`` come from one batched ``L x L`` triangular solve per block (right-hand sides ``v_b`` and the
  coupling to the previous block's last ``m`` entries), and the carries ``y_b`` (the last ``m`` rows
  of ``x_b``) obey ``y_b = Z_b[-m:] + G_b[-m:] y_{b-1}``: an affine recurrence over blocks, solved
  by a parallel prefix scan (``log2(T / L)`` steps of batched ``m x m`` products);
* sparse (few merging tokens, as while holding the budget during generation): the system restricted
  to the merging tokens is a small triangular solve, and every other row is ``v_j`` plus a
  ``[T, k] x [k, d]`` product.

Choices:

* ``merge_window=32`` (``m``, the reference's ``merge_budget``); ``recent_share=0.5`` as H2O.
* ``A`` is H2O's aggregated attention over the whole prompt (averaged over the query heads of a KV
  head); the reference uses the attention accumulated up to the moment of eviction. During
  generation it is the attention accumulated so far (``SlotState.accumulated``).
* ``p_i`` compares the evicted token with the tokens it merges into (docs/METHOD.md, kvpress). The
  reference code has several variants of the denominator (the mean over the recent window, the mean
  over the next 16 tokens, a maximum over sinks and window); this is the one its paper describes.
  ``0 / 0`` is 0 and ``x / 0`` is 1 (kvpress's convention).
* The share is ``1 / n_i``, the number of tokens actually receiving (kvpress's ``actual_budget``);
  the reference divides by ``m`` even where fewer tokens follow, losing the rest. Prompt tokens have
  ``n_i = m`` whenever the recent window holds at least ``m`` slots. The last token has no
  follower and is never merged.
* The Bernoulli gates are an explicit tensor: ``gate_i = u_i < p_i`` with uniforms ``u`` drawn from
  a CPU ``torch.Generator`` seeded with ``(seed, layer_idx)`` at prefill and
  ``(seed, layer_idx, tokens seen)`` during generation, so runs are reproducible and a slow
  reference can use the very same draws.
* ``merge="add"`` (default, CaM's rule) or ``"average"`` (the guard above; weights are the aggregated
  attention floored at 1e-6 of the row's largest, so that none is zero).
* Merging is done in float32 and the result cast back to the cache's dtype (clamped to its range).
* During generation (engine option ``hold_budget=True``), CaM's own rule: H2O's eviction (the
  newest ``floor(S / 2)`` slots stay, the least accumulated attention among the others goes), and
  each evicted slot first merges its value into the next ``m`` slots of the cache, by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, SlotState, check_statistic, keep_slots
from kvmerger.methods.h2o import check_recent_share, heavy_hitters_and_recent, hold_keep_indices, recent_slots
from kvmerger.methods.random_eviction import uniform_draws

BLOCK = 128  # tokens per block of the blocked solve (at least the merge window)
SPARSE_LIMIT = 128  # up to this many merging tokens per head, the sparse solve is cheaper
STRATEGIES = ("auto", "blocked", "sparse")
MERGE_RULES = ("add", "average")
WEIGHT_FLOOR = 1e-6  # the smallest merge weight of the average guard, relative to the row's largest


@dataclass
class CaM(CompressionMethod):
    """H2O eviction plus Bernoulli-gated merging of evicted values into the next m (Zhang et al., 2024)."""

    name: ClassVar[str] = "cam"
    summary: ClassVar[str] = (
        "CaM (Zhang et al. 2024): H2O eviction + gated merging of each evicted value into the next 32, sequentially"
    )

    budget: float = 0.5
    merge_window: int = 32
    recent_share: float = 0.5
    seed: int = 0
    merge: str = "add"
    statistic: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_statistic(self.statistic)
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES} (add: CaM's rule; average: the guard), got {self.merge!r}")
        if not isinstance(self.merge_window, int) or isinstance(self.merge_window, bool) or self.merge_window < 1:
            raise ValueError(
                f"merge_window is a number of following tokens, a positive integer; got {self.merge_window!r}"
            )
        check_recent_share(self.recent_share)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def compress(self, layer: LayerInput) -> LayerOutput:
        attention = layer.scores.aggregated_attention(self.statistic)  # [B, Hkv, T]
        keep = heavy_hitters_and_recent(attention, layer.slots, recent_slots(self.recent_share, layer.slots))
        evicted = torch.ones_like(attention, dtype=torch.bool).scatter(-1, keep, False)
        uniforms = uniform_draws(tuple(attention.shape), attention.device, self.seed, layer.layer_idx)
        coefficients = merge_coefficients(evicted, attention, uniforms, self.merge_window)
        merged = cascade_merge(layer.values, coefficients, self.merge_window, weights=self.merge_weights(attention))
        kept_values = merged.gather(2, keep.unsqueeze(-1).expand(*keep.shape, merged.shape[-1]))
        keys = layer.keys.gather(2, keep.unsqueeze(-1).expand(*keep.shape, layer.keys.shape[-1]))
        evicted_count = int(evicted.sum())
        largest = layer.values.float().abs().amax()
        return LayerOutput(
            keys=keys,
            values=_cast_finite(kept_values, layer.values.dtype),
            positions=keep,
            notes={
                "merged_share": float((coefficients > 0).sum()) / evicted_count if evicted_count else 0.0,
                "value_growth": float(kept_values.abs().amax() / largest) if largest > 0 else 1.0,
            },
        )

    def merge_weights(self, attention: torch.Tensor) -> torch.Tensor | None:
        """The weights of the `average` guard: each token's aggregated attention, floored at 1e-6 of its
        row's largest (so that every weight is positive); None for CaM's own additive rule."""
        if self.merge != "average":
            return None
        score = attention.float()
        return score.clamp_min(WEIGHT_FLOOR * score.amax(dim=-1, keepdim=True).clamp_min(1e-30))

    def hold_budget(self, state: SlotState) -> SlotState:
        keep = hold_keep_indices(state, recent_slots(self.recent_share, state.target_slots))
        real = state.set_sizes > 0
        evicted = real.scatter(-1, keep, False)  # padding slots are dropped without merging
        attention = state.accumulated.float().masked_fill(~real, 0.0)
        uniforms = uniform_draws(
            tuple(attention.shape), attention.device, self.seed, state.layer_idx, state.seen_tokens
        )
        coefficients = merge_coefficients(evicted, attention, uniforms, self.merge_window)
        merged = cascade_merge(state.values, coefficients, self.merge_window, weights=self.merge_weights(attention))
        return keep_slots(replace(state, values=_cast_finite(merged, state.values.dtype)), keep)


# --------------------------------------------------------------------------------------------
# The merge rule and its solve, vectorised over rows (batch x KV head)
# --------------------------------------------------------------------------------------------


def following_counts(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[T] long: n_i = min(window, T - 1 - i), how many tokens follow token i within the window."""
    return (length - 1 - torch.arange(length, device=device)).clamp(max=window)


def merge_coefficients(
    evicted: torch.Tensor, attention: torch.Tensor, uniforms: torch.Tensor, window: int
) -> torch.Tensor:
    """[..., T] float32 c_i = gate_i / n_i: the share of token i's value each of its n_i followers receives.

    gate_i = evicted_i and u_i < clamp(A_i / mean(A_{i+1..i+n_i}), 0, 1) and n_i > 0.
    """
    length = attention.shape[-1]
    counts = following_counts(length, window, attention.device)
    score = attention.float()
    following_sum = F.pad(score, (0, window))[..., 1:].unfold(-1, window, 1).sum(-1)  # sum of A over i+1..i+window
    probability = score / (following_sum / counts.clamp_min(1))
    probability = torch.nan_to_num(probability, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    gate = evicted & (uniforms < probability) & (counts > 0)
    return gate.float() / counts.clamp_min(1)


def cascade_merge(
    values: torch.Tensor,
    coefficients: torch.Tensor,
    window: int,
    *,
    weights: torch.Tensor | None = None,
    strategy: str = "auto",
    block: int = BLOCK,
) -> torch.Tensor:
    """x = (I - N)^{-1} v with N[j, k] = c_k for 0 < j - k <= min(window, T - 1 - k), per row.

    values: [..., T, d]; coefficients: [..., T] (`merge_coefficients`). Returns float32 [..., T, d]:
    every token's value after the evicted tokens, in sequence order, merged into their followers.
    With `weights` a [..., T] of positive weights a (the `merge="average"` guard), every token's value
    is instead the weighted mean of its own value (weight a_j) and the values it received (weight
    c_k a_k each): x_j = (a_j v_j + sum_k c_k a_k x_k) / (a_j + sum_k c_k a_k).
    The inputs are not modified.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    length, dim = values.shape[-2:]
    rows = values.float().reshape(-1, length, dim)
    coefficient_rows = coefficients.float().reshape(-1, length)
    merging = int((coefficient_rows > 0).sum(-1).max()) if coefficient_rows.numel() else 0
    if merging == 0:
        return rows.clone().reshape(values.shape)
    scale = None
    if weights is not None:
        # x = R (a v) + R N' x with N' built from c'_k = c_k a_k and R = diag(1 / (a_j + sum_k N'[j, k])):
        # the same triangular system, with every row j scaled by r_j
        own = weights.float().reshape(-1, length)
        coefficient_rows = coefficient_rows * own
        scale = 1.0 / (own + received_shares(coefficient_rows, window))
        rows = rows * own.unsqueeze(-1)
    if strategy == "auto":
        strategy = "sparse" if merging <= SPARSE_LIMIT else "blocked"
    if strategy == "sparse":
        mixed = _cascade_sparse(rows, coefficient_rows, window, merging, scale)
    else:
        mixed = _cascade_blocked(rows, coefficient_rows, window, block, scale)
    return mixed.reshape(values.shape)


def received_shares(coefficients: torch.Tensor, window: int) -> torch.Tensor:
    """[..., T]: sum_k N[j, k] = sum of c_k over the `window` tokens before j (all of them reach j)."""
    return F.pad(coefficients, (window, 0))[..., :-1].unfold(-1, window, 1).sum(-1)


def _cascade_sparse(
    values: torch.Tensor, coefficients: torch.Tensor, window: int, count: int, scale: torch.Tensor | None
) -> torch.Tensor:
    """The solve restricted to the `count` merging tokens of each row [R, T, d] (coefficients [R, T]);
    `scale` [R, T] (or None: ones) multiplies row j of the system."""
    rows, length, dim = values.shape
    # merging tokens first, in sequence order; rows with fewer are filled with tokens of coefficient 0
    source = torch.sort((coefficients <= 0).to(torch.int32), dim=-1, stable=True).indices[:, :count]  # [R, k]
    share = coefficients.gather(1, source)
    reach = (length - 1 - source).clamp(max=window)

    def received(targets: torch.Tensor) -> torch.Tensor:  # [R, J] -> [R, J, k]: r_j c_k if 0 < j - k <= n_k
        lag = targets.unsqueeze(-1) - source.unsqueeze(1)
        mixing = ((lag > 0) & (lag <= reach.unsqueeze(1))).float() * share.unsqueeze(1)
        return mixing if scale is None else mixing * scale.gather(1, targets).unsqueeze(-1)

    if scale is not None:
        values = values * scale.unsqueeze(-1)
    own = values.gather(1, source.unsqueeze(-1).expand(-1, -1, dim))  # [R, k, d]
    # strictly lower-triangular in this order: only merging tokens give, and they come first, sorted
    carried = torch.linalg.solve_triangular(-received(source), own, upper=False, unitriangular=True)
    positions = torch.arange(length, device=values.device).expand(rows, length)
    return values + received(positions) @ carried


def _cascade_blocked(
    values: torch.Tensor, coefficients: torch.Tensor, window: int, block: int, scale: torch.Tensor | None
) -> torch.Tensor:
    """The solve by blocks of L tokens [R, T, d] -> [R, T, d] (see the module docstring); `scale`
    [R, T] (or None: ones) multiplies row j of the system."""
    rows, length, dim = values.shape
    size = max(window, min(block, length))
    blocks = math.ceil(length / size)
    pad = blocks * size - length
    if scale is not None:
        values = values * scale.unsqueeze(-1)
    value_blocks = F.pad(values, (0, 0, 0, pad)).view(rows, blocks, size, dim)
    share = F.pad(coefficients, (0, pad)).view(rows, blocks, size)
    device = values.device
    local = torch.arange(size, device=device)
    lag = local.unsqueeze(1) - local.unsqueeze(0)  # j - k within a block
    negated = (-share).unsqueeze(2) * ((lag > 0) & (lag <= window))  # [R, nb, L, L]: -N within the block
    # N from the previous block's last `window` tokens: k = L - window + i reaches j iff i >= j
    cross_band = torch.arange(window, device=device).unsqueeze(0) >= local.unsqueeze(1)  # [L, window]
    previous_share = F.pad(share[:, :-1, size - window :], (0, 0, 1, 0))  # [R, nb, window], zeros for block 0
    cross = previous_share.unsqueeze(2) * cross_band  # [R, nb, L, window]
    if scale is not None:
        row_scale = F.pad(scale, (0, pad), value=1.0).view(rows, blocks, size, 1)
        negated, cross = negated * row_scale, cross * row_scale
    solved = torch.linalg.solve_triangular(
        negated, torch.cat([value_blocks, cross], dim=-1), upper=False, unitriangular=True
    )
    alone, gain = solved[..., :dim], solved[..., dim:]  # x_b = alone_b + gain_b @ carry_{b-1}
    carries = _affine_prefix_scan(gain[:, :, size - window :], alone[:, :, size - window :])
    incoming = F.pad(carries[:, :-1], (0, 0, 0, 0, 1, 0))  # carry_{b-1}, zeros for block 0
    mixed = alone + gain @ incoming
    return mixed.reshape(rows, blocks * size, dim)[:, :length]


def _affine_prefix_scan(step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """y_b = offset_b + step_b @ y_{b-1}, y_{-1} = 0, for all b at once (Hillis-Steele scan over dim 1).

    step: [R, nb, w, w]; offset: [R, nb, w, d]. log2(nb) rounds; after the round with shift s, entry b
    holds the composition of the maps b, b-1, ..., b-2s+1 (down to 0).
    """
    blocks = step.shape[1]
    shift = 1
    while shift < blocks:
        offset = torch.cat([offset[:, :shift], offset[:, shift:] + step[:, shift:] @ offset[:, :-shift]], dim=1)
        step = torch.cat([step[:, :shift], step[:, shift:] @ step[:, :-shift]], dim=1)
        shift *= 2
    return offset


def _cast_finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)
