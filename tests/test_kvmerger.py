"""KVMerger: the vectorised method equals the plain reference, keeps the budget, stays finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvmerger.engine.scoring import LayerScores
from kvmerger.methods.base import LayerInput, slots_for_budget
from kvmerger.methods.kvmerger import KVMerger, paper_protection
from tests.reference import ambiguous_order, ambiguous_selection, kvmerger_row


def layer_input(keys, values, attention, method) -> LayerInput:
    return LayerInput(
        keys=keys,
        values=values,
        scores=LayerScores.precomputed(keys, aggregated=attention),
        layer_idx=0,
        num_layers=1,
        slots=method.target_slots(keys.shape[-2]),
    )


def make_keys(rng: np.random.Generator, pattern: str, shape: tuple[int, ...]) -> np.ndarray:
    batch, heads, length, dim = shape
    if pattern == "random":
        return rng.normal(size=shape)
    if pattern == "smooth":  # neighbours alike, as in real post-RoPE keys
        steps = rng.normal(scale=0.3, size=shape)
        return np.cumsum(steps, axis=2) + rng.normal(size=(batch, heads, 1, dim))
    if pattern == "repeated":  # exact ties between pairs: a few distinct keys in runs
        palette = rng.normal(size=(3, dim))
        return palette[rng.integers(0, 3, size=(batch, heads, length))]
    if pattern == "identical":
        return np.broadcast_to(rng.normal(size=(1, 1, 1, dim)), shape).copy()
    if pattern == "zeros":
        keys = rng.normal(size=shape)
        keys[:, :, rng.random(length) < 0.4] = 0.0
        return keys
    raise ValueError(pattern)


def make_attention(rng: np.random.Generator, pattern: str, shape: tuple[int, ...]) -> np.ndarray:
    if pattern == "ties":
        return rng.integers(0, 3, size=shape).astype(np.float32)
    return rng.random(shape).astype(np.float32) * 5


def selection_is_ambiguous(row: dict, sims32: list[float], method: KVMerger, length: int, slots: int) -> bool:
    """True if float32 vs float64 rounding could legitimately pick other pairs."""
    if method.mode == "paper":
        return any(abs(row["similarity"][t] - method.eps) < 1e-5 for t in row["eligible"])
    if method.max_set_size is not None:  # the cut depends on which pairs come first, not just the top count
        return ambiguous_order(row["similarity"], sims32, row["eligible"])
    return ambiguous_selection(row["similarity"], sims32, row["eligible"], max(0, length - slots))


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["exact", "paper"]))
    budget = draw(st.sampled_from([0.1, 0.2, 0.35, 0.5, 0.75, 1.0]))
    protect = draw(st.sampled_from(["paper", "none", "custom"]))
    if protect == "none":
        recent, topk = 0.0, 0.0
    elif protect == "custom":
        recent = draw(st.floats(0.0, 0.4))
        topk = draw(st.floats(0.0, 0.4))
    else:
        recent = topk = None
    try:
        method = KVMerger(
            budget=budget,
            mode=mode,
            eps=draw(st.sampled_from([0.0, 0.5, 0.75, 0.95])),
            recent_ratio=recent,
            topk_ratio=topk,
            sigma=draw(st.sampled_from([None, None, 0.5, 5.0])),
            scale_values_by_set_size=draw(st.booleans()),
            max_set_size=draw(st.sampled_from([None, None, None, 1, 2, 3, 5])),
        )
    except ValueError:
        assume(False)
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(2, 40)),
        draw(st.integers(1, 6)),
    )
    return method, shape, draw(st.sampled_from(["random", "smooth", "repeated", "identical", "zeros"])), draw(
        st.sampled_from(["random", "ties"])
    ), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cases())
def test_vectorised_kvmerger_equals_the_reference(case):
    method, shape, key_pattern, attention_pattern, seed = case
    rng = np.random.default_rng(seed)
    batch, heads, length, dim = shape
    keys = make_keys(rng, key_pattern, shape)
    values = rng.normal(size=shape)
    attention = make_attention(rng, attention_pattern, shape[:3])
    layer = layer_input(
        torch.tensor(keys, dtype=torch.float32),
        torch.tensor(values, dtype=torch.float32),
        torch.tensor(attention),
        method,
    )
    output = method.compress(layer)

    slots = layer.slots
    identify = method.identify(layer.keys.reshape(-1, length, dim), layer.scores.aggregated_attention().reshape(-1, length), slots)
    keys32 = layer.keys.double().numpy()
    for b in range(batch):
        for h in range(heads):
            row = kvmerger_row(
                keys32[b, h],
                values[b, h],
                attention[b, h],
                slots=slots,
                mode=method.mode,
                eps=method.eps,
                n_recent=identify.n_recent,
                n_topk=identify.n_topk,
                sigma=method.sigma,
                scale_values=method.scale_values_by_set_size,
                max_set_size=method.max_set_size,
            )
            sims32 = identify.similarity.view(batch, heads, -1)[b, h].tolist()
            assume(not selection_is_ambiguous(row, sims32, method, length, slots))
            real = len(row["pivots"])
            assert output.positions[b, h, :real].tolist() == row["pivots"]
            assert output.set_sizes[b, h, :real].tolist() == row["sizes"]
            assert (output.positions[b, h, real:] == -1).all() and (output.set_sizes[b, h, real:] == 0).all()
            scale = max(1.0, float(np.abs(row["values"]).max()))
            np.testing.assert_allclose(output.keys[b, h, :real].double().numpy(), row["keys"], rtol=1e-4, atol=1e-5 * scale)
            np.testing.assert_allclose(output.values[b, h, :real].double().numpy(), row["values"], rtol=1e-4, atol=1e-5 * scale)
            if method.mode == "exact":
                assert real == slots
    if method.mode == "exact":
        assert output.keys.shape[-2] == slots and output.bias is None


def test_identical_keys_merge_everything_unprotected_in_paper_mode():
    keys = torch.ones(1, 1, 30, 4)
    method = KVMerger(mode="paper", recent_ratio=0.0, topk_ratio=0.0)
    output = method.compress(layer_input(keys, torch.randn(1, 1, 30, 4), torch.rand(1, 1, 30), method))
    assert output.keys.shape[-2] == 1 and output.set_sizes.tolist() == [[[30]]]
    torch.testing.assert_close(output.keys[0, 0, 0], keys[0, 0, 0], rtol=1e-6, atol=1e-6)


def test_exact_mode_keeps_the_budget_in_every_head():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 101, 8, generator=generator)
    for budget in (0.1, 0.35, 0.5, 0.9):
        method = KVMerger(budget=budget)
        out = method.compress(layer_input(keys, keys.clone(), torch.rand(2, 3, 101, generator=generator), method))
        assert out.keys.shape == (2, 3, slots_for_budget(101, budget), 8)
        assert (out.set_sizes.sum(-1) == 101).all()


def test_protected_tokens_are_kept_unchanged():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 100, 8, generator=generator).cumsum(dim=2)
    values = torch.randn(1, 2, 100, 8, generator=generator)
    attention = torch.rand(1, 2, 100, generator=generator)
    method = KVMerger(budget=0.5)
    out = method.compress(layer_input(keys, values, attention, method))
    recent, topk = method.protection()
    for h in range(2):
        protected = set(range(100 - int(recent * 100), 100))
        others = sorted(set(range(100)) - protected, key=lambda t: (-float(attention[0, h, t]), -t))
        protected |= set(others[: int(topk * 100)])
        kept = {int(p): s for p, s in zip(out.positions[0, h], range(out.keys.shape[2]))}
        for token in protected:
            slot = kept[token]
            assert int(out.set_sizes[0, h, slot]) == 1
            assert torch.equal(out.keys[0, h, slot], keys[0, h, token])
            assert torch.equal(out.values[0, h, slot], values[0, h, token])


def test_inputs_are_not_modified():
    keys, values, attention = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4), torch.rand(1, 2, 20)
    copies = keys.clone(), values.clone(), attention.clone()
    method = KVMerger(budget=0.35)
    method.compress(layer_input(keys, values, attention, method))
    assert torch.equal(keys, copies[0]) and torch.equal(values, copies[1]) and torch.equal(attention, copies[2])


@pytest.mark.parametrize(
    "keys",
    [
        torch.zeros(1, 2, 24, 8),
        torch.ones(1, 2, 24, 8),
        torch.full((1, 2, 24, 8), 3e37),
        torch.randn(1, 2, 24, 8) * 1e30,
        torch.randn(1, 2, 24, 8) * 1e-30,
        torch.randn(1, 2, 24, 8).bfloat16(),
        torch.full((1, 2, 24, 8), 3e38).bfloat16(),
    ],
    ids=["zero-norm", "identical", "huge-identical", "huge", "tiny", "bf16", "bf16-max"],
)
@pytest.mark.parametrize("method", [KVMerger(0.35), KVMerger(0.35, mode="paper"), KVMerger(0.35, sigma=1e-3), KVMerger(0.35, scale_values_by_set_size=True)], ids=["exact", "paper", "tiny-sigma", "value-scaling"])
def test_no_nan_or_inf_for_finite_inputs(keys, method):
    values = keys.flip(2).clone()
    out = method.compress(layer_input(keys, values, torch.rand(1, 2, 24), method))
    assert out.keys.dtype == keys.dtype and out.values.dtype == keys.dtype
    assert torch.isfinite(out.keys.float()).all() and torch.isfinite(out.values.float()).all()


def test_bf16_result_matches_float32_closely():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 3, 64, 16, generator=generator).cumsum(2)
    values = torch.randn(1, 3, 64, 16, generator=generator)
    attention = torch.rand(1, 3, 64, generator=generator)
    method = KVMerger(0.5)
    full = method.compress(layer_input(keys, values, attention, method))
    half = method.compress(layer_input(keys.bfloat16(), values.bfloat16(), attention, method))
    same_sets = torch.equal(full.positions, half.positions)
    assert same_sets or (full.positions != half.positions).float().mean() < 0.1
    if same_sets:
        torch.testing.assert_close(half.keys.float(), full.keys, rtol=0.02, atol=0.05)


def test_protection_shrinks_when_it_leaves_no_room_and_says_so():
    method = KVMerger(budget=0.5, recent_ratio=0.3, topk_ratio=0.19)  # 10 tokens: 3 recent, 1 top-k, 5 slots
    keys = torch.randn(1, 1, 10, 4)
    attention = torch.tensor([[[0.1, 0.2, 0.1, 0.9, 0.1, 0.2, 0.1, 0.5, 0.5, 0.5]]])  # top token inside a run
    out = method.compress(layer_input(keys, keys.clone(), attention, method))
    assert out.keys.shape[-2] == 5  # 3 recent + 1 top-k + 2 runs would be 6
    assert out.notes["protection_shrunk"] and out.notes["topk_kept_mean"] == 0


def test_adjacent_heavy_hitters_stay_protected_when_they_fit():
    """A top-k that sits together (a number's digits) splits one run, not one per token: it is kept
    whole where the worst-case bound (every top-k token alone) would have cut it."""
    from kvmerger.methods.kvmerger import protection_within_budget

    attention = torch.zeros(2, 40)
    attention[0, 10:18] = 1.0  # 8 adjacent heavy hitters
    attention[1, ::5] = 1.0  # 8 scattered ones
    protected, kept = protection_within_budget(attention, n_recent=4, n_topk=8, slots=16)
    assert kept.tolist()[0] == 8 and protected[0, 10:18].all()  # 4 + 8 + 2 runs = 14 <= 16
    assert kept.tolist()[1] < 8  # scattered: 4 + 8 + 8 runs would be 20
    free = ~protected[1]
    runs = int((free & torch.cat([torch.tensor([True]), ~free[:-1]])).sum())
    assert int(protected[1].sum()) + runs <= 16


def test_paper_protection_settings():
    assert paper_protection(0.5) == pytest.approx((0.17, 0.12))
    assert paper_protection(0.35) == pytest.approx((0.08, 0.02))
    assert paper_protection(0.1) == pytest.approx((0.08 / 3.5, 0.02 / 3.5))
    assert paper_protection(1.0) == pytest.approx((0.34, 0.24))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"budget": 0.0}, "budget must be in \\(0, 1\\]"),
        ({"budget": 1.5}, "budget must be in \\(0, 1\\]"),
        ({"budget": -0.2}, "budget must be in \\(0, 1\\]"),
        ({"eps": 1.2}, "eps .* must be in \\[-1, 1\\]"),
        ({"eps": -3}, "eps .* must be in \\[-1, 1\\]"),
        ({"recent_ratio": -0.1}, "recent_ratio must be in \\[0, 1\\]"),
        ({"topk_ratio": -0.5}, "topk_ratio must be in \\[0, 1\\]"),
        ({"budget": 0.3, "recent_ratio": 0.2, "topk_ratio": 0.1}, "leaves no room within budget 0.3"),
        ({"mode": "greedy"}, "mode must be one of"),
        ({"sigma": 0.0}, "sigma must be a positive number"),
        ({"mode": "paper", "recent_ratio": 0.7, "topk_ratio": 0.6}, "exceeds 1"),
        ({"max_set_size": 0}, "max_set_size must be a whole number of tokens >= 1"),
        ({"max_set_size": 2.5}, "max_set_size must be a whole number of tokens >= 1"),
        ({"max_set_size": True}, "max_set_size must be a whole number of tokens >= 1"),
    ],
)
def test_bad_parameters_get_a_clear_error(params, message):
    with pytest.raises(ValueError, match=message):
        KVMerger(**params)


@pytest.mark.parametrize("cap", [3, 4, 6])
def test_a_set_size_cap_keeps_the_budget_and_no_set_is_longer(cap):
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 1, 8) + 0.05 * torch.randn(2, 3, 64, 8)  # alike neighbours: long runs uncapped
    values = torch.randn(2, 3, 64, 8)
    attention = torch.rand(2, 3, 64)
    uncapped = KVMerger(budget=0.5, recent_ratio=0.05, topk_ratio=0.05)
    capped = KVMerger(budget=0.5, recent_ratio=0.05, topk_ratio=0.05, max_set_size=cap)
    before = uncapped.compress(layer_input(keys, values, attention, uncapped))
    after = capped.compress(layer_input(keys, values, attention, capped))
    assert int(before.set_sizes.max()) > cap  # the cap has something to cut
    assert after.keys.shape == before.keys.shape == (2, 3, 32, 8)
    assert int(after.set_sizes.max()) <= cap and (after.set_sizes >= 1).all()
    assert (after.set_sizes.sum(-1) == 64).all()
    assert after.notes["cap_relaxed_rows"] == 0 and "cap_relaxed_rows" not in before.notes
    assert after.notes["largest_set_mean"] <= cap < before.notes["largest_set_mean"]


def test_a_cap_that_cannot_reach_the_budget_merges_those_rows_without_it_and_says_so():
    torch.manual_seed(1)
    keys, values, attention = torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 4), torch.rand(1, 2, 40)
    method = KVMerger(budget=0.2, recent_ratio=0.0, topk_ratio=0.0, max_set_size=3)  # 40 tokens in 8 slots need sets of 5
    output = method.compress(layer_input(keys, values, attention, method))
    plain = KVMerger(budget=0.2, recent_ratio=0.0, topk_ratio=0.0)
    expected = plain.compress(layer_input(keys, values, attention, plain))
    assert output.notes["cap_relaxed_rows"] == 2
    assert torch.equal(output.set_sizes, expected.set_sizes) and torch.equal(output.keys, expected.keys)


def test_slots_for_budget_is_the_ceiling_without_float_noise():
    assert slots_for_budget(20, 0.35) == 7
    assert slots_for_budget(1500, 0.35) == 525
    assert slots_for_budget(1501, 0.5) == 751
    assert slots_for_budget(10, 0.01) == 1
    assert all(slots_for_budget(n, 1.0) == n for n in range(1, 50))
    assert all(slots_for_budget(n, b) == math.ceil(round(b * n, 9)) for n in range(1, 200) for b in (0.1, 0.35, 0.5))
