"""Where the model says to merge: key/value similarity of neighbouring tokens and KVMerger's merge
shares, layer by layer, over samples of several kinds of text.

Paper: Zheng Wang, Boxiao Jin, Zhongzhi Yu, Minjia Zhang, "Model Tells You Where to Merge: Adaptive
KV Cache Merging for LLMs on Long-Context Tasks", arXiv 2407.08454 (2024). Its two observations
(docs/METHOD.md section 1): (1) post-RoPE keys of adjacent tokens are alike while values are not;
(2) with a fixed threshold, the share of tokens merged in each layer is a property of the model,
stable across samples and tasks.

Nothing of the algorithm is implemented twice: every prompt is prefilled with
`kvmerger.record_prefill` (full cache, aggregated attention from `engine.scoring`), and merging
sets come from `KVMerger.identify` itself; adjacent cosines are `methods.kvmerger.adjacent_similarity`.

Definitions (the choices made here):

* **Adjacent cosine** of layer l: ``cos(k_t, k_{t+1})`` over every adjacent pair of the prompt, every
  KV head and every sample (post-RoPE keys, as the cache holds them); the same for values, for
  contrast. Distributions are pooled in a fixed histogram of ``HISTOGRAM_BINS`` bins over [-1, 1]
  (quantiles to within half a bin, 0.0025); means, standard deviations and the share of pairs
  above eps are exact.
* **Merged share** of a layer: the fraction of the prompt's T tokens that `KVMerger.identify`
  (mode ``paper``, threshold ``eps``, 0.75 as in the paper) puts in a merging set of more than one
  token, per KV head, then averaged over the KV heads. The denominator is always all T tokens.
  Two variants, both reported:

  - ``no protection``: ``recent_ratio = topk_ratio = 0``: every adjacent pair above eps merges, so
    the share is a property of the keys alone;
  - ``paper protection``: the paper's protected fractions at budget ``budget`` (0.5: the 17% most
    recent tokens and the 12% others with the highest aggregated attention never merge and break
    chains), as KVMerger compresses. At budget 0.5 the share cannot exceed 71%.
* **Slots share**: merging sets (slots) over T, per KV head, averaged: the cache size paper mode
  would keep, before heads are padded to the longest.
* **Spread** over the samples of a kind: standard deviation with ``ddof=1`` (0 for one sample),
  and min / max.
* **Persistence**: Pearson correlation of the per-layer mean profiles of two text kinds (shape), the
  mean absolute difference between them in share points (level), the mean pairwise correlation
  between samples of one kind, and the share of the variance of all per-sample, per-layer shares
  that the layer explains (eta squared of a one-way analysis by layer: 1 means the layer alone
  fixes the share, whatever the text). A correlation of a constant profile is undefined (NaN).
* **Heatmaps**: token x token cosine of keys and of values over a window of ``window`` tokens
  centred in the first sample, for the chosen layers and KV heads (a figure, not a hot path: this
  is the only place a [W, W] matrix is built).
* **Layers profiled**: the layers kvmerger compresses, the full-attention ones. A model's
  sliding-window layers (Gemma 3, Qwen with `use_sliding_window`) keep their own cache of at most
  the window and are never merged, so they are left out; `MergeProfile.layer_ids` holds the
  model's index of every profiled layer, and every per-layer array follows that order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvmerger.analysis.samples import TextSample
from kvmerger.engine.hf import FULL_ATTENTION, layer_kinds
from kvmerger.engine.session import record_prefill
from kvmerger.methods.kvmerger import KVMerger, MergingSets, adjacent_similarity

VARIANTS = ("no protection", "paper protection")
HISTOGRAM_BINS = 400


def variant_mergers(eps: float = 0.75, budget: float = 0.5) -> dict[str, KVMerger]:
    """The KVMerger configurations whose merging sets are measured, by variant name."""
    return {
        "no protection": KVMerger(budget=budget, mode="paper", eps=eps, recent_ratio=0.0, topk_ratio=0.0),
        "paper protection": KVMerger(budget=budget, mode="paper", eps=eps),
    }


def merged_tokens(sets: MergingSets) -> torch.Tensor:
    """[N, T] bool: the tokens in a merging set of more than one token."""
    joined = torch.zeros_like(sets.protected)
    joined[:, 1:] |= sets.merged_pairs
    joined[:, :-1] |= sets.merged_pairs
    return joined


@dataclass
class LayerMeasure:
    """One layer of one prompt; rows are (batch element, KV head)."""

    key_similarity: torch.Tensor  # [N, T-1] float32, as KVMerger.identify computed it
    value_similarity: torch.Tensor  # [N, T-1] float32
    merged_share: dict[str, torch.Tensor]  # variant -> [N]
    slots_share: dict[str, torch.Tensor]  # variant -> [N]


def measure_layer(
    keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor, mergers: dict[str, KVMerger]
) -> LayerMeasure:
    """Merge shares and adjacent cosines of one layer: keys, values [B, H, T, d], attention [B, H, T]."""
    batch, heads, length, dim = keys.shape
    rows = batch * heads
    key_rows = keys.reshape(rows, length, dim)
    attention_rows = attention.reshape(rows, length)
    merged_share, slots_share, key_similarity = {}, {}, None
    for name, merger in mergers.items():
        sets = merger.identify(key_rows, attention_rows, merger.target_slots(length))
        merged_share[name] = merged_tokens(sets).float().mean(dim=-1)
        slots_share[name] = sets.count.float() / length
        key_similarity = sets.similarity
    if key_similarity is None:
        key_similarity = adjacent_similarity(key_rows)
    value_similarity = adjacent_similarity(values.reshape(rows, length, values.shape[-1]))
    return LayerMeasure(key_similarity, value_similarity, merged_share, slots_share)


# --------------------------------------------------------------------------------------------
# Distributions of adjacent cosines, pooled over heads and samples
# --------------------------------------------------------------------------------------------


@dataclass
class CosineDistribution:
    """Per-layer histogram of cosines in [-1, 1], with exact count, mean, variance and share above eps."""

    num_layers: int
    eps: float
    bins: int = HISTOGRAM_BINS
    counts: np.ndarray = field(init=False)  # [L, bins]
    total: np.ndarray = field(init=False)  # [L]
    sums: np.ndarray = field(init=False)
    squares: np.ndarray = field(init=False)
    above: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.num_layers, self.bins), dtype=np.int64)
        self.total = np.zeros(self.num_layers, dtype=np.int64)
        self.sums = np.zeros(self.num_layers)
        self.squares = np.zeros(self.num_layers)
        self.above = np.zeros(self.num_layers, dtype=np.int64)

    def add(self, layer: int, cosines: torch.Tensor) -> None:
        values = cosines.detach().double().flatten().cpu()
        self.counts[layer] += torch.histc(values, bins=self.bins, min=-1.0, max=1.0).long().numpy()
        self.total[layer] += values.numel()
        self.sums[layer] += float(values.sum())
        self.squares[layer] += float(values.square().sum())
        self.above[layer] += int((values > self.eps).sum())

    def mean(self) -> np.ndarray:
        return self.sums / np.maximum(self.total, 1)

    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.squares / np.maximum(self.total, 1) - self.mean() ** 2, 0.0))

    def share_above_eps(self) -> np.ndarray:
        return self.above / np.maximum(self.total, 1)

    def quantile(self, q: float) -> np.ndarray:
        """[L]: the q-quantile per layer, interpolated linearly inside its bin."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile is in [0, 1], got {q}")
        width = 2.0 / self.bins
        cumulative = np.cumsum(self.counts, axis=1)
        result = np.full(self.num_layers, math.nan)
        for layer in range(self.num_layers):
            if self.total[layer] == 0:
                continue
            target = q * self.total[layer]
            index = min(int(np.searchsorted(cumulative[layer], target, side="left")), self.bins - 1)
            before = cumulative[layer, index - 1] if index else 0
            inside = self.counts[layer, index]
            fraction = (target - before) / inside if inside else 0.0
            result[layer] = -1.0 + width * (index + fraction)
        return result


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """Per-layer numbers of one prompt (each a list over layers; per-head lists are [L][H])."""

    kind: str
    index: int
    tokens: int
    meta: dict[str, Any]
    merged_share: dict[str, list[float]]
    slots_share: dict[str, list[float]]
    merged_share_heads: dict[str, list[list[float]]]
    key_cosine_mean: list[float]
    value_cosine_mean: list[float]


