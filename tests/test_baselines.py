"""The baselines (H2O, CaM, StreamingLLM, SnapKV, TOVA, K-norm, random) against plain references.

Every selection is checked against tests/reference_baselines.py on random inputs, at prefill and
while holding the budget during generation; CaM's merged values against a token-by-token reference
that uses the very same Bernoulli draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmerger import METHODS, get_method
from kvmerger.cli.main import main as cli_main
from kvmerger.engine.scoring import LayerScores
from kvmerger.methods.base import LayerInput, SlotState, slots_for_budget
from kvmerger.methods.cam import CaM, cascade_merge, merge_coefficients
from kvmerger.methods.h2o import H2O
from kvmerger.methods.knorm import KNorm
from kvmerger.methods.random_eviction import RandomEviction, uniform_draws
from kvmerger.methods.snapkv import SnapKV
from kvmerger.methods.streaming_llm import StreamingLLM
from kvmerger.methods.tova import TOVA
from tests import reference_baselines as ref

BASELINES = ["h2o", "cam", "streaming-llm", "snapkv", "tova", "knorm", "random"]


def precomputed_input(
    keys: torch.Tensor,
    values: torch.Tensor,
    budget: float,
    *,
    aggregated: torch.Tensor | None = None,
    windows: dict[int, torch.Tensor] | None = None,
    layer_idx: int = 0,
) -> LayerInput:
    return LayerInput(
        keys=keys,
        values=values,
        scores=LayerScores.precomputed(keys, aggregated=aggregated, windows=windows),
        layer_idx=layer_idx,
        num_layers=layer_idx + 1,
        slots=slots_for_budget(keys.shape[-2], budget),
    )


def random_states(seed: int, length: int, batch: int = 2, heads: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    return keys, values, generator


def random_scores(generator: torch.Generator, shape: tuple[int, ...], ties: bool) -> torch.Tensor:
    if ties:  # few distinct values: the later-token tie rule decides
        return torch.randint(0, 3, shape, generator=generator).float()
    return torch.rand(shape, generator=generator) * 5


def rows(tensor: torch.Tensor):
    batch, heads = tensor.shape[:2]
    for b in range(batch):
        for h in range(heads):
            yield b, h


def raw_input(seed: int, length: int, budget: float, q_heads: int = 4, kv_heads: int = 2, dim: int = 8):
    """A layer with real statistics computed from random query and key states (sharpened)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, q_heads, length, dim, generator=generator) * 2
    keys = torch.randn(1, kv_heads, length, dim, generator=generator)
    values = torch.randn(1, kv_heads, length, dim, generator=generator)
    scaling = dim**-0.5
    layer = LayerInput(keys, values, LayerScores(query, keys, scaling), 0, 1, slots_for_budget(length, budget))
    return layer, query[0].double().numpy(), keys[0].double().numpy(), scaling


def assert_kept_tokens(layer: LayerInput, out, expected: list[int], b: int, h: int) -> None:
    assert out.positions[b, h].tolist() == expected
    assert torch.equal(out.keys[b, h], layer.keys[b, h, expected])
    assert torch.equal(out.values[b, h], layer.values[b, h, expected])


