"""Which errors of an attention statistic cost language-modelling KL: controls for issue 13.

`statistic="estimated"` (the stride-16 row sample of `kvmerger.engine.scoring`) raises H2O's and
KVMerger's LM KL beyond one paired standard error of the exact statistic's (docs/BENCHMARKS.md
section 8). To tell how large an error the KL tolerates, and of what kind, this script runs
`kvmerger eval` with the estimated statistic replaced by a control built from the exact one:

    scaled:C      exact + C (estimate - exact): the estimate's own errors, C times as large
                  (C = 1 is the estimate, C = 0 the exact statistic)
    lognormal:S   exact x exp(S e - S^2 / 2), e ~ N(0, 1) drawn independently for every key, head
                  and layer (seeded by the layer's statistic, so every method sees the same draw):
                  unbiased, with a relative L1 error of about S sqrt(2 / pi)

Only methods run with `statistic=estimated` see the control; pair them with the same methods run
with the exact statistic (`benchmarks/paired_kl.py`). Every argument after `--` goes to
`kvmerger`'s command line, which must write to a fresh `--out` folder: the control is recorded in
its `control.json`, since the records' method labels cannot show it.

    python benchmarks/statistic_control.py --control scaled:0.5 -- eval --tasks lm \\
      --methods h2o:statistic=estimated --budgets 0.35 --lengths 2048 --samples 4 --seed 1 \\
      --out results/control-scaled-0.5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kvmerger.engine import scoring

CONTROLS = ("scaled", "lognormal")


def parse_control(text: str) -> tuple[str, float]:
    kind, _, value = text.partition(":")
    if kind not in CONTROLS or not value:
        raise ValueError(f"a control is one of {', '.join(c + ':NUMBER' for c in CONTROLS)}, got {text!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"the control's number must be finite and >= 0, got {value!r}")
    return kind, number


def scaled_error(exact: torch.Tensor, estimate: torch.Tensor, factor: float) -> torch.Tensor:
    return exact + factor * (estimate - exact)


def lognormal_noise(exact: torch.Tensor, sigma: float) -> torch.Tensor:
    """exact x exp(sigma e - sigma^2 / 2), e ~ N(0, 1), seeded by the statistic itself (reproducible)."""
    seed = int(float(exact.double().sum()) * 1e6) % (2**31)
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (exact.double() * torch.exp(sigma * noise - sigma**2 / 2)).to(exact.dtype)


def controlled_estimate(kind: str, value: float, estimate: Callable = scoring.aggregated_attention_estimated) -> Callable:
    """A stand-in for `scoring.aggregated_attention_estimated` (same signature) that returns the control."""

    def control(query, key, scaling, lse, *, stride, band, last, chunk=scoring.DEFAULT_CHUNK):
        exact = scoring.aggregated_attention_from_lse(query, key, lse, scaling)
        if kind == "lognormal":
            return lognormal_noise(exact, value)
        sampled = estimate(query, key, scaling, lse, stride=stride, band=band, last=last, chunk=chunk)
        return scaled_error(exact, sampled, value)

    return control


def out_folder(kvmerger_args: list[str], control: str) -> Path:
    """kvmerger's --out folder, refused if it holds records made without this control."""
    given = [arg.split("=", 1)[1] for arg in kvmerger_args if arg.startswith("--out=")]
    if "--out" in kvmerger_args and kvmerger_args.index("--out") + 1 < len(kvmerger_args):
        given.append(kvmerger_args[kvmerger_args.index("--out") + 1])
    if not given:
        raise ValueError("give kvmerger a fresh --out folder: the control is recorded there")
    folder = Path(given[-1])
    recorded = folder / "control.json"
    if recorded.exists() and json.loads(recorded.read_text())["control"] != control:
        raise ValueError(f"{folder} holds records of another control")
    if (folder / "records.jsonl").exists() and not recorded.exists():
        raise ValueError(f"{folder} already holds records made without a control; use a fresh folder")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, kvmerger_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, help="scaled:C or lognormal:S")
    args = parser.parse_args(ours)
    try:
        kind, value = parse_control(args.control)
        folder = out_folder(kvmerger_args, args.control)
    except ValueError as error:
        print(f"statistic_control: {error}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "control.json").write_text(json.dumps({"control": args.control, "kvmerger": kvmerger_args}, indent=2) + "\n")
    print(f"# statistic=estimated replaced by the control {args.control}", flush=True)
    scoring.aggregated_attention_estimated = controlled_estimate(kind, value)
    from kvmerger.cli.main import main as kvmerger_main

    return kvmerger_main(kvmerger_args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
