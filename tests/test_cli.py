"""The command line without a model: fast help, the method catalog in sync with the methods, and bad
input to every subcommand answered with one line on stderr and exit status 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import kvmerger.cli.main as cli_main
import kvmerger.models
from kvmerger.cli.catalog import CATALOG, SYNTAX

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    """kvmerger's own entry point, exit code included (argparse exits through SystemExit)."""
    try:
        return cli_main.main(argv)
    except SystemExit as exit:
        return int(exit.code or 0)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input was bad")

    monkeypatch.setattr(kvmerger.models, "load_model", refuse)


def python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT
    )


# --------------------------------------------------------------------------------------------
# Help and the method list, without torch
# --------------------------------------------------------------------------------------------


def test_help_and_the_method_list_import_neither_torch_nor_transformers():
    code = (
        "import sys, contextlib, io\n"
        "import kvmerger.cli.main as m\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert m.main(['methods']) == 0\n"
        "    for command in ['--help'] + [[c, '--help'] for c in m.SUBCOMMANDS]:\n"
        "        try:\n"
        "            m.main(command if isinstance(command, list) else [command])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, command\n"
        "print(sorted(name for name in ('torch', 'transformers', 'numpy', 'matplotlib') if name in sys.modules))\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", cli_main.SUBCOMMANDS)
