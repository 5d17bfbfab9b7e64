"""Attention statistics for scoring, computed from one layer's own query and key states.

The model runs with sdpa, which never returns attention probabilities, and asking transformers for
`output_attentions` materialises every [T, T] matrix at once (19 GiB at 4k tokens on the default
model). Two ways to get them without that:

* `aggregated_attention_from_lse`: when the prefill's attention kept each row's log-normaliser
  (on CPU, see `engine.kernels`), every key's column sum is one more fused flash-attention pass,
  with the roles of queries and keys swapped. No [T, T] matrix exists at any point.
* `attention_column_sums`: the probabilities recomputed in query chunks, in float32, with the
  causal mask; memory O(chunk x T) per head. Used for the observation windows (few queries), on
  devices without the fused op, and as the plainly written check of the fast path.

Grouped-query attention stays native: scores are returned per KV head, averaged over the query
heads that share it.

Score sources (docs/METHOD.md, section 7b): what a method that ranks tokens or picks pivots may
take as "the attention later queries will pay each key", each a [B, Hkv, T] vector per layer and
none of them built from a [T, T] matrix (`LayerScores.source`):

* ``aggregated``: attention summed over every prompt query (H2O's, the KVMerger paper's);
* ``window``: attention from the last prompt queries, pooled over neighbouring keys (SnapKV's);
* ``reconstruction``: the largest attention each key receives while the model repeats the context
  (KVzip's; computed by `engine.reconstruction`, which runs the model again);
* ``expected``: the expected attention of future queries under a Gaussian fitted to the prompt's
  queries and rotated forward (Expected Attention, kvpress; `expected_attention`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvmerger.engine import kernels

if TYPE_CHECKING:
    from kvmerger.engine.reconstruction import Reconstruction

SCORE_SOURCES = ("aggregated", "window", "reconstruction", "expected")
STATISTICS = ("exact", "estimated")  # how the aggregated attention is computed
# One far query in 16 sampled: the smallest share that kept >= 95% of H2O's slots and KVMerger's pivots at
# 2k and 8k tokens (benchmarks/estimate_agreement.py, end of tinyshakespeare; a fixed number of rows did not:
# 256 rows gave 0.944 of KVMerger's pivots at 8k)
ESTIMATE_STRIDE = 16
ESTIMATE_BAND = 64  # the nearest 64 queries of each key, exactly
ESTIMATE_LAST = 64  # and the last 64 queries of the prompt, exactly
POOLINGS = ("avg", "max")
# Defaults of the sources, as their papers and reference code set them
WINDOW = 32  # SnapKV's observation window
POOL_KERNEL = 5  # SnapKV's pooling kernel
POOLING = "avg"  # and its pooling
FUTURE_POSITIONS = 512  # Expected Attention: future positions the rotation is averaged over (kvpress)
SINK_TOKENS = 4  # Expected Attention and KVzip: first tokens always kept, never scored (kvpress)

DEFAULT_CHUNK = 64  # queries per chunk; measured fastest among 16-256 on 2 CPU cores (2k and 8k tokens)
# Below this many tokens the chunked pass is the faster one: on the default model's layer shape,
# fp32, 2 CPU cores (benchmarks/attention_share.py, 2026-11-29) the fused pass cost 1.17 / 1.04 /
# 1.09 / 0.96 x sdpa at 1k / 2k / 4k / 8k tokens, the chunked one 0.92 / 1.07 / 1.25 / 1.36.
FUSED_FROM_TOKENS = 2048


def attention_column_sums(
    query: torch.Tensor, key: torch.Tensor, scaling: float, first_query: int = 0, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Attention each key receives, summed over query rows [first_query, T), causal softmax.

    query: [B, Hq, T, d]; key: [B, Hkv, T, d]. Returns [B, Hkv, T] float32, averaged over the
    query heads of each KV head. Works in chunks of query rows against the keys they can see, so
    the largest intermediate is [B, Hq, chunk, T]. The query heads of a group share one matrix
    product with their KV head's keys, and the sum over the chunk's queries and heads is a second
    one (normalisers as a row vector times the unnormalised probabilities).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    grouped = (query.float() * scaling).view(batch, kv_heads, group, length, dim)
    keys_t = key.float().transpose(-1, -2)  # [B, Hkv, d, T]
    total = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=key.device)
    for start in range(first_query, length, chunk):
        end = min(length, start + chunk)
        rows = end - start
        queries = grouped[:, :, :, start:end].reshape(batch, kv_heads, group * rows, dim)
        logits = torch.matmul(queries, keys_t[..., :end]).view(batch, kv_heads, group, rows, end)
        future = torch.ones(rows, rows, dtype=torch.bool, device=key.device).triu_(1)
        logits[..., start:end].masked_fill_(future, float("-inf"))  # keys before `start` are all visible
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        inverse_norm = logits.sum(dim=-1).reciprocal_()  # [B, Hkv, g, c]
        weights = inverse_norm.view(batch, kv_heads, 1, group * rows)
        total[..., :end] += torch.matmul(weights, logits.view(batch, kv_heads, group * rows, end)).squeeze(2)
    return total / group


def aggregated_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """H2O's score: for each key, the attention it received summed over all queries. [B, Hkv, T]."""
    return attention_column_sums(query, key, scaling, 0, chunk)


