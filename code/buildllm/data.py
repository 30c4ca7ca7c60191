"""Corpora, token files and batches: from text on disk to (inputs, targets) tensors.

Taught in Chapter 2 (Data and Tokenization); Chapter 6 trains on `get_batch`, and
Chapter 8's `shards.py` writes its shards with `write_tokens`. A token file is a
256-byte header, then the ids as little-endian `uint16` (vocab_size <= 65,536) or
`uint32`. The header is the magic b"BLLMTOK1", then a UTF-8 JSON object padded with
spaces: {"dtype": "uint16" | "uint32", "vocab_size": int | null, "tokenizer_hash":
sha256 hex | null, "n_tokens": int}. Read it with `load_tokens`.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import itertools
import json
import os
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from buildllm.bpe import iter_chunks
from buildllm.checks import check_file
from buildllm.runfolder import atomic_file
from buildllm.tokenizer import BPETokenizer

MAGIC = b"BLLMTOK1"
HEADER_BYTES = 256  # magic + padded JSON; keeps the ids 256-byte aligned for memmap
BLOCK = 1 << 20  # bytes per read or write: steady memory whatever the file size
TOKENIZER = "tokenizer.json"  # the tokenizer of a data folder's (and a run's) tokens


@dataclass(frozen=True)
class Corpus:
    """A downloadable corpus: where it lives and how to check it.

    `sha256` None means the upstream file has no published hash: the first download
    records its hash next to the file (`<file>.sha256`) and later loads verify it.
    """

    name: str
    url: str
    sha256: str | None
    filename: str
    description: str


_GITHUB = "https://raw.githubusercontent.com/"
_HF = "https://huggingface.co/datasets/"
# fmt: off
CORPORA = {corpus.name: corpus for corpus in [
    Corpus("tinyshakespeare", _GITHUB + "karpathy/char-rnn/master/data/tinyshakespeare/"
           "input.txt", None, "tinyshakespeare.txt",
           "40,000 lines of Shakespeare, 1.1 MB (Karpathy's char-rnn); public domain"),
    Corpus("tinystories-valid", _HF + "roneneldan/TinyStories/resolve/main/"
           "TinyStories-valid.txt", None, "TinyStories-valid.txt",
           "22k short stories, 19 MB, <|endoftext|> between stories (Eldan & Li 2023, "
           "arXiv:2305.07759); CDLA-Sharing-1.0"),
    Corpus("tinystories", _HF + "roneneldan/TinyStories/resolve/main/"
           "TinyStories-train.txt", None, "TinyStories-train.txt",
           "2.1M TinyStories training stories, 1.9 GB; CDLA-Sharing-1.0"),
    Corpus("fineweb-edu-sample", _HF + "HuggingFaceFW/fineweb-edu/resolve/main/sample/"
           "10BT/000_00000.parquet", None, "fineweb-edu-10BT-000_00000.parquet",
           "first ~2 GB parquet file of FineWeb-Edu's 10BT sample, column 'text' "
           "(arXiv:2406.17557); ODC-By 1.0; tokenize it with shards.py"),
]}
# fmt: on


def get_cache_dir(folder: str | Path | None = None) -> Path:
    """Return the download folder: `folder`, else $BUILDLLM_CACHE, else the user's."""
    import platformdirs

    folder = folder or os.environ.get("BUILDLLM_CACHE")
    return Path(folder or platformdirs.user_cache_dir("buildllm"))


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, part: Path, progress: bool) -> None:
    """Append the rest of `url` to `part`, resuming with an HTTP Range request.

    A server that ignores Range answers 200 and the file starts over. Raises OSError or
    http.client.HTTPException when the connection fails or ends early.
    """
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "buildllm"})
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # Range starts at the end: the file is already whole
            return
        raise
    with response:
        if response.status != 206:
            done = 0
        total = None if response.length is None else done + response.length
        with part.open("ab" if done else "wb") as file, tqdm(
            total=total, initial=done, unit="B", unit_scale=True, desc=part.stem,
            disable=None if progress else True,
        ) as bar:  # fmt: skip
            while block := response.read(BLOCK):
                file.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def download_url(
    url: str,
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
    progress: bool = True,
    filename: str | None = None,
    retries: int = 3,
) -> Path:
    """Download `url` into the cache once and return its path; check its sha256.

    A broken connection resumes from the partial file (`<file>.part`); a file whose hash
    is wrong is deleted and fetched again, up to `retries` attempts in all. Without
    `sha256`, the first download's hash is recorded in `<file>.sha256` and checked on
    every later call. The finished file appears by an atomic rename. Raises ValueError
    when every attempt gives the wrong hash, RuntimeError when the server cannot be
    reached.
    """
    folder = get_cache_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or url.rstrip("/").rsplit("/", 1)[-1])
    record = path.with_name(path.name + ".sha256")
    expected = sha256 or (record.read_text().strip() if record.exists() else None)
    if path.exists():
        if expected is None or sha256_file(path) == expected:
            return path
        path.unlink()  # corrupted in the cache: fetch it again
    part = path.with_name(path.name + ".part")
    error = "no attempt"
    for _ in range(retries):
        try:
            fetch(url, part, progress)
        except (OSError, http.client.HTTPException) as err:
            error = f"{type(err).__name__}: {err}"  # the next try resumes the .part
            continue
        got = sha256_file(part)
        if expected is None or got == expected:
            os.replace(part, path)
            if expected is None:
                record.write_text(got + "\n")
            return path
        part.unlink()
        error = f"sha256 {got}, expected {expected}"
    if error.startswith("sha256"):
        raise ValueError(
            f"{url} has {error} after {retries} downloads; wrong URL or hash?"
        )
    raise RuntimeError(f"could not download {url} after {retries} attempts: {error}")


