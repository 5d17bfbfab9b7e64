"""A tiny Llama GGUF file written in the test (48 kB, byte-level tokenizer, random weights), so that the
real GGUF conversion path and whole command-line runs can be tested in a second or two."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_gguf(path: Path, *, seed: int = 0, chat_template: bool = True, context: int = 4096) -> Path:
    """One layer, hidden size 16, 2 query heads and 1 KV head; 256 byte tokens, one merge, one end token."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    byte_chars = bytes_to_unicode()
    vocab = [byte_chars[b] for b in range(256)] + ["he", "<|endoftext|>"]
    size, hidden, ffn, heads, kv_heads = len(vocab), 16, 32, 2, 1
    head_dim = hidden // heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(1)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * (size - 1) + [3])
    writer.add_token_scores([0.0] * size)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(size - 1)
    writer.add_eos_token_id(size - 1)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(size, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(size, hidden))
    block = "blk.0."
    writer.add_tensor(block + "attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor(block + "ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor(block + "attn_q.weight", weight(hidden, hidden) * 4)  # sharp attention, as build_tiny
    writer.add_tensor(block + "attn_k.weight", weight(head_dim * kv_heads, hidden))
    writer.add_tensor(block + "attn_v.weight", weight(head_dim * kv_heads, hidden))
    writer.add_tensor(block + "attn_output.weight", weight(hidden, hidden))
    writer.add_tensor(block + "ffn_gate.weight", weight(ffn, hidden))
    writer.add_tensor(block + "ffn_up.weight", weight(ffn, hidden))
    writer.add_tensor(block + "ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
