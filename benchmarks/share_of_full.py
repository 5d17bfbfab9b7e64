"""Each method's score as a share of the full cache's, per task, from `kvmerger eval` results folders.

Issue 12's goals are shares of the full cache (>= 95% query-aware, >= 80% compressed once), taken
on the same samples. This reads the `records.jsonl` of one or more runs (the full cache's rows may
come from another run of the same seed: records are deterministic), pairs every method's samples
with the full cache's, and prints a Markdown table (share, mean score, samples) and draws one bar per
method and task. Language-modelling tasks are left out (their score is agreement with the full
cache, not a share of it). Nothing is run; nothing is tuned.

    python benchmarks/share_of_full.py results/my-run results/full-run --budget 0.35
    python benchmarks/share_of_full.py RUN ... --methods "kvzip[head_budget=shared]" --protocol query-agnostic \
        --figure docs/figures/shares.png --title "compressed once, 0.35"
    python benchmarks/share_of_full.py RUN --budgets 0.5 0.35 0.1   # a panel per budget (one method: a bar per budget)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FULL = "full"
PROTOCOLS = ("query-aware", "query-agnostic")


@dataclass(frozen=True)
class Share:
    task: str
    method: str
    share: float | None  # None: the full cache scores 0 on these samples
    score: float
    full: float
    samples: int
    budget: float


def read_records(folders: list[Path]) -> list[dict]:
    """Every record of the runs' `records.jsonl` files (a folder or the file itself)."""
    records = []
    for folder in folders:
        path = folder / "records.jsonl" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"no records.jsonl in {folder}: give a `kvmerger eval` results folder")
        with path.open() as lines:
            records += [json.loads(line) for line in lines if line.strip()]
    return records


def task_label(record: dict) -> str:
    return f"{record['task']} @{record['length']}"


def shares(records: list[dict], budget: float, protocol: str, methods: list[str] | None = None) -> list[Share]:
    """Per (task, method) at `budget`: the mean score over the samples the full cache also has, over the
    full cache's mean on them."""
    scores: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for record in records:
        if record["protocol"] != protocol or record["task_name"] == "lm":
            continue
        if record["method"] == FULL or abs(record["budget"] - budget) < 1e-9:
            scores[(task_label(record), record["method_label"])][record["sample"]] = float(record["score"])
    found = []
    for (task, method), mine in sorted(scores.items()):
        if method == FULL or (methods and method not in methods):
            continue
        full = scores.get((task, FULL), {})
        common = sorted(set(mine) & set(full))
        if not common:
            continue
        score = statistics.fmean(mine[s] for s in common)
        reference = statistics.fmean(full[s] for s in common)
        found.append(Share(task, method, score / reference if reference else None, score, reference, len(common), budget))
    if methods:
        order = {method: index for index, method in enumerate(methods)}
        found.sort(key=lambda item: (item.task, order[item.method]))
    return found


def label(item: Share, several_budgets: bool) -> str:
    return f"{item.method} @{item.budget:g}" if several_budgets else item.method


def markdown(found: list[Share]) -> str:
    several = len({item.budget for item in found}) > 1
    lines = ["| task | method | share of full | score | full | samples |", "|---|---|---|---|---|---|"]
    for item in found:
        share = "-" if item.share is None else f"{item.share:.0%}"
        lines.append(
            f"| {item.task} | {label(item, several)} | {share} | {item.score:.2f} | {item.full:.2f} | {item.samples} |"
        )
    return "\n".join(lines)


def draw(found: list[Share], path: Path, title: str, goal: float | None) -> Path:
    """Tasks along x. Several methods at several budgets: one panel per budget (side by side, the same y
    axis), one bar per method in the same colour in every panel. Otherwise one panel, one bar per
    method or, for one method at several budgets, per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(item.task for item in found))
    methods = list(dict.fromkeys(item.method for item in found))
    budgets = list(dict.fromkeys(item.budget for item in found))
    if len(methods) > 1:
        panels = budgets if len(budgets) > 1 else [None]
        series = [(method, method, None) for method in methods]  # (legend label, method, budget: the panel's)
    else:
        panels = [None]
        series = [(f"{methods[0]} @{budget:g}", methods[0], budget) for budget in budgets]
    colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    width = 0.8 / len(series)
    panel_width = max(4.0, 1.4 * len(tasks) + 1)
    legend_height = 0.16 * (len(series) + 2)  # inches: a line per bar series and the goal, below the panels
    height = 3.6 + legend_height
    figure, axes_row = plt.subplots(
        1, len(panels), sharey=True, squeeze=False, figsize=(panel_width * len(panels) + 1, height)
    )
    for axes, panel in zip(axes_row[0], panels):
        for index, (name, method, budget) in enumerate(series):
            wanted = panel if budget is None else budget
            xs, heights = [], []
            for position, task in enumerate(tasks):
                match = [
                    item for item in found
                    if (item.task, item.method) == (task, method) and item.share is not None
                    and (wanted is None or item.budget == wanted)
                ]
                if match:
                    xs.append(position - 0.4 + width * (index + 0.5))
                    heights.append(100 * match[0].share)
            axes.bar(xs, heights, width, label=name, color=colours[index % len(colours)])
        if goal is not None:
            axes.axhline(100 * goal, color="black", linestyle="--", linewidth=1, label=f"goal {goal:.0%}")
        axes.set_xticks(range(len(tasks)), [task.replace("[", "\n[").replace(",", ",\n") for task in tasks], fontsize=7)
        if panel is not None:
            axes.set_title(f"budget {panel:g}", fontsize=8)
    axes_row[0][0].set_ylabel("score, % of the full cache's (same samples)")
    figure.suptitle(title, fontsize=9)
    handles, labels = axes_row[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=6, loc="lower center", frameon=False)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`kvmerger eval` results folders (or records.jsonl files)")
    parser.add_argument(
        "--budget", "--budgets", dest="budgets", type=float, nargs="+", default=[0.35],
        help="one or more budgets; with several, the table labels each row with its budget and the figure has one panel per budget (one method: one bar per budget)",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="query-aware")
    parser.add_argument("--methods", nargs="+", help="method labels as the records write them, in this order (default: all)")
    parser.add_argument("--figure", type=Path, help="write a bar chart here (PNG)")
    parser.add_argument("--title", default="")
    parser.add_argument("--goal", type=float, help="draw this share as a line (0.95, 0.8)")
    args = parser.parse_args(argv)
    budgets = ", ".join(f"{budget:g}" for budget in args.budgets)
    try:
        records = read_records(args.runs)
        found = [item for budget in args.budgets for item in shares(records, budget, args.protocol, args.methods)]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as error:
        print(f"share_of_full: {error}", file=sys.stderr)
        return 2
    if not found:
        print(f"share_of_full: no method at budget {budgets} shares samples with the full cache ({args.protocol})", file=sys.stderr)
        return 2
    print(markdown(found))
    if args.figure:
        title = args.title or f"{args.protocol}, budget {budgets}"
        print(f"figure: {draw(found, args.figure, title, args.goal)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
