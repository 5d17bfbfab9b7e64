"""A layer's heads sharing its budget (``head_budget="shared"``): the selection against a plainly
written reference, and the packed cache against the same selection held densely (every token
stored, the evicted ones masked by a -inf bias), through prefill, decoding, `generate()`, forks and
crops, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from kvmerger import compress, compress_prefill, record_prefill
from kvmerger.engine.hf import CompressedCache, CompressedLayer
from kvmerger.engine.session import attach, compress_layer
from kvmerger.methods.attention_matching import Targets, fit_slot_values, fit_slot_weights
from kvmerger.methods.fitted_kvmerger import leading_columns
from kvmerger.methods.base import LayerInput, get_method, keep_by_score_shared, slots_for_budget
from tests.conftest import CharTokenizer, build_tiny, standalone_scores

SHARED = ["snapkv", "expected-attention", "kvzip"]


def reference_shared_selection(
    scores: torch.Tensor, forced: torch.Tensor, per_head: int, floor: int = 0
) -> list[list[list[int]]]:
    """For each batch element and head, the kept token indices: every (head, token) pair ranked by its
    score (+inf if forced), ties to the later token then the later head; each head's first `floor` pairs
    in that order kept, then the best of the rest up to `heads * per_head`."""
    batch, heads, length = scores.shape
    kept = []
    for b in range(batch):
        pairs = [(h, t) for h in range(heads) for t in range(length)]

        def rank(pair: tuple[int, int]) -> tuple[float, int]:
            head, token = pair
            score = float("inf") if forced[b, head, token] else float(scores[b, head, token])
            return score, token * heads + head

        pairs.sort(key=rank, reverse=True)
        chosen = [pair for head in range(heads) for pair in [p for p in pairs if p[0] == head][:floor]]
        chosen += [pair for pair in pairs if pair not in chosen][: heads * per_head - len(chosen)]
        kept.append([sorted(t for h, t in chosen if h == head) for head in range(heads)])
    return kept


@pytest.mark.parametrize("floor", [0, 4])
@pytest.mark.parametrize("seed", range(6))
def test_shared_selection_matches_the_reference(seed, floor):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, length, dim = 2, 3, 17, 4
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    values = torch.randn(batch, heads, length, dim + 1, generator=generator)
    scores = torch.randint(0, 6, (batch, heads, length), generator=generator).float()  # ties on purpose
    forced = torch.zeros(batch, heads, length, dtype=torch.bool)
    forced[..., :2] = True
    per_head = 1 + seed
    layer = LayerInput(keys, values, standalone_scores(torch.randn(batch, 6, length, dim), keys, 0.5), 0, 1, per_head)
    output = keep_by_score_shared(layer, scores, forced, floor=min(floor, per_head))
    expected = reference_shared_selection(scores, forced, per_head, min(floor, per_head))
    assert output.keys.shape == (batch, 1, heads * per_head, dim) and output.slot_heads.dtype == torch.uint8
    for b in range(batch):
        for head in range(heads):
            mine = output.slot_heads[b] == head
            tokens = output.positions[b, 0, mine]
            assert tokens.tolist() == expected[b][head]
            assert torch.equal(output.keys[b, 0, mine], keys[b, head, tokens])
            assert torch.equal(output.values[b, 0, mine], values[b, head, tokens])
        assert output.notes["head_slots"][b] == [len(t) for t in expected[b]]


def masked_twin(model, method, ids):
    """(packed cache, dense twin): the twin stores every prompt token and masks those the method evicted."""
    prefill = record_prefill(model, ids, tokenizer=CharTokenizer())
    packed, report = compress_prefill(prefill, method)
    layers = []
    for index, (full, mine) in enumerate(zip(prefill.cache.layers, packed.layers)):
        if not isinstance(mine, CompressedLayer):
            layers.append(mine)
            continue
        output, _ = compress_layer(method, full.keys, full.values, prefill.scores[index], index, len(packed.layers))
        bias = torch.full(full.keys.shape[:3], float("-inf"))
        batch = torch.arange(bias.shape[0]).unsqueeze(-1)
        bias[batch, output.slot_heads.long(), output.positions[:, 0]] = 0.0
        layers.append((full.keys, full.values, bias))
    twin = CompressedCache.from_tensors(layers, seen_tokens=prefill.length)
    return packed, twin, report


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", SHARED)
def test_packed_cache_attends_as_its_selection_held_densely(family, name):
    model = build_tiny(family)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    method = get_method(name, budget=0.3, head_budget="shared")
    packed, twin, report = masked_twin(model, method, ids)
    question = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    logits: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), attach(model):
        for label, cache in (("packed", packed), ("twin", twin)):
            logits[label] = [model(question, cache=cache).logits]
            for _ in range(4):
                logits[label].append(model(logits[label][-1][:, -1:].argmax(-1), cache=cache).logits)
    for mine, theirs in zip(logits["packed"], logits["twin"]):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)
    slots = slots_for_budget(40, 0.3)
    compressed = [layer for layer in packed.layers if isinstance(layer, CompressedLayer)]
    heads = model.config.num_key_value_heads
    for layer, layer_report in zip(compressed, report.layers):
        assert layer.packed and layer.stored_slots == layer_report.slots_after + 9  # 5 + 4 tokens appended
        assert layer_report.slots_after <= slots  # one tag byte per slot is paid from the budget
        head_counts = torch.bincount(layer.slot_heads[0, : heads * layer_report.slots_after].long(), minlength=heads)
        assert head_counts.tolist() == layer_report.notes["head_slots"][0]
        assert layer.keys.shape == (1, 1, heads * (layer_report.slots_after + 9), layer.keys.shape[-1])


def test_shared_budget_frees_the_budgets_memory_and_runs_generate():
    model = build_tiny("llama")
    ids = torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(5))
    outputs, reports = {}, {}
    for head_budget in ("equal", "shared"):
        method = get_method("snapkv", budget=0.35, window=4, head_budget=head_budget)
        with torch.no_grad(), compress(model, method) as session:
            outputs[head_budget] = model.generate(ids, max_new_tokens=6, do_sample=False)
        reports[head_budget] = session.report
    equal, shared = reports["equal"], reports["shared"]
    assert outputs["shared"].shape == (1, 54)
    for mine, theirs in zip(shared.layers, equal.layers):
        assert mine.bytes_after <= theirs.bytes_after  # tags included
        assert mine.bytes_after > 0.9 * theirs.bytes_after
        assert sum(mine.notes["head_slots"][0]) == 2 * mine.slots_after
    assert any(len(set(layer.notes["head_slots"][0])) > 1 for layer in shared.layers)  # the heads do differ


def test_a_fork_and_a_crop_leave_the_packed_cache_as_it_was():
    model = build_tiny("llama")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    prefill = record_prefill(model, ids, tokenizer=CharTokenizer())
    packed, _ = compress_prefill(prefill, get_method("kvzip", budget=0.4, head_budget="shared"))
    before = [(layer.keys, layer.slot_heads) for layer in packed.layers]
    question = torch.tensor([[7, 8, 9]])
    with torch.no_grad(), attach(model):
        first = model(question, cache=packed.fork()).logits
        second = model(question, cache=packed.fork()).logits
        grown = packed.fork()
        model(question, cache=grown)
        grown.crop(-3)
        again = model(question, cache=grown).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, again, atol=1e-6, rtol=1e-5)
    assert all(layer.keys is keys and layer.slot_heads is tags for layer, (keys, tags) in zip(packed.layers, before))


def test_shared_budgets_refuse_padded_batches_and_holding_the_budget():
    model = build_tiny("llama")
    method = get_method("snapkv", budget=0.5, head_budget="shared")
    with pytest.raises(ValueError, match="cannot hold a budget"):
        with compress(model, method, hold_budget=True):
            pass
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded batches"), torch.no_grad(), compress(model, method):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="head_budget must be one of equal, shared"):
        get_method("kvzip", head_budget="layer")


@pytest.mark.parametrize("name", SHARED)
def test_a_full_head_floor_is_the_equal_budget_and_a_partial_one_lifts_the_poorest_head(name):
    """head_floor=1 guarantees every head all of its S slots, which is the whole shared budget: the
    selection of head_budget='equal' with as many slots. A floor of 0.9 leaves no head with fewer than 0.9 S."""
    model = build_tiny("llama")
    ids = torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(9))
    prefill = record_prefill(model, ids, tokenizer=CharTokenizer())
    layers = len(prefill.scores)
    options = {"window": 4} if name == "snapkv" else {}  # a window of 32 would be most of each head's slots
    for index, full in enumerate(prefill.cache.layers):
        kept, slots = {}, {}
        for label, floor in (("full", 1.0), ("partial", 0.9)):
            method = get_method(name, budget=0.3, head_budget="shared", head_floor=floor, **options)
            output, report = compress_layer(method, full.keys, full.values, prefill.scores[index], index, layers)
            kept[label], slots[label] = layer_positions(output), report.slots_after
        equal = get_method(name, budget=0.3, **options).compress(
            LayerInput(full.keys, full.values, prefill.scores[index], index, layers, slots["full"])
        )
        assert kept["full"] == layer_positions(equal)
        guaranteed = math.floor(0.9 * slots["partial"])
        assert min(len(tokens) for tokens in kept["partial"]) >= guaranteed


def layer_positions(output) -> list[list[int]]:
    """Each head's kept token positions, sorted, from a dense or a packed LayerOutput (batch element 0)."""
    if output.slot_heads is None:
        return [sorted(row.tolist()) for row in output.positions[0]]
    heads = int(output.slot_heads.max()) + 1
    return [sorted(output.positions[0, 0, output.slot_heads[0] == head].tolist()) for head in range(heads)]


