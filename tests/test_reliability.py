"""Issue 17's engine and method points, reproduced on a tiny random Llama: non-finite caches get one
clear error (and leave the model as it was), tiny prompts and one-slot budgets work in every method
and mode, a one-token prompt held at its budget says so, a `compress(...)` object can be entered
again, budgets are numbers, and many prompts in a row leave nothing behind."""

from __future__ import annotations

import gc
import warnings
from dataclasses import replace

import pytest
import torch

from kvmerger import METHODS, KVMerger, NonFiniteCacheError, compress, compress_prefill, record_prefill
from kvmerger.engine.hf import ATTENTION_NAME, active_session
from kvmerger.engine.session import compress_layer
from tests.conftest import CharTokenizer, build_tiny, standalone_scores

# Every mode of every registered method (new methods run with their defaults).
VARIANTS = {
    "kvmerger": [
        {"mode": "exact"}, {"mode": "paper"}, {"size_bias": True}, {"mode": "paper", "size_bias": True},
        {"head_budget": "shared"},
    ],
    "fitted-kvmerger": [{}, {"slot_keys": "pivot"}],
    **{name: [{}, {"head_budget": "shared"}] for name in ("expected-attention", "kvzip", "snapkv")},
}
FIXED_BUDGET = {"full": 1.0}


def every_variant():
    for name in sorted(METHODS):
        for params in VARIANTS.get(name, [{}]):
            label = name + "".join(f"-{key}={value}" for key, value in params.items())
            yield pytest.param(name, params, id=label)


def build(name: str, params: dict, budget: float):
    return METHODS[name](budget=FIXED_BUDGET.get(name, budget), **params)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))


def assert_restored(model: torch.nn.Module) -> None:
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert active_session() is None


# --------------------------------------------------------------------------------------------
# Non-finite caches: one clear error, before any method runs, through every path
# --------------------------------------------------------------------------------------------

# Where one NaN goes, and the layer, tensor and first token the error must name.
NAN_WEIGHTS = {
    "q_proj-layer-0": (lambda m: m.model.layers[0].self_attn.q_proj.weight, (0, 0), 0, "query states", 0),
    "k_proj-layer-1": (lambda m: m.model.layers[1].self_attn.k_proj.weight, (0, 0), 1, "keys", 0),
    "v_proj-layer-2": (lambda m: m.model.layers[2].self_attn.v_proj.weight, (3, 5), 2, "values", 0),
    "embedding-of-token-7": (None, None, 0, "keys", 7),
}


@pytest.fixture(scope="module")
def broken_models(prompt):
    """A tiny Llama per entry of NAN_WEIGHTS, with that one weight set to NaN."""
    models = {}
    for label, (weight, index, *_) in NAN_WEIGHTS.items():
        model = build_tiny("llama")
        with torch.no_grad():
            if weight is None:
                model.model.embed_tokens.weight[int(prompt[0, 7]), 0] = float("nan")
            else:
                weight(model)[index] = float("nan")
        models[label] = model
    return models


def test_a_nan_weight_makes_the_plain_model_non_finite_too(broken_models, prompt):
    """Why there is no lenient mode: the model's own logits are already NaN (see engine/finite.py)."""
    for model in broken_models.values():
        with torch.no_grad():
            assert not torch.isfinite(model(prompt).logits[:, -1]).any()


@pytest.mark.parametrize("where", sorted(NAN_WEIGHTS))
@pytest.mark.parametrize(("name", "params"), list(every_variant()))
def test_a_nan_weight_gets_the_clear_error_in_every_method(broken_models, prompt, name, params, where):
    """Issue 17: IndexError (kvmerger, fitted-kvmerger), torch's internal assert (attention-matching)
    or NaN copied into the cache (the others) before."""
    model = broken_models[where]
    *_, layer, tensor, token = NAN_WEIGHTS[where]
    with pytest.raises(NonFiniteCacheError) as error, torch.no_grad():
        with compress(model, build(name, params, 0.35), tokenizer=CharTokenizer()):
            model.generate(prompt, max_new_tokens=3, do_sample=False)
    message = str(error.value)
    assert message.startswith(f"layer {layer}: the prompt's {tensor} hold NaN or inf in ")
    assert f"first at token {token})" in message and "torch.isfinite" in message
    assert (error.value.layer, error.value.tensor) == (layer, tensor)
    assert_restored(model)


