"""The chunked attention statistics match eager attention's column sums."""

import copy

import pytest
import torch

from kvmerger.engine import kernels, scoring
from kvmerger.engine.hf import install_session
from kvmerger.engine.scoring import LayerScores, aggregated_attention, aggregated_attention_from_lse, window_attention
from kvmerger.engine.session import RecordingSession, record_prefill


def eager_probabilities(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """The full [B, Hq, T, T] causal softmax, written the obvious way (float64)."""
    group = query.shape[1] // key.shape[1]
    keys = key.double().repeat_interleave(group, dim=1)
    logits = query.double() @ keys.transpose(-1, -2) * scaling
    length = query.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def grouped_column_sums(probs: torch.Tensor, kv_heads: int, first_query: int = 0) -> torch.Tensor:
    batch, q_heads, length, _ = probs.shape
    sums = probs[:, :, first_query:].sum(dim=2)  # [B, Hq, T]
    return sums.view(batch, kv_heads, q_heads // kv_heads, length).mean(dim=2)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
def test_aggregated_attention_matches_eager(chunk, heads):
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(chunk + q_heads)
    query = torch.randn(2, q_heads, 50, 16, generator=generator) * 2
    key = torch.randn(2, kv_heads, 50, 16, generator=generator)
    expected = grouped_column_sums(eager_probabilities(query, key, 0.25), kv_heads)
    got = aggregated_attention(query, key, 0.25, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (2, kv_heads, 50)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    # every query's probabilities sum to one, so the column sums add up to the number of queries
    torch.testing.assert_close(got.sum(-1), torch.full((2, kv_heads), 50.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("window", [1, 5, 32, 80])
def test_window_attention_matches_eager(window):
    generator = torch.Generator().manual_seed(window)
    query = torch.randn(1, 6, 40, 8, generator=generator)
    key = torch.randn(1, 3, 40, 8, generator=generator)
    expected = grouped_column_sums(eager_probabilities(query, key, 0.3), 3, first_query=max(0, 40 - window))
    torch.testing.assert_close(window_attention(query, key, 0.3, window, chunk=16).double(), expected, rtol=1e-4, atol=1e-6)


def test_bf16_states_are_scored_in_float32():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 30, 8, generator=generator).bfloat16()
    key = torch.randn(1, 2, 30, 8, generator=generator).bfloat16()
    expected = grouped_column_sums(eager_probabilities(query, key, 0.35), 2)
    got = aggregated_attention(query, key, 0.35)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_scores_from_a_real_prefill_match_eager_attention_weights(tiny_llama, random_ids, fused, monkeypatch):
    """Query states captured from the model's own attention call give eager attention's column sums."""
    if fused:
        monkeypatch.setattr(scoring, "FUSED_FROM_TOKENS", 2)
    eager = type(tiny_llama)(copy.deepcopy(tiny_llama.config)).eval()  # its own config: the fixture's stays sdpa
    eager.load_state_dict(tiny_llama.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(random_ids, output_attentions=True).attentions
    prefill = record_prefill(tiny_llama, random_ids, chunk_size=5)
    assert all(scores.uses_fused_path == fused for scores in prefill.scores)
    kv_heads = tiny_llama.config.num_key_value_heads
    for layer, probs in enumerate(attentions):
        expected = grouped_column_sums(probs.double(), kv_heads)
        got = prefill.scores[layer].aggregated_attention().double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_scores_are_memoised_and_timed():
    query, key = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    scores = LayerScores(query, key, 0.5)
    first = scores.aggregated_attention()
    assert scores.aggregated_attention() is first
    assert scores.seconds > 0
    with pytest.raises(ValueError, match="group evenly"):
        LayerScores(torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4), 0.5)


# -- the fused path: the prefill keeps each row's log-normaliser, one flash pass gives the column sums --


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_sdpa_output_bit_for_bit_and_each_rows_log_normaliser(dtype):
    generator = torch.Generator().manual_seed(11)
    query = (torch.randn(2, 6, 70, 16, generator=generator) * 2).to(dtype)
    key = torch.randn(2, 6, 70, 16, generator=generator).to(dtype)
    value = torch.randn(2, 6, 70, 16, generator=generator).to(dtype)
    output, lse = kernels.causal_attention_with_lse(query, key, value, 0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.3)
    assert torch.equal(output, expected)
    future = torch.ones(70, 70, dtype=torch.bool).triu(1)
    logits = (query.double() @ key.double().transpose(-1, -2) * 0.3).masked_fill(future, float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 6, 70)
    torch.testing.assert_close(lse.double(), logits.logsumexp(dim=-1), rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("part", [[0, 1, 5, 6, 7], [], list(range(9))], ids=["some", "none", "every-past-key"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_appended_attention_returns_the_normaliser_over_a_part_of_the_keys(part, dtype):
    generator = torch.Generator().manual_seed(12)
    past, length = 9, 6
    query = (torch.randn(2, 3, length, 16, generator=generator) * 2).to(dtype)
    key = (torch.randn(2, 3, past + length, 16, generator=generator) * 2).to(dtype)
    value = torch.randn(2, 3, past + length, 16, generator=generator).to(dtype)
    output, lse = kernels.attention_with_part_lse(query, key, value, torch.tensor(part, dtype=torch.long), 0.3)
    rows = torch.arange(length).unsqueeze(1) + past
    seen = torch.arange(past + length).unsqueeze(0) <= rows  # every past key, own keys causally
    logits = (query.double() @ key.double().transpose(-1, -2) * 0.3).masked_fill(~seen, float("-inf"))
    expected = logits.softmax(dim=-1) @ value.double()
    in_part = seen & (torch.isin(torch.arange(past + length), torch.tensor(part, dtype=torch.long)) | (torch.arange(past + length) >= past))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert output.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(output.double(), expected, **tolerance)
    torch.testing.assert_close(lse.double(), logits.masked_fill(~in_part, float("-inf")).logsumexp(dim=-1), **tolerance)


def lse_of(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)
    return kernels.causal_attention_with_lse(query, keys, keys, scaling)[1]


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("length", [2, 33, 130])
def test_column_sums_from_the_log_normalisers_match_eager(heads, length):
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(length + q_heads)
    query = torch.randn(2, q_heads, length, 16, generator=generator) * 3  # sharp attention: large logits
    key = torch.randn(2, kv_heads, length, 16, generator=generator)
    expected = grouped_column_sums(eager_probabilities(query, key, 0.25), kv_heads)
    got = aggregated_attention_from_lse(query, key, lse_of(query, key, 0.25), 0.25)
    assert got.dtype == torch.float32 and got.shape == (2, kv_heads, length)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_column_sums_from_the_log_normalisers_in_bf16_stay_within_one_percent():
    """bf16 states run the swapped pass in bf16; the float32 column sums of the same states are the truth."""
    generator = torch.Generator().manual_seed(5)
    query = (torch.randn(1, 6, 200, 32, generator=generator) * 2).bfloat16()
    key = torch.randn(1, 2, 200, 32, generator=generator).bfloat16()
    expected = grouped_column_sums(eager_probabilities(query, key, 0.2), 2)
    got = aggregated_attention_from_lse(query, key, lse_of(query, key, 0.2), 0.2).double()
    relative = (got - expected).abs() / expected
    assert relative.max() <= 1e-2


@pytest.fixture
def fused_from_two_tokens(monkeypatch):
    """Let short test prompts take the fused path (by default it starts where it is the faster one)."""
    monkeypatch.setattr(scoring, "FUSED_FROM_TOKENS", 2)


def test_layer_scores_take_the_fused_path_only_when_they_can(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 4, 40, 8, generator=generator) * 2
    key = torch.randn(1, 2, 40, 8, generator=generator)
    lse = lse_of(query, key, 0.4)
    assert not LayerScores(query, key, 0.4, lse=lse).uses_fused_path  # 40 tokens: the chunked pass is faster
    monkeypatch.setattr(scoring, "FUSED_FROM_TOKENS", 40)
    fused = LayerScores(query, key, 0.4, lse=lse)
    chunked = LayerScores(query, key, 0.4)
    assert fused.uses_fused_path and not chunked.uses_fused_path
    torch.testing.assert_close(fused.aggregated_attention(), chunked.aggregated_attention(), rtol=1e-4, atol=1e-6)
    assert fused.fresh().uses_fused_path and fused.fresh().lse is fused.lse
    monkeypatch.setattr(kernels, "available", lambda device, dtype: False)
    assert not LayerScores(query, key, 0.4, lse=fused.lse).uses_fused_path
    with pytest.raises(ValueError, match="lse must be"):
        LayerScores(query, key, 0.4, lse=fused.lse[..., :-1])


def test_a_compressing_prefill_keeps_the_log_normalisers_and_its_logits(tiny_llama, random_ids, fused_from_two_tokens):
    """The prefill's attention runs the kernel that keeps lse, and the model's output does not change."""
    prefill = record_prefill(tiny_llama, random_ids)
    assert all(scores.uses_fused_path for scores in prefill.scores)
    with torch.no_grad():
        plain = tiny_llama(random_ids, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    assert torch.equal(prefill.last_logits, plain)


def test_a_prefill_with_an_explicit_mask_falls_back_to_sdpa_and_the_chunked_pass(
    tiny_llama, random_ids, fused_from_two_tokens
):
    """A 4-D float mask is not plain causal attention: no lse is kept, the scores are still eager's."""
    length = random_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    session = RecordingSession(tiny_llama)
    with torch.no_grad(), install_session(tiny_llama, session):
        cache = tiny_llama(random_ids, attention_mask=causal, use_cache=True).cache
    assert all(attention.lse is None for attention in session.attention.values())
    fused = record_prefill(tiny_llama, random_ids)
    for index, attention in session.attention.items():
        chunked = LayerScores(attention.query, cache.layers[index].keys, attention.scaling, lse=attention.lse)
        assert not chunked.uses_fused_path
        torch.testing.assert_close(
            chunked.aggregated_attention(), fused.scores[index].aggregated_attention(), rtol=1e-4, atol=1e-6
        )


# --------------------------------------------------------------------------------------------
# The estimated aggregated attention (issue 13): exact near band + strided far rows
# --------------------------------------------------------------------------------------------


def _states(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 4, length, 16, generator=generator) * 2
    key = torch.randn(1, 2, length, 16, generator=generator)
    _, lse = kernels.causal_attention_with_lse(query, key.repeat_interleave(2, 1), key.repeat_interleave(2, 1), 0.3)
    return query, key, lse


def _probabilities(query, key, lse):
    logits = query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    length = query.shape[-2]
    rows, columns = torch.arange(length).unsqueeze(1), torch.arange(length).unsqueeze(0)
    return (logits - lse.unsqueeze(-1)).exp().masked_fill(columns > rows, 0.0), rows - columns


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
@pytest.mark.parametrize(("length", "band", "chunk"), [(37, 5, 4), (64, 64, 16), (130, 16, 64)])
def test_near_and_far_parts_match_a_dense_computation(length, band, chunk, fused):
    from kvmerger.engine.scoring import far_attention_sample, near_attention

    query, key, lse = _states(length)
    probabilities, lag = _probabilities(query, key, lse)
    near = (probabilities * ((lag >= 0) & (lag < band))).sum(-2).view(1, 2, 2, length).mean(2)
    far = (probabilities * (lag >= band)).sum(-2).view(1, 2, 2, length).mean(2)
    torch.testing.assert_close(near_attention(query, key, 0.3, lse, band, fused=fused), near, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        far_attention_sample(query, key, 0.3, lse, band, 1, 0, chunk, fused=fused), far, rtol=1e-4, atol=1e-6
    )
    # stride 3, last 10: rows 2, 5, 8, ... before the last 10 weighted 3, the last 10 weighted 1
    weights = torch.zeros(length)
    weights[2 : length - 10 : 3] = 3.0
    weights[length - 10 :] = 1.0
    sampled = (probabilities * (lag >= band) * weights.view(-1, 1)).sum(-2).view(1, 2, 2, length).mean(2)
    torch.testing.assert_close(
        far_attention_sample(query, key, 0.3, lse, band, 3, 10, chunk, fused=fused), sampled, rtol=1e-4, atol=1e-6
    )


def test_the_fused_estimate_stays_finite_with_large_logits():
    from kvmerger.engine.scoring import far_attention_sample, near_attention

    query, key, lse = _states(90, seed=5)
    query, key = query * 6, key * 6  # logits of several hundred: exp() alone would overflow float32
    _, lse = kernels.causal_attention_with_lse(query, key.repeat_interleave(2, 1), key.repeat_interleave(2, 1), 0.3)
    probabilities, lag = _probabilities(query, key, lse)
    near = (probabilities * ((lag >= 0) & (lag < 8))).sum(-2).view(1, 2, 2, 90).mean(2)
    far = (probabilities * (lag >= 8)).sum(-2).view(1, 2, 2, 90).mean(2)
    torch.testing.assert_close(near_attention(query, key, 0.3, lse, 8, fused=True), near, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(far_attention_sample(query, key, 0.3, lse, 8, 1, 0, fused=True), far, rtol=1e-4, atol=1e-6)


def test_the_estimate_is_exact_at_stride_one_and_close_on_local_attention():
    from kvmerger.engine.scoring import aggregated_attention_estimated

    query, key, lse = _states(200, seed=3)
    exact = aggregated_attention(query, key, 0.3)
    estimate = aggregated_attention_estimated(query, key, 0.3, lse, stride=1, band=16, last=8)
    torch.testing.assert_close(estimate, exact, rtol=1e-4, atol=1e-5)
    # attention that decays with distance (as a language model's does): stride 8 keeps the ranking
    positions = torch.arange(200, dtype=torch.float32)
    local = torch.stack([torch.cos(positions / 20), torch.sin(positions / 20)], -1).repeat(1, 8)  # [T, 16]
    query, key = (local * 6).expand(1, 4, 200, 16).contiguous(), (local + 0.1 * torch.randn(200, 16)).expand(1, 2, 200, 16).contiguous()
    _, lse = kernels.causal_attention_with_lse(query, key.repeat_interleave(2, 1), key.repeat_interleave(2, 1), 0.3)
    exact = aggregated_attention(query, key, 0.3)
    estimate = aggregated_attention_estimated(query, key, 0.3, lse, stride=8, band=16, last=8)
    top_exact = set(exact[0, 0].topk(60).indices.tolist())
    top_estimate = set(estimate[0, 0].topk(60).indices.tolist())
    assert len(top_exact & top_estimate) >= 54


def test_the_estimate_samples_a_fixed_number_of_rows_so_its_cost_is_linear():
    from kvmerger.engine.scoring import estimate_stride

    assert [estimate_stride(length, 256, 64) for length in (64, 300, 2048, 8192, 16384)] == [1, 1, 8, 32, 64]
    assert estimate_stride(2048 + 64, 1, 64) == 2048
    with pytest.raises(ValueError, match="rows must be at least 1"):
        estimate_stride(100, 0)


def test_layer_scores_take_the_estimate_only_with_log_normalisers():
    query, key, lse = _states(50)
    with_lse = LayerScores(query, key, 0.3, lse=lse)
    without = LayerScores(query, key, 0.3)
    exact = without.aggregated_attention("exact")
    torch.testing.assert_close(without.aggregated_attention("estimated"), exact)  # the exact fallback
    assert not torch.equal(with_lse.aggregated_attention("estimated", stride=4), exact)
    with pytest.raises(ValueError, match="statistic must be one of"):
        with_lse.aggregated_attention("sampled")


def test_sources_combined_by_rank_hold_the_top_of_each():
    from kvmerger.engine.scoring import percentile_rank

    first = torch.tensor([[5.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    second = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 1.0]])
    combined = torch.maximum(percentile_rank(first), percentile_rank(second))
    assert set(combined[0].topk(2).indices.tolist()) == {0, 2}
    assert percentile_rank(torch.tensor([[1.0, 1.0]])).tolist() == [[0.5, 1.0]]  # ties: the later ranks higher
