"""The kvpress half of benchmarks/kvpress_compare.py; runs inside kvpress's own virtual environment.

NVIDIA's kvpress (https://github.com/NVIDIA/kvpress, PyPI `kvpress`) pins transformers < 5.3, so
it cannot share kvmerger's environment. kvpress_compare.py writes the prompts as token ids to a
JSON file and runs this script with the other environment's Python:

    .venv-kvpress/bin/python benchmarks/kvpress_side.py INPUT.json OUTPUT.json

It imports nothing from kvmerger's package (whose engine needs transformers 5.24), except the
metric functions, loaded from kvmerger/evaluation/metrics.py by file path (that file needs only
torch), so that both libraries are scored by the same code.

How each press runs, kvpress's own way (its query-agnostic protocol, `KVPressTextGenerationPipeline`):

* questions: the pipeline's `_forward` on our token ids (its `preprocess`, which would apply a
  chat template, is skipped: the ids are given): the context is prefilled with `model.model(...)`
  inside `with press(model):`, then the question is fed with its true positions and answered by
  greedy decoding that stops at the end-of-sequence token or `max_new_tokens`. Stop strings are
  applied afterwards by kvpress_compare.py, as kvmerger's harness applies them while decoding;
  greedy decoding makes the two the same;
* language modelling: the prefix prefilled inside `with press(model):`, then the continuation
  teacher-forced in one chunk with its true positions, outside the press (kvpress only compresses
  during the prefill); KL to kvmerger's full-cache distributions, passed in as a file.

Budgets: kvpress keeps ``int(T * (1 - compression_ratio))`` pairs per head, kvmerger
``ceil(budget * T)``. For each prompt the compression ratio is set to ``1 - (slots + 0.5) / T``,
where `slots` is kvmerger's count, so that kvpress keeps exactly the same number of slots (the
nominal ratio stays 1 - budget, moved by less than 1.5/T); the cache is checked after every run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

# The presses compared: the name the table shows -> kvpress's class (looked up when a press is built,
# so that this module imports without kvpress: the tests read its pure functions).
PRESSES: dict[str, str] = {
    "SnapKV": "SnapKVPress",
    "StreamingLLM": "StreamingLLMPress",
    "K-norm": "KnormPress",
    "ExpectedAttention": "ExpectedAttentionPress",
    "ObservedAttention": "ObservedAttentionPress",
    "TOVA": "TOVAPress",
    "Merging(K-norm)": "MergingPress",
    "KVzip": "KVzipPress",
    "KVzip-per-head": "KVzipPress",
}
# Run only when named, for they prefill the context 2-3 times more. kvpress 0.5.5's KVzipPress masks the
# evicted pairs instead of removing them (its cache keeps every slot, so the slot check fails) and shares
# each layer's budget across its heads, a different rule from kvmerger's kvzip (the same count per head).
# "KVzip-per-head" is kvpress's KVzip scoring under kvmerger's rule (`per_head_kvzip`): the like-for-like row.
OPT_IN_PRESSES = ("KVzip", "KVzip-per-head")
NEEDS_EAGER = {"ObservedAttention"}  # it reads the attention weights, which only eager attention returns
NO_PRESS = "no press"
KL_QUANTILE = 0.99  # as kvmerger's LanguageModeling (language_modeling.KL_QUANTILE; this side cannot import kvmerger)


def compression_ratio_for(length: int, slots: int) -> float:
    """The kvpress compression ratio that keeps exactly `slots` of `length` pairs per head."""
    if not 1 <= slots <= length:
        raise ValueError(f"slots must lie in [1, {length}]; got {slots}")
    return 1.0 - (slots + 0.5) / length


def kvpress_kept(length: int, ratio: float) -> int:
    """kvpress's own count (`kvpress.utils.compute_n_kept` in 0.5.5), for checking the ratio above."""
    if ratio >= 1.0:
        return 0
    return max(1, int(length * (1 - ratio)))


def build_press(name: str, ratio: float):
    import kvpress

    if name == NO_PRESS:
        return None
    if name == "Merging(K-norm)":
        return kvpress.MergingPress(press=kvpress.KnormPress(compression_ratio=ratio))
    if name == "KVzip":  # every layer the same ratio, as kvmerger's kvzip (kvpress's default ranks across layers)
        return kvpress.KVzipPress(compression_ratio=ratio, layerwise=True)
    if name == "KVzip-per-head":
        return per_head_kvzip(ratio)
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def top_slots_per_head(scores, kept: int, sinks: int):
    """[..., kept] positions, ascending, of the `kept` highest `scores` [..., T] per head; the first `sinks` always."""
    import torch

    scores = scores.clone()
    scores[..., :sinks] = torch.inf
    return scores.topk(kept, dim=-1).indices.sort(dim=-1).values


def per_head_kvzip(ratio: float):
    """kvpress's KVzip scoring under kvmerger's kvzip rule, for a like-for-like row.

    Two changes to kvpress 0.5.5's `KVzipPress`, its scoring untouched:
    * the repeated context starts after the `n_sink` sink tokens, not after a chat-template header
      (kvpress assumes a chat-formatted context and would leave the header's tokens unscored; the
      harness's prompts are plain text, and kvmerger's reconstruction repeats everything after the
      sinks), so both softmaxes run over the same keys: sinks, the chunk, the repeat's own;
    * every layer and KV head keeps the same `int(T * (1 - ratio))` pairs, the highest-scored and the
      sinks, and the others are removed from the cache instead of masked, so the slot check holds.
    """
    import kvpress

    class KVzipPerHeadPress(kvpress.KVzipPress):
        def prepare(self, model, tokenizer, prev_postfix_size=8):
            self.prefix_length = self.n_sink  # read by prepare and then as the first chunk's start
            return super().prepare(model, tokenizer, prev_postfix_size)

        def compress_post(self, model):
            kept = kvpress_kept(self.score_val.shape[-1], self.compression_ratio)
            for layer_idx, layer in enumerate(self._cache.layers):
                slots = top_slots_per_head(self.score_val[layer_idx], kept, self.n_sink)
                index = slots.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys = layer.keys.gather(2, index)
                layer.values = layer.values.gather(2, index)

    return KVzipPerHeadPress(compression_ratio=ratio, layerwise=True)


