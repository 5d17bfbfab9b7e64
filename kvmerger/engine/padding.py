"""Left-padded batches, as `generate()` makes them: every sequence compressed on its own tokens.

A batch whose attention mask holds zeros must be left-padded (``tokenizer.padding_side = "left"``,
what `generate()` expects of decoder-only models): sequence b's own T_b tokens are the last T_b of
the batch's T. The engine gives the method each sequence alone (its keys, values and query states,
padding sliced off, so no padding token is ever scored, merged or kept and no padding query enters
a statistic), which compresses it to its own ``ceil(budget x T_b)`` slots. The compressed sequences
are then padded at the left to the longest with masked slots: zero keys and values, position -1,
set size 0, and a -inf logit in the per-slot bias (the one size-aware methods use), so that no query
ever attends to them. Those slots are part of the cache and are counted in its bytes.
transformers' own mask stays right as it is: it reads the 2-D attention mask as if slot j stood at
token j + (tokens seen - slots stored), which hides at most some padding slots, since a sequence's
own slots lie at the right and are never more than its tokens.

New tokens are appended to every sequence alike, so each keeps its number of padding slots for the
rest of generation; a held budget shrinks each sequence back to its own target, one at a time.
Positions stay true: `generate()` numbers each sequence's new tokens from its own length (from the
attention mask), and the engine counts slot positions per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmerger.methods.base import LayerOutput

PADDING_BIAS = float("-inf")


@dataclass(frozen=True)
class BatchPadding:
    """How a batch is left-padded: `pads[b]` padding tokens before sequence b's own, `length` in all."""

    pads: tuple[int, ...]
    length: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor | None) -> BatchPadding | None:
        """The padding of a 2-D attention mask [B, T], or None if nothing is padded.

        Raises ValueError (naming the fix) for a mask that is not left padding, or a sequence of
        fewer than two tokens (nothing to compress)."""
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or bool(mask.all()):
            return None
        real = mask.bool()
        pads = (~real).sum(dim=-1)
        left_padded = torch.arange(real.shape[1], device=real.device) >= pads.unsqueeze(1)
        if not torch.equal(real, left_padded):
            raise ValueError(
                "kvmerger compresses padded batches with left padding only (each prompt's tokens last, as "
                "generate() expects of decoder-only models): set tokenizer.padding_side = 'left'"
            )
        if bool((real.shape[1] - pads < 2).any()):
            raise ValueError("every prompt of a padded batch needs at least two tokens to be compressed")
        return cls(tuple(int(pad) for pad in pads.tolist()), real.shape[1])

    @property
    def lengths(self) -> list[int]:
        return [self.length - pad for pad in self.pads]

    def own(self, tensor: torch.Tensor, row: int) -> torch.Tensor:
        """Sequence `row`'s own part of a [B, H, T, ...] tensor: [1, H, T_row, ...]."""
        return tensor[row : row + 1, :, self.pads[row] :]


def left_pad(tensor: torch.Tensor, slots: int, value: float | int) -> torch.Tensor:
    """Pad a [1, H, S] or [1, H, S, d] tensor at the left of its slot dim (dim 2) to `slots` slots."""
    missing = slots - tensor.shape[2]
    if missing == 0:
        return tensor
    widths = (0, 0, missing, 0) if tensor.ndim == 4 else (missing, 0)
    return F.pad(tensor, widths, value=value)


def stack_padded(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    biases: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence keys and values [1, H, S_b, d] (and biases [1, H, S_b] or None) left-padded to the
    longest and stacked: keys, values [B, H, S, d] and the bias [B, H, S], -inf on padding slots."""
    slots = max(key.shape[2] for key in keys)
    bias = [
        left_pad(torch.zeros(key.shape[:3], device=key.device) if b is None else b.float(), slots, PADDING_BIAS)
        for key, b in zip(keys, biases)
    ]
    return (
        torch.cat([left_pad(key, slots, 0) for key in keys]),
        torch.cat([left_pad(value, slots, 0) for value in values]),
        torch.cat(bias),
    )


def stack_outputs(outputs: list[LayerOutput]) -> LayerOutput:
    """One batch's LayerOutput from each sequence's own, left-padded to the longest with masked slots."""
    keys, values, bias = stack_padded(
        [o.keys for o in outputs], [o.values for o in outputs], [o.bias for o in outputs]
    )
    slots = keys.shape[2]
    sizes = [o.set_sizes if o.set_sizes is not None else torch.ones_like(o.positions) for o in outputs]
    return LayerOutput(
        keys=keys,
        values=values,
        positions=torch.cat([left_pad(o.positions, slots, -1) for o in outputs]),
        set_sizes=torch.cat([left_pad(size, slots, 0) for size in sizes]),
        bias=bias,
    )
