"""The engine's one policy for NaN and inf: refuse, naming the layer and the likely cause.

Checked before any method sees a layer (the prompt's keys, values and query states, in
`session.compress_layer`, shared by `compress` and `compress_prefill`) and before a method holds a
layer's budget during generation (the newest tokens' states). One min-max reduction per tensor
(`is_finite`); the counts in the message are computed only when the check fails.

Why no lenient mode (leave such a layer uncompressed and go on): a NaN or inf key or value at
position t makes the model's own attention output non-finite for every query from t on (a NaN
logit, an inf - inf in the softmax, or inf x 0 in the weighted sum of values), and with it every
later layer and the logits of the last prompt token. A cache that holds one is useless with or
without compression; going on would only hide where it broke. A NaN query state makes the layer's
own output NaN in the same way.
"""

from __future__ import annotations

import torch


class NonFiniteCacheError(ValueError):
    """A layer's key, value or query states hold NaN or inf; the message names the layer, the share
    of non-finite entries and the likely cause. `layer`, `tensor` and `share` say the same for code."""

    def __init__(self, message: str, layer: int, tensor: str, share: float) -> None:
        super().__init__(message)
        self.layer = layer
        self.tensor = tensor
        self.share = share


def check_finite(
    layer: int, tensors: dict[str, torch.Tensor | None], whose: str = "the prompt's", first_token: int = 0
) -> None:
    """Raise `NonFiniteCacheError` if any of `tensors` ([B, H, T, d] states of layer `layer`, named
    by their keys, of `whose` tokens) holds NaN or inf. `first_token`: the position of their first token."""
    for name, tensor in tensors.items():
        if tensor is None or is_finite(tensor):
            continue
        bad = ~torch.isfinite(tensor)
        nans = int(torch.isnan(tensor).sum())
        share = int(bad.sum()) / tensor.numel()
        token = first_token + int(bad.any(dim=-1).flatten(0, -2).any(dim=0).nonzero()[0])
        raise NonFiniteCacheError(
            f"layer {layer}: {whose} {name} hold NaN or inf in {100 * share:.3g}% of their entries "
            f"({nans} NaN, {int(bad.sum()) - nans} inf; first at token {token}), so the model's own attention "
            f"output is already non-finite from there on and kvmerger will not compress it. Likely cause: "
            f"{_likely_cause(tensor.dtype)}",
            layer,
            name,
            share,
        )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of `tensor` is finite: its smallest and largest entries are (NaN propagates
    through both). One reduction pass and no tensor of its size, unlike `isfinite(tensor).all()`,
    which measured several times slower (benchmarks/finite_check.py)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(low.isfinite() & high.isfinite())


def _likely_cause(dtype: torch.dtype) -> str:
    corrupted = (
        "NaN or inf in the model's weights or inputs (a corrupted checkpoint? check the weights with torch.isfinite)"
    )
    if dtype == torch.float16:
        return (
            "float16 overflow (its largest number is 65504): load the model in bfloat16 or float32 "
            f"(load_model(..., dtype=torch.bfloat16), or --dtype bfloat16); else {corrupted}."
        )
    if dtype == torch.bfloat16:
        return f"{corrupted}, or a bfloat16 overflow (load the model in float32)."
    return f"{corrupted}; {str(dtype).removeprefix('torch.')} itself rarely overflows."
