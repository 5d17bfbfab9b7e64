"""The figures of a results folder, as PNG files (matplotlib's Agg canvas; no display, no pyplot state).

* `<task>_<protocol>_score_vs_budget.png`: score against budget, one line per method, the full
  cache as a dashed reference line.
* `<task>_kl_and_perplexity_vs_budget.png`: language modelling, KL from the full cache (log axis)
  and perplexity (the full cache's as the reference line) against budget.
* `<task>_worst_token_kl_and_top1_changes_vs_budget.png`: language modelling, the worst token's KL
  (solid) and the mean KL (dotted, the same colour) against budget, and the share of tokens whose
  top-1 prediction changed.
* `<task>_<protocol>_<method>_score_by_length_and_depth.png`: for the needle task, one heatmap per
  budget of the method: context length (rows) x needle depth (columns), the mean score in each cell.

Every method can be told apart where their numbers coincide (retrieval scores saturate at 0 and 1):
each method has its own colour and marker (KVMerger in black), and the points of one budget are
spread sideways by a small offset per method, in legend order (the x axis still reads as the
budget). A perplexity far above the others (more than twice the median of the methods' worst) would
squeeze every other method into one band: such a method is drawn at the top edge with an arrow and
its values, and its legend entry says it is off the scale.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from kvmerger.evaluation.records import write_atomically
from kvmerger.evaluation.report import KVMERGER, Row, method_order

NEEDLE_TASK = "needle"
HEATMAP = LinearSegmentedColormap.from_list("score", ["#d7301f", "#fdcc8a", "#1a9850"])


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomically(path, buffer.getvalue())
    return path


def write_figures(records: list[dict[str, Any]], rows: list[Row], folder: Path) -> list[tuple[str, Path]]:
    """Every figure the records allow; returns (title, path) pairs."""
    figures = []
    by_task: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        by_task[(row.task, row.protocol)].append(row)
    for (task, protocol), task_rows in by_task.items():
        if task_rows[0].is_language_modeling:
            title = f"{task}: KL from the full cache and perplexity vs budget"
            path = folder / f"{safe_name(task)}_kl_and_perplexity_vs_budget.png"
            figures.append((title, save(language_modeling_figure(task_rows, title), path)))
            if all(row.kl_max is not None for row in task_rows):
                title = f"{task}: the worst token's KL beside the mean, and top-1 changes vs budget"
                path = folder / f"{safe_name(task)}_worst_token_kl_and_top1_changes_vs_budget.png"
                figures.append((title, save(language_modeling_tail_figure(task_rows, title), path)))
        else:
            title = f"{task} ({protocol}): score vs budget"
            path = folder / f"{safe_name(task)}_{safe_name(protocol)}_score_vs_budget.png"
            figures.append((title, save(score_figure(task_rows, title), path)))
    figures += needle_heatmaps(records, folder)
    return figures


def _lines(rows: list[Row]) -> tuple[dict[str, list[Row]], Row | None]:
    lines: dict[str, list[Row]] = defaultdict(list)
    full = None
    for row in sorted(rows, key=lambda r: (method_order(r.method, r.method_name), r.budget)):
        if row.method_name == "full":
            full = row
        else:
            lines[row.method].append(row)
    return lines, full


MARKERS = "os^vD<>phP*X"


def _style(index: int, label: str) -> dict[str, Any]:
    """KVMerger in black (its variants dashed, with their own markers); the rest in colours, each
    with its own marker. Lines are light and markers large: the markers carry the numbers."""
    mine = label.split("[")[0] == KVMERGER
    variant = mine and "[" in label
    return {
        "color": "black" if mine else f"C{index % 10}",
        "linewidth": 1.8 if mine else 1.1,
        "alpha": 0.9 if mine else 0.8,
        "linestyle": ("--", ":", "-.")[index % 3] if variant else "-",
        "marker": ("sD^v"[index % 4] if variant else "o") if mine else MARKERS[index % len(MARKERS)],
        "markersize": 7.5 if mine else 7,
        "markeredgecolor": "white",
        "markeredgewidth": 0.7,
        "zorder": 3 if mine else 2,
    }


def budget_offsets(rows: list[Row], count: int) -> list[float]:
    """Sideways offsets of `count` methods: spread over 40% of the smallest gap between budgets."""
    budgets = sorted({row.budget for row in rows if row.method_name != "full"})
    gaps = [b - a for a, b in zip(budgets, budgets[1:])]
    spread = 0.4 * min(gaps) if gaps else 0.05
    if count < 2:
        return [0.0] * count
    return [spread * (index / (count - 1) - 0.5) for index in range(count)]


def score_figure(rows: list[Row], title: str) -> Figure:
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    lines, full = _lines(rows)
    offsets = budget_offsets(rows, len(lines))
    for index, ((label, points), offset) in enumerate(zip(lines.items(), offsets, strict=True)):
        axes.plot([p.budget + offset for p in points], [p.score for p in points], label=label, **_style(index, label))
    if full is not None:
        reference = f"full cache ({full.score:.2f})"
        axes.axhline(full.score, color="grey", linestyle="--", linewidth=1.0, zorder=1, label=reference)
    axes.set_xlabel("budget (share of the prompt's cache kept); methods side by side at each budget")
    axes.set_ylabel(f"score ({rows[0].metric})" if rows and rows[0].metric != "score" else "score")
    axes.set_ylim(-0.05, 1.05)
    _budget_axis(axes, rows)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def off_scale(values: dict[str, list[float]]) -> set[str]:
    """Methods whose worst value is more than twice the median of the methods' worst values."""
    worst = {label: max(points) for label, points in values.items() if points}
    if len(worst) < 3:
        return set()
    median = float(np.median(list(worst.values())))
    return {label for label, value in worst.items() if value > 2 * median}