def aggregated_attention_from_lse(
    query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float
) -> torch.Tensor:
    """H2O's score from the prefill's log-normalisers, in one fused attention pass. [B, Hkv, T].

    Column j sums P[i, j] = exp(s q_i.k_j - lse_i) over the queries i >= j. Read with the roles
    swapped, key j is a query over the prompt's queries i >= j (anti-causal: flip both sequences
    and it is causal), with value w_i = exp(m - lse_i). The flash kernel returns that softmax's
    log-normaliser L_j = log sum_i exp(s k_j.q_i) and its output o_j = sum_i exp(s k_j.q_i) w_i / exp(L_j),
    so the column sum is o_j exp(L_j - m). m = min_i lse_i keeps every w_i in (0, 1].

    Runs in bfloat16 when the states are bfloat16 (the kernel accumulates in float32; within 1e-2
    of the float32 column sums of the same states, tested; 0.58% at most measured on the default
    model at 4k tokens by benchmarks/statistic_agreement.py), else in float32 (1e-6).
    query: [B, Hq, T, d]; key: [B, Hkv, T, d]; lse: [B, Hq, T] as `kernels.causal_attention_with_lse`
    returns it.
    """
    batch, q_heads, length, dim = query.shape
    group = q_heads // key.shape[1]
    work = torch.bfloat16 if query.dtype == torch.bfloat16 else torch.float32
    swapped_queries = key.to(work).repeat_interleave(group, dim=1).flip(2)
    swapped_keys = query.to(work).flip(2)
    lse = lse.float()
    shift = lse.amin(dim=-1, keepdim=True)  # [B, Hq, 1]
    weights = swapped_keys.new_zeros(batch, q_heads, length, dim)
    weights[..., 0] = (shift - lse).exp().flip(2)
    output, swapped_lse = kernels.causal_attention_with_lse(swapped_queries, swapped_keys, weights, scaling)
    per_query_head = (output[..., 0].float() * (swapped_lse.float() - shift).exp()).flip(2)
    return per_query_head.view(batch, -1, group, length).mean(dim=2)


def _masked_column_sums(
    keys: torch.Tensor, queries: torch.Tensor, log_weights: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """sum_i [allowed_ji] exp(s k_j.q_i + log_weights_i) for every key j, in one fused flash pass.

    keys [B, H, J, d] act as the pass's queries and queries [B, H, I, d] as its keys, each extended
    by one coordinate (1 for the keys, log_weights_i / s for the queries) so that every logit is
    s k_j.q_i + log_weights_i; with log_weights_i = -lse_i that is log P[i, j] <= 0, nothing can
    overflow, and the sum is the exp of the log-normaliser the kernel returns (its output is unused).
    `allowed` [J, I] bool says which queries each key may receive from; a key with none gets 0.
    Returns [B, H, J] float32.
    """
    ones = keys.new_ones(*keys.shape[:-1], 1)
    extended_keys = torch.cat([keys, ones], dim=-1)
    extended_queries = torch.cat([queries, (log_weights / scaling).unsqueeze(-1).to(queries.dtype)], dim=-1)
    _, normaliser = kernels.masked_attention_with_lse(
        extended_keys, extended_queries, torch.zeros_like(extended_queries), allowed, scaling
    )
    return normaliser.float().exp().masked_fill(~allowed.any(dim=-1), 0.0)


def near_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int, *, fused: bool | None = None
) -> torch.Tensor:
    """Attention each key receives from the `band` queries nearest after it (itself included), exactly.

    Column j sums P[i, j] = exp(s q_i.k_j - lse_i) over j <= i < j + band, with the prefill's own
    log-normalisers `lse` [B, Hq, T]. The sequence is cut into blocks of `band` keys; each block's
    keys meet the queries of their own block and the next one. `fused` (default: where
    `kernels.available`) runs that as one flash pass with the roles swapped, the blocks as heads;
    otherwise as matrix products, [B, Hq, T / band, band, 2 band] logits in all.
    Returns [B, Hkv, T] float32, averaged over the query heads of each KV head.
    """
    if fused is None:
        fused = kernels.available(key.device, torch.float32)
    near = _near_attention_fused if fused else _near_attention_chunked
    return near(query, key, scaling, lse, band)


