"""Helpers shared by the benchmark scripts: machine description, medians and ratios, growth
exponents, prompts of an exact length, result files.

The benchmarks follow one rule, because these machines are noisy: every figure is a ratio taken
within one run (a method against the full cache or against the prefill, measured interleaved),
a median over repeats, never a single absolute time.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("results/benchmarks")


def machine() -> dict[str, Any]:
    """What the numbers were measured on: date, CPU or GPU, threads, library versions."""
    import transformers

    cpu = _cpu_name()
    info = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a script's output and for docs/BENCHMARKS.md."""
    device = info["gpu"] or f"no GPU, {info['torch_threads']} torch threads"
    return (
        f"{info['date']}, {info['cpu_cores']}-core {info['machine']} ({info['cpu']}), {device}, "
        f"torch {info['torch']}, transformers {info['transformers']}"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("the median of no measurements is undefined; run at least one repeat")
    return float(statistics.median(values))


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-repeat ratios: repeat i's numerator over repeat i's denominator.

    Measured interleaved, a repeat's two numbers share the machine's state at that moment, so
    their ratio is steadier than a ratio of two medians.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators: pair them by repeat")
    if any(d <= 0 for d in denominators):
        raise ValueError("a ratio needs positive denominators")
    return median([n / d for n, d in zip(numerators, denominators)])


def growth_exponent(lengths: Sequence[float], values: Sequence[float]) -> float:
    """Slope of log(value) against log(length), by least squares: value ~ length ** slope.

    1 means linear, 2 quadratic. Needs at least two distinct lengths and positive values.
    """
    if len(lengths) != len(values):
        raise ValueError(f"{len(lengths)} lengths but {len(values)} values")
    if len(set(lengths)) < 2:
        raise ValueError("a growth exponent needs at least two distinct lengths")
    if any(v <= 0 for v in values) or any(n <= 0 for n in lengths):
        raise ValueError("a log-log fit needs positive lengths and values")
    xs = [math.log(n) for n in lengths]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    variance = sum((x - mean_x) ** 2 for x in xs)
    return covariance / variance


def essay_ids(tokenizer, length: int) -> torch.Tensor:
    """The first `length` tokens of the shipped essays, [1, length]."""
    from kvmerger.evaluation.texts import essays

    ids = tokenizer(essays(), return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ValueError(f"the essays hold {ids.shape[1]} tokens, fewer than {length}")
    return ids[:, :length]


def check_fits(model, prompt_tokens: int, new_tokens: int = 0) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        raise ValueError(
            f"{prompt_tokens} prompt tokens + {new_tokens} new ones exceed the model's context of {context} tokens"
        )


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"# written to {path}", flush=True)


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
