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

A left-padded batch is compressed one sequence at a time (engine/padding.py).

Only full-attention layers are compressed. A sliding-window layer (Gemma 3, Mistral with a window,
Qwen with `use_sliding_window`) keeps transformers' own cache, bounded by its window; it is never
handed to a method, and reports list it in `kept_layers` with its bytes.
"""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TypeVar

import torch

from kvmerger.engine import kernels
from kvmerger.engine.finite import check_finite
from kvmerger.engine.hf import (
    CompressedCache,
    CompressedLayer,
    UnsupportedModelError,
    check_supported,
    install_session,
    is_compressed,
    layer_kind,
    layer_nbytes,
    layer_slots,
    rotary_tables,
)
from kvmerger.engine.padding import BatchPadding, left_pad, stack_outputs, stack_padded
from kvmerger.engine.report import CompressionReport, KeptLayer, LayerReport
from kvmerger.engine.scoring import DEFAULT_CHUNK, LayerScores, ScoreContext, _synchronize, new_query_attention
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, SlotState


@dataclass(frozen=True)
class SequenceBudget:
    """One sequence of a padded batch while the engine holds its budget (engine.padding)."""

    padding_tokens: int  # left padding of its prompt in the batch
    padding_slots: int  # masked slots before its own, in every layer, for the rest of generation
    target_slots: int  # its own budget
    prompt_length: int  # its own prompt's tokens


@dataclass
class SlotMeta:
    """What the engine tracks per stored slot while it holds a layer's budget during generation.

    For a padded batch `sequences` holds each sequence's own budget; `target_slots` and
    `prompt_length` are then the batch's (the longest)."""

    positions: torch.Tensor  # [B, Hkv, N] long
    set_sizes: torch.Tensor  # [B, Hkv, N] long
    accumulated: torch.Tensor  # [B, Hkv, N] float32
    last_attention: torch.Tensor  # [B, Hkv, N] float32
    target_slots: int
    prompt_length: int
    sequences: tuple[SequenceBudget, ...] | None = None

    @classmethod
    def after_compression(cls, output: LayerOutput, aggregated: torch.Tensor, prompt_length: int) -> SlotMeta:
        positions = output.positions
        sizes = output.set_sizes if output.set_sizes is not None else torch.ones_like(positions)
        accumulated = output.accumulated
        if accumulated is None:
            accumulated = aggregated.float().gather(2, positions.clamp_min(0))
        accumulated = accumulated.masked_fill(sizes == 0, float("-inf"))
        return cls(positions, sizes, accumulated, torch.zeros_like(accumulated), positions.shape[-1], prompt_length)

    @classmethod
    def stacked(cls, metas: list[SlotMeta], padding: BatchPadding) -> SlotMeta:
        """A padded batch's metadata from each sequence's own, left-padded like its slots (engine.padding)."""
        slots = max(meta.target_slots for meta in metas)
        return cls(
            torch.cat([left_pad(meta.positions, slots, -1) for meta in metas]),
            torch.cat([left_pad(meta.set_sizes, slots, 0) for meta in metas]),
            torch.cat([left_pad(meta.accumulated, slots, float("-inf")) for meta in metas]),
            torch.cat([left_pad(meta.last_attention, slots, 0.0) for meta in metas]),
            slots,
            padding.length,
            tuple(
                SequenceBudget(pad, slots - meta.target_slots, meta.target_slots, meta.prompt_length)
                for pad, meta in zip(padding.pads, metas)
            ),
        )

    def appended(self, new_tokens: int, seen_tokens: int) -> SlotMeta:
        """The metadata with `new_tokens` just-appended slots (one token each, no attention yet), at each
        sequence's own positions."""
        batch, heads, _ = self.positions.shape
        device = self.positions.device
        positions = torch.arange(seen_tokens - new_tokens, seen_tokens, device=device).expand(batch, heads, -1)
        if self.sequences is not None:
            padding = torch.tensor([s.padding_tokens for s in self.sequences], device=device)
            positions = positions - padding.view(batch, 1, 1)
        return SlotMeta(
            torch.cat([self.positions, positions], dim=-1),
            torch.cat([self.set_sizes, torch.ones_like(positions)], dim=-1),
            torch.cat([self.accumulated, self.accumulated.new_zeros(batch, heads, new_tokens)], dim=-1),
            torch.cat([self.last_attention, self.last_attention.new_zeros(batch, heads, new_tokens)], dim=-1),
            self.target_slots,
            self.prompt_length,
            self.sequences,
        )


