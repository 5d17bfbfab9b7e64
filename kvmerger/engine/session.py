"""Sessions: what happens to a model's cache while kvmerger is attached to it.

Data flows one way: prompt -> prefill (each layer's query and key states seen once, right after
that layer's attention) -> method -> smaller cache -> decoding.

* `compress(model, method)`: the public context manager. The first forward pass that feeds more
  than one token into an empty cache (the prompt, in `model(...)` or inside `generate()`) is
  compressed layer by layer, right after each layer's prefill attention; later tokens are appended
  uncompressed. Every compression leaves a `CompressionReport` in `session.reports`.
* `record_prefill(model, ids)`: prefill once, keep the full cache and each layer's query states,
  then `compress_prefill(prefill, method)` builds a compressed cache for any number of methods
  without prefilling again (the evaluation harness compares methods this way).
* `attach(model)`: a session that only applies per-slot biases, for decoding with a cache that
  was compressed elsewhere.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvmerger.engine.hf import (
    CompressedCache,
    CompressedLayer,
    UnsupportedModelError,
    check_supported,
    install_session,
)
from kvmerger.engine.report import CompressionReport, LayerReport
from kvmerger.engine.scoring import DEFAULT_CHUNK, LayerScores, _synchronize
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput


class Session:
    """Applies per-slot biases; does nothing special at prefill. Subclasses act on the prefill."""

    handles_prefill = False

    def __init__(self, model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self._cache: CompressedCache | None = None

    # -- called by the hooks in engine.hf ------------------------------------------------------
    def begin_forward(self, cache: CompressedCache | None, query_length: int | None) -> None:
        self._cache = cache

    def end_forward(self) -> None:
        cache, self._cache = self._cache, None
        if cache is None:
            return
        missed = [i for i, layer in enumerate(cache.layers) if getattr(layer, "prefill_pending", False)]
        if missed:
            for layer in cache.layers:
                layer.prefill_pending = False
            raise UnsupportedModelError(
                f"the attention of layers {missed[:5]} never ran through kvmerger's attention function; "
                "this model's attention modules do not use transformers' AttentionInterface"
            )

    def layer_for(self, module: torch.nn.Module, key: torch.Tensor) -> CompressedLayer | None:
        """The cache layer whose keys this attention call received, or None if it holds none."""
        if self._cache is None:
            return None
        layer = self._cache.layers[module.layer_idx]
        if not isinstance(layer, CompressedLayer):
            return None
        if layer.keys is not key:
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {module.layer_idx}) passed keys to attention that are not the "
                "cache's own tensors; kvmerger cannot compress this model"
            )
        return layer

    def after_attention(
        self,
        layer: CompressedLayer,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
    ) -> None:
        if layer.prefill_pending:
            layer.prefill_pending = False
            self.on_prefill(layer, module.layer_idx, query, key, value, scaling)

    def on_prefill(
        self, layer: CompressedLayer, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        """Called once per layer, right after the prompt's attention in that layer."""


