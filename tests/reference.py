"""Slow, plainly written reference implementations, one row (batch element x KV head) at a time.

Written from docs/METHOD.md with Python loops over tokens and float64 arithmetic, to check the
vectorised methods in kvmerger.methods against.
"""

from __future__ import annotations

import math

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(np.dot(a, b) / (norm_a * norm_b))


def later_first_ranking(scores: list[float]) -> list[int]:
    """Indices by descending score; among equal scores the later index first."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], -i))


def kvmerger_row(
    keys: np.ndarray,
    values: np.ndarray,
    attention: np.ndarray,
    *,
    slots: int,
    mode: str,
    eps: float,
    n_recent: int,
    n_topk: int,
    sigma: float | None,
    scale_values: bool,
    sigma_floor: float = 1e-6,
    max_set_size: int | None = None,
) -> dict:
    """KVMerger on one row: keys [T, d], values [T, dv], attention [T] -> merged slots in order."""
    length = len(keys)
    keys = keys.astype(np.float64)
    values = values.astype(np.float64)

    # 1. protected tokens (exact mode: as many of the top-k as leave every unprotected run a slot)
    recent = set(range(length - n_recent, length))
    others = [t for t in range(length) if t not in recent]
    others.sort(key=lambda t: (-float(attention[t]), -t))
    for k in range(n_topk, -1, -1):
        protected = recent | set(others[:k])
        runs = sum(1 for t in range(length) if t not in protected and (t == 0 or t - 1 in protected))
        if mode != "exact" or slots >= length or len(protected) + runs <= slots:
            break

    # 2. merging sets: pairs (t, t+1) of unprotected neighbours
    similarity = [cosine(keys[t], keys[t + 1]) for t in range(length - 1)]
    eligible = [t for t in range(length - 1) if t not in protected and t + 1 not in protected]
    count = max(0, length - slots)
    ranked = sorted(eligible, key=lambda t: (-similarity[t], -t))
    if mode == "paper":
        merged_pairs = {t for t in eligible if similarity[t] > eps}
        if max_set_size is not None:
            merged_pairs = cut_runs_row(merged_pairs, max_set_size)
    elif max_set_size is None:
        merged_pairs = set(ranked[:count])
    else:  # the fewest most-similar pairs that leave `count` merged after the cut, else no cap
        merged_pairs = set(ranked[:count])
        for taken in range(len(ranked) + 1):
            cut = cut_runs_row(set(ranked[:taken]), max_set_size)
            if len(cut) == count:
                merged_pairs = cut
                break
    # Algorithm 1: scan from the last token backwards, growing the current set while pairs merge
    sets: list[list[int]] = []
    current = [length - 1]
    for t in range(length - 2, -1, -1):
        if t in merged_pairs:
            current.insert(0, t)
        else:
            sets.insert(0, current)
            current = [t]
    sets.insert(0, current)

    # 3. Gaussian-kernel merge
    row_scale = max(np.abs(keys).max(), 1e-30)
    merged_keys, merged_values, pivots, sizes = [], [], [], []
    for members in sets:
        pivot = max(members, key=lambda i: (float(attention[i]), i))
        distances = [float(np.linalg.norm(keys[i] - keys[pivot])) for i in members]
        if sigma is None:
            width = max(sum(distances) / len(members) / math.sqrt(2.0), sigma_floor * row_scale)
        else:
            width = sigma
        kernel = [math.exp(-(d * d) / (2 * width * width)) for d in distances]
        weights = [g / sum(kernel) for g in kernel]
        key = sum(w * keys[i] for w, i in zip(weights, members))
        value = sum(w * values[i] for w, i in zip(weights, members))
        if scale_values:
            value = value * len(members)
        merged_keys.append(key)
        merged_values.append(value)
        pivots.append(pivot)
        sizes.append(len(members))
    return {
        "keys": np.array(merged_keys),
        "values": np.array(merged_values),
        "pivots": pivots,
        "sizes": sizes,
        "similarity": similarity,
        "eligible": eligible,
        "merged_pairs": merged_pairs,
    }


def kvmerger_hold_row(
    keys: np.ndarray,
    values: np.ndarray,
    accumulated: np.ndarray,
    sizes: np.ndarray,
    *,
    target: int,
    n_recent: int,
    n_topk: int,
    sigma: float | None,
    sigma_floor: float = 1e-6,
) -> dict:
    """KVMerger's generation-time rule on one row of slots: merge the most similar adjacent pairs
    of unprotected slots until `target` remain; kernel weights times each slot's token count."""
    length = len(keys)
    keys = keys.astype(np.float64)
    values = values.astype(np.float64)
    protected = set(range(length - n_recent, length))
    others = [t for t in range(length) if t not in protected]
    others.sort(key=lambda t: (-float(accumulated[t]), -t))
    protected |= set(others[:n_topk])
    similarity = [cosine(keys[t], keys[t + 1]) for t in range(length - 1)]
    eligible = [t for t in range(length - 1) if t not in protected and t + 1 not in protected]
    ranked = sorted(eligible, key=lambda t: (-similarity[t], -t))
    merged_pairs = set(ranked[: length - target])
    sets, current = [], [0]
    for t in range(1, length):
        if t - 1 in merged_pairs:
            current.append(t)
        else:
            sets.append(current)
            current = [t]
    sets.append(current)
    row_scale = max(np.abs(keys).max(), 1e-30)
    out = {"keys": [], "values": [], "pivots": [], "sizes": [], "accumulated": []}
    for members in sets:
        pivot = max(members, key=lambda i: (float(accumulated[i]), i))
        distances = [float(np.linalg.norm(keys[i] - keys[pivot])) for i in members]
        if sigma is None:
            width = max(sum(distances) / len(members) / math.sqrt(2.0), sigma_floor * row_scale)
        else:
            width = sigma
        kernel = [math.exp(-(d * d) / (2 * width * width)) * int(sizes[i]) for d, i in zip(distances, members)]
        weights = [g / sum(kernel) for g in kernel]
        out["keys"].append(sum(w * keys[i] for w, i in zip(weights, members)))
        out["values"].append(sum(w * values[i] for w, i in zip(weights, members)))
        out["pivots"].append(pivot)
        out["sizes"].append(int(sum(int(sizes[i]) for i in members)))
        out["accumulated"].append(float(sum(float(accumulated[i]) for i in members)))
    out["keys"], out["values"] = np.array(out["keys"]), np.array(out["values"])
    out["similarity"], out["eligible"] = similarity, eligible
    return out


