"""`kvmerger eval`: any model, methods, budgets, tasks, protocol, lengths and sample counts.

Writes a results folder (default results/eval/<timestamp>, or results/eval/<--name>):
`records.jsonl` (one record per cell, with its provenance), `summary.csv`, `figures/*.png`,
`report.md` and `run.json` (the settings of the latest invocation). Run the same command with the
same `--out` again to resume an interrupted run: finished cells are kept and not redone.

Methods and tasks take parameters after a colon: `kvmerger:mode=paper,sigma=5`,
`passkey:chat=True`, `lm:continuation=128`, `longbench:dataset=qasper`. Without --methods it runs
the full cache, KVMerger and the baselines (`--methods all`: every registered method). Tasks:
passkey, needle, lm (language modelling; lm-stress: the same on repetitive texts), ruler-niah,
ruler-vt, ruler-cwe, ruler-fwe, ruler-qa-squad, ruler-qa-hotpot, longbench (with --data-dir:
kvmerger downloads nothing; get LongBench's data.zip from the Hugging Face dataset THUDM/LongBench
and pass its data/ folder).
Query-aware answers take their first token from the full-cache prefill (see
kvmerger/evaluation/generation.py). Everything that can be checked without the model (tasks and
their parameters, methods, data, the results folder) is checked before it loads.

`--executor ray` runs each sample (one prefill, then every method and budget) as a Ray task, on a
local Ray instance or on the cluster at `--address`, the model loaded once per worker; the records
come back to this process's results folder (see docs/RAY.md; needs `pip install 'kvmerger[ray]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from kvmerger.cli.options import (
    HelpFormatter,
    add_model_options,
    budget,
    check_model_options,
    check_output_folder,
    load,
    plain_name,
    positive_int,
)

DEFAULT_TASKS = ["passkey", "needle", "lm"]


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "eval",
        help="evaluate methods x budgets on tasks, offline, with resumable results",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_model_options(parser)
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK[:NAME=VALUE,...]", help="tasks to run")
    add_method_options(parser)
    parser.add_argument(
        "--protocol",
        choices=["query-aware", "query-agnostic", "both"],
        default="query-aware",
        help="question compressed with the context (query-aware, the paper's), after it (query-agnostic), or both",
    )
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[2048], help="context lengths in tokens")
    parser.add_argument(
        "--samples", type=positive_int, default=5, help="samples per task and length (depths for passkey/needle)"
    )
    parser.add_argument("--data-dir", type=Path, help="folder of LongBench {dataset}.jsonl files, for tasks that read data")
    add_output_options(parser)
    add_executor_options(parser)
    return parser


def add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD[:NAME=VALUE,...]",
        help="methods to run (default: full, KVMerger and the baselines; `all`: every registered method, "
        "see `kvmerger methods`)",
    )
    parser.add_argument("--budgets", nargs="+", type=budget, default=[0.5, 0.35], help="shares of the cache kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of seeded methods")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="results folder (give an existing one to resume it)")
    parser.add_argument(
        "--name", type=plain_name, help="results folder name under results/<command>/ instead of a timestamp"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running on Ray (docs/RAY.md)")
    group.add_argument(
        "--executor",
        choices=["serial", "ray"],
        default="serial",
        help="serial: every cell in this process; ray: one Ray task per sample, on a local Ray instance or the "
        "cluster at --address (needs pip install 'kvmerger[ray]')",
    )
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the Ray cluster to join (its head's address, or `auto`) (default: start a local Ray instance)",
    )
    group.add_argument(
        "--workers",
        type=positive_int,
        help="Ray workers, each loading the model once (default: as many as the cluster's CPUs allow, or its GPUs "
        "with --device cuda; at most one per sample)",
    )
    group.add_argument(
        "--worker-cpus",
        type=positive_int,
        help="CPUs of each Ray worker, also its torch threads (default: 1)",
    )


def check_executor_options(args: argparse.Namespace) -> None:
    """Ray's options only with --executor ray, and Ray installed when it is asked for (one-line errors)."""
    if args.executor == "ray":
        from kvmerger.evaluation.ray_executor import import_ray

        import_ray()
        return
    given = [option for option, value in (("--address", args.address), ("--workers", args.workers),
                                          ("--worker-cpus", args.worker_cpus)) if value is not None]  # fmt: skip
    if given:
        raise ValueError(f"{', '.join(given)} only apply to Ray runs; add --executor ray")


def run(args: argparse.Namespace) -> int:
    from kvmerger.evaluation.runner import PROTOCOLS, RunSettings, TaskPlan
    from kvmerger.evaluation.suites import paper_comparison
    from kvmerger.evaluation.tasks.base import Task

    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    shared = {}
    if args.data_dir is not None:
        if not args.data_dir.is_dir():
            raise FileNotFoundError(f"--data-dir {args.data_dir} is not a folder (it should hold {{dataset}}.jsonl files)")
        shared["data_dir"] = str(args.data_dir)
    plans = [TaskPlan.parse(spec, args.lengths, args.samples, shared) for spec in args.tasks]
    for plan in plans:
        if isinstance(plan.task, Task):  # language modelling reads shipped text
            plan.task.check_data()
    methods = method_specs(args.methods) or paper_comparison()
    settings = RunSettings(plans, methods, list(args.budgets), protocols, args.seed)
    return execute(args, settings, "eval", "KV cache compression: quality at a budget")