def test_the_offline_path_gets_the_same_error(broken_models, prompt):
    prefill = record_prefill(broken_models["k_proj-layer-1"], prompt, tokenizer=CharTokenizer())
    for name in sorted(METHODS):
        with pytest.raises(NonFiniteCacheError, match="^layer 1: the prompt's keys hold NaN or inf"):
            compress_prefill(prefill, build(name, {}, 0.5))


def test_after_the_error_the_model_gives_bit_identical_logits(tiny_llama, prompt):
    with torch.no_grad():
        before = tiny_llama(prompt).logits
        embeds = tiny_llama.model.embed_tokens(prompt)
        embeds[0, 12, 5] = float("inf")
        with compress(tiny_llama, KVMerger(budget=0.5)) as session:
            with pytest.raises(NonFiniteCacheError, match=r"^layer 0: the prompt's keys .* first at token 12\)"):
                tiny_llama(inputs_embeds=embeds)
            tiny_llama(prompt)  # the session goes on with the next, healthy prompt
        assert_restored(tiny_llama)
        after = tiny_llama(prompt).logits
    assert torch.equal(before, after)
    assert len(session.reports) == 1 and session.report.tokens == 30


def test_a_float16_overflow_is_named(prompt):
    model = build_tiny("llama").half()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(2e5)  # weights stay finite, keys pass 65504
        with pytest.raises(NonFiniteCacheError, match=r"^layer 1: .* float16 overflow .* bfloat16 or float32"):
            with compress(model, KVMerger(budget=0.5)):
                model(prompt)


def test_holding_the_budget_refuses_non_finite_new_tokens(tiny_llama, prompt):
    """During generation a method shrinks layers holding the newest tokens: they are checked too."""
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5), hold_budget=True):
        cache = tiny_llama(prompt).cache
        embeds = tiny_llama.model.embed_tokens(prompt[:, :1])
        embeds[..., 0] = float("nan")
        with pytest.raises(NonFiniteCacheError, match="^layer 0: the newest tokens' keys .* first at token 30"):
            tiny_llama(inputs_embeds=embeds, cache=cache)


# --------------------------------------------------------------------------------------------
# Tiny prompts and extreme budgets, every method and mode
# --------------------------------------------------------------------------------------------


def tiny_layer(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 4, length, 8, generator=generator) * 2
    keys = torch.randn(2, 2, length, 8, generator=generator).cumsum(2)
    values = torch.randn(2, 2, length, 8, generator=generator)
    return keys, values, standalone_scores(query, keys, 8**-0.5)


@pytest.mark.parametrize("budget", [1e-6, 1.0])
@pytest.mark.parametrize("length", [1, 2, 3])
@pytest.mark.parametrize(("name", "params"), list(every_variant()))
def test_one_to_three_tokens_at_one_slot_and_at_all_slots(name, params, length, budget):
    """Issue 17: IndexError in KVMerger / fitted-kvmerger on a one-token row before."""
    method = build(name, params, budget)
    keys, values, scores = tiny_layer(length)
    output, report = compress_layer(method, keys, values, scores, layer_idx=0, num_layers=1)
    if output.slot_heads is not None:  # a shared head budget, packed head by head: as [B, Hkv, S] when heads are equal
        assert [sum(counts) for counts in output.notes["head_slots"]] == [2 * report.slots_after] * 2
        if report.slots_after == length:
            keys, values = (getattr(output, n).reshape(2, 2, length, -1) for n in ("keys", "values"))
            output = replace(output, keys=keys, values=values, positions=output.positions.reshape(2, 2, length))
    slots = report.slots_after if output.slot_heads is not None else output.keys.shape[-2]
    if method.keeps_budget():
        assert slots == (1 if method.budget < 0.5 else length) == report.slots_after
    if method.keeps_budget() and slots == length:  # nothing to remove: every token keeps its own slot and key
        assert torch.equal(output.positions, torch.arange(length).expand(2, 2, -1))
        assert torch.equal(output.keys, keys)
        if not method.stores_bias():
            assert torch.equal(output.values, values)
    assert torch.isfinite(output.keys).all() and torch.isfinite(output.values).all()