@dataclass
class Heatmap:
    layer: int
    head: int
    start: int  # first token of the window
    keys: torch.Tensor  # [W, W] cosine
    values: torch.Tensor  # [W, W] cosine


@dataclass
class MergeProfile:
    """Everything one analysis measured."""

    model: str
    settings: dict[str, Any]
    num_layers: int
    num_kv_heads: int
    kinds: list[str]
    samples: list[SampleResult]
    key_cosine: CosineDistribution
    value_cosine: CosineDistribution
    heatmaps: list[Heatmap]
    layer_ids: list[int] = field(default_factory=list)  # the model's index of each profiled layer

    def __post_init__(self) -> None:
        if not self.layer_ids:
            self.layer_ids = list(range(self.num_layers))
        if len(self.layer_ids) != self.num_layers:
            raise ValueError(f"{len(self.layer_ids)} layer ids for {self.num_layers} profiled layers")

    def shares(self, kind: str, variant: str, statistic: str = "merged_share") -> np.ndarray:
        """[samples of `kind`, L]: per-sample, per-layer shares (`merged_share` or `slots_share`)."""
        rows = [getattr(s, statistic)[variant] for s in self.samples if s.kind == kind]
        if not rows:
            raise ValueError(f"no samples of kind {kind!r}; kinds here: {self.kinds}")
        return np.asarray(rows, dtype=float)

    def all_shares(self, variant: str) -> np.ndarray:
        """[all samples, L] merged shares."""
        return np.asarray([s.merged_share[variant] for s in self.samples], dtype=float)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """[W, W] float32 cosine between the rows of x [W, d] (0 for a zero row), on the same rescaled
    rows as `adjacent_similarity`, so its first off-diagonal equals that function's output."""
    scaled = x.float() / x.float().abs().amax().clamp_min(1e-30)
    unit = scaled / scaled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).clamp(-1.0, 1.0)


