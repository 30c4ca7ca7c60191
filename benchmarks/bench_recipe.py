"""Which tiny recipe learns most in the book's CPU budget, against nanoGPT's CPU recipe.

Every run trains on the embedded Shakespeare corpus and is scored in bits per byte on
all of its validation works (`evaluate_loss` over consecutive windows, then
`bits_per_byte`), so recipes with different tokenizers compare on the same text.

- "nanogpt-recipe": nanoGPT's published CPU command for its Shakespeare model
  (`config/train_shakespeare_char.py --device=cpu --block_size=64 --batch_size=12
  --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
  --dropout=0.0`: lr 1e-3 to 1e-4, 100 warmup steps, beta2 0.99, no biases), run with
  our GPT, which is nanoGPT's architecture, on characters (bytes: the corpus is ASCII).
- "book": `TrainConfig()`, the run `train_tiny` does while the book builds, with its
  schedule over 200 steps instead of 600: about the CPU time of nanoGPT's recipe, so
  the two compare on equal compute.
- with --sweep, variants of the book's recipe, each given the compute the book's run
  used: CPU seconds of this process, which other processes on a busy machine do not
  eat into as they do wall time (its steps come from a timed calibration, so every
  cosine schedule completes). With --threads 1 (the default of --sweep) a CPU second
  is a core's second, so the recipes compare on equal work.

    python benchmarks/bench_recipe.py              # all: what `make bench` runs (40 min)
    python benchmarks/bench_recipe.py --no-sweep   # baseline and the book's recipe
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from common import emit

from buildllm.evaluate import bits_per_byte, bytes_per_token, evaluate_loss
from buildllm.model import GPTConfig, count_params
from buildllm.train import TrainConfig, Trainer

BOOK = TrainConfig(sample_tokens=None, device="cpu", max_steps=200)  # nanoGPT's CPU time
NANOGPT = replace(
    BOOK,
    model=GPTConfig(vocab_size=257, context_length=64, d_model=128, n_layers=4,
                    n_heads=4, bias=False),
    batch_size=12, max_steps=2000, max_lr=1e-3, min_lr=1e-4, warmup_steps=100,
    beta2=0.99, eval_interval=2000,
)  # fmt: skip
# One change each from the book's recipe.
SWEEP: dict[str, dict[str, Any]] = {
    "vocab 2048": {"model": {"vocab_size": 2048}},
    "vocab 8192": {"model": {"vocab_size": 8192}},
    "width 192, 6 heads": {"model": {"d_model": 192, "n_heads": 6}},
    "6 layers": {"model": {"n_layers": 6}},
    "context 256, batch / 2": {"model": {"context_length": 256}, "batch_size": 0.5},
    "max_lr x 2": {"max_lr": 2, "min_lr": 2},
}


def variant(base: TrainConfig, change: dict[str, Any]) -> TrainConfig:
    """Return `base` with `change`: model fields set, other numbers as multipliers."""
    model = replace(base.model, **change.get("model", {}))
    scaled = {
        k: type(getattr(base, k))(getattr(base, k) * v)
        for k, v in change.items()
        if k != "model"
    }
    return replace(base, model=model, **scaled)


def cpu_seconds() -> float:
    """Return the CPU time (user + system, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calibrate(config: TrainConfig, seconds: float, folder: Path) -> int:
    """Return the steps `config` runs in `seconds` of CPU time (timed over 5 steps)."""
    trainer = Trainer(
        replace(config, max_steps=10**6, out_dir=str(folder)), progress=False
    )
    trainer.train_step(0)
    start = cpu_seconds()
    for step in range(1, 6):
        trainer.train_step(step)
    return max(20, int(seconds / ((cpu_seconds() - start) / 5)))


def score(config: TrainConfig, folder: Path) -> dict[str, Any]:
    """Train `config` in `folder`; return its validation bits per byte and its costs."""
    trainer = Trainer(replace(config, out_dir=str(folder)), progress=False)
    start, wall = cpu_seconds(), time.perf_counter()
    trainer.fit()
    seconds, wall = cpu_seconds() - start, time.perf_counter() - wall
    mc = trainer.model_config
    loss = evaluate_loss(
        trainer.model,
        trainer.objective.val_tokens,
        mc.context_length,
        batch_size=64,
        progress=False,
    )
    per_token = bytes_per_token(trainer.objective.val_tokens, trainer.tokenizer)
    return {
        "val_bpb": bits_per_byte(loss, per_token),
        "val_loss": loss,
        "bytes_per_token": per_token,
        "train_cpu_seconds": seconds,
        "train_wall_seconds": wall,
        "steps": config.max_steps,
        "tokens": config.max_steps * trainer.tokens_per_step,
        "params": count_params(trainer.model),
        "config": {
            "model": asdict(mc),
            "batch_size": config.batch_size,
            "max_lr": config.max_lr,
            "max_steps": config.max_steps,
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run the baseline, the book's recipe and optionally the sweep; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the sweep",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 with --sweep)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(
        args.threads or (1 if args.sweep else torch.get_num_threads())
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nanogpt = score(NANOGPT, folder / "nanogpt")
        book = score(BOOK, folder / "book")
        results["val_bpb"] = {  # the headline, first in `make bench`'s summary
            "book": book["val_bpb"],
            "nanogpt-recipe": nanogpt["val_bpb"],
            "ratio_book_over_nanogpt": book["val_bpb"] / nanogpt["val_bpb"],
        }
        results.update({"book": book, "nanogpt-recipe": nanogpt})
        if args.sweep:
            for i, (name, change) in enumerate(SWEEP.items()):
                config = variant(BOOK, change)
                steps = calibrate(config, book["train_cpu_seconds"], folder / f"cal{i}")
                run = replace(config, max_steps=steps, eval_interval=steps)
                results[f"sweep: {name}"] = score(run, folder / f"sweep{i}")
                print(name, results[f"sweep: {name}"]["val_bpb"], file=sys.stderr)
    results["torch_threads"] = torch.get_num_threads()
    return emit({"benchmark": "recipe", "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
