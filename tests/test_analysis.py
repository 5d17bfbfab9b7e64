"""The merge analysis (`kvmerger analyze`): its numbers on hand-built tensors, its statistics on
hand-computed cases, its agreement with the engine on a tiny random model, and the files it writes."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch

from kvmerger import KVMerger, compress_prefill, record_prefill
from kvmerger.analysis import analyze, build_samples, persistence, write_all
from kvmerger.analysis.merge_profile import (
    CosineDistribution,
    MergeProfile,
    SampleResult,
    cosine_matrix,
    layer_variance_share,
    mean_pairwise_correlation,
    measure_layer,
    pearson,
    variant_mergers,
)
from kvmerger.analysis.samples import NEEDLE, TextSample
from kvmerger.cli import analyze as analyze_cli
from kvmerger.methods.kvmerger import adjacent_similarity, paper_protection
from tests.conftest import build_tiny
from tests.reference import kvmerger_row


def char_tokenizer():
    """A character-level tokenizer (97 ids) for the tiny models, with a decoder that round-trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


# --------------------------------------------------------------------------------------------
# One layer, hand-built tensors
# --------------------------------------------------------------------------------------------


def test_identical_adjacent_keys_have_similarity_one_and_all_tokens_merge():
    length, dim = 100, 8
    keys = torch.randn(1, 1, 1, dim).expand(1, 2, length, dim).contiguous()
    values = torch.randn(1, 2, length, dim)
    attention = torch.arange(length, dtype=torch.float32).expand(1, 2, length)  # top-k = latest non-recent
    measure = measure_layer(keys, values, attention, variant_mergers(0.75, 0.5))
    assert torch.allclose(measure.key_similarity, torch.ones(2, length - 1), atol=1e-6)
    assert measure.merged_share["no protection"].tolist() == [1.0, 1.0]
    assert torch.allclose(measure.slots_share["no protection"], torch.full((2,), 1 / length))
    # the paper's protection at budget 0.5: 17 recent + 12 top-k tokens (here the 12 before them) stay alone
    assert torch.allclose(measure.merged_share["paper protection"], torch.full((2,), 0.71))
    assert torch.allclose(measure.slots_share["paper protection"], torch.full((2,), 0.30))


def test_orthogonal_adjacent_keys_have_similarity_zero_and_nothing_merges():
    length = 16
    keys = torch.eye(length).expand(1, 3, length, length).contiguous() * 7.0
    measure = measure_layer(keys, keys.clone(), torch.rand(1, 3, length), variant_mergers())
    assert torch.equal(measure.key_similarity, torch.zeros(3, length - 1))
    assert torch.equal(measure.value_similarity, torch.zeros(3, length - 1))
    for variant in ("no protection", "paper protection"):
        assert measure.merged_share[variant].tolist() == [0.0, 0.0, 0.0]
        assert measure.slots_share[variant].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("eps", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("budget", [0.35, 0.5])
def test_merged_share_equals_the_plain_reference_of_algorithm_1(eps, budget):
    rng = np.random.default_rng(int(eps * 100 + budget * 10))
    batch, heads, length, dim = 2, 3, 60, 6
    steps = rng.normal(scale=0.5, size=(batch, heads, length, dim))
    keys = np.cumsum(steps, axis=2) + rng.normal(size=(batch, heads, 1, dim))
    attention = rng.random((batch, heads, length)).astype(np.float32)
    measure = measure_layer(
        torch.tensor(keys, dtype=torch.float32),
        torch.randn(batch, heads, length, dim),
        torch.tensor(attention),
        variant_mergers(eps, budget),
    )
    recent, topk = paper_protection(budget)
    for variant, (n_recent, n_topk) in {
        "no protection": (0, 0),
        "paper protection": (math.floor(recent * length + 1e-9), math.floor(topk * length + 1e-9)),
    }.items():
        expected = []
        for b in range(batch):
            for h in range(heads):
                row = kvmerger_row(
                    keys[b, h], keys[b, h], attention[b, h], slots=length, mode="paper", eps=eps,
                    n_recent=n_recent, n_topk=n_topk, sigma=None, scale_values=False,
                )  # fmt: skip
                expected.append(sum(size for size in row["sizes"] if size > 1) / length)
        assert measure.merged_share[variant].tolist() == pytest.approx(expected, abs=1e-7)


def test_cosine_matrix_first_off_diagonal_is_the_engines_adjacent_similarity():
    x = torch.randn(40, 16) * 30.0
    x[7] = 0.0
    matrix = cosine_matrix(x)
    assert torch.allclose(matrix.diagonal(1), adjacent_similarity(x[None])[0], atol=1e-6)
    assert torch.allclose(matrix, matrix.T)
    assert matrix[7].abs().max() == 0.0
    assert torch.allclose(matrix.diagonal()[torch.arange(40) != 7], torch.ones(39), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Statistics, hand-computed
# --------------------------------------------------------------------------------------------


def test_pearson_on_hand_computed_cases():
    assert pearson(np.array([1, 2, 3]), np.array([1, 3, 2])) == pytest.approx(0.5)
    assert pearson(np.array([1, 2, 3, 4]), np.array([2, 4, 6, 8])) == pytest.approx(1.0)
    assert pearson(np.array([1, 2, 3, 4]), np.array([8, 6, 4, 2])) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.array([1.0, 1.0, 1.0]), np.array([1, 2, 3])))
    with pytest.raises(ValueError, match="1-D profiles"):
        pearson(np.array([1, 2]), np.array([1, 2, 3]))


