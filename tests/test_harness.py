"""The evaluation runner on a tiny random model with a byte tokenizer: one prefill per sample and
protocol, resume after an interruption (in process, and `kvmerger eval` killed with SIGKILL) without
redoing or losing cells, a crash's truncated last line, provenance in every record, and the summary CSV
and report computed from the records."""

from __future__ import annotations

import csv
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kvmerger.evaluation.runner as runner_module
from kvmerger.evaluation.records import RecordStore
from kvmerger.evaluation.report import kl_tail_table, summarize, write_outputs
from kvmerger.evaluation.runner import MethodSpec, Runner, RunSettings, TaskPlan, method_label
from kvmerger.evaluation.tasks import get_task
from tests.conftest import build_tiny

REPOSITORY = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256), id 0 as end of sequence: enough for the tasks."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None, verbose=False):
        ids = list(text.encode("utf-8"))
        return _Encoding(torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i != 0 or not skip_special_tokens).decode("utf-8", errors="replace")


class _Encoding:
    def __init__(self, input_ids):
        self.input_ids = input_ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's operations are microseconds long: with several threads, synchronising them
    costs more than the work, and on a busy machine ten times more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("llama", vocab_size=256)
    model.generation_config.eos_token_id = 0
    return model, ByteTokenizer()


def settings(methods=("full", "kvmerger", "streaming-llm"), budgets=(0.5, 0.35)) -> RunSettings:
    return RunSettings(
        plans=[
            TaskPlan(get_task("passkey"), (400,), 2),
            TaskPlan(get_task("lm", continuation=8), (160,), 2),
        ],
        methods=[MethodSpec(name) for name in methods],
        budgets=list(budgets),
        protocols=["query-aware", "query-agnostic"],
        seed=0,
    )


VARIANTS = 5  # full, then kvmerger and streaming-llm at 2 budgets
GROUPS = 2 * 2 + 2  # passkey: 2 samples x 2 protocols; lm: 2 windows
CELLS = GROUPS * VARIANTS


def run(tiny, folder: Path, config: RunSettings | None = None, **kwargs):
    model, tokenizer = tiny
    return Runner(model, tokenizer, config or settings(), folder, model_name="tiny", progress=False, **kwargs).run()


@pytest.fixture
def count_prefills(monkeypatch):
    calls = []
    original = runner_module.record_prefill

    def counting(model, ids, **kwargs):
        calls.append(ids.shape[-1])
        return original(model, ids, **kwargs)

    monkeypatch.setattr(runner_module, "record_prefill", counting)
    return calls


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    outcome = run(tiny, folder)
    return folder, outcome, RecordStore(folder).load().records


def test_one_record_per_cell_and_one_prefill_per_sample_and_protocol(tiny, tmp_path, count_prefills):
    outcome = run(tiny, tmp_path)
    records = RecordStore(tmp_path).load().records
    assert outcome.cells == outcome.ran == len(records) == CELLS
    assert len({record["key"] for record in records}) == CELLS
    assert len(count_prefills) == GROUPS
    passkey = {(r["sample"], r["method_label"], r["budget"], r["protocol"]): r for r in records if r["task_name"] == "passkey"}
    for (sample, label, budget, protocol), aware in passkey.items():
        if protocol == "query-aware":  # context + question prefilled; query-agnostic: the context alone
            agnostic = passkey[(sample, label, budget, "query-agnostic")]
            assert aware["prefill_tokens"] == agnostic["prefill_tokens"] + agnostic["question_tokens"]
    assert {r["protocol"] for r in records if r["task_name"] == "lm"} == {"teacher-forced"}


