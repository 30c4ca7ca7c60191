"""Tests for buildllm.vocab_io and `BPETokenizer.from_vocab_and_merges`.

References: tiktoken's `gpt2` encoding (conftest), whose ranks give the interchange form
by a BPE replay written here; a hand-worked vocabulary whose ids are not in merge order.
"""

from __future__ import annotations

import itertools
import random

import pytest
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from buildllm.corpora import default_corpus
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "naïve café, Ελληνικά, русский, 中文文本，日本語 😀🎉 and   spaces \n\n",
    "contractions: I'm, you're, they'll, CAN'T<|endoftext|>numbers 12345 3.14",
]
BYTES = {i: bytes([i]) for i in range(256)}


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges behind tiktoken's ranks: replay BPE on each token with lower ranks.

    Merging with only the ranks below token t's leaves exactly the two parts whose
    merge made t (what minbpe's GPT-4 wrapper does to read tiktoken's files).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [
                (ranks[a + b], i)
                for i, (a, b) in enumerate(itertools.pairwise(parts))
                if ranks.get(a + b, rank) < rank
            ]
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@pytest.fixture(scope="module")
def gpt2_interchange(gpt2_files) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """GPT-2 as {id: bytes} and byte merges, read by tiktoken, not by buildllm."""
    encoder_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return {i: token for token, i in ranks.items()}, recover_merges(ranks)


def test_gpt2_from_tiktoken_ranks_encodes_exactly_like_tiktoken(
    gpt2_interchange, gpt2_encoding
):
    vocab, merges = gpt2_interchange
    tokenizer = BPETokenizer.from_vocab_and_merges(
        vocab, merges, {"<|endoftext|>": 50256}
    )
    for text in [*TEXTS, default_corpus()[:20_000]]:
        expected = gpt2_encoding.encode(text, allowed_special="all")
        assert tokenizer.encode(text, allowed_special="all") == expected
    assert tokenizer.to_vocab_and_merges() == (vocab, merges)
    assert tokenizer.hash == gpt2_tokenizer().hash  # the very same tokenizer


def test_ids_in_another_order_than_the_merges_encode_as_the_original(
    gpt2_interchange, gpt2_encoding
):
    """A permutation of GPT-2's ids: the merges, not the ids, set the order."""
    vocab, merges = gpt2_interchange
    new_id = list(range(len(vocab)))
    random.Random(0).shuffle(new_id)
    permuted = {new_id[i]: token for i, token in vocab.items()}
    tokenizer = BPETokenizer.from_vocab_and_merges(
        permuted, merges, {"<|endoftext|>": 50256}
    )
    for text in [*TEXTS, default_corpus("stdlib")[:20_000]]:
        expected = gpt2_encoding.encode(text, allowed_special="all")
        ids = tokenizer.encode(text, allowed_special="all")
        assert ids == [i if i == 50256 else new_id[i] for i in expected]
        assert tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="not in merge order"):
        tokenizer.to_tiktoken()  # tiktoken ranks by id: it cannot hold this order


def test_the_first_merge_applies_first_even_when_its_token_has_the_larger_id():
    """Worked by hand: merge 0 is a+b (id 257), merge 1 is b+c (id 256)."""
    vocab = BYTES | {256: b"bc", 257: b"ab"}
    tokenizer = BPETokenizer.from_vocab_and_merges(
        vocab, [(b"a", b"b"), (b"b", b"c")], pattern=r"\S+|\s+"
    )
    assert tokenizer.encode("abc") == [257, ord("c")]  # ab + c, not a + bc
    assert tokenizer.encode("bc") == [256]
    assert tokenizer.merge_rank(b"ab") == 0 and tokenizer.merge_rank(b"a") is None


@pytest.mark.parametrize(
    "vocab, merges, specials, kind, words",
    [
        (BYTES | {256: b"ab"}, [(b"a", b"x!")], {}, ValueError, "b'x!', which is not"),
        (BYTES | {256: b"ab"}, [(b"a", b"c")], {}, ValueError, "b'ac', which is not"),
        (BYTES | {257: b"ab"}, [(b"a", b"b")], {}, ValueError, "id 256 is missing"),
        (BYTES | {256: b"a"}, [], {}, ValueError, "ids 97 and 256 both hold b'a'"),
        (
            BYTES | {256: b"ab"},
            [(b"a", b"b")],
            {"<|x|>": 256},
            ValueError,
            "both the special token '<|x|>'",
        ),
        (BYTES | {256: "ab"}, [], {}, TypeError, "must be bytes, got str"),
        (BYTES | {256: b"ab"}, [], {}, ValueError, "formed by no merge"),
        ({i: bytes([i]) for i in range(255)}, [], {}, ValueError, "256 single bytes"),
    ],
)
def test_inconsistent_vocab_and_merges_raise_one_line_naming_the_problem(
    vocab, merges, specials, kind, words
):
    with pytest.raises(kind) as info:
        BPETokenizer.from_vocab_and_merges(vocab, merges, specials)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_special_token_listed_in_the_vocab_at_its_id_is_that_token():
    vocab = BYTES | {256: b"ab", 257: b"<|endoftext|>"}  # as Hugging Face lists it
    tokenizer = BPETokenizer.from_vocab_and_merges(
        vocab, [(b"a", b"b")], {"<|endoftext|>": 257}
    )
    assert tokenizer.vocab_size == 258 and tokenizer.eot_id == 257
    assert tokenizer.encode("ab<|endoftext|>", allowed_special="all") == [256, 257]


def test_the_constructor_refuses_merges_that_do_not_fit_its_vocabulary():
    vocab = [bytes([i]) for i in range(256)]
    with pytest.raises(ValueError, match=r"merge 0 joins ids \(97, 300\)"):
        BPETokenizer(vocab, [(97, 300)], {})
    with pytest.raises(ValueError, match="a merge forms b'ab', which is not in"):
        BPETokenizer(vocab, [(97, 98)], {})  # no token b"ab" for it to form
