"""RULER's synthetic tasks and the LongBench loader: determinism, sizes, answers, the two protocols."""

import json
import re
from collections import Counter

import pytest
import torch
import yaml

from kvmerger.evaluation.tasks import get_task
from kvmerger.evaluation.tasks.longbench import LongBench, middle_truncation, prompts
from kvmerger.evaluation.tasks.prompting import sample_tokens
from kvmerger.evaluation.tasks.ruler import RULER_CONFIGS, RulerCWE, RulerNIAH, RulerVT, ruler_task
from kvmerger.evaluation.texts import data_path, essays

TARGET = 1500
NIAH_CONFIGS = [name for name in RULER_CONFIGS if name.startswith("niah")]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def ruler_samples(tokenizer):
    """Two samples of every RULER configuration at TARGET tokens, chat template on (the default)."""
    return {name: ruler_task(name).samples(tokenizer, TARGET, 2, seed=5) for name in RULER_CONFIGS}


# -- RULER ---------------------------------------------------------------------------------------


def test_the_configurations_follow_rulers_yaml():
    config = yaml.safe_load(data_path("ruler", "synthetic.yaml").read_text())
    assert set(RULER_CONFIGS) == set(config) - {"qa_1", "qa_2"}
    for name in NIAH_CONFIGS:
        args, task = config[name]["args"], RULER_CONFIGS[name]
        assert (task.haystack, task.key_type, task.value_type) == (
            args["type_haystack"],
            args["type_needle_k"],
            args["type_needle_v"],
        )
        keys, values, queries = args["num_needle_k"], args["num_needle_v"], args["num_needle_q"]
        assert task.counts() == (max(keys, queries), values, queries)  # RULER: num_needle_k = max(k, q)
    assert (RULER_CONFIGS["vt"].num_chains, RULER_CONFIGS["vt"].num_hops) == (1, 4)
    cwe = config["cwe"]["args"]
    ours = RULER_CONFIGS["cwe"]
    assert (ours.common_repeats, ours.uncommon_repeats, ours.common_words) == (cwe["freq_cw"], cwe["freq_ucw"], cwe["num_cw"])
    assert RULER_CONFIGS["fwe"].alpha == config["fwe"]["args"]["alpha"]


@pytest.mark.parametrize("config", list(RULER_CONFIGS))
def test_ruler_prompts_are_sized_to_the_target_with_the_models_tokenizer(tokenizer, ruler_samples, config):
    for sample in ruler_samples[config]:
        size = sample_tokens(tokenizer, sample)
        assert size == sample.meta["prompt_tokens"]
        if config in ("cwe", "fwe"):  # whole list entries of up to ~8 tokens; never over the target
            assert TARGET - 8 <= size <= TARGET
        else:  # the haystack is cut at a token boundary
            assert abs(size - TARGET) <= 2


