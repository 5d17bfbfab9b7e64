"""torch's fused attention kernel that also returns the log-sum-exp of each row, in one place.

`torch.nn.functional.scaled_dot_product_attention` returns only the output. On CPU it runs
`aten._scaled_dot_product_flash_attention_for_cpu`, a private op that returns the output *and* the
log-normaliser of every softmax row; the output is bit-identical to sdpa's (tests/test_scoring.py
checks this). Two things use it:

* the prefill's attention (`engine.hf`), which keeps the log-normalisers at no extra cost;
* the aggregated attention (`engine.scoring`), which turns them into every key's column sum with a
  single flash pass (see `aggregated_attention_from_lse`).

On other devices, or where this torch lacks the op, `available()` is False and the engine falls back
to the chunked float32 pass in `engine.scoring`.
"""

from __future__ import annotations

import torch


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `causal_attention_with_lse` can run on tensors of this device and dtype."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _flash_op() is not None


def causal_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention, square (query i sees keys 0..i), and each row's log-normaliser.

    query: [B, H, T, d]; key, value: [B, H, T, d] (same heads: repeat grouped KV heads first).
    Returns output [B, H, T, d] in the inputs' dtype and lse [B, H, T] float32, where
    lse[i] = log sum_{j <= i} exp(scaling * q_i . k_j).
    """
    return _flash_op()(query, key, value, 0.0, True, scale=scaling)


def masked_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under an additive mask, and each row's log-normaliser (not causal).

    query: [B, H, J, d]; key, value: [B, H, I, d]; additive_mask: broadcastable to [B, H, J, I], in the
    query's dtype (0 where allowed, a large negative number where not), or None. Returns output
    [B, H, J, d] and lse [B, H, J].
    """
    return _flash_op()(query, key, value, 0.0, False, attn_mask=additive_mask, scale=scaling)
