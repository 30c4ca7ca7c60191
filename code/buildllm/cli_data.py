"""The `buildllm tokenize` and `buildllm data` commands: tokenizers and token files.

Part of the command line (`cli.py` registers these parsers): `tokenize train|encode`
wraps `BPETokenizer` (Chapter 2); `data list|download|prepare` wraps `data.py` and, for
FineWeb-Edu shards, `shards.py` (Chapter 8). Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from buildllm.checks import Range
from buildllm.datasources import load_tokenizer

# ---------------------------------------------------------------- tokenize
VOCAB = Range(int, low=257)  # the 256 bytes and at least one special token
WORKERS = Range(int, low=1, off="uses one per CPU core")


def _pattern(text: str) -> str:
    from buildllm.bpe import compile_pattern
    from buildllm.tokenizer import PATTERNS

    try:
        compile_pattern(PATTERNS.get(text, text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_tokenize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="train a BPE tokenizer, or encode text with one",
        description="Train a byte-level BPE tokenizer (Chapter 2) or encode text into "
        "token ids. Choose an action; `buildllm tokenize ACTION --help` explains it.",
        epilog="examples:\n"
        "  buildllm tokenize train --vocab-size 4096 --output tok.json\n"
        "  buildllm tokenize encode --tokenizer gpt2 --text 'Hello world'",
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
    )
    t.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        default=None,
        help="UTF-8 text files, each a document; default: the training works of "
        "the embedded Shakespeare corpus (buildllm.corpora)",
    )
    t.add_argument(
        "--vocab-size",
        type=VOCAB.parse,
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
        type=_pattern,
        default="gpt2",
        help="pre-tokenization regex: gpt2, gpt4 (cl100k) or your own",
    )
    t.add_argument(
        "--workers",
        type=WORKERS.parse,
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


def run_tokenize_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from buildllm.corpora import documents
    from buildllm.tokenizer import ENDOFTEXT, BPETokenizer

    source = [Path(f) for f in args.input] if args.input else documents(split="train")
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
            if sys.stdin.isatty():
                print("buildllm: reading the text from stdin (end it with Ctrl-D); or "
                      "pass --text TEXT or --input FILE", file=sys.stderr)  # fmt: skip
            texts = sys.stdin
        counted = (sizes.append(len(text.encode())) or text for text in texts)
        try:
            ids = list(tokenizer.encode_iterable(counted, **special))
        except ValueError as err:
            if "special token" not in str(err):
                raise
            raise ValueError(
                "the text contains a special token such as <|endoftext|>; pass "
                "--allowed-special all to encode it as its control token"
            ) from None
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


# ---------------------------------------------------------------- data
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
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list",
        help="show the corpora known by name",
        description="Show each corpus of buildllm.data.CORPORA: name, size, licence "
        "and URL.",
        epilog="example:\n  buildllm data list --json",
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
        help="tokenize a corpus into train.bin, val.bin and tokenizer.json",
        description="Tokenize a corpus in parallel, chunk by chunk (memory stays "
        "bounded), with <|endoftext|> after each document, and write OUT_DIR/train.bin "
        "and OUT_DIR/val.bin: a small header (dtype, vocab size, tokenizer hash), then "
        "uint16 ids (uint32 above 65,536 tokens). The last --val-fraction of the "
        "tokens is the validation split. The tokenizer goes beside them, as "
        "OUT_DIR/tokenizer.json, so `buildllm train --data OUT_DIR` reads the text "
        "with it (and sizes the model's vocabulary to it).",
        epilog="examples:\n  buildllm data prepare --out-dir data/stdlib\n"
        "  buildllm train --data data/stdlib --out-dir runs/stdlib\n"
        "  buildllm data prepare --dataset fineweb-edu-10B\n"
        "  buildllm data prepare --corpus tinystories-valid --tokenizer tok.json "
        "--out-dir data/stories\n  buildllm data prepare --corpus a.txt b.txt "
        "--out-dir data/mine --val-fraction 0.05",
    )
    pr.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="'default' or 'shakespeare' (the embedded plays and poems), 'stdlib' "
        "(embedded Python), a name from `buildllm data list` (downloaded first), or "
        "UTF-8 text files",
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
        type=Range(int, low=1, off="means all").parse,
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
        type=Range(float, low=0, high=1, high_open=True).parse,
        default=0.1,
        help="share of the tokens, taken from the end, for validation",
    )
    pr.add_argument(
        "--workers",
        type=WORKERS.parse,
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

    from buildllm.corpora import EMBEDDED, documents
    from buildllm.data import CORPORA, download, prepare, read_header

    if args.dataset is not None:
        return run_data_prepare_shards(args)
    if args.out_dir is None:
        raise ValueError("data prepare needs --out-dir DIR (or --dataset NAME)")
    sources: list[str | Path] = []
    for item in args.corpus:
        if item == "default" or item in EMBEDDED:
            sources.extend(documents("shakespeare" if item == "default" else item))
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
            "(Chapter 8); data prepare reads UTF-8 text files"
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
