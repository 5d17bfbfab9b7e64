"""The folder of converted models, keyed by what the model file holds.

transformers de-quantises a GGUF file to float32 in tens of seconds, so kvmerger converts it once
to a safetensors folder, `cache_dir()/models/gguf-<key>/`, and loads that afterwards. `<key>` is
the first 16 hex digits of the SHA-256 of the GGUF file's bytes, and nothing else: every checkout,
virtual environment or copy of the same file shares one folder, and a changed file gets a new one.

Hashing the default model's 98 MB takes about a third of a second; `gguf-hashes.json` in the cache
remembers each file's hash by its resolved path, size and modification time, so later loads only
`stat` the file. Each folder's `source.json` lists the files it was made from or reused for.

`cache_dir()` is `$KVMERGER_CACHE`, else `$XDG_CACHE_HOME/kvmerger`, else `~/.cache/kvmerger`.
`kvmerger cache` lists what it holds, `kvmerger cache clear` empties it. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HASH_INDEX = "gguf-hashes.json"
KEY_DIGITS = 16
FOLDER_PATTERN = re.compile(rf"gguf-[0-9a-f]{{{KEY_DIGITS}}}")
COMPLETE_MARKERS = ("model.safetensors", "source.json")
STAGING_PREFIX = ".converting-"
STALE_STAGING_SECONDS = 3600  # a conversion takes about 30 s; an older staging folder is a crash's leftover


def cache_dir() -> Path:
    """Where kvmerger keeps converted models."""
    if override := os.environ.get("KVMERGER_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvmerger"


def models_dir() -> Path:
    return cache_dir() / "models"


def file_sha256(path: Path) -> str:
    """The SHA-256 of `path`'s bytes, remembered in the cache's hash index by (path, size, mtime)."""
    resolved = str(Path(path).resolve())
    stat = Path(path).stat()
    index_path = cache_dir() / HASH_INDEX
    index = _read_json(index_path)
    known = index.get(resolved)
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    index = _read_json(index_path)  # another process may have added entries meanwhile
    index = {path: entry for path, entry in index.items() if os.path.exists(path)}  # files since removed
    index[resolved] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    _write_json_if_possible(index_path, index)  # only saves time later; a read-only cache still works
    return digest.hexdigest()


def converted_folder(gguf: Path) -> Path:
    """The folder that holds (or will hold) `gguf` converted; its name depends only on the file's bytes."""
    return models_dir() / f"gguf-{file_sha256(gguf)[:KEY_DIGITS]}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in COMPLETE_MARKERS)


def note_source(folder: Path, gguf: Path) -> None:
    """Add `gguf` to the files `folder/source.json` says it serves (once per path)."""
    path = folder / "source.json"
    source = _read_json(path)
    sources = source.setdefault("sources", [])
    resolved = str(Path(gguf).resolve())
    if resolved not in sources:
        sources.append(resolved)
        _write_json_if_possible(path, source)


def source_record(gguf: Path) -> dict[str, Any]:
    """What `source.json` says about a fresh conversion of `gguf`."""
    return {
        "gguf_name": Path(gguf).name,
        "sha256": file_sha256(gguf),
        "size": Path(gguf).stat().st_size,
        "sources": [str(Path(gguf).resolve())],
    }


# --------------------------------------------------------------------------------------------
# Listing and clearing (`kvmerger cache`)
# --------------------------------------------------------------------------------------------


@dataclass
class CacheEntry:
    path: Path
    bytes: int
    state: str  # "ready", "converting", "incomplete" or "older layout"
    sources: list[str]

    @property
    def stale(self) -> bool:
        """Never used again by this version: an older layout, or a conversion that died."""
        if self.state in ("older layout", "incomplete"):
            return True
        return self.state == "converting" and time.time() - self.path.stat().st_mtime > STALE_STAGING_SECONDS


def entries() -> list[CacheEntry]:
    """Every folder in the models cache, with its size and state."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_dir():
            continue
        source = _read_json(path / "source.json")
        sources = source.get("sources") or ([source["gguf"]] if "gguf" in source else [])
        if path.name.startswith(STAGING_PREFIX):
            state = "converting"
        elif not FOLDER_PATTERN.fullmatch(path.name):
            state = "older layout"
        else:
            state = "ready" if is_complete(path) else "incomplete"
        found.append(CacheEntry(path, folder_bytes(path), state, sources))
    return found


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def clear(stale_only: bool = False) -> list[CacheEntry]:
    """Remove every converted model (or only the stale ones) and, when clearing all, the hash index."""
    removed = [entry for entry in entries() if entry.stale or not stale_only]
    for entry in removed:
        shutil.rmtree(entry.path)
    if not stale_only:
        (cache_dir() / HASH_INDEX).unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------------------------
# Small JSON files, written atomically
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json_if_possible(path: Path, value: dict[str, Any]) -> None:
    try:
        _write_json(path, value)
    except OSError:
        pass


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.replace(staging, path)