@dataclass(frozen=True)
class PrefillAttention:
    """One layer's prompt attention as the session sees it, right after it ran."""

    query: torch.Tensor  # [B, Hq, T, d], post-RoPE
    key: torch.Tensor  # [B, Hkv, T, d], the cache's own tensor
    value: torch.Tensor  # [B, Hkv, T, d]
    scaling: float
    lse: torch.Tensor | None  # [B, Hq, T] float32 log-normalisers, where the attention kept them


class Session:
    """Applies per-slot biases and, with `hold_method`, holds each compressed layer's budget during
    generation; does nothing special at prefill. Subclasses act on the prefill."""

    handles_prefill = False

    def __init__(
        self, model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK, hold_method: CompressionMethod | None = None
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
        if hold_method is not None and not hold_method.can_hold_budget():
            raise ValueError(
                f"{hold_method.label()} cannot hold a budget while generating (the full cache keeps every "
                "token, KVMerger's paper mode has no fixed budget, a shared head budget packs its heads); use a method "
                "with an exact budget per head"
            )
        self.model = model
        self.chunk_size = chunk_size
        self.hold_method = hold_method
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self._cache: CompressedCache | None = None
        self.hold_calls = 0
        self.seconds_holding = 0.0

    # -- called by the hooks in engine.hf ------------------------------------------------------
    def begin_forward(
        self,
        cache: CompressedCache | None,
        query_length: int | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """`input_ids` [B, n]: the token ids fed, when the forward pass was given ids (not embeddings);
        `attention_mask`: the 2-D mask it was given, if any (zeros: a padded batch)."""
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

    def normaliser_part(self, module: torch.nn.Module) -> torch.Tensor | None:
        """Indices of the cached keys over which this layer's attention should also return each
        appended query's log-normaliser (with the queries' own keys), or None for none."""
        return None

    def after_attention(
        self,
        layer: CompressedLayer,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        lse: torch.Tensor | None = None,
    ) -> None:
        """`lse`: the log-normalisers [B, Hq, n] the attention kept, if any: the prefill rows', or
        the appended rows' over `normaliser_part`."""
        if layer.prefill_pending:
            layer.prefill_pending = False
            self.on_prefill(layer, module.layer_idx, PrefillAttention(query, key, value, scaling, lse))
        elif layer.hold is not None and self.hold_method is not None:
            self._hold_budget(layer, module.layer_idx, query, key, value, scaling)

    def _hold_budget(
        self,
        layer: CompressedLayer,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
    ) -> None:
        """Account the new queries' attention, then shrink the layer back to its budget if it grew."""
        new = query.shape[2]
        newest = {"keys": key[..., -new:, :], "values": value[..., -new:, :], "query states": query}
        check_finite(layer_idx, newest, "the newest tokens'", first_token=layer.seen_tokens - new)
        start = time.perf_counter()
        meta = layer.hold.appended(new, layer.seen_tokens)
        summed, last = new_query_attention(query, key, scaling, layer.slot_bias)
        meta.accumulated = meta.accumulated + summed
        meta.last_attention = last
        if key.shape[-2] > meta.target_slots:
            state = SlotState(
                keys=layer.keys,
                values=layer.values,
                bias=layer.slot_bias,
                positions=meta.positions,
                set_sizes=meta.set_sizes,
                accumulated=meta.accumulated,
                last_attention=meta.last_attention,
                target_slots=meta.target_slots,
                prompt_length=meta.prompt_length,
                seen_tokens=layer.seen_tokens,
                layer_idx=layer_idx,
            )
            if meta.sequences is None:
                state = self._held(state)
            else:
                state = self._held_per_sequence(state, meta.sequences)
            layer.replace(state.keys, state.values, state.bias)
            meta = SlotMeta(
                state.positions, state.set_sizes, state.accumulated, state.last_attention, meta.target_slots,
                meta.prompt_length, meta.sequences,
            )
            self.hold_calls += 1
        layer.hold = meta
        _synchronize(key.device)
        self.seconds_holding += time.perf_counter() - start

    def _held(self, state: SlotState) -> SlotState:
        """The method's `hold_budget` on `state`, checked to keep exactly its target."""
        held = self.hold_method.hold_budget(state)
        if held.keys.shape[-2] != state.target_slots:
            raise RuntimeError(
                f"{self.hold_method.name}.hold_budget left {held.keys.shape[-2]} slots in layer {state.layer_idx}, "
                f"not its budget of {state.target_slots}"
            )
        return held

    def _held_per_sequence(self, state: SlotState, sequences: tuple[SequenceBudget, ...]) -> SlotState:
        """A padded batch's layer held at each sequence's own budget: each sequence's own slots (its
        padding sliced off) go to the method alone, and come back left-padded as they were."""
        held: list[SlotState] = []
        for row, sequence in enumerate(sequences):
            own = slice(sequence.padding_slots, None)
            bias = state.bias[row : row + 1, :, own] if self.hold_method.stores_bias() else None
            held.append(
                self._held(
                    replace(
                        state,
                        keys=state.keys[row : row + 1, :, own],
                        values=state.values[row : row + 1, :, own],
                        bias=bias,
                        positions=state.positions[row : row + 1, :, own],
                        set_sizes=state.set_sizes[row : row + 1, :, own],
                        accumulated=state.accumulated[row : row + 1, :, own],
                        last_attention=state.last_attention[row : row + 1, :, own],
                        target_slots=sequence.target_slots,
                        prompt_length=sequence.prompt_length,
                        seen_tokens=state.seen_tokens - sequence.padding_tokens,
                    )
                )
            )
        keys, values, bias = stack_padded([h.keys for h in held], [h.values for h in held], [h.bias for h in held])
        slots = keys.shape[2]
        return replace(
            state,
            keys=keys,
            values=values,
            bias=bias,
            positions=torch.cat([left_pad(h.positions, slots, -1) for h in held]),
            set_sizes=torch.cat([left_pad(h.set_sizes, slots, 0) for h in held]),
            accumulated=torch.cat([left_pad(h.accumulated, slots, float("-inf")) for h in held]),
            last_attention=torch.cat([left_pad(h.last_attention, slots, 0.0) for h in held]),
        )

    def on_prefill(self, layer: CompressedLayer, layer_idx: int, attention: PrefillAttention) -> None:
        """Called once per layer, right after the prompt's attention in that layer."""


class CompressionSession(Session):
    """Compresses the prompt's cache with `method`, layer by layer, during the prefill.

    A method whose scores need the whole prefill first (KVzip's reconstruction pass, which runs the
    model again over every layer) is applied once the prefill's forward pass ends instead: every
    layer then holds its full cache until all of them are compressed.
    """

    handles_prefill = True

    def __init__(
        self,
        model: torch.nn.Module,
        method: CompressionMethod,
        chunk_size: int = DEFAULT_CHUNK,
        hold_budget: bool = False,
        tokenizer=None,
    ) -> None:
        if not isinstance(method, CompressionMethod):
            raise TypeError(f"method must be a kvmerger CompressionMethod, got {type(method).__name__}")
        super().__init__(model, chunk_size, hold_method=method if hold_budget else None)
        self.method = method
        self.tokenizer = tokenizer
        self.defers = method.needs_reconstruction()
        self.reports: list[CompressionReport] = []
        self._building: CompressionReport | None = None
        self._rotary = rotary_tables(model)
        self._context = ScoreContext()
        self._input_ids: torch.Tensor | None = None
        self._deferred: list[tuple[CompressedLayer, int, PrefillAttention]] = []
        self._padding: BatchPadding | None = None

    @property
    def report(self) -> CompressionReport:
        """The report of the latest compression."""
        if not self.reports:
            raise RuntimeError("nothing was compressed yet: no prompt of more than one token went through the model")
        return self.reports[-1]

    def begin_forward(
        self,
        cache: CompressedCache | None,
        query_length: int | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        super().begin_forward(cache, query_length, input_ids, attention_mask)
        prefill = cache is not None and cache.get_seq_length() == 0
        self._padding = BatchPadding.from_mask(attention_mask) if prefill else None
        if self._padding is not None and self.method.shares_head_budget():
            raise ValueError(
                f"{self.method.label()} lets a layer's heads share its budget, which kvmerger does not run on padded "
                "batches: compress these prompts one at a time, or use head_budget='equal'"
            )
        if self._padding is not None and self.defers:
            raise ValueError(
                f"{self.method.label()} scores tokens by reconstructing one prompt with a second pass of the model, "
                "which kvmerger does not run on padded batches: compress these prompts one at a time"
            )
        self._building = None
        self._input_ids = input_ids
        self._context = ScoreContext(rotary=self._rotary)
        self._deferred = []
        if self.hold_method is not None and query_length == 1 and cache is not None and cache.get_seq_length() == 0:
            warnings.warn(
                "kvmerger: this prompt has one token: nothing to compress and no budget to hold, so its cache "
                "grows with every generated token; give a prompt of at least two tokens to hold the budget",
                UserWarning,
            )

    def on_prefill(self, layer: CompressedLayer, layer_idx: int, attention: PrefillAttention) -> None:
        if self.defers:
            self._deferred.append((layer, layer_idx, attention))
        else:
            self._compress(layer, layer_idx, attention)

    def _compress(self, layer: CompressedLayer, layer_idx: int, attention: PrefillAttention) -> None:
        if self._padding is not None:
            self._compress_padded(layer, layer_idx, attention, self._padding)
            return
        key, value = attention.key, attention.value
        scores = LayerScores(
            attention.query, key, attention.scaling, self.chunk_size, attention.lse,
            layer_idx=layer_idx, context=self._context,
        )
        output, layer_report = compress_layer(self.method, key, value, scores, layer_idx, self.num_layers)
        layer.replace(*stored_tensors(output, key.shape[1]))
        if self.hold_method is not None:
            layer.hold = SlotMeta.after_compression(output, self.method.attention_received(scores), key.shape[-2])
        self._add_report(layer_report)

    def _compress_padded(
        self, layer: CompressedLayer, layer_idx: int, attention: PrefillAttention, padding: BatchPadding
    ) -> None:
        """Compress each sequence of a padded batch on its own tokens, then pad them back (engine.padding)."""
        outputs: list[LayerOutput] = []
        reports: list[LayerReport] = []
        metas: list[SlotMeta] = []
        for row in range(len(padding.pads)):
            query, key, value = (padding.own(t, row) for t in (attention.query, attention.key, attention.value))
            scores = LayerScores(
                query, key, attention.scaling, self.chunk_size, self._sequence_lse(query, key, value, attention.scaling),
                layer_idx=layer_idx, context=self._context,
            )
            output, report = compress_layer(self.method, key, value, scores, layer_idx, self.num_layers)
            outputs.append(output)
            reports.append(report)
            if self.hold_method is not None:
                metas.append(SlotMeta.after_compression(output, self.method.attention_received(scores), key.shape[-2]))
        stacked = stack_outputs(outputs)
        layer.replace(stacked.keys, stacked.values, stacked.bias)
        if metas:
            layer.hold = SlotMeta.stacked(metas, padding)
        self._add_report(batch_report(reports, attention.key, attention.value, stacked, padding))

    def _sequence_lse(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """One sequence's prefill log-normalisers, for a method whose estimated statistic needs them.

        A padded prefill runs masked attention, which keeps none; one more causal pass over the
        sequence's own states gives what its prefill alone would have kept (the same kernel)."""
        if getattr(self.method, "statistic", "exact") != "estimated" or not kernels.available(query.device, query.dtype):
            return None
        group = query.shape[1] // key.shape[1]
        grouped_key, grouped_value = (t.repeat_interleave(group, dim=1) for t in (key, value))
        return kernels.causal_attention_with_lse(query, grouped_key, grouped_value, scaling)[1]

    def _add_report(self, layer_report: LayerReport) -> None:
        if self._building is None:
            self._building = CompressionReport(method=self.method.describe())
        self._building.layers.append(layer_report)

    def end_forward(self) -> None:
        cache = self._cache
        super().end_forward()
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            self._context.reconstruction = self._reconstruction(cache)
            for layer, layer_idx, attention in deferred:
                self._compress(layer, layer_idx, attention)
        if self._building is not None:
            self._building.kept_layers = kept_layers(cache)
            self.reports.append(self._building)
            self._building = None

    def _reconstruction(self, cache: CompressedCache):
        from kvmerger.engine.reconstruction import Reconstruction

        if self._input_ids is None:
            raise ValueError(
                f"{self.method.label()} scores tokens by reconstructing the prompt from its token ids; "
                "feed input_ids, not inputs_embeds"
            )
        return Reconstruction(self.model, cache, self._input_ids, self.tokenizer)


class RecordingSession(Session):
    """Keeps each layer's prefill query states, scaling and log-normalisers for later compression."""

    handles_prefill = True

    def __init__(self, model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(model, chunk_size)
        self.attention: dict[int, PrefillAttention] = {}

    def on_prefill(self, layer: CompressedLayer, layer_idx: int, attention: PrefillAttention) -> None:
        self.attention[layer_idx] = attention


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
    """Compress one layer's prompt cache with `method` and report it. Non-finite keys, values or
    query states raise `NonFiniteCacheError` before the method runs (engine/finite.py)."""
    check_finite(layer_idx, {"keys": keys, "values": values, "query states": scores.query})
    length = keys.shape[-2]
    slot_bytes = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
    layer = LayerInput(keys, values, scores, layer_idx, num_layers, slots=method.target_slots(length, slot_bytes))
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
        slots_after=output.keys.shape[-2] // (keys.shape[1] if output.slot_heads is not None else 1),
        bytes_before=_nbytes(keys) + _nbytes(values),
        bytes_after=_nbytes(output.keys) + _nbytes(output.values) + _nbytes(output.bias) + _nbytes(output.slot_heads),
        seconds_scoring=scoring,
        seconds_compressing=elapsed - scoring,
        merge_set_sizes=_set_size_histogram(output.set_sizes),
        notes=output.notes,
    )
    return output, report


def stored_tensors(output: LayerOutput, kv_heads: int) -> tuple:
    """What `CompressedLayer.replace` takes for `output`: (keys, values, bias), and for a packed layer
    its slot tags and count of KV heads too."""
    if output.slot_heads is None:
        return output.keys, output.values, output.bias
    return output.keys, output.values, output.bias, output.slot_heads, kv_heads


def _check_output(method: CompressionMethod, layer: LayerInput, output: LayerOutput) -> None:
    if output.slot_heads is not None:
        _check_packed_output(method, layer, output)
        return
    expected = layer.keys.shape[:2]
    if output.keys.shape[:2] != expected or output.values.shape[:2] != expected:
        raise RuntimeError(f"{method.name} changed the batch or head dimensions of layer {layer.layer_idx}")
    slots = output.keys.shape[-2]
    if method.keeps_budget() and slots != layer.slots:
        raise RuntimeError(
            f"{method.name} kept {slots} slots in layer {layer.layer_idx}, but budget {method.budget} of "
            f"{layer.length} tokens means exactly {layer.slots}"
        )


def _check_packed_output(method: CompressionMethod, layer: LayerInput, output: LayerOutput) -> None:
    """A shared head budget: one packed row per batch element holding exactly the layer's `Hkv * slots`."""
    batch, heads = layer.keys.shape[:2]
    expected = (batch, 1, heads * layer.slots)
    if (
        output.keys.shape[:3] != expected
        or output.values.shape[:3] != expected
        or tuple(output.slot_heads.shape) != (batch, heads * layer.slots)
        or (output.bias is not None and (not method.stores_bias() or tuple(output.bias.shape) != expected))
    ):
        raise RuntimeError(
            f"{method.name} packed layer {layer.layer_idx} into keys {tuple(output.keys.shape)}; a shared budget of "
            f"{layer.slots} slots per head means one row of {heads * layer.slots} slots per sequence, and a "
            "bias only from a method that stores one, one per slot"
        )


def batch_report(
    reports: list[LayerReport], keys: torch.Tensor, values: torch.Tensor, output: LayerOutput, padding: BatchPadding
) -> LayerReport:
    """One layer's report for a padded batch: bytes of the padded tensors (masked slots counted) before
    and after, times and merging sets summed over the sequences, each sequence's tokens and slots in
    the notes."""
    sizes: dict[int, int] = {}
    for report in reports:
        for size, count in report.merge_set_sizes.items():
            sizes[size] = sizes.get(size, 0) + count
    return LayerReport(
        layer=reports[0].layer,
        tokens=padding.length,
        slots_before=padding.length,
        slots_after=output.keys.shape[-2],
        bytes_before=_nbytes(keys) + _nbytes(values),
        bytes_after=_nbytes(output.keys) + _nbytes(output.values) + _nbytes(output.bias),
        seconds_scoring=sum(report.seconds_scoring for report in reports),
        seconds_compressing=sum(report.seconds_compressing for report in reports),
        merge_set_sizes=dict(sorted(sizes.items())),
        notes={
            "sequence_tokens": padding.lengths,
            "sequence_slots": [report.slots_after for report in reports],
            "sequences": [report.notes for report in reports],
        },
    )


def kept_layers(cache: CompressedCache) -> list[KeptLayer]:
    """The layers of `cache` that no method compresses, as they are now."""
    return [
        KeptLayer(index, layer_kind(layer), layer_slots(layer), layer_nbytes(layer))
        for index, layer in enumerate(cache.layers)
        if not is_compressed(layer)
    ]


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _set_size_histogram(set_sizes: torch.Tensor | None) -> dict[int, int]:
    if set_sizes is None:
        return {}
    merged = set_sizes[set_sizes > 1]
    if merged.numel() == 0:
        return {}
    sizes, counts = torch.unique(merged, return_counts=True)
    return {int(s): int(c) for s, c in zip(sizes.tolist(), counts.tolist())}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


SessionT = TypeVar("SessionT", bound=Session)


class SessionBlock(AbstractContextManager[SessionT]):
    """The block `compress(...)` and `attach(...)` return: entering it routes the model through
    `session`, leaving it (whatever happened inside) restores the model's attention and hooks.

    The same block may be entered again once it has exited: the same session goes on, and
    `session.reports` keeps every compression. Entering it while it is active is refused.
    """

    def __init__(self, model: torch.nn.Module, session: SessionT, call: str) -> None:
        self.model = model
        self.session = session
        self._call = call
        self._installed: AbstractContextManager[None] | None = None

    def __enter__(self) -> SessionT:
        if self._installed is not None:
            raise RuntimeError(
                f"this {self._call}(...) block is already active; a block cannot be entered inside itself "
                f"(call {self._call}(model, ...) again for a second one)"
            )
        installed = install_session(self.model, self.session)
        installed.__enter__()
        self._installed = installed
        return self.session

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool | None:
        installed, self._installed = self._installed, None
        return installed.__exit__(kind, error, trace)


def compress(
    model: torch.nn.Module,
    method: CompressionMethod,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    hold_budget: bool = False,
    tokenizer=None,
) -> SessionBlock[CompressionSession]:
    """Compress the KV cache of every prompt `model` prefills inside the block.

    With `hold_budget=True` every layer also stays at its budget while tokens are generated: each
    new token is appended, and whenever a layer holds more slots than its budget the method's
    `hold_budget` rule shrinks it back (H2O's eviction by default). A one-token prompt has nothing
    to compress and no budget to hold: it is left as it is, with a `UserWarning` when holding.
    `tokenizer`: the model's, for methods scored by reconstructing the prompt (KVzip's score; loaded
    from the model's folder when not given).

    A left-padded batch (an `attention_mask` with zeros, as `generate()` takes it) is compressed one
    sequence at a time on its own tokens, to its own budget, and padded back with masked slots
    (engine/padding.py); right padding, and methods scored by reconstruction, raise a ValueError.

    A prompt whose keys, values or query states hold NaN or inf in some layer (an overflowing
    float16 model, a corrupted checkpoint) raises `NonFiniteCacheError` naming the layer; the model
    is restored as always when the block exits.

    >>> with compress(model, KVMerger(budget=0.5)) as session:
    ...     out = model.generate(input_ids, max_new_tokens=32)
    >>> print(session.report.summary())
    """
    check_supported(model)
    return SessionBlock(model, CompressionSession(model, method, chunk_size, hold_budget, tokenizer), "compress")


def attach(model: torch.nn.Module, hold: CompressionMethod | None = None) -> SessionBlock[Session]:
    """Run `model` with kvmerger's attention (per-slot biases) and caches, compressing nothing.

    `hold`: the method whose `hold_budget` rule keeps layers compressed by
    `compress_prefill(..., hold_budget=True)` at their budget during generation.
    """
    check_supported(model)
    return SessionBlock(model, Session(model, hold_method=hold), "attach")


@dataclass
class Prefill:
    """A prompt prefilled once with the full cache, ready to be compressed by any method.

    `queries` and `scores` are indexed by layer, None for a layer that is not compressed (a
    sliding-window layer); `compressed_layers` lists the others.
    """

    cache: CompressedCache  # uncompressed
    queries: list[torch.Tensor | None]  # per layer, [B, Hq, T, d]
    scores: list[LayerScores | None]  # per layer, statistics shared by every method compressing this prefill
    last_logits: torch.Tensor  # [B, vocab], float32: the next-token distribution after the prompt
    seconds: float

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def compressed_layers(self) -> list[int]:
        return [index for index, layer in enumerate(self.cache.layers) if is_compressed(layer)]


@torch.no_grad()
def record_prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, tokenizer=None
) -> Prefill:
    """Prefill `input_ids` once with the full cache and keep what compression needs.

    Every score source is available to the methods compressing it; KVzip's reconstruction pass
    runs on the first request (it needs `tokenizer`, loaded from the model's folder if not given).
    """
    from kvmerger.engine.reconstruction import Reconstruction

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
    attention = [session.attention.get(i) for i in range(len(cache.layers))]
    queries = [None if layer is None else layer.query for layer in attention]
    context = ScoreContext(rotary_tables(model), Reconstruction(model, cache, input_ids, tokenizer))
    scores = [
        None
        if layer is None
        else LayerScores(layer.query, layer.key, layer.scaling, chunk_size, layer.lse, layer_idx=index, context=context)
        for index, layer in enumerate(attention)
    ]
    return Prefill(cache, queries, scores, output.logits[:, -1].float(), seconds)


def compress_prefill(
    prefill: Prefill, method: CompressionMethod, *, hold_budget: bool = False
) -> tuple[CompressedCache, CompressionReport]:
    """A new cache holding `prefill`'s prompt compressed by `method` (the prefill itself is untouched).

    Layers that are not compressed (sliding-window layers) are carried over as they are.
    `hold_budget=True` also records what `attach(model, hold=method)` needs to keep the budget
    during generation.
    """
    if hold_budget and not method.can_hold_budget():
        raise ValueError(f"{method.label()} cannot hold a budget while generating; compress without hold_budget")
    report = CompressionReport(method=method.describe())
    layers: list = []
    metas: dict[int, SlotMeta] = {}
    num_layers = len(prefill.cache.layers)
    for index, layer in enumerate(prefill.cache.layers):
        if not is_compressed(layer):
            layers.append(layer)
            continue
        scores = prefill.scores[index]
        output, layer_report = compress_layer(method, layer.keys, layer.values, scores, index, num_layers)
        layers.append(stored_tensors(output, layer.keys.shape[1]))
        report.layers.append(layer_report)
        if hold_budget:
            metas[index] = SlotMeta.after_compression(output, method.attention_received(scores), prefill.length)
    cache = CompressedCache.from_tensors(layers, seen_tokens=prefill.length)
    report.kept_layers = kept_layers(cache)
    for index, meta in metas.items():
        cache.layers[index].hold = meta
    return cache, report