def _near_attention_fused(query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int) -> torch.Tensor:
    batch, q_heads, length, dim = query.shape
    group = q_heads // key.shape[1]
    blocks = math.ceil(length / band)
    pad = blocks * band - length
    keys = F.pad(key.float().repeat_interleave(group, dim=1), (0, 0, 0, pad)).reshape(batch, q_heads * blocks, band, dim)
    # the queries of blocks b and b + 1 for the keys of block b; padded queries weigh exp(-1e30) = 0
    windows = F.pad(query.float(), (0, 0, 0, pad + band)).unfold(2, 2 * band, band)[:, :, :blocks]
    windows = windows.transpose(-1, -2).reshape(batch, q_heads * blocks, 2 * band, dim)
    log_weights = F.pad(-lse.float(), (0, pad + band), value=-1e30).unfold(2, 2 * band, band)[:, :, :blocks]
    key_index = torch.arange(band, device=key.device).unsqueeze(1)
    query_index = torch.arange(2 * band, device=key.device).unsqueeze(0)
    allowed = (query_index >= key_index) & (query_index < key_index + band)
    received = _masked_column_sums(keys, windows, log_weights.reshape(batch, q_heads * blocks, 2 * band), allowed, scaling)
    received = received.view(batch, q_heads, blocks * band)[..., :length]
    return received.view(batch, -1, group, length).mean(dim=2)


def _near_attention_chunked(query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int) -> torch.Tensor:
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    blocks = math.ceil(length / band)
    pad = blocks * band - length
    queries = F.pad(query.float() * scaling, (0, 0, 0, pad)).view(batch, kv_heads, group, blocks, band, dim)
    keys = F.pad(key.float(), (0, 0, band, pad)).unfold(2, 2 * band, band)  # [B, Hkv, nb, d, 2 band]
    logits = torch.matmul(queries, keys.unsqueeze(2))  # [B, Hkv, g, nb, band, 2 band]
    normalisers = F.pad(lse.float(), (0, pad), value=math.inf).view(batch, kv_heads, group, blocks, band, 1)
    row = torch.arange(band, device=key.device).unsqueeze(1)
    column = torch.arange(2 * band, device=key.device).unsqueeze(0)
    near = (column > row) & (column <= row + band)  # key index - query index in (-band, 0]
    received = (logits - normalisers).exp().masked_fill(~near, 0.0).sum(dim=(2, 4))  # [B, Hkv, nb, 2 band]
    total = key.new_zeros(batch, kv_heads, blocks + 1, band, dtype=torch.float32)
    total[:, :, :blocks] += received[..., :band]  # the previous block's keys
    total[:, :, 1:] += received[..., band:]  # the block's own keys
    return total.flatten(2)[..., band : band + length] / group