def test_mean_pairwise_correlation_and_layer_variance_share_by_hand():
    rows = np.array([[1.0, 2.0, 3.0], [1.0, 3.0, 2.0], [3.0, 2.0, 1.0]])
    # pairs: (0,1) 0.5, (0,2) -1, (1,2) -0.5
    assert mean_pairwise_correlation(rows) == pytest.approx((0.5 - 1.0 - 0.5) / 3)
    assert math.isnan(mean_pairwise_correlation(rows[:1]))
    # grand mean 0.4; total SS 0.2; layer means 0.2, 0.6 -> between 2 * (0.04 + 0.04) = 0.16
    assert layer_variance_share(np.array([[0.1, 0.5], [0.3, 0.7]])) == pytest.approx(0.8)
    assert layer_variance_share(np.array([[0.2, 0.6], [0.2, 0.6]])) == pytest.approx(1.0)
    assert math.isnan(layer_variance_share(np.full((3, 4), 0.5)))


def hand_profile(shares: dict[str, list[list[float]]]) -> MergeProfile:
    """A profile whose samples carry the given per-layer merged shares (both variants alike)."""
    samples = [
        SampleResult(kind, i, 10, {}, {"no protection": row, "paper protection": row}, {"no protection": row, "paper protection": row}, {}, [], [])
        for kind, rows in shares.items()
        for i, row in enumerate(rows)
    ]
    layers = len(next(iter(shares.values()))[0])
    settings = {"eps": 0.75, "budget_for_protection": 0.5, "protection": {"recent_ratio": 0.17, "topk_ratio": 0.12}}
    return MergeProfile("hand", settings, layers, 1, list(shares), samples, CosineDistribution(layers, 0.75), CosineDistribution(layers, 0.75), [])


