"""The score sources of the engine (docs/METHOD.md section 7b) against slow, plainly written references.

* window: SnapKV's pooled observation-window attention, from eager attention and a loop of pools;
* expected: Expected Attention (kvpress), from the attention module's own q_proj on its input
  hidden states (pre-RoPE queries, as kvpress takes them) and explicit rotation matrices;
* reconstruction: KVzip's repeat pass, from one plain forward pass over prompt + repeat tokens
  (no cache) whose query and key states are captured, and a loop over queries and heads;
* and the engine around them: the reconstruction leaves the prompt's cache as it was, and the
  online path (`compress` + `generate`) keeps the same slots as the offline one (`compress_prefill`).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvmerger import compress, compress_prefill, get_method, record_prefill
from kvmerger.engine import kernels
from kvmerger.engine import reconstruction as reconstruction_module
from kvmerger.engine.hf import layer_kinds
from kvmerger.engine.reconstruction import CARRIED_TOKENS, FIRST_INSTRUCTION, LATER_INSTRUCTION, Reconstruction
from kvmerger.engine.scoring import LayerScores, largest_attention, largest_probability, pool_finite_scores, pooled_window_attention
from kvmerger.methods.base import LayerInput
from tests.conftest import CharTokenizer, build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama", seed=3)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------
# window
# --------------------------------------------------------------------------------------------


def test_pooled_window_attention_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 30, 8, generator=generator), torch.randn(1, 2, 30, 8, generator=generator)
    got = pooled_window_attention(query, key, 0.4, window=6, kernel_size=3, pooling="avg")
    logits = (query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.4).double()
    logits = logits.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), -math.inf)
    received = logits.softmax(-1)[:, :, -6:].sum(2).view(1, 2, 2, 30).mean(2)
    expected = torch.zeros_like(received)
    for token in range(30):
        window = [received[..., t] if 0 <= t < 30 else torch.zeros_like(received[..., 0]) for t in (token - 1, token, token + 1)]
        expected[..., token] = sum(window) / 3
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def _kept_alone(method, keys: torch.Tensor, window_scores: torch.Tensor) -> set[int]:
    """Prompt positions that `method` keeps as slots of their own, given the window's attention."""
    layer = LayerInput(
        keys, keys.clone(), LayerScores.precomputed(keys, windows={32: window_scores}), 0, 1,
        method.target_slots(keys.shape[-2]),
    )
    output = method.compress(layer)
    return set(output.positions[output.set_sizes == 1].tolist())


def test_a_wide_max_pooled_window_protects_the_whole_span_around_a_spike():
    """One token the window attends to (the key of a needle) and near it nothing: SnapKV's average of 5
    protects 2 neighbours each side, a max over 9 protects 4, whatever their own scores."""
    length = 64
    keys = torch.randn(1, 1, length, 8, generator=torch.Generator().manual_seed(1))
    window_scores = torch.rand(1, 1, length, generator=torch.Generator().manual_seed(2)) * 0.01 + 0.001
    window_scores[..., 12:29] = 0.0
    window_scores[..., 20] = 1.0
    span = set(range(16, 25))
    options = {"budget": 0.5, "score": "window", "recent_share": 0.25, "topk_share": 0.5}
    wide = get_method("kvmerger", window_kernel=9, window_pooling="max", **options)
    assert span <= _kept_alone(wide, keys, window_scores)
    default = get_method("kvmerger", **options)
    assert set(range(18, 23)) <= _kept_alone(default, keys, window_scores)
    assert not span <= _kept_alone(default, keys, window_scores)
    fitted = get_method("fitted-kvmerger", window_kernel=9, window_pooling="max", **options).merger()
    assert (fitted.window_kernel, fitted.window_pooling) == (9, "max")  # its sets and pivots come from this KVMerger


@pytest.mark.parametrize("name", ["kvmerger", "fitted-kvmerger"])
@pytest.mark.parametrize("scores", ["window", "score"])  # the window's pooling, and the other sources'
def test_pooling_parameters_are_checked(name, scores):
    with pytest.raises(ValueError, match=f"{scores}_kernel must be a positive odd integer"):
        get_method(name, **{f"{scores}_kernel": 4})
    with pytest.raises(ValueError, match=f"{scores}_pooling must be one of"):
        get_method(name, **{f"{scores}_pooling": "median"})


def test_pooling_keeps_the_sinks_and_does_not_spread_them():
    scores = torch.tensor([[[math.inf, 0.1, 0.5, 0.0, 0.2, 0.3, 0.0]]])
    torch.testing.assert_close(pool_finite_scores(scores, 3, "max"), torch.tensor([[[math.inf, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3]]]))
    expected = torch.tensor([[[math.inf, 0.2, 0.2, 0.7 / 3, 0.5 / 3, 0.5 / 3, 0.1]]])
    torch.testing.assert_close(pool_finite_scores(scores, 3, "avg"), expected)