def sampled_rows(length: int, stride: int, last: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The far part's query rows and their weights: every `stride`-th row (offset stride - 1) before the
    last `last`, weighted by `stride`, then the last `last` rows, weighted 1."""
    tail = max(0, length - last)
    rows = torch.cat([torch.arange(stride - 1, max(tail, stride - 1), stride), torch.arange(tail, length)]).to(device)
    return rows, torch.where(rows < tail, float(stride), 1.0)


def far_attention_sample(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int, stride: int, last: int,
    chunk: int = DEFAULT_CHUNK, *, fused: bool | None = None,
) -> torch.Tensor:
    """Estimated attention each key receives from the queries `band` or more positions after it.

    Rows (`sampled_rows`): every `stride`-th query before the last `last`, weighted by `stride`, and
    the last `last` queries exactly (weight 1): unbiased over the sampling offset, exact with stride 1.
    Costs about (T / stride + last) x T logits per head: `fused` (default: where `kernels.available`)
    as one flash pass with the roles swapped and a [T, rows] mask, otherwise in chunks of `chunk`
    rows as matrix products. Returns [B, Hkv, T] float32.
    """
    if fused is None:
        fused = kernels.available(key.device, torch.float32)
    rows, weights = sampled_rows(query.shape[-2], stride, last, key.device)
    if fused:
        return _far_attention_fused(query, key, scaling, lse, band, rows, weights)
    return _far_attention_chunked(query, key, scaling, lse, band, rows, weights, chunk)


def _far_attention_fused(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int,
    rows: torch.Tensor, row_weights: torch.Tensor,
) -> torch.Tensor:
    batch, q_heads, length, dim = query.shape
    group = q_heads // key.shape[1]
    log_weights = row_weights.log() - lse.float()[..., rows]  # [B, Hq, rows]
    allowed = rows.unsqueeze(0) >= torch.arange(length, device=key.device).unsqueeze(1) + band  # [T, rows]
    keys = key.float().repeat_interleave(group, dim=1)
    received = _masked_column_sums(keys, query.float()[..., rows, :], log_weights, allowed, scaling)
    return received.view(batch, -1, group, length).mean(dim=2)


def _far_attention_chunked(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, band: int,
    rows: torch.Tensor, weights: torch.Tensor, chunk: int,
) -> torch.Tensor:
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    grouped = (query.float() * scaling).view(batch, kv_heads, group, length, dim)
    normalisers = lse.float().view(batch, kv_heads, group, length)
    keys_t = key.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, d, T]
    total = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=key.device)
    positions = torch.arange(length, device=key.device)
    for start in range(0, rows.numel(), chunk):
        picked = rows[start : start + chunk]
        reach = int(picked.max()) - band + 1  # keys at or before the last row's reach
        if reach <= 0:
            continue
        logits = torch.matmul(grouped[:, :, :, picked], keys_t[..., :reach])  # [B, Hkv, g, c, reach]
        far = positions[:reach].unsqueeze(0) <= (picked - band).unsqueeze(1)  # [c, reach]
        probabilities = (logits - normalisers[:, :, :, picked].unsqueeze(-1)).exp().masked_fill(~far, 0.0)
        row_weights = weights[start : start + chunk].expand(group, -1).reshape(1, 1, 1, -1)
        summed = torch.matmul(row_weights, probabilities.reshape(batch, kv_heads, -1, reach)).squeeze(2)
        total[..., :reach] += summed
    return total / group


def estimate_stride(length: int, rows: int, last: int = ESTIMATE_LAST) -> int:
    """The stride that samples about `rows` queries from the `length - last` before the last ones."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    return max(1, math.ceil(max(0, length - last) / rows))


def aggregated_attention_estimated(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, *, stride: int,
    band: int = 64, last: int = 64, chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """An estimate of H2O's score in O((band + T / stride) T) work instead of O(T^2): [B, Hkv, T].

    `LayerScores` uses a fixed stride (`ESTIMATE_STRIDE`): a fixed share of the far rows, so the far
    part still grows like T^2, 1/stride of the exact pass's logits. `stride = estimate_stride(T, m)`
    samples a fixed number m of rows instead, linear in T, but its agreement with the exact statistic
    falls as T grows (docs/BENCHMARKS.md section 8).

    Most of a key's attention comes from the queries just after it (local attention), and that part
    is computed exactly for every query with the prefill's log-normalisers (`near_attention`); what
    queries further on give is smaller per query and smoother, and is estimated from every
    `stride`-th query plus the last `last` ones (`far_attention_sample`). With stride 1 it is exact.
    """
    near = near_attention(query, key, scaling, lse, band)
    return near + far_attention_sample(query, key, scaling, lse, band, stride, last, chunk)


def window_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, window: int, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Attention each key received from the last `window` queries, summed over them. [B, Hkv, T].

    SnapKV's observation window; TOVA's last query with window=1.
    """
    return attention_column_sums(query, key, scaling, max(0, query.shape[-2] - window), chunk)


def largest_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, visible: int, targets: slice, chunk: int = 256
) -> torch.Tensor:
    """The largest softmax probability each target key receives from any query and query head of its group.

    query: [B, Hq, n, d]; key: [B, Hkv, visible + n, d]: every query sees the first `visible` keys,
    and query i the queries' own keys 0..i (causal). Returns [B, Hkv, len(targets)] float32 for the
    keys `targets` (a slice within the visible ones). Works in chunks of `chunk` queries, so the
    largest intermediate is [B, Hq, chunk, visible + n] (KVzip's reconstruction score; the
    reconstruction pass gets the log-normalisers from its own attention where `kernels.available`,
    and calls `largest_probability` alone).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    grouped = (query.float() * scaling).view(batch, kv_heads, group, length, dim)
    keys_t = key.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, d, K]
    first, last = targets.indices(visible)[:2]
    best = torch.zeros(batch, kv_heads, last - first, dtype=torch.float32, device=key.device)
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        logits = torch.matmul(grouped[:, :, :, start:end], keys_t[..., : visible + end])  # [B, Hkv, g, c, K']
        rows = torch.arange(start, end, device=key.device).unsqueeze(1)
        future = torch.arange(end, device=key.device).unsqueeze(0) > rows  # own keys after the query
        logits[..., visible:].masked_fill_(future, float("-inf"))
        probabilities = (logits[..., first:last] - logits.logsumexp(dim=-1, keepdim=True)).exp()
        best = torch.maximum(best, probabilities.amax(dim=(2, 3)))
    return best


def largest_probability(
    query: torch.Tensor, key: torch.Tensor, scaling: float, lse: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """max over queries i and the query heads of each key's group of exp(s q_i.k_j - lse_i). [B, Hkv, K].

    query: [B, Hq, n, d]; key: [B, Hkv, K, d], keys every query sees; lse: [B, Hq, n], each query's
    log-normaliser. The exponent is one matrix product (the scaled queries extended by -lse, the
    keys by 1) and a running max over chunks of `chunk` queries; only the K results are exponentiated.
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    extended_queries = torch.cat([query.float() * scaling, -lse.float().unsqueeze(-1)], dim=-1)
    extended_queries = extended_queries.view(batch, kv_heads, group, length, dim + 1)
    extended_keys = torch.cat([key.float(), key.new_ones(*key.shape[:-1], 1, dtype=torch.float32)], dim=-1)
    keys_t = extended_keys.transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, d + 1, K]
    best = torch.full((batch, kv_heads, key.shape[-2]), -math.inf, device=key.device)
    for start in range(0, length, chunk):
        log_probabilities = torch.matmul(extended_queries[:, :, :, start : start + chunk], keys_t)
        best = torch.maximum(best, log_probabilities.amax(dim=(2, 3)))
    return best.exp()


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Pool [..., L] scores along the last dim: kernel `kernel_size` (odd), stride 1, zero padding
    (SnapKV's ``avg_pool1d`` / ``max_pool1d``; average pooling counts the padding, as PyTorch does)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    shape = scores.shape
    flat = scores.float().reshape(-1, 1, shape[-1])
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(flat, kernel_size, stride=1, padding=kernel_size // 2).reshape(shape)


def pool_finite_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """`pool_scores` of non-negative scores whose always-kept tokens (the sources' sinks) are +inf:
    those stay +inf and pool as 0 for their neighbours, so that nearness to a sink ranks no token."""
    always = scores.isposinf()
    return pool_scores(scores.masked_fill(always, 0.0), kernel_size, pooling).masked_fill(always, float("inf"))


def pooled_window_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, window: int = WINDOW, kernel_size: int = POOL_KERNEL,
    pooling: str = "avg", chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """SnapKV's score for every key: attention from the last `window` queries, summed, pooled over
    `kernel_size` neighbouring keys. [B, Hkv, T] float32 (the window's own keys pooled like the rest)."""
    return pool_scores(window_attention(query, key, scaling, window, chunk), kernel_size, pooling)


RotaryTables = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""positions [n] -> (cos, sin), each [n, d] float32, as the model's rotary embedding gives them for
this layer (attention scaling included), in transformers' rotate-half layout."""


def percentile_rank(scores: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T] float32 in (0, 1]: each entry's rank within its row over T (the highest
    is 1; ties in order, the later entry ranking higher, as `top_indices` breaks them)."""
    length = scores.shape[-1]
    order = torch.sort(scores.float(), dim=-1, stable=True).indices  # ascending; among ties the later token last
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(1, length + 1, device=scores.device).expand_as(order))
    return ranks.float() / length


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotated(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: the query states before rotation, from post-RoPE states and their positions' tables.

    query [..., n, d] = q * cos + rotate_half(q) * sin, so q = (query * cos - rotate_half(query) * sin)
    / (cos^2 + sin^2) (the denominator is the square of the rotary attention scaling, 1 for plain RoPE).
    """
    return (query * cos - rotate_half(query) * sin) / (cos.square() + sin.square())


def average_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[d, d]: the mean over positions of RoPE's rotation matrices R_p (x -> x cos_p + rotate_half(x) sin_p)."""
    dim = cos.shape[-1]
    half = dim // 2
    swap = torch.zeros(dim, dim, dtype=cos.dtype, device=cos.device)  # rotate_half as a matrix: P x
    swap[half:, :half] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    swap[:half, half:] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    rotations = cos.unsqueeze(-1) * torch.eye(dim, dtype=cos.dtype, device=cos.device) + sin.unsqueeze(-1) * swap
    return rotations.mean(dim=0)


def expected_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    rotary: RotaryTables,
    *,
    future_positions: int = FUTURE_POSITIONS,
    sink_tokens: int = SINK_TOKENS,
    use_covariance: bool = True,
    query_window: int | None = None,
) -> torch.Tensor:
    """Expected Attention's score (kvpress `ExpectedAttentionPress`, arXiv 2510.00636): [B, Hkv, T] float32.

    The prompt's query states before RoPE (all after the first `sink_tokens`, or the last
    `query_window`) give a Gaussian N(mu, Sigma) per query head; rotating it by the mean RoPE
    rotation R over the next `future_positions` positions models a future query, and for key k
    E[exp(s q.k)] = exp(s (R mu).k + s^2 k^T (R Sigma R^T) k / 2), s the attention scaling. The score
    is the softmax of that exponent over the keys after the sinks, averaged over the query heads of
    each KV head; the first `sink_tokens` keys get +inf (always kept), as kvpress pads them with the
    maximum. Value norms are not applied here (the method does that).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    sinks = min(sink_tokens, length - 1)
    first = sinks if query_window is None else max(sinks, length - query_window)
    positions = torch.arange(first, length, device=query.device)
    cos, sin = rotary(positions)
    prerope = unrotated(query[:, :, first:].float(), cos.float(), sin.float())  # [B, Hq, n, d]
    mean = prerope.mean(dim=2)  # [B, Hq, d]
    future_cos, future_sin = rotary(torch.arange(length, length + future_positions, device=query.device))
    rotation = average_rotation(future_cos.float(), future_sin.float())  # [d, d]
    mean = mean @ rotation.T
    keys = key[:, :, sinks:].float().repeat_interleave(q_heads // kv_heads, dim=1)  # [B, Hq, T', d]
    exponent = scaling * (keys @ mean.unsqueeze(-1)).squeeze(-1)  # [B, Hq, T']
    if use_covariance:
        centred = prerope - prerope.mean(dim=2, keepdim=True)
        covariance = centred.transpose(-1, -2) @ centred / prerope.shape[2]  # [B, Hq, d, d]
        covariance = rotation @ covariance @ rotation.T
        exponent = exponent + 0.5 * scaling**2 * ((keys @ covariance) * keys).sum(dim=-1)
    probabilities = torch.softmax(exponent, dim=-1).view(batch, kv_heads, q_heads // kv_heads, -1).mean(dim=2)
    return F.pad(probabilities, (sinks, 0), value=math.inf)


def new_query_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the newest queries over every stored slot, during generation.

    query: [B, Hq, n, d], the last n tokens, whose keys are the last n of key: [B, Hkv, N, d];
    bias: [B, Hkv, N] additive logits or None. Returns (summed over the n queries, of the last
    query alone), each [B, Hkv, N] float32 averaged over the query heads of each KV head.
    """
    batch, q_heads, new, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    grouped = (query.float() * scaling).view(batch, kv_heads, group, new, dim)
    logits = torch.matmul(grouped, key.float().transpose(-1, -2).unsqueeze(2))  # [B, Hkv, g, n, N]
    if bias is not None:
        logits = logits + bias.float()[:, :, None, None, :]
    future = torch.arange(length, device=key.device) > torch.arange(length - new, length, device=key.device)[:, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probs.sum(dim=3).mean(dim=2), probs[:, :, :, -1].mean(dim=2)


@dataclass
class ScoreContext:
    """What some score sources need beyond one layer's states, shared by the layers of one prompt.

    `rotary(layer_idx)` gives that layer's rotary tables (the expected source); `reconstruction`
    is KVzip's repeat pass over the whole prompt, run once on first request (engine.reconstruction).
    """

    rotary: Callable[[int], RotaryTables] | None = None
    reconstruction: Reconstruction | None = None


class LayerScores:
    """The statistics a method may ask about one layer, computed on first request and kept.

    Built from the layer's query states [B, Hq, T, d] and key states [B, Hkv, T, d] (post-RoPE, as
    the attention saw them), so that several methods compressing the same prefill share the work.
    `lse` [B, Hq, T], the prefill attention's log-normalisers where the engine could keep them,
    lets the aggregated attention take the fused path (`aggregated_attention_from_lse`).
    `context` (shared by the prompt's layers, with `layer_idx`) serves the expected and
    reconstruction sources.
    """

    def __init__(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor,
        scaling: float,
        chunk: int = DEFAULT_CHUNK,
        lse: torch.Tensor | None = None,
        *,
        layer_idx: int = 0,
        context: ScoreContext | None = None,
    ) -> None:
        if query is not None and query.shape[1] % key.shape[1]:
            raise ValueError(f"{query.shape[1]} query heads do not group evenly over {key.shape[1]} KV heads")
        if lse is not None and (query is None or lse.shape != query.shape[:3]):
            raise ValueError(f"lse must be [batch, query heads, tokens] like the query states, got {tuple(lse.shape)}")
        self.query = query
        self.key = key
        self.scaling = scaling
        self.chunk = chunk
        self.lse = lse
        self.layer_idx = layer_idx
        self.context = context if context is not None else ScoreContext()
        self._memo: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0  # time spent computing statistics, for the reports

    def fresh(self) -> LayerScores:
        """The same inputs with nothing computed yet (to time a method's own scoring)."""
        return LayerScores(
            self.query, self.key, self.scaling, self.chunk, self.lse, layer_idx=self.layer_idx, context=self.context
        )

    @property
    def uses_fused_path(self) -> bool:
        """Whether `aggregated_attention()` takes the fused flash pass rather than the chunked one."""
        return (
            self.lse is not None  # only ever given with the query states (checked in __init__)
            and self.key.shape[-2] >= FUSED_FROM_TOKENS
            and kernels.available(self.key.device, self.key.dtype)
        )

    @classmethod
    def precomputed(
        cls,
        key: torch.Tensor,
        aggregated: torch.Tensor | None = None,
        windows: dict[int, torch.Tensor] | None = None,
        reconstruction: torch.Tensor | None = None,
    ) -> LayerScores:
        """Statistics given from outside (tests, analyses); asking for any other raises."""
        scores = cls(None, key, 1.0)
        if aggregated is not None:
            scores._memo[("aggregated",)] = aggregated
        for window, values in (windows or {}).items():
            scores._memo[("window", window)] = values
        if reconstruction is not None:
            scores._memo[("reconstruction",)] = reconstruction
        return scores

    def _memoised(self, name: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if name not in self._memo:
            if self.query is None:
                raise ValueError(f"these scores were given precomputed and do not include {name[0]!r}")
            start = time.perf_counter()
            self._memo[name] = compute()
            _synchronize(self.key.device)
            self.seconds += time.perf_counter() - start
        return self._memo[name]

    def aggregated_attention(self, statistic: str = "exact", stride: int = ESTIMATE_STRIDE) -> torch.Tensor:
        """[B, Hkv, T]: attention each key received, summed over all prompt queries.

        `statistic="exact"`: every query (the fused or the chunked pass); `"estimated"`:
        `aggregated_attention_estimated` sampling every `stride`-th far query row, which needs the prefill's
        log-normalisers and falls back to the exact pass where the engine could not keep them (masked
        or sliding-window prefills, devices other than the CPU, see `kernels.available`).
        """
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if statistic == "estimated" and self.lse is not None:
            return self._memoised(
                ("aggregated", "estimated", stride),
                lambda: aggregated_attention_estimated(
                    self.query, self.key, self.scaling, self.lse, stride=stride, band=ESTIMATE_BAND,
                    last=ESTIMATE_LAST, chunk=self.chunk,
                ),
            )
        if self.uses_fused_path:
            compute = lambda: aggregated_attention_from_lse(self.query, self.key, self.lse, self.scaling)  # noqa: E731
        else:
            compute = lambda: aggregated_attention(self.query, self.key, self.scaling, self.chunk)  # noqa: E731
        return self._memoised(("aggregated",), compute)

    def window_attention(self, window: int) -> torch.Tensor:
        """[B, Hkv, T]: attention each key received from the last `window` queries, summed."""
        return self._memoised(
            ("window", window), lambda: window_attention(self.query, self.key, self.scaling, window, self.chunk)
        )

    def pooled_window_attention(
        self, window: int = WINDOW, kernel_size: int = POOL_KERNEL, pooling: str = POOLING
    ) -> torch.Tensor:
        """[B, Hkv, T]: SnapKV's score, the window's attention pooled over neighbouring keys (the
        pooling, O(T), is redone on each call; the window's attention is kept)."""
        return pool_scores(self.window_attention(window), kernel_size, pooling)

    def expected_attention(
        self,
        future_positions: int = FUTURE_POSITIONS,
        sink_tokens: int = SINK_TOKENS,
        use_covariance: bool = True,
        query_window: int | None = None,
    ) -> torch.Tensor:
        """[B, Hkv, T]: Expected Attention's score (`expected_attention`); the sinks get +inf."""
        if self.context.rotary is None and self.query is not None:
            raise ValueError(
                "the expected-attention score needs the model's rotary embedding; compress through the engine "
                "(compress, record_prefill), which provides it"
            )

        def compute() -> torch.Tensor:
            rotary = self.context.rotary(self.layer_idx)
            return expected_attention(
                self.query, self.key, self.scaling, rotary, future_positions=future_positions,
                sink_tokens=sink_tokens, use_covariance=use_covariance, query_window=query_window,
            )

        return self._memoised(("expected", future_positions, sink_tokens, use_covariance, query_window), compute)

    def reconstruction_attention(self) -> torch.Tensor:
        """[B, Hkv, T]: KVzip's score, the largest attention each key receives while the model repeats
        the prompt (engine.reconstruction); the sinks get +inf."""
        reconstruction = self._reconstruction()
        return self._memoised(("reconstruction",), lambda: reconstruction.scores(self.layer_idx))

    def reconstruction_queries(self) -> torch.Tensor:
        """[B, Hq, R, d]: query states of the reconstruction pass at R sampled positions (post-RoPE,
        scaled like the prompt's); each saw the whole prompt."""
        reconstruction = self._reconstruction()
        return self._memoised(("reconstruction queries",), lambda: reconstruction.queries(self.layer_idx))

    def _reconstruction(self) -> Reconstruction:
        if self.context.reconstruction is None:
            if self.query is None:
                raise ValueError("these scores were given precomputed and do not include 'reconstruction'")
            raise ValueError(
                "the reconstruction score needs a second pass of the model over the prompt; compress through the "
                "engine (compress, record_prefill), which runs it"
            )
        return self.context.reconstruction

    def source(
        self,
        name: str,
        statistic: str = "exact",
        *,
        window_kernel: int = POOL_KERNEL,
        window_pooling: str = POOLING,
        score_kernel: int = 1,
        score_pooling: str = "max",
    ) -> torch.Tensor:
        """[B, Hkv, T]: the score source `name` (one of SCORE_SOURCES) with its papers' defaults
        (`statistic`: how the aggregated attention is computed; `window_kernel` and `window_pooling`:
        how the window's attention is pooled over neighbouring keys, SnapKV's kernel 5 average by
        default; `score_kernel` and `score_pooling`: the same for the other sources, which their
        papers do not pool, kernel 1).

        Sources joined by "+" ("aggregated+window") are combined by rank: each token's score is its
        highest percentile rank (within its row) in any of them, so the top-k of the combination
        holds what either source ranks high (the union of their top tokens)."""
        if "+" in name:
            pooled = {
                "window_kernel": window_kernel, "window_pooling": window_pooling,
                "score_kernel": score_kernel, "score_pooling": score_pooling,
            }
            parts = [percentile_rank(self.source(part, statistic, **pooled)) for part in name.split("+")]
            return torch.stack(parts).amax(0)
        if name == "window":
            return self.pooled_window_attention(kernel_size=window_kernel, pooling=window_pooling)
        if name == "aggregated":
            scores = self.aggregated_attention(statistic)
        elif name == "reconstruction":
            scores = self.reconstruction_attention()
        elif name == "expected":
            scores = self.expected_attention()
        else:
            raise ValueError(f"unknown score source {name!r}; known: {', '.join(SCORE_SOURCES)}")
        return scores if score_kernel == 1 else pool_finite_scores(scores, score_kernel, score_pooling)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