@pytest.mark.parametrize("budget", [1e-6, 1.0])
@pytest.mark.parametrize("length", [2, 3])
@pytest.mark.parametrize(("name", "params"), [p for p in every_variant() if build(*p.values, 0.5).can_hold_budget()])
def test_two_and_three_token_prompts_held_at_one_slot_and_at_all_slots(tiny_llama, name, params, length, budget):
    method = build(name, params, budget)
    with torch.no_grad(), compress(tiny_llama, method, hold_budget=True, tokenizer=CharTokenizer()):
        out = tiny_llama(torch.arange(3, 3 + length)[None])
        cache = out.cache
        slots = cache.slots()
        assert slots == [1 if budget < 0.5 else length] * 3
        for _ in range(6):
            out = tiny_llama(out.logits[:, -1:].argmax(-1), cache=cache)
            assert torch.isfinite(out.logits).all() and cache.slots() == slots
    assert cache.get_seq_length() == length + 6


def test_holding_the_budget_on_a_one_token_prompt_says_so(tiny_llama):
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5), hold_budget=True) as session:
        with pytest.warns(UserWarning, match="one token: nothing to compress and no budget to hold") as caught:
            out = tiny_llama.generate(torch.tensor([[5]]), max_new_tokens=4, do_sample=False)
    assert len(caught) == 1 and out.shape == (1, 5) and not session.reports
    with torch.no_grad(), compress(tiny_llama, KVMerger(budget=0.5)):  # without holding: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tiny_llama.generate(torch.tensor([[5]]), max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------------------------
# The context manager and the budget
# --------------------------------------------------------------------------------------------


def test_a_compress_object_can_be_entered_again_but_not_inside_itself(tiny_llama, prompt):
    """Issue 17: contextlib's AttributeError on the second `with` before."""
    block = compress(tiny_llama, KVMerger(budget=0.5))
    with torch.no_grad():
        with block as first:
            tiny_llama(prompt)
        assert_restored(tiny_llama)
        with block as second:
            tiny_llama(prompt)
            with pytest.raises(RuntimeError, match="already active"):
                with block:
                    pass
            assert tiny_llama.config._attn_implementation == ATTENTION_NAME  # the refusal changed nothing
    assert first is second and len(second.reports) == 2
    assert_restored(tiny_llama)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("budget", [True, False])
def test_a_bool_is_not_a_budget(name, budget):
    with pytest.raises(ValueError, match=rf"budget must be in \(0, 1\] .*, a number\), got {budget}$"):
        METHODS[name](budget=budget)


# --------------------------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------------------------


def live_tensors() -> int:
    gc.collect()
    return sum(1 for item in gc.get_objects() if issubclass(type(item), torch.Tensor))  # type(): no proxies


def test_ten_prompts_leave_the_model_exactly_as_it_was(tiny_llama):
    generator = torch.Generator().manual_seed(11)
    lengths = torch.randint(2, 60, (10,), generator=generator).tolist()
    prompts = [torch.randint(0, 128, (1, length), generator=generator) for length in lengths]
    probe = prompts[0]
    names = sorted(set(METHODS) - {"full"})
    with torch.no_grad():
        before = tiny_llama(probe).logits
        counts = {}
        for index, ids in enumerate(prompts):
            method = METHODS[names[index % len(names)]](budget=0.35)
            with compress(tiny_llama, method, hold_budget=index % 2 == 0, tokenizer=CharTokenizer()) as session:
                out = tiny_llama.generate(ids, max_new_tokens=5, do_sample=False)
            assert out.shape[1] == ids.shape[1] + 5 and session.report.tokens == ids.shape[1]
            assert_restored(tiny_llama)
            del out, session
            if index in (1, 9):  # after the first warm-up prompts, and at the end (both without holding)
                counts[index] = live_tensors()
        after = tiny_llama(probe).logits
    assert torch.equal(before, after)
    assert counts[9] <= counts[1], f"live tensors grew from {counts[1]} to {counts[9]} over 8 prompts"
