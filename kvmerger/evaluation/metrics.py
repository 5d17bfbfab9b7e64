"""Scoring functions. Each is small, pure and tested against hand-computed cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || compressed) in nats, from logits [..., vocab] (float32)."""
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    compressed = F.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - compressed)).sum(dim=-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of `targets` [...] under `logits` [..., vocab]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(
        targets.shape
    )
