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
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvmerger.engine import kernels

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


def window_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, window: int, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Attention each key received from the last `window` queries, summed over them. [B, Hkv, T].

    SnapKV's observation window; TOVA's last query with window=1.
    """
    return attention_column_sums(query, key, scaling, max(0, query.shape[-2] - window), chunk)


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


class LayerScores:
    """The statistics a method may ask about one layer, computed on first request and kept.

    Built from the layer's query states [B, Hq, T, d] and key states [B, Hkv, T, d] (post-RoPE, as
    the attention saw them), so that several methods compressing the same prefill share the work.
    `lse` [B, Hq, T], the prefill attention's log-normalisers where the engine could keep them,
    lets the aggregated attention take the fused path (`aggregated_attention_from_lse`).
    """

    def __init__(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor,
        scaling: float,
        chunk: int = DEFAULT_CHUNK,
        lse: torch.Tensor | None = None,
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
        self._memo: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0  # time spent computing statistics, for the reports

    def fresh(self) -> LayerScores:
        """The same inputs with nothing computed yet (to time a method's own scoring)."""
        return LayerScores(self.query, self.key, self.scaling, self.chunk, self.lse)

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
    ) -> LayerScores:
        """Statistics given from outside (tests, analyses); asking for any other raises."""
        scores = cls(None, key, 1.0)
        if aggregated is not None:
            scores._memo[("aggregated",)] = aggregated
        for window, values in (windows or {}).items():
            scores._memo[("window", window)] = values
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

    def aggregated_attention(self) -> torch.Tensor:
        """[B, Hkv, T]: attention each key received, summed over all prompt queries."""
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
