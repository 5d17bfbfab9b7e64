"""Needle, pass-key and language-modelling tasks: deterministic, sized to the target with the default
tokenizer, the needle where it was asked for, the answers in the context; scoring against hand-computed
cases."""

import math

import pytest
import torch

from kvmerger.evaluation.generation import cut_at_stop
from kvmerger.evaluation.tasks import get_task
from kvmerger.evaluation.tasks.language_modeling import LanguageModeling
from kvmerger.evaluation.tasks.needle import ANSWER, NEEDLE, evenly_spaced_depths, insert_at_depth
from kvmerger.evaluation.tasks.passkey import passkey_sample


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def prompt_tokens(tokenizer, sample) -> int:
    return len(tokenizer(sample.context + sample.question, add_special_tokens=False).input_ids)


def token_offset(tokenizer, text: str, fragment: str) -> int:
    """Tokens of `text` before `fragment` starts."""
    return len(tokenizer(text[: text.index(fragment)], add_special_tokens=False).input_ids)


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["passkey", "needle"])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [512, 1536])
def test_prompts_are_within_a_few_tokens_of_the_target(tokenizer, name, chat, length):
    for sample in get_task(name, chat=chat).samples(tokenizer, length, 3, seed=0):
        assert abs(prompt_tokens(tokenizer, sample) - length) <= 3


def test_language_modelling_windows_have_exact_sizes(tokenizer):
    task = LanguageModeling(continuation=64)
    windows = task.samples(tokenizer, 700, 4, seed=0)
    assert [w.meta["source"] for w in windows] == ["essays", "shakespeare", "essays", "shakespeare"]
    for window in windows:
        assert len(window.prefix_ids) == 700
        assert len(window.continuation_ids) == 65
        assert window.fed.shape == window.targets.shape == (1, 64)
        assert window.targets[0, :-1].tolist() == window.fed[0, 1:].tolist()  # targets are the next tokens
    assert len({w.meta["offset"] for w in windows}) == 4


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["passkey", "needle", "lm"])
def test_samples_are_deterministic_for_a_seed(tokenizer, name):
    task = get_task(name)
    first = task.samples(tokenizer, 512, 3, seed=5)
    again = task.samples(tokenizer, 512, 3, seed=5)
    assert first == again


def test_pass_keys_and_lm_windows_change_with_the_seed(tokenizer):
    keys = {s.answers[0] for seed in (0, 1) for s in get_task("passkey").samples(tokenizer, 512, 3, seed)}
    assert len(keys) == 6
    offsets = {w.meta["offset"] for seed in (0, 1) for w in get_task("lm").samples(tokenizer, 512, 2, seed)}
    assert len(offsets) == 4


def test_the_demo_pass_key_is_unchanged(tokenizer):
    """kvmerger demo and tests/test_default_model.py use passkey_sample directly."""
    sample = passkey_sample(tokenizer, 1500, depth=0.5, seed=0)
    assert sample.answers == ["60494"] and sample.meta["depth"] == 0.5
    assert abs(prompt_tokens(tokenizer, sample) - 1500) <= 3


# -- where the needle is -------------------------------------------------------------------


def test_evenly_spaced_depths():
    assert evenly_spaced_depths(1) == [0.5]
    assert evenly_spaced_depths(3) == [0.0, 0.5, 1.0]
    assert evenly_spaced_depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="at least 1"):
        evenly_spaced_depths(0)


@pytest.mark.parametrize("length", [512, 2048])
def test_the_needle_sits_at_its_depth_moved_back_to_a_sentence_end(tokenizer, length):
    samples = get_task("needle").samples(tokenizer, length, 5, seed=0)
    for sample in samples:
        depth = sample.meta["depth"]
        assert sample.context.count(NEEDLE) == 1
        haystack_tokens = len(tokenizer(sample.context.replace(NEEDLE + " ", ""), add_special_tokens=False).input_ids)
        at = token_offset(tokenizer, sample.context, NEEDLE)
        # at or before the asked depth, by less than one sentence (the essays' sentences are < 80 tokens)
        assert depth * haystack_tokens - 80 <= at <= depth * haystack_tokens + 2
        before = sample.context[: sample.context.index(NEEDLE)]
        assert before == "" or before.endswith((". ", ".\n", "? ", "?\n", "! ", "!\n"))
    assert samples[0].context.startswith(NEEDLE)


def test_pass_keys_sit_at_their_depth_as_their_own_paragraph(tokenizer):
    for sample in get_task("passkey").samples(tokenizer, 1024, 4, seed=3):
        key = sample.answers[0]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert f"\n\n{needle}\n\n" in sample.context
        assert sample.context.count(key) == 2 and key not in sample.question
        at = token_offset(tokenizer, sample.context, needle)
        assert sample.meta["depth"] * 1024 - 100 <= at <= sample.meta["depth"] * 1024 + 5


