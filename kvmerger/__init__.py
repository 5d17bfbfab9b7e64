"""kvmerger: compress the KV cache of transformers models by merging, with faithful baselines.

    from kvmerger import KVMerger, compress, load_model
    model, tokenizer = load_model()                   # SmolLM2-135M-Instruct, offline
    ids = tokenizer(text, return_tensors="pt").input_ids
    with compress(model, KVMerger(budget=0.5)) as session:
        out = model.generate(ids, max_new_tokens=32)
    print(session.report.summary())

Importing the package sets the Hugging Face libraries offline (see kvmerger/offline.py) and
nothing else: the names below are imported on first use, so that `kvmerger --help` does not
load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvmerger.offline import go_offline

go_offline()

__version__ = "0.1.0"

_EXPORTS = {
    "CompressedCache": "kvmerger.engine",
    "CompressionReport": "kvmerger.engine",
    "NonFiniteCacheError": "kvmerger.engine",
    "UnsupportedModelError": "kvmerger.engine",
    "attach": "kvmerger.engine",
    "compress": "kvmerger.engine",
    "compress_prefill": "kvmerger.engine",
    "record_prefill": "kvmerger.engine",
    "METHODS": "kvmerger.methods",
    "CompressionMethod": "kvmerger.methods",
    "FullCache": "kvmerger.methods",
    "KVMerger": "kvmerger.methods",
    "get_method": "kvmerger.methods",
    "load_model": "kvmerger.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvmerger' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