def test_every_help_shows_the_defaults(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: kvmerger {command}" in text
    if command not in ("methods",):
        assert "(default:" in text


def test_the_catalog_matches_every_registered_method():
    """kvmerger methods reads a static catalog; it must say exactly what the method classes declare."""
    from kvmerger.methods import METHODS

    assert [entry.name for entry in CATALOG] == sorted(METHODS)
    for entry in CATALOG:
        cls = METHODS[entry.name]
        assert entry.summary == cls.summary, entry.name
        declared = [(f.name, str(f.type), f.default) for f in fields(cls)]
        assert all(f.default is not MISSING for f in fields(cls)), f"{entry.name}: every parameter needs a default"
        listed = [(p.name, p.type, p.default) for p in entry.parameters]
        assert listed == declared, entry.name
        assert all(p.help and "\n" not in p.help for p in entry.parameters)


def test_methods_lists_each_parameter_with_its_default_and_explains_the_syntax(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "kvmerger: KVMerger (Wang et al. 2024)" in out
    assert "    mode='exact'" in out and "    sigma=None" in out and "    recent_share=0.5" in out
    assert main(["methods", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "NAME=VALUE" in help_text and "kvmerger:mode=paper" in help_text
    assert SYNTAX.splitlines()[0] in help_text


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing loaded, nothing written
# --------------------------------------------------------------------------------------------


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("some text")
    empty = tmp / "empty.txt"
    empty.write_text("  \n")
    prompt = ["generate", "--prompt", "some context"]
    return [
        (["generate", "--file", str(tmp / "missing.txt")], "no such file"),
        (["generate", "--file", str(empty)], "is empty"),
        (["generate", "--prompt", ""], "--prompt is empty"),
        ([*prompt, "--method", "full", "--budget", "0.5"], "--budget does not apply"),
        ([*prompt, "--method", "nosuch"], "unknown method 'nosuch'"),
        ([*prompt, "--method", "kvmerger:nosuch=1"], "kvmerger has no parameter nosuch"),
        ([*prompt, "--param", "budget=0.3"], "with --budget"),
        ([*prompt, "--budget", "2"], "a budget is the share of the cache kept"),
        ([*prompt, "--max-new-tokens", "0"], "must be at least 1"),
        ([*prompt, "--model", "/nonexistent"], "no model folder or file at /nonexistent"),
        ([*prompt, "--model", str(tmp / "missing.gguf")], "no GGUF file"),
        ([*prompt, "--model", str(a_file)], "is a file"),
        ([*prompt, "--model", "no-such-org/no-such-model"], "in the local Hugging Face cache; kvmerger works offline"),
        ([*prompt, "--device", "nosuch"], "is not a device torch knows"),
        (["eval", "--out", "/dev/null/x"], "is inside /dev/null, which is not a folder"),
        (["eval", "--out", str(a_file)], "is a file"),
        (["eval", "--name", "../../escape"], "argument --name: a plain folder name is needed"),
        (["eval", "--name", "a/b"], "argument --name: a plain folder name is needed"),
        (["eval", "--tasks", "passkey:nosuch=1"], "task passkey has no parameter nosuch; its parameters: chat"),
        (["eval", "--tasks", "trivia"], "unknown task 'trivia'"),
        (["eval", "--tasks", "longbench:dataset=qasper"], "does not download"),
        (["eval", "--samples", "0"], "must be at least 1"),
        (["eval", "--methods", "zip"], "unknown method 'zip'"),
        (["compare", "--out", str(a_file)], "is a file"),
        (["compare", "--methods", "full", "zip"], "unknown method 'zip'"),
        (["analyze", "--texts", "no-such-file.txt"], "neither a text kind"),
        (["analyze", "--eps", "2"], "cosine threshold"),
        (["analyze", "--out", str(a_file)], "is a file"),
        (["demo", "--tokens", "0"], "must be at least 1"),
        (["demo", "--device", "nosuch"], "is not a device torch knows"),
        (["methods", "extra"], "unrecognized arguments"),
        (["cache", "--stale"], "--stale goes with"),
        (["cache", "nosuch"], "invalid choice"),
        ([], "required: COMMAND"),
    ]


def test_bad_input_to_every_subcommand_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    cases = bad_inputs(tmp_path)
    assert {argv[0] for argv, _ in cases if argv} == set(cli_main.SUBCOMMANDS)  # every subcommand is driven
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (argv, captured.err)
        assert len(lines) == 1 and message in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results folder, no run.json


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_an_unwritable_output_folder_is_refused_before_loading(capsys, no_model):
    """/sys refuses new folders even to root; elsewhere a read-only folder would do."""
    assert main(["eval", "--out", "/sys/kvmerger-test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write in /sys" in err and "choose another folder" in err


def test_cuda_without_cuda_is_one_line(capsys, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--prompt", "text", "--device", "cuda"]) == 2
    assert "has no cuda device; use --device cpu" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_status_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kvmerger.models, "load_model", interrupted)
    monkeypatch.setattr(kvmerger.models, "check_model_source", lambda model: None)
    assert main(["generate", "--prompt", "some text"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "kvmerger generate: interrupted" and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------------------------

NETWORK_GUARD = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:80])
    raise OSError("networking is disabled in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
"""


def test_nothing_reaches_the_network_and_longbench_without_data_writes_nothing(tmp_path):
    """With every socket connection refused (and recorded) and no offline variable set by the user:
    importing kvmerger sets the Hugging Face libraries offline, a hub id is looked up locally only,
    and LongBench without --data-dir says where to get the files, exit status 2, nothing written."""
    code = NETWORK_GUARD + (
        "import os\n"
        "import kvmerger.cli.main as m\n"
        "offline = {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE')}\n"
        "code = m.main(['eval', '--tasks', 'longbench:dataset=qasper', '--methods', 'full'])\n"
        "from transformers import AutoConfig\n"
        "try:\n"
        "    AutoConfig.from_pretrained('no-such-org/no-such-model')\n"
        "except OSError:\n"
        "    pass\n"
        "print(json.dumps({'code': code, 'attempts': attempts, 'offline': offline}))\n"
    )
    environment = {key: "" for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, **environment, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "attempts": [], "offline": dict.fromkeys(result["offline"], "1")}
    error = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "data.zip" in error[0] and "THUDM/LongBench" in error[0] and "--data-dir" in error[0]
    assert list(tmp_path.iterdir()) == []
