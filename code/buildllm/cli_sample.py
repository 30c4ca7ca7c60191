"""The `buildllm sample` command: continue prompts with a trained model.

Part of the command line (`cli.py` registers this parser): `sample` loads a
`buildllm train` checkpoint or GPT-2's Hugging Face weights and streams or batches
completions (Chapter 7). The helpers that load a model and find its tokenizer serve
`buildllm eval` (`cli_eval.py`) too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from buildllm.checks import SAMPLING_RULES, TRAIN_RULES, Range
from buildllm.cli_data import load_tokenizer
from buildllm.distributed import DECODE_DTYPES, DEVICES

if TYPE_CHECKING:  # type hints only: each command imports what it runs
    from buildllm.model import GPT
    from buildllm.tokenizer import BPETokenizer


# ---------------------------------------------------------------- sample
POSITIVE = Range(int, low=1)
OPTIONAL_POSITIVE = Range(int, low=1, off="means all")


def _stop_text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("'' would stop before the first token; "
                                         "give a non-empty stop text")  # fmt: skip
    return text


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
    rule = SAMPLING_RULES  # the rules `generate` checks, applied as each flag is read
    p.add_argument("--max-new-tokens", type=rule["max_new_tokens"].parse, default=200,
                   help="tokens to add")  # fmt: skip
    p.add_argument("--temperature", type=rule["temperature"].parse, default=1.0,
                   help="0 is greedy")  # fmt: skip
    p.add_argument("--top-k", type=rule["top_k"].parse, default=None,
                   help="keep the k likeliest")  # fmt: skip
    p.add_argument("--top-p", type=rule["top_p"].parse, default=None,
                   help="nucleus mass to keep")  # fmt: skip
    p.add_argument("--min-p", type=rule["min_p"].parse, default=None,
                   help="drop p < min_p * p_max")  # fmt: skip
    p.add_argument("--repetition-penalty", type=rule["repetition_penalty"].parse,
                   default=1.0, help="> 1 discourages repeats")  # fmt: skip
    p.add_argument("--stop", action="append", default=[], type=_stop_text,
                   help="stop text (repeatable)")  # fmt: skip
    p.add_argument(
        "--seed",
        type=TRAIN_RULES["seed"].parse,
        default=1337,
        help="same seed, same text",
    )
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with the KV cache")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        choices=list(DEVICES),
        help="auto: cuda, then mps, then cpu",
    )
    add_dtype_flag(p)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object at the end"
    )
    p.set_defaults(handler=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from buildllm.generate import (
        decode_tokens,
        generate_batch,
        matvec_layout,
        stream_text,
    )

    model, tokenizer = load_for_sampling(args)
    device = next(model.parameters()).device
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
        text = decode_tokens(tokenizer, new)
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


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """Add --dtype, the weights' dtype for decoding, to a command that decodes."""
    p.add_argument(
        "--dtype",
        default="auto",
        choices=list(DECODE_DTYPES),
        help="weights for decoding; auto: bfloat16 on CUDA, float32 on a CPU (faster "
        "there, measured); int8: weights rounded to 8 bits, a CPU's fastest for "
        "GPT-2 small and up",
    )


def load_cli_model(
    checkpoint: str | None, hf: str | None, device: str, dtype: str = "float32"
) -> GPT:
    """Return the model of `--checkpoint` (a `buildllm train` run) or of `--hf`.

    Its weights in `distributed.weights_dtype(device, dtype)`: float32 by default
    (for training); for decoding, --dtype auto is bf16 on CUDA, and int8 quantizes
    the Linear layers (`quantize.quantize_int8`, CPU only).
    """
    from buildllm.checks import UsageError
    from buildllm.distributed import resolve_device, weights_dtype

    device = resolve_device(device)
    if dtype == "int8" and device != "cpu":
        raise UsageError(
            f"--dtype int8 decodes on a CPU only and the device is {device}; pass "
            "--device cpu, or --dtype bfloat16 on a GPU"
        )
    if hf:
        from buildllm.hf import load_hf_gpt2

        model = load_hf_gpt2(hf)
    else:
        from buildllm.checkpoint import load_model

        model = load_model(checkpoint, device=device)
    model = model.to(device=device, dtype=weights_dtype(device, dtype))
    if dtype == "int8":
        from buildllm.quantize import quantize_int8

        quantize_int8(model)
    return model


def load_for_sampling(args: argparse.Namespace) -> tuple[GPT, BPETokenizer]:
    """Return (model, tokenizer) for `buildllm sample`, checking that they fit."""
    model = load_cli_model(args.checkpoint, args.hf_checkpoint, args.device, args.dtype)
    if args.hf_checkpoint and not args.tokenizer:
        from buildllm.hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(args.hf_checkpoint)
    elif args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = run_tokenizer(args.checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with "
            "(--tokenizer FILE)"
        )
    if args.tokenizer and args.checkpoint:
        check_run_tokenizer(args.checkpoint, tokenizer, args.tokenizer)
    return model, tokenizer


def check_run_tokenizer(checkpoint: str, tokenizer: BPETokenizer, name: str) -> None:
    """Raise ValueError if `tokenizer` (--tokenizer `name`) is not the run's own.

    A run that saved no tokenizer.json (one not made by `buildllm train`) has nothing
    to compare with: any tokenizer whose ids fit the model is taken.
    """
    try:
        own = run_tokenizer(checkpoint)
    except FileNotFoundError:
        return
    if own.hash != tokenizer.hash:
        raise ValueError(
            f"--tokenizer {name} is not the tokenizer {checkpoint} was trained with (its "
            "tokenizer.json), so the model would read other text than it learned; "
            "drop --tokenizer"
        )


def run_tokenizer(checkpoint: str) -> BPETokenizer:
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
