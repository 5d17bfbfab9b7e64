"""Slow, plainly written references for the baselines, one row (batch element x KV head) at a time.

Written from the methods' papers and docs/METHOD.md section 4 with Python loops over tokens and
float64 arithmetic, to check the vectorised methods in kvmerger.methods against. Every ranking breaks
ties toward the later token, as `kvmerger.methods.base.top_indices` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def best_first(scores: Sequence[float]) -> list[int]:
    """Indices by descending score; among equal scores the later index first."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), -i))


def keep_best(scores: Sequence[float], count: int) -> list[int]:
    """The `count` best indices by `best_first`, in increasing order."""
    return sorted(best_first(scores)[:count])


# --------------------------------------------------------------------------------------------
# Attention statistics from raw query and key states
# --------------------------------------------------------------------------------------------


def attention_received(query: np.ndarray, key: np.ndarray, scaling: float, first_query: int) -> list[list[float]]:
    """Per KV head, the causal softmax attention each key received from queries first_query..T-1.

    query: [Hq, T, d], key: [Hkv, T, d]; summed over those queries, averaged over the query heads of
    each KV head (head h of the queries uses KV head h // (Hq / Hkv)).
    """
    q_heads, length, _ = query.shape
    kv_heads = key.shape[0]
    group = q_heads // kv_heads
    totals = [[0.0] * length for _ in range(kv_heads)]
    for head in range(q_heads):
        kv = head // group
        for t in range(first_query, length):
            logits = [float(np.dot(query[head, t], key[kv, s])) * scaling for s in range(t + 1)]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            norm = sum(weights)
            for s in range(t + 1):
                totals[kv][s] += weights[s] / norm / group
    return totals


# --------------------------------------------------------------------------------------------
# Prefill selections
# --------------------------------------------------------------------------------------------


def h2o_row(attention: Sequence[float], slots: int, recent: int) -> list[int]:
    """H2O: the `recent` last tokens, and the `slots - recent` most attended others."""
    length = len(attention)
    window = list(range(length - recent, length))
    older = list(range(length - recent))
    heavy = sorted(older, key=lambda t: (-float(attention[t]), -t))[: slots - recent]
    return sorted(heavy + window)


def streaming_llm_row(length: int, slots: int, n_sink: int) -> list[int]:
    """StreamingLLM: the first sinks (at most slots - 1) and the newest tokens."""
    sinks = max(0, min(n_sink, slots - 1))
    return list(range(sinks)) + list(range(length - (slots - sinks), length))


def pool_row(scores: Sequence[float], kernel: int, pooling: str) -> list[float]:
    """1-D pooling, stride 1, zero padding kernel // 2 (the average counts the padding)."""
    half = kernel // 2
    pooled = []
    for t in range(len(scores)):
        window = [float(scores[s]) if 0 <= s < len(scores) else 0.0 for s in range(t - half, t + half + 1)]
        if pooling == "avg":
            pooled.append(sum(window) / kernel)
        else:
            inside = [float(scores[s]) for s in range(t - half, t + half + 1) if 0 <= s < len(scores)]
            pooled.append(max(inside))
    return pooled


def snapkv_row(window_scores: Sequence[float], slots: int, window: int, kernel: int, pooling: str) -> list[int]:
    """SnapKV: the observation window (newest first if it does not fit) and the best pooled others."""
    length = len(window_scores)
    window = min(window, length)
    recent = list(range(length - window, length))
    if slots <= window:
        return recent[window - slots :]
    pooled = pool_row(list(window_scores[: length - window]), kernel, pooling)
    return sorted(keep_best(pooled, slots - window) + recent)


def tova_rows(last_attention: Sequence[Sequence[float]], slots: int) -> list[int]:
    """TOVA: the best tokens by the newest query's attention averaged over the heads (one list for all)."""
    heads = len(last_attention)
    mean = [sum(float(row[t]) for row in last_attention) / heads for t in range(len(last_attention[0]))]
    return keep_best(mean, slots)


def knorm_row(keys: np.ndarray, slots: int) -> list[int]:
    """K-norm: the keys with the smallest L2 norm."""
    norms = [math.sqrt(sum(float(x) * float(x) for x in key)) for key in keys]
    return keep_best([-n for n in norms], slots)


def random_row(uniforms: Sequence[float], slots: int) -> list[int]:
    """Random eviction: the tokens with the highest uniform draws."""
    return keep_best(uniforms, slots)


