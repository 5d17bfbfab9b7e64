"""The engine on a tiny random Llama: positions, shrinking tensors, generate(), biases, reports."""

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from kvmerger import CompressedCache, FullCache, KVMerger, attach, compress, compress_prefill, record_prefill
from kvmerger.engine.hf import ATTENTION_NAME, CompressedLayer
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, gather_tokens


@dataclass
class KeepEven(CompressionMethod):
    """Test-only eviction: keep the even positions (budget 0.5 exactly when T is even)."""

    name: ClassVar[str] = ""  # not registered
    budget: float = 0.5

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, _ = layer.keys.shape
        keep = torch.arange(0, length, 2).expand(batch, heads, -1)
        return gather_tokens(layer, keep)


def logits_after(model, prompt, continuation, method=None):
    """Logits of `continuation` after `prompt`, prefilled (and compressed by `method`) in one call."""
    with torch.no_grad():
        if method is None:
            out = model(prompt, use_cache=True)
            return model(continuation, cache=out.cache).logits
        with compress(model, method):
            out = model(prompt, use_cache=True)
            return model(continuation, cache=out.cache).logits


@pytest.mark.parametrize(
    "method",
    [FullCache(), KVMerger(budget=1.0), KVMerger(mode="paper", eps=1.0), KVMerger(budget=1.0, mode="paper")],
    ids=["full", "kvmerger-budget-1", "kvmerger-nothing-similar-enough", "kvmerger-paper-budget-1"],
)
def test_nothing_to_compress_gives_identical_logits(tiny_llama, random_ids, method):
    prompt, continuation = random_ids[:, :40], random_ids[:, 40:]
    plain = logits_after(tiny_llama, prompt, continuation)
    compressed = logits_after(tiny_llama, prompt, continuation, method)
    assert torch.equal(plain, compressed)


def test_positions_after_eviction_are_the_true_ones(tiny_llama, random_ids):
    """Evicting keys equals masking them: the new token must sit at position T, not at the slot count."""
    prompt, new_token = random_ids[:, :40], random_ids[:, 40:41]
    with torch.no_grad(), compress(tiny_llama, KeepEven()) as session:
        out = tiny_llama(prompt)
        cache = out.cache
        assert cache.get_seq_length() == 40 and cache.slots() == [20] * 3
        compressed = tiny_llama(new_token, cache=cache).logits[0, -1]
        assert session.report.layers[0].slots_after == 20
    # Reference: the whole sequence without a cache; the last query sees only the kept keys and itself.
    full = torch.cat([prompt, new_token], dim=1)
    mask = torch.ones(41, 41, dtype=torch.bool).tril()
    mask[40, 1:40:2] = False
    with torch.no_grad():
        expected = tiny_llama(full, attention_mask=mask[None, None]).logits[0, -1]
    torch.testing.assert_close(compressed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method", [KVMerger(budget=0.5), KVMerger(budget=0.35), KVMerger(mode="paper", eps=0.2)], ids=str
)
def test_chunk_continuation_equals_token_by_token(tiny_llama, random_ids, method):
    prompt, continuation = random_ids[:, :36], random_ids[:, 36:]
    with torch.no_grad(), compress(tiny_llama, method):
        cache = tiny_llama(prompt).cache
        twin = copy.deepcopy(cache)
        chunk = tiny_llama(continuation, cache=cache).logits[0]
        stepwise = torch.stack([tiny_llama(continuation[:, i : i + 1], cache=twin).logits[0, -1] for i in range(12)])
    torch.testing.assert_close(chunk, stepwise, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == twin.get_seq_length() == 48


def test_paper_mode_pads_heads_and_layers_of_different_lengths(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(mode="paper", eps=0.2)) as session:
        cache = tiny_llama(random_ids).cache
    assert len(set(cache.slots())) > 1, "the test wants layers compressed to different lengths"
    padded = [layer for layer in cache.layers if layer.slot_bias is not None]
    assert padded, "the test wants heads of different lengths in some layer"
    for layer in padded:
        assert torch.isinf(layer.slot_bias).any() and not torch.isnan(layer.slot_bias).any()
    report = session.report
    assert report.bytes_after == cache.nbytes()


def test_tensors_really_shrink_and_the_report_says_so(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.35)) as session:
        cache = tiny_llama(random_ids).cache
    slots = 17  # ceil(0.35 * 48)
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, slots, 16) and layer.values.shape == (1, 2, slots, 16)
        assert layer.get_seq_length() == 48
    report = session.report
    assert len(report.layers) == 3 and report.tokens == 48
    assert report.bytes_before == 3 * 2 * (2 * 48 * 16 * 4)
    assert report.bytes_after == cache.nbytes() == 3 * 2 * (2 * slots * 16 * 4)
    assert report.memory_ratio == pytest.approx(slots / 48)
    for layer in report.layers:
        merged_tokens = sum(size * count for size, count in layer.merge_set_sizes.items())
        singletons = 2 * slots - layer.merge_sets
        assert merged_tokens + singletons == 2 * 48  # every token of both heads is in exactly one slot
        assert layer.seconds_scoring > 0 and layer.seconds_compressing > 0
    assert "48 tokens -> 17 slots" in report.summary()
    assert report.to_dict()["memory_ratio"] == report.memory_ratio


