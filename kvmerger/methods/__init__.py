"""Compression methods, one file each, named after the method.

Importing this package imports every module in it, which registers each method by its `name`
(see `METHODS` and `get_method`). Adding a method is adding one file.
"""

import importlib
import pkgutil

import kvmerger.engine  # noqa: F401  (first: the engine's session imports methods.base, which imports engine.scoring)
from kvmerger.methods.base import (
    METHODS,
    CompressionMethod,
    LayerInput,
    LayerOutput,
    SlotState,
    get_method,
    slots_for_budget,
)
from kvmerger.methods.full_cache import FullCache
from kvmerger.methods.kvmerger import KVMerger

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "CompressionMethod",
    "FullCache",
    "KVMerger",
    "LayerInput",
    "LayerOutput",
    "SlotState",
    "get_method",
    "slots_for_budget",
]