# --------------------------------------------------------------------------------------------
# Prefill selections against the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.35, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [3, 17, 64])
def test_h2o_equals_the_reference(length, budget, ties):
    keys, values, generator = random_states(length, length)
    attention = random_scores(generator, keys.shape[:3], ties)
    layer = precomputed_input(keys, values, budget, aggregated=attention)
    out = H2O(budget=budget).compress(layer)
    for b, h in rows(keys):
        expected = ref.h2o_row(attention[b, h].tolist(), layer.slots, layer.slots // 2)
        assert_kept_tokens(layer, out, expected, b, h)


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_h2o_recent_share_moves_slots_between_the_window_and_the_heavy_hitters(share):
    keys, values, generator = random_states(5, 40)
    attention = random_scores(generator, keys.shape[:3], False)
    layer = precomputed_input(keys, values, 0.5, aggregated=attention)
    out = H2O(budget=0.5, recent_share=share).compress(layer)
    recent = int(share * 20)
    assert out.notes == {"recent": recent, "heavy_hitters": 20 - recent}
    for b, h in rows(keys):
        assert_kept_tokens(layer, out, ref.h2o_row(attention[b, h].tolist(), 20, recent), b, h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h2o_on_statistics_from_raw_states_equals_the_reference(seed):
    layer, query, key, scaling = raw_input(seed, 24, 0.4)
    out = H2O(budget=0.4).compress(layer)
    attention = ref.attention_received(query, key, scaling, first_query=0)
    for h in range(2):
        assert out.positions[0, h].tolist() == ref.h2o_row(attention[h], layer.slots, layer.slots // 2)


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("length", [2, 5, 33])
def test_streaming_llm_equals_the_reference(length, budget, n_sink):
    keys, values, _ = random_states(length, length)
    layer = precomputed_input(keys, values, budget)
    out = StreamingLLM(budget=budget, n_sink=n_sink).compress(layer)
    expected = ref.streaming_llm_row(length, layer.slots, n_sink)
    for b, h in rows(keys):
        assert_kept_tokens(layer, out, expected, b, h)


def test_streaming_llm_keeps_four_sinks_and_the_newest_by_default():
    keys, values, _ = random_states(0, 100)
    out = StreamingLLM(budget=0.1).compress(precomputed_input(keys, values, 0.1))
    assert out.positions[0, 0].tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize(("window", "kernel"), [(32, 5), (4, 3), (6, 1), (1, 7)])
@pytest.mark.parametrize("budget", [0.05, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("length", [10, 45, 90])
def test_snapkv_equals_the_reference(length, budget, window, kernel, pooling):
    keys, values, generator = random_states(length + window, length)
    observed = random_scores(generator, keys.shape[:3], False)
    layer = precomputed_input(keys, values, budget, windows={window: observed})
    out = SnapKV(budget=budget, window=window, kernel_size=kernel, pooling=pooling).compress(layer)
    for b, h in rows(keys):
        expected = ref.snapkv_row(observed[b, h].tolist(), layer.slots, window, kernel, pooling)
        assert_kept_tokens(layer, out, expected, b, h)


@pytest.mark.parametrize("seed", [0, 1])
def test_snapkv_on_statistics_from_raw_states_equals_the_reference(seed):
    layer, query, key, scaling = raw_input(seed, 30, 0.5)
    out = SnapKV(budget=0.5, window=8).compress(layer)
    observed = ref.attention_received(query, key, scaling, first_query=30 - 8)
    for h in range(2):
        assert out.positions[0, h].tolist() == ref.snapkv_row(observed[h], layer.slots, 8, 5, "avg")


def test_snapkv_always_keeps_its_observation_window():
    keys, values, generator = random_states(3, 200)
    observed = random_scores(generator, keys.shape[:3], False)
    observed[..., 168:] = 0.0  # the window's own scores do not matter
    out = SnapKV(budget=0.25).compress(precomputed_input(keys, values, 0.25, windows={32: observed}))
    assert (out.positions[..., -32:] == torch.arange(168, 200)).all()


@pytest.mark.parametrize("budget", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("length", [4, 40])
def test_tova_equals_the_reference_and_selects_the_same_tokens_in_every_head(length, budget):
    keys, values, generator = random_states(length, length)
    last = torch.softmax(torch.randn(*keys.shape[:3], generator=generator) * 3, dim=-1)
    layer = precomputed_input(keys, values, budget, windows={1: last})
    out = TOVA(budget=budget).compress(layer)
    for b, h in rows(keys):
        assert_kept_tokens(layer, out, ref.tova_rows(last[b].tolist(), layer.slots), b, h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tova_on_statistics_from_raw_states_equals_the_reference(seed):
    layer, query, key, scaling = raw_input(seed, 20, 0.3)
    out = TOVA(budget=0.3).compress(layer)
    last = ref.attention_received(query, key, scaling, first_query=19)
    expected = ref.tova_rows(last, layer.slots)  # mean over KV heads of group means = mean over all heads
    assert out.positions[0, 0].tolist() == out.positions[0, 1].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [0.1, 0.5, 1.0])
def test_knorm_equals_the_reference(budget, dtype):
    keys, values, _ = random_states(11, 50)
    keys, values = keys.to(dtype), values.to(dtype)
    layer = precomputed_input(keys, values, budget)
    out = KNorm(budget=budget).compress(layer)
    for b, h in rows(keys):
        expected = ref.knorm_row(keys[b, h].double().numpy(), layer.slots)
        assert_kept_tokens(layer, out, expected, b, h)


def test_knorm_keeps_exactly_the_smallest_keys():
    keys = torch.arange(1, 11, dtype=torch.float32).view(1, 1, 10, 1).flip(-2)  # norms 10, 9, ..., 1
    out = KNorm(budget=0.3).compress(precomputed_input(keys, keys.clone(), 0.3))
    assert out.positions[0, 0].tolist() == [7, 8, 9]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("layer_idx", [0, 3])
def test_random_equals_the_reference_on_its_own_draws(seed, layer_idx):
    keys, values, _ = random_states(2, 30)
    layer = precomputed_input(keys, values, 0.4, layer_idx=layer_idx)
    out = RandomEviction(budget=0.4, seed=seed).compress(layer)
    draws = uniform_draws(tuple(keys.shape[:3]), keys.device, seed, layer_idx)
    for b, h in rows(keys):
        assert_kept_tokens(layer, out, ref.random_row(draws[b, h].tolist(), layer.slots), b, h)


def test_random_is_reproducible_differs_by_layer_and_seed_and_is_uniform():
    keys, values, _ = random_states(4, 10, batch=1, heads=1)
    method = RandomEviction(budget=0.5, seed=3)
    picks = [method.compress(precomputed_input(keys, values, 0.5, layer_idx=i)).positions[0, 0] for i in range(400)]
    again = method.compress(precomputed_input(keys, values, 0.5, layer_idx=0)).positions[0, 0]
    assert torch.equal(picks[0], again)
    assert len({tuple(p.tolist()) for p in picks}) > 100  # 252 subsets of 5 out of 10
    longer = precomputed_input(*random_states(4, 40)[:2], 0.5)
    other_seed = RandomEviction(budget=0.5, seed=4)
    assert not torch.equal(method.compress(longer).positions, other_seed.compress(longer).positions)
    kept = torch.zeros(10)
    for p in picks:
        kept[p] += 1
    frequency = kept / 400  # each token kept with probability 0.5; 4 standard deviations = 0.1
    assert (frequency - 0.5).abs().max() < 0.1


# --------------------------------------------------------------------------------------------
# CaM
# --------------------------------------------------------------------------------------------


SOLVES = [("sparse", 128), ("blocked", 8), ("blocked", 40), ("blocked", 128), ("auto", 128)]


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize(("strategy", "block"), SOLVES)
@pytest.mark.parametrize("window", [1, 4, 32])
@pytest.mark.parametrize("length", [2, 9, 37, 300])
def test_cam_merge_rule_equals_the_token_by_token_reference(length, window, strategy, block, average):
    generator = torch.Generator().manual_seed(length * 100 + window)
    values = torch.randn(2, 2, length, 5, generator=generator)
    attention = torch.rand(2, 2, length, generator=generator) * 4
    evicted = torch.rand(2, 2, length, generator=generator) < 0.7
    uniforms = torch.rand(2, 2, length, generator=generator)
    coefficients = merge_coefficients(evicted, attention, uniforms, window)
    before = values.clone()
    weights = attention + 0.1 if average else None
    merged = cascade_merge(values, coefficients, window, weights=weights, strategy=strategy, block=block)
    assert torch.equal(values, before) and merged.dtype == torch.float32
    for b, h in rows(values):
        expected = ref.cam_merge_row(
            values[b, h].double().numpy(),
            attention[b, h].tolist(),
            uniforms[b, h].tolist(),
            [t for t in range(length) if evicted[b, h, t]],
            window,
            None if weights is None else weights[b, h].tolist(),
        )
        np.testing.assert_allclose(merged[b, h].numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge", ["add", "average"])
@pytest.mark.parametrize("window", [3, 32])
@pytest.mark.parametrize("budget", [0.1, 0.35, 0.5])
@pytest.mark.parametrize("length", [12, 64, 300])
def test_cam_equals_the_reference_with_the_same_draws(length, budget, window, merge):
    keys, values, generator = random_states(length + window, length)
    attention = random_scores(generator, keys.shape[:3], False)
    layer = precomputed_input(keys, values, budget, aggregated=attention, layer_idx=2)
    method = CaM(budget=budget, merge_window=window, seed=5, merge=merge)
    out = method.compress(layer)
    uniforms = uniform_draws(tuple(attention.shape), attention.device, 5, 2)
    for b, h in rows(keys):
        keep, merged = ref.cam_row(
            values[b, h].double().numpy(),
            attention[b, h].tolist(),
            uniforms[b, h].tolist(),
            slots=layer.slots,
            recent=layer.slots // 2,
            window=window,
            average=merge == "average",
        )
        assert out.positions[b, h].tolist() == keep
        assert torch.equal(out.keys[b, h], keys[b, h, keep])  # keys are never merged
        np.testing.assert_allclose(out.values[b, h].numpy(), merged, rtol=1e-4, atol=1e-5)


def test_cam_with_closed_gates_is_exactly_h2o():
    keys, values, generator = random_states(8, 40)
    attention = torch.zeros(2, 3, 40)
    heavy = torch.rand(2, 3, 30, generator=generator).argsort(-1)[..., :10]
    attention.scatter_(-1, heavy, 1.0 + torch.rand(2, 3, 10, generator=generator))
    attention[..., 30:] = 1.0  # the recent window
    layer = precomputed_input(keys, values, 0.5, aggregated=attention)  # evicted: the 20 zeros, p = 0
    cam, h2o = CaM(budget=0.5).compress(layer), H2O(budget=0.5).compress(layer)
    assert torch.equal(cam.positions, h2o.positions)
    assert torch.equal(cam.values, h2o.values) and cam.notes["merged_share"] == 0.0


def test_cam_with_open_gates_moves_all_value_mass_onto_the_kept_tokens():
    keys, values, _ = random_states(9, 200)
    attention = torch.ones(2, 3, 200)  # p = 1 everywhere: every evicted token merges
    layer = precomputed_input(keys, values, 0.3, aggregated=attention)
    out = CaM(budget=0.3).compress(layer)
    assert out.notes["merged_share"] == 1.0
    torch.testing.assert_close(out.values.double().sum(2), values.double().sum(2), rtol=1e-5, atol=1e-4)


def test_cam_average_guard_with_open_gates_keeps_every_value_within_the_originals():
    keys, values, _ = random_states(9, 200)
    values = values.abs() + 1.0  # alike values, as a repetitive text gives: their sums do not cancel
    attention = torch.ones(2, 3, 200)  # every evicted token merges, all with the same weight
    layer = precomputed_input(keys, values, 0.3, aggregated=attention)
    out = CaM(budget=0.3, merge="average").compress(layer)
    assert out.notes["merged_share"] == 1.0 and out.notes["value_growth"] <= 1.0
    low, high = values.amin(2, keepdim=True), values.amax(2, keepdim=True)
    assert ((out.values >= low - 1e-6) & (out.values <= high + 1e-6)).all()
    additive = CaM(budget=0.3).compress(layer)
    assert additive.notes["value_growth"] > 2.0  # the same merges, added: the kept values pile up


def test_cam_is_reproducible_from_its_seed():
    keys, values, generator = random_states(10, 120)
    attention = random_scores(generator, keys.shape[:3], False)
    layer = precomputed_input(keys, values, 0.25, aggregated=attention)
    first, again = CaM(budget=0.25, seed=1).compress(layer), CaM(budget=0.25, seed=1).compress(layer)
    other = CaM(budget=0.25, seed=2).compress(layer)
    assert torch.equal(first.values, again.values)
    assert not torch.equal(first.values, other.values)
    assert 0.0 < first.notes["merged_share"] < 1.0


def test_cam_in_bf16_stays_close_to_float32():
    keys, values, generator = random_states(12, 150)
    attention = random_scores(generator, keys.shape[:3], False)
    full = CaM(budget=0.2).compress(precomputed_input(keys, values, 0.2, aggregated=attention))
    half = CaM(budget=0.2).compress(
        precomputed_input(keys.bfloat16(), values.bfloat16(), 0.2, aggregated=attention)
    )
    assert half.values.dtype == torch.bfloat16 and torch.equal(half.positions, full.positions)
    torch.testing.assert_close(half.values.float(), full.values, rtol=0.02, atol=0.05)


# --------------------------------------------------------------------------------------------
# Holding the budget during generation (hand-built slot states)
# --------------------------------------------------------------------------------------------


def slot_state(seed: int, length: int, target: int, padding: int = 0, heads: int = 3) -> SlotState:
    """Slots of a layer being held: the first `padding` slots of head 0 are padding."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, heads, length)
    positions = (torch.arange(length) * 2).expand(*shape).clone()
    sizes = torch.ones(shape, dtype=torch.long)
    accumulated = torch.rand(shape, generator=generator) * 10
    positions[:, 0, :padding], sizes[:, 0, :padding] = -1, 0
    accumulated[:, 0, :padding] = float("-inf")
    return SlotState(
        keys=torch.randn(*shape, 6, generator=generator),
        values=torch.randn(*shape, 6, generator=generator),
        bias=None,
        positions=positions,
        set_sizes=sizes,
        accumulated=accumulated,
        last_attention=torch.softmax(torch.randn(shape, generator=generator), dim=-1),
        target_slots=target,
        prompt_length=2 * target,
        seen_tokens=2 * length,
        layer_idx=1,
    )


def assert_kept_slots(state: SlotState, out: SlotState, expected: list[int], b: int, h: int) -> None:
    assert out.positions[b, h].tolist() == state.positions[b, h, expected].tolist()
    assert torch.equal(out.keys[b, h], state.keys[b, h, expected])
    assert torch.equal(out.accumulated[b, h], state.accumulated[b, h, expected])


HOLD_CASES = [(12, 11, 0), (12, 8, 0), (30, 29, 2), (7, 2, 1), (5, 1, 0)]


@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES)
@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_h2o_rule_while_generating_equals_the_reference(name, length, target, padding):
    state = slot_state(length, length, target, padding)
    out = get_method(name).hold_budget(state)
    for b, h in rows(state.keys):
        accumulated, sizes = state.accumulated[b, h].tolist(), state.set_sizes[b, h].tolist()
        expected = ref.h2o_hold_row(accumulated, sizes, target, target // 2)
        assert_kept_slots(state, out, expected, b, h)
        assert torch.equal(out.values[b, h], state.values[b, h, expected])


@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES)
def test_streaming_llm_slides_its_window_while_generating(length, target, padding):
    state = slot_state(length, length, target, padding)
    state.positions = state.positions // 2  # token positions 0, 1, 2, ... (sinks among them)
    state.positions[:, 0, :padding] = -1
    out = StreamingLLM().hold_budget(state)
    for b, h in rows(state.keys):
        expected = ref.streaming_llm_hold_row(state.positions[b, h].tolist(), state.set_sizes[b, h].tolist(), target, 4)
        assert_kept_slots(state, out, expected, b, h)


@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES)
def test_tova_evicts_the_least_attended_by_the_newest_query_averaged_over_heads(length, target, padding):
    state = slot_state(length, length, target, padding)
    out = TOVA().hold_budget(state)
    for b in range(2):
        expected = ref.tova_hold_rows(state.last_attention[b].tolist(), state.set_sizes[b].tolist(), target)
        for h in range(3):
            assert_kept_slots(state, out, expected[h], b, h)


@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES)
def test_knorm_evicts_the_largest_key_while_generating(length, target, padding):
    state = slot_state(length, length, target, padding)
    out = KNorm().hold_budget(state)
    for b, h in rows(state.keys):
        expected = ref.knorm_hold_row(state.keys[b, h].double().numpy(), state.set_sizes[b, h].tolist(), target)
        assert_kept_slots(state, out, expected, b, h)


@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES)
def test_random_eviction_while_generating_is_seeded_and_follows_its_draws(length, target, padding):
    state = slot_state(length, length, target, padding)
    method = RandomEviction(seed=2)
    out = method.hold_budget(state)
    draws = uniform_draws(tuple(state.set_sizes.shape), state.keys.device, 2, state.layer_idx, state.seen_tokens)
    for b, h in rows(state.keys):
        ranked = [float("-inf") if state.set_sizes[b, h, s] == 0 else float(draws[b, h, s]) for s in range(length)]
        assert_kept_slots(state, out, ref.keep_best(ranked, target), b, h)
    assert torch.equal(method.hold_budget(state).positions, out.positions)


@pytest.mark.parametrize("merge", ["add", "average"])
@pytest.mark.parametrize("window", [2, 32])
@pytest.mark.parametrize(("length", "target", "padding"), HOLD_CASES + [(60, 40, 3)])
def test_cam_while_generating_equals_the_reference(length, target, padding, window, merge):
    state = slot_state(length, length, target, padding)
    before = state.values.clone()
    out = CaM(merge_window=window, seed=4, merge=merge).hold_budget(state)
    assert torch.equal(state.values, before)
    uniforms = uniform_draws(tuple(state.set_sizes.shape), state.keys.device, 4, state.layer_idx, state.seen_tokens)
    for b, h in rows(state.keys):
        keep, merged = ref.cam_hold_row(
            state.values[b, h].double().numpy(),
            state.accumulated[b, h].tolist(),
            state.set_sizes[b, h].tolist(),
            uniforms[b, h].tolist(),
            target=target,
            recent=target // 2,
            window=window,
            average=merge == "average",
        )
        assert_kept_slots(state, out, keep, b, h)
        np.testing.assert_allclose(out.values[b, h].numpy(), merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BASELINES)
def test_every_generation_rule_keeps_exactly_the_target_and_leaves_the_state_alone(name):
    state = slot_state(3, 25, 16, padding=2)
    keys, values = state.keys.clone(), state.values.clone()
    out = get_method(name).hold_budget(state)
    assert out.keys.shape == (2, 3, 16, 6) and out.values.shape == (2, 3, 16, 6)
    assert (out.set_sizes > 0).all(), "padding slots go first"
    assert (out.positions[..., 1:] > out.positions[..., :-1]).all()
    assert torch.equal(state.keys, keys) and torch.equal(state.values, values)


# --------------------------------------------------------------------------------------------
# Names, parameters, command line
# --------------------------------------------------------------------------------------------


def test_every_baseline_is_registered_by_name_with_a_summary():
    for name in BASELINES:
        assert name in METHODS and METHODS[name].summary
        assert get_method(name, budget=0.35).budget == 0.35
    assert isinstance(get_method("streaming_llm"), StreamingLLM)
    assert isinstance(get_method("H2O"), H2O)


def test_kvmerger_methods_lists_every_baseline(capsys):
    assert cli_main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split(":")[0]: line for line in lines if line and not line.startswith(" ")}
    for name in BASELINES:
        assert METHODS[name].summary in listed[name]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("h2o", {"recent_share": 1.5}, "recent_share"),
        ("cam", {"merge_window": 0}, "merge_window"),
        ("cam", {"seed": 1.5}, "seed"),
        ("cam", {"merge": "sum"}, "merge"),
        ("streaming-llm", {"n_sink": -1}, "n_sink"),
        ("snapkv", {"kernel_size": 4}, "odd"),
        ("snapkv", {"window": 0}, "window"),
        ("snapkv", {"pooling": "median"}, "pooling"),
        ("random", {"seed": "x"}, "seed"),
        ("tova", {"budget": 0.0}, "budget"),
        ("knorm", {"budget": 1.5}, "budget"),
    ],
)
def test_bad_parameters_get_a_clear_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **params)


def test_cascade_merge_refuses_an_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        cascade_merge(torch.zeros(1, 3, 2), torch.zeros(1, 3), 2, strategy="loop")
