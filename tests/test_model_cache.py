"""The converted-model cache: one folder per GGUF content, shared by every checkout, listed and cleared
by `kvmerger cache`. Every test here uses its own temporary cache ($KVMERGER_CACHE), never the user's."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import kvmerger.cli.main as cli_main
import kvmerger.models
from kvmerger import model_cache
from kvmerger.models import converted_gguf, load_model
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KVMERGER_CACHE", str(folder))
    return folder


@pytest.fixture
def two_clones(tmp_path):
    """The same GGUF file in two checkouts (a copy, with its own path and modification time)."""
    first = write_tiny_gguf(tmp_path / "clone-a" / ".venv" / "model.gguf")
    second = tmp_path / "clone-b" / ".venv" / "other-name.gguf"
    second.parent.mkdir(parents=True)
    shutil.copyfile(first, second)
    os.utime(second, ns=(1_000_000_000, 1_000_000_000))
    return first, second


def test_two_clones_share_one_converted_model(cache, two_clones, monkeypatch):
    """The real conversion runs once; the second clone's load finds the folder by content and reuses it."""
    first, second = two_clones
    conversions = []
    real_convert = kvmerger.models._convert

    def counted(gguf, target):
        conversions.append(gguf)
        real_convert(gguf, target)

    monkeypatch.setattr(kvmerger.models, "_convert", counted)

    model_a, tokenizer_a = load_model(first)
    model_b, _ = load_model(second)
    assert conversions == [first]
    folders = [entry for entry in model_cache.entries()]
    assert len(folders) == 1 and folders[0].state == "ready"
    assert folders[0].path == converted_gguf(first) == converted_gguf(second)
    assert folders[0].path.name == "gguf-" + model_cache.file_sha256(first)[:16]
    assert folders[0].sources == [str(first.resolve()), str(second.resolve())]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all((state_a[name] == state_b[name]).all() for name in state_a)
    assert tokenizer_a("hello").input_ids


def test_a_changed_file_gets_its_own_folder(cache, tmp_path):
    one = write_tiny_gguf(tmp_path / "one.gguf", seed=0)
    other = write_tiny_gguf(tmp_path / "two.gguf", seed=1)
    assert model_cache.converted_folder(one) != model_cache.converted_folder(other)


def test_the_hash_is_computed_once_per_file_version(cache, tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "model.gguf")
    digest = model_cache.file_sha256(gguf)
    index = json.loads((cache / model_cache.HASH_INDEX).read_text())
    assert index[str(gguf.resolve())]["sha256"] == digest

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again although the file did not change")

    with monkeypatch.context() as patch:
        patch.setattr(model_cache.hashlib, "sha256", no_hashing)
        assert model_cache.file_sha256(gguf) == digest
    os.utime(gguf, ns=(2_000_000_000, 2_000_000_000))  # touched: hashed again, same content, same key
    assert model_cache.file_sha256(gguf) == digest


def test_cache_command_lists_and_clears(cache, two_clones, capsys):
    first, second = two_clones
    converted_gguf(first)
    converted_gguf(second)
    stale = model_cache.models_dir() / "model-cdd9e950bd39"  # a folder of the older, path-keyed layout
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert cli_main.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(model_cache.models_dir()) in out and "ready" in out and "older layout  (stale)" in out
    assert str(first.resolve()) in out and str(second.resolve()) in out
    assert cli_main.main(["cache", "clear", "--stale"]) == 0
    assert "removed 1 folder" in capsys.readouterr().out
    assert [entry.state for entry in model_cache.entries()] == ["ready"]
    assert cli_main.main(["cache", "clear"]) == 0
    assert model_cache.entries() == [] and not (cache / model_cache.HASH_INDEX).exists()
