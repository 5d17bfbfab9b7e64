"""Where the model says to merge: key/value similarity maps and per-layer merge shares.

    from kvmerger.analysis import analyze, build_samples, write_all
    samples = build_samples(tokenizer, ["essays", "drama", "haystack"], tokens=2048, count=4)
    profile = analyze(model, samples, model_name="SmolLM2-135M-Instruct")
    write_all(profile, Path("results/analyze/SmolLM2-135M-Instruct"))

Modules: samples (the texts), merge_profile (the numbers), records (JSON and CSV), figures (PNG),
summary (Markdown). The command line is `kvmerger analyze`.
"""

from __future__ import annotations

from pathlib import Path

from kvmerger.analysis.figures import draw_all
from kvmerger.analysis.merge_profile import (
    VARIANTS,
    MergeProfile,
    analyze,
    key_value_contrast,
    persistence,
)
from kvmerger.analysis.records import write_records
from kvmerger.analysis.samples import KINDS, TextSample, build_samples
from kvmerger.analysis.summary import summary_markdown


def write_all(profile: MergeProfile, folder: Path) -> list[Path]:
    """profile.json, the CSV tables, the PNG figures and summary.md, in `folder`."""
    paths = write_records(profile, folder) + draw_all(profile, folder)
    summary = folder / "summary.md"
    summary.write_text(summary_markdown(profile), encoding="utf-8")
    return [*paths, summary]


__all__ = [
    "KINDS",
    "VARIANTS",
    "MergeProfile",
    "TextSample",
    "analyze",
    "build_samples",
    "key_value_contrast",
    "persistence",
    "summary_markdown",
    "write_all",
]
