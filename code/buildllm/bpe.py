"""BPE training: count pre-tokens once, in parallel, then merge pairs incrementally.

Taught in Chapter 2 (Data and Tokenization) with `tokenizer.py`, which wraps these steps
in `BPETokenizer.train`. Text streams in chunks cut where pre-tokenization cannot
change, so files are never read whole. Each merge updates pair counts only in the words
that hold the pair; ties go to the pair whose bytes compare greatest. Reference:
Sennrich et al. 2016 (arXiv:1508.07909); HF tokenizers' BPE trainer does the same.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
from collections import Counter, defaultdict, deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import regex
from tqdm import tqdm

from buildllm.checks import check_file

# A letter or digit, then a space and a letter: the GPT-2 and GPT-4 patterns end a
# pre-token there and start the next fresh, so text cut at this point pre-tokenizes
# exactly as it did whole.
SAFE_CUT = regex.compile(r"(?<=[\p{L}\p{N}])(?= \p{L})")
LAST_SAFE_CUT = regex.compile(r"(?r)" + SAFE_CUT.pattern)  # searches backwards
CHUNK_CHARS = 1 << 20  # 1 Mi characters: big enough to amortize a worker call


# Letters, digits, punctuation, runs of spaces, tabs and newlines, accents, CJK, emoji,
# control characters: a pre-tokenization pattern must keep all of it.
PROBE = "Hello, World! It's 2024:  déjà vu?\n\tx_1 = 3.14;\r\n  日本語 🙂\x00\x7f   "


def rechunk(pieces: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Regroup a stream of text pieces into chunks of about `chunk_chars` characters.

    Chunks are cut only at `SAFE_CUT` (the last one before `chunk_chars`, else the
    first after), so pre-tokenizing chunk by chunk gives the pre-tokens of the whole
    text. A stretch with no safe cut (no "letter, space, letter") stays in one chunk.
    Holds for the GPT-2 and GPT-4 patterns and for special tokens that contain no space
    before a letter.
    """
    buffer = ""
    for piece in pieces:
        buffer += piece
        while len(buffer) >= chunk_chars:
            start = max(1, chunk_chars // 2)  # a cut at 0 would yield nothing, forever
            match = LAST_SAFE_CUT.search(buffer, start, chunk_chars)
            match = match or SAFE_CUT.search(buffer, chunk_chars)
            if match is None:
                break
            yield buffer[: match.start()]
            buffer = buffer[match.start() :]
    if buffer:
        yield buffer


def iter_chunks(
    source: str | Path | Iterable[str | Path], chunk_chars: int = CHUNK_CHARS
) -> Iterator[str]:
    """Yield the text of `source` in chunks that pre-tokenize independently.

    `source` is a text (`str`, always the text itself, never read as a file name), a
    UTF-8 file (`pathlib.Path` or another `os.PathLike`), or an iterable of them; each
    is a separate document, files read in blocks and never whole. Raises TypeError for
    anything else (bytes, numbers), FileNotFoundError for a missing file and
    ValueError for one that is not valid UTF-8.
    """
    items = [source] if isinstance(source, (str, bytes, os.PathLike)) else source
    for item in items:
        if isinstance(item, str):
            yield from rechunk([item], chunk_chars)
            continue
        if not isinstance(item, os.PathLike):
            raise TypeError(
                f"a corpus is text (str) or files (pathlib.Path), got "
                f"{type(item).__name__}; decode bytes to str, or wrap a file name in "
                "pathlib.Path"
            )
        path = check_file(item, "corpus file")
        with path.open(encoding="utf-8", newline="") as file:
            blocks = iter(functools.partial(file.read, chunk_chars), "")
            try:
                yield from rechunk(blocks, chunk_chars)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not UTF-8 text ({err.reason} at byte {err.start} of a "
                    "block); convert it with `iconv -t UTF-8` or drop the file"
                ) from None


def compile_pattern(pattern: str) -> regex.Pattern:
    r"""Compile a pre-tokenization regex that splits every text without losing any.

    Encoding keeps only what the pattern matches, so a pattern that skips a character
    (r"\w+" skips spaces) would silently drop text: `decode(encode(s)) != s`. The
    pattern must split `PROBE`, which holds every kind of character, into pieces that
    join back to it, and must not capture groups (findall would return the groups).
    Raises ValueError naming the fix otherwise.
    """
    try:
        compiled = regex.compile(pattern)
    except regex.error as err:
        raise ValueError(
            f"pattern {pattern!r} is not a valid regex ({err}); fix it, or use the "
            "pattern gpt2 or gpt4"
        ) from None
    if compiled.groups:
        raise ValueError(
            f"pattern {pattern!r} has capture groups; write them as (?:...), so that "
            "each match is a whole piece"
        )
    if "".join(m.group() for m in compiled.finditer(PROBE)) != PROBE:
        raise ValueError(
            f"pattern {pattern!r} does not match every character (e.g. of {PROBE!r}), "
            "so encoding would drop text; add a catch-all alternative such as "
            r"|\s+|[^\s]+ at its end, or use the pattern gpt2 or gpt4"
        )
    return compiled


def count_pretokens(chunk: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Count the pre-tokens of `chunk`; special tokens are cut out, never counted."""
    counts: Counter = Counter()
    parts = special_split(chunk, special_tokens) if special_tokens else [chunk]
    for part in parts:
        counts.update(regex.findall(pattern, part))
    return counts


def special_split(
    text: str, special_tokens: Collection[str], keep: bool = False
) -> list[str]:
    """Split `text` around the special tokens, dropping them or (`keep`) keeping them.

    With `keep`, the list alternates text, special token, text, ..., text.
    """
    alternatives = sorted(special_tokens, key=len, reverse=True)  # longest match first
    group = "|".join(regex.escape(s) for s in alternatives)
    return regex.split(f"({group})" if keep else group, text)


def count_words(
    source: str | Path | Iterable[str | Path],
    pattern: str,
    special_tokens: Sequence[str],
    workers: int | None = None,
    progress: bool = True,
) -> Counter:
    """Count every pre-token of the corpus once, in parallel over chunks.

    Training then works on distinct pre-tokens ("words") weighted by their counts, which
    is what makes it fast: English has far fewer distinct words than running words.
    """
    workers = workers or os.cpu_count() or 1
    chunks = iter_chunks(source, CHUNK_CHARS)  # read at call time: tests shrink it
    head = list(itertools.islice(chunks, 2))
    counts: Counter = Counter()
    bar = tqdm(unit="char", unit_scale=True, disable=None if progress else True)
    # One chunk: starting a process pool would cost more than it saves.
    if len(head) < 2 or workers == 1:
        for chunk in itertools.chain(head, chunks):
            counts.update(count_pretokens(chunk, pattern, special_tokens))
            bar.update(len(chunk))
        bar.close()
        return counts
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()  # <= 2 chunks per worker in flight: bounded memory
        for chunk in itertools.chain(head, chunks):
            job = pool.submit(count_pretokens, chunk, pattern, special_tokens)
            pending.append((len(chunk), job))
            while len(pending) > 2 * workers:
                size, job = pending.popleft()
                counts.update(job.result())
                bar.update(size)
        for size, job in pending:
            counts.update(job.result())
            bar.update(size)
    bar.close()
    return counts


def descending_key(token: bytes) -> str:
    """Return a string that sorts in the opposite order to `token`'s bytes.

    Each byte x becomes chr(255 - x) and a terminator chr(256) sorts a prefix after its
    extensions, so a min-heap pops the lexicographically greatest pair first on ties.
    """
    return "".join(map(chr, [255 - x for x in token])) + chr(256)


def merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b) in `word`, left to right, by `new`."""
    merged, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            merged.append(new)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def count_pairs(
    words: list[list[int]], freqs: list[int]
) -> tuple[defaultdict, defaultdict]:
    """Count every adjacent pair, weighted by word frequency; note the words holding it.

    Returns `counts` {pair: count} and `where` {pair: set of word indices}.
    """
    counts: defaultdict = defaultdict(int)
    where: defaultdict = defaultdict(set)
    for i, word in enumerate(words):
        for pair in itertools.pairwise(word):
            counts[pair] += freqs[i]
            where[pair].add(i)
    return counts, where


def bpe_merges(
    word_counts: dict[bytes, int], vocab: list[bytes], n_tokens: int, progress: bool
) -> list[tuple[int, int]]:
    """Merge the most frequent adjacent pair until `vocab` holds `n_tokens` tokens.

    Appends each new token to `vocab`; returns the merged id pairs in order. A heap
    gives the top pair (ties: greatest bytes); an entry whose count went stale is
    pushed back with the current count when it surfaces (lazy deletion).
    """
    words = [list(word) for word in word_counts]  # ids 0..255 are the bytes
    freqs = list(word_counts.values())
    counts, where = count_pairs(words, freqs)
    keys = [descending_key(token) for token in vocab]
    heap = [(-c, keys[a], keys[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    ids = {token: i for i, token in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_tokens - len(vocab), unit="merge", disable=not progress or None)
    while len(vocab) < n_tokens and heap:
        neg_count, _, _, a, b = heapq.heappop(heap)
        count = counts[(a, b)]
        if count != -neg_count:  # stale: counts only fall, so re-queue the true count
            if count > 0:
                heapq.heappush(heap, (-count, keys[a], keys[b], a, b))
            continue
        new = ids.setdefault(vocab[a] + vocab[b], len(vocab))  # reuse a duplicate
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
            keys.append(descending_key(vocab[new]))
            bar.update()
        merges.append((a, b))
        for pair in apply_merge((a, b), new, words, freqs, counts, where):
            heapq.heappush(heap, (-counts[pair], keys[pair[0]], keys[pair[1]], *pair))
    bar.close()
    return merges


def apply_merge(
    pair: tuple[int, int],
    new: int,
    words: list[list[int]],
    freqs: list[int],
    counts: defaultdict,
    where: defaultdict,
) -> set[tuple[int, int]]:
    """Merge `pair` into `new` in every word that holds it; return the pairs formed.

    Each touched word's pairs are counted out and its merged pairs counted back in, so
    overlaps such as (a, a) in "aaa" come out exactly as a full recount would.
    """
    formed = set()
    for i in where.pop(pair):
        word = words[i]
        merged = merge_word(word, *pair, new)
        if len(merged) == len(word):  # `where` may be stale: pair gone from this word
            continue
        for old in itertools.pairwise(word):
            counts[old] -= freqs[i]
        for now in itertools.pairwise(merged):
            counts[now] += freqs[i]
            if new in now:
                where[now].add(i)
                formed.add(now)
        words[i] = merged
    del counts[pair]
    return formed
