"""The `buildllm` command line: tokenize, data, train, sample, eval, plot, bench, info.

Every subcommand is a thin layer over a library function the book teaches; `main(argv)`
returns an exit code so tests call it in process. Results go to stdout, progress and logs
to stderr. Exit 0 ok, 1 failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

import buildllm

Handler = Callable[[argparse.Namespace], int]


class _Formatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Show defaults and keep the hand-made line breaks of descriptions and epilogs."""


def resolve_device(device: str = "auto") -> str:
    """Return the device to run on: `device`, or for "auto" the first of cuda, mps, cpu."""
    from buildllm.distributed import resolve_device as resolve  # imports torch: lazily

    return resolve(device)


# ---------------------------------------------------------------- info
def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print versions and the device buildllm would use",
        description="Print the versions of buildllm, Python and PyTorch, and the device "
        "that `--device auto` picks on this machine (cuda, then mps, then cpu).",
        epilog="example:\n  buildllm info\n  buildllm info --json",
        formatter_class=_Formatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch

    info = {
        "buildllm": buildllm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": resolve_device("auto"),
        "cuda_devices": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ],
        "cpu_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


# ---------------------------------------------------------------- tokenize (tokenizer person)
def add_tokenize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="train a BPE tokenizer, or encode text with one",
        description="Train a byte-level BPE tokenizer (Chapter 1) or encode text into "
        "token ids. Choose an action; `buildllm tokenize ACTION --help` explains it.",
        epilog="examples:\n"
        "  buildllm tokenize train --vocab-size 4096 --output tok.json\n"
        "  buildllm tokenize encode --tokenizer gpt2 --text 'Hello world'",
        formatter_class=_Formatter,
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    t = actions.add_parser(
        "train",
        help="learn merges from text files or the embedded corpus",
        description="Learn a byte-level BPE vocabulary: count the regex pre-tokens of "
        "the corpus once (in parallel), then merge the most frequent adjacent pair "
        "until the vocabulary has --vocab-size tokens; ties go to the pair whose bytes "
        "compare greatest. Prints the vocabulary size and the training time.",
        epilog="examples:\n"
        "  buildllm tokenize train --vocab-size 4096 --output tok.json\n"
        "  buildllm tokenize train --input a.txt b.txt --vocab-size 32768 "
        "--pattern gpt4 \\\n      --special '<|endoftext|>' --special '<|pad|>' "
        "--output tok.json",
        formatter_class=_Formatter,
    )
    t.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        default=None,
        help="UTF-8 text files, each a document; default: the embedded "
        "corpus (buildllm.data.default_corpus)",
    )
    t.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="ordinary plus special tokens; at least 256 + the specials",
    )
    t.add_argument(
        "--special",
        action="append",
        metavar="TEXT",
        default=None,
        help="a special token (repeatable); default: <|endoftext|>",
    )
    t.add_argument(
        "--pattern",
        default="gpt2",
        help="pre-tokenization regex: gpt2, gpt4 (cl100k) or your own",
    )
    t.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes counting pre-tokens; default: one per CPU core",
    )
    t.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="where to save the tokenizer (JSON, BPETokenizer.save)",
    )
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(handler=run_tokenize_train)
    e = actions.add_parser(
        "encode",
        help="print the token ids of a text",
        description="Encode text into token ids with a saved tokenizer or GPT-2's. "
        "Special-token text such as <|endoftext|> is an error unless "
        "--allowed-special all, so untrusted text cannot inject control tokens.",
        epilog="examples:\n  buildllm tokenize encode --text 'Hello world'\n"
        "  buildllm tokenize encode --tokenizer tok.json --input story.txt --json",
        formatter_class=_Formatter,
    )
    e.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="FILE",
        help="a saved tokenizer file, or gpt2 for GPT-2's vocabulary",
    )
    source = e.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to encode")
    source.add_argument(
        "--input",
        metavar="FILE",
        help="a UTF-8 file to encode, streamed; default: stdin",
    )
    e.add_argument(
        "--allowed-special",
        choices=["none", "all"],
        default="none",
        help="all: special-token text becomes its control token; none: "
        "it raises an error",
    )
    e.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: ids, token count, bytes per token",
    )
    e.set_defaults(handler=run_tokenize_encode)


