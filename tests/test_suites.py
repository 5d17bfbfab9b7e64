"""The suites `kvmerger compare` runs: both protocols, KVMerger's best variant next to the paper's, and
the score-based baselines; `--methods` still replaces the suite's methods."""

from __future__ import annotations

from kvmerger.evaluation.runner import MethodSpec
from kvmerger.evaluation.suites import COMPARE, COMPRESS_ONCE_VARIANT, PAPER_COMPARISON, QUICK, QUERY_AWARE_VARIANT


def test_compare_runs_both_protocols_with_a_best_variant_for_each_and_the_score_baselines():
    settings = COMPARE.settings()
    names = [spec.name for spec in settings.methods]
    assert names[:4] == ["full", "kvmerger", "fitted-kvmerger", "fitted-kvmerger"]
    assert set(PAPER_COMPARISON) | {"kvzip", "expected-attention"} <= set(names)
    assert settings.methods[2:4] == [QUERY_AWARE_VARIANT, COMPRESS_ONCE_VARIANT]
    asked, once = (spec.variants([0.35])[0] for spec in settings.methods[2:4])
    assert (asked.score, asked.window_kernel, asked.window_pooling, asked.head_budget) == ("window", 31, "max", "shared")
    assert asked.protection() == (0.15 * 0.35, 0.8 * 0.35)  # shares of the budget, as prompt shares
    assert (once.score, once.head_budget) == ("reconstruction", "shared")
    assert once.protection() == (0.05 * 0.35, 0.9 * 0.35)
    assert [spec.protocols for spec in settings.methods[2:4]] == [("query-aware",), ("query-agnostic",)]
    assert all(spec.protocols is None for spec in settings.methods[4:])
    protocols = {plan.task.name: plan.protocols for plan in settings.plans if plan.protocols}
    assert protocols == {"passkey": ("query-agnostic",)}
    assert [plan.task.keys for plan in settings.plans if plan.task.name == "passkey"] == [1, 3]


def test_given_methods_replace_the_suites_own():
    settings = COMPARE.settings([MethodSpec("h2o")], [0.5])
    assert [spec.name for spec in settings.methods] == ["h2o"] and settings.budgets == [0.5]
    assert [spec.name for spec in QUICK.settings().methods] == list(PAPER_COMPARISON)


def test_all_beside_other_method_specs_adds_them_once():
    from kvmerger.cli.eval import method_specs
    from kvmerger.evaluation.runner import all_methods

    every = all_methods()
    assert method_specs(["all"]) == every
    specs = method_specs(["all", "kvmerger:mode=paper", "h2o"])
    assert specs == every + [MethodSpec("kvmerger", {"mode": "paper"})]
    assert method_specs(["h2o", "h2o"]) == [MethodSpec("h2o")]
