"""Tests for buildllm.data and the `tokenize` / `data` commands of buildllm.cli.

References: hand-sliced arrays (targets are inputs shifted by one), tiktoken's `gpt2`
encoding of the same text (conftest), hashlib on the served bytes, and a local HTTP
server on 127.0.0.1 that corrupts or cuts responses on request (conftest).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from buildllm import bpe, data
from buildllm.cli import build_parser, main
from buildllm.corpora import default_corpus
from buildllm.data import (
    Corpus,
    download,
    download_url,
    get_batch,
    load_tokens,
    prepare,
    read_header,
    write_tokens,
)
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

CORPUS_DIR = Path(data.__file__).parent / "corpus"
PAYLOAD = bytes(range(256)) * 64  # 16 KiB: several reads, and every byte value


# ---------------------------------------------------------------- default corpus


def test_stdlib_corpus_is_the_listed_modules_in_order():
    text = default_corpus("stdlib")
    names = (CORPUS_DIR / "SOURCES.txt").read_text().split()
    headers = [line for line in text.splitlines() if line.startswith("# file: ")]
    assert [h.split()[2] for h in headers] == names
    assert len(text.encode("utf-8")) > 1_000_000
    assert "<|endoftext|>" not in text  # encodes without allowed_special
    with gzip.open(CORPUS_DIR / "stdlib.txt.gz", "rt", encoding="utf-8") as f:
        assert f.read() == text
    assert (
        "PYTHON SOFTWARE FOUNDATION LICENSE"
        in (CORPUS_DIR / "LICENSE-PSF.txt").read_text()
    )


# ---------------------------------------------------------------- batches


def test_get_batch_targets_are_the_inputs_shifted_by_one(generator):
    tokens = (np.arange(1000) * 7 % 50257).astype(np.uint16)
    x, y = get_batch(tokens, batch_size=5, context_length=16, generator=generator)
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    starts = torch.randint(1000 - 16, (5,), generator=torch.Generator().manual_seed(0))
    for b, s in enumerate(starts.tolist()):
        assert x[b].tolist() == tokens[s : s + 16].tolist()
        assert y[b].tolist() == tokens[s + 1 : s + 17].tolist()


def test_get_batch_reaches_the_last_token_and_rejects_short_data():
    tokens = np.arange(9, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=4, context_length=8)  # one window fits
    assert x.tolist() == [list(range(8))] * 4 and y.tolist() == [list(range(1, 9))] * 4
    with pytest.raises(ValueError, match="context_length=9"):
        get_batch(tokens, batch_size=1, context_length=9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_on_cuda_equals_the_cpu_batch():
    tokens = np.arange(500, dtype=np.uint16)
    cpu = get_batch(tokens, 3, 32, generator=torch.Generator().manual_seed(1))
    gpu = get_batch(tokens, 3, 32, "cuda", generator=torch.Generator().manual_seed(1))
    assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu(), cpu[1])


# ---------------------------------------------------------------- token files


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(50257, "uint16"), (100277, "uint32")]
)
def test_token_files_round_trip_through_memmap_with_the_smallest_dtype(
    tmp_path, vocab_size, dtype
):
    ids = np.array([0, 1, 2, vocab_size - 1, 42], dtype=np.int64)
    path = write_tokens(tmp_path / "t.bin", ids, vocab_size, "ab" * 32)
    tokens = load_tokens(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
    assert tokens.tolist() == ids.tolist()
    expected = {"dtype": dtype, "vocab_size": vocab_size, "tokenizer_hash": "ab" * 32}
    assert read_header(path) == {**expected, "n_tokens": 5}
    assert path.stat().st_size == 256 + 5 * np.dtype(dtype).itemsize


def test_bad_token_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        load_tokens(tmp_path / "nothing.bin")
    path = write_tokens(tmp_path / "t.bin", np.arange(10, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="not a buildllm token file"):
        load_tokens(path)
    path.write_bytes(b"GARBAGE!" + bytes(300))
    with pytest.raises(ValueError, match="not a buildllm token file"):
        load_tokens(path)
    with pytest.raises(ValueError, match="0..99"):
        write_tokens(tmp_path / "u.bin", np.array([5, 100]), vocab_size=100)
    assert not (tmp_path / "u.bin").exists()


@pytest.mark.parametrize(("workers", "impl"), [(1, "manual"), (2, "fast")])
def test_prepare_writes_tiktokens_ids_split_into_train_and_val(
    tmp_path, gpt2_encoding, monkeypatch, workers, impl
):
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 4096)
    docs = [default_corpus("stdlib")[:30_000], "tail <|endoftext|> text"]
    expected = [
        i
        for doc in docs
        for i in [*gpt2_encoding.encode(doc, allowed_special="all"), 50256]
    ]
    paths = prepare(
        docs, gpt2_tokenizer(), tmp_path, 0.1, workers, impl, progress=False
    )
    train, val = load_tokens(paths["train"]), load_tokens(paths["val"])
    assert train.tolist() + val.tolist() == expected
    assert len(val) == int(len(expected) * 0.1)
    assert read_header(paths["val"])["tokenizer_hash"] == gpt2_tokenizer().hash
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["tokenizer.json", "train.bin", "val.bin"]  # no temporary file left
    saved = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert saved.encode(docs[0]) == gpt2_encoding.encode(docs[0])


# ---------------------------------------------------------------- downloads


def corpus_on(server, path: str, sha256: str | None) -> Corpus:
    server.files[path] = PAYLOAD
    return Corpus("test", server.url(path), sha256, Path(path).name, "served locally")


def test_download_checks_sha256_and_serves_later_calls_from_the_cache(
    http_server, tmp_path
):
    corpus = corpus_on(http_server, "/a.txt", hashlib.sha256(PAYLOAD).hexdigest())
    path = download(corpus, tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and path.parent == tmp_path
    assert download(corpus, tmp_path, progress=False) == path
    assert len(http_server.requests) == 1


def test_a_corrupt_download_is_rejected_and_fetched_again(http_server, tmp_path):
    corpus = corpus_on(http_server, "/b.txt", hashlib.sha256(PAYLOAD).hexdigest())
    http_server.faults["/b.txt"] = ["corrupt", "ok"]
    assert download(corpus, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(http_server.requests) == 2
    http_server.faults["/b.txt"] = ["corrupt"] * 3
    (tmp_path / "b.txt").unlink()
    with pytest.raises(ValueError, match="sha256"):
        download(corpus, tmp_path, progress=False)
    assert not (tmp_path / "b.txt").exists()


def test_a_broken_download_resumes_with_a_range_request(http_server, tmp_path):
    corpus = corpus_on(http_server, "/c.txt", hashlib.sha256(PAYLOAD).hexdigest())
    http_server.faults["/c.txt"] = ["truncate", "ok"]
    assert download(corpus, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert http_server.requests == [
        ("/c.txt", None),
        ("/c.txt", f"bytes={len(PAYLOAD) // 2}-"),
    ]


def test_without_a_known_hash_the_first_download_is_recorded_and_enforced(
    http_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path / "cache"))
    corpus = corpus_on(http_server, "/d.txt", None)
    path = download(corpus, progress=False)
    assert path.parent == tmp_path / "cache"
    recorded = (tmp_path / "cache" / "d.txt.sha256").read_text().strip()
    assert recorded == hashlib.sha256(PAYLOAD).hexdigest()
    path.write_bytes(b"tampered")  # a damaged cache file is noticed and replaced
    assert download(corpus, progress=False).read_bytes() == PAYLOAD
    assert len(http_server.requests) == 2


def test_unknown_names_and_unreachable_servers_raise_clear_errors(
    http_server, tmp_path
):
    with pytest.raises(ValueError, match="tinyshakespeare"):
        download("no-such-corpus", tmp_path)
    url = http_server.url("/missing.txt")
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        download_url(url, tmp_path, progress=False, retries=2)


# ---------------------------------------------------------------- command line


def test_cli_trains_and_encodes_like_the_library(tmp_path, capsys, gpt2_encoding):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(default_corpus("stdlib")[:20_000], encoding="utf-8")
    out = tmp_path / "tok.json"
    args = ["tokenize", "train", "--input", str(corpus), "--vocab-size", "300"]
    assert main([*args, "--output", str(out), "--workers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300
    assert BPETokenizer.load(out).vocab_size == 300
    assert main(["tokenize", "encode", "--text", "Hello, world!"]) == 0
    assert capsys.readouterr().out.split() == [
        str(i) for i in gpt2_encoding.encode("Hello, world!")
    ]
    assert main(["tokenize", "encode", "--text", "<|endoftext|>"]) == 1
    assert "special token" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenize",
                "encode",
                "--text",
                "<|endoftext|>",
                "--allowed-special",
                "all",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == ["50256"]


def test_cli_prepares_token_files(tmp_path, capsys, gpt2_encoding):
    text = "A tiny corpus.\n" * 50
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--corpus", str(corpus), "--out-dir", str(out)]
    assert main([*argv, "--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train"]["n_tokens"] + result["val"]["n_tokens"] == (
        len(gpt2_encoding.encode(text)) + 1  # + <|endoftext|> after the document
    )
    assert main(["data", "prepare", "--corpus", "nowhere.txt", "--out-dir", "x"]) == 1
    assert "nowhere.txt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [("tokenize", "train"), ("tokenize", "encode"), ("data", "prepare"),
     ("data", "download"), ("data", "list")],
)  # fmt: skip
def test_cli_help_explains_every_option_with_an_example(command, capsys):
    parser = build_parser()
    for name in command:
        parser = parser._subparsers._group_actions[0].choices[name]
    assert parser.description and "buildllm " + " ".join(command) in parser.epilog
    assert all(action.help for action in parser._actions)
    assert main([*command, "--help"]) == 0
    assert "usage: buildllm " + " ".join(command) in capsys.readouterr().out
    assert main([*command, "--no-such-flag"]) == 2
