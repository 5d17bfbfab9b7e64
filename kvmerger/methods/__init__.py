"""Compression methods, one file each. Importing this package registers them all by name."""

from kvmerger.methods.base import METHODS, CompressionMethod, LayerInput, LayerOutput, get_method, slots_for_budget
from kvmerger.methods.full_cache import FullCache
from kvmerger.methods.kvmerger import KVMerger

__all__ = [
    "METHODS",
    "CompressionMethod",
    "FullCache",
    "KVMerger",
    "LayerInput",
    "LayerOutput",
    "get_method",
    "slots_for_budget",
]
