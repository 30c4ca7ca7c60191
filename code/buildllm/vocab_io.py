"""BPE vocabularies in other tools' forms: the interchange form and GPT-2's files.

Taught in Chapter 2 (Data and Tokenization) with `tokenizer.py`, whose constructors
`BPETokenizer.from_vocab_and_merges` and `from_gpt2_files` read these forms. The
interchange form of minbpe, Hugging Face and course assignments is {id: bytes} plus the
merges as pairs of bytes in the order they apply; GPT-2's `encoder.json` and `vocab.bpe`
spell bytes as printable characters (`bytes_to_unicode`). Each reader returns the
tokenizer's own form: the ordinary tokens by id, the merges as id pairs, the specials.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

Vocabulary = tuple[list[bytes], list[tuple[int, int]], dict[str, int]]


def vocab_from_interchange(
    vocab: Mapping[int, bytes],
    merges: Iterable[tuple[bytes, bytes]],
    special_tokens: Mapping[str, int],
) -> Vocabulary:
    """Check the interchange form and return (ordinary tokens, id merges, specials).

    Ordinary ids must be 0..N-1; a vocab entry that spells a special token at that
    token's id is the special token (Hugging Face lists them in its vocab). The ids may
    be in any order relative to the merges. Raises ValueError for a gap in the ids, two
    ids with the same bytes, an id shared with a special token, or a merge whose pieces
    or result are not in the vocabulary; TypeError for a token that is not bytes.
    """
    special_tokens = dict(special_tokens)
    tokens = dict(vocab)
    for text, i in special_tokens.items():  # Hugging Face lists specials in vocab
        if i in tokens and tokens.pop(i) != text.encode("utf-8"):
            raise ValueError(
                f"id {i} is both the special token {text!r} and an ordinary token; "
                "give the special token an id of its own"
            )
    if not all(isinstance(t, bytes) for t in tokens.values()):
        kind = next(type(t) for t in tokens.values() if not isinstance(t, bytes))
        raise TypeError(
            f"vocabulary tokens must be bytes, got {kind.__name__}; "
            "encode text tokens with .encode('utf-8')"
        )
    if sorted(tokens) != list(range(len(tokens))):
        gap = min(set(range(len(tokens))) - set(tokens))
        raise ValueError(
            f"ordinary token ids must be 0..{len(tokens) - 1} without gaps, but id "
            f"{gap} is missing; renumber them, special tokens after the ordinary"
        )
    ids: dict[bytes, int] = {}
    for i in range(len(tokens)):
        if ids.setdefault(tokens[i], i) != i:
            raise ValueError(
                f"ids {ids[tokens[i]]} and {i} both hold {tokens[i]!r}; every token "
                "must have one id"
            )
    id_merges = []
    for k, (a, b) in enumerate(merges):
        for piece in (a, b, a + b):
            if piece not in ids:
                raise ValueError(
                    f"merge {k} ({a!r}, {b!r}) needs {piece!r}, which is not in "
                    "the vocabulary; add it, or drop the merge"
                )
        id_merges.append((ids[a], ids[b]))
    ordinary = [tokens[i] for i in range(len(tokens))]
    return ordinary, id_merges, special_tokens


def read_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Vocabulary:
    """Read GPT-2's published `encoder.json` and `vocab.bpe` in the tokenizer's form.

    Ids beyond the 256 bytes and the merges are special tokens (GPT-2 has
    `<|endoftext|>`, 50256), and token 256 + k must be what merge k forms. Raises
    ValueError for files that disagree with each other.
    """
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    try:
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        if not lines[0].startswith("#version"):
            raise ValueError("vocab.bpe does not start with a #version line")
        merge_texts = [line.split(" ") for line in lines[1:] if line]
        n_ordinary = 256 + len(merge_texts)
        vocab = [b""] * n_ordinary
        specials = {}
        for text, i in encoder.items():
            if i >= n_ordinary:
                specials[text] = i
            else:
                vocab[i] = bytes(byte_of[char] for char in text)
        ids = {token: i for i, token in enumerate(vocab)}
        merges = [
            (ids[bytes(byte_of[c] for c in a)], ids[bytes(byte_of[c] for c in b)])
            for a, b in merge_texts
        ]
        for k, (a, b) in enumerate(merges):
            if vocab[a] + vocab[b] != vocab[256 + k]:
                raise ValueError(f"merge {k} does not form token {256 + k}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{encoder_json} and {vocab_bpe} are not a matching GPT-2 vocabulary "
            f"({type(err).__name__}: {err}); use OpenAI's published files"
        ) from None
    return vocab, merges, specials


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as GPT-2's files spell tokens.

    Printable Latin-1 bytes map to themselves; the other 68 (space, control bytes)
    map to chr(256), chr(257), ... in byte order.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {
        b: chr(256 + k) for k, b in enumerate(others)
    }
