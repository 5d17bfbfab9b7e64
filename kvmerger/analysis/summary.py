"""A short Markdown summary of a merge analysis: the paper's two observations in numbers, then a
per-layer table. The definitions of every number are in kvmerger/analysis/merge_profile.py."""

from __future__ import annotations

import math

import numpy as np

from kvmerger.analysis.merge_profile import VARIANTS, MergeProfile, Persistence, key_value_contrast, persistence

SATURATED = 0.95  # a layer where every sample merges this share leaves the profile little room to differ
FIGURES = ("overview.png", "heatmaps.png", "adjacent_cosine.png", "merge_share.png")


def summary_markdown(profile: MergeProfile) -> str:
    settings = profile.settings
    stats = {variant: persistence(profile, variant) for variant in VARIANTS}
    counts = ", ".join(f"{kind} x{n}" for kind, n in settings["samples_per_kind"].items())
    protection = settings["protection"]
    lines = [
        f"# Where {profile.model} says to merge",
        "",
        f"{len(profile.samples)} samples of {'/'.join(map(str, settings['tokens']))} tokens ({counts}); "
        f"{_layers_text(profile)}, {profile.num_kv_heads} KV heads. Merging sets from `KVMerger.identify` "
        f"(mode paper, eps = {settings['eps']:g}). *Merged share*: tokens in a merging set of more than one token, "
        "over all tokens, per KV head, averaged over heads. *No protection*: every adjacent pair above eps merges. "
        f"*Paper protection* (budget {settings['budget_for_protection']:g}): the {protection['recent_ratio']:.0%} "
        f"most recent and {protection['topk_ratio']:.0%} most-attended tokens never merge "
        f"(share at most {1 - protection['recent_ratio'] - protection['topk_ratio']:.0%}).",
        "",
        "## 1. Adjacent keys are alike, values are not",
        "",
        *_contrast_lines(profile),
        "",
        "## 2. The per-layer merged share is a property of the model",
        "",
        "| variant | mean share per kind | r between kinds | mean abs. difference between kinds (share points) "
        "| r within a kind "
        "| variance explained by the layer | spread over samples (mean std) |",
        "|---|---|---|---|---|---|---|",
        *[_persistence_row(variant, stats[variant]) for variant in VARIANTS],
        "",
        *_pair_lines(stats),
        *_extreme_layer_lines(profile, stats["no protection"]),
        "",
        "## Per layer",
        "",
        *_layer_table(profile, stats),
        "",
        "Figures: " + ", ".join(f"[{name}]({name})" for name in FIGURES) + ". Numbers: `profile.json`, CSV files.",
        "",
    ]
    return "\n".join(lines)


def _contrast_lines(profile: MergeProfile) -> list[str]:
    c = key_value_contrast(profile)
    return [
        f"- Mean adjacent cosine: keys **{c['key_mean']:.3f}** (per layer {_range(c['key_mean_range'])}), "
        f"values **{c['value_mean']:.3f}** (per layer {_range(c['value_mean_range'])}).",
        f"- Keys are more alike than values in {c['layers_keys_above_values']} of {profile.num_layers} layers.",
        f"- Adjacent pairs above eps = {profile.settings['eps']:g}: keys **{c['key_share_above_eps']:.1%}**, "
        f"values **{c['value_share_above_eps']:.1%}**.",
    ]


def _persistence_row(variant: str, stats: Persistence) -> str:
    shares = ", ".join(f"{kind} {s.mean.mean():.1%}" for kind, s in stats.by_kind.items())
    between = list(stats.between_kinds.values())
    differences = list(stats.level_difference.values())
    within = list(stats.within_kind.values())
    spread = list(stats.mean_spread.values())
    return (
        f"| {variant} | {shares} | {_span(between, '.3f')} | {_span(differences, '.1%')} | {_span(within, '.3f')} | "
        f"{_number(stats.layer_variance_share, '.0%')} | {_span(spread, '.1%')} |"
    )


def _pair_lines(stats: dict[str, Persistence]) -> list[str]:
    pairs = list(stats[VARIANTS[0]].between_kinds)
    if not pairs:
        return ["Only one kind of text was analysed: no correlation between kinds.", ""]
    lines = ["Correlation of the per-layer profiles between text kinds (Pearson r; mean absolute difference):", ""]
    for a, b in pairs:
        parts = [
            f"{variant} r = {_number(stats[variant].between_kinds[(a, b)], '.3f')} "
            f"({stats[variant].level_difference[(a, b)]:.1%})"
            for variant in VARIANTS
        ]
        lines.append(f"- {a} vs {b}: " + "; ".join(parts))
    return [*lines, ""]


def _layers_text(profile: MergeProfile) -> str:
    """"30 layers", or which layers were profiled when the model has layers kvmerger does not compress."""
    total = profile.settings.get("model_layers", profile.num_layers)
    if total == profile.num_layers:
        return f"{profile.num_layers} layers"
    return (
        f"the {profile.num_layers} full-attention layers ({', '.join(map(str, profile.layer_ids))}) of {total}; the "
        f"{total - profile.num_layers} sliding-window layers, which kvmerger never compresses, are not profiled"
    )


def _extreme_layer_lines(profile: MergeProfile, stats: Persistence) -> list[str]:
    mean = np.mean([s.mean for s in stats.by_kind.values()], axis=0)
    order = np.argsort(mean, kind="stable")
    count = min(3, len(mean))
    ids = profile.layer_ids
    low = ", ".join(f"{ids[i]} ({mean[i]:.0%})" for i in order[:count])
    high = ", ".join(f"{ids[i]} ({mean[i]:.0%})" for i in order[::-1][:count])
    saturated = int((np.min([s.low for s in stats.by_kind.values()], axis=0) >= SATURATED).sum())
    return [
        f"Least merged layers (no protection, mean over kinds): {low}. Most merged: {high}. "
        f"Layers where every sample of every kind merges at least {SATURATED:.0%} of its tokens: "
        f"{saturated} of {len(mean)}."
    ]


def _layer_table(profile: MergeProfile, stats: dict[str, Persistence]) -> list[str]:
    kinds = profile.kinds
    short = {"no protection": "no prot.", "paper protection": "paper prot."}
    header = ["layer", "key cos", "value cos", "key pairs > eps"]
    header += [f"{kind} ({short[variant]})" for variant in VARIANTS for kind in kinds]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    key_mean, value_mean = profile.key_cosine.mean(), profile.value_cosine.mean()
    above = profile.key_cosine.share_above_eps()
    for layer in range(profile.num_layers):
        cells = [str(profile.layer_ids[layer]), f"{key_mean[layer]:.3f}", f"{value_mean[layer]:.3f}"]
        cells.append(f"{above[layer]:.1%}")
        for variant in VARIANTS:
            for kind in kinds:
                s = stats[variant].by_kind[kind]
                cells.append(f"{s.mean[layer]:.1%} ± {s.std[layer]:.1%}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _range(pair: list[float]) -> str:
    return f"{pair[0]:.2f}-{pair[1]:.2f}"


def _number(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def _span(values: list[float], spec: str) -> str:
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return "n/a"
    low, high = min(defined), max(defined)
    return format(low, spec) if low == high else f"{format(low, spec)} .. {format(high, spec)}"