def language_modeling_figure(rows: list[Row], title: str) -> Figure:
    figure = Figure(figsize=(11.5, 4.2))
    kl_axes, ppl_axes = figure.subplots(1, 2)
    lines, full = _lines(rows)
    offsets = budget_offsets(rows, len(lines))
    clipped = off_scale({label: [p.perplexity for p in points] for label, points in lines.items()})
    shown = [p.perplexity for label, points in lines.items() if label not in clipped for p in points]
    shown += [full.perplexity] if full is not None else []
    top = max(shown) * 1.04 if shown else None
    for index, ((label, points), offset) in enumerate(zip(lines.items(), offsets, strict=True)):
        budgets = [p.budget + offset for p in points]
        style = _style(index, label)
        kl_axes.plot(budgets, [p.kl for p in points], label=label, **style)
        perplexities = [p.perplexity for p in points]
        if label in clipped and top is not None:
            _plot_off_scale(ppl_axes, budgets, perplexities, top, label, style)
        else:
            ppl_axes.plot(budgets, perplexities, label=label, **style)
    if full is not None:
        reference = f"full cache ({full.perplexity:.2f})"
        ppl_axes.axhline(full.perplexity, color="grey", linestyle="--", linewidth=1.0, zorder=1, label=reference)
    kl_axes.set_ylabel("mean KL(full || compressed) per token, nats")
    kls = [p.kl for points in lines.values() for p in points]
    if kls and min(kls) > 0:
        _log_axis(kl_axes, min(kls), max(kls))  # methods differ by orders of magnitude
    if shown and max(shown) > 2 * min(shown):
        _log_axis(ppl_axes, min(shown), max(shown))
    if top is not None and clipped:
        ppl_axes.set_ylim(top=top)
    ppl_axes.set_ylabel("perplexity of the continuation")
    return _side_by_side(figure, (kl_axes, ppl_axes), rows, title)


def language_modeling_tail_figure(rows: list[Row], title: str) -> Figure:
    """Worst-token KL (solid) over mean KL (dotted) per method, and the share of changed top-1 predictions."""
    figure = Figure(figsize=(10.5, 4.0))
    kl_axes, changed_axes = figure.subplots(1, 2)
    lines, _ = _lines(rows)
    offsets = budget_offsets(rows, len(lines))
    for index, ((label, points), offset) in enumerate(zip(lines.items(), offsets, strict=True)):
        budgets, style = [p.budget + offset for p in points], _style(index, label)
        kl_axes.plot(budgets, [p.kl_max for p in points], label=label, **style)
        kl_axes.plot(budgets, [p.kl for p in points], **{**style, "linestyle": ":", "linewidth": 1.0, "marker": None})
        changed_axes.plot(budgets, [100 * p.top1_changed for p in points], label=label, **style)
    kls = [value for points in lines.values() for p in points for value in (p.kl, p.kl_max)]
    if kls and min(kls) > 0:
        _log_axis(kl_axes, min(kls), max(kls))
    kl_axes.set_ylabel("KL(full || compressed), nats: worst token (solid), mean (dotted)")
    changed_axes.set_ylabel("tokens whose top-1 prediction changed, %")
    return _side_by_side(figure, (kl_axes, changed_axes), rows, title)