def test_the_other_sources_pool_only_when_asked():
    """score_kernel pools the aggregated (and reconstruction, expected) scores as window_kernel
    pools the window's; the default, 1, leaves them as their papers define them."""
    keys = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(3))
    aggregated = torch.rand(1, 2, 40, generator=torch.Generator().manual_seed(4))
    scores = LayerScores.precomputed(keys, aggregated=aggregated)
    assert torch.equal(scores.source("aggregated"), aggregated)
    wide = scores.source("aggregated", score_kernel=9, score_pooling="max")
    for token in range(40):
        assert torch.equal(wide[..., token], aggregated[..., max(0, token - 4) : token + 5].amax(-1))
    method = get_method("kvmerger", budget=0.5, score_kernel=9)
    layer = LayerInput(keys, keys.clone(), scores, 0, 1, method.target_slots(40))
    assert torch.equal(method.scores(layer), wide)
    assert method.compress(layer).accumulated is None  # a pooled score is no attention received: not held as one
    plain = get_method("kvmerger", budget=0.5)
    assert plain.compress(layer).accumulated is not None
    assert get_method("fitted-kvmerger", score_kernel=9, score_pooling="avg").merger().score_kernel == 9


# --------------------------------------------------------------------------------------------
# expected
# --------------------------------------------------------------------------------------------