def test_head_floor_is_refused_without_a_shared_budget_or_out_of_range():
    with pytest.raises(ValueError, match="needs head_budget='shared'"):
        get_method("snapkv", head_floor=0.2)
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match=r"head_floor is the share .* in \[0, 1\]"):
            get_method("kvzip", head_budget="shared", head_floor=bad)


def test_a_packed_cache_outside_a_session_says_what_to_do():
    model = build_tiny("llama")
    with torch.no_grad(), compress(model, get_method("snapkv", budget=0.5, head_budget="shared")):
        cache = model(torch.randint(3, 100, (1, 20))).cache
    with pytest.raises(RuntimeError, match="heads packed into one row"), torch.no_grad():
        model(torch.tensor([[5]]), cache=cache)


# --------------------------------------------------------------------------------------------
# KVMerger with a shared head budget: each head merges down to the slots it won
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_rows_with_their_own_budgets_merge_as_each_row_alone(seed):
    """identify() with a budget per row gives each row the sets it gets with that budget alone."""
    generator = torch.Generator().manual_seed(seed)
    rows, length = 6, 30
    keys = torch.randn(rows, length, 8, generator=generator).cumsum(1)
    attention = torch.rand(rows, length, generator=generator)
    budgets = torch.randint(1, length + 1, (rows,), generator=generator)
    merger = get_method("kvmerger", budget=0.4, recent_share=0.3, topk_share=0.4)
    together = merger.identify(keys, attention, budgets)
    for row in range(rows):
        alone = merger.identify(keys[row : row + 1], attention[row : row + 1], int(budgets[row]))
        assert torch.equal(together.segment[row], alone.segment[0])
        assert torch.equal(together.protected[row], alone.protected[0])
    assert torch.equal(together.count, budgets.clamp(max=length))