def _plot_off_scale(axes, budgets: list[float], values: list[float], top: float, label: str, style: dict) -> None:
    """A method beyond the axis: upward triangles at the top edge, each with its value above it."""
    listed = ", ".join(f"{value:.1f}" for value in values)
    style = {**style, "marker": "^", "linestyle": "none"}
    axes.plot(budgets, [top] * len(values), label=f"{label} (off the scale: {listed})", clip_on=False, **style)
    for budget, value in zip(budgets, values, strict=True):
        axes.annotate(
            f"{value:.0f}",
            (budget, top),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
            color=style["color"],
            annotation_clip=False,
        )


def _log_axis(axes, low: float, high: float) -> None:
    """A log y axis with plain numbers; minor ticks labelled only when the range is under a decade."""
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%.3g") if high < 10 * low else NullFormatter())


def _side_by_side(figure: Figure, panels: tuple, rows: list[Row], title: str) -> Figure:
    """Budget axes and grids on both panels of an LM figure, the legend right of the last, the title."""
    for axes in panels:
        axes.set_xlabel("budget; methods side by side at each budget")
        _budget_axis(axes, rows)
        axes.grid(alpha=0.3)
    panels[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title, fontsize=10)
    return figure


def _budget_axis(axes, rows: list[Row]) -> None:
    budgets = sorted({row.budget for row in rows if row.method_name != "full"})
    if budgets:
        axes.set_xticks(budgets)
        axes.set_xticklabels([f"{b:g}" for b in budgets])
        margin = max(0.05, 0.3 * (budgets[-1] - budgets[0]))
        axes.set_xlim(budgets[0] - margin, budgets[-1] + margin)


def needle_heatmaps(records: list[dict[str, Any]], folder: Path) -> list[tuple[str, Path]]:
    """One figure per needle task variant, method and protocol; one panel per budget."""
    cells: dict[tuple, dict[float, dict[tuple[int, float], list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    names: dict[tuple, str] = {}
    for record in records:
        if record["task_name"] != NEEDLE_TASK:
            continue
        figure_key = (record["task"], record["method_label"], record["protocol"])
        names[figure_key] = record["method"]
        depth = float(record["sample_meta"]["depth"])
        cells[figure_key][record["budget"]][(int(record["length"]), depth)].append(float(record["score"]))
    figures = []
    ordered = sorted(cells, key=lambda k: (k[0], method_order(k[1], names[k]), k[2]))
    for task, label, protocol in ordered:
        title = f"{task}, {label} ({protocol})"
        figure = heatmap_figure(cells[(task, label, protocol)], title)
        name = f"{safe_name(task)}_{safe_name(protocol)}_{safe_name(label)}_score_by_length_and_depth.png"
        figures.append((title, save(figure, folder / name)))
    return figures


def heatmap_figure(panels: dict[float, dict[tuple[int, float], list[float]]], title: str) -> Figure:
    budgets = sorted(panels, reverse=True)
    figure = Figure(figsize=(1.2 + 3.6 * len(budgets), 3.4))
    axes_list = np.atleast_1d(figure.subplots(1, len(budgets)))
    image = None
    for position, (axes, budget) in enumerate(zip(axes_list, budgets, strict=True)):
        grid = panels[budget]
        lengths = sorted({length for length, _ in grid})
        depths = sorted({depth for _, depth in grid})
        values = np.full((len(lengths), len(depths)), np.nan)
        for (length, depth), scores in grid.items():
            values[lengths.index(length), depths.index(depth)] = float(np.mean(scores))
        image = axes.imshow(values, cmap=HEATMAP, vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        axes.set_xticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=8)
        axes.set_yticks(range(len(lengths)), [str(length) for length in lengths], fontsize=8)
        axes.set_xlabel("needle depth")
        if position == 0:
            axes.set_ylabel("context tokens")
        axes.set_title(f"budget {budget:g}", fontsize=9)
        for (row, column), value in np.ndenumerate(values):
            if not np.isnan(value):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=list(axes_list), shrink=0.85, label="score")
    figure.suptitle(title, fontsize=10)
    return figure
