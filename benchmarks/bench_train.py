"""Training throughput (tokens/s, MFU) of whole optimizer steps, and a quality run.

A step is what `Trainer.train_step` does: forward, shifted cross-entropy, backward,
global-norm clipping and AdamW, for the "tiny" and "gpt2-124m" presets and both paths
("manual": written-out loss, clipping and AdamW; "fast": torch's fused/foreach ones).
MFU divides the model FLOPs (`flops_per_token(..., training=True)`) by the peak matmul
rate measured on the same machine in the same run (best of several square matmuls: bf16
on CUDA, float32 on CPU), so no datasheet is involved. The quality run trains the tiny
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, emit, matmul_peak, sync

from buildllm.corpora import EMBEDDED
from buildllm.data import write_tokens
from buildllm.distributed import resolve_device
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


def time_steps(config: TrainConfig, steps: int, peak: float) -> dict[str, float]:
    """Time `steps` optimizer steps after one warm-up step; return tokens/s and MFU."""
    trainer = Trainer(config, progress=False)
    trainer.train_step(0)  # warm-up: allocations, optimizer state
    sync(trainer.device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step(step)
    sync(trainer.device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = trainer.tokens_per_step / seconds
    return {
        "step_seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": trainer.flops_per_token * tokens_per_s / peak,
    }


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
    peak = matmul_peak(device)
    results: dict[str, object] = {"device": device, "peak_flops": peak,
                                  "torch_threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for preset in args.presets:
            batch_size, accum = SHAPES[kind][preset]
            config = TrainConfig.from_preset(
                preset, batch_size=batch_size, grad_accum_steps=accum, device=device,
                compile=False, sample_tokens=None, max_steps=10**6,
            )  # fmt: skip
            if config.data not in EMBEDDED:  # no FineWeb here: random ids, same speed
                (folder / preset).mkdir()
                config = replace(config, data=random_data(folder / preset, 50257))
            for impl in ("manual", "fast"):
                run = replace(
                    config, impl=impl, out_dir=str(folder / f"{preset}-{impl}")
                )
                results[f"{preset}.{impl}"] = time_steps(run, args.steps, peak)
        if args.quality_minutes > 0:
            results["quality_tiny"] = quality_run(args.quality_minutes, device, folder)
    return emit({"benchmark": "train", "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
