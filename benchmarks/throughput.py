"""Throughput of batched generation: padded batches of long prompts, full cache vs compressed.

For each batch size, the batch holds that many prompts of different lengths (prompt i of a batch of
B: ``length - i * length // (4 B)`` tokens of its own window of the essays, so from ``length`` down
to about 3/4 of it), left-padded as `generate()` expects. Configurations:

* ``full``: plain transformers (a `DynamicCache`, no kvmerger attached), what a user has without it;
* ``method@budget``: inside ``kvmerger.compress(model, method)``: each prompt compressed on its own
  tokens to its own budget, padded to the longest with masked slots.

One child process per batch size (this script with ``--child``) loads the model once, then for each
configuration in turn runs the prompt through `generate()` (one new token: the prefill, and the
compression) and keeps its cache; then it decodes ``--new-tokens - 1`` more tokens greedily for every
configuration, one step each in turn (interleaved, so that a busy machine slows them alike; only the
forward pass is timed), with each prompt's own attention mask and positions, as `generate()` does.
Reported per configuration: generated tokens/s while decoding (batch x (new tokens - 1) / decoding
seconds) and end to end (batch x new tokens / (prefill + decoding seconds)), each with its ratio to
the full cache; the memory the prefill needed above what the process held before it (peak RSS,
with the high-water mark reset first, as benchmarks/memory.py does; for the first configuration
that is above the loaded model); cache bytes after the prompt and at the end (keys, values and
per-slot biases, masked padding slots included), with ratios to the full cache's.

``--cap-batch B --cap-gib X`` then runs the full cache and ``--cap-methods`` at batch B, each in its
own child whose address space is limited (``RLIMIT_AS``) to what it had mapped after loading the
model plus X GiB: a machine with X GiB for inference above the model. `generate()` makes
``--cap-new-tokens`` tokens; a run that fails to allocate reports "out of memory" with the error.
X is the caller's choice of machine size; the table prints it.

    python benchmarks/throughput.py                       # batches 1 4 8 16, 2048 tokens, 128 new (~40 min)
    python benchmarks/throughput.py --batches --cap-batch 16 --length 512 --cap-gib 0.5   # only the capped runs
    python benchmarks/throughput.py --batches 2 --length 256 --new-tokens 8 --configs full kvmerger@0.35  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from measure import RESULTS, describe_machine, machine, minutes, write_results

DEFAULT_CONFIGS = ["full", "kvmerger@0.5", "kvmerger@0.35", "h2o@0.35"]
GIB = 2**30


# --------------------------------------------------------------------------------------------
# The child: one configuration at one batch size
# --------------------------------------------------------------------------------------------


def prompt_lengths(length: int, batch: int) -> list[int]:
    """Different lengths from `length` down to about 3/4 of it."""
    return [length - i * length // (4 * batch) for i in range(batch)]


def padded_batch(tokenizer, length: int, batch: int):
    """Left-padded ids and attention mask [batch, length]: prompt i from its own window of the essays."""
    import torch

    from measure import essay_ids

    lengths = prompt_lengths(length, batch)
    text = essay_ids(tokenizer, length * batch)[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((batch, length), pad, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, own in enumerate(lengths):
        ids[row, length - own :] = text[row * length : row * length + own]
        mask[row, length - own :] = 1
    return ids, mask, pad


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_bytes(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def cap_address_space(gib: float) -> int:
    """Limit this process's address space to what it maps now plus `gib` GiB; returns the limit."""
    limit = status_bytes("VmSize") + int(gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


class Clock:
    """A `generate()` streamer that times the first new token and the last, and resets the RSS
    high-water mark once the prompt is processed (benchmarks/memory.py's `start_new_peak`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.puts = 0
        self.rss_after_prompt: int | None = None
        self.peak_measurable = False

    def put(self, value) -> None:
        self.puts += 1
        now = time.perf_counter()
        if self.puts == 2:  # the first call carries the prompt, the second the first new tokens
            from memory import start_new_peak

            self.rss_after_prompt = peak_rss_bytes()
            self.peak_measurable = start_new_peak()
            self.first = time.perf_counter()
        else:
            self.last = now

    def end(self) -> None:
        self.last = time.perf_counter()


def load_for(config: dict):
    """The model (every weight touched once, so that "after load" counts it all) and the padded batch."""
    import torch

    from kvmerger import load_model

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    model, tokenizer = load_model(config["model"], dtype=config["dtype"])
    ids, mask, pad = padded_batch(tokenizer, config["length"], config["batch"])
    with torch.no_grad():
        model(ids[:1, -16:], use_cache=False, logits_to_keep=1)
    return model, ids, mask, pad


def run_child(config: dict) -> dict:
    import torch

    from kvmerger import compress, get_method

    model, ids, mask, pad = load_for(config)
    result = {"config": config, "rss_after_load": peak_rss_bytes(), "lengths": prompt_lengths(config["length"], config["batch"])}
    if config.get("cap_gib") is not None:
        result["address_space_limit"] = cap_address_space(config["cap_gib"])
    clock = Clock()
    method = None if config["method"] == "full" else get_method(config["method"], budget=config["budget"])
    try:
        with torch.no_grad():
            if method is None:
                out = generate(model, ids, mask, pad, config["new_tokens"], clock)
                cache = out.cache
                result["cache_bytes_after_prompt"] = cache_bytes(cache) * config["length"] // layer_tokens(cache)
            else:
                with compress(model, method) as session:
                    out = generate(model, ids, mask, pad, config["new_tokens"], clock)
                cache = out.cache
                result["cache_bytes_after_prompt"] = session.report.cache_bytes_after
                result["sequence_slots"] = session.report.layers[0].notes.get("sequence_slots")
    except (RuntimeError, MemoryError) as error:  # torch reports a failed allocation as a RuntimeError
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result["out_of_memory"] = str(error).splitlines()[0][:200]
        result["peak_rss"] = peak_rss_bytes()
        return result
    result["generated"] = int(out.sequences.shape[1] - ids.shape[1])
    result["cache_bytes_at_end"] = cache_bytes(cache)
    result["prefill_seconds"] = clock.first - clock.start
    result["decode_seconds"] = clock.last - clock.first
    result["rss_after_prompt"] = clock.rss_after_prompt
    result["generation_peak_rss"] = status_bytes("VmHWM") if clock.peak_measurable else None
    return result


def run_batch(config: dict) -> dict:
    """One batch size, every configuration in one process: prefills in turn, then interleaved decoding."""
    import torch

    from kvmerger import compress, get_method
    from memory import start_new_peak

    model, ids, mask, pad = load_for(config)
    runs = []
    for method_name, budget in config["configs"]:
        method = None if method_name == "full" else get_method(method_name, budget=budget)
        block = None if method is None else compress(model, method)
        measurable = start_new_peak()
        before = status_bytes("VmRSS")
        started = time.perf_counter()
        with torch.no_grad(), block if block is not None else nullcontext():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad,
                return_dict_in_generate=True,
            )
        prefill = time.perf_counter() - started
        cache = out.cache
        runs.append(
            {
                "config": {**config, "method": method_name, "budget": budget},
                "block": block,
                "cache": cache,
                "token": out.sequences[:, -1:],
                "prefill_seconds": prefill,
                "prefill_memory": (status_bytes("VmHWM") - before) if measurable else None,
                "cache_bytes_after_prompt": cache_bytes(cache),
                "sequence_slots": None if block is None else block.session.report.layers[0].notes.get("sequence_slots"),
                "decode_seconds": 0.0,
            }
        )
    decode_interleaved(model, runs, mask, config["new_tokens"] - 1)
    return {
        "lengths": prompt_lengths(config["length"], config["batch"]),
        "runs": [
            {key: value for key, value in run.items() if key not in ("block", "cache", "token")}
            | {"cache_bytes_at_end": cache_bytes(run["cache"])}
            for run in runs
        ],
    }


def decode_interleaved(model, runs: list[dict], mask, steps: int) -> None:
    """`steps` greedy decoding steps for every run, one step each in turn; adds each run's forward-pass
    seconds to its "decode_seconds". Each prompt's new tokens get its own next positions (its prompt
    length onwards) and the attention mask grows by ones, as `generate()` does."""
    import torch

    positions = mask.sum(dim=-1, keepdim=True)  # the first new token stands at each prompt's own length
    for step in range(steps):
        step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], step + 1)], dim=-1)
        for run in runs:
            with torch.no_grad(), run["block"] if run["block"] is not None else nullcontext():
                started = time.perf_counter()
                logits = model(
                    run["token"], cache=run["cache"], attention_mask=step_mask, position_ids=positions + step,
                    use_cache=True,
                ).logits
                run["decode_seconds"] += time.perf_counter() - started
            run["token"] = logits[:, -1:].argmax(dim=-1)


def generate(model, ids, mask, pad: int, new_tokens: int, clock: Clock):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=pad, streamer=clock, return_dict_in_generate=True,
    )


def cache_bytes(cache) -> int:
    """Keys, values and per-slot biases of every layer (masked padding slots included). `generate()`
    hands back its own cache object, whose layers kvmerger replaced by its own: count per layer."""
    from kvmerger.engine.hf import layer_nbytes

    return sum(layer_nbytes(layer) for layer in cache.layers)


def layer_tokens(cache) -> int:
    return cache.layers[0].keys.shape[-2]


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


def run_in_child(config: dict) -> dict:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)], stdout=subprocess.PIPE, text=True
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"the child for {config} failed with exit code {code}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if "runs" not in result:  # one configuration (a capped run): the kernel's peak for the whole process
        result["peak_rss"] = max(usage.ru_maxrss * 1024, result.get("rss_after_prompt") or 0, result.get("peak_rss") or 0)
    return result


def cap_size(text: str) -> float | str:
    return text if text == "auto" else float(text)


def auto_cap(rows: list[dict], batch: int, label: str) -> float:
    """GiB halfway between the full cache's prefill memory and `label`'s at `batch` (from the table)."""
    found = {row["config"]: row["prefill_memory"] for row in rows if row["batch"] == batch}
    if found.get("full") is None or found.get(label) is None:
        raise SystemExit(f"--cap-gib auto needs batch {batch} with full and {label} in the table, with memory measured")
    return (found["full"] + found[label]) / 2 / GIB


def parse_config(text: str) -> tuple[str, float]:
    if text == "full":
        return "full", 1.0
    name, _, budget = text.partition("@")
    if not budget:
        raise argparse.ArgumentTypeError(f"a configuration is 'full' or METHOD@BUDGET, got {text!r}")
    return name, float(budget)


def rows_for_batch(results: list[dict]) -> list[dict]:
    """Per configuration of one batch size: tokens/s, memory and cache bytes, with ratios to `full`."""
    full = next(r for r in results if r["config"]["method"] == "full")
    rows = []
    for r in results:
        batch, new = r["config"]["batch"], r["config"]["new_tokens"]
        decode = batch * (new - 1) / r["decode_seconds"]
        total = batch * new / (r["prefill_seconds"] + r["decode_seconds"])
        full_decode = batch * (new - 1) / full["decode_seconds"]
        full_total = batch * new / (full["prefill_seconds"] + full["decode_seconds"])
        rows.append(
            {
                "batch": batch,
                "config": label_of(r["config"]),
                "decode_tokens_per_s": decode,
                "decode_ratio": decode / full_decode,
                "total_tokens_per_s": total,
                "total_ratio": total / full_total,
                "prefill_memory": r["prefill_memory"],
                "prefill_memory_ratio": None if r["prefill_memory"] is None else r["prefill_memory"] / full["prefill_memory"],
                "cache_bytes_after_prompt": r["cache_bytes_after_prompt"],
                "cache_ratio_after_prompt": r["cache_bytes_after_prompt"] / full["cache_bytes_after_prompt"],
                "cache_bytes_at_end": r["cache_bytes_at_end"],
                "cache_ratio_at_end": r["cache_bytes_at_end"] / full["cache_bytes_at_end"],
            }
        )
    return rows


def label_of(config: dict) -> str:
    return "full" if config["method"] == "full" else f"{config['method']}@{config['budget']:g}"


def mib(count: float | None) -> str:
    return "n/a" if count is None else f"{count / 2**20:.0f}"


TABLE_HEAD = (
    "| batch | config | decode tokens/s | / full | end-to-end tokens/s | / full | prefill memory, MiB | / full "
    "| cache after prompt, MiB | / full | cache at end, MiB | / full |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    ratio = "n/a" if row["prefill_memory_ratio"] is None else f"{row['prefill_memory_ratio']:.2f}"
    return (
        f"| {row['batch']} | {row['config']} | {row['decode_tokens_per_s']:.2f} | {row['decode_ratio']:.2f} | "
        f"{row['total_tokens_per_s']:.2f} | {row['total_ratio']:.2f} | {mib(row['prefill_memory'])} | {ratio} | "
        f"{mib(row['cache_bytes_after_prompt'])} | {row['cache_ratio_after_prompt']:.3f} | "
        f"{mib(row['cache_bytes_at_end'])} | {row['cache_ratio_at_end']:.3f} |"
    )


def format_capped(result: dict, gib: float) -> str:
    label = label_of(result["config"])
    above = mib(result["peak_rss"] - result["rss_after_load"])
    if "out_of_memory" in result:
        return f"| {result['config']['batch']} | {label} | {gib:g} | out of memory ({result['out_of_memory']}) | {above} |"
    return (
        f"| {result['config']['batch']} | {label} | {gib:g} | generated {result['generated']} tokens per prompt, "
        f"{result['config']['batch'] * (result['generated'] - 1) / result['decode_seconds']:.1f} tokens/s decoding | {above} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=2048, help="tokens of the longest prompt of a batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 16], help="none: only the capped runs")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=[parse_config(c) for c in DEFAULT_CONFIGS])
    parser.add_argument("--cap-batch", type=int, default=None, help="batch size run under the memory cap")
    parser.add_argument("--cap-gib", type=cap_size, default=None,
                        help="GiB above the loaded model under the cap, or 'auto': halfway between the prefill memory "
                        "of the full cache and of the first --cap-methods at --cap-batch in the table above")
    parser.add_argument("--cap-methods", type=parse_config, nargs="+", default=[parse_config("kvmerger@0.35")])
    parser.add_argument("--cap-new-tokens", type=int, default=16, help="tokens generated per prompt under the cap")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the children (default: torch's); 1 on a machine shared with other jobs")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        config = json.loads(args.child)
        print(json.dumps(run_batch(config) if "configs" in config else run_child(config)))
        return
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decoding is timed after the first new token)")
    if (args.cap_batch is None) != (args.cap_gib is None):
        parser.error("give --cap-batch and --cap-gib together")
    if ("full", 1.0) not in args.configs:
        parser.error("the configurations must include 'full' (every ratio is taken against it)")
    common = {"model": args.model, "dtype": args.dtype, "length": args.length, "threads": args.threads}
    info = machine()
    # rough, fitted to the idle 2-core VM of 2026-12-01 (batches 1, 4 and 16 took 4, 7 and 9.3 min for 4, 4 and 2
    # configurations): ~12 s of prefill per 2k-token prompt, decode steps growing with the batch's cache, ~15 s per child
    scale = args.length / 2048
    estimate = len(args.configs) * sum(
        15.0 + batch * 12.0 * scale**1.3 + args.new_tokens * (0.1 + 0.035 * batch * scale) for batch in args.batches
    )
    print(f"# {describe_machine(info)}; {args.dtype}, prompts of {args.length} tokens and shorter, {args.new_tokens} new")
    print(f"# expected runtime on the 2-core VM: about {minutes(estimate)} (+ the capped runs)", flush=True)
    print(TABLE_HEAD, flush=True)
    results, rows = [], []
    for batch in args.batches:
        config = {**common, "batch": batch, "new_tokens": args.new_tokens, "configs": args.configs}
        batch_results = run_in_child(config)["runs"]
        for row in rows_for_batch(batch_results):
            print(format_row(row), flush=True)
            rows.append(row)
        results += batch_results
    capped = []
    if args.cap_batch is not None:
        if args.cap_gib == "auto":
            method, budget = args.cap_methods[0]
            args.cap_gib = round(auto_cap(rows, args.cap_batch, label_of({"method": method, "budget": budget})), 3)
        print("\n| batch | config | GiB above the model (address space) | result | peak RSS above model, MiB |")
        print("|---|---|---|---|---|", flush=True)
        for method, budget in [("full", 1.0), *args.cap_methods]:
            config = {
                **common, "batch": args.cap_batch, "new_tokens": args.cap_new_tokens, "method": method,
                "budget": budget, "cap_gib": args.cap_gib,
            }
            capped.append(run_in_child(config))
            print(format_capped(capped[-1], args.cap_gib), flush=True)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {"command": command.strip(), "machine": info, "rows": rows, "runs": results, "capped": capped})


if __name__ == "__main__":
    main()
