"""Decoding speed: tokens/s with and without the KV cache, and against transformers.

For the tiny and gpt2-124m presets, and the tiny preset with a 1024-token context
("tiny-ctx1024": past its 128-token context the tiny model re-encodes at most 128 tokens
per uncached step, so there the cache's advantage stops growing), with random weights,
float32, batch 1, a one-token prompt and greedy decoding, it times `buildllm.generate.generate` for 64, 256 and 1024 new tokens
with the cache and without, and `transformers.GPT2LMHeadModel.generate(use_cache=True)`
on the same shape in the same process, alternating them so all see the same load.
Our model decodes with `matvec_layout` applied, as `buildllm sample` does on a CPU;
"cached_linear_layout" is the same cached decoding with nn.Linear's own layout. On a
CPU with native bf16 (AVX512-BF16 or AMX) both also decode with bf16 weights
("cached_bf16", "transformers_cached_bf16"), as `buildllm sample --dtype bfloat16`
does ("auto" decodes in float32 on a CPU: bf16 was measured slower there), and ours
with int8 weights ("cached_int8", `buildllm sample --dtype int8`).
Uncached decoding of the 124M model past 64 tokens would take most of an hour on a
laptop CPU, so there it is estimated: one uncached step at sequence length L costs one
forward pass over L tokens; the script times forward passes at a few L, interpolates,
and sums over L = 1 .. N ("method": "estimated"; `--full` measures it instead).

    python benchmarks/bench_generate.py                 # what `make bench` runs
    python benchmarks/bench_generate.py --quick         # seconds: tiny, 16 and 64 tokens
    python benchmarks/bench_generate.py --json out.json --threads 1   # a busy machine
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from common import hf_gpt2

from buildllm.distributed import cpu_has_bf16
from buildllm.generate import generate, matvec_layout
from buildllm.model import GPT, GPTConfig
from buildllm.quantize import quantize_int8

SHAPES = {  # benchmark name -> (preset, overrides)
    "tiny": ("tiny", {}),
    "tiny-ctx1024": ("tiny", {"context_length": 1024}),
    "gpt2-124m": ("gpt2-124m", {}),
}
FULL_UNCACHED_LIMIT = 64  # above this many tokens, uncached 124M decoding is estimated
GRID = (1, 32, 64, 128, 256, 512, 768, 1024)  # forward lengths timed for the estimate


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Return the fastest of `repeats` timed calls of each function, taking turns.

    Round-robin (ours, theirs, ours, theirs, ...) so that load from other processes
    hits every contender alike; the fastest run is the least disturbed one.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def hf_generate(model: torch.nn.Module, idx: torch.Tensor, n: int) -> None:
    with torch.inference_mode():
        out = model.generate(idx, max_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=0)  # fmt: skip
    assert out.shape[1] == idx.shape[1] + n


def estimate_uncached(model: GPT, lengths: list[int]) -> dict[int, float]:
    """Return the estimated seconds of uncached greedy decoding of each length N."""
    grid = [L for L in GRID if L <= max(lengths)]
    step = []
    with torch.inference_mode():
        for L in grid:
            x = torch.zeros(1, L, dtype=torch.long)
            forward = {"step": lambda x=x: model(x)[:, -1].argmax(-1)}
            step.append(best_times(forward, 1)["step"])
    per_length = np.interp(np.arange(1, max(lengths) + 1), grid, step)  # s per step
    return {n: float(per_length[:n].sum()) for n in lengths}


def bench_preset(name: str, lengths: list[int], full: bool, hf: bool) -> dict:
    """Time every decoding path of one of SHAPES; return tokens/s per length."""
    torch.manual_seed(0)
    preset, overrides = SHAPES[name]
    config = GPTConfig.from_preset(preset, **overrides)
    plain = GPT(config).eval()
    model = matvec_layout(copy.deepcopy(plain))
    reference = hf_gpt2(config) if hf else None
    bf16 = cpu_has_bf16()  # bf16 weights, as `buildllm sample --dtype bfloat16`
    model_bf16 = matvec_layout(copy.deepcopy(plain).to(torch.bfloat16)) if bf16 else None
    model_int8 = quantize_int8(copy.deepcopy(plain))
    reference_bf16 = (
        copy.deepcopy(reference).to(torch.bfloat16) if bf16 and hf else None
    )
    idx = torch.zeros(1, 1, dtype=torch.long)  # the end-of-text token as the prompt
    small = config.n_layers * config.d_model < 5000
    estimated = {} if small or full else estimate_uncached(model, lengths)
    rows = {}
    for n in lengths:
        repeats = 5 if small else 3 if n <= 64 else 2
        contenders = {
            "cached": lambda n=n: generate(model, idx, n, temperature=0),
            "cached_linear_layout": lambda n=n: generate(plain, idx, n, temperature=0),
            "cached_int8": lambda n=n: generate(model_int8, idx, n, temperature=0),
        }
        if model_bf16 is not None:
            contenders["cached_bf16"] = lambda n=n: generate(
                model_bf16, idx, n, temperature=0
            )
        if reference is not None and n <= config.context_length:
            contenders["transformers_cached"] = lambda n=n: hf_generate(
                reference, idx, n
            )
            if reference_bf16 is not None:
                contenders["transformers_cached_bf16"] = lambda n=n: hf_generate(
                    reference_bf16, idx, n
                )
        measure_uncached = small or full or n <= FULL_UNCACHED_LIMIT
        if measure_uncached:
            contenders["uncached"] = lambda n=n: generate(
                model, idx, n, temperature=0, use_cache=False
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds = best_times(contenders, repeats)
        if not measure_uncached:
            seconds["uncached"] = estimated[n]
        row = {name: n / s for name, s in seconds.items()}
        row["uncached_method"] = "measured" if measure_uncached else "estimated"
        row["cache_speedup"] = row["cached"] / row["uncached"]
        if "transformers_cached" in row:
            hf32 = row["transformers_cached"]
            row["vs_transformers"] = row["cached"] / hf32
            row["int8_vs_transformers"] = row["cached_int8"] / hf32
        if "transformers_cached_bf16" in row:
            for ours in ("bf16", "int8"):
                row[f"{ours}_vs_transformers_bf16"] = (
                    row[f"cached_{ours}"] / row["transformers_cached_bf16"]
                )
        rows[str(n)] = row
        print(f"{name} {n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return {"tokens_per_s": rows, "params": model.num_params(),
            "context_length": config.context_length}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=str, default=None, help="write the result here")
    parser.add_argument("--quick", action="store_true", help="tiny, 16 and 64 tokens")
    parser.add_argument("--full", action="store_true", help="measure all uncached runs")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice, the cores)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    presets = ["tiny"] if args.quick else list(SHAPES)
    lengths = [16, 64] if args.quick else [64, 256, 1024]
    results = {
        preset: bench_preset(preset, lengths, args.full, not args.no_transformers)
        for preset in presets
    }
    payload = {
        "benchmark": "generate",
        "setup": "random weights, float32 (and bf16 where native, and int8), batch 1, "
        f"one-token prompt, greedy; {torch.get_num_threads()} torch threads",
        "targets": {"cache_speedup_at_1024": 5.0, "vs_transformers": 1.0,
                    "int8_vs_transformers": 2.0, "int8_vs_transformers_bf16": 1.2},
        "results": results,
    }
    text = json.dumps(payload, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