class CompressionSession(Session):
    """Compresses the prompt's cache with `method`, layer by layer, during the prefill."""

    handles_prefill = True

    def __init__(self, model: torch.nn.Module, method: CompressionMethod, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(model, chunk_size)
        if not isinstance(method, CompressionMethod):
            raise TypeError(f"method must be a kvmerger CompressionMethod, got {type(method).__name__}")
        self.method = method
        self.reports: list[CompressionReport] = []
        self._building: CompressionReport | None = None

    @property
    def report(self) -> CompressionReport:
        """The report of the latest compression."""
        if not self.reports:
            raise RuntimeError("nothing was compressed yet: no prompt of more than one token went through the model")
        return self.reports[-1]

    def begin_forward(self, cache: CompressedCache | None, query_length: int | None) -> None:
        super().begin_forward(cache, query_length)
        self._building = None

    def on_prefill(
        self, layer: CompressedLayer, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        scores = LayerScores(query, key, scaling, self.chunk_size)
        output, layer_report = compress_layer(self.method, key, value, scores, layer_idx, self.num_layers)
        layer.replace(output.keys, output.values, output.bias)
        if self._building is None:
            self._building = CompressionReport(method=self.method.describe())
        self._building.layers.append(layer_report)

    def end_forward(self) -> None:
        super().end_forward()
        if self._building is not None:
            self.reports.append(self._building)
            self._building = None


class RecordingSession(Session):
    """Keeps each layer's prefill query states (and scaling) for later compression."""

    handles_prefill = True

    def __init__(self, model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(model, chunk_size)
        self.queries: dict[int, tuple[torch.Tensor, float]] = {}

    def on_prefill(
        self, layer: CompressedLayer, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        self.queries[layer_idx] = (query, scaling)


# --------------------------------------------------------------------------------------------
# Compressing one layer (shared by the online and the offline path)
# --------------------------------------------------------------------------------------------


def compress_layer(
    method: CompressionMethod,
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: LayerScores,
    layer_idx: int,
    num_layers: int,
) -> tuple[LayerOutput, LayerReport]:
    length = keys.shape[-2]
    layer = LayerInput(keys, values, scores, layer_idx, num_layers, slots=method.target_slots(length))
    scoring_before = scores.seconds
    start = time.perf_counter()
    output = method.compress(layer)
    _synchronize(keys.device)
    elapsed = time.perf_counter() - start
    scoring = scores.seconds - scoring_before
    _check_output(method, layer, output)
    report = LayerReport(
        layer=layer_idx,
        tokens=length,
        slots_before=length,
        slots_after=output.keys.shape[-2],
        bytes_before=_nbytes(keys) + _nbytes(values),
        bytes_after=_nbytes(output.keys) + _nbytes(output.values) + _nbytes(output.bias),
        seconds_scoring=scoring,
        seconds_compressing=elapsed - scoring,
        merge_set_sizes=_set_size_histogram(output.set_sizes),
        notes=output.notes,
    )
    return output, report


def _check_output(method: CompressionMethod, layer: LayerInput, output: LayerOutput) -> None:
    expected = layer.keys.shape[:2]
    if output.keys.shape[:2] != expected or output.values.shape[:2] != expected:
        raise RuntimeError(f"{method.name} changed the batch or head dimensions of layer {layer.layer_idx}")
    slots = output.keys.shape[-2]
    if method.keeps_budget() and slots != layer.slots:
        raise RuntimeError(
            f"{method.name} kept {slots} slots in layer {layer.layer_idx}, but budget {method.budget} of "
            f"{layer.length} tokens means exactly {layer.slots}"
        )


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _set_size_histogram(set_sizes: torch.Tensor | None) -> dict[int, int]:
    if set_sizes is None:
        return {}
    merged = set_sizes[set_sizes > 1]
    if merged.numel() == 0:
        return {}
    sizes, counts = torch.unique(merged, return_counts=True)
    return dict(Counter({int(s): int(c) for s, c in zip(sizes.tolist(), counts.tolist())}))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


@contextmanager
def compress(
    model: torch.nn.Module, method: CompressionMethod, *, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[CompressionSession]:
    """Compress the KV cache of every prompt `model` prefills inside the block.

    >>> with compress(model, KVMerger(budget=0.5)) as session:
    ...     out = model.generate(input_ids, max_new_tokens=32)
    >>> print(session.report.summary())
    """
    check_supported(model)
    session = CompressionSession(model, method, chunk_size)
    with install_session(model, session):
        yield session


@contextmanager
def attach(model: torch.nn.Module) -> Iterator[Session]:
    """Run `model` with kvmerger's attention (per-slot biases) and caches, compressing nothing."""
    check_supported(model)
    session = Session(model)
    with install_session(model, session):
        yield session


@dataclass
class Prefill:
    """A prompt prefilled once with the full cache, ready to be compressed by any method."""

    cache: CompressedCache  # uncompressed
    queries: list[torch.Tensor]  # per layer, [B, Hq, T, d]
    scores: list[LayerScores]  # per layer, statistics shared by every method compressing this prefill
    last_logits: torch.Tensor  # [B, vocab], float32: the next-token distribution after the prompt
    seconds: float

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


@torch.no_grad()
def record_prefill(model: torch.nn.Module, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> Prefill:
    """Prefill `input_ids` once with the full cache and keep what compression needs."""
    check_supported(model)
    if input_ids.shape[-1] < 2:
        raise ValueError("a prompt to compress needs at least two tokens")
    session = RecordingSession(model, chunk_size)
    cache = CompressedCache(model.config)
    start = time.perf_counter()
    with install_session(model, session):
        output = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    _synchronize(input_ids.device)
    seconds = time.perf_counter() - start
    queries = [session.queries[i][0] for i in range(len(cache.layers))]
    scores = [
        LayerScores(session.queries[i][0], cache.layers[i].keys, session.queries[i][1], chunk_size)
        for i in range(len(cache.layers))
    ]
    return Prefill(cache, queries, scores, output.logits[:, -1].float(), seconds)


def compress_prefill(prefill: Prefill, method: CompressionMethod) -> tuple[CompressedCache, CompressionReport]:
    """A new cache holding `prefill`'s prompt compressed by `method` (the prefill itself is untouched)."""
    report = CompressionReport(method=method.describe())
    compressed = []
    num_layers = len(prefill.cache.layers)
    for index, layer in enumerate(prefill.cache.layers):
        output, layer_report = compress_layer(method, layer.keys, layer.values, prefill.scores[index], index, num_layers)
        compressed.append((output.keys, output.values, output.bias))
        report.layers.append(layer_report)
    return CompressedCache.from_tensors(compressed, seen_tokens=prefill.length), report
