"""GPU check: compression time vs prefill time at 16k and 32k tokens, and decode speed compressed vs
full, on a randomly initialised model with Llama-2-7B's shape in bf16, within 10 minutes.

Weights do not matter for speed, and the GPU machine can download nothing: the model is built
from its shape alone (32 layers, hidden 4096, 32 query and 32 KV heads of 128, MLP 11008, vocab
32000, RoPE theta 10000; positions up to 32768) and the prompt is random token ids.

For each length, each repeat times (CUDA-synchronised), back to back: the plain prefill (sdpa,
transformers' cache), one prefill that records what compression needs, each method compressing
it with fresh attention statistics (its own scoring, as inside `compress(model, method)`), then
``--new-tokens`` greedy decoding steps from the full cache (plain transformers) and from each
compressed cache. Reported: (scoring + method) / prefill and method / prefill, decode tokens/s
compressed / full; medians over repeats of per-repeat ratios; peak GPU memory per length.

Then two checks of padded batches (part ``batch`` and ``device-map``), each a report, not a test
(random weights in bf16 give nearly flat logits, where rounding can flip a greedy choice):

* ``batch``: a left-padded batch of prompts of different lengths (``--batch-lengths``), generated
  greedily with `generate()` for the full cache (plain transformers) and inside
  ``compress(model, method)`` for each method, against each prompt generated alone: prompts whose
  tokens are all equal, the largest logit difference over the steps before any divergence, and
  seconds of the batch against the prompts one at a time.
* ``device-map``: the same on a model loaded with ``device_map="auto"`` (saved, then reloaded by
  `from_pretrained`), with ``max_memory`` set so that about half its layers land on the GPU and
  the rest on the CPU (``--device-map-layers`` layers of the same shape, to keep it short): the
  engine's cache layers then live on different devices.

The script watches the clock: it starts no new repeat or length that its own measurements say
would end after ``--deadline`` seconds, and writes its results after every length (to ``$OUT`` when
that variable names a folder, as on the lent GPU machine, else results/benchmarks/).

    python benchmarks/gpu_check.py                      # on a GPU: 16k and 32k, kvmerger 0.5/0.35 and H2O 0.5
    python benchmarks/gpu_check.py --tiny               # the same code on a tiny shape, on the CPU (seconds)
    python benchmarks/gpu_check.py --parts batch device-map   # only the padded-batch checks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvmerger import compress, compress_prefill, get_method, record_prefill

from decode_speed import decode_seconds, plain_cache  # noqa: E402  (helpers beside this script)
from measure import RESULTS, describe_machine, machine, median, median_ratio, write_results  # noqa: E402
from overhead import fresh_statistics, time_plain_prefill  # noqa: E402

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
DEFAULT_METHODS = ["kvmerger@0.5", "kvmerger@0.35", "h2o@0.5"]
PARTS = ("lengths", "batch", "device-map")


def random_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaForCausalLM:
    """A Llama with `shape` and random weights, built directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def parse_methods(texts: list[str]) -> list:
    """["kvmerger@0.5", "h2o@0.35"] -> methods."""
    methods = []
    for text in texts:
        name, at, budget = text.partition("@")
        if not at:
            raise ValueError(f"give methods as name@budget, e.g. kvmerger@0.5; got {text!r}")
        methods.append(get_method(name, budget=float(budget)))
    return methods


def measure_repeat(model, ids: torch.Tensor, methods: list, new_tokens: int, chunk: int) -> dict[str, float]:
    """One repeat at one length: seconds of every part (keys: prefill, <label>/scoring, ...)."""
    seconds = {"prefill": time_plain_prefill(model, ids)}
    prefill = record_prefill(model, ids, chunk_size=chunk)
    first = prefill.last_logits.argmax(dim=-1, keepdim=True)
    for method in methods:
        cache, report = compress_prefill(fresh_statistics(prefill), method)
        seconds[f"{method.label()}/scoring"] = report.seconds_scoring
        seconds[f"{method.label()}/method"] = report.seconds_compressing
        seconds[f"{method.label()}/decode"] = decode_seconds(model, cache, first, new_tokens, kvmerger_path=True)
        del cache
    full = plain_cache(prefill)
    del prefill  # the plain cache holds the keys and values; the recorded queries can go
    seconds["full/decode"] = decode_seconds(model, full, first, new_tokens, kvmerger_path=False)
    del full
    return seconds


def summarise(length: int, repeats: list[dict[str, float]], methods: list, new_tokens: int) -> list[dict]:
    prefill = [r["prefill"] for r in repeats]
    full_decode = [r["full/decode"] for r in repeats]
    rows = [
        {
            "length": length,
            "method": "full",
            "repeats": len(repeats),
            "prefill_s": median(prefill),
            "decode_tokens_per_s": median([new_tokens / s for s in full_decode]),
        }
    ]
    for method in methods:
        label = method.label()
        scoring = [r[f"{label}/scoring"] for r in repeats]
        own = [r[f"{label}/method"] for r in repeats]
        decode = [r[f"{label}/decode"] for r in repeats]
        rows.append(
            {
                "length": length,
                "method": label,
                "repeats": len(repeats),
                "prefill_s": median(prefill),
                "scoring_s": median(scoring),
                "method_s": median(own),
                "overhead_ratio": median_ratio([s + m for s, m in zip(scoring, own)], prefill),
                "method_ratio": median_ratio(own, prefill),
                "decode_tokens_per_s": median([new_tokens / s for s in decode]),
                "decode_speed_ratio": median_ratio(full_decode, decode),
            }
        )
    return rows


