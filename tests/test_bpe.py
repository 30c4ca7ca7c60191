"""Tests for buildllm.bpe: BPE training, merge for merge, and streaming in chunks.

References: a hand-worked example (Stanford CS336 assignment 1, §2.4), a from-scratch
BPE written here that recounts every pair after every merge, HF `tokenizers`' BPE
trainer, and `regex.findall` on whole texts.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from buildllm import bpe
from buildllm.corpora import default_corpus
from buildllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer
from buildllm.vocab_io import bytes_to_unicode


def naive_bpe(words: Counter, n_merges: int) -> list[tuple[bytes, bytes]]:
    """BPE from scratch: recount all pairs after every merge; ties -> greatest bytes."""
    words = Counter(
        {tuple(bytes([b]) for b in w.encode()): n for w, n in words.items()}
    )
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def merges_as_bytes(tokenizer: BPETokenizer) -> list[tuple[bytes, bytes]]:
    return [(tokenizer.vocab[a], tokenizer.vocab[b]) for a, b in tokenizer.merges]


def test_training_never_merges_across_special_tokens():
    text = "x<|endoftext|>y <|endoftext|>xy<|sep|>yx " * 20
    parts = regex.split(r"<\|endoftext\|>|<\|sep\|>", text)
    words = Counter(t for part in parts for t in regex.findall(GPT2_PATTERN, part))
    expected = naive_bpe(words, 4)
    tokenizer = BPETokenizer.train(
        text, 256 + 2 + len(expected), ["<|endoftext|>", "<|sep|>"], progress=False
    )
    assert merges_as_bytes(tokenizer) == expected
    assert not any(b"<" in token or b">" in token for token in tokenizer.vocab[256:])
    n = 256 + len(expected)  # special tokens take the ids after the ordinary ones
    assert tokenizer.special_tokens == {"<|endoftext|>": n, "<|sep|>": n + 1}
    ids = tokenizer.encode("xy<|sep|>", allowed_special="all")
    assert ids[-1] == n + 1 and tokenizer.decode(ids) == "xy<|sep|>"


def test_training_matches_the_hand_worked_example_merge_for_merge():
    # CS336 assignment 1 (Stanford, 2025), §2.4: whitespace pre-tokenization, ties to
    # the lexicographically greatest pair; the handout lists these six merges.
    text = "low low low low low lower lower widest widest widest newest newest newest "
    text += "newest newest newest"
    # r"\S+|\s+": the words, and the single spaces as pieces of their own (no pairs)
    tokenizer = BPETokenizer.train(text, 256 + 6, (), r"\S+|\s+", progress=False)
    expected = ["s t", "e st", "o w", "l ow", "w est", "n e"]
    assert [f"{a.decode()} {b.decode()}" for a, b in merges_as_bytes(tokenizer)] == (
        expected
    )


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="aab c\n", min_size=1, max_size=80), st.integers(1, 12))
def test_incremental_counts_match_a_full_recount_after_every_merge(text, n_merges):
    words = Counter(regex.findall(GPT2_PATTERN, text))
    expected = naive_bpe(words, n_merges)
    tokenizer = BPETokenizer.train(text, 256 + len(expected), (), progress=False)
    assert merges_as_bytes(tokenizer) == expected


def hf_merges(text: str, vocab_size: int, pattern: str) -> list[tuple[bytes, bytes]]:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    hf.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([text], trainer)
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    merges = json.loads(hf.to_str())["model"][
        "merges"
    ]  # [a, b] lists, or "a b" before 0.20
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return [(bytes(map(byte_of.get, a)), bytes(map(byte_of.get, b))) for a, b in pairs]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_training_matches_hf_tokenizers_merge_for_merge(pattern):
    # Words of 1-3 letters with distinct random counts, so no two pairs tie at the top
    # during these 100 merges and HF's tie rule (smallest ids) never comes into play.
    rng = random.Random(0)
    words = [
        "".join(p) for n in (1, 2, 3) for p in itertools.product("abcd7", repeat=n)
    ]
    counts = rng.sample(range(1, 1500), len(words))
    items = [w for w, n in zip(words, counts) for _ in range(n)]
    rng.shuffle(items)
    text = " ".join(items) + " it's 1234567!"
    vocab_size = 256 + 1 + 100
    ours = BPETokenizer.train(text, vocab_size, pattern=pattern, progress=False)
    full = GPT2_PATTERN if pattern == "gpt2" else GPT4_PATTERN
    assert merges_as_bytes(ours) == hf_merges(text, vocab_size, full)


def test_parallel_streamed_training_equals_in_process_training(tmp_path, monkeypatch):
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 2048)  # many chunks from a small corpus
    text = default_corpus()[:30_000]
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    files[0].write_text(text[:20_000], encoding="utf-8")
    files[1].write_text(text[20_000:], encoding="utf-8")
    streamed = BPETokenizer.train(files, 400, workers=2, progress=False)
    whole = BPETokenizer.train([text[:20_000], text[20_000:]], 400, progress=False)
    words = Counter(regex.findall(GPT2_PATTERN, text[:20_000]))
    words.update(regex.findall(GPT2_PATTERN, text[20_000:]))
    assert merges_as_bytes(streamed) == merges_as_bytes(whole)
    assert merges_as_bytes(whole)[:20] == naive_bpe(words, 20)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["ab", " cd", "  ", "\n", "é", "12", "'s", "!", "x y"]),
                max_size=60), st.integers(4, 24))  # fmt: skip
def test_rechunked_text_pretokenizes_exactly_like_the_whole(pieces, chunk_chars):
    text = "".join(pieces)
    chunks = list(bpe.rechunk(pieces, chunk_chars))
    assert "".join(chunks) == text
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        split = [t for chunk in chunks for t in regex.findall(pattern, chunk)]
        assert split == regex.findall(pattern, text)
