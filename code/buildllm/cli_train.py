"""The `buildllm train` and `buildllm plot` commands.

Part of the command line (`cli.py` registers these parsers): `train` turns every field
of `TrainConfig` into a flag and runs `Trainer.fit` (Chapters 6 and 8, also under
torchrun); `plot` draws a run's loss curves from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re

from buildllm.checks import MODEL_RULES, TRAIN_RULES, OneOf, Range, UsageError
from buildllm.distributed import DEVICES

# ---------------------------------------------------------------- train / plot
TRAIN_HELP = {
    "preset": "model and run preset: tiny trains on a laptop CPU in minutes; gpt2-124m "
    "is llm.c's GPT-2 small run for GPUs (524,288 tokens a step, 10B tokens)",
    "data": "'shakespeare' or 'stdlib' (corpora in the package), 'fineweb-edu' (shards "
    "prepared by `buildllm data prepare`), a folder with train.bin and val.bin, or your "
    "own text: a UTF-8 file or a folder of .txt files (split, tokenized and cached)",
    "tokenizer": "a tokenizer file or 'gpt2' for the text; 'none': the data folder's "
    "own, or for text and the embedded corpora a BPE of --vocab-size trained on the "
    "training split",
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
MODEL_HELP = {
    "vocab_size": "token ids the model knows; unset: the data's tokenizer's, or the "
    "size of the BPE trained for text and the embedded corpora",
    "context_length": "positions per sequence (the longest text the model reads)",
    "d_model": "width of every position's vector",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads; must divide --d-model",
    "n_kv_heads": "key/value heads for grouped-query attention; must divide --n-heads "
    "('none': one per query head)",
    "d_ff": "MLP hidden width ('none': 4 x d_model for gelu, 8/3 x d_model for swiglu)",
    "norm": "normalisation before attention and MLP",
    "mlp": "gelu (GPT-2) or swiglu (Llama)",
    "pos": "positions: learned embeddings (GPT-2) or RoPE rotations",
    "rope_base": "RoPE's base frequency",
    "rope_pairing": "which dimensions RoPE rotates together",
    "bias": "biases in the linear layers and norms",
    "tie_embeddings": "the output head shares the token embedding matrix",
    "dropout": "dropout probability while training",
    "norm_eps": "epsilon added inside the norm's square root",
    "attn_impl": "attention: 'manual' (written out) or 'fast' (PyTorch's SDPA)",
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
        "Chapter 6), and per GPU\n"
        f"{state_gb:.1f} GB for weights, gradients and AdamW state plus about "
        f"{act_gb:.0f} GB of activations at\n--batch-size {B} (halve it and double "
        "--grad-accum-steps if memory runs short).",
        epilog="examples:\n"
        "  buildllm train                    # tiny model, embedded corpus, any CPU\n"
        "  buildllm train --max-steps 2000 --out-dir runs/longer\n"
        "  buildllm train --resume           # continue runs/tiny\n"
        "  buildllm train --data my_text.txt --out-dir runs/mine   # your own text\n"
        "  buildllm train --d-model 256 --n-layers 6 --n-heads 8 --pos rope "
        "--no-bias --out-dir runs/wide\n"
        "  buildllm train --preset gpt2-124m --data fineweb-edu\n"
        "  torchrun --nproc_per_node=8 $(which buildllm) train --preset gpt2-124m "
        "--data fineweb-edu\n"
        "  buildllm plot runs/tiny -o loss.svg",
    )
    choices = {"preset": list(gpt.PRESETS), "device": list(DEVICES)}
    for f in fields(TrainConfig):
        if f.name == "model":  # set by --preset
            continue
        default, other = f.default, getattr(big, f.name)
        differs = other != default and f.name not in ("preset", "out_dir")
        shown = f"{default}" + (f"; gpt2-124m: {other}" if differs else "")
        help = f"{TRAIN_HELP[f.name]} (default: {shown})"
        _add_field_flag(p, f.name, default, TRAIN_RULES.get(f.name), help, choices)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest checkpoint in --out-dir",
    )
    shape = p.add_argument_group(
        "model shape",
        "GPTConfig's fields, over the preset's model and over --model-config; each "
        "help line shows the tiny preset's value and, where it differs, gpt2-124m's",
    )
    tiny = gpt.GPTConfig.from_preset("tiny")
    for f in fields(gpt.GPTConfig):
        default, other = getattr(tiny, f.name), getattr(model, f.name)
        shown = f"{default}" + (f"; gpt2-124m: {other}" if other != default else "")
        help = f"{MODEL_HELP[f.name]} (tiny: {shown})"
        _add_field_flag(shape, f.name, default, MODEL_RULES.get(f.name), help, {})
    shape.add_argument(
        "--model-config",
        metavar="FILE.json",
        help='a JSON object of GPTConfig fields (e.g. {"d_model": 256}) over the '
        "preset's model; flags override it",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_train)


def _add_field_flag(
    group: argparse._ActionsContainer,
    name: str,
    default: object,
    rule: Range | OneOf | None,
    help: str,
    choices: dict[str, list[str]],
) -> None:
    """Add the flag of config field `name`, parsed by its rule (a switch for a bool)."""
    kwargs: dict[str, object] = {"help": help}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    else:  # the config's own rule, checked as the flag is read
        text = _none_or_str if default is None else str  # "none" means None
        kwargs["type"] = rule.parse if isinstance(rule, Range) else text
        kwargs["choices"] = rule.words if isinstance(rule, OneOf) else choices.get(name)
    flag = "--" + name.replace("_", "-")
    group.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def _none_or_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from buildllm.checkpoint import read_metrics
    from buildllm.distributed import destroy_distributed
    from buildllm.model import GPTConfig
    from buildllm.train import TrainConfig, Trainer

    names = [f.name for f in fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if name in args}
    shape_names = [f.name for f in fields(GPTConfig)]
    shape = read_model_config(args.model_config) if args.model_config else {}
    shape |= {name: getattr(args, name) for name in shape_names if name in args}
    try:
        config = TrainConfig.from_preset(
            given.pop("preset", "tiny"), model=shape, **given
        )
    except ValueError as err:  # a rule across flags, e.g. --min-lr above --max-lr
        raise UsageError(in_flag_terms(str(err), names + shape_names)) from None
    try:
        trainer = Trainer(config, resume=args.resume)
    except ValueError as err:  # e.g. a text too small for vocab_size: say --vocab-size
        raise ValueError(in_flag_terms(str(err), names + shape_names)) from err
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


def read_model_config(path: str) -> dict[str, object]:
    """Return the GPTConfig fields in JSON file `path` (a --model-config).

    Raises FileNotFoundError for a missing file and ValueError for one that is not a
    JSON object of GPTConfig fields, naming the unknown ones.
    """
    from dataclasses import fields
    from pathlib import Path

    from buildllm.checks import check_file
    from buildllm.model import GPTConfig

    path = check_file(path, "--model-config")
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model-config {path} is not JSON ({err})") from None
    if not isinstance(values, dict):
        raise TypeError(
            f"--model-config {path} must hold a JSON object such as "
            '{"d_model": 256, "n_layers": 6}'
        )
    unknown = sorted(set(values) - {f.name for f in fields(GPTConfig)})
    if unknown:
        known = ", ".join(f.name for f in fields(GPTConfig))
        raise ValueError(
            f"--model-config {path} has fields {unknown} that GPTConfig lacks; "
            f"use these: {known}"
        )
    return values


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
