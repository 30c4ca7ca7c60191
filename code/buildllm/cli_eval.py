"""The `buildllm eval` command: measure a model.

Part of the command line (`cli.py` registers this parser): `eval RUN` scores a run on
its own validation split (loss, perplexity, bits per byte), `--task val --data` on
held-out token files, `--task hellaswag` on HellaSwag (Chapter 8).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import TYPE_CHECKING

from buildllm.cli_sample import (
    OPTIONAL_POSITIVE,
    POSITIVE,
    check_run_tokenizer,
    load_cli_model,
    run_tokenizer,
)
from buildllm.datasources import load_tokenizer
from buildllm.distributed import DEVICES

if TYPE_CHECKING:  # type hints only: each command imports what it runs
    import numpy as np

    from buildllm.tokenizer import BPETokenizer


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure a model: validation loss, perplexity and bits per byte, or "
        "HellaSwag accuracy",
        description="Score a run on its own validation split (`buildllm eval RUN`:\n"
        "loss, perplexity and bits per byte, which compares across tokenizers), or a\n"
        "checkpoint, or the published GPT-2 weights, on HellaSwag (the ending with the\n"
        "highest mean token log-likelihood wins: acc_norm; GPT-2 124M scores about\n"
        "0.29) or on held-out token shards (--task val --data).",
        epilog="examples:\n"
        "  buildllm eval runs/tiny           # its own validation split\n"
        "  buildllm eval runs/tiny --json\n"
        "  buildllm eval --checkpoint runs/gpt2-124m --task hellaswag\n"
        "  buildllm eval --checkpoint runs/gpt2-124m --task val \\\n"
        "      --data data/fineweb-edu-10B\n"
        "  buildllm eval --hf gpt2/ --task hellaswag --limit 1000 --json",
    )
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN",
        help="a `buildllm train` out_dir: score it on its own validation split",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint", help="a run's out_dir, checkpoint folder or weights"
    )
    model.add_argument("--hf", help="Hugging Face GPT-2 folder or model.safetensors")
    p.add_argument(
        "--task",
        choices=["hellaswag", "val"],
        default=None,
        help="hellaswag: accuracy on its 10,042 validation examples; val: loss and "
        "perplexity on --data, or on RUN's own validation split (with bits per "
        "byte); None: val for RUN, hellaswag for --checkpoint and --hf",
    )
    p.add_argument(
        "--hellaswag-path",
        default=None,
        help="official hellaswag_val.jsonl; None: download",
    )
    p.add_argument(
        "--data", default=None, help="--task val: a shards folder or a token file"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a saved BPETokenizer or 'gpt2'; None: the run's own, else GPT-2's",
    )
    p.add_argument(
        "--limit",
        type=OPTIONAL_POSITIVE.parse,
        default=None,
        help="score only the first N examples",
    )
    p.add_argument(
        "--batch-size",
        type=POSITIVE.parse,
        default=8,
        help="validation loss: sequences per batch",
    )
    p.add_argument(
        "--max-batches",
        type=OPTIONAL_POSITIVE.parse,
        default=None,
        help="validation loss: stop after N batches",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=list(DEVICES),
        help="auto picks cuda, then mps, then cpu",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_eval)


def check_tokens_fit(path: object, args: argparse.Namespace, vocab_size: int) -> None:
    """Raise ValueError unless token file `path` was written by the model's tokenizer.

    The file's header names its tokenizer's hash; the model's tokenizer is --tokenizer,
    else the run's tokenizer.json (for --checkpoint), else GPT-2's (for --hf).
    """
    from buildllm.data import read_header

    header = read_header(path)
    if header["tokenizer_hash"] is None:  # written without one: nothing to compare
        tokenizer = None
    elif args.tokenizer or not args.checkpoint:
        tokenizer = load_tokenizer(args.tokenizer or "gpt2")
    else:
        tokenizer = run_tokenizer(args.checkpoint)
    if tokenizer is not None and header["tokenizer_hash"] != tokenizer.hash:
        raise ValueError(
            f"{path} was written with another tokenizer than the model's, so its loss "
            "would mean nothing; pass --data tokenized with the model's tokenizer (or "
            "--tokenizer FILE if the model's tokenizer is another file)"
        )
    if (header["vocab_size"] or 0) > vocab_size:
        raise ValueError(
            f"{path} holds ids of a {header['vocab_size']}-token vocabulary but the "
            f"model has vocab_size={vocab_size}; pass --data of the model's tokenizer"
        )


def run_eval(args: argparse.Namespace) -> int:
    from buildllm import evaluate
    from buildllm.checks import UsageError

    if sum(x is not None for x in (args.run, args.checkpoint, args.hf)) != 1:
        raise UsageError(
            "eval scores one model: give a run folder (buildllm eval runs/tiny), "
            "--checkpoint PATH or --hf PATH"
        )
    args.checkpoint = args.checkpoint or args.run  # RUN is a checkpoint too
    task = args.task or ("val" if args.run else "hellaswag")
    model = load_cli_model(args.checkpoint, args.hf, args.device)
    device = next(model.parameters()).device
    result: dict[str, object] = {"task": task}
    tok = eval_tokenizer(args)
    if task == "hellaswag":
        if tok.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} ids but the model "
                f"{model.config.vocab_size}; pass the run's tokenizer with --tokenizer"
            )
        examples = evaluate.load_hellaswag(args.hellaswag_path)
        result |= evaluate.evaluate_hellaswag(model, tok, examples, device, args.limit)
    else:
        if args.data is None and not args.run:
            raise ValueError("--task val needs --data: a shards folder or a token file")
        V = model.config.vocab_size
        if args.data is None:
            tokens = run_val_tokens(args.run, V, tok)
        else:
            tokens = val_tokens_of(args, V)
        T = model.config.context_length
        loss = evaluate.evaluate_loss(
            model, tokens, T, args.batch_size, args.max_batches, device
        )
        result |= {"val_loss": loss, "perplexity": evaluate.perplexity(loss)}
        if args.data is None:  # the run's own text: its bytes are known
            from buildllm.objective import VAL_BPB_TOKENS

            per_token = evaluate.bytes_per_token(tokens[:VAL_BPB_TOKENS], tok)
            result["bits_per_byte"] = evaluate.bits_per_byte(loss, per_token)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(
                f"{key:>13}: {value:.4f}"
                if isinstance(value, float)
                else f"{key:>13}: {value}"
            )
    return 0


def eval_tokenizer(args: argparse.Namespace) -> BPETokenizer:
    """Return the model's tokenizer: --tokenizer (a run's own), the run's, or GPT-2's."""
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        if args.checkpoint:
            check_run_tokenizer(args.checkpoint, tokenizer, args.tokenizer)
        return tokenizer
    if args.checkpoint:  # saved without a run folder around it: GPT-2's
        with contextlib.suppress(FileNotFoundError):
            return run_tokenizer(args.checkpoint)
    return load_tokenizer("gpt2")


def run_val_tokens(run: str, vocab_size: int, tokenizer: BPETokenizer) -> np.ndarray:
    """Return the validation tokens of the data run folder `run` trained on.

    The run's checkpoint names its --data and --tokenizer; `load_data` reads them again
    (from the cache, or tokenized anew). Raises ValueError if they now come with another
    tokenizer than the run's (the text or the tokenizer file changed since).
    """
    from pathlib import Path

    from buildllm.checkpoint import WEIGHTS, latest_checkpoint, load_checkpoint
    from buildllm.distributed import load_data

    path = Path(run)
    folder = path.parent if path.is_file() else path
    if not (folder / WEIGHTS).is_file():
        folder = latest_checkpoint(folder) or folder
    saved = load_checkpoint(folder)[1].get("train_config")
    if saved is None:
        raise ValueError(
            f"{run} holds no record of its training data (not a `buildllm train` run); "
            "pass --task val --data with its validation tokens"
        )
    _, val, found = load_data(saved["data"], vocab_size, saved.get("tokenizer"))
    if found.hash != tokenizer.hash:
        raise ValueError(
            f"--data {saved['data']} of {run} now comes with another tokenizer than the "
            "run's (the text or tokenizer changed since it trained); pass --task val "
            "--data with token files of the run's tokenizer"
        )
    return val


def val_tokens_of(args: argparse.Namespace, vocab_size: int) -> np.ndarray:
    """Return the validation tokens of --data: a token file, or a folder's val split."""
    from pathlib import Path

    from buildllm.data import load_tokens
    from buildllm.shards import find_shards

    path = Path(args.data)
    if path.is_dir():
        path = (
            path / "val.bin"
            if (path / "val.bin").is_file()
            else find_shards(path, "val")[0]
        )
    tokens = load_tokens(path)
    check_tokens_fit(path, args, vocab_size)
    return tokens