def test_persistence_numbers_on_a_hand_computed_profile():
    profile = hand_profile(
        {
            "a": [[0.1, 0.3, 0.5], [0.3, 0.5, 0.7]],  # mean 0.2 0.4 0.6
            "b": [[0.2, 0.6, 0.4], [0.2, 0.6, 0.4]],  # mean 0.2 0.6 0.4
        }
    )
    stats = persistence(profile, "no protection")
    assert stats.by_kind["a"].mean.tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert stats.by_kind["a"].std.tolist() == pytest.approx([math.sqrt(0.02)] * 3)  # ddof=1 of two values 0.2 apart
    assert stats.by_kind["b"].std.tolist() == pytest.approx([0.0] * 3)
    assert stats.between_kinds[("a", "b")] == pytest.approx(0.5)  # [-1, 0, 1] against [-1, 1, 0]
    assert stats.level_difference[("a", "b")] == pytest.approx(0.4 / 3)
    assert stats.within_kind == pytest.approx({"a": 1.0, "b": 1.0})
    assert stats.mean_spread["a"] == pytest.approx(math.sqrt(0.02))
    everything = np.array([[0.1, 0.3, 0.5], [0.3, 0.5, 0.7], [0.2, 0.6, 0.4], [0.2, 0.6, 0.4]])
    grand = everything.mean()
    expected = 4 * ((everything.mean(axis=0) - grand) ** 2).sum() / ((everything - grand) ** 2).sum()
    assert stats.layer_variance_share == pytest.approx(expected)
    with pytest.raises(ValueError, match="variant"):
        persistence(profile, "protected")


def test_cosine_distribution_is_exact_in_mean_and_close_in_quantiles():
    values = torch.linspace(-0.9, 0.95, 1001)
    distribution = CosineDistribution(2, eps=0.75)
    distribution.add(1, values[:500])
    distribution.add(1, values[500:])
    assert distribution.total.tolist() == [0, 1001]
    assert distribution.mean()[1] == pytest.approx(float(values.double().mean()), abs=1e-12)
    assert distribution.std()[1] == pytest.approx(float(values.double().std(unbiased=False)), abs=1e-9)
    assert distribution.share_above_eps()[1] == pytest.approx(float((values > 0.75).double().mean()))
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert distribution.quantile(q)[1] == pytest.approx(float(np.quantile(values.numpy(), q)), abs=0.005)
    assert math.isnan(distribution.quantile(0.5)[0])


# --------------------------------------------------------------------------------------------
# Whole runs on a tiny random model
# --------------------------------------------------------------------------------------------


def random_samples(kinds: dict[str, int], length: int) -> list[TextSample]:
    generator = torch.Generator().manual_seed(3)
    return [
        TextSample(kind, i, torch.randint(0, 128, (1, length), generator=generator))
        for kind, count in kinds.items()
        for i in range(count)
    ]


def test_merged_share_agrees_with_what_the_engine_merges_when_it_compresses(tiny_llama):
    samples = random_samples({"x": 1, "y": 1}, 64)
    profile = analyze(tiny_llama, samples, heatmap_layers=[1], heatmap_heads=[0, 1], window=16, progress=False)
    assert profile.kinds == ["x", "y"] and profile.num_layers == 3 and profile.num_kv_heads == 2
    mergers = variant_mergers()
    for sample, result in zip(samples, profile.samples):
        prefill = record_prefill(tiny_llama, sample.ids)
        for variant, merger in mergers.items():
            _, report = compress_prefill(prefill, merger)
            for layer, layer_report in enumerate(report.layers):
                merged = sum(size * count for size, count in layer_report.merge_set_sizes.items())
                assert result.merged_share[variant][layer] == pytest.approx(merged / (2 * 64))
                assert result.slots_share[variant][layer] == pytest.approx(layer_report.notes["real_slots_mean"] / 64)
        for layer, cache_layer in enumerate(prefill.cache.layers):
            expected = adjacent_similarity(cache_layer.keys.reshape(2, 64, -1)).mean()
            assert result.key_cosine_mean[layer] == pytest.approx(float(expected), abs=1e-6)
        assert all(
            p <= n + 1e-9 for p, n in zip(result.merged_share["paper protection"], result.merged_share["no protection"])
        )
    assert profile.key_cosine.total.tolist() == [2 * 2 * 63] * 3
    assert [(h.layer, h.head, h.start, tuple(h.keys.shape)) for h in profile.heatmaps] == [(1, 0, 24, (16, 16)), (1, 1, 24, (16, 16))]