def load_tokenizer(name: str) -> buildllm.tokenizer.BPETokenizer:
    """Return GPT-2's tokenizer for "gpt2", else the tokenizer saved at path `name`."""
    from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

    return gpt2_tokenizer() if name == "gpt2" else BPETokenizer.load(name)


def run_tokenize_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from buildllm.data import default_corpus
    from buildllm.tokenizer import ENDOFTEXT, BPETokenizer

    source = [Path(f) for f in args.input] if args.input else default_corpus()
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(
        source,
        args.vocab_size,
        args.special or [ENDOFTEXT],
        args.pattern,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    tokenizer.save(args.output)
    result = {
        "vocab_size": tokenizer.vocab_size,
        "seconds": round(seconds, 3),
        "output": str(args.output),
        "hash": tokenizer.hash,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"trained {tokenizer.vocab_size} tokens in {seconds:.1f} s")
    return 0


def run_tokenize_encode(args: argparse.Namespace) -> int:
    import contextlib

    tokenizer = load_tokenizer(args.tokenizer)
    special = {"allowed_special": "all"} if args.allowed_special == "all" else {}
    sizes: list[int] = []  # UTF-8 bytes of each piece read, for bytes per token
    with contextlib.ExitStack() as stack:
        if args.text is not None:
            texts = [args.text]
        elif args.input:
            texts = stack.enter_context(open(args.input, encoding="utf-8", newline=""))
        else:
            texts = sys.stdin
        counted = (sizes.append(len(text.encode())) or text for text in texts)
        ids = list(tokenizer.encode_iterable(counted, **special))
    if args.json:
        print(
            json.dumps(
                {
                    "ids": ids,
                    "n_tokens": len(ids),
                    "bytes_per_token": sum(sizes) / max(len(ids), 1),
                }
            )
        )
    else:
        print(" ".join(map(str, ids)))
    return 0


# ---------------------------------------------------------------- data (tokenizer person)
def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="list, download and tokenize corpora into token files",
        description="Corpora for training: list the known ones, download one into the "
        "cache (resumed, sha256-checked), or tokenize a corpus into train.bin and "
        "val.bin token files for `buildllm train`.",
        epilog="examples:\n  buildllm data list\n"
        "  buildllm data prepare --out-dir data/stdlib\n"
        "  buildllm data prepare --corpus tinyshakespeare --out-dir data/shakespeare",
        formatter_class=_Formatter,
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list",
        help="show the corpora known by name",
        description="Show each corpus of buildllm.data.CORPORA: name, size, licence "
        "and URL.",
        epilog="example:\n  buildllm data list --json",
        formatter_class=_Formatter,
    )
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=run_data_list)
    dl = actions.add_parser(
        "download",
        help="download a corpus into the cache",
        description="Download a corpus by name into the cache directory: resumes a "
        "broken download, checks the sha256 (recorded on first download when "
        "upstream publishes none) and fetches a corrupt file again. Prints the path.",
        epilog="example:\n"
        "  BUILDLLM_CACHE=/data/cache buildllm data download tinystories",
        formatter_class=_Formatter,
    )
    dl.add_argument("name", help="a corpus name from `buildllm data list`")
    dl.add_argument(
        "--cache-dir",
        default=None,
        help="download folder; default: $BUILDLLM_CACHE, else the user cache directory",
    )
    dl.set_defaults(handler=run_data_download)
    pr = actions.add_parser(
        "prepare",
        help="tokenize a corpus into train.bin and val.bin",
        description="Tokenize a corpus in parallel, chunk by chunk (memory stays "
        "bounded), with <|endoftext|> after each document, and write OUT_DIR/train.bin "
        "and OUT_DIR/val.bin: a small header (dtype, vocab size, tokenizer hash), then "
        "uint16 ids (uint32 above 65,536 tokens). The last --val-fraction of the "
        "tokens "
        "is the validation split.",
        epilog="examples:\n  buildllm data prepare --out-dir data/stdlib\n"
        "  buildllm data prepare --dataset fineweb-edu-10B\n"
        "  buildllm data prepare --corpus tinystories-valid --tokenizer tok.json "
        "--out-dir data/stories\n  buildllm data prepare --corpus a.txt b.txt "
        "--out-dir data/mine --val-fraction 0.05",
        formatter_class=_Formatter,
    )
    pr.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="'default' (the embedded corpus), a name from `buildllm data "
        "list` (downloaded first), or UTF-8 text files",
    )
    pr.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="FILE",
        help="a saved tokenizer file, or gpt2 for GPT-2's vocabulary",
    )
    pr.add_argument(
        "--dataset",
        default=None,
        help="instead of --corpus: a sharded dataset (fineweb-edu-10B, "
        "fineweb-edu-100M) downloaded, tokenized and written as fixed-size shards",
    )
    pr.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="with --dataset: stop after this many tokens (a quick sample)",
    )
    pr.add_argument(
        "--out-dir",
        default=None,
        help="folder for train.bin and val.bin; with --dataset, for the shards "
        "(default: the cache's DATASET folder)",
    )
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the tokens, taken from the end, for validation",
    )
    pr.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizing processes; default: one per CPU core",
    )
    pr.add_argument(
        "--impl",
        choices=["fast", "manual"],
        default="fast",
        help="fast: tiktoken with our vocabulary; manual: our encode "
        "(same ids, slower)",
    )
    pr.add_argument("--cache-dir", help="download folder for named corpora")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(handler=run_data_prepare)


