"""What the benchmarks share: waiting for the GPU, the measured matmul peak, GPT-2 in HF.

MFU in every benchmark divides model FLOPs by the peak measured here, in the same run, so
no datasheet is involved: bf16 on CUDA (how models train there), float32 on CPU, unless
a dtype is asked for. `hf_gpt2` is the reference a user would otherwise pick:
transformers' `GPT2LMHeadModel` with the same shape as one of our configs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from buildllm.model import GPTConfig


def sync(device: str) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(
    device: str, n: int = 2048, repeats: int = 10, dtype: torch.dtype | None = None
) -> float:
    """Return the best FLOP/s of an n×n by n×n matmul (2n³ FLOPs) over `repeats` tries.

    `dtype` defaults to bf16 on CUDA and float32 elsewhere.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """Return the options of the model benchmarks: --json, --presets, --steps, --device."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--presets", nargs="*", default=["tiny", "gpt2-124m"])
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per case")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    return parser


def emit(payload: dict, path: Path | None) -> int:
    """Print a benchmark's JSON result and, with --json PATH, write it there; return 0."""
    text = json.dumps(payload, indent=1)
    if path:
        path.write_text(text + "\n")
    print(text)
    return 0


def hf_gpt2(config: GPTConfig) -> torch.nn.Module:
    """Return transformers' GPT-2 with `config`'s shape and random weights, eval mode.

    No end-of-text token, so generation always makes exactly the tokens asked for.
    """
    import transformers

    from buildllm.hf import config_to_hf

    hf_config = transformers.GPT2Config(
        **config_to_hf(config), bos_token_id=None, eos_token_id=None
    )
    return transformers.GPT2LMHeadModel(hf_config).eval()
