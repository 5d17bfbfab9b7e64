"""Memory: cache bytes after compression / bytes of the full cache, and peak resident memory while
generating after a long prompt, compressed vs full.

Each configuration runs in its own child process (this script with ``--child``), so runs do not
pollute each other's allocator; the parent reads the child's peak resident set size from the
kernel (``os.wait4``'s ``ru_maxrss``). A child loads the model, prefills the prompt (compressing
it, or not for the full cache), then generates ``--new-tokens`` tokens greedily, one forward per
token, never stopping early. It reports, from inside:

* the bytes of the cache's keys and values right after the prompt; for a method this must be
  exactly ``ceil(budget * T) / T`` of the full cache's (checked: the script fails otherwise);
* its own peak RSS after loading (and one 16-token forward, so that every weight is resident),
  after the prompt, and at the end;
* the peak RSS *while generating*: after the prompt, freed memory is handed back to the kernel
  (``malloc_trim``) and the kernel's high-water mark is reset (``/proc/self/clear_refs``, Linux),
  so this peak is what decoding needs with the cache as it is, without the prefill's transient.

The full cache is plain transformers (no kvmerger attached): what a user has without kvmerger.
Reported ratios, compressed / full: cache bytes, peak RSS over the whole run (reached during the
prefill, where every method still holds the full cache and its activations), peak RSS while
generating, and both above the loaded model (what inference itself added). The default prompt is 8192 - 256 = 7936 tokens, so that prompt
and answer fit the default model's 8k context.

    python benchmarks/memory.py                                   # full, kvmerger@0.5, kvmerger@0.35
    python benchmarks/memory.py --methods kvmerger h2o --budgets 0.5 --length 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from measure import RESULTS, describe_machine, machine, median, median_ratio, minutes, write_results

DEFAULT_LENGTH = 8192 - 256


# --------------------------------------------------------------------------------------------
# The child: one configuration
# --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_new_peak() -> bool:
    """Return freed heap to the kernel and reset the RSS high-water mark; False where unsupported."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset() -> int | None:
    """VmHWM from /proc/self/status: the peak RSS since start_new_peak() (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def generation_peak(model, cache, logits, new_tokens: int) -> int | None:
    """Decode `new_tokens` tokens and return the peak RSS during decoding (None if not measurable)."""
    measurable = start_new_peak()
    decode(model, cache, logits, new_tokens)
    return peak_rss_since_reset() if measurable else None


def run_child(config: dict) -> dict:
    import torch

    from kvmerger import compress, get_method, load_model
    from kvmerger.methods.base import slots_for_budget
    from measure import check_fits, essay_ids

    model, tokenizer = load_model(config["model"], dtype=config["dtype"])
    ids = essay_ids(tokenizer, config["length"])
    with torch.no_grad():  # touch every weight once, so that "after load" counts the whole model
        model(ids[:, :16], use_cache=False, logits_to_keep=1)
    after_load = peak_rss_bytes()
    check_fits(model, config["length"], config["new_tokens"])
    result = {"config": config, "rss_after_load": after_load}
    with torch.no_grad():
        if config["method"] == "full":
            output = model(ids, use_cache=True, logits_to_keep=1)
            cache = output.cache
            result["rss_after_prompt"] = peak_rss_bytes()
            result["cache_bytes_after_prompt"] = kv_bytes(cache)
            result["full_cache_bytes"] = result["cache_bytes_after_prompt"]
            result["generation_peak_rss"] = generation_peak(model, cache, output.logits, config["new_tokens"])
        else:
            method = get_method(config["method"], budget=config["budget"])
            with compress(model, method) as session:
                output = model(ids, use_cache=True, logits_to_keep=1)
                cache = output.cache
                result["rss_after_prompt"] = peak_rss_bytes()
                result["cache_bytes_after_prompt"] = kv_bytes(cache)
                result["full_cache_bytes"] = session.report.bytes_before
                result["slots_per_head"] = sorted({layer.slots_after for layer in session.report.layers})
                result["expected_slots"] = slots_for_budget(config["length"], config["budget"])
                result["keeps_budget"] = method.keeps_budget()
                result["generation_peak_rss"] = generation_peak(model, cache, output.logits, config["new_tokens"])
    result["cache_bytes_at_end"] = kv_bytes(cache)
    result["rss_at_end"] = peak_rss_bytes()
    return result


def decode(model, cache, logits, new_tokens: int) -> None:
    """Greedy decoding of `new_tokens` tokens, one forward each, never stopping early."""
    import torch

    token = logits[:, -1:].argmax(dim=-1)
    for _ in range(new_tokens - 1):
        logits = model(token, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(dim=-1)
        del logits
    torch.cuda.synchronize() if torch.cuda.is_available() else None


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (biases, if any, not included)."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------
# The parent: configurations in child processes, ratios
# --------------------------------------------------------------------------------------------


def run_in_child(config: dict) -> dict:
    """Run one configuration in a fresh process; returns its report plus the kernel's peak RSS."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the child for {config} failed with exit code {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = whole_run_peak(usage.ru_maxrss, result)
    return result


def whole_run_peak(kernel_max_rss_kib: int, result: dict) -> int:
    """The child's peak RSS over the whole run, in bytes.

    Resetting the high-water mark for the generation phase also resets what the kernel reports
    at exit, so the run's peak is the larger of that and the child's own reading before the reset.
    """
    return max(kernel_max_rss_kib * 1024, result["rss_after_prompt"])