def run_data_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from buildllm.data import CORPORA

    if args.json:
        print(json.dumps({name: asdict(c) for name, c in CORPORA.items()}))
    for name, corpus in CORPORA.items() if not args.json else ():
        print(f"{name:>20}  {corpus.description}\n{'':>20}  {corpus.url}")
    return 0


def run_data_download(args: argparse.Namespace) -> int:
    from buildllm.data import download

    print(download(args.name, args.cache_dir))
    return 0


def run_data_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from buildllm.data import CORPORA, default_corpus, download, prepare, read_header

    if args.dataset is not None:
        return run_data_prepare_shards(args)
    if args.out_dir is None:
        raise ValueError("data prepare needs --out-dir DIR (or --dataset NAME)")
    sources: list[str | Path] = []
    for item in args.corpus:
        if item == "default":
            sources.append(default_corpus())
        elif item in CORPORA:
            sources.append(download(item, args.cache_dir))
        elif Path(item).is_file():
            sources.append(Path(item))
        else:
            raise FileNotFoundError(
                f"--corpus {item!r} is neither 'default', a corpus "
                "name (buildllm data list) nor a file"
            )
    if any(Path(s).suffix == ".parquet" for s in sources if isinstance(s, Path)):
        raise ValueError(
            "parquet corpora are tokenized into shards by buildllm.shards "
            "(Chapter 7); data prepare reads UTF-8 text files"
        )
    tokenizer = load_tokenizer(args.tokenizer)
    paths = prepare(
        sources, tokenizer, args.out_dir, args.val_fraction, args.workers, args.impl
    )
    result = {
        split: {"path": str(p), "n_tokens": read_header(p)["n_tokens"]}
        for split, p in paths.items()
    }
    if args.json:
        print(json.dumps(result))
    for split, info in result.items() if not args.json else ():
        print(f"{split}: {info['n_tokens']:,} tokens -> {info['path']}")
    return 0


def run_data_prepare_shards(args: argparse.Namespace) -> int:
    from buildllm import shards
    from buildllm.data import read_header

    out_dir = args.out_dir or shards.dataset_dir(args.dataset, args.cache_dir)
    paths = shards.prepare_dataset(
        args.dataset,
        out_dir,
        args.cache_dir,
        load_tokenizer(args.tokenizer),
        args.workers,
        max_tokens=args.max_tokens,
    )
    n_tokens = sum(read_header(p)["n_tokens"] for p in paths)
    if args.json:
        print(json.dumps({"shards": [str(p) for p in paths], "n_tokens": n_tokens}))
    else:
        print(f"{len(paths)} shards, {n_tokens:,} tokens -> {out_dir}")
    return 0


