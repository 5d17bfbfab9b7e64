"""Figures where every method can be told apart (own colour and marker, side by side at each budget,
a far-off perplexity named and drawn at the edge instead of squeezing the others), and a report that
explains only the metrics of its own tasks."""

from __future__ import annotations

from kvmerger.evaluation.plots import (
    _style,
    budget_offsets,
    language_modeling_figure,
    off_scale,
    score_figure,
)
from kvmerger.evaluation.report import Row, score_explanation

METHODS = ["kvmerger", "cam", "h2o", "knorm", "random", "snapkv", "streaming-llm", "tova"]


def row(method: str, budget: float, score: float = 1.0, perplexity: float | None = None) -> Row:
    lm = perplexity is not None
    return Row(
        task="lm" if lm else "passkey",
        protocol="teacher-forced" if lm else "query-aware",
        method=method,
        method_name=method.split("[")[0],
        budget=budget,
        cells=5,
        lengths=[2048],
        metric="top1_agreement" if lm else "contains_answer",
        score=score,
        score_stderr=0.0,
        perplexity=perplexity,
        kl=0.05 if lm else None,
        top1_agreement=0.9 if lm else None,
        memory_ratio=budget,
        cache_memory_ratio=budget,
        shared_scoring_ms=0.0,
        compressing_ms=1.0,
        decoding_ms=1.0,
    )


def test_methods_with_equal_scores_stay_apart():
    rows = [row(name, budget) for name in METHODS for budget in (0.5, 0.35)]  # every score 1.0
    offsets = budget_offsets(rows, len(METHODS))
    assert len(set(offsets)) == len(METHODS) and max(offsets) - min(offsets) <= 0.4 * 0.15 + 1e-12
    styles = [_style(index, name) for index, name in enumerate(METHODS)]
    assert len({(s["color"], s["marker"]) for s in styles}) == len(METHODS)
    axes = score_figure(rows, "passkey").axes[0]
    xs = {line.get_label(): tuple(line.get_xdata()) for line in axes.get_lines() if line.get_label() in METHODS}
    assert len(set(xs.values())) == len(METHODS)  # no two methods drawn at the same places


def test_a_far_off_perplexity_is_drawn_at_the_edge_and_named():
    perplexities = dict(zip(METHODS, [28.8, 28.7, 28.6, 32.5, 143.9, 29.9, 28.9, 29.2], strict=True))
    assert off_scale({name: [value] for name, value in perplexities.items()}) == {"random"}
    rows = [row(name, 0.5, perplexity=value) for name, value in perplexities.items()]
    rows.append(row("full", 1.0, perplexity=28.25))
    axes = language_modeling_figure(rows, "lm").axes[1]
    labels = [line.get_label() for line in axes.get_lines()]
    assert "random (off the scale: 143.9)" in labels
    low, high = axes.get_ylim()
    assert high < 40 and low > 20  # the seven others spread over the axis


def test_a_pass_key_only_report_explains_only_the_pass_key():
    text = score_explanation([row(name, 0.5) for name in METHODS])
    assert "passkey: the key (or answer) found in the answer" in text and "Query-aware" in text
    assert "needle" not in text and "KL" not in text and "perplexity" not in text
    both = score_explanation([row("h2o", 0.5), row("h2o", 0.5, perplexity=30.0)])
    assert "passkey:" in both and "KL divergence" in both and "needle" not in both