def method_specs(texts: list[str] | None):
    """MethodSpecs from --methods: None when not given (the default set); "all", alone or beside other specs,
    stands for every registered method; a spec given twice runs once."""
    from kvmerger.evaluation.runner import MethodSpec, all_methods

    if texts is None:
        return None
    specs: list[MethodSpec] = []
    for text in texts:
        for spec in all_methods() if text == "all" else [MethodSpec.parse(text)]:
            if spec not in specs:  # "all kvmerger" runs KVMerger once
                specs.append(spec)
    return specs


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def output_folder(args: argparse.Namespace, command: str) -> Path:
    import datetime

    if args.out is not None:
        return args.out
    name = args.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / command / name


def execute(args: argparse.Namespace, settings, command: str, title: str, intro: str | None = None) -> int:
    """Load the model, run `settings` into the results folder, write the summary, figures and report.
    Everything that can be checked without the model (options, output folder, model path) is checked first."""
    import json

    from kvmerger.evaluation.records import write_atomically
    from kvmerger.evaluation.report import write_outputs

    check_executor_options(args)
    folder = output_folder(args, command)
    check_output_folder(folder, "--out" if args.out is not None else "the results folder")
    if args.executor == "serial" or args.address is None:  # on a cluster, the workers check their own
        check_model_options(args)
    if intro:
        print(intro, file=sys.stderr)
    with open_runner(args, settings, folder) as (runner, executor):
        variants = settings.variants()
        protocols = list(dict.fromkeys(p for plan in settings.plans for p in (plan.protocols or settings.protocols)))
        print(
            f"kvmerger {command}: {plural(len(settings.plans), 'task')}, {plural(len(variants), 'method x budget variant')}, "
            f"{plural(len(protocols), 'protocol')} ({', '.join(protocols)}); results in {folder} "
            f"(run again with --out {folder} to resume)",
            file=sys.stderr,
        )
        write_atomically(
            folder / "run.json",
            json.dumps(
                {"command": command, "settings": settings.describe(), "executor": executor, **runner.provenance},
                indent=2,
                default=str,
            ),
        )
        try:
            outcome = runner.run()
        except KeyboardInterrupt:
            saved = "the cells of every finished sample are" if args.executor == "ray" else "every finished cell is"
            print(
                f"\nkvmerger {command}: interrupted; {saved} saved in {folder / 'records.jsonl'}. "
                f"Run the same command with --out {folder} to go on from there.",
                file=sys.stderr,
            )
            return 130
    if outcome.truncated is not None:
        redone = (
            f"the {plural(outcome.ran, 'cell')} missing from the records ran again"
            if outcome.ran
            else "every cell was already in the records, so nothing ran again"
        )
        print(
            f"kvmerger {command}: the records ended with an incomplete line from an interrupted run; it was set aside "
            f"in {folder / 'records.jsonl.truncated'}, and {redone}",
            file=sys.stderr,
        )
    if outcome.skipped:
        print(f"kvmerger {command}: {outcome.skipped} of {outcome.cells} cells were already done", file=sys.stderr)
    outputs = write_outputs(folder, {"title": title})
    print(outputs.table)
    print(f"\nreport: {outputs.report}\nsummary: {outputs.summary}\nfigures: {len(outputs.figures)} in {folder / 'figures'}")
    return 0


@contextlib.contextmanager
def open_runner(args: argparse.Namespace, settings, folder: Path) -> Iterator[tuple]:
    """The runner of --executor, and how run.json describes it. The serial runner loads the model here;
    a Ray runner starts Ray and its workers, which load the model, and stops them on the way out."""
    from kvmerger.models import DEFAULT_MODEL

    model_name = str(args.model) if args.model else DEFAULT_MODEL
    if args.executor == "serial":
        from kvmerger.evaluation.runner import Runner

        model, tokenizer = load(args)
        runner = Runner(model, tokenizer, settings, folder, model_name=model_name, progress=not args.no_progress)
        yield runner, {"name": "serial"}
        return
    from kvmerger.evaluation.ray_executor import RayOptions, RayRunner, model_source

    source = model_source(args.model, args.dtype, args.device, model_name)
    options = RayOptions(args.address, args.workers, args.worker_cpus or 1)
    where = f"the Ray cluster at {args.address}" if args.address else "a local Ray instance"
    print(
        f"kvmerger: starting Ray workers on {where}, each loading {model_name} ({args.dtype}, {args.device})",
        file=sys.stderr,
        flush=True,
    )
    command = " ".join(sys.argv)
    with RayRunner(settings, folder, source, options, command=command, progress=not args.no_progress) as runner:
        yield runner, runner.describe()