def heatmaps_of(
    keys: list[torch.Tensor], values: list[torch.Tensor], layers: list[int], heads: list[int], window: int
) -> list[Heatmap]:
    """Token x token cosine of keys and values [1, H, T, d] per layer (`keys[layer]` for every layer
    in `layers`), for a centred window."""
    length = keys[layers[0]].shape[-2]
    window = min(window, length)
    start = (length - window) // 2
    span = slice(start, start + window)
    return [
        Heatmap(
            layer,
            head,
            start,
            cosine_matrix(keys[layer][0, head, span]).cpu(),
            cosine_matrix(values[layer][0, head, span]).cpu(),
        )
        for layer, head in itertools.product(layers, heads)
    ]


@torch.no_grad()
def analyze(
    model: torch.nn.Module,
    samples: list[TextSample],
    *,
    model_name: str = "model",
    eps: float = 0.75,
    budget: float = 0.5,
    heatmap_layers: list[int] | None = None,
    heatmap_heads: list[int] | None = None,
    window: int = 256,
    progress: bool = True,
) -> MergeProfile:
    """Prefill every sample once and measure, per layer, adjacent cosines and KVMerger's merge shares."""
    if not samples:
        raise ValueError("there is nothing to analyse: no samples were given")
    if window < 2:
        raise ValueError(f"the heatmap window must hold at least 2 tokens, got {window}")
    config = model.config.get_text_config(decoder=True)
    layer_ids = [index for index, kind in enumerate(layer_kinds(model.config)) if kind == FULL_ATTENTION]
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    layers = default_heatmap_layers(layer_ids) if heatmap_layers is None else list(heatmap_layers)
    heads = [0] if heatmap_heads is None else list(heatmap_heads)
    _check_indices("layer", layers, config.num_hidden_layers)
    _check_indices("KV head", heads, num_kv_heads)
    skipped = [layer for layer in layers if layer not in layer_ids]
    if skipped:
        raise ValueError(
            f"heatmap layers {skipped} are sliding-window layers, which kvmerger never compresses; choose among the "
            f"full-attention layers {layer_ids}"
        )
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and max(s.tokens for s in samples) > longest:
        raise ValueError(f"samples of {max(s.tokens for s in samples)} tokens exceed the model's context ({longest})")

    mergers = variant_mergers(eps, budget)
    key_cosine = CosineDistribution(len(layer_ids), eps)
    value_cosine = CosineDistribution(len(layer_ids), eps)
    results: list[SampleResult] = []
    heatmaps: list[Heatmap] = []
    device = next(model.parameters()).device
    for sample in tqdm(samples, desc="prefill + merging sets", unit="sample", disable=not progress):
        prefill = record_prefill(model, sample.ids.to(device))
        measures = []
        for position, layer_idx in enumerate(layer_ids):
            layer = prefill.cache.layers[layer_idx]
            attention = prefill.scores[layer_idx].aggregated_attention()
            measure = measure_layer(layer.keys, layer.values, attention, mergers)
            key_cosine.add(position, measure.key_similarity)
            value_cosine.add(position, measure.value_similarity)
            measures.append(measure)
        if not heatmaps:
            keys = [layer.keys for layer in prefill.cache.layers]
            values = [layer.values for layer in prefill.cache.layers]
            heatmaps = heatmaps_of(keys, values, layers, heads, window)
        results.append(_sample_result(sample, measures))
        del prefill
    settings = {
        "eps": eps,
        "budget_for_protection": budget,
        "protection": dict(zip(("recent_ratio", "topk_ratio"), mergers["paper protection"].protection())),
        "tokens": sorted({s.tokens for s in samples}),
        "samples_per_kind": {kind: sum(s.kind == kind for s in samples) for kind in _kinds(samples)},
        "heatmap_layers": layers,
        "heatmap_heads": heads,
        "heatmap_window": min(window, samples[0].tokens),
        "model_layers": config.num_hidden_layers,
    }
    return MergeProfile(
        model_name,
        settings,
        len(layer_ids),
        num_kv_heads,
        _kinds(samples),
        results,
        key_cosine,
        value_cosine,
        heatmaps,
        layer_ids,
    )