def test_records_carry_their_provenance(finished):
    _, _, records = finished
    record = next(r for r in records if r["method"] == "kvmerger" and r["budget"] == 0.35)
    assert record["method_params"] == get_method_params("kvmerger", 0.35)
    assert record["task_params"] == {"task": "passkey", "chat": False, "keys": 1}
    assert record["seed"] == 0 and record["protocol"] in ("query-aware", "query-agnostic")
    provenance = record["provenance"]
    assert provenance["versions"]["torch"] == torch.__version__
    assert {"kvmerger", "transformers", "python"} <= set(provenance["versions"])
    assert "commit" in provenance["git"] and "dirty" in provenance["git"]
    assert provenance["model"]["name"] == "tiny" and len(provenance["model"]["config_hash"]) == 12
    assert provenance["model"]["parameters"] > 0 and provenance["model"]["dtype"] == "float32"
    assert provenance["hardware"]["cpu_count"] >= 1 and provenance["hardware"]["device"] == "cpu"
    assert datetime.datetime.fromisoformat(provenance["date"]).tzinfo is not None
    assert record["cache"]["memory_ratio"] == pytest.approx(0.35, abs=0.01)
    assert all(slots == record["cache"]["slots_after"][0] for slots in record["cache"]["slots_after"])


def get_method_params(name: str, budget: float) -> dict:
    from kvmerger.methods import get_method

    return get_method(name, budget=budget).describe()


def test_language_modelling_records_compare_with_the_full_cache(finished):
    _, _, records = finished
    lm = [r for r in records if r["task_name"] == "lm"]
    full = [r for r in lm if r["method"] == "full"]
    assert all(r["metrics"]["kl"] == 0.0 and r["score"] == 1.0 for r in full)
    compressed = [r for r in lm if r["method"] == "kvmerger"]
    assert all(r["metrics"]["kl"] > 0 and r["metrics"]["perplexity"] > 1 for r in compressed)
    assert all(r["scored_tokens"] == 8 for r in lm)


def planned_groups(tiny, folder: Path, config: RunSettings):
    model, tokenizer = tiny
    return Runner(model, tokenizer, config, folder, model_name="tiny", progress=False).groups(set())[0]


def cell_keys(tiny, folder: Path, config: RunSettings) -> set[str]:
    return {cell.key for group in planned_groups(tiny, folder, config) for cell in group.cells}


def test_cell_keys_are_stable_and_change_with_any_parameter(tiny, tmp_path):
    keys = lambda config: cell_keys(tiny, tmp_path, config)  # noqa: E731
    assert keys(settings()) == keys(settings())
    changed = settings()
    changed.methods = [MethodSpec("full"), MethodSpec("kvmerger", {"size_bias": True})]
    assert keys(changed) & keys(settings()) == {k for k in keys(settings()) if "/full@1#" in k}
    assert method_label(changed.methods[1].variants([0.5])[0]) == "kvmerger[size_bias=True]"


def test_a_method_given_protocols_runs_only_under_them_and_on_language_modelling(tiny, tmp_path):
    config = settings()
    config.methods = [MethodSpec("full"), MethodSpec("kvmerger", protocols=("query-agnostic",))]
    labels = {(group.protocol, cell.label) for group in planned_groups(tiny, tmp_path, config) for cell in group.cells}
    assert labels == {
        ("query-aware", "full"),
        ("query-agnostic", "full"),
        ("query-agnostic", "kvmerger"),
        ("teacher-forced", "full"),
        ("teacher-forced", "kvmerger"),
    }
    everywhere = settings(methods=("full", "kvmerger"))
    keys = lambda config: cell_keys(tiny, tmp_path, config)  # noqa: E731
    assert keys(config) < keys(everywhere)  # the same cells keep their keys, so runs resume across it


def test_an_interrupted_run_resumes_without_redoing_or_losing_cells(tiny, tmp_path, monkeypatch, count_prefills):
    appended = []
    original = RecordStore.append

    def crash_after_seven(self, record):
        if len(appended) == 7:
            raise KeyboardInterrupt
        appended.append(record["key"])
        original(self, record)

    monkeypatch.setattr(RecordStore, "append", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path)
    monkeypatch.setattr(RecordStore, "append", original)
    before = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(before) == 7
    count_prefills.clear()

    outcome = run(tiny, tmp_path)
    after = (tmp_path / "records.jsonl").read_text().splitlines()
    assert outcome.skipped == 7 and outcome.ran == CELLS - 7
    assert after[:7] == before  # finished cells kept as they were
    assert len(after) == len({json.loads(line)["key"] for line in after}) == CELLS
    # the group that was cut in the middle is prefilled again, the finished ones are not
    assert len(count_prefills) == GROUPS - 7 // VARIANTS

    again = run(tiny, tmp_path)
    assert again.ran == 0 and again.skipped == CELLS


