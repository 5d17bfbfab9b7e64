"""Figures of a merge analysis, drawn with matplotlib's Agg canvas (no display, no global backend
switch: pyplot is never imported) and written as PNG files.

* ``overview.png``: both observations on one page: adjacent cosine of keys against values per layer
  (median and interquartile band), and the merged share per layer for every text kind (mean over
  samples, band = min..max), without protection. The figure the README shows.
* ``heatmaps.png``: token x token cosine of keys (left) and values (right) for the chosen layers
  and heads, over a window in the middle of the first sample.
* ``adjacent_cosine.png``: per layer, box plots of adjacent cosine (box: quartiles, whiskers: 5% and
  95%) for keys and values, with the threshold eps.
* ``merge_share.png``: merged share per layer and text kind for both variants, with their
  persistence numbers in the titles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvmerger.analysis.merge_profile import VARIANTS, MergeProfile, Persistence, persistence

KEY_COLOUR, VALUE_COLOUR = "#1f77b4", "#ff7f0e"
KIND_COLOURS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
DPI = 110


def draw_all(profile: MergeProfile, folder: Path) -> list[Path]:
    """Write every figure into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    drawers = {
        "overview.png": draw_overview,
        "heatmaps.png": draw_heatmaps,
        "adjacent_cosine.png": draw_adjacent_cosine,
        "merge_share.png": draw_merge_share,
    }
    paths = []
    for name, draw in drawers.items():
        figure = draw(profile)
        path = folder / name
        FigureCanvasAgg(figure)
        figure.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def draw_overview(profile: MergeProfile) -> Figure:
    figure = Figure(figsize=(8.0, 6.4), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    _cosine_bands(top, profile)
    _share_lines(bottom, profile, "no protection")
    stats = persistence(profile, "no protection")
    bottom.set_title(
        f"Share of tokens KVMerger merges (eps = {profile.settings['eps']:g}, no protection)\n"
        f"{_correlation_text(stats)}",
        fontsize=9,
    )
    bottom.set_xlabel("layer")
    figure.suptitle(f"{profile.model}: where the model says to merge ({_sample_text(profile)})", fontsize=10)
    return figure


def draw_heatmaps(profile: MergeProfile) -> Figure:
    rows = len(profile.heatmaps)
    figure = Figure(figsize=(7.6, 3.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(figure.subplots(rows, 2))
    image = None
    for row, heatmap in zip(axes, profile.heatmaps):
        end = heatmap.start + heatmap.keys.shape[0]
        extent = (heatmap.start, end, end, heatmap.start)
        for ax, matrix, what in ((row[0], heatmap.keys, "keys"), (row[1], heatmap.values, "values")):
            image = ax.imshow(
                matrix.numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r", extent=extent, interpolation="nearest"
            )
            ax.set_title(f"layer {heatmap.layer}, KV head {heatmap.head}: {what}", fontsize=9)
            ax.set_xlabel("token", fontsize=8)
            ax.tick_params(labelsize=7)
    figure.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    first = profile.samples[0]
    figure.suptitle(f"{profile.model}: token x token cosine, {first.kind} sample {first.index}", fontsize=10)
    return figure


def draw_adjacent_cosine(profile: MergeProfile) -> Figure:
    figure = Figure(figsize=(max(8.0, 0.32 * profile.num_layers + 2), 4.2), layout="constrained")
    ax = figure.subplots()
    layers = np.arange(profile.num_layers)
    for distribution, offset, colour, label in (
        (profile.key_cosine, -0.2, KEY_COLOUR, "keys"),
        (profile.value_cosine, 0.2, VALUE_COLOUR, "values"),
    ):
        q = {p: distribution.quantile(p) for p in (0.05, 0.25, 0.5, 0.75, 0.95)}
        stats = [
            {"med": q[0.5][i], "q1": q[0.25][i], "q3": q[0.75][i], "whislo": q[0.05][i], "whishi": q[0.95][i]}
            for i in layers
        ]
        boxes = ax.bxp(
            stats, positions=layers + offset, widths=0.35, showfliers=False, patch_artist=True, manage_ticks=False
        )
        for box in boxes["boxes"]:
            box.set(facecolor=colour, alpha=0.6, edgecolor=colour)
        for median in boxes["medians"]:
            median.set(color="black", linewidth=0.8)
        ax.plot([], [], color=colour, linewidth=6, alpha=0.6, label=label)
    _eps_line(ax, profile)
    _layer_ticks(ax, profile)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(token t, token t+1)")
    ax.set_ylim(-1.0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"{profile.model}: adjacent-token cosine per layer (box: quartiles, whiskers: 5-95%; {_sample_text(profile)})",
        fontsize=9,
    )
    return figure


def draw_merge_share(profile: MergeProfile) -> Figure:
    figure = Figure(figsize=(8.0, 6.4), layout="constrained")
    axes = figure.subplots(len(VARIANTS), 1, sharex=True)
    budget = profile.settings["budget_for_protection"]
    protection = profile.settings["protection"]
    for ax, variant in zip(axes, VARIANTS):
        _share_lines(ax, profile, variant)
        ax.set_title(f"{variant}: {_correlation_text(persistence(profile, variant))}", fontsize=9)
        if variant == "paper protection":
            ceiling = 1.0 - protection["recent_ratio"] - protection["topk_ratio"]
            ax.axhline(ceiling, color="grey", linestyle=":", linewidth=0.8, label=f"ceiling {ceiling:.0%}")
            ax.legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("layer")
    figure.suptitle(
        f"{profile.model}: share of tokens in a merging set, eps = {profile.settings['eps']:g}\n"
        f"paper protection at budget {budget:g}: {protection['recent_ratio']:.0%} most recent and "
        f"{protection['topk_ratio']:.0%} most attended tokens never merge",
        fontsize=9,
    )
    return figure


def _cosine_bands(ax: Axes, profile: MergeProfile) -> None:
    layers = np.arange(profile.num_layers)
    for distribution, colour, label in (
        (profile.key_cosine, KEY_COLOUR, "keys"),
        (profile.value_cosine, VALUE_COLOUR, "values"),
    ):
        low, high = distribution.quantile(0.25), distribution.quantile(0.75)
        ax.fill_between(layers, low, high, color=colour, alpha=0.25, linewidth=0)
        median = distribution.quantile(0.5)
        ax.plot(layers, median, color=colour, marker="o", markersize=3, label=f"{label} (median, quartiles)")
    _eps_line(ax, profile)
    _layer_ticks(ax, profile)
    ax.set_ylabel("cos(token t, token t+1)")
    ax.set_ylim(min(-0.05, float(profile.value_cosine.quantile(0.25).min()) - 0.05), 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Adjacent-token cosine similarity, post-RoPE keys vs values", fontsize=9)


def _share_lines(ax: Axes, profile: MergeProfile, variant: str) -> None:
    layers = np.arange(profile.num_layers)
    stats = persistence(profile, variant)
    for colour, (kind, kind_stats) in zip(_cycle(KIND_COLOURS, len(stats.by_kind)), stats.by_kind.items()):
        ax.fill_between(layers, kind_stats.low, kind_stats.high, color=colour, alpha=0.2, linewidth=0)
        label = f"{kind} (n={kind_stats.samples})"
        ax.plot(layers, kind_stats.mean, color=colour, marker="o", markersize=3, label=label)
    _layer_ticks(ax, profile)
    ax.set_ylabel("tokens merged")
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.legend(fontsize=8, loc="lower right")


def _layer_ticks(ax: Axes, profile: MergeProfile) -> None:
    """Ticks at every profiled layer, labelled with the model's layer index."""
    ax.set_xticks(np.arange(profile.num_layers), [str(layer) for layer in profile.layer_ids])


def _eps_line(ax: Axes, profile: MergeProfile) -> None:
    eps = profile.settings["eps"]
    ax.axhline(eps, color="grey", linestyle="--", linewidth=0.8, label=f"eps = {eps:g}")


def _correlation_text(stats: Persistence) -> str:
    between = [value for value in stats.between_kinds.values() if not np.isnan(value)]
    text = f"layer explains {stats.layer_variance_share:.0%} of the variance"
    if between:
        text += f"; r between kinds {min(between):.2f}..{max(between):.2f}"
    return text


def _sample_text(profile: MergeProfile) -> str:
    tokens = profile.settings["tokens"]
    counts = profile.settings["samples_per_kind"]
    return f"{'/'.join(map(str, tokens))} tokens, {sum(counts.values())} samples"


def _cycle(colours: tuple[str, ...], count: int) -> list[str]:
    return [colours[i % len(colours)] for i in range(count)]