def test_analyze_rejects_bad_input(tiny_llama):
    samples = random_samples({"x": 1}, 16)
    with pytest.raises(ValueError, match="layer indices"):
        analyze(tiny_llama, samples, heatmap_layers=[3], progress=False)
    with pytest.raises(ValueError, match="KV head indices"):
        analyze(tiny_llama, samples, heatmap_heads=[2], progress=False)
    with pytest.raises(ValueError, match="nothing to analyse"):
        analyze(tiny_llama, [], progress=False)
    with pytest.raises(ValueError, match="exceed the model's context"):
        analyze(tiny_llama, random_samples({"x": 1}, 1025), progress=False)


def test_samples_have_exact_lengths_distinct_offsets_and_deterministic_needles(tmp_path):
    tokenizer = char_tokenizer()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("A line of text.\n\n" * 400, encoding="utf-8")
    samples = build_samples(tokenizer, ["essays", "drama", "haystack", str(text_file)], tokens=300, count=3, seed=5, needles=2)
    assert [s.kind for s in samples] == ["essays"] * 3 + ["drama"] * 3 + ["haystack"] * 3 + ["notes"] * 3
    assert all(s.ids.shape == (1, 300) for s in samples)
    for kind in ("essays", "drama"):
        offsets = [s.meta["char_offset"] for s in samples if s.kind == kind]
        assert offsets[0] == 0 and offsets == sorted(set(offsets))
    haystacks = [s for s in samples if s.kind == "haystack"]
    for sample in haystacks:
        text = tokenizer.decode(sample.ids[0])
        for needle in sample.meta["needles"]:
            assert NEEDLE.format(word=needle["word"], number=needle["number"]) in text
            assert len(needle["number"]) == 7
    assert haystacks[0].meta["needles"] != haystacks[1].meta["needles"]
    again = build_samples(tokenizer, ["haystack"], tokens=300, count=3, seed=5, needles=2)
    assert [s.meta for s in again] == [s.meta for s in haystacks]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(again, haystacks))


