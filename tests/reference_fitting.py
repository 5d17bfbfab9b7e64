"""Slow, plainly written references for attention fitting, one row (batch element x KV head) at a time.

Written from the docstrings of kvmerger.methods.attention_matching and fitted_kvmerger with Python
loops and float64 numpy: exhaustive active-set enumeration for box-constrained least squares, normal
equations for the value fit, loops over queries for the full cache's targets.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from tests.reference import kvmerger_row, later_first_ranking

RIDGE_FLOOR = 1e-6


def ridge_lambda(design: np.ndarray, ridge: float) -> float:
    """max(ridge, 1e-6) times the mean eigenvalue of design^T design (trace / number of columns)."""
    return max(ridge, RIDGE_FLOOR) * float((design**2).sum()) / design.shape[1]


def box_least_squares(
    design: np.ndarray, target: np.ndarray, prior: np.ndarray, lam: float, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """argmin ||design w - target||^2 + lam ||w - prior||^2 over lower <= w <= upper, exactly.

    Every variable is at its lower bound, at its upper bound, or free; for each of the 3^S patterns
    solve the free variables by normal equations and keep the feasible candidate with the lowest
    objective (the objective is strictly convex, so its minimiser is one of these candidates).
    """
    slots = design.shape[1]
    best, best_value = None, math.inf
    for pattern in itertools.product("lfu", repeat=slots):
        w = np.where(np.array(pattern) == "l", lower, upper).astype(np.float64)
        free = [i for i, p in enumerate(pattern) if p == "f"]
        if free:
            fixed = [i for i in range(slots) if i not in free]
            rest = target - design[:, fixed] @ w[fixed]
            sub = design[:, free]
            gram = sub.T @ sub + lam * np.eye(len(free))
            w[free] = np.linalg.solve(gram, sub.T @ rest + lam * prior[free])
            if np.any(w[free] < lower[free] - 1e-12) or np.any(w[free] > upper[free] + 1e-12):
                continue
        value = float(((design @ w - target) ** 2).sum() + lam * ((w - prior) ** 2).sum())
        if value < best_value:
            best, best_value = w, value
    return best


def ridge_least_squares(design: np.ndarray, target: np.ndarray, prior: np.ndarray, lam: float) -> np.ndarray:
    """argmin ||design C - target||^2 + lam ||C - prior||^2 by the normal equations (any target shape)."""
    gram = design.T @ design + lam * np.eye(design.shape[1])
    return prior + np.linalg.solve(gram, design.T @ (target - design @ prior))


def targets_row(
    queries: np.ndarray, positions: np.ndarray, keys: np.ndarray, values: np.ndarray, token_from: np.ndarray | None
) -> dict:
    """Per query: shift (max visible logit), mass, output and attention probabilities, by loops."""
    count, length = len(queries), len(keys)
    shift, mass = np.zeros(count), np.zeros(count)
    outputs = np.zeros((count, values.shape[1]))
    probabilities = np.zeros((count, length))
    for r in range(count):
        seen = [t for t in range(length) if token_from is None or token_from[t] <= positions[r]]
        if not seen:
            continue
        logits = {t: float(queries[r] @ keys[t]) for t in seen}
        shift[r] = max(logits.values())
        exps = {t: math.exp(logits[t] - shift[r]) for t in seen}
        mass[r] = sum(exps.values())
        for t in seen:
            probabilities[r, t] = exps[t] / mass[r]
            outputs[r] += probabilities[r, t] * values[t]
    return {"shift": shift, "mass": mass, "outputs": outputs, "probabilities": probabilities}


def features_row(
    queries: np.ndarray, positions: np.ndarray, slot_keys: np.ndarray, shift: np.ndarray, slot_from: np.ndarray | None
) -> np.ndarray:
    features = np.zeros((len(queries), len(slot_keys)))
    for r in range(len(queries)):
        for s in range(len(slot_keys)):
            if slot_from is None or slot_from[s] <= positions[r]:
                features[r, s] = math.exp(float(queries[r] @ slot_keys[s]) - shift[r])
    return features


def fit_row(
    features: np.ndarray,
    targets: dict,
    prior_weights: np.ndarray,
    prior_values: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    bias_ridge: float,
    ridge: float,
    relative: bool,
    fit_slots: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact box-constrained weights, then ridge values, for one row.

    `fit_slots`: "all" solves for every slot; "merged" only for the merged sets (prior weight > 1),
    every other slot keeping its weight and value, its part of each query's mass and output taken off
    the targets; "merged-values" solves for every weight but only the merged sets' values."""
    fitted = [s for s in range(len(prior_weights)) if fit_slots == "all" or prior_weights[s] > 1]
    pinned = [s for s in range(len(prior_weights)) if s not in fitted]
    weight_columns = fitted if fit_slots == "merged" else list(range(len(prior_weights)))
    design, target = features.copy(), targets["mass"].copy()
    for r in range(len(target)):
        if fit_slots == "merged":
            target[r] -= sum(features[r, s] * prior_weights[s] for s in pinned)
        if relative:
            scale = 1.0 / targets["mass"][r] if targets["mass"][r] > 0 else 0.0
            design[r] *= scale
            target[r] *= scale
    weights, values = prior_weights.copy(), prior_values.copy()
    if weight_columns:
        sub = design[:, weight_columns]
        weights[weight_columns] = box_least_squares(
            sub, target, prior_weights[weight_columns], ridge_lambda(sub, bias_ridge), lower[weight_columns],
            upper[weight_columns],
        )
    attention = np.zeros_like(features)
    for r in range(len(features)):
        total = float((features[r] * weights).sum())
        if total > 0:
            attention[r] = features[r] * weights / total
    if fitted:
        rest = targets["outputs"] - attention[:, pinned] @ prior_values[pinned]
        sub = attention[:, fitted]
        values[fitted] = ridge_least_squares(sub, rest, prior_values[fitted], ridge_lambda(sub, ridge))
    return weights, values