@pytest.mark.parametrize("config", ["niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_plain_prompts_without_chat_template_are_sized_too(tokenizer, config):
    sample = ruler_task(config, chat=False).samples(tokenizer, 2500, 1, seed=1)[0]
    assert 2500 - 8 <= sample_tokens(tokenizer, sample) <= 2502
    assert "<|im_start|>" not in sample.context + sample.question


def test_ruler_samples_are_deterministic_for_a_seed(tokenizer, ruler_samples):
    for name in ("niah_multiquery", "vt", "cwe", "fwe"):
        again = ruler_task(name).samples(tokenizer, TARGET, 2, seed=5)
        assert again == ruler_samples[name]
        other = ruler_task(name).samples(tokenizer, TARGET, 2, seed=6)
        assert [s.context for s in other] != [s.context for s in again]
    # each sample has its own seed: asking for fewer gives the first ones unchanged
    assert ruler_task("niah_single_2").samples(tokenizer, TARGET, 1, seed=5) == ruler_samples["niah_single_2"][:1]
    assert ruler_samples["niah_single_2"][0].answers != ruler_samples["niah_single_2"][1].answers


@pytest.mark.parametrize("config", list(RULER_CONFIGS))
def test_every_answer_is_in_the_context(ruler_samples, config):
    for sample in ruler_samples[config]:
        assert sample.answers and all(answer in sample.context for answer in sample.answers)
        assert sample.meta["config"] == config


@pytest.mark.parametrize("config", list(RULER_CONFIGS))
def test_the_question_comes_after_the_haystack_in_the_models_chat_template(tokenizer, ruler_samples, config):
    sample = ruler_samples[config][0]
    assert sample.context.startswith("<|im_start|>system")
    assert sample.question.startswith("\nQuestion:" if config in ("vt", "cwe", "fwe") else "\nWhat")
    answer_prefix = sample.question.split("<|im_start|>assistant\n")[-1]
    assert answer_prefix.startswith(" Answer:" if config in ("vt", "cwe", "fwe") else " The special magic")
    assert "<|im_start|>assistant" not in sample.context.split("<|im_start|>user")[-1]
    # the split survives the template: rendering the user message whole gives the same text
    user = sample.context.split("<|im_start|>user\n")[-1] + sample.question.split("<|im_end|>")[0]
    history = chat_turns_before_last(sample.context)  # cwe's worked example is a turn of its own
    rendered = tokenizer.apply_chat_template(
        [*history, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert rendered + answer_prefix == sample.context + sample.question


def chat_turns_before_last(context: str) -> list[dict[str, str]]:
    turns = re.findall(r"<\|im_start\|>(user|assistant)\n(.*?)<\|im_end\|>", context, flags=re.S)
    return [{"role": role, "content": content} for role, content in turns]


def test_niah_query_aware_and_agnostic_split(ruler_samples):
    sample = ruler_samples["niah_single_2"][0]
    key = sample.meta["query_keys"][0]
    needle = f"One of the special magic numbers for {key} is: {sample.answers[0]}."
    assert needle in sample.context  # inline in the essay text, as RULER does
    assert key in sample.question and sample.answers[0] not in sample.question
    assert "What is the special magic number" not in sample.context
    assert sample.question.endswith(f"The special magic number for {key} mentioned in the provided text is")
    assert sample.context.split("<|im_start|>user\n")[1].startswith("A special magic number is hidden")


def test_niah_variants_place_and_ask_the_right_needles(ruler_samples):
    needle = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")
    multikey = ruler_samples["niah_multikey_1"][0]
    found = needle.findall(multikey.context)
    assert len(found) == 4 and len({k for k, _ in found}) == 4 and len(multikey.answers) == 1
    assert dict(found)[multikey.meta["query_keys"][0]] == multikey.answers[0]

    multivalue = ruler_samples["niah_multivalue"][0]
    found = needle.findall(multivalue.context)
    assert len(found) == 4 and {k for k, _ in found} == set(multivalue.meta["query_keys"])
    assert sorted(v for _, v in found) == sorted(multivalue.answers)
    assert "What are all the special magic numbers for" in multivalue.question

    multiquery = ruler_samples["niah_multiquery"][0]
    found = dict(needle.findall(multiquery.context))
    keys = multiquery.meta["query_keys"]
    assert len(found) == 4 and [found[k] for k in keys] == multiquery.answers
    assert f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}" in multiquery.question

    distractors = ruler_samples["niah_multikey_2"][0]
    lines = [line for line in distractors.context.split("\n") if needle.fullmatch(line)]
    assert len(lines) > 20 and sum(distractors.meta["query_keys"][0] in line for line in lines) == 1

    uuids = ruler_samples["niah_multikey_3"][0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids.answers[0])


def test_niah_keys_are_pairs_of_essay_words(ruler_samples):
    key = ruler_samples["niah_single_1"][0].meta["query_keys"][0]
    first, second = key.split("-")
    assert first != second and all(re.search(rf"\b{word}\b", essays()) for word in (first, second))


def test_vt_chain_is_scattered_in_noise_after_a_worked_example(ruler_samples):
    sample = ruler_samples["vt"][0]
    names, value = sample.answers, sample.meta["value"]
    assert len(names) == 5 and value in sample.question
    task_part = sample.context.split("Memorize and track")[-1]
    assert f"VAR {names[0]} = {value}" in task_part
    for previous, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {previous} " in task_part
    assert "The grass is green." in task_part
    example = sample.context.split("Memorize and track")[1]
    assert re.search(r"5 variables are assgined the value \d{5}, they are:  [A-Z]{3}( [A-Z]{3}){4}\n", example)


def test_vt_in_essays_places_the_chain_in_order_between_sentences(tokenizer):
    sample = RulerVT(haystack="essay").samples(tokenizer, TARGET, 1, seed=2)[0]
    task_part = sample.context.split("Memorize and track")[-1]
    names = sample.answers
    places = [task_part.index(f"VAR {names[0]} = {sample.meta['value']}.")]
    places += [task_part.index(f"VAR {name} = VAR {previous}.") for previous, name in zip(names, names[1:])]
    assert places == sorted(places) and abs(sample_tokens(tokenizer, sample) - TARGET) <= 2


def test_cwe_answers_are_the_most_common_words_of_the_list(ruler_samples):
    sample = ruler_samples["cwe"][0]
    listed = sample.context.split("<|im_start|>user\n")[-1].split("\n")[1]
    counts = Counter(re.findall(r"\d+\. (\w+)", listed))
    assert {word for word, _ in counts.most_common(10)} == set(sample.answers)
    rest = max(n for word, n in counts.items() if word not in sample.answers)
    assert min(counts[word] for word in sample.answers) > rest
    assert "1. " in sample.context.split("<|im_start|>assistant\n")[1]  # the example's answer


def test_cwe_follows_rulers_repeats_on_each_side_of_4096_tokens(tokenizer):
    for target, (common, uncommon) in ((2048, (6, 1)), (4200, (30, 3))):
        sample = RulerCWE(chat=False).samples(tokenizer, target, 1, seed=0)[0]
        listed = sample.context.split("\n")[-1]
        counts = Counter(re.findall(r"\d+\. (\w+)", listed))
        dropped = sample.meta["dropped"]
        assert all(common - dropped <= counts[word] <= common for word in sample.answers)
        assert max(n for word, n in counts.items() if word not in sample.answers) == uncommon


def test_fwe_answers_are_the_second_to_fourth_most_frequent_words(ruler_samples):
    sample = ruler_samples["fwe"][0]
    text = sample.context.split("Find the three most frequently appeared coded words. ")[1]
    ranked = [word for word, _ in Counter(text.split()).most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == sample.answers


def test_ruler_score_is_string_match_all(ruler_samples):
    sample = ruler_samples["niah_multivalue"][0]
    task = RULER_CONFIGS["niah_multivalue"]
    assert task.score(" " + ", ".join(sample.answers) + ".", sample) == 1.0
    assert task.score(f"{sample.answers[0]}\t{sample.answers[1]}", sample) == 0.5
    assert task.score("I do not know.", sample) == 0.0


def test_ruler_tasks_are_registered_and_check_their_fields():
    assert isinstance(get_task("ruler-niah", variant="multiquery"), RulerNIAH)
    for name in ("ruler-vt", "ruler-cwe", "ruler-fwe"):
        assert get_task(name).generation_length() > 0
    with pytest.raises(ValueError, match="variant"):
        get_task("ruler-niah", variant="many")
    with pytest.raises(ValueError, match="haystack"):
        get_task("ruler-vt", haystack="needle")
    with pytest.raises(ValueError, match="config"):
        ruler_task("qa_1")


def test_a_target_too_small_for_the_task_is_refused(tokenizer):
    with pytest.raises(ValueError, match="too small"):
        get_task("ruler-vt").samples(tokenizer, 300, 1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        get_task("ruler-niah").samples(tokenizer, 100, 1, seed=0)


@pytest.mark.model
def test_the_full_cache_solves_an_easy_niah_single_at_1k_tokens(default_model):
    model, tokenizer = default_model
    task = ruler_task("niah_single_1")
    sample = task.samples(tokenizer, 1024, 1, seed=0)[0]
    ids = tokenizer(sample.context + sample.question, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert task.score(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), sample) == 1.0


# -- LongBench -----------------------------------------------------------------------------------


def longbench_row(context: str, question: str, answers: list[str], dataset: str, **extra) -> dict:
    """A row in LongBench's official schema."""
    return {
        "input": question,
        "context": context,
        "answers": answers,
        "length": len(context.split()),
        "dataset": dataset,
        "language": "en",
        "all_classes": extra.get("all_classes"),
        "_id": extra.get("_id", "0" * 48),
    }


def write_rows(folder, dataset: str, rows: list[dict]) -> None:
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n"
    (folder / f"{dataset}.jsonl").write_text(text, encoding="utf-8")


@pytest.fixture
def longbench_dir(tmp_path):
    hotpot = "hotpotqa"
    long_text = essays()[:30000]
    write_rows(
        tmp_path,
        hotpot,
        [
            longbench_row("Passage 1:\nParis is the capital of France.", "What is the capital of France?", ["Paris"], hotpot),
            longbench_row(long_text, "Who wrote these essays?", ["Paul Graham"], hotpot),
            longbench_row("Passage 1:\nRome.", "Which city?", ["Rome"], hotpot),
        ],
    )
    classes = ["Location", "Person", "Other location"]
    examples = "Question: Who was the first president?\nType: Person"
    trec = longbench_row(examples, "Question: Where is Lyon?\nType:", ["Location"], "trec", all_classes=classes)
    write_rows(tmp_path, "trec", [trec])
    paragraphs = longbench_row("Paragraph 1: a.\n\nParagraph 2: b.", "", ["2"], "passage_count")
    write_rows(tmp_path, "passage_count", [paragraphs])
    code = "def f(x):\n    return x\n" * 2000
    write_rows(tmp_path, "repobench-p", [longbench_row("# a.py\nX = 1\n", code, ["y = f(1)"], "repobench-p")])
    return tmp_path


def test_longbench_uses_the_official_prompt_and_splits_after_the_context(tokenizer, longbench_dir):
    task = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir), chat=False)
    sample = task.samples(tokenizer, 3500, 1, seed=0)[0]
    row = task.rows()[0]
    assert sample.context + sample.question == prompts()["hotpotqa"].format(**row)
    assert sample.context.endswith(row["context"])
    assert sample.question == (
        "\n\nAnswer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nQuestion: What is the capital of France?\nAnswer:"
    )
    assert sample.answers == ["Paris"] and not sample.meta["truncated"]


def test_longbench_chat_template_follows_the_official_exceptions(tokenizer, longbench_dir):
    assert LongBench(dataset="hotpotqa").chat and LongBench(dataset="gov_report_e").chat
    plain_tasks = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
    assert not any(LongBench(dataset=name).chat for name in plain_tasks)
    sample = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir)).samples(tokenizer, 3500, 1, seed=0)[0]
    plain = prompts()["hotpotqa"].format(**LongBench(dataset="hotpotqa", data_dir=str(longbench_dir)).rows()[0])
    messages = [{"role": "user", "content": plain}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert sample.context + sample.question == rendered
    assert sample.question.startswith("\n\nAnswer the question") and sample.question.endswith("<|im_start|>assistant\n")


def test_longbench_cuts_long_prompts_in_the_middle(tokenizer, longbench_dir):
    task = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir), chat=False)
    row = task.rows()[1]
    full = prompts()["hotpotqa"].format(**row)
    ids = tokenizer(full).input_ids
    assert len(ids) > 3000
    sample = task.samples(tokenizer, 1001, 2, seed=0)[1]
    first, last = tokenizer.decode(ids[:500]), tokenizer.decode(ids[-500:])
    assert sample.context + sample.question == first + last == "".join(middle_truncation(tokenizer, ids, 1001))
    assert sample.meta["truncated"] and not sample.meta["question_cut"]
    assert sample.context.startswith("Answer the question based on the given passages.")
    assert sample.question.endswith("Question: Who wrote these essays?\nAnswer:")
    assert row["context"][:1000] in sample.context and row["context"][-1000:] in sample.context
    assert row["context"][len(row["context"]) // 2 : len(row["context"]) // 2 + 200] not in sample.context
    assert len(tokenizer(sample.context + sample.question).input_ids) <= 1001 + 2


def test_longbench_marks_a_question_cut_by_the_truncation(tokenizer, longbench_dir):
    task = LongBench(dataset="repobench-p", data_dir=str(longbench_dir))
    sample = task.samples(tokenizer, 600, 1, seed=0)[0]
    ids = tokenizer(prompts()["repobench-p"].format(**task.rows()[0])).input_ids
    first, last = middle_truncation(tokenizer, ids, 600)
    assert sample.meta["question_cut"] and (sample.context, sample.question) == (first, last)
    assert not task.chat and sample.question.endswith("Next line of code:\n")


def test_longbench_generation_lengths_and_scores(tokenizer, longbench_dir):
    assert LongBench(dataset="hotpotqa").generation_length() == 32
    assert LongBench(dataset="gov_report").max_new_tokens == 512
    assert LongBench(dataset="lcc_e").generation_length() == 64
    assert LongBench(dataset="samsum").stop_strings == ("\n",) and LongBench(dataset="qmsum").stop_strings == ()

    hotpot = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir))
    sample = hotpot.samples(tokenizer, 3500, 1, seed=0)[0]
    assert hotpot.score("Paris", sample) == 1.0
    assert hotpot.score("The city of Paris", sample) == pytest.approx(0.5)  # "city of paris" vs "paris"

    trec = LongBench(dataset="trec", data_dir=str(longbench_dir))
    sample = trec.samples(tokenizer, 3500, 1, seed=0)[0]
    assert sample.meta["all_classes"] == ["Location", "Person", "Other location"]
    assert trec.score("\nLocation\nPerson", sample) == 1.0  # only the first line counts
    assert trec.score("Person", sample) == 0.0

    count = LongBench(dataset="passage_count", data_dir=str(longbench_dir))
    sample = count.samples(tokenizer, 3500, 1, seed=0)[0]
    assert count.score("2", sample) == 1.0 and count.score("2 or 3", sample) == 0.5


