"""`kvmerger eval --executor ray` on a local Ray instance (2 CPUs) with a tiny random model saved to a
folder: the records equal the serial run's cell by cell (timings and dates aside), an interrupted run
keeps its finished samples and the resumed run computes only the missing cells, errors raised in a
worker arrive as one line, and without Ray installed the command names the install command."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import pytest

import kvmerger.cli.main as cli_main
from kvmerger.evaluation import ray_executor
from tests.test_harness import save_tiny_model

REPOSITORY = Path(__file__).resolve().parents[1]
VARIANTS = 7  # full, then kvmerger, h2o and streaming-llm at 2 budgets
GROUPS = 2 * 2 + 2  # passkey: 2 samples x 2 protocols; lm: 2 windows
CELLS = GROUPS * VARIANTS
TIMING = ("seconds", "provenance")  # what may differ between two runs of the same cells


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for the module, its workers running this checkout's code."""
    try:
        import ray
    except ImportError:
        pytest.fail(f"Ray is missing: {ray_executor.INSTALL} (`make setup` installs it)")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    return [
        "eval", "--model", str(model), "--tasks", "passkey", "lm:continuation=8", "--lengths", "400",
        "--samples", "2", "--protocol", "both", "--methods", "full", "kvmerger", "h2o", "streaming-llm",
        "--budgets", "0.5", "0.35", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def serial(argv, one_thread, tmp_path_factory):  # one thread, as each Ray worker of 1 CPU: the same arithmetic
    folder = tmp_path_factory.mktemp("serial")
    assert cli_main.main([*argv, "--out", str(folder)]) == 0
    return folder


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def results(folder: Path) -> dict[str, dict]:
    """Each cell's record without its timings and provenance."""
    return {r["key"]: {k: v for k, v in r.items() if k not in TIMING} for r in records(folder)}


def ray_eval(argv: list[str], folder: Path, *extra: str) -> int:
    return cli_main.main([*argv, "--out", str(folder), "--executor", "ray", *extra])


def test_ray_records_equal_the_serial_records_cell_by_cell(local_ray, argv, serial, tmp_path, capsys):
    assert ray_eval(argv, tmp_path, "--workers", "2") == 0
    assert "starting Ray workers" in capsys.readouterr().err
    assert len(records(tmp_path)) == CELLS
    assert results(tmp_path) == results(serial)  # predictions, scores, metrics, cache statistics

    ours, theirs = records(tmp_path)[0]["provenance"], records(serial)[0]["provenance"]
    assert ours["model"] == theirs["model"] and ours["versions"] == theirs["versions"]
    assert ours["command"] == " ".join(sys.argv)  # the driver's command, not the worker's
    assert ours["hardware"]["host"] == platform.node() and ours["hardware"]["torch_threads"] == 1
    executor = json.loads((tmp_path / "run.json").read_text())["executor"]
    assert executor["name"] == "ray" and executor["workers"] == 2 and executor["worker_cpus"] == 1
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == (serial / "summary.csv").read_text().splitlines()[0]


def test_a_ray_run_resumes_a_cut_sample_and_an_interrupted_run_keeps_its_finished_samples(
    local_ray, argv, serial, tmp_path, monkeypatch, capsys
):
    """A results folder whose second sample was cut in the middle (a serial run's crash): the Ray run
    gets only the missing cells, is interrupted (Ctrl-C) after two samples came back, keeps them,
    stops its workers, and the resumed run completes the rest."""
    kept = (serial / "records.jsonl").read_text().splitlines(keepends=True)[: VARIANTS + 3]
    (tmp_path / "records.jsonl").write_text("".join(kept))
    original = ray_executor.CellProgress.group_done
    returned = []

    def interrupt_after_two(self, group):
        original(self, group)
        returned.append(group)
        if len(returned) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ray_executor.CellProgress, "group_done", interrupt_after_two)
    assert ray_eval(argv, tmp_path) == 130
    monkeypatch.undo()
    assert "the cells of every finished sample are saved" in capsys.readouterr().err
    before = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(before) == len(kept) + sum(len(group.cells) for group in returned)
    assert {json.loads(line)["key"] for line in before[len(kept) :]} == {c.key for g in returned for c in g.cells}
    wait_for_free_cpus(local_ray, 2)  # the workers were stopped

    assert ray_eval(argv, tmp_path) == 0
    assert f"{len(before)} of {CELLS} cells were already done" in capsys.readouterr().err
    after = (tmp_path / "records.jsonl").read_text().splitlines()
    assert after[: len(before)] == before and len(after) == CELLS
    assert results(tmp_path) == results(serial)


def wait_for_free_cpus(ray, count: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == count


def test_errors_in_workers_and_impossible_pools_are_one_line(local_ray, argv, tmp_path, capsys):
    # the tiny model's context is 1024 positions: the worker's Runner refuses, the driver says why
    assert ray_eval([*argv, "--lengths", "1100"], tmp_path, "--workers", "1") == 2
    assert "more than this model's context of 1024 tokens" in capsys.readouterr().err.splitlines()[-1]
    assert ray_eval(argv, tmp_path, "--workers", "3") == 2
    assert "has room for 2 workers of 1 CPU, not 3" in capsys.readouterr().err
    wait_for_free_cpus(local_ray, 2)


def test_without_ray_the_error_names_the_install_command(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert ray_eval(argv, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error == "kvmerger eval: error: --executor ray needs Ray, which is not installed: pip install 'kvmerger[ray]'\n"
    assert not (tmp_path / "out").exists()
    assert cli_main.main([*argv, "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "--workers only apply to Ray runs; add --executor ray" in capsys.readouterr().err