def test_samples_reject_bad_input():
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="neither a text kind"):
        build_samples(tokenizer, ["poetry"], tokens=100, count=1)
    with pytest.raises(ValueError, match="at least 1"):
        build_samples(tokenizer, ["essays"], tokens=100, count=0)
    with pytest.raises(ValueError, match="too many"):
        build_samples(tokenizer, ["haystack"], tokens=100, count=1, needles=3)
    with pytest.raises(ValueError, match="without repeats"):
        build_samples(tokenizer, ["essays", "essays"], tokens=100, count=1)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_analyze_command_writes_its_files_with_the_expected_content(tmp_path, capsys):
    model_dir = tmp_path / "tiny-llama"
    build_tiny("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    analyze_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["analyze", "--model", str(model_dir), "--tokens", "120", "--samples", "2", "--needles", "1",
         "--layers", "0", "2", "--heads", "1", "--window", "32", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert analyze_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "# Where tiny-llama says to merge" in printed and f"Written to {out}/" in printed

    expected = {"profile.json", "merge_share_samples.csv", "merge_share_profile.csv", "adjacent_cosine.csv",
                "correlations.csv", "overview.png", "heatmaps.png", "adjacent_cosine.png", "merge_share.png", "summary.md"}  # fmt: skip
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    document = json.loads((out / "profile.json").read_text())
    assert document["model"] == "tiny-llama" and document["kinds"] == ["essays", "drama", "haystack"]
    assert document["settings"]["samples_per_kind"] == {"essays": 2, "drama": 2, "haystack": 2}
    assert document["settings"]["heatmap_layers"] == [0, 2] and document["settings"]["heatmap_heads"] == [1]
    assert len(document["samples"]) == 6 and len(document["heatmaps"]) == 2
    assert len(document["samples"][4]["meta"]["needles"]) == 1
    no_protection = document["merged_share"]["no protection"]
    assert {(p["kind_a"], p["kind_b"]) for p in no_protection["between_kinds"]} == {
        ("essays", "drama"), ("essays", "haystack"), ("drama", "haystack")
    }  # fmt: skip
    for kind, stats in no_protection["by_kind"].items():
        shares = [s["merged_share"]["no protection"] for s in document["samples"] if s["kind"] == kind]
        assert stats["mean"] == pytest.approx(np.mean(shares, axis=0).tolist())
        assert all(0.0 <= x <= 1.0 for x in stats["mean"])
    keys = document["adjacent_cosine"]["keys"]
    assert len(keys["mean"]) == 3 and all(keys["p05"][i] <= keys["p50"][i] <= keys["p95"][i] for i in range(3))

    with (out / "merge_share_samples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 2 * 3
    first = document["samples"][0]
    row = next(r for r in rows if (r["kind"], r["sample"], r["variant"], r["layer"]) == ("essays", "0", "paper protection", "2"))
    assert float(row["merged_share"]) == pytest.approx(first["merged_share"]["paper protection"][2])
    with (out / "correlations.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 3
    summary = (out / "summary.md").read_text()
    assert summary == printed.split(f"Written to {out}/")[0].rstrip("\n") + "\n"
    assert "| 2 |" in summary and "essays vs drama" in summary


def test_default_output_folder_is_named_after_the_model():
    assert analyze_cli.model_name(None) == "SmolLM2-135M-Instruct"
    assert analyze_cli.model_name("/models/Qwen2-0.5B/") == "Qwen2-0.5B"
    assert analyze_cli.model_name("weights/tiny.Q4_1.gguf") == "tiny.Q4_1"


# --------------------------------------------------------------------------------------------
# The default model, short samples
# --------------------------------------------------------------------------------------------


@pytest.mark.model
def test_default_model_keys_are_alike_values_are_not_and_the_profile_persists(default_model):
    model, tokenizer = default_model
    samples = build_samples(tokenizer, ["essays", "drama", "haystack"], tokens=256, count=2)
    profile = analyze(model, samples, model_name="SmolLM2-135M-Instruct", progress=False)
    keys, values = profile.key_cosine.mean(), profile.value_cosine.mean()
    assert (keys > values).sum() >= 28  # observation 1 in nearly every layer
    assert keys.mean() > values.mean() + 0.3
    stats = persistence(profile, "no protection")
    assert min(stats.between_kinds.values()) > 0.8  # observation 2: one per-layer profile for every kind
    assert stats.layer_variance_share > 0.7


def test_a_mixed_model_is_profiled_on_its_full_attention_layers_only():
    model = build_tiny("gemma3")  # layers 0 and 2 sliding, 1 and 3 full attention
    samples = random_samples({"x": 1, "y": 1}, 32)
    profile = analyze(model, samples, heatmap_heads=[0], window=8, progress=False)
    assert profile.layer_ids == [1, 3] and profile.num_layers == 2 and profile.settings["model_layers"] == 4
    assert [h.layer for h in profile.heatmaps] == [1, 3]
    for sample, result in zip(samples, profile.samples):
        _, report = compress_prefill(record_prefill(model, sample.ids), variant_mergers()["no protection"])
        assert [layer.layer for layer in report.layers] == [1, 3]
        for position, layer_report in enumerate(report.layers):
            merged = sum(size * count for size, count in layer_report.merge_set_sizes.items())
            assert result.merged_share["no protection"][position] == pytest.approx(merged / (2 * 32))
    from kvmerger.analysis import summary_markdown

    text = summary_markdown(profile)
    assert "the 2 full-attention layers (1, 3) of 4" in text and "| 3 |" in text
    with pytest.raises(ValueError, match=r"sliding-window layers.*full-attention layers \[1, 3\]"):
        analyze(model, samples, heatmap_layers=[0], progress=False)