def test_longbench_reads_rows_in_file_order_or_a_seeded_subset(tokenizer, longbench_dir):
    first = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir)).samples(tokenizer, 3500, 2, seed=0)
    assert [s.meta["row"] for s in first] == [0, 1]
    everything = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir)).samples(tokenizer, 3500, 10, seed=0)
    assert [s.meta["row"] for s in everything] == [0, 1, 2]
    subset = LongBench(dataset="hotpotqa", data_dir=str(longbench_dir), random_subset=True)
    rows = [s.meta["row"] for s in subset.samples(tokenizer, 3500, 2, seed=3)]
    assert rows == sorted(rows) and rows == [s.meta["row"] for s in subset.samples(tokenizer, 3500, 2, seed=3)]


def test_longbench_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    task = LongBench(dataset="qasper", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        task.rows()
    message = str(error.value)
    assert str(tmp_path) in message and "qasper.jsonl" in message and "data.zip" in message


def test_longbench_without_a_folder_says_where_to_get_the_files_and_never_asks_the_hub(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("kvmerger must not download LongBench")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    task = LongBench(dataset="hotpotqa")  # building it needs no data (its settings are known)
    for read in (task.check_data, task.rows):
        with pytest.raises(FileNotFoundError, match=r"does not download.*data\.zip.*--data-dir"):
            read()


def test_longbench_rejects_rows_outside_the_schema_and_unknown_datasets(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"hotpotqa.jsonl:1 lacks .*context"):
        LongBench(dataset="hotpotqa", data_dir=str(tmp_path)).rows()
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        LongBench(dataset="hotpot")


def test_chinese_metrics_need_jieba():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="jieba"):
            LongBench(dataset="dureader")
    else:
        assert LongBench(dataset="dureader").chat