def check_budget(result: dict) -> float:
    """The cache-bytes ratio of a compressed run; raises unless it is exactly slots / length."""
    ratio = result["cache_bytes_after_prompt"] / result["full_cache_bytes"]
    config = result["config"]
    if config["method"] == "full" or not result.get("keeps_budget", True):
        return ratio
    expected = result["expected_slots"] / config["length"]
    if result["cache_bytes_after_prompt"] * config["length"] != result["full_cache_bytes"] * result["expected_slots"]:
        raise AssertionError(
            f"{config['method']}@{config['budget']}: cache bytes ratio {ratio:.6f}, but the budget means exactly "
            f"{result['expected_slots']}/{config['length']} = {expected:.6f}"
        )
    return ratio


def summarise(results: list[dict]) -> list[dict]:
    """Per configuration: medians over repeats, and ratios to the full cache of the same repeat."""
    full = [r for r in results if r["config"]["method"] == "full"]
    if not full:
        raise ValueError("the memory benchmark needs the full cache among its configurations")
    rows = []
    labels = []
    for result in results:
        label = label_of(result["config"])
        if label not in labels:
            labels.append(label)
    for label in labels:
        runs = [r for r in results if label_of(r["config"]) == label]
        pairs = list(zip(runs, full))
        rows.append(
            {
                "config": label,
                "repeats": len(runs),
                "cache_bytes_after_prompt": median([r["cache_bytes_after_prompt"] for r in runs]),
                "cache_bytes_ratio": median([check_budget(r) for r in runs]),
                "budget": runs[0]["config"].get("budget"),
                "peak_rss": median([r["peak_rss"] for r in runs]),
                "peak_rss_ratio": median_ratio([r["peak_rss"] for r, _ in pairs], [f["peak_rss"] for _, f in pairs]),
                "inference_rss": median([r["peak_rss"] - r["rss_after_load"] for r in runs]),
                "inference_rss_ratio": median_ratio(
                    [r["peak_rss"] - r["rss_after_load"] for r, _ in pairs],
                    [f["peak_rss"] - f["rss_after_load"] for _, f in pairs],
                ),
                **generation_columns(pairs),
                "rss_after_load": median([r["rss_after_load"] for r in runs]),
                "rss_after_prompt": median([r["rss_after_prompt"] for r in runs]),
            }
        )
    return rows


def generation_columns(pairs: list[tuple[dict, dict]]) -> dict:
    """Peak RSS while generating and its ratios to the full cache, per (run, full run) pair of a
    repeat; None throughout where the OS could not measure it."""
    names = ("generation_peak_rss", "generation_peak_rss_ratio", "generation_rss_above_load_ratio")
    if any(run["generation_peak_rss"] is None for pair in pairs for run in pair):
        return dict.fromkeys(names)
    runs, full = [run for run, _ in pairs], [f for _, f in pairs]

    def peaks(results: list[dict]) -> list[float]:
        return [r["generation_peak_rss"] for r in results]

    def above_load(results: list[dict]) -> list[float]:
        return [r["generation_peak_rss"] - r["rss_after_load"] for r in results]

    values = (
        median(peaks(runs)),
        median_ratio(peaks(runs), peaks(full)),
        median_ratio(above_load(runs), above_load(full)),
    )
    return dict(zip(names, values))


def label_of(config: dict) -> str:
    return "full" if config["method"] == "full" else f"{config['method']}@{config['budget']:g}"


def configurations(args: argparse.Namespace) -> list[dict]:
    common = {"model": args.model, "dtype": args.dtype, "length": args.length, "new_tokens": args.new_tokens}
    configs = [{**common, "method": "full", "budget": 1.0}]
    configs += [{**common, "method": m, "budget": b} for m in args.methods if m != "full" for b in args.budgets]
    return configs


def format_row(row: dict) -> str:
    budget = "" if row["budget"] in (None, 1.0) else f" (budget {row['budget']:g})"
    return (
        f"{row['config']:<18} cache {row['cache_bytes_after_prompt'] / 2**20:8.1f} MiB"
        f"  ratio {row['cache_bytes_ratio']:.4f}{budget:<15}"
        f"  peak RSS {row['peak_rss'] / 2**20:7.0f} MiB  ratio {row['peak_rss_ratio']:.3f}"
        f"  above the loaded model {row['inference_rss'] / 2**20:6.0f} MiB  ratio {row['inference_rss_ratio']:.3f}"
        + format_generation(row)
    )


def format_generation(row: dict) -> str:
    if row["generation_peak_rss"] is None:
        return "  (peak while generating: not measurable on this OS)"
    return (
        f"  | while generating: peak {row['generation_peak_rss'] / 2**20:7.0f} MiB"
        f"  ratio {row['generation_peak_rss_ratio']:.3f}"
        f"  above the loaded model ratio {row['generation_rss_above_load_ratio']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated after the prompt")
    parser.add_argument("--methods", nargs="+", default=["kvmerger"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--repeats", type=int, default=1, help="peak RSS varies little; more repeats take medians")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be at least 1")
    configs = configurations(args)
    info = machine()
    per_child = 4.4 * (args.length / 2048) ** 1.5 + 0.05 * args.new_tokens * (args.length / 2048) ** 0.5
    print(f"# {describe_machine(info)}; {args.dtype}, {args.length}-token prompt, {args.new_tokens} new tokens")
    print(f"# expected runtime on the 2-core VM: about {minutes(per_child * len(configs) * args.repeats)}")
    results = [run_in_child(config) for _ in range(args.repeats) for config in configs]
    rows = summarise(results)
    for row in rows:
        print(format_row(row), flush=True)
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, {"command": command.strip(), "machine": info, "rows": rows, "runs": results})


if __name__ == "__main__":
    main()