def test_insert_at_depth_on_a_hand_made_text(tokenizer):
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    assert insert_at_depth(tokenizer, text, "NEEDLE.", 0.0, paragraph=False).startswith("NEEDLE. One two")
    middle = insert_at_depth(tokenizer, text, "NEEDLE.", 0.5, paragraph=False)
    assert middle == "One two three. Four five six. NEEDLE. Seven eight nine. Ten eleven twelve."
    apart = insert_at_depth(tokenizer, text, "NEEDLE.", 0.5, paragraph=True)
    assert apart == "One two three. Four five six.\n\nNEEDLE.\n\nSeven eight nine. Ten eleven twelve."
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        insert_at_depth(tokenizer, text, "NEEDLE.", 1.5, paragraph=False)


# -- answers and scores ---------------------------------------------------------------------


def test_answers_are_in_the_context(tokenizer):
    needle = get_task("needle").samples(tokenizer, 512, 2, seed=0)
    assert all(ANSWER in sample.context for sample in needle)
    chat = get_task("needle", chat=True).samples(tokenizer, 512, 1, seed=0)[0]
    assert ANSWER in chat.context and chat.question.rstrip().endswith("San Francisco is")
    assert "<|im_start|>assistant" in chat.question
    for sample in get_task("passkey", chat=True).samples(tokenizer, 512, 2, seed=0):
        assert sample.answers[0] in sample.context and "<|im_start|>assistant" in sample.question


def test_needle_score_is_the_recall_of_the_needles_content_words(tokenizer):
    task = get_task("needle")
    sample = task.samples(tokenizer, 512, 1, seed=0)[0]
    # content words: eat, sandwich, sit, dolores, park, sunny, day
    assert task.score(" eat a sandwich and sit in Dolores Park on a sunny day", sample) == 1.0
    assert task.score(" eat a sandwich", sample) == pytest.approx(2 / 7)
    assert task.score(" to go to the Golden Gate Bridge", sample) == 0.0


def test_pass_key_score_is_whether_the_key_is_in_the_answer(tokenizer):
    task = get_task("passkey")
    sample = task.samples(tokenizer, 512, 1, seed=0)[0]
    assert task.score(f" {sample.answers[0]}", sample) == 1.0
    assert task.score(" 12345", sample) == 0.0


def test_language_modelling_metrics_against_a_hand_computed_case():
    # vocabulary of 2. Position 1: the reference gives p = (1/4, 3/4), the compressed cache
    # q = (e/(1+e), 1/(1+e)); position 2: both give (1/(1+e), e/(1+e)).
    reference = torch.tensor([[[0.0, math.log(3.0)], [0.0, 1.0]]])
    compressed = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[0, 1]])
    metrics = LanguageModeling.measure(reference, compressed, targets)
    q = math.e / (1 + math.e)
    kl_first = 0.25 * math.log(0.25 / q) + 0.75 * math.log(0.75 / (1 - q))
    assert metrics["kl"] == pytest.approx(kl_first / 2, abs=1e-6)
    nll = -(math.log(q) + math.log(q)) / 2  # target 0 at position 1, target 1 at position 2: both have q
    assert metrics["nll"] == pytest.approx(nll, abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll), abs=1e-5)
    assert metrics["top1_agreement"] == 0.5  # position 1: 1 vs 0; position 2: 1 vs 1


def test_language_modelling_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sources"):
        LanguageModeling(sources=("poems",))
    with pytest.raises(ValueError, match="continuation"):
        LanguageModeling(continuation=0)


def test_stop_strings_cut_the_answer_after_its_leading_whitespace():
    assert cut_at_stop(" 60494.\n", (".", "\n")) == " 60494"
    assert cut_at_stop("\n\n eat a sandwich and\nsit in Dolores Park.", (".", "\n\n")) == "\n\n eat a sandwich and\nsit in Dolores Park"
    assert cut_at_stop(" eat a sandwich", (".",)) is None


def bos_char_tokenizer():
    """A character-level tokenizer that puts <bos> before every text, as Gemma's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"[UNK]": 0, "<bos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", unk_token="[UNK]")


def test_language_modelling_windows_begin_with_the_tokens_the_tokenizer_puts_first(tokenizer):
    from kvmerger.evaluation.texts import leading_special_ids

    assert leading_special_ids(tokenizer) == []  # the default model's tokenizer puts none
    with_bos = bos_char_tokenizer()
    assert leading_special_ids(with_bos) == [1]
    for window in LanguageModeling(continuation=8).samples(with_bos, 50, 2, seed=0):
        assert len(window.prefix_ids) == 50 and len(window.continuation_ids) == 9
        assert window.prefix_ids[0] == 1 and 1 not in window.prefix_ids[1:] + window.continuation_ids