# ---------------------------------------------------------------- train / plot (training person)
TRAIN_HELP = {
    "preset": "model and run preset: tiny trains on a laptop CPU in minutes; gpt2-124m "
    "is llm.c's GPT-2 small run for GPUs (524,288 tokens a step, 10B tokens)",
    "data": "'embedded' (the corpus in the package), 'fineweb-edu' (shards prepared by "
    "`buildllm data prepare`), or a folder with train.bin and val.bin",
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
    "dtype": "auto: bf16 autocast on CUDA, float32 elsewhere",
    "compile": "compile the model with torch.compile (fast on GPUs, slow to start)",
    "impl": "loss, clipping and AdamW: 'manual' (written out) or 'fast' (fused torch)",
    "strategy": "with several processes (torchrun): ddp, or fsdp to shard the model",
    "peak_flops": "peak FLOP/s of one device, for MFU ('none': look the GPU up)",
}


def _none_or(kind: type) -> Callable[[str], object]:
    return lambda text: None if text.lower() in ("none", "off") else kind(text)


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
        formatter_class=_Formatter,
    )
    nullable = {"grad_clip": float, "sample_tokens": int, "peak_flops": float}
    choices = {"preset": list(gpt.PRESETS), "dtype": ["auto", "float32", "bfloat16"],
               "impl": ["manual", "fast"], "strategy": ["ddp", "fsdp"],
               "device": ["auto", "cpu", "cuda", "mps"]}  # fmt: skip
    for f in fields(TrainConfig):
        default, other = f.default, getattr(big, f.name)
        differs = other != default and f.name not in ("preset", "out_dir")
        shown = f"{default}" + (f"; gpt2-124m: {other}" if differs else "")
        kwargs = {"help": f"{TRAIN_HELP[f.name]} (default: {shown})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kind = nullable.get(f.name)
            kwargs["type"] = _none_or(kind) if kind else type(default)
            kwargs["choices"] = choices.get(f.name)
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint in --out-dir")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from buildllm.distributed import destroy_distributed
    from buildllm.train import TrainConfig, Trainer

    names = [f.name for f in fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if name in args}
    config = TrainConfig.from_preset(given.pop("preset", "tiny"), **given)
    trainer = Trainer(config, resume=args.resume)
    try:
        records = trainer.fit()
    finally:
        destroy_distributed(trainer.dist)
    if not trainer.dist.is_main:
        return 0
    evaluated = [r for r in records if "val_loss" in r]
    summary = {
        "out_dir": config.out_dir,
        "step": trainer.step,
        "loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        "val_loss": evaluated[-1]["val_loss"] if evaluated else None,
        "tokens_per_s": _median([r["tokens_per_s"] for r in records[1:]]),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:>12}: {shown}")
    return 0


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a run's training and validation loss curves",
        description="Read RUN/metrics.jsonl (or a metrics file) and draw training loss "
        "per step and validation loss at each evaluation into an image file.",
        epilog="examples:\n  buildllm plot runs/tiny\n  buildllm plot runs/x -o x.png",
        formatter_class=_Formatter,
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


# ---------------------------------------------------------------- sample (generation person)
def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="continue a prompt with a trained model, printing tokens as they come",
        description="Load a model trained by `buildllm train` (--checkpoint) or GPT-2 "
        "weights in Hugging Face's format\n(--hf-checkpoint) and continue each prompt. "
        "One prompt streams to stdout as it is generated;\nseveral decode as a batch. "
        "Decoding uses the KV cache unless --no-cache. A prompt longer than\nthe "
        "context keeps its last context_length tokens (with a warning); past the "
        "context the\nwindow slides by half a context.",
        epilog="examples:\n"
        '  buildllm sample --checkpoint runs/tiny --prompt "def main("\n'
        "  buildllm sample --checkpoint runs/tiny --temperature 0.8 --top-p 0.95 "
        "--max-new-tokens 100 --stop $'\\n\\n'\n"
        "  buildllm sample --hf-checkpoint ~/gpt2 --prompt Hello --top-k 40 --seed 1\n"
        '  buildllm sample --checkpoint runs/tiny --prompt "A" --prompt "The" --json',
        formatter_class=_Formatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a run's out_dir, a checkpoint folder or its weights file",
    )
    source.add_argument(
        "--hf-checkpoint",
        metavar="PATH",
        help="GPT-2 in Hugging Face's format: folder or weights file",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer file (BPETokenizer.save) or 'gpt2'; default: the "
        "run's own, or the folder's vocab.json + merges.txt, or GPT-2's",
    )
    p.add_argument("--prompt", action="append", help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass to keep")
    p.add_argument("--min-p", type=float, default=None, help="drop p < min_p * p_max")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats"
    )
    p.add_argument("--stop", action="append", default=[], help="stop text (repeatable)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with the KV cache")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto: cuda, then mps, then cpu",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object at the end"
    )
    p.set_defaults(handler=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from buildllm.generate import generate_batch, matvec_layout, stream_text

    device = resolve_device(args.device)
    model, tokenizer = load_for_sampling(args, device)
    matvec_layout(model)  # on a CPU, weights in the layout one-token steps read fastest
    prompts = args.prompt or [""]
    sampling = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "use_cache": args.cache,
        "generator": torch.Generator(device).manual_seed(args.seed),
    }  # fmt: skip
    start = time.perf_counter()
    if len(prompts) == 1 and not args.json:  # stream: print each piece as it comes
        sys.stdout.write(prompts[0])
        for piece in stream_text(model, tokenizer, prompts[0], args.max_new_tokens,
                                 stop=args.stop, **sampling):  # fmt: skip
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"sampled in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        return 0
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    ids = [tokenizer.encode(p, allowed_special="all") or eot for p in prompts]
    if not all(ids):
        raise ValueError("an empty prompt needs a tokenizer with <|endoftext|>")
    texts = []
    for new in generate_batch(model, ids, args.max_new_tokens, stop_tokens=eot,
                              **sampling):  # fmt: skip
        text = tokenizer.decode(new)
        cuts = [text.find(s) for s in args.stop if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    seconds = time.perf_counter() - start
    if args.json:
        print(
            json.dumps({"prompts": prompts, "completions": texts, "seconds": seconds})
        )
    else:
        print("\n\n".join(p + t for p, t in zip(prompts, texts)))
    return 0


def load_for_sampling(
    args: argparse.Namespace, device: str
) -> tuple[buildllm.model.GPT, buildllm.tokenizer.BPETokenizer]:
    """Return (model, tokenizer) for `buildllm sample`, checking that they fit."""
    from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

    if args.hf_checkpoint:
        from buildllm.hf import load_hf_gpt2
        from buildllm.hf_tokenizer import load_hf_tokenizer

        model = load_hf_gpt2(args.hf_checkpoint).to(device)
        tokenizer = None if args.tokenizer else load_hf_tokenizer(args.hf_checkpoint)
    else:
        from buildllm.checkpoint import load_model

        model = load_model(args.checkpoint, device=device)
        tokenizer = None if args.tokenizer else run_tokenizer(args.checkpoint)
    if args.tokenizer:
        tokenizer = (
            gpt2_tokenizer()
            if args.tokenizer == "gpt2"
            else BPETokenizer.load(args.tokenizer)
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with "
            "(--tokenizer FILE)"
        )
    return model, tokenizer


def run_tokenizer(checkpoint: str) -> buildllm.tokenizer.BPETokenizer:
    """Return the tokenizer a `buildllm train` run saved beside its checkpoints."""
    from pathlib import Path

    from buildllm.distributed import TOKENIZER
    from buildllm.tokenizer import BPETokenizer

    path = Path(checkpoint)
    folder = path.parent if path.is_file() else path
    run_dir = folder.parent.parent  # <out_dir>/checkpoints/step-N -> <out_dir>
    found = [p for p in (folder / TOKENIZER, run_dir / TOKENIZER) if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no {TOKENIZER} in {folder} or in its run folder {run_dir}, so the "
            "model's tokenizer is unknown; pass --tokenizer FILE (or --tokenizer gpt2)"
        )
    return BPETokenizer.load(found[0])


# ---------------------------------------------------------------- eval (pretraining person)
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure a model: HellaSwag accuracy or validation loss and perplexity",
        description="Score a trained checkpoint, or the published GPT-2 weights, on\n"
        "HellaSwag (the ending with the highest mean token log-likelihood wins:\n"
        "acc_norm; GPT-2 124M scores about 0.29) or on held-out token shards (loss\n"
        "and perplexity).",
        epilog="examples:\n"
        "  buildllm eval --checkpoint runs/gpt2-124m --task hellaswag\n"
        "  buildllm eval --checkpoint runs/gpt2-124m --task val \\\n"
        "      --data data/fineweb-edu-10B\n"
        "  buildllm eval --hf gpt2/ --task hellaswag --limit 1000 --json",
        formatter_class=_Formatter,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint", help="a run's out_dir, checkpoint folder or weights"
    )
    model.add_argument("--hf", help="Hugging Face GPT-2 folder or model.safetensors")
    p.add_argument("--task", choices=["hellaswag", "val"], default="hellaswag",
                   help="hellaswag: accuracy on its 10,042 validation examples; "
                   "val: loss and perplexity on --data")  # fmt: skip
    p.add_argument("--hellaswag-path", default=None,
                   help="official hellaswag_val.jsonl; None: download")  # fmt: skip
    p.add_argument("--data", default=None,
                   help="--task val: a shards folder or a token file")  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="a saved BPETokenizer; None: GPT-2's"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="score only the first N examples"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="--task val: sequences per batch"
    )
    p.add_argument(
        "--max-batches", type=int, default=None, help="--task val: stop after N"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from buildllm import evaluate

    device = resolve_device(args.device)
    if args.hf:
        from buildllm.hf import load_hf_gpt2

        model = load_hf_gpt2(args.hf).to(device)
    else:
        from buildllm.checkpoint import load_model

        model = load_model(args.checkpoint, device=device)
    result: dict[str, object] = {"task": args.task}
    if args.task == "hellaswag":
        from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

        tok = BPETokenizer.load(args.tokenizer) if args.tokenizer else gpt2_tokenizer()
        if tok.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} ids but the model "
                f"{model.config.vocab_size}; pass the run's tokenizer with --tokenizer"
            )
        examples = evaluate.load_hellaswag(args.hellaswag_path)
        result |= evaluate.evaluate_hellaswag(model, tok, examples, device, args.limit)
    else:
        from pathlib import Path

        from buildllm.data import load_tokens
        from buildllm.shards import find_shards

        if args.data is None:
            raise ValueError("--task val needs --data: a shards folder or a token file")
        path = Path(args.data)
        if path.is_dir():
            path = (
                path / "val.bin"
                if (path / "val.bin").is_file()
                else find_shards(path, "val")[0]
            )
        tokens = load_tokens(path)
        T = model.config.context_length
        loss = evaluate.evaluate_loss(model, tokens, T, args.batch_size, args.max_batches,
                                      device)  # fmt: skip
        result |= {"val_loss": loss, "perplexity": evaluate.perplexity(loss)}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(
                f"{key:>12}: {value:.4f}"
                if isinstance(value, float)
                else f"{key:>12}: {value}"
            )
    return 0


# ---------------------------------------------------------------- bench (lead)

PARSERS = [
    add_info_parser,
    add_eval_parser,
    add_sample_parser,
    add_tokenize_parser,
    add_data_parser,
    add_train_parser,
    add_plot_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the `buildllm` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="buildllm",
        description="Train, sample and inspect the GPT from *Build a Large Language Model "
        "from Scratch*.",
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"buildllm {buildllm.__version__}"
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback on errors"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help, --version and bad usage
        return int(exit_.code or 0)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if args.traceback:
            raise
        print(f"buildllm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("buildllm: interrupted", file=sys.stderr)
        return 130
