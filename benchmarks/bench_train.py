"""Training throughput (tokens/s, MFU) of whole optimizer steps, and a quality run.

A step is what `Trainer.train_step` does: forward, shifted cross-entropy, backward,
global-norm clipping and AdamW, for the "tiny" and "gpt2-124m" presets and both paths
("manual": written-out loss, clipping and AdamW; "fast": torch's fused/foreach ones).
The reference is what a user would otherwise run: transformers' `GPT2LMHeadModel` of
the same shape, on the same batch, with `torch.optim.AdamW` and
`clip_grad_norm_(1.0)` ("transformers" rows; `vs_transformers` is our fast step's
speed over it). Where bf16 is native (CUDA, or a CPU with AVX512-BF16 or AMX) both also
run under bf16 autocast ("bf16" rows); elsewhere bf16 is emulated and slower, and the
result says so. MFU divides the model FLOPs (`flops_per_token(..., training=True)`) by
the peak matmul rate of the dtype that runs, measured on the same machine in the same
run (best of several square matmuls), and `mfu_best` by the best peak of any dtype, so
the distance to the chip's limit shows; no datasheet is involved. The quality run trains the tiny
preset on the embedded corpus for a fixed compute budget (on CPU: minutes of one core's
CPU time; the number of steps comes from a timed calibration, so the cosine schedule
completes) and reports the final validation loss, the number later changes compare to.

    python benchmarks/bench_train.py                        # what `make bench` runs
    python benchmarks/bench_train.py --quality-minutes 0    # throughput only
    python benchmarks/bench_train.py --presets tiny --steps 3 --json out.json
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import bench_parser, emit, hf_gpt2, matmul_peak, sync

from buildllm.corpora import EMBEDDED
from buildllm.data import write_tokens
from buildllm.distributed import native_bf16, resolve_device
from buildllm.model import flops_per_token
from buildllm.train import TrainConfig, Trainer

# (batch_size, grad_accum_steps) per preset and device: small enough for 2 CPU cores.
SHAPES = {
    "cpu": {"tiny": (16, 1), "gpt2-124m": (1, 1)},
    "cuda": {"tiny": (64, 1), "gpt2-124m": (8, 1)},
}


def random_data(folder: Path, vocab_size: int) -> str:
    """Write train.bin and val.bin of random ids (speed does not depend on the text)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200_000), ("val", 20_000)):
        write_tokens(
            folder / f"{split}.bin", rng.integers(0, vocab_size, n), vocab_size
        )
    return str(folder)


def timed(step: Callable[[int], object], steps: int, device: str) -> float:
    """Return the mean seconds of `step(1..steps)` after one warm-up call `step(0)`."""
    step(0)  # warm-up: allocations, optimizer state
    sync(device)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    sync(device)
    return (time.perf_counter() - start) / steps


def row(seconds: float, tokens: int, flops: float, peak: float, best: float) -> dict:
    """Return a result row: seconds per step, tokens/s, MFU against `peak` and `best`."""
    tokens_per_s = tokens / seconds
    return {"step_seconds": seconds, "tokens_per_s": tokens_per_s,
            "mfu": flops * tokens_per_s / peak, "mfu_best": flops * tokens_per_s / best}  # fmt: skip


def time_steps(config: TrainConfig, steps: int, peak: float, best: float) -> dict:
    """Time `steps` of our Trainer's optimizer steps; return tokens/s and MFU."""
    trainer = Trainer(config, progress=False)
    seconds = timed(trainer.train_step, steps, trainer.device)
    flops = trainer.flops_per_token
    return row(seconds, trainer.tokens_per_step, flops, peak, best)


def time_transformers_steps(
    config: TrainConfig, steps: int, peak: float, best: float
) -> dict:
    """Time transformers' GPT-2 training on `config`'s model and batch, as users do.

    Random ids (speed does not depend on them), the loss over all T positions as ours,
    `torch.optim.AdamW` with our learning rate, betas and decay, and clipping at 1.0;
    under bf16 autocast when `config.dtype` is "bfloat16".
    """
    model_config = config.model  # the GPTConfig our Trainer builds
    device, V = resolve_device(config.device), model_config.vocab_size
    model = hf_gpt2(model_config).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.max_lr, betas=(config.beta1, config.beta2),
        eps=config.eps, weight_decay=config.weight_decay,
    )  # fmt: skip
    B, T = config.batch_size, model_config.context_length
    x = torch.randint(V, (B, T), device=device)
    y = torch.randint(V, (B, T), device=device)
    kind = device.split(":")[0]
    bf16 = config.dtype == "bfloat16"

    def step(_: int) -> None:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, device)
    flops = flops_per_token(model_config, training=True)
    return row(seconds, B * T * config.grad_accum_steps, flops, peak, best)


