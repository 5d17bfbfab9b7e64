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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where `allowed` says which keys each query may see, and each row's log-normaliser.

    query: [B, H, J, d]; key, value: [B, H, I, d]; allowed: bool, broadcastable to [B, H, J, I], or None
    (every key). A row that may see no key gets a log-normaliser near -1e30. Returns output
    [B, H, J, d] and lse [B, H, J].
    """
    additive = None
    if allowed is not None:  # the kernel takes the mask as logits added in the query's dtype
        additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -1e30)
    return _flash_op()(query, key, value, 0.0, False, attn_mask=additive, scale=scaling)


def attention_with_part_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, part: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of n appended queries, and each row's log-normaliser over a part of its keys only.

    query: [B, H, n, d]; key, value: [B, H, P + n, d] (same heads): P past keys, which every query
    sees, then the queries' own keys (causal: query i sees own keys 0..i). `part`: indices of past
    keys. Returns output [B, H, n, d] in the inputs' dtype, the attention over all P + n keys, and
    lse [B, H, n] float32 over the `part` keys and the own keys.

    It runs as up to three flash passes without a mask (the part, the rest of the past, the own keys
    causally) joined by their log-normalisers: the same work as one pass over every key, and the
    part's normaliser comes with it (KVzip's reconstruction score needs it, engine.reconstruction).
    """
    length = query.shape[-2]
    past = key.shape[-2] - length
    outside = torch.ones(past, dtype=torch.bool, device=key.device)
    outside[part] = False
    rest = outside.nonzero().squeeze(-1)

    def over(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_attention_with_lse(query, key.index_select(-2, index), value.index_select(-2, index), None, scaling)

    own = causal_attention_with_lse(query, key[..., past:, :], value[..., past:, :], scaling)
    part_pass = [over(part)] if part.numel() else []
    rest_pass = [over(rest)] if rest.numel() else []
    pieces = [own, *part_pass, *rest_pass]
    part_lse = torch.logsumexp(torch.stack([lse for _, lse in [own, *part_pass]]), dim=0)
    total = torch.logsumexp(torch.stack([lse for _, lse in pieces]), dim=0)
    output = sum(piece.float() * (lse - total).exp().unsqueeze(-1) for piece, lse in pieces)
    return output.to(query.dtype), part_lse.float()