def scaled_protection(n_recent: int, n_topk: int, budget: int, layer_slots: int, length: int) -> tuple[int, int]:
    """The recent and top-k counts of a head with `budget` slots, written plainly: the layer's counts times
    budget / layer_slots, rounded down, the recent ones leaving one slot, the top-k ones what the recent leave."""
    recent = min(n_recent * budget // layer_slots, budget - 1)
    return recent, min(n_topk * budget // layer_slots, length - recent)


@pytest.mark.parametrize("seed", range(4))
def test_a_shared_budget_protects_the_same_share_of_each_rows_budget(seed):
    """With `layer_slots`, a row with budget b protects floor(n * b / layer_slots) recent and top-k tokens
    (n: the layer's counts), as a merger with those counts alone would."""
    generator = torch.Generator().manual_seed(seed)
    rows, length, layer_slots = 6, 40, 12
    keys = torch.randn(rows, length, 8, generator=generator).cumsum(1)
    attention = torch.rand(rows, length, generator=generator)
    budgets = torch.randint(1, 3 * layer_slots, (rows,), generator=generator)
    merger = get_method("kvmerger", budget=0.3, recent_share=0.25, topk_share=0.5)
    n_recent, n_topk = math.floor(0.3 * 0.25 * length + 1e-9), math.floor(0.3 * 0.5 * length + 1e-9)
    together = merger.identify(keys, attention, budgets, layer_slots=layer_slots)
    for row in range(rows):
        budget = int(budgets[row])
        recent, topk = scaled_protection(n_recent, n_topk, budget, layer_slots, length)
        alone = get_method("kvmerger", budget=1.0, recent_ratio=recent / length, topk_ratio=topk / length)
        expected = alone.identify(keys[row : row + 1], attention[row : row + 1], budget)
        assert int(together.protected[row, length - recent :].sum()) == recent
        assert torch.equal(together.protected[row], expected.protected[0])
        assert torch.equal(together.segment[row], expected.segment[0])
    assert torch.equal(together.count, budgets.clamp(max=length))


@pytest.mark.parametrize("score, head_floor", [("aggregated", 0.0), ("window", 0.0), ("window", 0.6)])
def test_shared_kvmerger_is_each_head_merged_to_the_budget_it_won(score, head_floor):
    generator = torch.Generator().manual_seed(7)
    batch, heads, length, dim = 2, 3, 40, 8
    keys = torch.randn(batch, heads, length, dim, generator=generator).cumsum(2)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    query = torch.randn(batch, 6, length, dim, generator=generator) * 2
    scores = standalone_scores(query, keys, dim**-0.5)
    shared = get_method("kvmerger", budget=0.3, score=score, head_budget="shared", head_floor=head_floor)
    output, report = compress_layer(shared, keys, values, scores, layer_idx=0, num_layers=1)
    per_head = shared.target_slots(length, 2 * dim * 4)
    assert output.keys.shape == (batch, 1, heads * per_head, dim) and report.slots_after == per_head
    n_recent, n_topk = (math.floor(ratio * length + 1e-9) for ratio in shared.protection())
    won = output.notes["head_slots"]
    for b in range(batch):
        for head in range(heads):
            alone = LayerInput(keys[b : b + 1, head : head + 1], values[b : b + 1, head : head + 1], None, 0, 1, won[b][head])
            source = shared.scores(LayerInput(keys, values, scores, 0, 1, per_head))[b : b + 1, head : head + 1]
            recent, topk = scaled_protection(n_recent, n_topk, won[b][head], per_head, length)
            equal = get_method("kvmerger", budget=1.0, score=score, recent_ratio=recent / length, topk_ratio=topk / length)
            sets = equal.identify(alone.keys[0], source[0], won[b][head])
            mine = output.slot_heads[b] == head
            assert int(mine.sum()) == won[b][head] == int(sets.count)
            expected = torch.zeros(won[b][head], dtype=torch.long).scatter_add(0, sets.segment[0], torch.ones(length, dtype=torch.long))
            assert torch.equal(output.set_sizes[b, 0, mine], expected)
    assert all(min(counts) >= max(1, math.floor(head_floor * per_head)) for counts in won)


@pytest.mark.parametrize("name", ["kvmerger", "fitted-kvmerger"])
def test_a_shared_merge_with_a_full_head_floor_is_the_equal_merge(name):
    """head_floor=1 gives every head S slots: the same slots, values, positions (and fitted biases) as
    head_budget='equal' with as many slots, packed."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, length, dim = 2, 3, 40, 8
    keys = torch.randn(batch, heads, length, dim, generator=generator).cumsum(2)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    scores = standalone_scores(torch.randn(batch, 6, length, dim, generator=generator) * 2, keys, dim**-0.5)
    shared = get_method(name, budget=0.3, score="window", head_budget="shared", head_floor=1.0)
    packed, report = compress_layer(shared, keys, values, scores, layer_idx=0, num_layers=1)
    dense = get_method(name, budget=0.3, score="window").compress(LayerInput(keys, values, scores, 0, 1, report.slots_after))
    assert packed.notes["head_slots"] == [[report.slots_after] * heads] * batch
    pairs = [(packed.keys, dense.keys), (packed.values, dense.values), (packed.positions, dense.positions)]
    if name == "fitted-kvmerger":
        pairs.append((packed.bias, dense.bias))
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.reshape(theirs.shape), theirs, atol=0, rtol=0)


def test_shared_kvmerger_generates_and_refuses_what_it_cannot_pack():
    model = build_tiny("llama")
    ids = torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), compress(model, get_method("kvmerger", budget=0.35, head_budget="shared")) as session:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 53)
    assert all(sum(layer.notes["head_slots"][0]) == 2 * layer.slots_after for layer in session.report.layers)
    for bad in ({"mode": "paper"}, {"size_bias": True}, {"max_set_size": 4}):
        with pytest.raises(ValueError, match="head_budget='shared'"):
            get_method("kvmerger", head_budget="shared", **bad)


# --------------------------------------------------------------------------------------------
# Fitted KVMerger with a shared head budget: packed slots with per-slot biases
# --------------------------------------------------------------------------------------------


def dense_twin_of_packed(packed: CompressedCache, seen_tokens: int) -> CompressedCache:
    """The packed cache held densely: each head's slots (keys, values, biases) in its own row, padded
    to the widest head with zero keys and a -inf bias."""
    layers = []
    for layer in packed.layers:
        if not isinstance(layer, CompressedLayer) or not layer.packed:
            layers.append(layer)
            continue
        heads = layer.kv_heads
        tags = layer.slot_heads[0].long()
        width = int(torch.bincount(tags, minlength=heads).max())
        keys = layer.keys.new_zeros(1, heads, width, layer.keys.shape[-1])
        values = layer.values.new_zeros(1, heads, width, layer.values.shape[-1])
        bias = torch.full((1, heads, width), float("-inf"))
        for head in range(heads):
            mine = tags == head
            count = int(mine.sum())
            keys[0, head, :count], values[0, head, :count] = layer.keys[0, 0, mine], layer.values[0, 0, mine]
            bias[0, head, :count] = layer.slot_bias[0, 0, mine]
        layers.append((keys, values, bias))
    return CompressedCache.from_tensors(layers, seen_tokens=seen_tokens)


@pytest.mark.parametrize("score", ["expected", "reconstruction"])
def test_fitted_shared_kvmerger_attends_as_its_slots_and_biases_held_densely(score):
    model = build_tiny("llama")
    ids = torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(2))
    prefill = record_prefill(model, ids, tokenizer=CharTokenizer())
    method = get_method("fitted-kvmerger", budget=0.3, head_budget="shared", score=score)
    packed, report = compress_prefill(prefill, method)
    assert any(len(set(layer.notes["head_slots"][0])) > 1 for layer in report.layers)  # heads hold different counts
    twin = dense_twin_of_packed(packed, prefill.length)
    slot_bytes = 2 * model.config.head_dim * 4
    slots = method.target_slots(48, slot_bytes)
    for layer, layer_report in zip(packed.layers, report.layers):
        assert layer.packed and layer.slot_bias.shape == (1, 1, 2 * slots) and bool(layer.slot_bias.isfinite().all())
        assert layer_report.bytes_after <= slots_for_budget(48, 0.3) * 2 * slot_bytes  # keys, values, biases, tags
    question = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    logits: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), attach(model):
        for label, cache in (("packed", packed.fork()), ("twin", twin)):
            logits[label] = [model(question, cache=cache).logits]
            for _ in range(3):
                logits[label].append(model(logits[label][-1][:, -1:].argmax(-1), cache=cache).logits)
    for mine, theirs in zip(logits["packed"], logits["twin"]):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)
    grown = packed.fork()
    with torch.no_grad(), attach(model):
        model(question, cache=grown)
    grown.crop(-5)  # the appended tokens' slots and zero biases go again
    assert all(torch.equal(a.slot_bias, b.slot_bias) for a, b in zip(grown.layers, packed.layers))


@pytest.mark.parametrize("seed", range(3))
def test_a_row_with_padding_slots_is_fitted_as_that_row_alone(seed):
    """Rows of a shared budget hold different numbers of slots; padded with zero features, a [0, 0] box
    and their own count of columns, each row's weights and values are those of the row fitted alone."""
    generator = torch.Generator().manual_seed(seed)
    rows, count, width, dim = 3, 10, 9, 4
    real = torch.tensor([9, 6, 3])
    features = torch.rand(rows, count, width, generator=generator) + 0.05
    padding = torch.arange(width) >= real.view(-1, 1)
    features = features.masked_fill(padding.unsqueeze(1), 0.0)
    mass = torch.rand(rows, count, generator=generator) * width
    prior = torch.randint(1, 4, (rows, width), generator=generator).float().masked_fill(padding, 0.0)
    outputs = torch.randn(rows, count, dim, generator=generator)
    prior_values = torch.randn(rows, width, dim, generator=generator).masked_fill(padding.unsqueeze(-1), 0.0)
    together = fit_slot_weights(features, mass, prior, prior * 0.05, prior * 20, 0.1, 2, True, columns=real)
    values = fit_slot_values(features, together, outputs, prior_values, 0.1, columns=real)
    for row in range(rows):
        n = int(real[row])
        f, p = features[row : row + 1, :, :n], prior[row : row + 1, :n]
        alone = fit_slot_weights(f, mass[row : row + 1], p, p * 0.05, p * 20, 0.1, 2, True)
        torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-4)
        assert bool((together[row, n:] == 0).all())
        alone_values = fit_slot_values(f, alone, outputs[row : row + 1], prior_values[row : row + 1, :n], 0.1)
        torch.testing.assert_close(values[row, :n], alone_values[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fit_slots", ["merged", "merged-values"])
def test_fitting_only_the_merged_sets_fits_each_padded_row_as_that_row_alone(seed, fit_slots):
    """fit_slots="merged" gathers each row's merged columns first and pads the rest: a row's merged sets
    get the weights and values of that row fitted alone; its single tokens and padding keep their prior
    values (and, with "merged", their prior weights)."""
    generator = torch.Generator().manual_seed(seed)
    rows, count, width, dim = 3, 10, 9, 4
    real = torch.tensor([9, 6, 3])
    padding = torch.arange(width) >= real.view(-1, 1)
    sizes = torch.randint(1, 4, (rows, width), generator=generator).masked_fill(padding, 0)
    sizes[2, :3] = 1  # a row with no merged set at all
    features = (torch.rand(rows, count, width, generator=generator) + 0.05).masked_fill(padding.unsqueeze(1), 0.0)
    targets = Targets(
        shift=torch.zeros(rows, count), mass=torch.rand(rows, count, generator=generator) * width + 1.0,
        outputs=torch.randn(rows, count, dim, generator=generator), attention_rms=None,
        visible=torch.ones(rows, count, dtype=torch.bool),
    )
    prior_values = torch.randn(rows, width, dim, generator=generator).masked_fill(padding.unsqueeze(-1), 0.0)
    method = get_method("fitted-kvmerger", fit_slots=fit_slots)
    weights, values = method.fit(features, targets, sizes.float(), prior_values, sizes, real)
    fitted_any = False
    for row in range(rows):
        n = int(real[row])
        one = slice(row, row + 1)
        row_targets = Targets(targets.shift[one], targets.mass[one], targets.outputs[one], None, targets.visible[one])
        row_sizes = sizes[one, :n]
        w, v = method.fit(features[one, :, :n], row_targets, row_sizes.float(), prior_values[one, :n], row_sizes, real[one])
        torch.testing.assert_close(weights[row, :n], w[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values[row, :n], v[0], atol=1e-4, rtol=1e-4)
        single = sizes[row] <= 1
        assert torch.equal(values[row][single], prior_values[row][single])
        if fit_slots == "merged":
            assert torch.equal(weights[row][single], sizes[row][single].float())
        fitted_any |= not torch.equal(weights[row][~single], sizes[row][~single].float())
    assert fitted_any
    assert torch.equal(leading_columns(sizes > 1, 2)[1], (torch.arange(2) < (sizes > 1).sum(1, keepdim=True)))