def save_tiny_model(folder: Path) -> Path:
    """The tiny random Llama and a byte-level tokenizer, saved as a model folder `--model` accepts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    model = build_tiny("llama", vocab_size=len(vocab))
    model.config.eos_token_id = model.generation_config.eos_token_id = vocab["<eos>"]
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_eval_killed_with_sigkill_resumes_without_losing_or_repeating_a_cell(tmp_path, capsys):
    """A real `kvmerger eval` process, killed (SIGKILL: no handler runs) once a few cells are written."""
    import kvmerger.cli.main as cli_main

    samples, variants = 4, 5  # full, then kvmerger and streaming-llm at 2 budgets
    out = tmp_path / "out"
    argv = [
        "eval", "--model", str(save_tiny_model(tmp_path / "model")), "--tasks", "lm:continuation=8",
        "--methods", "full", "kvmerger", "streaming-llm", "--budgets", "0.5", "0.35", "--lengths", "160",
        "--samples", str(samples), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmerger.cli.main", *argv], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    records = out / "records.jsonl"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if records.is_file() and records.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    written = records.read_text()
    finished = written[: written.rfind("\n") + 1].splitlines()  # a torn last line is the runner's to set aside
    assert 3 <= len(finished) < samples * variants

    assert cli_main.main(argv) == 0
    assert f"{len(finished)} of {samples * variants} cells were already done" in capsys.readouterr().err
    after = records.read_text().splitlines()
    assert after[: len(finished)] == finished  # the cells finished before the kill, kept as they were
    keys = [json.loads(line)["key"] for line in after]
    assert len(keys) == len(set(keys)) == samples * variants


def test_a_truncated_last_line_is_set_aside_and_its_cell_run_again(tiny, tmp_path, finished):
    folder, _, records = finished
    lines = (folder / "records.jsonl").read_text().splitlines(keepends=True)
    torn = lines[-1][: len(lines[-1]) // 2]
    (tmp_path / "records.jsonl").write_text("".join(lines[:-1]) + torn)

    outcome = run(tiny, tmp_path)
    assert outcome.truncated == torn and outcome.ran == 1 and outcome.skipped == CELLS - 1
    assert (tmp_path / "records.jsonl.truncated").read_text() == torn + "\n"
    reloaded = RecordStore(tmp_path).load()
    assert reloaded.truncated is None and len(reloaded.records) == CELLS
    assert reloaded.records[-1]["key"] == records[-1]["key"]


def test_a_broken_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"key": "a"}\n{"key": \n{"key": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        RecordStore(tmp_path).load()


def test_a_results_folder_holds_one_model(tiny, tmp_path, finished):
    folder, _, _ = finished
    (tmp_path / "records.jsonl").write_text((folder / "records.jsonl").read_text())
    other = build_tiny("llama", seed=1, vocab_size=256)
    with pytest.raises(ValueError, match="another model"):
        Runner(other, ByteTokenizer(), settings(), tmp_path, model_name="other", progress=False).run()


def test_summary_csv_and_report_are_computed_from_the_records(finished):
    folder, _, records = finished
    outputs = write_outputs(folder)
    with open(outputs.summary, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * VARIANTS  # passkey under 2 protocols, lm under 1
    for row in rows:
        cells = [
            r
            for r in records
            if (r["task"], r["protocol"], r["method_label"], r["budget"])
            == (row["task"], row["protocol"], row["method"], float(row["budget"]))
        ]
        assert int(row["cells"]) == len(cells) == 2
        assert float(row["score"]) == pytest.approx(statistics.fmean(r["score"] for r in cells), rel=1e-5)
        assert float(row["memory_ratio"]) == pytest.approx(statistics.fmean(r["cache"]["memory_ratio"] for r in cells), rel=1e-5)
        if row["task"].startswith("lm"):
            assert float(row["kl"]) == pytest.approx(statistics.fmean(r["metrics"]["kl"] for r in cells), rel=1e-5)
            nll = statistics.fmean(r["metrics"]["nll"] for r in cells)
            assert float(row["perplexity"]) == pytest.approx(2.718281828459045**nll, rel=1e-5)
            assert float(row["kl_max"]) == pytest.approx(max(r["metrics"]["kl_max"] for r in cells), rel=1e-5)
            p99 = statistics.fmean(r["metrics"]["kl_p99"] for r in cells)
            assert float(row["kl_p99"]) == pytest.approx(p99, rel=1e-5)
            changed = statistics.fmean(1 - r["metrics"]["top1_agreement"] for r in cells)
            assert float(row["top1_changed"]) == pytest.approx(changed, rel=1e-5, abs=1e-9)
            assert float(row["kl"]) <= float(row["kl_max"])
        else:
            assert row["kl"] == row["perplexity"] == row["kl_max"] == row["kl_p99"] == row["top1_changed"] == ""
    full = [row for row in rows if row["method"] == "full"]
    assert all(float(row["memory_ratio"]) == 1.0 and row["budget"] == "1" for row in full)

    report = outputs.report.read_text()
    assert "| method | budget |" in report and "| kvmerger | 0.35 |" in report
    assert "## Where KVMerger wins and loses" in report and "**kvmerger at budget 0.5**" in report
    for title, path in outputs.figures:
        assert path.is_file() and f"]({path.relative_to(folder).as_posix()})" in report
    names = {path.name for _, path in outputs.figures}
    assert {
        "passkey_query-aware_score_vs_budget.png",
        "passkey_query-agnostic_score_vs_budget.png",
        "lm_continuation_8_kl_and_perplexity_vs_budget.png",
    } <= names
    metrics = {row["task"]: row["metric"] for row in rows}
    assert metrics == {"passkey": "contains_answer", "lm[continuation=8]": "top1_agreement"}
    assert "lm_continuation_8_worst_token_kl_and_top1_changes_vs_budget.png" in names
    assert "## Language modelling: the worst token, not only the mean" in report
    kvmerger_lm = next(row for row in rows if row["method"] == "kvmerger" and row["task"].startswith("lm"))
    line = f"| {kvmerger_lm['task']} | kvmerger | {kvmerger_lm['budget']} | {float(kvmerger_lm['kl']):.4f} | "
    assert line + f"{float(kvmerger_lm['kl_p99']):.3f} | {float(kvmerger_lm['kl_max']):.3f} |" in report


def test_records_written_before_the_kl_tail_existed_are_still_summarized(finished):
    _, _, records = finished
    kept = ("kl", "nll", "perplexity", "top1_agreement")
    old = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k in kept}} for r in records]
    rows = [row for row in summarize(old) if row.is_language_modeling]
    assert rows and all(row.kl_max is None and row.kl is not None for row in rows)
    assert kl_tail_table(rows) == ""


def test_bad_settings_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="known methods: .*kvmerger"):
        MethodSpec("no-such-method")
    with pytest.raises(ValueError, match="known tasks: .*needle"):
        TaskPlan.parse("no-such-task", [512], 1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        RunSettings([TaskPlan(get_task("passkey"), (400,), 1)], [MethodSpec("full")], [1.5])
    with pytest.raises(ValueError, match="protocols"):
        RunSettings([TaskPlan(get_task("passkey"), (400,), 1)], [MethodSpec("full")], [0.5], ["sideways"])
    with pytest.raises(ValueError, match="--budgets"):
        MethodSpec("kvmerger", {"budget": 0.5})
    with pytest.raises(ValueError, match="protocols must be some of query-aware, query-agnostic"):
        MethodSpec("kvmerger", protocols=("teacher-forced",))


def test_a_context_longer_than_the_model_allows_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    config = RunSettings([TaskPlan(get_task("passkey"), (1020,), 1)], [MethodSpec("full")], [0.5])
    with pytest.raises(ValueError, match="context of 1024 tokens; use lengths up to 1012"):
        Runner(model, tokenizer, config, tmp_path, model_name="tiny", progress=False)


def test_plots_tell_kvmerger_variants_apart():
    from kvmerger.evaluation.plots import _style

    plain, variant, other = _style(0, "kvmerger"), _style(1, "kvmerger[size_bias=True]"), _style(2, "h2o")
    assert plain["color"] == variant["color"] == "black" and other["color"] != "black"
    assert (plain["linestyle"], plain["marker"]) != (variant["linestyle"], variant["marker"])
