"""Expected Attention: keep the keys future queries are expected to attend to (query-agnostic).

Paper: Alessio Devoto, Maximilian Jeblick, Simon Jegou, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution", arXiv 2510.00636 (2025). Reference code:
kvpress's ``ExpectedAttentionPress`` (``kvpress/presses/expected_attention_press.py``; read, not
copied).

Per layer and KV head, with ``S`` slots:

1. The prompt's query states before RoPE (every query after the first ``n_sink``) are modelled as a
   Gaussian with their mean and covariance, per query head.
2. The Gaussian is rotated by the average RoPE rotation over the next ``n_future_positions``
   positions: the distribution of a future query.
3. Each key's expected attention logit is ``s (R mu).k + s^2 k^T (R Sigma R^T) k / 2`` (the log of
   ``E[exp(s q.k)]`` under that Gaussian, ``s`` the attention scaling, ``1 / sqrt(d)`` in kvpress);
   its softmax over the keys, averaged over the query heads of the KV head, is the score.
4. With ``use_vnorm`` the score is multiplied by the value's L2 norm (plus ``epsilon``).
5. The ``S`` highest scores are kept; the first ``n_sink`` tokens are always kept.

Choices:

* Defaults are kvpress's: ``n_future_positions=512``, ``n_sink=4``, ``use_covariance=True``,
  ``use_vnorm=True``, ``epsilon=0``. ``query_window`` (default None: every query, as kvpress) fits
  the Gaussian on the last queries only.
* Query states: the engine sees post-RoPE queries (as attention did); RoPE is undone with the
  model's own rotary tables at each query's position (`scoring.unrotated`), which gives kvpress's
  pre-RoPE queries, QK-norms (Qwen 3, Gemma 3) included.
* The attention scaling is the layer's own (``module.scaling``), which is ``1 / sqrt(d)`` except
  where a model sets another (Gemma's query_pre_attn_scalar); kvpress uses ``1 / sqrt(d)``.
* ``head_budget="shared"``: a layer's heads share its ``Hkv * S`` slots by score (kvpress's AdaKV
  and KVzip rule), stored packed (engine.hf); default ``"equal"``, ``S`` per head as in kvpress's
  plain press. ``head_floor`` (default 0) is AdaKV's per-head safeguard: every head first keeps its
  ``floor(head_floor * S)`` best (kvpress's ``AdaKVPress`` uses 0.2).
* Ties go to the later token (`top_indices`).
* During generation (engine option ``hold_budget=True``): the paper compresses the prompt once;
  the engine's default applies (H2O's eviction by accumulated attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, check_head_budget, keep_by_score_as


@dataclass
class ExpectedAttention(CompressionMethod):
    """Keep the keys with the highest attention expected from future queries (Devoto et al., 2025)."""

    name: ClassVar[str] = "expected-attention"
    summary: ClassVar[str] = (
        "Expected Attention (Devoto et al. 2025): a Gaussian of future queries, expected attention x |v|"
    )

    budget: float = 0.5
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    query_window: int | None = None
    head_budget: str = "equal"
    head_floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head_budget(self.head_budget, self.head_floor)
        for name in ("n_future_positions", "n_sink"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "n_future_positions" else 0):
                raise ValueError(f"{name} must be a whole number of positions (at least 1 for the future), got {value!r}")
        if self.query_window is not None and (not isinstance(self.query_window, int) or self.query_window < 2):
            raise ValueError(f"query_window must be None (every query) or at least 2 queries, got {self.query_window!r}")
        if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")

    def compress(self, layer: LayerInput) -> LayerOutput:
        scores = layer.scores.expected_attention(
            self.n_future_positions, self.n_sink, self.use_covariance, self.query_window
        )
        if self.use_vnorm:  # the sinks keep their +inf
            scores = torch.where(scores.isinf(), scores, (scores + self.epsilon) * layer.values.float().norm(dim=-1))
        return keep_by_score_as(layer, self.head_budget, scores, head_floor=self.head_floor)
