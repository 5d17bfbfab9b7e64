"""KVzip: keep the keys the model needs to repeat the context (query-agnostic).

Paper: Jang-Hyun Kim, Jinuk Kim, Sangwoo Kwon, Jae W. Lee, Sangdoo Yun, Hyun Oh Song, "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416 (2025).
Reference code: snu-mllab/KVzip; kvpress's ``KVzipPress`` (read, not copied).

Per layer and KV head, with ``S`` slots: the ``S`` tokens with the highest reconstruction score, the
largest attention each key receives from any query while the model, prompted to repeat the
previous context, reproduces it teacher-forced on top of the full cache, chunk by chunk
(`engine.reconstruction`: prompts, chunking and the restricted softmax as in the reference code).
The first 4 tokens (sinks) are always kept, as in the reference. Query-agnostic by construction:
the score asks what the model would need to say the context again, not what one question needs.

Choices:

* Budgets: the reference ranks all layers and heads together (``layerwise=False``: non-uniform head
  budgets), with a uniform-budget option (its ``_threshold_uniform``); kvpress's press shares each
  layer's budget among its heads. ``head_budget="equal"`` (default): every layer and KV head keeps
  exactly ``S`` slots, the engine's semantics shared by every method, the reference's uniform
  option. ``head_budget="shared"``: kvpress's rule, a layer's ``Hkv * S`` highest scores over all
  its heads (`keep_by_score_shared`), stored packed so the memory is the budget's (one tag byte per
  slot counted in it). Equal budgets cost KVzip much of its quality here: kvpress's press with
  shared budgets kept 5 of 5 pass keys at 0.35 where equal ones keep 3 of 5 (docs/BENCHMARKS.md
  section 4); its heads' shares are very uneven, so a dense cache would need far more than ``S``
  slots per head to hold that selection, hence the packed layout. ``head_floor`` (default 0, as
  kvpress's KVzip press) guarantees every head its ``floor(head_floor * S)`` best first (Ada-KV's
  safeguard, Feng et al., arXiv 2407.11550).
* Grouped-query attention: the maximum is also taken over the query heads of the group, as the
  reference does.
* Ties go to the later token (`top_indices`).
* Cost: one more forward pass over the prompt, whose attention also gives the scores'
  normalisers (see engine.reconstruction): 2.0-2.2 prefills measured here, 2-3 in the
  reference's report.
* During generation (engine option ``hold_budget=True``): KVzip compresses the prompt once and
  defines no rule, so the engine's default applies (H2O's eviction by accumulated attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, check_head_budget, keep_by_score_as


@dataclass
class KVzip(CompressionMethod):
    """Keep the tokens with the highest context-reconstruction attention (Kim et al., 2025)."""

    name: ClassVar[str] = "kvzip"
    summary: ClassVar[str] = (
        "KVzip (Kim et al. 2025): keep the keys most attended while the model repeats the context (query-agnostic)"
    )

    budget: float = 0.5
    head_budget: str = "equal"
    head_floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head_budget(self.head_budget, self.head_floor)

    def needs_reconstruction(self) -> bool:
        return True

    def compress(self, layer: LayerInput) -> LayerOutput:
        return keep_by_score_as(layer, self.head_budget, layer.scores.reconstruction_attention(), head_floor=self.head_floor)
