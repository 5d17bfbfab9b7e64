"""The progress bar of an evaluation run, with a time estimate that does not trust the first cell.

tqdm's own estimate divides the cells left by the recent rate. The first cell of every sample
carries the sample's prefill and the attention statistics its methods share, and the later cells
of the sample cost a fraction of that, so after the first cell of `kvmerger compare` tqdm promised
about three hours for a six-minute run. Here the bar counts cells, and the estimate waits for the
first whole sample (one prefill and all its cells), then extrapolates over samples, weighting each
by its prompt length times (its cells + 1): a rough cost model in which the prefill counts as one
cell, both growing with the length.

With nothing left to run (a finished run resumed) there is no bar at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} cells [{elapsed}{postfix}]"


def group_weight(group: Any) -> float:
    """The estimated cost of one sample group (its prompt length x (cells + 1))."""
    return float(group.length) * (len(group.cells) + 1)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class CellProgress:
    """A tqdm bar over the cells of `groups`, with the per-sample estimate described above.

    Offers the part of tqdm's interface the runner uses (`set_description`, `set_postfix_str`,
    `update`, `close`), plus `group_done(group)` after each sample group.
    """

    def __init__(self, groups: Sequence[Any], *, enabled: bool = True) -> None:
        cells = sum(len(group.cells) for group in groups)
        self.total_weight = sum(group_weight(group) for group in groups)
        self.done_weight = 0.0
        self.start = time.perf_counter()
        self.estimate = "time left: after the first sample"
        self.cell = ""
        self.bar = tqdm(
            total=cells,
            unit="cell",
            bar_format=BAR_FORMAT,
            disable=not enabled or cells == 0,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._show(True)  # the first line already says when an estimate will come

    def set_description(self, text: str) -> None:
        self.bar.set_description_str(text, refresh=False)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.cell = text
        self._show(refresh)

    def update(self, count: int = 1) -> None:
        self.bar.update(count)

    def group_done(self, group: Any) -> None:
        self.done_weight += group_weight(group)
        left = self.total_weight - self.done_weight
        if self.done_weight > 0 and left > 0:
            seconds = (time.perf_counter() - self.start) * left / self.done_weight
            self.estimate = f"about {duration(seconds)} left"
        else:
            self.estimate = ""
        self._show(True)

    def close(self) -> None:
        self.bar.close()

    def _show(self, refresh: bool) -> None:
        parts = [part for part in (self.cell, self.estimate) if part]
        self.bar.set_postfix_str("; ".join(parts), refresh=refresh)