def cut_runs_row(merged_pairs: set[int], cap: int) -> set[int]:
    """Pairs (t, t+1) left merged when each run is cut, from its first token on, into pieces of at
    most `cap` tokens: walking a run, the pair that would make the current piece cap + 1 long is dropped."""
    kept, piece = set(), 1
    for t in range(max(merged_pairs, default=-1) + 1):
        if t not in merged_pairs:
            piece = 1
        elif piece < cap:
            kept.add(t)
            piece += 1
        else:
            piece = 1  # the pair is cut: token t + 1 starts a new piece
    return kept


def ambiguous_order(sims64: list[float], sims32: list[float], eligible: list[int]) -> bool:
    """Whether the order of the eligible pairs by similarity may legitimately differ between the
    float32 implementation and this float64 reference (any two within 1e-5 that are not exact ties
    in both precisions)."""
    ordered = sorted(eligible, key=lambda t: sims64[t])
    return any(
        abs(sims64[a] - sims64[b]) < 1e-5 and (sims64[a] != sims64[b] or float(sims32[a]) != float(sims32[b]))
        for a, b in zip(ordered, ordered[1:])
    )


def ambiguous_selection(sims64: list[float], sims32: list[float], eligible: list[int], count: int) -> bool:
    """Whether picking the `count` most similar eligible pairs may legitimately differ between the
    float32 implementation and this float64 reference: several pairs within 1e-5 of the boundary
    that are not exact ties in both precisions (exact ties are broken the same way by both)."""
    if not 0 < count < len(eligible):
        return False
    boundary = sorted((sims64[t] for t in eligible), reverse=True)[count - 1]
    near = [t for t in eligible if abs(sims64[t] - boundary) < 1e-5]
    if len(near) <= 1:
        return False
    return len({sims64[t] for t in near}) > 1 or len({float(sims32[t]) for t in near}) > 1
