"""Holding the budget while generating: the engine feature, its default rule and KVMerger's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmerger import FullCache, KVMerger, attach, compress, compress_prefill, record_prefill
from kvmerger.engine.scoring import new_query_attention
from kvmerger.methods.base import SlotState, floor_share, hold_by_accumulated_attention
from kvmerger.methods.h2o import H2O
from kvmerger.methods.kvmerger import _fit_protection, adjacent_similarity
from tests.reference import ambiguous_selection, kvmerger_hold_row


def slot_state(rng: np.random.Generator, rows: tuple[int, int], length: int, target: int, dim: int = 4) -> SlotState:
    batch, heads = rows
    shape = (batch, heads, length)
    return SlotState(
        keys=torch.tensor(rng.normal(size=(*shape, dim)).cumsum(axis=2), dtype=torch.float32),
        values=torch.tensor(rng.normal(size=(*shape, dim)), dtype=torch.float32),
        bias=None,
        positions=torch.arange(length).expand(*shape).clone() * 2,
        set_sizes=torch.tensor(rng.integers(1, 4, size=shape)),
        accumulated=torch.tensor(rng.random(shape) * 10, dtype=torch.float32),
        last_attention=torch.tensor(rng.random(shape), dtype=torch.float32),
        target_slots=target,
        prompt_length=max(target * 2, length),
        seen_tokens=length * 2,
        layer_idx=0,
    )


def test_new_query_attention_matches_a_plain_softmax():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 3, 8, generator=generator)
    key = torch.randn(1, 2, 10, 8, generator=generator)
    bias = torch.randn(1, 2, 10, generator=generator)
    summed, last = new_query_attention(query, key, 0.5, bias)
    keys = key.repeat_interleave(2, dim=1)
    logits = (query @ keys.transpose(-1, -2)) * 0.5 + bias.repeat_interleave(2, dim=1)[:, :, None]
    for i in range(3):  # query i sits at key position 7 + i
        logits[:, :, i, 8 + i :] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(summed, probs.sum(2).view(1, 2, 2, 10).mean(2))
    torch.testing.assert_close(last, probs[:, :, -1].view(1, 2, 2, 10).mean(2))


def test_default_rule_keeps_the_recent_half_and_the_heaviest_of_the_rest():
    state = slot_state(np.random.default_rng(1), (1, 2), 12, 8)
    kept = hold_by_accumulated_attention(state, recent=4)
    for head in range(2):
        older = state.accumulated[0, head, :8]
        heavy = sorted(range(8), key=lambda t: -float(older[t]))[:4]
        expected = sorted(heavy) + [8, 9, 10, 11]
        assert (kept.positions[0, head] // 2).tolist() == expected
        assert torch.equal(kept.keys[0, head], state.keys[0, head, expected])


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(6, 30),
    excess=st.integers(1, 4),
    sigma=st.sampled_from([None, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kvmerger_generation_rule_equals_the_reference(length, excess, sigma, seed):
    target = max(2, length - excess)
    rng = np.random.default_rng(seed)
    state = slot_state(rng, (2, 2), length, target)
    method = KVMerger(budget=0.5, sigma=sigma)
    out = method.hold_budget(state)
    recent, topk = method.protection()
    n_recent, n_topk, _ = _fit_protection(floor_share(recent, state.prompt_length), floor_share(topk, state.prompt_length), target)
    assert out.keys.shape == (2, 2, target, 4)
    for b in range(2):
        for h in range(2):
            row = kvmerger_hold_row(
                state.keys[b, h].double().numpy(),
                state.values[b, h].double().numpy(),
                state.accumulated[b, h].numpy(),
                state.set_sizes[b, h].numpy(),
                target=target,
                n_recent=n_recent,
                n_topk=n_topk,
                sigma=sigma,
            )
            sims32 = adjacent_similarity(state.keys[b, h][None])[0].tolist()
            if ambiguous_selection(row["similarity"], sims32, row["eligible"], length - target):
                continue  # float32 and float64 may legitimately choose differently
            assert (out.positions[b, h] // 2).tolist() == row["pivots"]
            assert out.set_sizes[b, h].tolist() == row["sizes"]
            np.testing.assert_allclose(out.keys[b, h].numpy(), row["keys"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(out.values[b, h].numpy(), row["values"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(out.accumulated[b, h].numpy(), row["accumulated"], rtol=1e-5)


@pytest.mark.parametrize("method", [KVMerger(budget=0.5), KVMerger(budget=0.35, size_bias=True), H2O(budget=0.5)], ids=str)
def test_generate_300_tokens_holding_the_budget(tiny_llama, random_ids, method):
    prompt = random_ids[:, :40]
    with torch.no_grad(), compress(tiny_llama, method, hold_budget=True) as session:
        out = tiny_llama.generate(prompt, max_new_tokens=300, do_sample=False, min_new_tokens=300)
        cache = tiny_llama(prompt).cache
        for _ in range(20):
            logits = tiny_llama(torch.tensor([[5]]), cache=cache).logits
            assert torch.isfinite(logits).all()
    target = method.target_slots(40, 2 * 16 * 4)  # tiny Llama: head dim 16, float32 keys and values
    assert out.shape[1] == 340
    assert cache.slots() == [target] * 3 and cache.get_seq_length() == 60
    for layer in cache.layers:
        tokens = int(layer.hold.set_sizes[0, 0].sum())
        assert tokens == (60 if isinstance(method, KVMerger) else target)  # merges keep every token seen
        assert layer.hold.positions.max() < 60
    assert session.hold_calls >= 3 * 319


def test_without_hold_the_cache_grows(tiny_llama, random_ids):
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)):
        cache = tiny_llama(random_ids[:, :40]).cache
        for _ in range(5):
            tiny_llama(torch.tensor([[5]]), cache=cache)
    assert cache.slots() == [25] * 3 and cache.layers[0].hold is None


def test_holding_a_prefill_compressed_elsewhere(tiny_llama, random_ids):
    method = KVMerger(budget=0.5)
    prefill = record_prefill(tiny_llama, random_ids[:, :40])
    cache, _ = compress_prefill(prefill, method, hold_budget=True)
    with torch.no_grad(), attach(tiny_llama, hold=method):
        tiny_llama(random_ids[:, 40:], cache=cache)  # 8 tokens in one chunk
        tiny_llama(torch.tensor([[3]]), cache=cache)
    assert cache.slots() == [20] * 3 and cache.get_seq_length() == 49


@pytest.mark.parametrize("method", [KVMerger(mode="paper"), FullCache()], ids=["paper-mode", "full"])
def test_methods_without_a_fixed_budget_cannot_hold_it(tiny_llama, method):
    with pytest.raises(ValueError, match="cannot hold a budget"):
        with compress(tiny_llama, method, hold_budget=True):
            pass