def download(
    name: str | Corpus, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Download a corpus of `CORPORA` (or a `Corpus`) into the cache; return its path.

    Raises ValueError for an unknown name; see `download_url` for the rest.
    """
    if isinstance(name, str):
        if name not in CORPORA:
            raise ValueError(
                f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}"
            )
        name = CORPORA[name]
    return download_url(name.url, cache_dir, name.sha256, progress, name.filename)


def token_dtype(vocab_size: int) -> type:
    """Return the smallest id type: uint16 halves the file when ids fit in 16 bits."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_tokens(
    path: str | Path,
    tokens: np.ndarray | Iterable[np.ndarray],
    vocab_size: int | None = None,
    tokenizer_hash: str | None = None,
) -> Path:
    """Write ids (an array, or a stream of arrays) to a token file, atomically.

    The dtype is `token_dtype(vocab_size)`, or without `vocab_size` the first array's
    (uint16 or uint32). Streaming keeps memory at one array. Raises ValueError for ids
    that do not fit the dtype or for another dtype.
    Shapes: tokens (N,) or a stream of (N_i,).
    """
    path = Path(path)
    arrays = iter([tokens] if isinstance(tokens, np.ndarray) else tokens)
    first = next(arrays, np.zeros(0, np.uint16))
    dtype = np.dtype(token_dtype(vocab_size) if vocab_size else first.dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"token ids have dtype {dtype}; use uint16 or uint32 arrays")
    limit = np.iinfo(dtype).max if vocab_size is None else vocab_size - 1
    n_tokens = 0
    with atomic_file(path) as file:  # a crash never leaves a half-written token file
        file.write(bytes(HEADER_BYTES))  # placeholder until n_tokens is known
        for array in itertools.chain([first], arrays):
            array = np.asarray(array)
            if array.size and (array.min() < 0 or array.max() > limit):
                raise ValueError(f"ids must lie in 0..{limit}; got {array.max()}")
            array.astype(dtype.newbyteorder("<"), copy=False).tofile(file)
            n_tokens += array.size
        header = {"dtype": dtype.name, "vocab_size": vocab_size,
                  "tokenizer_hash": tokenizer_hash, "n_tokens": n_tokens}  # fmt: skip
        file.seek(0)
        file.write(MAGIC + json.dumps(header).encode().ljust(HEADER_BYTES - len(MAGIC)))
    return path


def read_header(path: str | Path) -> dict:
    """Return a token file's header; FileNotFoundError or ValueError for a bad file."""
    path = check_file(path, "token file")
    with path.open("rb") as file:
        raw = file.read(HEADER_BYTES)
    try:
        if raw[: len(MAGIC)] != MAGIC:
            raise ValueError("wrong magic bytes")
        header = json.loads(raw[len(MAGIC) :])
        if header["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"dtype {header['dtype']}")
        size = path.stat().st_size - HEADER_BYTES
        if size != header["n_tokens"] * np.dtype(header["dtype"]).itemsize:
            raise ValueError(f"{size} bytes of ids for {header['n_tokens']} tokens")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a buildllm token file ({err}); write it with "
            "`buildllm data prepare` or data.write_tokens"
        ) from None
    return header


def load_tokens(path: str | Path) -> np.ndarray:
    """Map a token file into memory without reading it (np.memmap, read-only).

    Shapes: -> (n_tokens,) uint16 or uint32.
    """
    header = read_header(path)
    if header["n_tokens"] == 0:
        return np.zeros(0, dtype=header["dtype"])  # memmap cannot map zero bytes
    dtype = np.dtype(header["dtype"]).newbyteorder("<")  # the same on every machine
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES,
                     shape=(header["n_tokens"],))  # fmt: skip


_worker_encode = None  # the encode function of a prepare() worker process


def _init_encoder(tokenizer: BPETokenizer, impl: Literal["manual", "fast"]) -> None:
    global _worker_encode
    encode = tokenizer.to_tiktoken().encode if impl == "fast" else tokenizer.encode
    _worker_encode = functools.partial(encode, allowed_special="all")


def _encode_chunk(chunk: str) -> np.ndarray:
    return np.asarray(_worker_encode(chunk), dtype=np.uint32)


