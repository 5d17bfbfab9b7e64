"""Results on disk: one JSON object per evaluated cell in `records.jsonl`, with what produced it.

* Provenance. Every record carries `provenance`: package versions (kvmerger, torch,
  transformers, python), the git commit of the kvmerger checkout (and whether it had local
  changes) when there is one, the model (name or path, a hash of its configuration, a fingerprint
  of its weights, dtype, device), the hardware (host name, machine, processor, CPU count, torch
  threads, accelerator: the worker's, when a Ray worker computed the cell), the command line and
  the date. The method's and the task's parameters, the seed and the protocol are fields of the
  record itself.
* Cell keys. A cell is one (model, task with its parameters, context length, sample, seed,
  protocol, method with its parameters and budget). Its key is readable and ends with a hash of
  all of these, so that changing any of them makes a new cell, and rerunning the same
  configuration finds the cells already done. The code version is not part of the key: resuming
  after a fix keeps the finished cells (their records say which commit made them).
* Atomic appends. Each record is one line written with a single `write` on a file opened for
  appending, then flushed to disk; a crash can only leave the last line incomplete. Loading
  ignores such a truncated last line, reports it, keeps it aside in `records.jsonl.truncated`, and
  cuts the file back to its last complete line so that later appends stay well formed. A broken
  line anywhere else is not a crash artefact and raises.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"


def stable_hash(value: Any, length: int = 12) -> str:
    """A short hash of a JSON-able value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The commit of the kvmerger checkout this code runs from, and whether it has local changes."""
    folder = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def versions() -> dict[str, str]:
    import transformers

    import kvmerger

    return {
        "kvmerger": kvmerger.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def hardware(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    accelerator = None
    if device.type == "cuda" and torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(device)
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "accelerator": accelerator,
    }


def model_identity(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """Name, configuration hash, weights fingerprint and dtype of `model`."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    return {
        "name": name,
        "class": type(model).__name__,
        "config_hash": stable_hash(config),
        "weights_fingerprint": weights_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the first values of every parameter tensor: cheap, and different checkpoints differ."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def provenance(model_info: dict[str, Any], device: torch.device | str, command: str | None = None) -> dict[str, Any]:
    """What produced a record, apart from its own task, method, seed and protocol fields. `command`:
    the command line that asked for it (default: this process's; a Ray worker gets its driver's)."""
    return {
        "versions": versions(),
        "git": git_state(),
        "model": model_info,
        "hardware": hardware(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if command is None else command,
    }


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def cell_identity(
    model_info: dict[str, Any],
    task: dict[str, Any],
    length: int,
    sample: int,
    seed: int,
    protocol: str,
    method: dict[str, Any],
) -> dict[str, Any]:
    """Everything that decides a cell's result (and nothing that does not, like the code version)."""
    model = {k: model_info[k] for k in ("name", "config_hash", "weights_fingerprint", "dtype")}
    return {
        "model": model,
        "task": task,
        "length": length,
        "sample": sample,
        "seed": seed,
        "protocol": protocol,
        "method": method,
    }


def cell_key(identity: dict[str, Any], task_label: str, method_label: str) -> str:
    """A readable, stable key: task/length/sample/protocol/method, then a hash of the whole identity."""
    return (
        f"{task_label}/{identity['length']}/{identity['sample']}/{identity['protocol']}/{method_label}"
        f"#{stable_hash(identity)}"
    )


# --------------------------------------------------------------------------------------------
# The records file
# --------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: str | None = None  # the incomplete last line, if a crash left one

    @property
    def keys(self) -> set[str]:
        return {record["key"] for record in self.records}


class RecordStore:
    """`records.jsonl` in a results folder: load (repairing a crash's truncated tail) and append."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RECORDS

    def load(self) -> LoadResult:
        if not self.path.is_file():
            return LoadResult()
        data = self.path.read_bytes()
        complete, _, tail = data.rpartition(b"\n")  # no newline at all: everything is the tail
        records = []
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.path}, line {number}, is not valid JSON ({error.msg}) and is not the last line, so it is "
                    "not a crash's truncated write; fix or remove it"
                ) from error
        result = LoadResult(records)
        if tail.strip():
            result.truncated = tail.decode("utf-8", errors="replace")
            self._set_aside(tail, keep=len(data) - len(tail))
        return result

    def _set_aside(self, tail: bytes, keep: int) -> None:
        """Keep a truncated last line in `records.jsonl.truncated` and cut it from the records."""
        with open(self.path.with_name(RECORDS + ".truncated"), "ab") as aside:
            aside.write(tail + b"\n")
        os.truncate(self.path, keep)
        log.info(  # the caller (LoadResult.truncated) says what it means for the run
            "%s ended with an incomplete record (%d bytes, an interrupted write); it was set aside in %s.truncated, "
            "and any cell missing from the records will run again",
            self.path,
            len(tail),
            RECORDS,
        )

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, default=_json_default, ensure_ascii=False) + "\n").encode("utf-8")
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, line)
            if written != len(line):
                raise OSError(f"only {written} of {len(line)} bytes of a record reached {self.path}")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write a whole file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(staging, path)