def format_row(row: dict) -> str:
    if row["method"] == "full":
        return (
            f"{row['length']:>6} {'full':<16} prefill {row['prefill_s']:7.3f}s"
            f"{'':<78}decode {row['decode_tokens_per_s']:7.1f} tok/s"
        )
    return (
        f"{row['length']:>6} {row['method']:<16} prefill {row['prefill_s']:7.3f}s  scoring {row['scoring_s']:7.3f}s"
        f"  method {row['method_s']:7.3f}s  (scoring+method)/prefill {row['overhead_ratio']:6.3f}"
        f"  method/prefill {row['method_ratio']:6.4f}  decode {row['decode_tokens_per_s']:7.1f} tok/s"
        f"  speed / full {row['decode_speed_ratio']:.3f}"
    )


# --------------------------------------------------------------------------------------------
# Padded batches, on one device and with device_map="auto"
# --------------------------------------------------------------------------------------------


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [1, T_i] -> ids and attention mask [B, max T_i], left-padded as generate() expects."""
    longest = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.shape[1] :] = prompt[0]
        mask[row, longest - prompt.shape[1] :] = 1
    return ids, mask


@torch.no_grad()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int, method=None):
    """(new tokens [B, n], raw logits [B, n, vocab] float32, seconds) of greedy generate(), inside
    compress(model, method) unless method is None (plain transformers)."""
    started = time.perf_counter()
    with compress(model, method) if method is not None else nullcontext():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_logits=True,
        )
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    seconds = time.perf_counter() - started
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).float(), seconds


def padded_batch_rows(model, prompts: list[torch.Tensor], methods: list, new_tokens: int) -> list[dict]:
    """Per configuration: a padded batch against each prompt alone (see the module docstring)."""
    ids, mask = left_padded(prompts)
    rows = []
    for method in [None, *methods]:
        tokens, logits, batch_seconds = greedy(model, ids, mask, new_tokens, method)
        equal, largest, alone_seconds = 0, 0.0, 0.0
        for row, prompt in enumerate(prompts):
            own_tokens, own_logits, seconds = greedy(model, prompt, None, new_tokens, method)
            alone_seconds += seconds
            same = (tokens[row] == own_tokens[0]).tolist()
            steps = same.index(False) + 1 if False in same else len(same)  # up to the first divergence
            equal += all(same)
            largest = max(largest, float((logits[row, :steps] - own_logits[0, :steps]).abs().max()))
        rows.append(
            {
                "config": "full" if method is None else method.label(),
                "prompts": len(prompts),
                "prompts_equal": equal,
                "largest_logit_difference": largest,
                "batch_seconds": batch_seconds,
                "one_at_a_time_seconds": alone_seconds,
            }
        )
    return rows


def format_batch_row(row: dict) -> str:
    return (
        f"{row['config']:<16} prompts with equal tokens {row['prompts_equal']}/{row['prompts']}  largest logit "
        f"difference {row['largest_logit_difference']:.3g}  batch {row['batch_seconds']:.2f} s vs one at a time "
        f"{row['one_at_a_time_seconds']:.2f} s"
    )


def device_map_model(shape: dict, layers: int, dtype: torch.dtype, device: str):
    """A random model of `shape` with `layers` layers, saved and reloaded with device_map="auto"; on a GPU,
    max_memory lets about half of it on the GPU and the rest on the CPU. Returns (model, where its layers are)."""
    small = {**shape, "num_hidden_layers": layers}
    built = random_model(small, dtype, "cpu")
    size = sum(p.numel() * p.element_size() for p in built.parameters())
    with tempfile.TemporaryDirectory() as folder:
        built.save_pretrained(folder)
        del built
        kwargs = {"device_map": "auto", "dtype": dtype}
        if device.startswith("cuda"):
            kwargs["max_memory"] = {0: int(size * 0.55), "cpu": int(size * 4)}
        model = LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()
    placement = sorted({str(where) for where in (getattr(model, "hf_device_map", None) or {"": device}).values()})
    return model, placement


def default_out() -> Path:
    folder = os.environ.get("OUT")
    return Path(folder) / "gpu_check.json" if folder else RESULTS / "gpu_check.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: checks the script in seconds")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 16384 32768 (128 256 with --tiny)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name@budget, e.g. kvmerger@0.5")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 64; 8 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --tiny)")
    parser.add_argument("--chunk", type=int, default=None, help="queries per scoring chunk (default 512; 64 with --tiny)")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds; no new work that would end later")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu_check.json or results/benchmarks/")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which checks to run")
    parser.add_argument("--batch-lengths", type=int, nargs="+", default=None,
                        help="prompt lengths of the padded batch (default 4096 3072 2048 1024; 40 31 23 12 with --tiny)")
    parser.add_argument("--batch-new-tokens", type=int, default=16, help="tokens generated in the padded-batch checks")
    parser.add_argument("--device-map-layers", type=int, default=8, help="layers of the device_map='auto' model")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    lengths = args.lengths or ([128, 256] if args.tiny else [16384, 32768])
    new_tokens = args.new_tokens or (8 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    chunk = args.chunk or (64 if args.tiny else 512)
    out = args.out or default_out()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on the GPU machine, or with --tiny to check it on the CPU")
    shape = TINY if args.tiny else LLAMA2_7B
    if max(lengths) + new_tokens > shape["max_position_embeddings"]:
        raise SystemExit(f"lengths + new tokens exceed the shape's {shape['max_position_embeddings']} positions")
    methods = parse_methods(args.methods)
    started = time.perf_counter()
    info = machine()
    print(f"# {describe_machine(info)}; {'tiny shape' if args.tiny else 'Llama-2-7B shape'}, random weights, {args.dtype}")
    print(f"# expected runtime: under {args.deadline / 60:.0f} min (the script keeps to --deadline)", flush=True)
    model = random_model(shape, getattr(torch, args.dtype), device)
    print(f"# model built in {time.perf_counter() - started:.1f} s", flush=True)
    rows: list[dict] = []
    payload = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": info, "shape": shape, "dtype": args.dtype, "rows": rows, "stopped_early": None}
    if "lengths" in args.parts:
        warm = torch.randint(0, shape["vocab_size"], (1, min(lengths[0], 1024)), device=device)
        measure_repeat(model, warm, methods, 2, chunk)  # warm-up: kernels, allocator
        measure_lengths(model, shape, lengths, methods, new_tokens, repeats, chunk, device, args.deadline, started, payload, out)
    batch_lengths = args.batch_lengths or ([40, 31, 23, 12] if args.tiny else [4096, 3072, 2048, 1024])
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, shape["vocab_size"], (1, n), generator=generator).to(device) for n in batch_lengths]
    if time.perf_counter() - started > args.deadline and {"batch", "device-map"} & set(args.parts):
        payload["stopped_early"] = "skipped the padded-batch checks (past the deadline): run them with --parts batch device-map"
        print(f"# {payload['stopped_early']}")
        write_results(out, payload)
        return
    if "batch" in args.parts:
        print(f"# padded batch of {batch_lengths} tokens, {args.batch_new_tokens} new, vs each prompt alone", flush=True)
        payload["padded_batch"] = padded_batch_rows(model, prompts, methods, args.batch_new_tokens)
        for row in payload["padded_batch"]:
            print(format_batch_row(row), flush=True)
        write_results(out, payload)
    if "device-map" in args.parts:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        mapped, placement = device_map_model(shape, args.device_map_layers, getattr(torch, args.dtype), device)
        first = mapped.model.embed_tokens.weight.device
        print(f"# device_map='auto', {args.device_map_layers} layers on {', '.join(placement)}: the same padded batch", flush=True)
        payload["device_map"] = {
            "placement": placement,
            "rows": padded_batch_rows(mapped, [p.to(first) for p in prompts], methods, args.batch_new_tokens),
        }
        for row in payload["device_map"]["rows"]:
            print(format_batch_row(row), flush=True)
        write_results(out, payload)
    print(f"# total {time.perf_counter() - started:.0f} s")


def measure_lengths(
    model, shape: dict, lengths: list[int], methods: list, new_tokens: int, repeats: int, chunk: int, device: str,
    deadline: float, started: float, payload: dict, out: Path,
) -> None:
    """The compression-vs-prefill and decode timings at each length (the first part of the check)."""
    rows = payload["rows"]
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, length), generator=generator).to(device)
        done: list[dict[str, float]] = []
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for repeat in range(repeats):
            repeat_started = time.perf_counter()
            done.append(measure_repeat(model, ids, methods, new_tokens, chunk))
            took = time.perf_counter() - repeat_started
            remaining = repeats - repeat - 1
            if remaining and time.perf_counter() - started + took > deadline:
                payload["stopped_early"] = f"{length} tokens: {len(done)} of {repeats} repeats (deadline)"
                break
        length_rows = summarise(length, done, methods, new_tokens)
        for row in length_rows:
            if device.startswith("cuda"):
                row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(format_row(row), flush=True)
        rows.extend(length_rows)
        write_results(out, payload)
        next_lengths = lengths[lengths.index(length) + 1 :]
        if next_lengths:
            # attention makes a repeat at twice the length cost up to ~4x; stop if that would overrun
            estimate = took * (next_lengths[0] / length) ** 2
            if time.perf_counter() - started + estimate > deadline:
                payload["stopped_early"] = f"skipped {next_lengths} (a repeat would end after the deadline)"
                write_results(out, payload)
                print(f"# {payload['stopped_early']}")
                break


if __name__ == "__main__":
    main()
