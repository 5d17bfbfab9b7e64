"""kvmerger: compress the KV cache of transformers models by merging, with faithful baselines.

    from kvmerger import KVMerger, compress, load_model
    model, tokenizer = load_model()                   # SmolLM2-135M-Instruct, offline
    ids = tokenizer(text, return_tensors="pt").input_ids
    with compress(model, KVMerger(budget=0.5)) as session:
        out = model.generate(ids, max_new_tokens=32)
    print(session.report.summary())
"""

from kvmerger.engine import (
    CompressedCache,
    CompressionReport,
    NonFiniteCacheError,
    UnsupportedModelError,
    attach,
    compress,
    compress_prefill,
    record_prefill,
)
from kvmerger.methods import METHODS, CompressionMethod, FullCache, KVMerger, get_method
from kvmerger.models import load_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CompressedCache",
    "CompressionMethod",
    "CompressionReport",
    "FullCache",
    "KVMerger",
    "NonFiniteCacheError",
    "UnsupportedModelError",
    "attach",
    "compress",
    "compress_prefill",
    "get_method",
    "load_model",
    "record_prefill",
]
