"""`kvmerger generate` end to end: on a tiny GGUF model (converted in a temporary cache) it answers
exactly as plain `model.generate()` with the full cache under both protocols, feeds the prompt once,
uses the chat template by default, handles a one-token prompt and decodes a compressed cache as the
evaluation harness does; on the real model, the README's examples print the answers the README shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import kvmerger.cli.main as cli_main
import kvmerger.models
from kvmerger.cli.generate import answer, build_prompt
from kvmerger.engine.session import compress_prefill, record_prefill
from kvmerger.evaluation.generation import answer_query_aware, stop_token_ids
from kvmerger.methods import FullCache, get_method
from kvmerger.models import load_model
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "the sea was calm and the boats came home early; "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GGUF file, converted once into a temporary cache, and the model loaded from it."""
    folder = tmp_path_factory.mktemp("tiny-generate")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVMERGER_CACHE", str(folder / "cache"))
    gguf = write_tiny_gguf(folder / "tiny.gguf")
    model, tokenizer = load_model(gguf)
    yield gguf, model, tokenizer
    patch.undo()


def run(argv: list[str], capsys) -> tuple[str, str]:
    assert cli_main.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def answer_line(out: str) -> str:
    return out.split("\n\n[")[0]


def plain_generate(model, tokenizer, text: str, new_tokens: int) -> str:
    ids = tokenizer(text, return_tensors="pt").input_ids
    eos = sorted(stop_token_ids(model, tokenizer))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_full_cache_answers_exactly_as_plain_generation_without_a_question(tiny, protocol, capsys):
    """The query-agnostic path used to feed a prompt without a question twice (issue 17)."""
    gguf, model, tokenizer = tiny
    prompt = CONTEXT * 3
    out, err = run(
        ["generate", "--model", str(gguf), "--prompt", prompt, "--method", "full", "--protocol", protocol,
         "--no-chat", "--max-new-tokens", "12"],
        capsys,
    )  # fmt: skip
    tokens = tokenizer(prompt, return_tensors="pt").input_ids.shape[1]
    assert answer_line(out) == plain_generate(model, tokenizer, prompt, 12)
    assert f"[full@1, {protocol}, plain text] prompt {tokens} tokens\n" in out
    assert "prefill and compression of" in err


def test_the_prompt_is_fed_once(tiny):
    gguf, model, tokenizer = tiny
    seen = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    try:
        result = answer(model, tokenizer, FullCache(), CONTEXT, "", "query-agnostic", 6)
    finally:
        hook.remove()
    assert sum(seen) == result.prompt_tokens + result.new_tokens - 1  # the last new token is never fed
    assert seen[0] == result.prompt_tokens


def test_a_question_after_the_context_under_both_protocols(tiny, capsys):
    gguf, model, tokenizer = tiny
    base = ["generate", "--model", str(gguf), "--prompt", CONTEXT * 4, "--question", "who came home?"]
    base += ["--max-new-tokens", "8"]
    aware, _ = run([*base, "--method", "full"], capsys)
    agnostic, _ = run([*base, "--method", "full", "--protocol", "query-agnostic"], capsys)
    context, question = build_prompt(tokenizer, CONTEXT * 4, "who came home?", chat=True)
    expected = plain_generate(model, tokenizer, context + question, 8)
    assert answer_line(aware) == answer_line(agnostic) == expected  # the full cache: the protocol changes nothing
    compressed, _ = run([*base, "--method", "h2o", "--budget", "0.5", "--protocol", "query-agnostic"], capsys)
    question_tokens = len(tokenizer(question, add_special_tokens=False).input_ids)
    assert f"of which {question_tokens} question tokens fed after compression" in compressed
    ratio = float(re.search(r"cache after prefill: .*\(([\d.]+)%\)", compressed).group(1))
    assert 50.0 <= ratio < 52.0  # ceil(T / 2) slots of T


def test_the_chat_template_is_used_by_default_and_can_be_turned_off(tiny, capsys):
    gguf, _, _ = tiny
    base = ["generate", "--model", str(gguf), "--prompt", CONTEXT, "--max-new-tokens", "2"]
    assert "chat template] prompt" in run(base, capsys)[0]
    assert "plain text] prompt" in run([*base, "--no-chat"], capsys)[0]


def test_a_one_token_prompt_answers_and_says_nothing_was_compressed(tiny, capsys):
    gguf, model, tokenizer = tiny
    assert tokenizer("x", return_tensors="pt").input_ids.shape[1] == 1
    out, _ = run(["generate", "--model", str(gguf), "--prompt", "x", "--no-chat", "--max-new-tokens", "4"], capsys)
    assert "prompt 1 tokens" in out and "nothing compressed (a one-token prompt" in out
    assert answer_line(out) == plain_generate(model, tokenizer, "x", 4)


@pytest.mark.parametrize("name", ["h2o", "kvmerger"])
def test_a_compressed_answer_is_the_evaluation_harness_answer(tiny, name):
    """Compressing online during the prefill and decoding with generate() gives the tokens the harness
    gives from its offline compression of the same prompt."""
    _, model, tokenizer = tiny
    method = get_method(name, budget=0.5)
    prompt = CONTEXT * 6
    result = answer(model, tokenizer, method, prompt, "", "query-aware", 10)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    prefill = record_prefill(model, ids)
    cache, _ = compress_prefill(prefill, method)
    expected = answer_query_aware(model, tokenizer, prefill.last_logits, cache, max_new_tokens=10)
    assert result.text == expected.text and result.report.memory_ratio == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------


def readme_generate_examples() -> list[tuple[str, str]]:
    """(command, answer) pairs of the README's generate examples: a ```bash block with the command,
    then a ```text block whose first line is the answer it prints."""
    readme = (ROOT / "README.md").read_text()
    pairs = re.findall(r"```bash\n(kvmerger generate [^\n]*)\n```\n+```text\n([^\n]*)\n", readme)
    assert pairs, "README.md shows no generate example with its output"
    return pairs


@pytest.fixture
def loaded_once(default_model, monkeypatch):
    """The command line's model loading answered with the session's default model (loaded once per run)."""
    monkeypatch.setattr(kvmerger.models, "load_model", lambda *args, **kwargs: default_model)
    return default_model


@pytest.mark.model
def test_the_readme_generate_examples_print_the_answers_the_readme_shows(loaded_once, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for command, shown in readme_generate_examples():
        out, _ = run(shlex.split(command)[1:], capsys)
        assert answer_line(out) == shown, command


@pytest.mark.model
def test_query_agnostic_without_a_question_is_plain_generation_on_the_real_model(loaded_once, capsys):
    model, tokenizer = loaded_once
    prompt = "The lighthouse keeper climbed the stairs every evening and"
    out, _ = run(
        ["generate", "--prompt", prompt, "--method", "full", "--protocol", "query-agnostic", "--no-chat",
         "--max-new-tokens", "12", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert answer_line(out) == plain_generate(model, tokenizer, prompt, 12)
