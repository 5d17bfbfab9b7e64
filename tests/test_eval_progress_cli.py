"""What `kvmerger eval` says while it runs and when it resumes, on a tiny GGUF model (seconds): one bar
whose time estimate waits for a whole sample, no bar when nothing is left, "1 task" in the singular,
and after a torn last line a message that says what actually ran again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import kvmerger.cli.main as cli_main
from kvmerger.evaluation import progress
from tests.tiny_gguf import write_tiny_gguf

ARGS = ["eval", "--tasks", "passkey", "--methods", "full", "h2o", "--budgets", "0.5", "--lengths", "400", "--samples", "2"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-eval")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVMERGER_CACHE", str(folder / "cache"))
    yield write_tiny_gguf(folder / "tiny.gguf")
    patch.undo()


def run(argv: list[str], capsys) -> str:
    assert cli_main.main(argv) == 0
    return capsys.readouterr().err.replace("\r", "\n")


def test_progress_resume_and_a_torn_last_line(tiny_gguf, tmp_path, capsys):
    argv = [*ARGS, "--model", str(tiny_gguf), "--out", str(tmp_path)]
    first = run(argv, capsys)
    assert "kvmerger eval: 1 task, 2 method x budget variants, 1 protocol (query-aware)" in first
    bar_lines = [line for line in first.splitlines() if " cells [" in line]
    assert any("time left: after the first sample" in line for line in bar_lines)
    assert any(" left" in line and "about" in line for line in bar_lines)

    again = run(argv, capsys)
    assert " cells [" not in again and "4 of 4 cells were already done" in again

    records = tmp_path / "records.jsonl"
    records.write_bytes(records.read_bytes() + b'{"key": "passkey/400/0/que')
    torn = run(argv, capsys)
    assert "set aside" in torn and "every cell was already in the records, so nothing ran again" in torn

    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # a crash in the middle of the last record
    redone = run(argv, capsys)
    assert "and the 1 cell missing from the records ran again" in redone


def test_the_estimate_extrapolates_whole_samples_weighted_by_length(monkeypatch):
    """Three samples of 17 cells: the first, 2048 tokens, took 20 s in all; the two left are 2048 and
    4096 tokens long, so 20 s x (1 + 2) = 60 s are left, whatever its first cell took."""
    clock = iter([0.0, 20.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    groups = [SimpleNamespace(length=length, cells=[None] * 17) for length in (2048, 2048, 4096)]
    bar = progress.CellProgress(groups, enabled=False)
    assert bar.estimate == "time left: after the first sample"
    bar.group_done(groups[0])
    assert bar.estimate == "about 60 s left"
    assert progress.duration(3 * 3600) == "3.0 h" and progress.duration(600) == "10 min"
