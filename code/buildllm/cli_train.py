"""The `buildllm train` and `buildllm plot` commands.

Part of the command line (`cli.py` registers these parsers): `train` turns every field
of `TrainConfig` into a flag and runs `Trainer.fit` (Chapters 5 and 7, also under
torchrun); `plot` draws a run's loss curves from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re

from buildllm.checks import TRAIN_RULES, OneOf, Range, UsageError

# ---------------------------------------------------------------- train / plot
TRAIN_HELP = {
    "preset": "model and run preset: tiny trains on a laptop CPU in minutes; gpt2-124m "
    "is llm.c's GPT-2 small run for GPUs (524,288 tokens a step, 10B tokens)",
    "data": "'shakespeare' or 'stdlib' (corpora in the package), 'fineweb-edu' (shards "
    "prepared by `buildllm data prepare`), or a folder with train.bin and val.bin",
    "out_dir": "folder for checkpoints, metrics.jsonl and tokenizer.json",
    "batch_size": "sequences per forward pass on each process",
    "grad_accum_steps": "micro-batches per optimizer step, shared out over processes",
    "max_steps": "optimizer steps in the whole run",
    "max_lr": "peak learning rate, reached after the warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warmup from max_lr / warmup_steps to max_lr",
    "weight_decay": "AdamW's decoupled weight decay on matrices (not on norms, biases "
    "and embeddings)",
    "beta1": "AdamW decay rate of the gradient's moving average",
    "beta2": "AdamW decay rate of the squared gradient's moving average",
    "eps": "AdamW epsilon added to the denominator",
    "grad_clip": "clip the global gradient norm to this ('none': no clipping)",
    "eval_interval": "evaluate on the validation split every N steps",
    "eval_steps": "validation batches per evaluation",
    "checkpoint_interval": "write a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "sample_tokens": "tokens of sample text at each evaluation ('none': no samples)",
    "seed": "seed of the initial weights and of the batches",
    "device": "auto picks cuda, then mps, then cpu",
    "dtype": "auto: bf16 autocast on CUDA and on CPUs with native bf16, else float32",
    "compile": "compile the model with torch.compile (fast on GPUs, slow to start)",
    "impl": "loss, clipping and AdamW: 'manual' (written out) or 'fast' (fused torch)",
    "strategy": "with several processes (torchrun): ddp, or fsdp to shard the model",
    "peak_flops": "peak FLOP/s of one device, for MFU ('none': look the GPU up)",
}


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from buildllm import model as gpt
    from buildllm.train import TrainConfig

    big = TrainConfig.from_preset("gpt2-124m")
    model = gpt.GPTConfig.from_preset("gpt2-124m")
    B, T, D, L = big.batch_size, model.context_length, model.d_model, model.n_layers
    tokens = B * T * big.grad_accum_steps * big.max_steps
    flops = gpt.flops_per_token(model, training=True) * tokens
    h100_hours = flops / (0.4 * 989e12) / 3600  # at 40% of the H100's bf16 peak
    state_gb = 16 * gpt.closed_form_num_params(model) / 1e9  # fp32 weights, grads, m, v
    # activations (Korthikanti et al. 2022, fused attention) + logits in bf16 and fp32
    act_gb = (34 * B * T * D * L + B * T * model.vocab_size * 10) / 1e9
    p = sub.add_parser(
        "train",
        help="train a GPT (the tiny model on the embedded corpus by default)",
        description="Train a GPT: batches of token windows, shifted cross-entropy,\n"
        "backward, global gradient-norm clipping, AdamW with linear warmup and cosine\n"
        "decay. Writes metrics.jsonl, checkpoints (safetensors weights + training\n"
        "state) and tokenizer.json to --out-dir; --resume continues a stopped run\n"
        "exactly.\n"
        "Under `torchrun --nproc_per_node=N` the same command trains on N processes\n"
        "with DDP (or FSDP). Flags override the preset; each help line shows the tiny\n"
        "preset's value and, where it differs, gpt2-124m's.\n\n"
        f"The gpt2-124m run is for GPUs: {tokens / 1e9:.1f}B tokens, about "
        f"{h100_hours:.0f} H100-hours at 40% MFU\n"
        f"({h100_hours / 8:.1f} h on 8 GPUs; an estimate from the FLOP count, see "
        "Chapter 5), and per GPU\n"
        f"{state_gb:.1f} GB for weights, gradients and AdamW state plus about "
        f"{act_gb:.0f} GB of activations at\n--batch-size {B} (halve it and double "
        "--grad-accum-steps if memory runs short).",
        epilog="examples:\n"
        "  buildllm train                    # tiny model, embedded corpus, any CPU\n"
        "  buildllm train --max-steps 2000 --out-dir runs/longer\n"
        "  buildllm train --resume           # continue runs/tiny\n"
        "  buildllm train --preset gpt2-124m --data fineweb-edu\n"
        "  torchrun --nproc_per_node=8 $(which buildllm) train --preset gpt2-124m "
        "--data fineweb-edu\n"
        "  buildllm plot runs/tiny -o loss.svg",
    )
    choices = {"preset": list(gpt.PRESETS), "device": ["auto", "cpu", "cuda", "mps"]}
    for f in fields(TrainConfig):
        if f.name == "model":  # set by --preset
            continue
        default, other = f.default, getattr(big, f.name)
        differs = other != default and f.name not in ("preset", "out_dir")
        shown = f"{default}" + (f"; gpt2-124m: {other}" if differs else "")
        kwargs = {"help": f"{TRAIN_HELP[f.name]} (default: {shown})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            rule = TRAIN_RULES.get(f.name)  # the config's own rule, checked here
            kwargs["type"] = rule.parse if isinstance(rule, Range) else type(default)
            kwargs["choices"] = rule.words if isinstance(rule, OneOf) else None
            kwargs["choices"] = kwargs["choices"] or choices.get(f.name)
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint in --out-dir")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from buildllm.checkpoint import read_metrics
    from buildllm.distributed import destroy_distributed
    from buildllm.train import TrainConfig, Trainer

    names = [f.name for f in fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if name in args}
    try:
        config = TrainConfig.from_preset(given.pop("preset", "tiny"), **given)
    except ValueError as err:  # a rule across flags, e.g. --min-lr above --max-lr
        raise UsageError(in_flag_terms(str(err), names)) from None
    trainer = Trainer(config, resume=args.resume)
    try:
        records = trainer.fit()
    finally:
        destroy_distributed(trainer.dist)
    if not trainer.dist.is_main:
        return 0
    logged = read_metrics(config.out_dir)  # the whole run, also before a resume
    evaluated = [r for r in logged if "val_loss" in r]
    summary = {
        "out_dir": config.out_dir,
        "step": trainer.step,
        "loss": next((r["loss"] for r in reversed(logged) if "loss" in r), None),
        "val_loss": evaluated[-1]["val_loss"] if evaluated else None,
        "tokens_per_s": _median([r["tokens_per_s"] for r in records if r["step"]]),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            spec = (
                ",.0f" if key == "tokens_per_s" else ".4f"
            )  # a rate needs no decimals
            shown = f"{value:{spec}}" if isinstance(value, float) else value
            print(f"{key:>12}: {shown}")
    return 0


def in_flag_terms(message: str, names: list[str]) -> str:
    """Reword "min_lr=0.1" in a config's message as the flag the user typed, "--min-lr 0.1"."""
    for name in names:
        message = re.sub(rf"\b{name}=", f"--{name.replace('_', '-')} ", message)
    return message


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a run's training and validation loss curves",
        description="Read RUN/metrics.jsonl (or a metrics file) and draw training loss "
        "per step and validation loss at each evaluation into an image file.",
        epilog="examples:\n  buildllm plot runs/tiny\n  buildllm plot runs/x -o x.png",
    )
    p.add_argument("run", help="a run's out_dir or its metrics.jsonl")
    p.add_argument(
        "-o", "--output", default=None, help="an .svg, .png or .pdf; None: RUN/loss.svg"
    )
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from buildllm.checkpoint import plot_metrics, read_metrics

    ax = plot_metrics(read_metrics(args.run))
    run = Path(args.run)
    folder = run if run.is_dir() else run.parent
    output = Path(args.output) if args.output else folder / "loss.svg"
    ax.figure.savefig(output)
    print(output)
    return 0