def attention_matching_row(
    keys: np.ndarray,
    values: np.ndarray,
    queries: np.ndarray,
    positions: np.ndarray,
    *,
    slots: int,
    causal: bool,
    bias_bound: float,
    bias_ridge: float,
    ridge: float,
) -> dict:
    """AM-HighestAttnKeys on one row, with the exact box-constrained bias fit."""
    keys, values, queries = keys.astype(np.float64), values.astype(np.float64), queries.astype(np.float64)
    scale = max(float(np.abs(values).max()), 1e-30)
    token_from = np.arange(len(keys)) if causal else None
    targets = targets_row(queries, positions, keys, values / scale, token_from)
    rms = [math.sqrt(float((targets["probabilities"][:, t] ** 2).mean())) for t in range(len(keys))]
    kept = sorted(later_first_ranking(rms)[:slots])
    features = features_row(queries, positions, keys[kept], targets["shift"], np.array(kept) if causal else None)
    ones = np.ones(slots)
    weights, fitted = fit_row(
        features, targets, ones, values[kept] / scale, ones * math.exp(-bias_bound), ones * math.exp(bias_bound),
        bias_ridge=bias_ridge, ridge=ridge, relative=False,
    )
    return {"kept": kept, "keys": keys[kept], "bias": np.log(weights), "values": fitted * scale}


def fitted_kvmerger_row(
    keys: np.ndarray,
    values: np.ndarray,
    attention: np.ndarray,
    queries: np.ndarray,
    positions: np.ndarray,
    *,
    slots: int,
    n_recent: int,
    n_topk: int,
    sigma: float | None,
    slot_keys: str,
    causal: bool,
    bias_range: float,
    bias_ridge: float,
    ridge: float,
    fit_slots: str = "all",
) -> dict:
    """KVMerger's sets (tests.reference.kvmerger_row), then the exact fit (`fit_row`, with `fit_slots`),
    for one row."""
    merged = kvmerger_row(
        keys, values, attention, slots=slots, mode="exact", eps=0.75, n_recent=n_recent, n_topk=n_topk,
        sigma=sigma, scale_values=False,
    )
    keys, values, queries = keys.astype(np.float64), values.astype(np.float64), queries.astype(np.float64)
    sets, current = [], [0]
    for t in range(1, len(keys)):
        if t - 1 in merged["merged_pairs"]:
            current.append(t)
        else:
            sets.append(current)
            current = [t]
    sets.append(current)
    set_end = np.array([members[-1] for members in sets])
    token_from = np.array([members[-1] for members in sets for _ in members])
    slot_keys_array = merged["keys"] if slot_keys == "merged" else keys[merged["pivots"]]
    scale = max(float(np.abs(values).max()), 1e-30)
    targets = targets_row(queries, positions, keys, values / scale, token_from if causal else None)
    features = features_row(queries, positions, slot_keys_array, targets["shift"], set_end if causal else None)
    sizes = np.array(merged["sizes"], dtype=np.float64)
    weights, fitted = fit_row(
        features, targets, sizes, merged["values"] / scale, sizes * math.exp(-bias_range), sizes * math.exp(bias_range),
        bias_ridge=bias_ridge, ridge=ridge, relative=True, fit_slots=fit_slots,
    )
    return {
        "keys": slot_keys_array,
        "bias": np.log(weights),
        "values": fitted * scale,
        "pivots": merged["pivots"],
        "sizes": merged["sizes"],
    }