def cam_merge_row(
    values: np.ndarray,
    attention: Sequence[float],
    uniforms: Sequence[float],
    evicted: Sequence[int],
    window: int,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """CaM's merge rule, token by token: each evicted token, in sequence order, adds its current value / n
    to each of the n = min(window, T - 1 - i) tokens after it, if u_i < clamp(A_i / mean(A of those), 0, 1).
    With `weights` (the average guard), each follower instead keeps the running weighted mean of its own
    value (weight weights[j]) and every value it received (weight weights[i] / n each).

    Returns every token's value afterwards, [T, d] float64.
    """
    length = len(values)
    merged = np.array(values, dtype=np.float64)
    total = None if weights is None else [float(w) for w in weights]  # weight of each running mean
    for i in sorted(evicted):
        followers = list(range(i + 1, min(i + window, length - 1) + 1))
        if not followers:
            continue
        mean = sum(float(attention[j]) for j in followers) / len(followers)
        if mean > 0:
            probability = min(1.0, max(0.0, float(attention[i]) / mean))
        else:
            probability = 1.0 if float(attention[i]) > 0 else 0.0
        if float(uniforms[i]) < probability:
            share = 1.0 / len(followers)
            for j in followers:
                if total is None:
                    merged[j] = merged[j] + share * merged[i]
                else:
                    incoming = share * float(weights[i])
                    merged[j] = (total[j] * merged[j] + incoming * merged[i]) / (total[j] + incoming)
                    total[j] += incoming
    return merged


def cam_row(
    values: np.ndarray,
    attention: Sequence[float],
    uniforms: Sequence[float],
    *,
    slots: int,
    recent: int,
    window: int,
    average: bool = False,
) -> tuple[list[int], np.ndarray]:
    """CaM at prefill: H2O's kept tokens, and their values after the merges of the evicted ones
    (`average`: the guard, weighted by attention floored at 1e-6 of the largest)."""
    keep = h2o_row(attention, slots, recent)
    evicted = [t for t in range(len(values)) if t not in set(keep)]
    weights = cam_average_weights(attention) if average else None
    merged = cam_merge_row(values, attention, uniforms, evicted, window, weights)
    return keep, merged[keep]


def cam_average_weights(attention: Sequence[float]) -> list[float]:
    floor = 1e-6 * max(max(float(a) for a in attention), 1e-30)
    return [max(float(a), floor) for a in attention]


# --------------------------------------------------------------------------------------------
# Generation-time rules (one row of slots)
# --------------------------------------------------------------------------------------------


def h2o_hold_row(accumulated: Sequence[float], sizes: Sequence[int], target: int, recent: int) -> list[int]:
    """H2O while generating: the `recent` newest slots and the most accumulated attention among the
    others; padding (size 0) last."""
    length = len(accumulated)
    recent = min(recent, target)
    window = list(range(length - recent, length))
    older = list(range(length - recent))
    score = [float("-inf") if sizes[t] == 0 else float(accumulated[t]) for t in range(length)]
    heavy = sorted(older, key=lambda t: (-score[t], -t))[: target - recent]
    return sorted(heavy + window)


def streaming_llm_hold_row(positions: Sequence[int], sizes: Sequence[int], target: int, n_sink: int) -> list[int]:
    """StreamingLLM while generating: slots at sink positions stay, then the newest by position."""
    sinks = max(0, min(n_sink, target - 1))

    def rank(s: int) -> tuple[float, int]:
        if sizes[s] == 0:
            return (float("-inf"), s)
        if 0 <= positions[s] < sinks:
            return (float("inf"), s)
        return (float(positions[s]), s)

    return sorted(sorted(range(len(positions)), key=rank, reverse=True)[:target])


def tova_hold_rows(
    last_attention: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], target: int
) -> list[list[int]]:
    """TOVA while generating: per head, the best slots by the head-averaged newest attention."""
    heads = len(last_attention)
    length = len(last_attention[0])
    mean = [sum(float(row[t]) for row in last_attention) / heads for t in range(length)]
    kept = []
    for head in range(heads):
        ranked = [float("-inf") if sizes[head][t] == 0 else mean[t] for t in range(length)]
        kept.append(keep_best(ranked, target))
    return kept


def knorm_hold_row(keys: np.ndarray, sizes: Sequence[int], target: int) -> list[int]:
    norms = [math.sqrt(sum(float(x) * float(x) for x in key)) for key in keys]
    return keep_best([float("-inf") if sizes[t] == 0 else -norms[t] for t in range(len(keys))], target)


def cam_hold_row(
    values: np.ndarray,
    accumulated: Sequence[float],
    sizes: Sequence[int],
    uniforms: Sequence[float],
    *,
    target: int,
    recent: int,
    window: int,
    average: bool = False,
) -> tuple[list[int], np.ndarray]:
    """CaM while generating: H2O's kept slots; the evicted real slots merge into the next slots first."""
    keep = h2o_hold_row(accumulated, sizes, target, recent)
    evicted = [s for s in range(len(values)) if s not in set(keep) and sizes[s] > 0]
    attention = [0.0 if sizes[s] == 0 else float(accumulated[s]) for s in range(len(values))]
    weights = cam_average_weights(attention) if average else None
    merged = cam_merge_row(values, attention, uniforms, evicted, window, weights)
    return keep, merged[keep]
