"""Named suites: which methods, tasks, lengths and sample counts `kvmerger compare` runs.

`compare` is sized to finish in under 15 minutes on a 2-core CPU with the default model
(SmolLM2-135M-Instruct), for the full cache, KVMerger and the baselines of docs/METHOD.md
section 4 (StreamingLLM, H2O, CaM, SnapKV, TOVA, K-norm, random) at budgets 0.5 and 0.35. What
costs time is one prefill per sample (about 2 s at 1k tokens, 4.4 s at 2k and 11 s at 4k there),
one pass of attention statistics per sample (about 0.4-0.6 of a prefill, shared by every method
through the memo), then per method and budget a compression (0.02-0.5 s) and the answer's decoding
(about 50 ms per token; a pass key takes ~6 steps, the needle's answer ~13, and the language-
modelling continuation is one forward pass of 256 tokens). So the sample count matters more than
the method count, and the suite keeps few, informative samples:

* passkey: 5 depths at 2,048 tokens (plain completion prompt).
* needle: 1,024, 2,048 and 4,096 tokens x 5 depths (0, 25, 50, 75, 100%), the heatmap grid.
* lm: 4 windows (2 of essays, 2 of Shakespeare) of 2,048 prefix tokens, the next 256 tokens scored.

Estimated from those costs: passkey ~65 s, needle ~340 s, lm ~75 s, loading and figures ~15 s,
about 8 minutes in all (17 method x budget variants, 24 prefills). Methods beyond the paper's
comparison set are left out of the default because they cost more than the whole rest: the
fitted ones (attention-matching, fitted-kvmerger) solve least-squares problems per layer and head,
measured at about 3.4 and 1.9 prefills per 2k-token sample for the two budgets together, which
would take the suite to about 20 minutes. `--methods all` runs every registered method.

All under the query-aware protocol (the paper's); `kvmerger eval --protocol both` runs the other.
`quick` is the same pipeline at toy sizes, to check an installation or a change end to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmerger.evaluation.runner import MethodSpec, RunSettings, TaskPlan
from kvmerger.methods import METHODS

PAPER_COMPARISON = ("full", "kvmerger", "streaming-llm", "h2o", "cam", "snapkv", "tova", "knorm", "random")


def paper_comparison() -> list[MethodSpec]:
    """The full cache, KVMerger and the baselines of docs/METHOD.md section 4 (those registered)."""
    return [MethodSpec(name) for name in PAPER_COMPARISON if name in METHODS]


@dataclass(frozen=True)
class SuiteTask:
    task: str  # a task spec, "name" or "name:param=value,..."
    lengths: tuple[int, ...]
    samples: int
    protocols: tuple[str, ...] | None = None  # None: the suite's protocols


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[SuiteTask, ...]
    budgets: tuple[float, ...] = (0.5, 0.35)
    protocols: tuple[str, ...] = ("query-aware",)

    def settings(
        self, methods: Iterable[MethodSpec] | None = None, budgets: Iterable[float] | None = None, seed: int = 0
    ) -> RunSettings:
        plans = [TaskPlan.parse(item.task, item.lengths, item.samples, protocols=item.protocols) for item in self.tasks]
        return RunSettings(
            plans=plans,
            methods=list(methods) if methods is not None else paper_comparison(),
            budgets=list(budgets) if budgets is not None else list(self.budgets),
            protocols=list(self.protocols),
            seed=seed,
        )


COMPARE = Suite(
    "compare",
    "pass key at 2k tokens x 5 depths, needle grid 1k/2k/4k x 5 depths, language modelling on 4 windows of "
    "2k tokens + 256",
    (
        SuiteTask("passkey", (2048,), 5),
        SuiteTask("needle", (1024, 2048, 4096), 5),
        SuiteTask("lm", (2048,), 4),
    ),
)

QUICK = Suite(
    "quick",
    "toy sizes to check the pipeline: pass key 2 x 384 tokens, needle 384/512 x 2 depths, language modelling "
    "2 windows of 384 + 32 tokens",
    (
        SuiteTask("passkey", (384,), 2),
        SuiteTask("needle", (384, 512), 2),
        SuiteTask("lm:continuation=32", (384,), 2),
    ),
)

SUITES = {suite.name: suite for suite in (COMPARE, QUICK)}
