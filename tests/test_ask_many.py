"""Compress once, ask many: several questions over one context, each answered from its own copy of one
compressed cache (the query-agnostic protocol), and the multi-question tasks that feed it."""

from __future__ import annotations

import pytest
import torch

import kvmerger.evaluation.runner as runner_module
from kvmerger import attach, compress_prefill, get_method, record_prefill
from kvmerger.evaluation.generation import answer_query_agnostic
from kvmerger.evaluation.records import RecordStore
from kvmerger.evaluation.runner import MethodSpec, Runner, RunSettings, TaskPlan
from kvmerger.evaluation.tasks import get_task
from tests.test_harness import ByteTokenizer, one_thread, tiny  # noqa: F401  (fixtures)


def test_a_fork_continues_independently_of_its_source_and_of_other_forks(tiny):  # noqa: F811
    model, _ = tiny
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    cache, _ = compress_prefill(record_prefill(model, ids), get_method("kvmerger", budget=0.35))
    stored = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    first, second = cache.fork(), cache.fork()
    with torch.no_grad(), attach(model):
        a = model(input_ids=ids[:, :7], cache=first).logits
        model(input_ids=ids[:, 7:20], cache=first)  # first grows further
        b = model(input_ids=ids[:, :7], cache=second).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.get_seq_length() == 80 and second.get_seq_length() == 67 and cache.get_seq_length() == 60
    for layer, (keys, values) in zip(cache.layers, stored):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_multi_question_samples_hold_every_needle_and_ask_each(tiny):  # noqa: F811
    _, tokenizer = tiny
    sample = get_task("passkey", keys=3).samples(tokenizer, 800, 1, 0)[0]
    questions = sample.questions()
    assert len(questions) == 3 and len({q.answers[0] for q in questions}) == 3
    for door, question in zip(("red", "blue", "green"), questions):
        assert f"the {door} door is {question.answers[0]}" in sample.context and door in question.question
    needle = get_task("needle", needles=3).samples(tokenizer, 700, 1, 0)[0]
    assert [q.question.split("do in ")[1].split("?")[0] for q in needle.questions()] == ["San Francisco", "Lisbon", "Kyoto"]
    assert all(q.answers[0] in needle.context for q in needle.questions())
    niah = get_task("ruler-niah", variant="multiquery", ask="separately", chat=False).samples(tokenizer, 1200, 1, 0)[0]
    together = get_task("ruler-niah", variant="multiquery", chat=False).samples(tokenizer, 1200, 1, 0)[0]
    assert [a for q in niah.questions() for a in q.answers] == together.answers  # the same needles, asked one by one
    assert niah.meta["query_keys"] == together.meta["query_keys"]
    for key, question in zip(niah.meta["query_keys"], niah.questions()):
        assert key in question.question and all(other not in question.question for other in niah.meta["query_keys"] if other != key)
    assert all(len(q.answers) == 1 and q.answers[0] in niah.context for q in niah.questions())


def test_compress_once_answers_every_question_from_one_prefill(tiny, tmp_path, monkeypatch):  # noqa: F811
    model, tokenizer = tiny
    prefills = []
    original = runner_module.record_prefill
    monkeypatch.setattr(runner_module, "record_prefill", lambda m, ids, **kw: prefills.append(ids.shape[-1]) or original(m, ids, **kw))
    settings = RunSettings(
        plans=[TaskPlan(get_task("passkey", keys=3), (800,), 2)],
        methods=[MethodSpec("full"), MethodSpec("kvmerger")],
        budgets=[0.35],
        protocols=["query-aware", "query-agnostic"],
    )
    Runner(model, tokenizer, settings, tmp_path, model_name="tiny", progress=False).run()
    records = RecordStore(tmp_path).load().records
    assert len(records) == 2 * 2 * 2  # samples x protocols x variants
    assert len(prefills) == 2 * (3 + 1)  # query-aware: one per question; query-agnostic: one per sample
    for record in records:
        assert len(record["questions"]) == 3
        assert record["score"] == pytest.approx(sum(q["score"] for q in record["questions"]) / 3)
        assert record["prediction"] == record["questions"][0]["prediction"]

    # each question's answer is the one a fresh compressed cache gives it: the forks do not leak
    sample = settings.plans[0].task.samples(tokenizer, 800, 2, 0)[0]
    context = tokenizer(sample.context, return_tensors="pt").input_ids
    prefill = record_prefill(model, context)
    agnostic = next(
        r for r in records if r["protocol"] == "query-agnostic" and r["method"] == "kvmerger" and r["sample"] == 0
    )
    for question, recorded in zip(sample.questions(), agnostic["questions"]):
        cache, _ = compress_prefill(prefill, get_method("kvmerger", budget=0.35))
        ids = tokenizer(question.question, add_special_tokens=False, return_tensors="pt").input_ids
        answer = answer_query_agnostic(model, tokenizer, prefill.last_logits, cache, ids, max_new_tokens=12, stop_strings=("\n", "."))
        assert answer.text == recorded["prediction"]


def test_a_task_with_several_questions_reports_each_in_the_summary(tiny, tmp_path):  # noqa: F811
    from kvmerger.evaluation.report import question_table, summarize

    model, tokenizer = tiny
    settings = RunSettings(
        plans=[TaskPlan(get_task("needle", needles=2), (700,), 1)],
        methods=[MethodSpec("full"), MethodSpec("h2o")],
        budgets=[0.5],
        protocols=["query-agnostic"],
    )
    Runner(model, tokenizer, settings, tmp_path, model_name="tiny", progress=False).run()
    records = RecordStore(tmp_path).load().records
    table = question_table(records)
    assert "question 1" in table and "question 2" in table and "h2o" in table
    assert len(summarize(records)) == 2
