"""Where a run's tokens come from: what `--data` names, and a user's own text.

`--data` names an embedded corpus (its BPE tokenizer trained to the model's vocab_size),
a folder of token files or shards (tokenized by its tokenizer.json, else GPT-2's), a
prepared dataset, or text: a UTF-8 file or a folder of .txt files. `data_vocab_size`
says which vocabulary the data comes in, so the model's follows it; `load_data` (in
`distributed.py`) reads the tokens. Text is split into training and validation once: a
folder of several files by whole files (the last ones in name order, about
`VAL_FRACTION` of the bytes), so no validation line has a neighbour in the training
text, as the embedded corpora do; a single file at the first line break after 90% of
its characters. Unless a tokenizer is given, a BPE tokenizer of the model's vocab_size
is trained on the training split. Both splits are tokenized into
`data.get_cache_dir()/text-KEY/` (train.bin, val.bin, tokenizer.json), KEY hashing the
files' sha256 and the tokenizer's hash: a second run reads the cache, an edited file is
tokenized again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from buildllm import corpora, data, shards
from buildllm.data import TOKENIZER
from buildllm.model import GPTConfig
from buildllm.tokenizer import BPETokenizer

VAL_FRACTION = 0.1  # of the bytes, as the embedded stdlib corpus and `data prepare`
TEXT_SUFFIX = ".txt"  # what a folder's text files end with
Log = Callable[[str], None]
# Other names for --data: the default embedded corpus, and a dataset of shards.DATASETS.
DATA_ALIASES = {"embedded": "shakespeare", "fineweb-edu": "fineweb-edu-10B"}


def load_tokenizer(name: str) -> BPETokenizer:
    """Return GPT-2's tokenizer for "gpt2", else the tokenizer saved at path `name`."""
    from buildllm.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer() if name == "gpt2" else BPETokenizer.load(name)


def data_folder(name: str) -> Path:
    """Return the folder (or text file) `--data name` means; FileNotFoundError if none."""
    name = DATA_ALIASES.get(name, name)
    folder = data.get_cache_dir() / name if name in shards.DATASETS else Path(name)
    if not (folder.is_dir() or (folder.is_file() and text_files(folder))):
        how = f"prepare it: buildllm data prepare --dataset {name} --out-dir {folder}"
        if name not in shards.DATASETS:
            how = f"pass --data {' or '.join(corpora.EMBEDDED)}, a text file, or a "
            how += "folder of .txt files or with train.bin and val.bin"
        what = "is a token file, not a folder" if folder.is_file() else "does not exist"
        raise FileNotFoundError(f"data {folder} {what}; {how}")
    return folder


def data_vocab_size(name: str, tokenizer: str | None = None) -> int | None:
    """Return the vocabulary `--data name` (with `tokenizer`) comes tokenized in.

    None where a tokenizer is trained to the model's vocab_size: an embedded corpus or
    text without `tokenizer`, and data that does not exist (`load_data` says so).
    """
    if tokenizer is not None:
        return load_tokenizer(tokenizer).vocab_size
    name = DATA_ALIASES.get(name, name)
    if name in corpora.EMBEDDED:
        return None
    try:
        folder = data_folder(name)
    except FileNotFoundError:
        return None
    return None if text_files(folder) else tokenizer_of(folder).vocab_size


def resolve_model(
    preset: str, data: str, tokenizer: str | None = None, **overrides: Any
) -> GPTConfig:
    """Return preset `preset`'s GPTConfig with `overrides`, its vocabulary the data's.

    Unless `overrides` sets vocab_size, it is the vocabulary `data` comes tokenized in
    (`data_vocab_size`: a token folder's tokenizer, or `tokenizer`), so the
    model has one embedding row per token id; an embedded corpus or text without
    `tokenizer` keeps the preset's, and a tokenizer of that size is trained for it.
    Raises ValueError as GPTConfig does, e.g. for d_model not divisible by n_heads.
    """
    if "vocab_size" not in overrides:
        vocab_size = data_vocab_size(data, tokenizer)
        overrides = (
            overrides if vocab_size is None else {**overrides, "vocab_size": vocab_size}
        )
    return GPTConfig.from_preset(preset, **overrides)


