"""A merge analysis as files: one JSON document with everything, and flat CSV tables.

* ``profile.json``: settings, definitions, adjacent-cosine statistics per layer, merged and slots
  shares per text kind and variant with their persistence numbers, every sample's per-layer (and
  per-head) numbers. NaN (an undefined correlation) is written as null.
* ``merge_share_samples.csv``: kind, sample, variant, layer, merged_share, slots_share.
* ``merge_share_profile.csv``: variant, kind, layer, mean, std, min, max, samples.
* ``adjacent_cosine.csv``: tensor (keys / values), layer, mean, std, p05, p25, p50, p75, p95, share_above_eps.
* ``correlations.csv``: variant, kind_a, kind_b, pearson, mean_abs_difference.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kvmerger.analysis.merge_profile import (
    VARIANTS,
    CosineDistribution,
    MergeProfile,
    Persistence,
    key_value_contrast,
    persistence,
)

COLUMNS = {
    "merge_share_samples.csv": ["kind", "sample", "variant", "layer", "merged_share", "slots_share"],
    "merge_share_profile.csv": ["variant", "kind", "layer", "mean", "std", "min", "max", "samples"],
    "adjacent_cosine.csv": ["tensor", "layer", "mean", "std", "p05", "p25", "p50", "p75", "p95", "share_above_eps"],
    "correlations.csv": ["variant", "kind_a", "kind_b", "pearson", "mean_abs_difference"],
}
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
DEFINITIONS = {
    "adjacent_cosine": "cos(x_t, x_t+1) of post-RoPE keys (or values), over every adjacent pair, KV head and sample",
    "merged_share": "tokens that KVMerger.identify (mode paper, threshold eps) puts in a merging set of more than one "
    "token, over all T tokens of the prompt, per KV head, averaged over KV heads",
    "slots_share": "merging sets (cache slots) over T, per KV head, averaged over KV heads",
    "no protection": "recent_ratio = topk_ratio = 0: every adjacent pair with cosine above eps merges",
    "paper protection": "the paper's protected fractions at the given budget (recent tokens and top-k by aggregated "
    "attention never merge and break chains); protected tokens stay in the denominator",
    "std": "standard deviation over the samples of a kind, ddof=1",
    "between_kinds": "Pearson correlation of the per-layer mean profiles of two text kinds",
    "within_kind": "mean Pearson correlation over pairs of samples of one kind",
    "layer_variance_share": "eta squared: variance share of the per-sample, per-layer values explained by the layer",
}


def write_records(profile: MergeProfile, folder: Path) -> list[Path]:
    """Write profile.json and the CSV tables into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "profile.json"]
    paths[0].write_text(json.dumps(_clean(profile_document(profile)), indent=1), encoding="utf-8")
    tables = {
        "merge_share_samples.csv": _sample_rows(profile),
        "merge_share_profile.csv": _profile_rows(profile),
        "adjacent_cosine.csv": _cosine_rows(profile),
        "correlations.csv": _correlation_rows(profile),
    }
    for name, rows in tables.items():
        path = folder / name
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS[name])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths


def profile_document(profile: MergeProfile) -> dict[str, Any]:
    return {
        "model": profile.model,
        "settings": profile.settings,
        "num_layers": profile.num_layers,
        "layer_ids": profile.layer_ids,
        "num_kv_heads": profile.num_kv_heads,
        "kinds": profile.kinds,
        "definitions": DEFINITIONS,
        "key_value_contrast": key_value_contrast(profile),
        "adjacent_cosine": {
            "keys": cosine_document(profile.key_cosine),
            "values": cosine_document(profile.value_cosine),
        },
        "merged_share": {v: persistence_document(persistence(profile, v, "merged_share")) for v in VARIANTS},
        "slots_share": {v: persistence_document(persistence(profile, v, "slots_share")) for v in VARIANTS},
        "heatmaps": [
            {
                "layer": h.layer,
                "head": h.head,
                "start": h.start,
                "window": h.keys.shape[0],
                "keys_adjacent_mean": float(h.keys.diagonal(1).mean()),
                "values_adjacent_mean": float(h.values.diagonal(1).mean()),
            }
            for h in profile.heatmaps
        ],
        "samples": [asdict(sample) for sample in profile.samples],
    }


def cosine_document(distribution: CosineDistribution) -> dict[str, list[float]]:
    document = {"mean": distribution.mean(), "std": distribution.std()}
    document.update({name: distribution.quantile(q) for name, q in QUANTILES.items()})
    document["share_above_eps"] = distribution.share_above_eps()
    return {name: [float(x) for x in values] for name, values in document.items()}


def persistence_document(stats: Persistence) -> dict[str, Any]:
    return {
        "by_kind": {
            kind: {
                "mean": s.mean.tolist(),
                "std": s.std.tolist(),
                "min": s.low.tolist(),
                "max": s.high.tolist(),
                "samples": s.samples,
                "mean_over_layers": float(s.mean.mean()),
            }
            for kind, s in stats.by_kind.items()
        },
        "between_kinds": [
            {"kind_a": a, "kind_b": b, "pearson": r, "mean_abs_difference": stats.level_difference[(a, b)]}
            for (a, b), r in stats.between_kinds.items()
        ],
        "within_kind": stats.within_kind,
        "layer_variance_share": stats.layer_variance_share,
        "mean_spread": stats.mean_spread,
    }


def _sample_rows(profile: MergeProfile) -> list[dict[str, Any]]:
    return [
        {
            "kind": s.kind,
            "sample": s.index,
            "variant": variant,
            "layer": profile.layer_ids[layer],
            "merged_share": s.merged_share[variant][layer],
            "slots_share": s.slots_share[variant][layer],
        }
        for s in profile.samples
        for variant in VARIANTS
        for layer in range(profile.num_layers)
    ]


def _profile_rows(profile: MergeProfile) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        for kind, s in persistence(profile, variant).by_kind.items():
            for layer in range(profile.num_layers):
                rows.append(
                    {
                        "variant": variant,
                        "kind": kind,
                        "layer": profile.layer_ids[layer],
                        "mean": s.mean[layer],
                        "std": s.std[layer],
                        "min": s.low[layer],
                        "max": s.high[layer],
                        "samples": s.samples,
                    }
                )
    return rows


def _cosine_rows(profile: MergeProfile) -> list[dict[str, Any]]:
    rows = []
    for tensor, distribution in (("keys", profile.key_cosine), ("values", profile.value_cosine)):
        document = cosine_document(distribution)
        for layer in range(profile.num_layers):
            per_layer = {name: values[layer] for name, values in document.items()}
            rows.append({"tensor": tensor, "layer": profile.layer_ids[layer], **per_layer})
    return rows


def _correlation_rows(profile: MergeProfile) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        stats = persistence(profile, variant)
        for (a, b), r in stats.between_kinds.items():
            difference = stats.level_difference[(a, b)]
            rows.append({"variant": variant, "kind_a": a, "kind_b": b, "pearson": r, "mean_abs_difference": difference})
    return rows  # empty (header only) for a single text kind


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars and arrays -> Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
