"""Padded batches, as `generate()` makes them (left padding, an attention mask with zeros).

Each sequence is compressed on its own tokens to ``ceil(budget x T_i)`` slots and padded to the
longest with masked slots; so greedy generation on a padded batch must give each prompt the tokens
(and, in float32, the logits within 1e-4) it gets alone. Checked for every registered method, the
per-slot bias path, KVMerger's paper mode and a held budget, on a tiny random Llama and a tiny
Gemma-3-like model (sliding-window layers left to transformers).
"""

from __future__ import annotations

import pytest
import torch

from kvmerger import METHODS, compress
from kvmerger.methods.base import CompressionMethod, slots_for_budget
from tests.conftest import TINY, CharTokenizer, build_tiny

LENGTHS = [40, 23, 31, 12]  # four prompts of different lengths; the longest first, the shortest last
NEW_TOKENS = 6
PAD = 0
BUDGET = 0.35
FIXED_BUDGET = {"full": 1.0}
# Scored by KVzip's reconstruction pass, which re-runs the model over one prompt: refused in padded batches.
RECONSTRUCTION = {"kvzip"}
VARIANTS = {
    "kvmerger": {"mode": "exact"},
    "kvmerger-paper": {"mode": "paper"},
    "kvmerger-size-bias": {"size_bias": True},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str) -> CompressionMethod:
    base = name.split("-paper")[0].split("-size-bias")[0]
    return METHODS[base](budget=FIXED_BUDGET.get(base, BUDGET), **VARIANTS.get(name, {}))


def prompts(lengths: list[int] = LENGTHS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(1, TINY["vocab_size"], (1, n), generator=generator) for n in lengths]


def left_padded(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(item.shape[1] for item in items)
    ids = torch.full((len(items), longest), PAD, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, longest - item.shape[1] :] = item[0]
        mask[row, longest - item.shape[1] :] = 1
    return ids, mask


def greedy(model, method: CompressionMethod, ids: torch.Tensor, mask: torch.Tensor | None, hold: bool):
    with torch.no_grad(), compress(model, method, hold_budget=hold, tokenizer=CharTokenizer()) as session:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1), session


def assert_batch_equals_one_at_a_time(model, method: CompressionMethod, hold: bool = False):
    items = prompts()
    ids, mask = left_padded(items)
    tokens, logits, session = greedy(model, method, ids, mask, hold)
    for row, item in enumerate(items):
        alone_tokens, alone_logits, _ = greedy(model, method, item, None, hold)
        assert tokens[row].tolist() == alone_tokens[0].tolist(), f"prompt {row} ({item.shape[1]} tokens)"
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=0, atol=1e-4)
    return session


CASES = sorted(set(METHODS) - RECONSTRUCTION) + ["kvmerger-paper", "kvmerger-size-bias"]


@pytest.mark.parametrize("name", CASES)
def test_a_padded_batch_generates_what_each_prompt_generates_alone(tiny_llama, name):
    method = build(name)
    session = assert_batch_equals_one_at_a_time(tiny_llama, method)
    report = session.report.layers[0]
    assert report.notes["sequence_tokens"] == LENGTHS
    if method.keeps_budget():
        slots = [method.target_slots(n, 2 * 16 * 4) for n in LENGTHS]  # head dim 16, float32 keys and values
        assert report.notes["sequence_slots"] == slots and report.slots_after == max(slots)


HOLDING = sorted(name for name in set(METHODS) - RECONSTRUCTION if build(name).can_hold_budget()) + ["kvmerger-size-bias"]


@pytest.mark.parametrize("name", HOLDING)
def test_a_padded_batch_holding_the_budget_generates_what_each_prompt_generates_alone(tiny_llama, name):
    assert_batch_equals_one_at_a_time(tiny_llama, build(name), hold=True)


@pytest.mark.parametrize("name", ["kvmerger", "h2o"])
def test_a_padded_batch_on_a_model_with_sliding_window_layers(name):
    model = build_tiny("gemma3")
    assert_batch_equals_one_at_a_time(model, build(name))
    assert_batch_equals_one_at_a_time(model, build(name), hold=True)


def test_padding_slots_are_masked_counted_and_positions_stay_true(tiny_llama):
    """The cache after a padded prefill: each row's own slots at the right, masked padding at the left
    (zero keys, -inf bias, counted in the bytes), and new tokens at each prompt's own next position."""
    method = build("h2o")
    ids, mask = left_padded(prompts())
    with torch.no_grad(), compress(tiny_llama, method, hold_budget=True) as session:
        out = tiny_llama(input_ids=ids, attention_mask=mask)
        cache = out.cache
    slots = [slots_for_budget(n, BUDGET) for n in LENGTHS]
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == max(slots) and cache.get_seq_length() == max(LENGTHS)
    for row, count in enumerate(slots):
        padding = max(slots) - count
        assert (layer.slot_bias[row, :, :padding] == float("-inf")).all()
        assert torch.isfinite(layer.slot_bias[row, :, padding:]).all()
        assert (layer.keys[row, :, :padding] == 0).all()
        assert (layer.hold.positions[row, :, :padding] == -1).all()
        assert (layer.hold.positions[row, :, padding:] < LENGTHS[row]).all()
    assert session.report.layers[0].bytes_after == layer.nbytes()
    assert layer.hold.appended(1, max(LENGTHS) + 1).positions[:, 0, -1].tolist() == LENGTHS


def test_right_padding_is_refused_with_the_fix_named(tiny_llama):
    ids, mask = left_padded(prompts())
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad(), compress(tiny_llama, build("h2o")):
            tiny_llama(input_ids=ids.flip(1), attention_mask=mask.flip(1))


def test_a_method_scored_by_reconstruction_is_refused_in_a_padded_batch(tiny_llama):
    ids, mask = left_padded(prompts())
    with pytest.raises(ValueError, match="reconstruct"):
        with torch.no_grad(), compress(tiny_llama, METHODS["kvzip"](budget=BUDGET), tokenizer=CharTokenizer()):
            tiny_llama(input_ids=ids, attention_mask=mask)