def load_metrics(path: str):
    """kvmerger/evaluation/metrics.py as a module of its own (it imports only torch and the stdlib)."""
    spec = importlib.util.spec_from_file_location("kvmerger_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lm_metrics(metrics, reference_logits, logits, targets) -> dict[str, float]:
    """The same numbers as kvmerger's `LanguageModeling.measure`, from the same metric functions."""
    nll = metrics.token_nll(logits, targets)
    kl = metrics.kl_divergence(reference_logits, logits).flatten()
    agreement = float((reference_logits.argmax(-1) == logits.argmax(-1)).float().mean())
    return {
        "perplexity": float(nll.mean().exp()),
        "nll": float(nll.mean()),
        "kl": float(kl.mean()),
        "kl_p99": float(kl.quantile(KL_QUANTILE)),
        "kl_max": float(kl.max()),
        "top1_agreement": agreement,
        "top1_changed": 1.0 - agreement,
    }


def cache_slots(cache) -> list[int]:
    return sorted({int(layer.keys.shape[-2]) for layer in cache.layers})


def load(spec: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    dtype = getattr(torch, spec["dtype"])
    source = Path(spec["model"])
    kwargs = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    folder = str(source.parent if source.suffix == ".gguf" else source)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


def press_for(press_name: str, length: int, item: dict, budget: float | None):
    """(slots kvmerger keeps, kvpress's compression ratio, the press) for one sample or window."""
    slots = length if budget is None else item["slots"][str(budget)]
    ratio = None if budget is None else compression_ratio_for(length, slots)
    return slots, ratio, build_press(press_name, ratio)


def run_question(pipeline, press_name: str, sample: dict, budget: float | None) -> dict:
    import torch
    from transformers import DynamicCache

    context = torch.tensor([sample["context_ids"]])
    question = torch.tensor([sample["question_ids"]])
    slots, ratio, press = press_for(press_name, context.shape[1], sample, budget)
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.no_grad():
        answers = pipeline._forward(
            {"context_ids": context, "questions_ids": [question]},
            max_new_tokens=sample["max_new_tokens"],
            press=press,
            cache=cache,
        )
    return {
        "id": sample["id"],
        "press": press_name,
        "budget": budget,
        "compression_ratio": ratio,
        "text": answers[0],
        "slots": cache_slots(cache),
        "expected_slots": slots,
        "seconds": time.perf_counter() - start,
    }


def run_window(model, metrics, press_name: str, window: dict, budget: float | None) -> dict:
    import torch
    from transformers import DynamicCache

    prefix = torch.tensor([window["prefix_ids"]])
    fed = torch.tensor([window["fed_ids"]])
    targets = torch.tensor([window["target_ids"]])
    length = prefix.shape[1]
    slots, ratio, press = press_for(press_name, length, window, budget)
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.no_grad():
        with press(model) if press is not None else nullcontext():
            model.model(input_ids=prefix, past_key_values=cache)
        slots_after = cache_slots(cache)
        positions = torch.arange(length, length + fed.shape[1]).unsqueeze(0)
        logits = model(input_ids=fed, past_key_values=cache, position_ids=positions).logits.float()
    reference = torch.load(window["reference"])
    return {
        "id": window["id"],
        "press": press_name,
        "budget": budget,
        "compression_ratio": ratio,
        "metrics": lm_metrics(metrics, reference, logits, targets),
        "slots": slots_after,
        "expected_slots": slots,
        "seconds": time.perf_counter() - start,
    }


def environment() -> dict[str, str]:
    import kvpress  # noqa: F401
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("kvpress", "transformers", "torch")}


def main(input_path: str, output_path: str) -> None:
    from kvpress import KVPressTextGenerationPipeline

    spec = json.loads(Path(input_path).read_text())
    model, tokenizer = load(spec)
    pipeline = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    metrics = load_metrics(spec["metrics_path"])
    result: dict[str, Any] = {"environment": environment(), "questions": [], "windows": [], "errors": {}}
    runs = [(NO_PRESS, None)] + [(name, budget) for name in spec["presses"] for budget in spec["budgets"]]
    runs.sort(key=lambda run: run[0] in NEEDS_EAGER)  # sdpa first, then the eager ones
    for press_name, budget in runs:
        label = press_name if budget is None else f"{press_name}@{budget:g}"
        model.set_attn_implementation("eager" if press_name in NEEDS_EAGER else "sdpa")
        try:
            questions = [run_question(pipeline, press_name, sample, budget) for sample in spec["questions"]]
            windows = [run_window(model, metrics, press_name, window, budget) for window in spec["windows"]]
            result["questions"] += questions
            result["windows"] += windows
            print(f"kvpress side: {label} done", file=sys.stderr, flush=True)
        except Exception as error:  # a press that cannot run here is reported, not fatal
            result["errors"][label] = f"{type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
        Path(output_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: kvpress_side.py INPUT.json OUTPUT.json (written by benchmarks/kvpress_compare.py)")
    main(sys.argv[1], sys.argv[2])
