"""The chunked attention statistics match eager attention's column sums."""

import copy

import pytest
import torch

from kvmerger.engine.scoring import LayerScores, aggregated_attention, window_attention
from kvmerger.engine.session import record_prefill


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


def test_scores_from_a_real_prefill_match_eager_attention_weights(tiny_llama, random_ids):
    """Query states captured from the model's own attention call give eager attention's column sums."""
    eager = type(tiny_llama)(copy.deepcopy(tiny_llama.config)).eval()  # its own config: the fixture's stays sdpa
    eager.load_state_dict(tiny_llama.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(random_ids, output_attentions=True).attentions
    prefill = record_prefill(tiny_llama, random_ids, chunk_size=5)
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
