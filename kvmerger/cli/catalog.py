"""What `kvmerger methods` prints, without importing torch: every registered method's name, summary
and parameters (type, default, one line each).

This is a copy of what the method classes in kvmerger/methods/ declare, kept here so that listing
the methods takes milliseconds instead of seconds. It cannot drift silently:
tests/test_cli.py::test_the_catalog_matches_every_registered_method fails when a method is added
or removed, or when a summary, a parameter, its type or its default differs from the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BUDGET_HELP = "share of the prompt's cache kept, in (0, 1]; `--budget(s)` on the command line"


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # as annotated in the method's dataclass
    default: Any
    help: str


@dataclass(frozen=True)
class MethodEntry:
    name: str
    summary: str
    parameters: tuple[Parameter, ...]


def _budget(default: float = 0.5) -> Parameter:
    return Parameter("budget", "float", default, BUDGET_HELP)


HEAD_BUDGET = Parameter(
    "head_budget", "str", "equal", "equal: S slots per KV head; shared: a layer's heads share its slots by score (packed)"
)
HEAD_FLOOR = Parameter(
    "head_floor", "float", 0.0, "with head_budget=shared, the share of S every head keeps first (Ada-KV's safeguard)"
)


CATALOG: tuple[MethodEntry, ...] = (
    MethodEntry(
        "attention-matching",
        "Attention matching (Zweiger et al. 2026): top-RMS-attention keys, fitted biases and values",
        (
            _budget(),
            Parameter("reference_queries", "int | None", 256, "prompt positions whose queries the fit matches (None: all)"),
            Parameter("recent_queries", "int", 256, "how many of those are the last positions (the rest drawn)"),
            Parameter("causal", "bool", False, "score each reference query only against the keys it saw"),
            Parameter("bias_bound", "float", 3.0, "slot weights kept in [e^-bound, e^bound]"),
            Parameter("nnls_steps", "int", 2, "projected-gradient steps of the bias fit"),
            Parameter("bias_ridge", "float", 0.0, "ridge of the bias fit, relative to the mean eigenvalue"),
            Parameter("ridge", "float", 0.0, "ridge of the value fit toward the kept values, relative (0.1: our guard)"),
            Parameter("seed", "int", 0, "seed of the drawn reference positions"),
            Parameter("reference", "str", "prompt", "reference queries: the prompt's own (prompt) or the reconstruction pass's"),
        ),
    ),
    MethodEntry(
        "cam",
        "CaM (Zhang et al. 2024): H2O eviction + gated merging of each evicted value into the next 32, sequentially",
        (
            _budget(),
            Parameter("merge_window", "int", 32, "tokens after an evicted one that receive its value"),
            Parameter("recent_share", "float", 0.5, "share of the slots given to the recent window (as H2O)"),
            Parameter("seed", "int", 0, "seed of the Bernoulli merge gates"),
            Parameter("merge", "str", "add", "add: CaM's additive merge; average: attention-weighted mean (our guard)"),
            Parameter("statistic", "str", "exact", "aggregated attention from every query (exact) or estimated from a sample"),
        ),
    ),
    MethodEntry(
        "expected-attention",
        "Expected Attention (Devoto et al. 2025): a Gaussian of future queries, expected attention x |v|",
        (
            _budget(),
            Parameter("n_future_positions", "int", 512, "future positions the RoPE rotation is averaged over"),
            Parameter("n_sink", "int", 4, "first tokens always kept and left out of the statistics"),
            Parameter("use_covariance", "bool", True, "include the queries' covariance in the expected logit"),
            Parameter("use_vnorm", "bool", True, "multiply the score by the value's norm"),
            Parameter("epsilon", "float", 0.0, "added to the score before the value norm"),
            Parameter("query_window", "int | None", None, "fit the Gaussian on the last queries only (None: all)"),
            HEAD_BUDGET,
            HEAD_FLOOR,
        ),
    ),
    MethodEntry(
        "fitted-kvmerger",
        "KVMerger's merging sets with biases and values fitted by attention matching",
        (
            _budget(),
            Parameter("recent_ratio", "float | None", None, "share of the prompt kept as a recent window (None: half the budget)"),
            Parameter("topk_ratio", "float | None", None, "share kept as heavy hitters (None: a fifth of the budget)"),
            Parameter("sigma", "float | None", None, "Gaussian kernel width of the merge (None: from each set's keys)"),
            Parameter("slot_keys", "str", "merged", "a slot's key: merged (the kernel-weighted key) or pivot"),
            Parameter("reference_queries", "int | None", 128, "prompt positions whose queries the fit matches (None: all)"),
            Parameter("recent_queries", "int", 128, "how many of those are the last positions (the rest drawn)"),
            Parameter("causal", "bool", True, "fit each query only on the slots wholly before it"),
            Parameter("bias_range", "float", 3.0, "slot weights kept within |S| e^-range .. |S| e^range"),
            Parameter("nnls_steps", "int", 2, "projected-gradient steps of the bias fit"),
            Parameter("bias_ridge", "float", 0.1, "ridge of the bias fit toward log|S|"),
            Parameter("ridge", "float", 0.1, "ridge of the value fit toward the merged values"),
            Parameter("seed", "int", 0, "seed of the drawn reference positions"),
            Parameter("score", "str", "aggregated", "score source of the top-k and pivots: aggregated, window, reconstruction, expected, or a+b"),
            Parameter("reference", "str", "prompt", "reference queries: the prompt's own (prompt) or the reconstruction pass's"),
            Parameter("statistic", "str", "exact", "aggregated attention from every query (exact) or estimated from a sample"),
            Parameter("recent_share", "float | None", None, "recent window as a share of the budget (instead of recent_ratio)"),
            Parameter("topk_share", "float | None", None, "heavy hitters as a share of the budget (instead of topk_ratio)"),
            Parameter("window_kernel", "int", 5, "keys the window score is pooled over (odd; SnapKV's 5; 31 in compare's variant)"),
            Parameter("window_pooling", "str", "avg", "pooling of the window score: avg (SnapKV's) or max"),
            Parameter("max_set_size", "int | None", None, "cap on the tokens of one merging set (None: no cap, the paper's)"),
            Parameter("score_kernel", "int", 1, "keys the other score sources are pooled over (odd; 1: none, their papers')"),
            Parameter("score_pooling", "str", "max", "pooling of the other score sources: avg or max"),
            HEAD_BUDGET,
            HEAD_FLOOR,
            Parameter("fit_slots", "str", "all", "slots the fits solve for: all, merged (single tokens kept as they are) or merged-values"),
        ),
    ),
    MethodEntry("full", "Full cache: no compression (the reference)", (_budget(1.0),)),
    MethodEntry(
        "h2o",
        "H2O (Zhang et al. 2023): heavy hitters by aggregated attention + recent window, half and half",
        (
            _budget(),
            Parameter("recent_share", "float", 0.5, "share of the slots given to the recent window"),
            Parameter("statistic", "str", "exact", "aggregated attention from every query (exact) or estimated from a sample"),
        ),
    ),
    MethodEntry(
        "knorm",
        "K-norm (Devoto et al. 2024): keep the keys with the lowest L2 norm, no attention needed",
        (_budget(),),
    ),
    MethodEntry(
        "kvmerger",
        "KVMerger (Wang et al. 2024): Gaussian-kernel merging of adjacent similar keys",
        (
            _budget(),
            Parameter("mode", "str", "exact", "exact: exactly the budget's slots; paper: merge every pair above eps"),
            Parameter("eps", "float", 0.75, "cosine threshold of mode=paper (Algorithm 1)"),
            Parameter("recent_ratio", "float | None", None, "share of the prompt protected as recent (None: the paper's)"),
            Parameter("topk_ratio", "float | None", None, "share protected as heavy hitters (None: the paper's)"),
            Parameter("sigma", "float | None", None, "Gaussian kernel width (None: from each set's keys)"),
            Parameter("scale_values_by_set_size", "bool", False, "multiply merged values by |S|, as the paper's readers report"),
            Parameter("size_bias", "bool", False, "add a log|S| logit bias to each merged slot"),
            Parameter("score", "str", "aggregated", "score source of the top-k and pivots: aggregated, window, reconstruction, expected, or a+b"),
            Parameter("recent_share", "float | None", None, "recent window as a share of the budget (instead of recent_ratio)"),
            Parameter("topk_share", "float | None", None, "top-k protection as a share of the budget (instead of topk_ratio)"),
            Parameter("statistic", "str", "exact", "aggregated attention from every query (exact) or estimated from a sample"),
            Parameter("window_kernel", "int", 5, "keys the window score is pooled over (odd; SnapKV's 5; 31 in compare's variant)"),
            Parameter("window_pooling", "str", "avg", "pooling of the window score: avg (SnapKV's) or max"),
            Parameter("max_set_size", "int | None", None, "cap on the tokens of one merging set (None: no cap, the paper's)"),
            Parameter("score_kernel", "int", 1, "keys the other score sources are pooled over (odd; 1: none, their papers')"),
            Parameter("score_pooling", "str", "max", "pooling of the other score sources: avg or max"),
            HEAD_BUDGET,
            HEAD_FLOOR,
        ),
    ),
    MethodEntry(
        "kvzip",
        "KVzip (Kim et al. 2025): keep the keys most attended while the model repeats the context (query-agnostic)",
        (_budget(), HEAD_BUDGET, HEAD_FLOOR),
    ),
    MethodEntry(
        "random",
        "Random eviction: a uniform, seeded subset of tokens per head (the floor to beat)",
        (_budget(), Parameter("seed", "int", 0, "seed of the draws (each layer draws its own)")),
    ),
    MethodEntry(
        "snapkv",
        "SnapKV (Li et al. 2024): attention from the last 32 queries, pooled (kernel 5), top-k + window",
        (
            _budget(),
            Parameter("window", "int", 32, "last prompt queries whose attention scores the keys (always kept)"),
            Parameter("kernel_size", "int", 5, "odd width of the pooling along the sequence"),
            Parameter("pooling", "str", "avg", "avg or max pooling"),
            HEAD_BUDGET,
            HEAD_FLOOR,
        ),
    ),
    MethodEntry(
        "streaming-llm",
        "StreamingLLM (Xiao et al. 2024): 4 attention sinks + the most recent tokens",
        (_budget(), Parameter("n_sink", "int", 4, "first tokens always kept (attention sinks)")),
    ),
    MethodEntry(
        "tova",
        "TOVA (Oren et al. 2024): the last query's attention averaged over all heads, one selection per layer",
        (_budget(),),
    ),
)

SYNTAX = """\
Every method is built with a budget, the share of the prompt's KV cache it keeps: exactly
ceil(budget x T) slots per layer and KV head for a prompt of T tokens (the full cache ignores it).

Parameters go after the method's name, NAME=VALUE pairs separated by commas, values read as
Python literals (True, 5, 0.1, None; anything else is a string):

  kvmerger eval --methods kvmerger:mode=paper,eps=0.8 h2o:recent_share=0.25 --budgets 0.5 0.35
  kvmerger generate --method kvmerger --param size_bias=True --budget 0.35 --file long.txt
  kvmerger eval --methods all            (every method with its defaults)

In Python: get_method("kvmerger", budget=0.35, mode="paper").
"""


def format_default(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def listing() -> str:
    """The text of `kvmerger methods`: each method, its summary, and its parameters."""
    lines = []
    for entry in CATALOG:
        lines.append(f"{entry.name}: {entry.summary}")
        width = max(len(f"{p.name}={format_default(p.default)}") for p in entry.parameters)
        for parameter in entry.parameters:
            setting = f"{parameter.name}={format_default(parameter.default)}"
            lines.append(f"    {setting:<{width}}  ({parameter.type}) {parameter.help}")
        lines.append("")
    lines.append("Give parameters as METHOD:NAME=VALUE,... (see `kvmerger methods --help`).")
    return "\n".join(lines)
