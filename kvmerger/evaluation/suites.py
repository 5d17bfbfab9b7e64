"""Named suites: which methods, tasks, lengths and sample counts `kvmerger compare` runs.

`compare` must finish in under 15 minutes on a 2-core CPU with the default model
(SmolLM2-135M-Instruct). It runs the full cache, KVMerger (the paper's) and its best variant for each
protocol (each only under its own protocol, and both on language modelling), and the
baselines of docs/METHOD.md section 4 (StreamingLLM, H2O, CaM, SnapKV, TOVA, K-norm, random) plus
KVzip and Expected Attention, at budgets 0.5 and 0.35, under both protocols. What costs time is one
prefill per sample (about 2 s at 1k tokens, 4.4 s at 2k and 11 s at 4k on that VM), one pass of
attention statistics per sample (shared by every method through the memo), KVzip's reconstruction
(shared by the methods that use it: 3-4 prefills per sample when the suite was sized below, about
2 since 2026-12-02, docs/BENCHMARKS.md section 9), the fitted merge's
least-squares fits, then per method and budget a compression (0.02-0.5 s) and the answer's
decoding (about 50 ms per token). So the sample count matters more than the method count. With
the methods of issue 12 a sample group cost 65 s (pass key at 2k), 45 / 76 / 131 s (needle at 1k /
2k / 4k) and 62 s (an LM window) on 2026-12-01, and the suite with 5 pass keys, 3 needle depths per
length, 4 LM windows and 3 compress-once prompts took about 28 minutes. To fit in 15 the samples
were halved again (tasks, lengths and methods kept; 230 cells in 11 min 36 s on the idle VM,
2026-12-01, model loading included; the same cells took 15 min 32 s that night, when the VM ran
the full cache's prefills 17% slower). So one pass-key depth and the 1k needle were dropped too:
184 cells in 13 min 15 s on 2026-12-02, on a VM as slow as that night's. With a best variant per
protocol (each under its own protocol only), 188 cells in 13 min 25 s that afternoon:

* passkey: 2 depths at 2,048 tokens (plain completion prompt), query-aware.
* needle: 2,048 and 4,096 tokens, one needle each at depth 50%, query-aware.
* lm: 2 windows (one of essays, one of Shakespeare) of 2,048 prefix tokens, the next 256 scored.
* passkey:keys=3: 2 prompts at 2,048 tokens holding three pass keys, compressed once before any
  question (query-agnostic), then each key asked on its own copy of the compressed cache.

These are few samples: a cell of the table moves by a whole sample's share (1/2 on the pass key,
1 on a needle length). `kvmerger eval` with `--samples` runs the same tasks at any size;
`--methods all` runs every registered method. `quick` is the same pipeline at toy sizes, to check
an installation or a change end to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmerger.evaluation.runner import MethodSpec, RunSettings, TaskPlan
from kvmerger.methods import METHODS

PAPER_COMPARISON = ("full", "kvmerger", "streaming-llm", "h2o", "cam", "snapkv", "tova", "knorm", "random")
# KVMerger's best variants at a small budget (docs/BENCHMARKS.md section 9, chosen on seed 1 and other
# texts than the ones compare reports), both the fitted merge with a layer's slots shared among its
# heads (each head merges down to the slots its best tokens won, then is fitted on them):
# * when the question is in the prompt, its pivots and protected tokens ranked by SnapKV's window, the
#   window's attention max-pooled over 31 keys (so a needle's whole sentence ranks with its best
#   token), 15% of the budget protected as recent tokens and 80% as top-scored ones, the rest of the
#   prompt merged into the remaining 5%;
# * when the context is compressed before any question, ranked by KVzip's reconstruction of the
#   context, 5% recent and 90% top-scored.
# Each runs under its own protocol (and both on language modelling).
QUERY_AWARE_VARIANT = MethodSpec(
    "fitted-kvmerger",
    {
        "score": "window",
        "window_kernel": 31,
        "window_pooling": "max",
        "head_budget": "shared",
        "recent_share": 0.15,
        "topk_share": 0.8,
    },
    protocols=("query-aware",),
)
COMPRESS_ONCE_VARIANT = MethodSpec(
    "fitted-kvmerger",
    {"score": "reconstruction", "head_budget": "shared", "recent_share": 0.05, "topk_share": 0.9},
    protocols=("query-agnostic",),
)
SCORE_BASELINES = ("kvzip", "expected-attention")


def paper_comparison() -> list[MethodSpec]:
    """The full cache, KVMerger and the baselines of docs/METHOD.md section 4 (those registered)."""
    return [MethodSpec(name) for name in PAPER_COMPARISON if name in METHODS]


def compare_methods() -> list[MethodSpec]:
    """The paper's comparison, KVMerger's best variant for each protocol, KVzip and Expected Attention."""
    paper, baselines = paper_comparison(), [MethodSpec(name) for name in SCORE_BASELINES if name in METHODS]
    return paper[:2] + [QUERY_AWARE_VARIANT, COMPRESS_ONCE_VARIANT] + paper[2:] + baselines


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
    methods: tuple[MethodSpec, ...] | None = None  # None: paper_comparison()

    def settings(
        self, methods: Iterable[MethodSpec] | None = None, budgets: Iterable[float] | None = None, seed: int = 0
    ) -> RunSettings:
        plans = [TaskPlan.parse(item.task, item.lengths, item.samples, protocols=item.protocols) for item in self.tasks]
        return RunSettings(
            plans=plans,
            methods=list(methods) if methods is not None else list(self.methods or paper_comparison()),
            budgets=list(budgets) if budgets is not None else list(self.budgets),
            protocols=list(self.protocols),
            seed=seed,
        )


COMPARE = Suite(
    "compare",
    "pass key at 2k tokens x 2 depths, needle at 2k/4k tokens and depth 50%, language modelling on 2 windows "
    "of 2k tokens + 256 (query-aware); three pass keys in 2k tokens x 2, compressed once and asked one at a time "
    "(query-agnostic)",
    (
        SuiteTask("passkey", (2048,), 2),
        SuiteTask("needle", (2048, 4096), 1),
        SuiteTask("lm", (2048,), 2),
        SuiteTask("passkey:keys=3", (2048,), 2, protocols=("query-agnostic",)),
    ),
    methods=tuple(compare_methods()),
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
