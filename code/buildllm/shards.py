"""Pretraining data at web scale: fixed-size token shards, made in parallel, streamed.

Taught in Chapter 8 (Pretraining GPT-2 small), top to bottom: the datasets we know how
to fetch, reading documents from parquet/JSONL/text files a batch at a time, tokenizing
them in worker processes, cutting the token stream into shards of exactly
`shard_tokens` tokens (the first shard is the validation split) in data.py's token-file
format, and `ShardLoader`, which memory-maps one shard at a time and gives each rank
its own windows. As in llm.c's FineWeb preparation, an end-of-text token precedes each
document. References: Penedo et al. 2024 (arXiv:2406.17557, FineWeb and FineWeb-Edu).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing import Pool
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from buildllm.data import (
    download_url,
    get_cache_dir,
    load_tokens,
    token_dtype,
    write_tokens,
)
from buildllm.runfolder import write_atomic
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

FINEWEB_EDU = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main"
READ_ROWS = 1024  # documents per batch sent to a worker: amortises the pickling


@dataclass(frozen=True)
class DatasetSpec:
    """Where a pretraining dataset lives and how to cut it into shards.

    `sha256` holds one digest per URL, or None where none is pinned: then the first
    download's digest is recorded in the cache and checked from then on (download_url).
    `max_tokens` stops early (None: all). Raises ValueError for a bad count or size.
    """

    name: str
    urls: tuple[str, ...]
    sha256: tuple[str | None, ...]
    format: Literal["parquet", "jsonl", "text"] = "parquet"
    text_field: str = "text"
    shard_tokens: int = 100_000_000  # 200 MB of uint16 per shard, as llm.c
    max_tokens: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.sha256) != len(self.urls):
            raise ValueError(
                f"dataset {self.name!r} has {len(self.urls)} URLs but "
                f"{len(self.sha256)} checksums; give one sha256 (or None) per URL"
            )
        if self.shard_tokens < 2:
            raise ValueError(f"shard_tokens={self.shard_tokens} must be at least 2")


# FineWeb-Edu's sample-10BT: 14 parquet files, ~28.5 GB, ~10B GPT-2 tokens. The hub
# publishes each file's sha256 (its LFS oid); this offline-built package pins none yet.
_FW_URLS = tuple(f"{FINEWEB_EDU}/sample/10BT/{i:03d}_00000.parquet" for i in range(14))
DATASETS: dict[str, DatasetSpec] = {
    "fineweb-edu-10B": DatasetSpec(
        "fineweb-edu-10B", _FW_URLS, (None,) * len(_FW_URLS),
        description="FineWeb-Edu sample-10BT: ~10B tokens in shards of 100M",
    ),
    "fineweb-edu-100M": DatasetSpec(
        "fineweb-edu-100M", _FW_URLS[:1], (None,), shard_tokens=10_000_000,
        max_tokens=100_000_000,
        description="its first 100M tokens (one 2 GB file) in shards of 10M",
    ),
}  # fmt: skip


def read_documents(
    path: str | Path, format: str = "parquet", text_field: str = "text"
) -> Iterator[list[str]]:
    """Yield the documents of one file in batches of up to READ_ROWS texts.

    parquet: the `text_field` column, one record batch at a time (needs pyarrow:
    `pip install 'buildllm[data]'`); jsonl: one JSON object per line; text: documents
    separated by blank lines. Never holds the whole file in memory.
    Raises ValueError for an unknown format, RuntimeError without pyarrow.
    """
    path = Path(path)
    if format == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise RuntimeError(
                "reading parquet needs pyarrow: pip install 'buildllm[data]'"
            ) from err
        for batch in pq.ParquetFile(path).iter_batches(READ_ROWS, columns=[text_field]):
            yield batch.column(0).to_pylist()
    elif format in ("jsonl", "text"):
        with path.open(encoding="utf-8") as f:
            docs = _jsonl_docs(f, text_field) if format == "jsonl" else _text_docs(f)
            batch: list[str] = []
            for doc in docs:
                batch.append(doc)
                if len(batch) == READ_ROWS:
                    yield batch
                    batch = []
            if batch:
                yield batch
    else:
        raise ValueError(f"format={format!r} is unknown; use parquet, jsonl or text")


_worker: tuple[Callable[[str], list[int]], int, type] | None = None  # encode, eot


def init_worker(tokenizer: BPETokenizer) -> None:
    """Set up this process to tokenize with `tokenizer` (a Pool's initializer).

    Raises ValueError if the tokenizer has no end-of-text token to separate documents.
    """
    global _worker
    if tokenizer.eot_id is None:
        raise ValueError(
            "the tokenizer has no <|endoftext|> token to separate documents"
        )
    # tiktoken's Rust encoder gives the ids of tokenizer.encode_ordinary, ~20x faster
    encode = tokenizer.to_tiktoken().encode_ordinary
    _worker = (encode, tokenizer.eot_id, token_dtype(tokenizer.vocab_size))


def tokenize_documents(texts: Sequence[str]) -> np.ndarray:
    """Return one token stream: for each text, the end-of-text id, then its tokens.

    The delimiter goes *before* each document (as GPT-2's data, llm.c, nanoGPT), so
    every document starts after a boundary. Special-token text inside web pages is
    encoded as ordinary text: a page quoting `<|endoftext|>` cannot forge a boundary.
    Runs in a worker process set up by `init_worker`.

    Shapes: -> (N,) uint16 (a vocabulary of up to 65,536 ids fits) or uint32.
    """
    assert _worker is not None, "call init_worker(tokenizer) first"
    encode, eot_id, dtype = _worker
    ids: list[int] = []
    for text in texts:
        ids.append(eot_id)
        ids.extend(encode(text))
    return np.asarray(ids, dtype=dtype)  # (N,)


def write_shards(
    chunks: Iterable[np.ndarray],
    out_dir: str | Path,
    name: str,
    shard_tokens: int,
    max_tokens: int | None = None,
    progress: bool = True,
    **header: object,
) -> list[Path]:
    """Cut a stream of token chunks into shards of exactly `shard_tokens` tokens.

    Shard 0 is the validation split (`{name}_val_000000.bin`), the others train
    (`{name}_train_000001.bin`, ...); only the last may be shorter. `header`
    (vocab_size, tokenizer_hash) goes into each file's header. Returns the paths.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    buffer, filled, total = None, 0, 0
    bar = tqdm(total=max_tokens, desc=name, unit="tok", unit_scale=True,
               file=sys.stderr, disable=None if progress else True)  # fmt: skip
    for chunk in chunks:
        chunk = chunk[: None if max_tokens is None else max_tokens - total]
        while len(chunk):
            if buffer is None:
                buffer = np.empty(shard_tokens, dtype=chunk.dtype)  # (shard_tokens,)
            take = min(len(chunk), shard_tokens - filled)
            buffer[filled : filled + take] = chunk[:take]
            filled, total, chunk = filled + take, total + take, chunk[take:]
            bar.update(take)
            if filled == shard_tokens:
                paths.append(_write_shard(out_dir, name, len(paths), buffer, header))
                filled = 0
        if total == max_tokens:
            break
    if filled:
        paths.append(_write_shard(out_dir, name, len(paths), buffer[:filled], header))
    bar.close()
    return paths


def prepare_dataset(
    dataset: str | DatasetSpec,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    tokenizer: BPETokenizer | None = None,
    workers: int | None = None,
    shard_tokens: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download a dataset, tokenize it in parallel and write its token shards.

    Files are downloaded one at a time as the reader reaches them (resumed, checked
    against their sha256, kept in `cache_dir`), so a `max_tokens` run never fetches
    files it does not need. `workers` processes tokenize (None: one per core; 1: no
    pool). The manifest `{name}.json` records what was written: a second call with the
    same dataset, settings and tokenizer returns the existing shards at once. The
    tokenizer is saved beside them as tokenizer.json, where the trainer looks for it.
    Raises ValueError for an unknown dataset; see data.download_url for download errors.
    """
    spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
    spec = replace(spec, shard_tokens=shard_tokens or spec.shard_tokens,
                   max_tokens=max_tokens or spec.max_tokens)  # fmt: skip
    tokenizer = tokenizer or gpt2_tokenizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{spec.name}.json"
    settings = json.loads(
        json.dumps({"dataset": asdict(spec), "tokenizer": tokenizer.hash})
    )
    done = _read_manifest(manifest, settings)
    if done is not None:
        return done

    def batches() -> Iterator[list[str]]:
        for url, sha256 in zip(spec.urls, spec.sha256):
            path = download_url(url, cache_dir, sha256, progress)
            yield from read_documents(path, spec.format, spec.text_field)

    header = {"vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash}
    args = (out_dir, spec.name, spec.shard_tokens, spec.max_tokens, progress)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        init_worker(tokenizer)
        paths = write_shards(map(tokenize_documents, batches()), *args, **header)
    else:
        with Pool(workers, initializer=init_worker, initargs=(tokenizer,)) as pool:
            chunks = _ordered_map(pool, batches(), ahead=2 * workers)
            paths = write_shards(chunks, *args, **header)
    tokenizer.save(out_dir / "tokenizer.json")
    record = {**settings, "shards": [p.name for p in paths]}
    write_atomic(manifest, json.dumps(record, indent=1))
    return paths


class ShardLoader:
    """Stream (x, y) training batches from token shards, one memory-mapped at a time.

    All ranks walk the shards in step: a step takes `world_size * batch_size *
    context_length` consecutive tokens of the current shard and rank r reads the r-th
    block of them, so no two ranks read the same window. When a shard cannot fill
    another step, every rank moves to the next one (after the last, back to the first).
    Only the windows read are paged in: a 200 MB shard is never loaded whole.
    `state_dict()` is the position, the same on every rank; a checkpoint saves it.
    Raises ValueError for no paths or a rank outside [0, world_size).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        batch_size: int,
        context_length: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if not paths:
            raise ValueError(
                "ShardLoader got no shards; pass find_shards(DIR, 'train')"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.paths = [Path(p) for p in paths]
        self.batch_size, self.context_length = batch_size, context_length
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.shard, self.offset = 0, 0
        self._tokens = load_tokens(self.paths[0])

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Return this rank's next inputs and targets (targets = inputs shifted by one).

        Shapes: -> x (B, T), y (B, T) int64 on `device`.
        Raises ValueError if a shard is too small for even one step.
        """
        B, T = self.batch_size, self.context_length
        step_tokens = self.world_size * B * T
        if self.offset + step_tokens + 1 > len(self._tokens):  # + 1: the last target
            if self.offset == 0:
                raise ValueError(
                    f"shard {self.paths[self.shard]} holds {len(self._tokens)} tokens, "
                    f"fewer than one step needs ({step_tokens + 1}); use bigger shards "
                    "or a smaller batch_size * context_length"
                )
            self._seek((self.shard + 1) % len(self.paths), 0)
            return self.next_batch()
        start = self.offset + self.rank * B * T
        window = self._tokens[start : start + B * T + 1]  # (B*T + 1,), paged in
        buf = torch.from_numpy(window.astype(np.int64))  # (B*T + 1,)
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # (B, T) each
        self.offset += step_tokens
        if self.device.type == "cuda":  # pinned memory: the copy overlaps compute
            x, y = x.pin_memory(), y.pin_memory()
        return (x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True))  # fmt: skip

    def state_dict(self) -> dict[str, int]:
        """Return the position of the next step: shard index and token offset."""
        return {"shard": self.shard, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position `state_dict()` returned."""
        self._seek(int(state["shard"]), int(state["offset"]))

    def _seek(self, shard: int, offset: int) -> None:
        if shard != self.shard:
            self._tokens = load_tokens(self.paths[shard])
        self.shard, self.offset = shard, offset


def get_dataset(name: str) -> DatasetSpec:
    """Return the registered dataset `name`; ValueError naming the known ones if not."""
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; use one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the default folder of dataset `name`'s shards: the cache's NAME folder."""
    return get_cache_dir(cache_dir) / name


def find_shards(directory: str | Path, split: Literal["train", "val"]) -> list[Path]:
    """Return the `split` shards in `directory`, in order; FileNotFoundError if none."""
    paths = sorted(Path(directory).glob(f"*_{split}_*.bin"))
    if not paths:
        raise FileNotFoundError(
            f"no {split} shards (*_{split}_*.bin) in {directory}; make them with "
            "`buildllm data prepare --dataset fineweb-edu-10B --out-dir DIR`"
        )
    return paths


def _jsonl_docs(lines: Iterable[str], text_field: str) -> Iterator[str]:
    for line in lines:
        if line.strip():
            yield json.loads(line)[text_field]


def _text_docs(lines: Iterable[str]) -> Iterator[str]:
    doc: list[str] = []
    for line in itertools.chain(lines, ["\n"]):  # a blank line closes the last document
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).rstrip("\n")
            doc = []


def _write_shard(out_dir: Path, name: str, index: int, tokens: np.ndarray,
                 header: dict) -> Path:  # fmt: skip
    split = "val" if index == 0 else "train"
    return write_tokens(
        Path(out_dir) / f"{name}_{split}_{index:06d}.bin", tokens, **header
    )


def _ordered_map(
    pool: Pool, batches: Iterator[list[str]], ahead: int
) -> Iterator[np.ndarray]:
    """`pool.imap(tokenize_documents, batches)` reading at most `ahead` batches ahead:
    `Pool.imap` reads all its input at once, which for 28 GB of text fills memory."""
    pending: deque = deque()
    for texts in batches:
        pending.append(pool.apply_async(tokenize_documents, (texts,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _read_manifest(path: Path, settings: dict) -> list[Path] | None:
    """Return the shards a finished run with the same settings wrote, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    paths = [path.parent / name for name in record["shards"]]
    same = all(record.get(key) == value for key, value in settings.items())
    return paths if same and all(p.is_file() for p in paths) else None