def test_generate_compresses_once_and_matches_a_manual_loop(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)) as session:
        generated = tiny_llama.generate(random_ids, max_new_tokens=6, do_sample=False)[0, 48:].tolist()
        assert len(session.reports) == 1
        out = tiny_llama(random_ids)
        assert len(session.reports) == 2
        cache, manual = out.cache, []
        for _ in range(6):
            manual.append(int(out.logits[0, -1].argmax()))
            out = tiny_llama(torch.tensor([manual[-1:]]), cache=cache)
    assert generated == manual
    assert cache.get_seq_length() == 54 and cache.slots() == [24 + 6] * 3


def test_generate_accepts_a_caller_cache_and_an_empty_dynamic_cache(tiny_llama, random_ids):
    from transformers import DynamicCache

    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)):
        ours = CompressedCache(tiny_llama.config)
        tiny_llama.generate(random_ids, cache=ours, max_new_tokens=3, do_sample=False)
        dynamic = DynamicCache(config=tiny_llama.config)
        tiny_llama.generate(random_ids, cache=dynamic, max_new_tokens=3, do_sample=False)
    assert ours.slots() == [24 + 2] * 3  # 24 compressed slots + 2 appended (the 3rd token needs no cache)
    assert all(isinstance(layer, CompressedLayer) for layer in dynamic.layers)
    assert dynamic.layers[0].stored_slots == 26 and dynamic.get_seq_length() == 50


def test_session_restores_the_model_even_after_an_error(tiny_llama, random_ids):
    hooks_before = len(tiny_llama._forward_pre_hooks), len(tiny_llama._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with compress(tiny_llama, KVMerger()):
            assert tiny_llama.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert (len(tiny_llama._forward_pre_hooks), len(tiny_llama._forward_hooks)) == hooks_before


def test_zero_biases_are_bit_identical_to_no_bias(tiny_llama, random_ids):
    prefill = record_prefill(tiny_llama, random_ids[:, :40])
    plain, _ = compress_prefill(prefill, KVMerger(budget=0.5))
    zeros = copy.deepcopy(plain)
    for layer in zeros.layers:
        layer.slot_bias = torch.zeros(layer.keys.shape[:-1])
    with torch.no_grad(), attach(tiny_llama):
        expected = tiny_llama(random_ids[:, 40:], cache=plain).logits
        got = tiny_llama(random_ids[:, 40:], cache=zeros).logits
    assert torch.equal(expected, got)


@pytest.mark.parametrize("copies", [2, 5])
def test_bias_log_n_equals_the_slot_stored_n_times(tiny_llama, random_ids, copies):
    prefill = record_prefill(tiny_llama, random_ids[:, :40])
    repeated, biased = [], []
    for layer in prefill.cache.layers:
        keys, values = layer.keys, layer.values
        times = torch.ones(40, dtype=torch.long)
        times[7] = copies  # slot 7 of every head stands for `copies` identical tokens
        repeated.append((keys.repeat_interleave(times, dim=2), values.repeat_interleave(times, dim=2), None))
        bias = torch.zeros(keys.shape[:-1])
        bias[..., 7] = torch.log(torch.tensor(float(copies)))
        biased.append((keys, values, bias))
    with torch.no_grad(), attach(tiny_llama):
        expected = tiny_llama(random_ids[:, 40:], cache=CompressedCache.from_tensors(repeated, 40)).logits
        got = tiny_llama(random_ids[:, 40:], cache=CompressedCache.from_tensors(biased, 40)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_biased_cache_refuses_to_run_outside_a_session(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(mode="paper", eps=0.2)):
        cache = tiny_llama(random_ids).cache
    assert any(layer.slot_bias is not None for layer in cache.layers)
    with pytest.raises(RuntimeError, match="per-slot attention biases"), torch.no_grad():
        tiny_llama(random_ids[:, :1], cache=cache)


def test_equal_length_batch_compresses_each_row_like_alone(tiny_llama):
    generator = torch.Generator().manual_seed(5)
    batch = torch.randint(0, 128, (2, 30), generator=generator)
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)):
        together = tiny_llama(batch).cache
        alone = [tiny_llama(batch[i : i + 1]).cache for i in range(2)]
    for index, layer in enumerate(together.layers):
        for row in range(2):
            torch.testing.assert_close(layer.keys[row], alone[row].layers[index].keys[0])
            torch.testing.assert_close(layer.values[row], alone[row].layers[index].values[0])


def test_masks_other_than_left_padding_are_refused_with_the_fix_named(tiny_llama):
    """Left-padded batches are compressed per sequence (tests/test_padded_batches.py); holes are not padding."""
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 3:5] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"), compress(tiny_llama, KVMerger()):
        tiny_llama(ids, attention_mask=mask)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :9] = 0
    with pytest.raises(ValueError, match="at least two tokens"), compress(tiny_llama, KVMerger()):
        tiny_llama(ids, attention_mask=mask)


def test_crop_removes_only_tokens_appended_after_compression(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)):
        cache = tiny_llama(random_ids[:, :40]).cache
        tiny_llama(random_ids[:, 40:43], cache=cache)
    cache.crop(-2)
    assert cache.get_seq_length() == 41 and cache.slots() == [21] * 3
    with pytest.raises(ValueError, match="appended after compression"):
        cache.crop(-2)


def test_method_outputs_are_checked_against_the_budget(tiny_llama, random_ids):
    @dataclass
    class Greedy(KeepEven):
        budget: float = 0.25  # but keeps half

    with pytest.raises(RuntimeError, match="means exactly 12"), compress(tiny_llama, Greedy()):
        tiny_llama(random_ids)