def cpu_seconds() -> float:
    """Return the CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quality_run(minutes: float, device: str, folder: Path) -> dict[str, float]:
    """Train the tiny preset for `minutes` of compute; return its final validation loss.

    On CPU the budget is one core's CPU time (one thread), which other processes on a
    busy machine do not eat into as they do wall-clock time; on a GPU it is wall time.
    """
    clock = cpu_seconds if device == "cpu" else time.perf_counter
    if device == "cpu":
        torch.set_num_threads(1)
    base = TrainConfig(device=device, sample_tokens=None, out_dir=str(folder / "cal"))
    trainer = Trainer(replace(base, max_steps=10**6), progress=False)
    trainer.train_step(0)
    start = clock()
    for step in range(1, 6):
        trainer.train_step(step)
    per_step = (clock() - start) / 5
    max_steps = max(10, int(minutes * 60 / per_step))
    config = replace(base, max_steps=max_steps, eval_interval=max_steps,
                     eval_steps=32, out_dir=str(folder / "quality"))  # fmt: skip
    start, wall = clock(), time.perf_counter()
    records = Trainer(config, progress=False).fit()
    return {
        "budget_minutes": minutes,
        "clock": "cpu time, 1 thread" if device == "cpu" else "wall time",
        "max_steps": max_steps,
        "tokens": records[-1]["tokens"],
        "compute_seconds": clock() - start,
        "wall_seconds": time.perf_counter() - wall,
        "val_loss": records[-1]["val_loss"],
        "train_loss": records[-1]["loss"],
        "initial_val_loss": records[0]["val_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print (and with --json write) one JSON object."""
    parser = bench_parser(__doc__, steps=2)
    parser.add_argument(
        "--quality-minutes", type=float, default=5.0, help="quality run budget; 0: none"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    has_bf16 = native_bf16(device)
    peaks = {"float32": matmul_peak(device, dtype=torch.float32),
             "bfloat16": matmul_peak(device, dtype=torch.bfloat16)}  # fmt: skip
    best = max(peaks.values())
    auto = "bfloat16" if has_bf16 else "float32"  # what `dtype="auto"` runs
    peak = peaks[auto]
    results: dict[str, object] = {
        "device": device, "peak_flops": peak, "peak_flops_by_dtype": peaks,
        "torch_threads": torch.get_num_threads(),
        "bf16": "native: bf16 rows measured" if has_bf16 else
                "not run: no native bf16 on this CPU (emulated, slower than float32)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for preset in args.presets:
            batch_size, accum = SHAPES[kind][preset]
            config = TrainConfig.from_preset(
                preset, batch_size=batch_size, grad_accum_steps=accum, device=device,
                compile=False, sample_tokens=None, max_steps=10**6, dtype=auto,
            )  # fmt: skip
            if config.data not in EMBEDDED:  # no FineWeb here: random ids, same speed
                (folder / preset).mkdir()
                config = replace(config, data=random_data(folder / preset, 50257))
            for impl in ("manual", "fast"):
                run = replace(
                    config, impl=impl, out_dir=str(folder / f"{preset}-{impl}")
                )
                results[f"{preset}.{impl}"] = time_steps(run, args.steps, peak, best)
            dtypes = [auto] + (["float32"] if auto != "float32" else [])
            for dtype in dtypes:  # ours and transformers' in each dtype that is native
                tag = "" if dtype == auto else f".{dtype}"
                run = replace(config, impl="fast", dtype=dtype,
                              out_dir=str(folder / f"{preset}-{dtype}"))  # fmt: skip
                if dtype == auto:  # timed above as the "fast" row
                    ours = results[f"{preset}.fast"]
                else:
                    ours = time_steps(run, args.steps, peaks[dtype], best)
                theirs = time_transformers_steps(run, args.steps, peaks[dtype], best)
                ours["vs_transformers"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                results[f"{preset}.fast{tag}"] = ours
                results[f"{preset}.transformers{tag}"] = theirs
        if args.quality_minutes > 0:
            results["quality_tiny"] = quality_run(args.quality_minutes, device, folder)
    return emit({"benchmark": "train", "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
