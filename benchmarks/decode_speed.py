"""Decode speed: tokens per second while generating after a long prompt, compressed vs full.

The prompt is prefilled once (`record_prefill`); every configuration then starts from that same
prompt, as its own cache:

* ``full``: plain transformers (a `DynamicCache` holding the whole prompt, no kvmerger attached),
  what a user has without kvmerger; every ratio is taken against it;
* ``full (kvmerger)``: the whole prompt in kvmerger's cache, decoded through kvmerger's attention
  function (shows what the engine's decoding path costs by itself);
* ``method@budget``: the prompt compressed by the method (`compress_prefill`), decoded inside
  `kvmerger.attach(model)`.

Each repeat decodes ``--new-tokens`` tokens greedily, one forward per token, never stopping
early, for every configuration in turn (interleaved), after an untimed warm-up of a few tokens.
Reported: median tokens/s, and the median over repeats of each repeat's ratio to ``full``.

    python benchmarks/decode_speed.py                                  # 7936-token prompt, kvmerger 0.5 and 0.35
    python benchmarks/decode_speed.py --length 4096 --methods kvmerger h2o --repeats 5
    python benchmarks/decode_speed.py --methods snapkv snapkv:head_budget=shared --budgets 0.35   # packed layers
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from kvmerger import attach, compress_prefill, load_model, record_prefill
from kvmerger.evaluation.runner import MethodSpec, method_label
from kvmerger.methods import FullCache

from measure import (  # noqa: E402  (a helper beside this script)
    RESULTS,
    check_fits,
    describe_machine,
    essay_ids,
    machine,
    median,
    median_ratio,
    minutes,
    write_results,
)

DEFAULT_LENGTH = 8192 - 256
WARM_UP_TOKENS = 4


@dataclass
class Configuration:
    label: str
    method: object | None  # None: plain transformers with the full cache
    budget: float | None


def plain_cache(prefill) -> DynamicCache:
    """A transformers `DynamicCache` holding the recorded prompt's full keys and values."""
    cache = DynamicCache()
    for index, layer in enumerate(prefill.cache.layers):
        cache.update(layer.keys, layer.values, index)
    return cache


def fresh_cache(prefill, configuration: Configuration):
    if configuration.method is None:
        return plain_cache(prefill)
    cache, _ = compress_prefill(prefill, configuration.method)
    return cache


@torch.no_grad()
def decode_seconds(model, cache, first_token: torch.Tensor, new_tokens: int, kvmerger_path: bool) -> float:
    """Seconds to generate `new_tokens` tokens greedily from `first_token` ([1, 1]) with `cache`."""
    context = attach(model) if kvmerger_path else nullcontext()
    with context:
        token = first_token
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(token, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(dim=-1)
        if token.device.type == "cuda":
            torch.cuda.synchronize(token.device)
        return time.perf_counter() - start


def measure(
    model, ids: torch.Tensor, configurations: list[Configuration], new_tokens: int, repeats: int
) -> dict[str, list[float]]:
    """Per label, the seconds of each repeat (configurations interleaved within a repeat)."""
    prefill = record_prefill(model, ids)
    first_token = prefill.last_logits.argmax(dim=-1, keepdim=True)
    for configuration in configurations:  # warm-up, and the methods' statistics computed once
        cache = fresh_cache(prefill, configuration)
        decode_seconds(model, cache, first_token, WARM_UP_TOKENS, configuration.method is not None)
    seconds: dict[str, list[float]] = {c.label: [] for c in configurations}
    for _ in range(repeats):
        for configuration in configurations:
            cache = fresh_cache(prefill, configuration)
            seconds[configuration.label].append(
                decode_seconds(model, cache, first_token, new_tokens, configuration.method is not None)
            )
            del cache
    return seconds


def summarise(seconds: dict[str, list[float]], configurations: list[Configuration], new_tokens: int) -> list[dict]:
    reference = seconds["full"]
    rows = []
    for configuration in configurations:
        runs = seconds[configuration.label]
        rows.append(
            {
                "config": configuration.label,
                "budget": configuration.budget,
                "repeats": len(runs),
                "tokens_per_s": median([new_tokens / s for s in runs]),
                # tokens/s ratio = full's seconds / this configuration's seconds, per repeat
                "speed_ratio": median_ratio(reference, runs),
            }
        )
    return rows


def configurations_for(methods: list[str], budgets: list[float]) -> list[Configuration]:
    configurations = [Configuration("full", None, 1.0), Configuration("full (kvmerger)", FullCache(), 1.0)]
    for name in methods:
        if name == "full":
            continue
        for method in MethodSpec.parse(name).variants(budgets):
            configurations.append(Configuration(f"{method_label(method)}@{method.budget:g}", method, method.budget))
    return configurations


def format_row(row: dict) -> str:
    return f"{row['config']:<32} {row['tokens_per_s']:7.2f} tokens/s   speed / full {row['speed_ratio']:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens timed per repeat")
    parser.add_argument("--methods", nargs="+", default=["kvmerger"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_speed.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be at least 1")
    configurations = configurations_for(args.methods, args.budgets)
    info = machine()
    print(
        f"# {describe_machine(info)}; {args.dtype}, {args.length}-token prompt, {args.new_tokens} tokens, "
        f"medians of {args.repeats}"
    )
    prompt_seconds = 2.2 * 4.4 * (args.length / 2048) ** 1.4
    step = 0.04 * (1 + args.length / 4096)
    estimate = prompt_seconds + step * (args.new_tokens * args.repeats + WARM_UP_TOKENS) * len(configurations)
    print(f"# expected runtime on the 2-core VM: about {minutes(estimate)}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    check_fits(model, args.length, args.new_tokens)
    ids = essay_ids(tokenizer, args.length).to(model.device)
    seconds = measure(model, ids, configurations, args.new_tokens, args.repeats)
    rows = summarise(seconds, configurations, args.new_tokens)
    for row in rows:
        print(format_row(row), flush=True)
    command = "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {"command": command.strip(), "machine": info, "rows": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
