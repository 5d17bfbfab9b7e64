"""Language-modelling KL of each method against a reference method, paired window by window.

Issue 12 asks for a KVMerger variant's LM KL "at or below H2O's", and issue 13 for a KL "within one
paired standard error" of the exact statistic's. Both compare two methods on the same windows, so
the spread between windows (one text is simply harder than another) cancels when the difference is
taken per window. This reads the `records.jsonl` of `kvmerger eval` runs (one or several: records are
deterministic, so the reference's rows may come from another run of the same seed), pairs every
method's windows with the reference's at each budget, and prints a Markdown table: both mean KLs,
the mean paired difference (method - reference) with its standard error (sample standard deviation
of the differences over sqrt(n)), the difference in standard errors, and on how many windows the
method's KL is higher. Nothing is run; nothing is tuned.

    python benchmarks/paired_kl.py results/my-run --reference h2o
    python benchmarks/paired_kl.py RUN OTHER_RUN --reference "kvmerger" --methods "kvmerger[statistic=estimated]"
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from share_of_full import read_records


@dataclass(frozen=True)
class PairedKL:
    method: str
    budget: float
    kl: float  # the method's mean KL over the paired windows
    reference_kl: float
    difference: float  # mean of (method - reference) per window
    standard_error: float  # nan with a single window
    higher: int  # windows where the method's KL is above the reference's
    windows: int

    @property
    def in_standard_errors(self) -> float:
        return self.difference / self.standard_error if self.standard_error > 0 else math.nan


def window_key(record: dict) -> tuple:
    return (record["task"], record["length"], record["sample"], record.get("seed"))


def paired_kl(records: list[dict], reference: str, methods: list[str] | None = None) -> list[PairedKL]:
    """Per (method, budget): its KL beside the reference's at the same budget, over the windows both have."""
    kls: dict[tuple[str, float], dict[tuple, float]] = defaultdict(dict)
    for record in records:
        if record["task_name"] == "lm":
            kls[(record["method_label"], float(record["budget"]))][window_key(record)] = float(record["metrics"]["kl"])
    found = []
    for (method, budget), mine in sorted(kls.items(), key=lambda item: (item[0][0], -item[0][1])):
        if method == reference or (methods and method not in methods):
            continue
        theirs = next((kl for (other, b), kl in kls.items() if other == reference and abs(b - budget) < 1e-9), {})
        common = sorted(set(mine) & set(theirs))
        if not common:
            continue
        differences = [mine[key] - theirs[key] for key in common]
        spread = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
        found.append(
            PairedKL(
                method,
                budget,
                statistics.fmean(mine[key] for key in common),
                statistics.fmean(theirs[key] for key in common),
                statistics.fmean(differences),
                spread,
                sum(difference > 0 for difference in differences),
                len(common),
            )
        )
    return found


def markdown(found: list[PairedKL], reference: str) -> str:
    lines = [
        f"| method | budget | KL | {reference} KL | difference +- paired SE | in SE | higher on |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in found:
        lines.append(
            f"| {item.method} | {item.budget:g} | {item.kl:.4f} | {item.reference_kl:.4f} | "
            f"{item.difference:+.4f} +- {item.standard_error:.4f} | {item.in_standard_errors:+.1f} | "
            f"{item.higher} of {item.windows} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`kvmerger eval` results folders (or records.jsonl files)")
    parser.add_argument("--reference", default="h2o", help="the method label to pair against, as the records write it")
    parser.add_argument("--methods", nargs="+", help="method labels to report (default: every other one)")
    args = parser.parse_args(argv)
    try:
        records = read_records(args.runs)
    except FileNotFoundError as error:
        print(f"paired_kl: {error}", file=sys.stderr)
        return 2
    found = paired_kl(records, args.reference, args.methods)
    if not found:
        labels = sorted({record["method_label"] for record in records if record["task_name"] == "lm"})
        print(
            f"paired_kl: no language-modelling window of another method pairs with {args.reference!r}; "
            f"the runs' methods: {', '.join(labels) or 'none (no lm records)'}",
            file=sys.stderr,
        )
        return 2
    print(markdown(found, args.reference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
