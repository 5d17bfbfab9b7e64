"""One contract for every registered method (everything in `kvmerger.METHODS`, whoever wrote it).

At budget b every layer and KV head keeps exactly ``slots_for_budget(T, b)`` slots, the same number for
every method, so that comparisons between methods mean something; a method that also stores a
per-slot logit bias keeps fewer, so that its bytes stay within the same budget. Here, on random layers with real
attention statistics: exact slot counts, shapes and dtypes kept, inputs untouched, finite outputs,
bf16, valid positions in increasing order; then on a tiny random Llama: compress a prompt and
generate, and hold the budget for 300 generated tokens.

Methods that cannot take every budget or mode are listed below with the reason, never skipped silently.
"""

from __future__ import annotations

import pytest
import torch

from kvmerger import METHODS, compress
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, slots_for_budget
from tests.conftest import CharTokenizer, standalone_scores

BUDGETS = [0.1, 0.35, 0.5, 1.0]
TINY_SLOT_BYTES = 2 * 16 * 4  # the tiny Llama's key and value per slot and KV head: head dim 16, float32
LENGTHS = [2, 9, 40, 150]
# The full cache keeps everything: budget 1.0 is the only one it accepts.
FIXED_BUDGET = {"full": 1.0}
# KVMerger's paper mode keeps whatever a fixed threshold gives (padded heads; tests/test_kvmerger.py);
# its exact mode is the one that keeps the shared budget.
VARIANTS = {"kvmerger": {"mode": "exact"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run thousands of tiny tensor operations, for which a second OpenMP thread only adds
    synchronisation (on a busy machine, waits of milliseconds per operation); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, budget: float) -> CompressionMethod:
    return METHODS[name](budget=FIXED_BUDGET.get(name, budget), **VARIANTS.get(name, {}))


def cases(budgets: list[float], lengths: list[int]):
    for name in sorted(METHODS):
        for budget in [FIXED_BUDGET[name]] if name in FIXED_BUDGET else budgets:
            for length in lengths:
                yield pytest.param(name, budget, length, id=f"{name}-{budget:g}-T{length}")


def random_layer(length: int, budget: float, dtype: torch.dtype, seed: int = 0) -> tuple[LayerInput, torch.Tensor]:
    """A layer of 2 sequences x 2 KV heads (4 query heads), with statistics from its own query states."""
    generator = torch.Generator().manual_seed(seed * 1000 + length)
    batch, q_heads, kv_heads, dim = 2, 4, 2, 8
    query = (torch.randn(batch, q_heads, length, dim, generator=generator) * 2).to(dtype)
    keys = (torch.randn(batch, kv_heads, length, dim, generator=generator).cumsum(2) * 0.5).to(dtype)
    values = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    scores = standalone_scores(query, keys, dim**-0.5)
    return LayerInput(keys, values, scores, layer_idx=1, num_layers=3, slots=slots_for_budget(length, budget)), query


def check_output(layer: LayerInput, out: LayerOutput, dtype: torch.dtype) -> None:
    batch, heads, length, dim = layer.keys.shape
    slots = layer.slots
    assert out.keys.shape == (batch, heads, slots, dim) and out.values.shape == (batch, heads, slots, dim)
    assert out.keys.dtype == out.values.dtype == dtype
    assert out.positions.shape == (batch, heads, slots) and out.positions.dtype == torch.long
    assert (out.positions >= 0).all() and (out.positions < length).all(), "positions must be prompt indices"
    assert (out.positions[..., 1:] > out.positions[..., :-1]).all(), "slots must be in sequence order"
    assert torch.isfinite(out.keys.float()).all() and torch.isfinite(out.values.float()).all()
    if out.bias is not None:
        assert out.bias.shape == (batch, heads, slots) and torch.isfinite(out.bias).all()
    if out.set_sizes is not None:
        assert out.set_sizes.shape == (batch, heads, slots) and (out.set_sizes >= 1).all()
        assert (out.set_sizes.sum(-1) <= length).all()


@pytest.mark.parametrize(("name", "budget", "length"), list(cases(BUDGETS, LENGTHS)))
def test_every_method_keeps_exactly_the_shared_budget(name, budget, length):
    method = build(name, budget)
    assert method.keeps_budget()
    assert method.target_slots(length) == slots_for_budget(length, budget)
    layer, query = random_layer(length, budget, torch.float32)
    originals = (layer.keys.clone(), layer.values.clone(), query.clone())
    out = method.compress(layer)
    check_output(layer, out, torch.float32)
    for before, after in zip(originals, (layer.keys, layer.values, query)):
        assert torch.equal(before, after), f"{name} modified its inputs"


@pytest.mark.parametrize(("name", "budget", "length"), list(cases([0.35], [40])))
def test_every_method_works_in_bf16(name, budget, length):
    layer, _ = random_layer(length, budget, torch.bfloat16, seed=1)
    check_output(layer, build(name, budget).compress(layer), torch.bfloat16)


def test_the_listed_exceptions_are_real():
    with pytest.raises(ValueError):
        METHODS["full"](budget=0.5)
    assert not METHODS["kvmerger"](mode="paper").keeps_budget()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_compresses_a_prompt_and_generates(tiny_llama, random_ids, name):
    method = build(name, 0.35)
    with torch.no_grad(), compress(tiny_llama, method, tokenizer=CharTokenizer()) as session:
        out = tiny_llama.generate(
            random_ids,
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert out.sequences.shape == (1, 56)
    assert len(out.logits) == 8 and all(torch.isfinite(step).all() for step in out.logits)
    slots = method.target_slots(48, TINY_SLOT_BYTES)
    assert [layer.slots_after for layer in session.report.layers] == [slots] * 3
    if not method.stores_bias():
        assert slots == slots_for_budget(48, method.budget)
    budget_bytes = slots_for_budget(48, method.budget) * TINY_SLOT_BYTES * 2  # 2 KV heads
    assert all(layer.bytes_after <= budget_bytes for layer in session.report.layers), "over the budget's memory"


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full"}))
def test_every_method_holds_its_budget_for_300_generated_tokens(tiny_llama, random_ids, name):
    method = build(name, 0.5)
    prompt = random_ids[:, :40]
    target = method.target_slots(40, TINY_SLOT_BYTES)
    with torch.no_grad(), compress(tiny_llama, method, hold_budget=True, tokenizer=CharTokenizer()):
        out = tiny_llama(prompt)
        cache = out.cache
        assert cache.slots() == [target] * 3
        for _ in range(300):
            token = out.logits[:, -1:].argmax(-1)
            out = tiny_llama(token, cache=cache)
            assert torch.isfinite(out.logits).all()
            assert cache.slots() == [target] * 3, f"{name} let a layer leave its budget"
    assert cache.get_seq_length() == 340
    for layer in cache.layers:
        positions = layer.hold.positions
        assert (positions[..., 1:] > positions[..., :-1]).all() and int(positions.max()) < 340