def encode_corpus(
    source: str | Path | Iterable[str | Path],
    tokenizer: BPETokenizer,
    workers: int | None = None,
    impl: Literal["manual", "fast"] = "fast",
) -> Iterator[np.ndarray]:
    """Yield the ids of a corpus in order, chunk by chunk, from `workers` processes.

    Each document (text or file) is followed by `<|endoftext|>` when the tokenizer has
    it; special-token text inside the corpus is encoded as the special token (corpus
    files are trusted: TinyStories separates stories so). "fast" encodes with
    `tokenizer.to_tiktoken()`, "manual" with `tokenizer.encode`: the ids are equal.
    """
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    items = [source] if isinstance(source, (str, Path)) else source
    pieces = (c for item in items for c in itertools.chain(iter_chunks(item), [None]))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        _init_encoder(tokenizer, impl)
        for piece in pieces:
            yield np.asarray(eot, np.uint32) if piece is None else _encode_chunk(piece)
        return
    with ProcessPoolExecutor(workers, initializer=_init_encoder,
                             initargs=(tokenizer, impl)) as pool:  # fmt: skip
        pending: deque = deque()  # two chunks per worker in flight: bounded memory
        for piece in pieces:
            pending.append(eot if piece is None else pool.submit(_encode_chunk, piece))
            while len(pending) > 2 * workers or (pending and pending[0] is eot):
                job = pending.popleft()
                yield np.asarray(eot, np.uint32) if job is eot else job.result()
        for job in pending:
            yield np.asarray(eot, np.uint32) if job is eot else job.result()


def prepare(
    source: str | Path | Iterable[str | Path],
    tokenizer: BPETokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    workers: int | None = None,
    impl: Literal["manual", "fast"] = "fast",
    progress: bool = True,
) -> dict[str, Path]:
    """Tokenize a corpus into `out_dir/train.bin`, `out_dir/val.bin`, tokenizer.json.

    The last `val_fraction` of the token stream is the validation split. The ids stream
    to disk (memory stays at a few chunks), then split by copying; the tokenizer is
    saved beside them, so whoever reads the folder decodes with it. `source` is as in
    `encode_corpus`. Raises ValueError for a bad `val_fraction`, an empty corpus, or an
    out_dir whose tokenizer.json is another tokenizer (it is left as it is).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1), e.g. 0.1")
    out_dir = Path(out_dir)
    saved = out_dir / TOKENIZER
    if saved.is_file() and BPETokenizer.load(saved).hash != tokenizer.hash:
        raise ValueError(
            f"{saved} is another tokenizer, whose token files this would replace; "
            "choose another --out-dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash}
    bar = tqdm(unit="tok", unit_scale=True, disable=None if progress else True)
    ids = encode_corpus(source, tokenizer, workers, impl)
    stream = (bar.update(len(chunk)) or chunk for chunk in ids)  # (N_i,) each
    whole = write_tokens(out_dir / "all.bin.tmp", stream, **meta)
    bar.close()
    tokens = load_tokens(whole)
    if len(tokens) < 2:
        whole.unlink()
        raise ValueError("the corpus encodes to fewer than 2 tokens; pass more text")
    cut = len(tokens) - int(len(tokens) * val_fraction)
    paths = {"train": out_dir / "train.bin", "val": out_dir / "val.bin"}
    for split, (start, stop) in zip(paths, [(0, cut), (cut, len(tokens))]):
        blocks = (tokens[i : min(i + BLOCK, stop)] for i in range(start, stop, BLOCK))
        write_tokens(paths[split], blocks, **meta)
    del tokens
    whole.unlink()
    tokenizer.save(saved)
    return paths


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw `batch_size` random windows: inputs and the same windows one token later.

    `targets[b, t]` is the token after `inputs[b, t]`, so one forward pass learns
    `context_length` next-token predictions per row. `generator` (a CPU generator)
    makes the draw reproducible. On CUDA the batch goes through pinned memory with a
    non-blocking copy. Raises ValueError when `tokens` is shorter than a window.
    Shapes: tokens (N,) -> inputs (B, T), targets (B, T), int64.
    """
    if len(tokens) < context_length + 1:
        raise ValueError(
            f"context_length={context_length} needs {context_length + 1} tokens per "
            f"window but there are {len(tokens)}; use more data or a shorter one"
        )
    n_starts = len(tokens) - context_length  # the last window ends on the last token
    starts = torch.randint(n_starts, (batch_size,), generator=generator)
    rows = [np.asarray(tokens[s : s + context_length + 1]) for s in starts.tolist()]
    windows = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
    inputs = windows[:, :-1].contiguous()  # (B, T)
    targets = windows[:, 1:].contiguous()  # (B, T)
    if torch.device(device).type == "cuda":  # page-locked memory: the copy runs async
        return tuple(
            t.pin_memory().to(device, non_blocking=True) for t in (inputs, targets)
        )
    return inputs.to(device), targets.to(device)