def check_vocab(tokenizer: BPETokenizer, vocab_size: int, name: str) -> None:
    """Raise ValueError if the model's `vocab_size` cannot hold `tokenizer`'s ids."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer of --data {name} has {tokenizer.vocab_size} tokens but "
            f"the model only vocab_size={vocab_size}; leave vocab_size unset (it "
            f"follows the data's tokenizer) or set it to {tokenizer.vocab_size} or more"
        )


def embedded_tokenizer(vocab_size: int, corpus: str = "shakespeare") -> BPETokenizer:
    """Return the BPE tokenizer trained on an embedded corpus's training works, cached.

    The cache file's name holds a hash of the training text, so a changed corpus
    trains a new tokenizer.
    """
    train = corpora.documents(corpus, "train")
    digest = hashlib.sha256("\0".join(train).encode("utf-8")).hexdigest()[:12]
    path = data.get_cache_dir() / f"{corpus}-bpe-{vocab_size}-{digest}.json"
    if path.is_file():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train(train, vocab_size, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)  # atomic: a concurrent reader never sees half a file
    return tokenizer


def tokenizer_of(folder: Path) -> BPETokenizer:
    """Return a data folder's tokenizer: its tokenizer.json, else GPT-2's."""
    if (folder / TOKENIZER).is_file():
        return BPETokenizer.load(folder / TOKENIZER)
    from buildllm.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def text_files(path: str | Path) -> list[Path] | None:
    """Return the text files `path` names, or None if it names token files or nothing.

    A file counts as text unless it is a token file; a folder, if it holds no token
    files (no .bin) and at least one .txt file, anywhere below it (in name order).
    """
    path = Path(path)
    if path.is_file():
        with path.open("rb") as file:
            return None if file.read(len(data.MAGIC)) == data.MAGIC else [path]
    if not path.is_dir() or any(path.glob("*.bin")):
        return None
    return sorted(p for p in path.rglob(f"*{TEXT_SUFFIX}") if p.is_file()) or None


def split_text(files: list[Path]) -> tuple[list[str | Path], list[str | Path], str]:
    """Split text files into (training, validation) documents and say how, in words.

    Several files: the last files (at least one, never all) holding about
    `VAL_FRACTION` of the bytes validate. One file: its text after the first line
    break past 90% of its characters (before it, if the last tenth has none).
    Raises ValueError for a file that is not UTF-8 or too short to split.
    """
    if len(files) > 1:
        sizes = [f.stat().st_size for f in files]
        n_val, val_bytes = 1, sizes[-1]
        while n_val < len(files) - 1 and val_bytes < VAL_FRACTION * sum(sizes):
            n_val += 1
            val_bytes += sizes[-n_val]
        names = ", ".join(f.name for f in files[-n_val:][:3])
        more = ", ..." if n_val > 3 else ""
        how = (
            f"validation split: the last {n_val} of {len(files)} files by name "
            f"({names}{more}), whole files"
        )
        return list(files[:-n_val]), list(files[-n_val:]), how
    (file,) = files
    try:
        with file.open(encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); convert it "
            "with `iconv -t UTF-8`"
        ) from None
    start = int(len(text) * (1 - VAL_FRACTION))
    cut = text.find("\n", start) + 1
    if not 0 < cut < len(text):  # no line break in the last tenth: the one before
        cut = text.rfind("\n", 0, start) + 1
    if cut <= 0:
        raise ValueError(
            f"{file} has no line break to split validation text from training text; "
            "pass a longer file, or a folder of several files"
        )
    line = text.count("\n", 0, cut) + 1
    how = (
        f"validation split: the last {1 - cut / len(text):.0%} of {file.name}, "
        f"from line {line} on"
    )
    return [text[:cut]], [text[cut:]], how


def prepare_text(
    path: str | Path,
    vocab_size: int,
    tokenizer: BPETokenizer | None = None,
    log: Log | None = None,
) -> Path:
    """Return the cache folder holding `path`'s text as train.bin, val.bin, tokenizer.json.

    `tokenizer` None trains a BPE tokenizer of `vocab_size` ids on the training split
    (cached too). `log` receives what happened in words, once it succeeded: whether a
    tokenizer was trained, how the text was split, where the tokens are. Files appear whole (atomic writes), tokenizer.json
    last, so a folder with it is complete. Raises as `split_text` and
    `BPETokenizer.train` (e.g. a text too small for `vocab_size`).
    """
    say = log or (lambda message: None)
    root, files = Path(path), text_files(path)
    if files is None:
        raise FileNotFoundError(f"{path} is neither a text file nor a folder of .txt")
    digest = hashlib.sha256(f"split {VAL_FRACTION}".encode())
    for file in files:
        digest.update(f"\0{file.relative_to(root) if len(files) > 1 else ''}".encode())
        digest.update(data.sha256_file(file).encode())
    key = digest.hexdigest()
    train, val, how = split_text(files)
    if tokenizer is None:
        saved = data.get_cache_dir() / f"text-bpe-{vocab_size}-{key[:16]}.json"
        if saved.is_file():
            tokenizer = BPETokenizer.load(saved)
        else:  # a refusal (text too small) is then the only line the user sees
            tokenizer = BPETokenizer.train(train, vocab_size)
            saved.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(saved)
            say(f"trained a {vocab_size}-token BPE tokenizer on the training split")
    say(how)
    name = hashlib.sha256(f"{key} {tokenizer.hash}".encode()).hexdigest()[:16]
    folder = data.get_cache_dir() / f"text-{name}"
    if not (folder / TOKENIZER).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash}
        for split, documents in (("train", train), ("val", val)):
            ids = data.encode_corpus(documents, tokenizer)
            data.write_tokens(folder / f"{split}.bin", ids, **meta)
        tokenizer.save(folder / TOKENIZER)
    say(f"tokens of {path}: {folder}")
    return folder
