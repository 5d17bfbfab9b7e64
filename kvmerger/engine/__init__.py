"""The compression engine: cache, attention hook, scoring, sessions and reports."""

from kvmerger.engine.finite import NonFiniteCacheError
from kvmerger.engine.hf import CompressedCache, CompressedLayer, UnsupportedModelError, check_supported
from kvmerger.engine.report import CompressionReport, LayerReport
from kvmerger.engine.scoring import LayerScores, aggregated_attention, window_attention
from kvmerger.engine.session import (
    CompressionSession,
    Prefill,
    attach,
    compress,
    compress_layer,
    compress_prefill,
    record_prefill,
)

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "CompressionReport",
    "CompressionSession",
    "LayerReport",
    "LayerScores",
    "NonFiniteCacheError",
    "Prefill",
    "UnsupportedModelError",
    "aggregated_attention",
    "attach",
    "check_supported",
    "compress",
    "compress_layer",
    "compress_prefill",
    "record_prefill",
    "window_attention",
]
