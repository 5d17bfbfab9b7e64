"""Model families on tiny random models: Llama, Mistral (with and without a sliding window), Qwen2,
Qwen3 (both also with `use_sliding_window`) and Gemma 3 (sliding and full layers interleaved).

Full-attention layers are compressed; sliding-window layers keep transformers' own bounded cache.
The references: the plain model for budget 1.0, and the whole sequence run at once with a mask per
layer kind (evicted prompt tokens hidden from later queries in full layers, the window in sliding
ones) for masks and positions after compression, in a chunk, token by token and in `generate()`.
"""

from functools import cache

import pytest
import torch

from kvmerger import (
    CompressedCache,
    FullCache,
    KVMerger,
    UnsupportedModelError,
    attach,
    compress,
    compress_prefill,
    record_prefill,
)
from kvmerger.engine.hf import CompressedLayer
from kvmerger.methods import METHODS, get_method
from tests.conftest import FAMILIES, WINDOW, CharTokenizer, build_tiny
from tests.test_engine import KeepEven

MIXED = ["gemma3", "qwen2-sliding", "qwen3-sliding"]
COMPRESSIBLE = ["llama", "mistral", "qwen2", "qwen3", *MIXED]
IDS = torch.randint(4, 128, (1, 48), generator=torch.Generator().manual_seed(3))  # no pad, bos or eos ids


@cache
def tiny(family: str) -> torch.nn.Module:
    return build_tiny(family)


def full_layers(model) -> list[int]:
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [index for index, kind in enumerate(kinds) if kind == "full_attention"]


def sliding_layers(model) -> list[int]:
    return [index for index in range(model.config.num_hidden_layers) if index not in full_layers(model)]


def test_the_mixed_families_mix_layer_kinds_and_the_window_bites():
    for family in MIXED:
        model = tiny(family)
        assert full_layers(model) and sliding_layers(model), family
        assert model.config.sliding_window == WINDOW < IDS.shape[1] // 4


def greedy(model, ids, steps, method=None, **options):
    """Greedy tokens and their logits from `generate()`, plain or inside `compress(model, method)`."""
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        if method is None:
            out = model.generate(ids, output_logits=True, **settings)
        else:
            with compress(model, method, **options):
                out = model.generate(ids, output_logits=True, **settings)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("method", [FullCache(), KVMerger(budget=1.0)], ids=["full", "kvmerger-budget-1"])
@pytest.mark.parametrize("family", COMPRESSIBLE)
def test_budget_one_gives_the_plain_models_logits(family, method):
    model = tiny(family)
    prompt, continuation = IDS[:, :40], IDS[:, 40:]
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        plain = out.logits, model(continuation, cache=out.cache).logits
        with compress(model, method):
            out = model(prompt)
            ours = out.logits, model(continuation, cache=out.cache).logits
    assert torch.equal(plain[0], ours[0]) and torch.equal(plain[1], ours[1])
    sequences, logits = greedy(model, IDS, 6)
    our_sequences, our_logits = greedy(model, IDS, 6, method)
    assert torch.equal(sequences, our_sequences) and torch.equal(logits, our_logits)


@pytest.mark.parametrize("family", COMPRESSIBLE)
def test_every_method_keeps_exact_slots_on_the_compressed_layers_and_leaves_sliding_ones_alone(family):
    model = tiny(family)
    full, sliding = full_layers(model), sliding_layers(model)
    with torch.no_grad():
        plain = model(IDS, use_cache=True).cache
    slot_bytes = 2 * model.model.layers[0].self_attn.head_dim * 4
    for name in sorted(METHODS):
        method = get_method(name) if name == "full" else get_method(name, budget=0.35)
        with torch.no_grad(), compress(model, method, tokenizer=CharTokenizer()) as session:  # kvzip's repeat prompt
            out = model(IDS)
            cache = out.cache
            after_prompt = {i: (cache.layers[i].keys, cache.layers[i].values) for i in sliding}
            for _ in range(2):
                out = model(out.logits[:, -1:].argmax(-1), cache=cache)
        expected = 48 if name == "full" else method.target_slots(48, slot_bytes)
        report = session.report
        assert [layer.layer for layer in report.layers] == full, name
        assert [layer.slots_after for layer in report.layers] == [expected] * len(full), name
        assert [cache.slots()[i] for i in full] == [expected + 2] * len(full), name
        assert [layer.layer for layer in report.kept_layers] == sliding, name
        assert [layer.slots for layer in report.kept_layers] == [WINDOW - 1] * len(sliding), name
        for index, (keys, values) in after_prompt.items():  # the prompt's forward pass is not compressed
            assert torch.equal(keys, plain.layers[index].keys), name
            assert torch.equal(values, plain.layers[index].values), name
        assert torch.isfinite(out.logits).all(), name


