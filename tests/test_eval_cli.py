"""`kvmerger eval` end to end on the default model (short contexts, 2 methods x 1 budget): the records'
content, the CSV numbers, real PNG images; and the errors a person can act on (exit code 2)."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
from PIL import Image

import kvmerger.cli.main as cli_main

pytestmark = pytest.mark.model

ARGS = [
    "eval",
    "--tasks", "passkey", "needle", "lm:continuation=64",
    "--methods", "full", "kvmerger",
    "--budgets", "0.5",
    "--lengths", "512",
    "--samples", "2",
    "--no-progress",
]  # fmt: skip


def main(argv: list[str]) -> int:
    """kvmerger's own entry point, exit code included (argparse's errors exit through SystemExit)."""
    try:
        return cli_main.main(argv)
    except SystemExit as exit:
        return int(exit.code)


@pytest.fixture(scope="module")
def results(default_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    assert main([*ARGS, "--out", str(folder)]) == 0
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    with open(folder / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    return folder, records, summary


def test_records_hold_what_the_model_answered(results):
    _, records, _ = results
    assert len(records) == 3 * 2 * 2  # 3 tasks x 2 samples x (full, kvmerger@0.5)
    full = {(r["task"], r["sample"]): r for r in records if r["method"] == "full"}
    for sample in range(2):
        passkey = full[("passkey", sample)]
        assert passkey["answers"][0] in passkey["prediction"] and passkey["score"] == 1.0
        needle = full[("needle", sample)]
        assert "Dolores Park" in needle["prediction"] and needle["score"] == 1.0
        lm = full[("lm[continuation=64]", sample)]
        assert lm["metrics"]["kl"] == 0.0 and 3 < lm["metrics"]["perplexity"] < 100
    for record in records:
        assert abs(record["prefill_tokens"] - 512) <= 3 if record["task_name"] != "lm" else record["prefill_tokens"] == 512
        if record["method"] == "kvmerger":
            assert record["budget"] == 0.5 and record["cache"]["bytes_after"] * 2 == record["cache"]["bytes_before"]
            assert record["method_params"]["mode"] == "exact"
            assert record["cache"]["merge_sets"] > 0
            if record["task_name"] == "lm":
                assert 0 < record["metrics"]["kl"] < 0.5
        assert record["provenance"]["model"]["name"] == "SmolLM2-135M-Instruct"


def test_summary_csv_numbers_are_the_means_of_the_records(results):
    _, records, summary = results
    assert len(summary) == 6
    for row in summary:
        cells = [r for r in records if (r["task"], r["method_label"]) == (row["task"], row["method"])]
        assert int(row["cells"]) == len(cells) == 2
        assert float(row["score"]) == pytest.approx(statistics.fmean(r["score"] for r in cells), rel=1e-5)
        if row["task"].startswith("lm"):
            assert float(row["kl"]) == pytest.approx(statistics.fmean(r["metrics"]["kl"] for r in cells), rel=1e-5)
    memory = {row["method"]: float(row["memory_ratio"]) for row in summary}
    assert memory == {"full": 1.0, "kvmerger": 0.5}
    metrics = {row["task"]: row["metric"] for row in summary}
    assert metrics == {"passkey": "contains_answer", "needle": "keyword_recall", "lm[continuation=64]": "top1_agreement"}


def test_the_shared_statistics_are_reported_once_per_sample_and_charged_to_no_method(results):
    _, records, summary = results
    per_sample: dict[tuple, float] = {}
    for r in records:
        key = (r["task"], r["sample"])
        per_sample[key] = per_sample.get(key, 0.0) + r["seconds"]["scoring"]
    for task in {r["task"] for r in records}:
        rows = [row for row in summary if row["task"] == task]
        expected = 1e3 * statistics.fmean(seconds for (name, _), seconds in per_sample.items() if name == task)
        assert {row["method"] for row in rows} == {"full", "kvmerger"}
        for row in rows:  # the same number in every row of the task: it belongs to the samples
            assert float(row["shared_scoring_ms"]) == pytest.approx(expected, rel=1e-4)
    kvmerger_statistics = [r["seconds"]["scoring"] for r in records if r["method"] == "kvmerger"]
    assert min(kvmerger_statistics) > 0  # kvmerger asks for the aggregated attention in every sample


def test_figures_are_real_images_and_the_report_shows_them(results):
    folder, _, summary = results
    figures = sorted((folder / "figures").glob("*.png"))
    assert {path.name for path in figures} == {
        "passkey_query-aware_score_vs_budget.png",
        "needle_query-aware_score_vs_budget.png",
        "lm_continuation_64_kl_and_perplexity_vs_budget.png",
        "lm_continuation_64_worst_token_kl_and_top1_changes_vs_budget.png",
        "needle_query-aware_full_score_by_length_and_depth.png",
        "needle_query-aware_kvmerger_score_by_length_and_depth.png",
    }
    for path in figures:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10  # something is drawn
    report = (folder / "report.md").read_text()
    for path in figures:
        assert f"(figures/{path.name})" in report
    kvmerger = next(row for row in summary if row["task"] == "passkey" and row["method"] == "kvmerger")
    assert f"| kvmerger | 0.5 | {float(kvmerger['score']):.2f} |" in report


def test_a_second_run_into_the_same_folder_redoes_nothing(results, capsys):
    folder, records, _ = results
    assert main([*ARGS, "--out", str(folder)]) == 0
    assert "12 of 12 cells were already done" in capsys.readouterr().err
    assert len((folder / "records.jsonl").read_text().splitlines()) == len(records)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--methods", "zip"], "unknown method 'zip'; known methods: "),
        (["eval", "--tasks", "trivia"], "unknown task 'trivia'; known tasks: "),
        (["eval", "--budgets", "1.5"], "a budget is the share of the cache kept, in (0, 1]"),
        (["eval", "--budgets", "0"], "a budget is the share of the cache kept, in (0, 1]"),
        (["eval", "--tasks", "passkey", "--lengths", "9000", "--methods", "full"], "context of 8192 tokens"),
        (["eval", "--tasks", "longbench:dataset=qasper", "--data-dir", "/no/such/folder"], "is not a folder"),
        (["compare", "--methods", "full", "zip"], "known methods: "),
    ],
)
def test_errors_say_what_to_do_and_exit_with_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
