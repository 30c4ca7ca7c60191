"""Forward+backward throughput of GPT presets and their model FLOPs utilisation (MFU).

For the "tiny" and "gpt2-124m" presets and both attention paths ("manual": written out,
"fast": SDPA) this times forward + backward steps (no optimizer) and reports tokens/s.
MFU divides the model FLOPs those tokens need (`flops_per_token(..., training=True)`,
6·N + 12·L·T·D as in PaLM's appendix B) by the peak matmul rate measured on the same
machine in the same run (the best of several large square matmuls), so the ratio does
not depend on a datasheet. On CUDA the steps run under bf16 autocast and the peak is a
bf16 matmul; on CPU everything is float32.

    python benchmarks/bench_model.py                      # CPU or the first GPU
    python benchmarks/bench_model.py --json out.json      # what `make bench` runs
    python benchmarks/bench_model.py --presets tiny --steps 5
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch
from common import bench_parser, matmul_peak, sync

from buildllm.model import GPT, GPTConfig, flops_per_token

# (batch_size, seq_len) per preset and device kind: small enough for 2 CPU cores.
SHAPES = {
    "cpu": {"tiny": (8, 128), "gpt2-124m": (1, 256)},
    "cuda": {"tiny": (64, 128), "gpt2-124m": (16, 1024)},
}


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (how models train there), nothing on CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_seconds(model: GPT, idx: torch.Tensor, device: str) -> float:
    """Time one forward + backward (loss over every position) in seconds."""
    sync(device)
    start = time.perf_counter()
    with autocast(device):
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), idx.flatten()
        )
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def time_preset(preset: str, device: str, steps: int) -> dict[str, dict[str, float]]:
    """Time forward + backward of both attention paths of one preset.

    The two paths alternate step by step, so load from other processes on a shared
    machine hits both alike; each reports its median step.
    """
    batch_size, seq_len = SHAPES[device][preset]
    models = {}
    for impl in ("manual", "fast"):
        torch.manual_seed(0)
        config = GPTConfig.from_preset(preset, attn_impl=impl)
        models[impl] = GPT(config).to(device).train()
    idx = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    times: dict[str, list[float]] = {impl: [] for impl in models}
    for step in range(steps + 1):  # step 0 warms up and is not counted
        for impl, model in models.items():
            seconds = step_seconds(model, idx, device)
            if step > 0:
                times[impl].append(seconds)
    flops = flops_per_token(config, seq_len, training=True)
    results = {}
    for impl, samples in times.items():
        seconds = sorted(samples)[len(samples) // 2]  # the median step
        tokens_per_s = batch_size * seq_len / seconds
        results[impl] = {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "step_seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "model_flops_per_token": flops,
            "achieved_flops_per_s": flops * tokens_per_s,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, steps=3)
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    n = 4096 if device == "cuda" else 2048
    peak = matmul_peak(device, n, repeats=10)
    results: dict[str, object] = {
        "device": device,
        "gpu_available": torch.cuda.is_available(),
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_how": f"best of 10 {n}x{n} matmuls, "
        + ("bf16" if device == "cuda" else "float32"),
        "torch_threads": torch.get_num_threads(),
    }
    for preset in args.presets:
        for impl, r in time_preset(preset, device, args.steps).items():
            r["mfu"] = r["achieved_flops_per_s"] / peak
            results[f"{preset}.{impl}"] = r
            print(
                f"{preset:>10} {impl:>6}: {r['tokens_per_s']:>10,.0f} tokens/s  "
                f"MFU {r['mfu']:.1%}",
                file=sys.stderr,
            )
    payload = {"benchmark": "model", "results": results}
    text = json.dumps(payload, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