def default_heatmap_layers(layer_ids: list[int]) -> list[int]:
    """First, middle and last of the profiled layers (the model's indices)."""
    return sorted({layer_ids[0], layer_ids[len(layer_ids) // 2], layer_ids[-1]})


def _check_indices(what: str, indices: list[int], count: int) -> None:
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        raise ValueError(f"{what} indices must be a non-empty list within 0..{count - 1}, got {indices}")


def _kinds(samples: list[TextSample]) -> list[str]:
    return list(dict.fromkeys(s.kind for s in samples))


def _sample_result(sample: TextSample, measures: list[LayerMeasure]) -> SampleResult:
    variants = measures[0].merged_share.keys()
    return SampleResult(
        kind=sample.kind,
        index=sample.index,
        tokens=sample.tokens,
        meta=sample.meta,
        merged_share={v: [float(m.merged_share[v].mean()) for m in measures] for v in variants},
        slots_share={v: [float(m.slots_share[v].mean()) for m in measures] for v in variants},
        merged_share_heads={v: [m.merged_share[v].tolist() for m in measures] for v in variants},
        key_cosine_mean=[float(m.key_similarity.mean()) for m in measures],
        value_cosine_mean=[float(m.value_similarity.mean()) for m in measures],
    )


# --------------------------------------------------------------------------------------------
# Persistence statistics (plain numpy, on [samples, L] arrays)
# --------------------------------------------------------------------------------------------


@dataclass
class ProfileStats:
    mean: np.ndarray  # [L]
    std: np.ndarray  # [L], ddof=1 (0 for one sample)
    low: np.ndarray  # [L], min over samples
    high: np.ndarray  # [L], max over samples
    samples: int


def profile_stats(shares: np.ndarray) -> ProfileStats:
    """Mean and spread over samples of per-layer shares [samples, L]."""
    count = shares.shape[0]
    std = shares.std(axis=0, ddof=1) if count > 1 else np.zeros(shares.shape[1])
    return ProfileStats(shares.mean(axis=0), std, shares.min(axis=0), shares.max(axis=0), count)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two profiles; NaN when either is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"pearson needs two 1-D profiles of one length >= 2, got shapes {a.shape} and {b.shape}")
    da, db = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum() / norm) if norm > 0 else math.nan


def mean_pairwise_correlation(shares: np.ndarray) -> float:
    """Mean Pearson correlation over all pairs of rows of [samples, L]; NaN for fewer than 2 rows."""
    pairs = [pearson(shares[i], shares[j]) for i, j in itertools.combinations(range(shares.shape[0]), 2)]
    defined = [p for p in pairs if not math.isnan(p)]
    return float(np.mean(defined)) if defined else math.nan


def layer_variance_share(shares: np.ndarray) -> float:
    """Eta squared of [samples, L] grouped by layer: between-layer sum of squares over total."""
    total = float(((shares - shares.mean()) ** 2).sum())
    between = float(shares.shape[0] * ((shares.mean(axis=0) - shares.mean()) ** 2).sum())
    return between / total if total > 0 else math.nan


@dataclass
class Persistence:
    """How much the per-layer merged-share profile depends on the model rather than the text."""

    by_kind: dict[str, ProfileStats]
    between_kinds: dict[tuple[str, str], float]  # Pearson of the mean profiles
    level_difference: dict[tuple[str, str], float]  # mean |difference| of the mean profiles
    within_kind: dict[str, float]  # mean pairwise Pearson between samples of a kind
    layer_variance_share: float  # eta squared over every sample of every kind
    mean_spread: dict[str, float]  # mean over layers of the std over samples, per kind


def key_value_contrast(profile: MergeProfile) -> dict[str, Any]:
    """Observation 1 in numbers: adjacent cosine of keys against values, per layer and overall."""
    keys, values = profile.key_cosine, profile.value_cosine
    key_mean, value_mean = keys.mean(), values.mean()
    return {
        "key_mean": float(key_mean.mean()),
        "value_mean": float(value_mean.mean()),
        "key_mean_range": [float(key_mean.min()), float(key_mean.max())],
        "value_mean_range": [float(value_mean.min()), float(value_mean.max())],
        "layers_keys_above_values": int((key_mean > value_mean).sum()),
        "key_share_above_eps": float(keys.above.sum() / max(1, keys.total.sum())),
        "value_share_above_eps": float(values.above.sum() / max(1, values.total.sum())),
    }


def persistence(profile: MergeProfile, variant: str, statistic: str = "merged_share") -> Persistence:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    by_kind = {kind: profile_stats(profile.shares(kind, variant, statistic)) for kind in profile.kinds}
    pairs = list(itertools.combinations(profile.kinds, 2))
    everything = np.concatenate([profile.shares(kind, variant, statistic) for kind in profile.kinds])
    return Persistence(
        by_kind=by_kind,
        between_kinds={(a, b): pearson(by_kind[a].mean, by_kind[b].mean) for a, b in pairs},
        level_difference={(a, b): float(np.abs(by_kind[a].mean - by_kind[b].mean).mean()) for a, b in pairs},
        within_kind={k: mean_pairwise_correlation(profile.shares(k, variant, statistic)) for k in profile.kinds},
        layer_variance_share=layer_variance_share(everything),
        mean_spread={kind: float(stats.std.mean()) for kind, stats in by_kind.items()},
    )