@pytest.mark.parametrize("family", COMPRESSIBLE)
def test_greedy_generation_runs_compressed_and_with_a_held_budget(family):
    model = tiny(family)
    for method, hold in ((KVMerger(budget=0.35), False), (get_method("h2o", budget=0.35), True)):
        cache = CompressedCache(model.config)
        with torch.no_grad(), compress(model, method, hold_budget=hold) as session:
            out = model.generate(IDS, cache=cache, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.shape == (1, 64) and len(session.reports) == 1
        full = [cache.slots()[i] for i in full_layers(model)]
        assert full == [17 if hold else 17 + 15] * len(full_layers(model))  # 15: the last token is never cached
        assert [cache.slots()[i] for i in sliding_layers(model)] == [WINDOW - 1] * len(sliding_layers(model))


@pytest.mark.parametrize("family", MIXED)
def test_the_report_states_the_budget_and_the_whole_cache(family):
    model = tiny(family)
    with torch.no_grad(), compress(model, KVMerger(budget=0.5)) as session:
        model(IDS)
    report = session.report
    slot_bytes = 2 * model.model.layers[0].self_attn.head_dim * 4 * model.config.num_key_value_heads
    full, sliding = len(full_layers(model)), len(sliding_layers(model))
    assert report.bytes_before == full * 48 * slot_bytes and report.bytes_after == full * 24 * slot_bytes
    assert report.kept_bytes == sliding * (WINDOW - 1) * slot_bytes
    assert report.memory_ratio == 0.5
    assert report.cache_memory_ratio == pytest.approx((full * 24 + sliding * 7) / (full * 48 + sliding * 7))
    summary = report.summary()
    assert f"{full} compressed layers" in summary and "(50.0%)" in summary
    assert "whole cache" in summary and f"{report.cache_memory_ratio:.1%}" in summary
    assert f"{sliding} sliding attention layers kept" in summary
    assert report.to_dict()["cache_memory_ratio"] == report.cache_memory_ratio


def masked_reference(model, ids, prompt_length, evicted):
    """Logits of `ids` run at once: in full layers, queries after the prompt do not see the `evicted`
    prompt positions; sliding layers see their window; both causal."""
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    full = causal.clone()
    full[prompt_length:, evicted] = False
    sliding = causal & ~torch.ones(length, length, dtype=torch.bool).tril(-WINDOW)
    masks = {"full_attention": full[None, None], "sliding_attention": sliding[None, None]}
    with torch.no_grad():
        return model(ids, attention_mask=masks).logits[0]


@pytest.mark.parametrize("family", MIXED)
def test_masks_and_positions_after_eviction_on_both_kinds_of_layer(family):
    """A chunk and then single tokens after a compressed prompt equal the masked whole-sequence run."""
    model = tiny(family)
    expected = masked_reference(model, IDS, 40, list(range(1, 40, 2)))  # KeepEven keeps the even positions
    with torch.no_grad(), compress(model, KeepEven()):
        cache = model(IDS[:, :40]).cache
        chunk = model(IDS[:, 40:45], cache=cache).logits[0]
        steps = [model(IDS[:, i : i + 1], cache=cache).logits[0, -1] for i in range(45, 48)]
    got = torch.cat([chunk, torch.stack(steps)])
    torch.testing.assert_close(got, expected[40:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, masked_reference(model, IDS, 40, [])[40:], atol=1e-3)  # the eviction shows
    assert cache.get_seq_length() == 48
    assert [cache.slots()[i] for i in full_layers(model)] == [20 + 8] * len(full_layers(model))


@pytest.mark.parametrize("family", MIXED)
def test_generate_after_eviction_equals_the_masked_reference(family):
    model = tiny(family)
    sequences, logits = greedy(model, IDS[:, :40], 8, KeepEven())
    expected = masked_reference(model, sequences[:, :-1], 40, list(range(1, 40, 2)))
    torch.testing.assert_close(logits[:, 0], expected[39:], rtol=1e-5, atol=1e-5)


def test_full_layers_of_different_lengths_decode_a_chunk_like_token_by_token():
    """Paper mode leaves Gemma 3's two full layers at different lengths (the mask is sized by the first)."""
    model = tiny("gemma3")
    with torch.no_grad(), compress(model, KVMerger(mode="paper", eps=0.3)):
        cache = model(IDS[:, :36]).cache
        assert cache.slots() == [WINDOW - 1, 24, WINDOW - 1, 21]
        twin = model(IDS[:, :36]).cache
        chunk = model(IDS[:, 36:], cache=cache).logits[0]
        stepwise = torch.stack([model(IDS[:, i : i + 1], cache=twin).logits[0, -1] for i in range(36, 48)])
    torch.testing.assert_close(chunk, stepwise, rtol=1e-5, atol=1e-5)


def test_every_method_holds_its_budget_on_the_compressed_layers_of_gemma3_while_generating():
    model = tiny("gemma3")
    full, sliding = full_layers(model), sliding_layers(model)
    slot_bytes = 2 * model.model.layers[0].self_attn.head_dim * 4
    for name in sorted(set(METHODS) - {"full"}):
        method = get_method(name, budget=0.5)
        target = method.target_slots(40, slot_bytes)
        with torch.no_grad(), compress(model, method, hold_budget=True, tokenizer=CharTokenizer()):
            out = model(IDS[:, :40])
            cache = out.cache
            for _ in range(4):
                out = model(out.logits[:, -1:].argmax(-1), cache=cache)
                assert torch.isfinite(out.logits).all(), name
                assert [cache.slots()[i] for i in full] == [target] * len(full), name
        assert [cache.slots()[i] for i in sliding] == [WINDOW - 1] * len(sliding), name
        assert cache.get_seq_length() == 44, name


@pytest.mark.parametrize("family", MIXED)
def test_compressing_a_recorded_prefill_equals_compressing_online(family):
    model = tiny(family)
    method = KVMerger(budget=0.5)
    with torch.no_grad(), compress(model, method):
        online = model(IDS[:, :40]).cache
        expected = model(IDS[:, 40:], cache=online).logits
    prefill = record_prefill(model, IDS[:, :40])
    assert prefill.compressed_layers == full_layers(model)
    assert all((prefill.scores[i] is None) == (i in sliding_layers(model)) for i in range(len(prefill.scores)))
    kept = {i: (prefill.cache.layers[i].keys, prefill.cache.layers[i].get_seq_length()) for i in sliding_layers(model)}
    cache, report = compress_prefill(prefill, method)
    assert [layer.layer for layer in report.kept_layers] == sliding_layers(model)
    with torch.no_grad(), attach(model):
        got = model(IDS[:, 40:], cache=cache).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for index, (keys, seen) in kept.items():  # decoding from the compressed cache left the prefill alone
        assert prefill.cache.layers[index].keys is keys and prefill.cache.layers[index].get_seq_length() == seen
        assert cache.layers[index].get_seq_length() == 48


@pytest.mark.parametrize("family", MIXED)
def test_a_held_budget_from_a_recorded_prefill_stays_on_the_compressed_layers(family):
    model = tiny(family)
    method = get_method("h2o", budget=0.5)
    cache, _ = compress_prefill(record_prefill(model, IDS[:, :40]), method, hold_budget=True)
    assert all((layer.hold is not None) for layer in cache.layers if isinstance(layer, CompressedLayer))
    with torch.no_grad(), attach(model, hold=method):
        out = model(IDS[:, 40:41], cache=cache)
        for _ in range(12):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    assert [cache.slots()[i] for i in full_layers(model)] == [20] * len(full_layers(model))
    assert [cache.slots()[i] for i in sliding_layers(model)] == [WINDOW - 1] * len(sliding_layers(model))


def test_generate_gives_a_caller_cache_and_a_dynamic_cache_the_right_layer_per_kind():
    from transformers import DynamicCache

    model = tiny("gemma3")
    with torch.no_grad(), compress(model, KVMerger(budget=0.5)):
        for cache in (CompressedCache(), CompressedCache(model.config), DynamicCache(config=model.config)):
            model.generate(IDS, cache=cache, max_new_tokens=3, do_sample=False)
            kinds = [isinstance(layer, CompressedLayer) for layer in cache.layers]
            assert kinds == [index in full_layers(model) for index in range(4)]
            assert [layer.keys.shape[-2] for layer in cache.layers] == [WINDOW - 1, 24 + 2, WINDOW - 1, 24 + 2]


def test_a_model_whose_layers_are_all_sliding_is_refused_with_the_fix_named():
    model = tiny("mistral-sliding")
    with pytest.raises(UnsupportedModelError, match=r"every layer .*sliding_window=8.*sliding_window = None"):
        with compress(model, KVMerger()):
            pass
    # The fix, when prompt and answer fit in the window: the same outputs, and now compressible.
    roomy = build_tiny("mistral-sliding", sliding_window=64)
    with torch.no_grad():
        windowed = roomy(IDS).logits
        roomy.config.sliding_window = None
        assert torch.equal(roomy(IDS).logits, windowed)
        with compress(roomy, KVMerger(budget=0.5)):
            assert roomy(IDS).cache.slots() == [24] * 3


def test_layer_kinds_the_engine_cannot_drive_are_named():
    model = build_tiny("llama")
    model.config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    model.config.attention_chunk_size = 16
    with pytest.raises(UnsupportedModelError, match="layer 1: chunked_attention"):
        with compress(model, KVMerger()):
            pass


def test_every_family_in_the_test_table_is_exercised():
    assert set(FAMILIES) == {*COMPRESSIBLE, "mistral-sliding"}


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("family", MIXED)
def test_scores_of_the_full_layers_match_eager_attention_weights(family, fused, monkeypatch):
    """The statistics the methods rank by, on a mixed model: eager attention's column sums."""
    import copy

    from kvmerger.engine import scoring
    from tests.test_scoring import grouped_column_sums

    if fused:
        monkeypatch.setattr(scoring, "FUSED_FROM_TOKENS", 2)
    model = tiny(family)
    eager = type(model)(copy.deepcopy(model.config)).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(IDS, output_attentions=True).attentions
    prefill = record_prefill(model, IDS)
    for layer in full_layers(model):
        assert prefill.scores[layer].uses_fused_path == fused
        expected = grouped_column_sums(attentions[layer].double(), model.config.num_key_value_heads)
        got = prefill.scores[layer].aggregated_attention().double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