def test_expected_attention_matches_kvpress_recipe(tiny, prompt):
    layer_idx = 1
    attention = tiny.model.layers[layer_idx].self_attn
    captured = {}

    def keep_input(module, args, kwargs, output) -> None:
        captured.setdefault("hidden", kwargs["hidden_states"])

    handle = attention.register_forward_hook(keep_input, with_kwargs=True)
    try:
        prefill = record_prefill(tiny, prompt)
    finally:
        handle.remove()
    got = prefill.scores[layer_idx].expected_attention(future_positions=16, sink_tokens=4)

    hidden = captured["hidden"][0, 4:].double()  # kvpress: every query after the sinks, before RoPE
    heads, dim = tiny.config.num_attention_heads, attention.head_dim
    queries = (hidden @ attention.q_proj.weight.double().T).view(-1, heads, dim).transpose(0, 1)  # [Hq, n, d]
    cos, sin = tiny.model.rotary_emb(hidden.float(), torch.arange(40, 56).unsqueeze(0))
    rotations = []
    for p in range(16):  # R_p x = x cos_p + rotate_half(x) sin_p, written out as a matrix
        matrix = torch.zeros(dim, dim, dtype=torch.float64)
        for i in range(dim):
            matrix[i, i] = cos[0, p, i]
            partner = i + dim // 2 if i < dim // 2 else i - dim // 2
            matrix[i, partner] = -sin[0, p, i] if i < dim // 2 else sin[0, p, i]
        rotations.append(matrix)
    mean_rotation = sum(rotations) / 16
    keys = prefill.cache.layers[layer_idx].keys[0].double()  # [Hkv, T, d]
    group = heads // keys.shape[0]
    expected = torch.zeros(keys.shape[0], 40, dtype=torch.float64)
    for head in range(heads):
        q = queries[head]
        mean = mean_rotation @ q.mean(0)
        centred = q - q.mean(0)
        covariance = mean_rotation @ (centred.T @ centred / q.shape[0]) @ mean_rotation.T
        k = keys[head // group, 4:]
        s = attention.scaling
        exponent = torch.stack([s * mean @ k_t + 0.5 * s * s * k_t @ covariance @ k_t for k_t in k])
        expected[head // group, 4:] += exponent.softmax(0) / group
    assert torch.isinf(got[0, :, :4]).all() and (got[0, :, :4] > 0).all(), "sinks are always kept"
    torch.testing.assert_close(got[0, :, 4:].double(), expected[:, 4:], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


def test_largest_probability_matches_a_loop():
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(1, 6, 7, 8, generator=generator), torch.randn(1, 3, 5, 8, generator=generator)
    lse = torch.randn(1, 6, 7, generator=generator) + 3
    got = largest_probability(query, key, 0.5, lse, chunk=3)
    expected = torch.zeros(1, 3, 5, dtype=torch.float64)
    for head in range(6):
        for row in range(7):
            probabilities = (key[0, head // 2].double() @ query[0, head, row].double() * 0.5 - lse[0, head, row].double()).exp()
            expected[0, head // 2] = torch.maximum(expected[0, head // 2], probabilities)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_largest_attention_matches_a_loop():
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 4, 7, 8, generator=generator), torch.randn(1, 2, 12, 8, generator=generator)
    got = largest_attention(query, key, 0.5, visible=5, targets=slice(1, 5), chunk=3)
    expected = torch.zeros(1, 2, 4, dtype=torch.float64)
    for head in range(4):
        for row in range(7):
            seen = key[0, head // 2, : 5 + row + 1].double()
            probabilities = (seen @ query[0, head, row].double() * 0.5).softmax(0)
            expected[0, head // 2] = torch.maximum(expected[0, head // 2], probabilities[1:5])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def capture_states(model, ids):
    """Query and key states of every layer in one plain forward pass over `ids` (no cache)."""
    states = {}

    def capturing(module, query, key, value, attention_mask, **kwargs):
        states[module.layer_idx] = (query.detach(), key.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capturing-test", capturing)
    previous = model.config._attn_implementation
    model.set_attn_implementation("capturing-test")
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        model.set_attn_implementation(previous)
    return states


@pytest.mark.parametrize("fused", [True, False], ids=["normaliser-from-the-attention", "chunked"])
def test_reconstruction_matches_a_plain_repeat_pass(tiny, prompt, fused, monkeypatch):
    """Fused: the repeat pass's own flash passes give each query's normaliser over the chunk (the
    chunked recomputation must not run); otherwise (no fused kernel) it is recomputed in chunks."""
    if fused:
        monkeypatch.setattr(reconstruction_module, "largest_attention", None)  # calling it would fail
    else:
        monkeypatch.setattr(kernels, "available", lambda device, dtype: False)
    tokenizer = CharTokenizer()
    prefill = record_prefill(tiny, prompt, tokenizer=tokenizer)
    before = [layer.keys.clone() for layer in prefill.cache.layers]
    reconstruction = Reconstruction(tiny, prefill.cache, prompt, tokenizer, chunk_tokens=16, sink_tokens=4)
    got = [reconstruction.scores(i) for i in range(3)]
    for layer, keys in zip(prefill.cache.layers, before):
        assert layer.seen_tokens == 40 and torch.equal(layer.keys, keys), "the prompt's cache must end as it was"

    encode = lambda text: tokenizer(text).input_ids  # noqa: E731
    expected = torch.zeros(3, 2, 40, dtype=torch.float64)
    for start in range(4, 40, 16):  # chunks of the prompt after the 4 sinks
        end = min(40, start + 16)
        head = encode(FIRST_INSTRUCTION) if start == 4 else encode(LATER_INSTRUCTION) + prompt[0, start - CARRIED_TOKENS : start].tolist()
        repeat = head + encode("\n") + prompt[0, start:end].tolist()
        states = capture_states(tiny, torch.cat([prompt, torch.tensor([repeat])], dim=1))
        for layer_idx, (query, key) in states.items():
            for q_head in range(4):
                kv_head = q_head // 2
                for row in range(len(repeat)):
                    q = query[0, q_head, 40 + row].double()
                    seen = list(range(4)) + list(range(start, end)) + list(range(40, 40 + row + 1))
                    probabilities = (key[0, kv_head, seen].double() @ q * tiny.model.layers[0].self_attn.scaling).softmax(0)
                    chunk_part = probabilities[4 : 4 + end - start]
                    expected[layer_idx, kv_head, start:end] = torch.maximum(expected[layer_idx, kv_head, start:end], chunk_part)
    for layer_idx in range(3):
        assert torch.isinf(got[layer_idx][0, :, :4]).all()
        torch.testing.assert_close(got[layer_idx][0, :, 4:].double(), expected[layer_idx, :, 4:], rtol=1e-4, atol=1e-6)
    queries = reconstruction.queries(0)
    assert queries.shape[:2] == (1, 4) and 1 <= queries.shape[2] <= 36


@pytest.fixture(scope="module")
def tiny_gemma():
    return build_tiny("gemma3", seed=4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(
    ("name", "params"),
    [("kvzip", {}), ("kvmerger", {"score": "reconstruction"}), ("fitted-kvmerger", {"reference": "reconstruction"})],
)
def test_reconstruction_methods_keep_the_same_slots_online_and_offline(tiny, tiny_gemma, prompt, family, name, params):
    """Also on a model with sliding-window layers, which the repeat pass overwrites and the engine restores."""
    model = tiny if family == "llama" else tiny_gemma
    tokenizer = CharTokenizer()
    method = get_method(name, budget=0.35, **params)
    with torch.no_grad():
        plain = model(prompt, use_cache=True).past_key_values
    with torch.no_grad(), compress(model, method, tokenizer=tokenizer) as session:
        output = model(prompt)
    offline, _ = compress_prefill(record_prefill(model, prompt, tokenizer=tokenizer), method)
    for index, (online_layer, offline_layer) in enumerate(zip(output.cache.layers, offline.layers)):
        assert online_layer.get_seq_length() == 40, "the repeat tokens must not stay in the cache"
        torch.testing.assert_close(online_layer.keys, offline_layer.keys)
        torch.testing.assert_close(online_layer.values, offline_layer.values)
        if getattr(online_layer, "is_sliding", False):  # restored exactly as the plain prefill left it
            torch.testing.assert_close(online_layer.keys, plain.layers[index].keys, rtol=0, atol=0)
    assert session.report.layers[0].seconds_scoring > 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_expected_and_window_scores_drive_kvmerger(tiny, tiny_gemma, prompt, family):
    model = tiny if family == "llama" else tiny_gemma
    prefill = record_prefill(model, prompt)
    for score in ("window", "expected", "aggregated+window"):
        cache, report = compress_prefill(prefill, get_method("kvmerger", budget=0.35, score=score))
        kinds = layer_kinds(model.config)
        assert [slots for slots, kind in zip(cache.slots(), kinds) if kind == "full_attention"] == [14] * kinds.count(
            "full_attention"
        )
    with pytest.raises(ValueError, match="score must be one of"):
        get_method("kvmerger", score="question")
