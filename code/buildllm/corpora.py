"""The corpora shipped in the package: Shakespeare's works and Python's standard library.

Taught in Chapter 2 (Data and Tokenization). Both need no download and are the same
bytes on every machine. "shakespeare" (the default) is the 42 plays and poems of
Project Gutenberg's modern-spelling edition, cleaned by `corpus/make_shakespeare.py`,
each with its title and its kind as the First Folio groups the plays (comedy, history,
tragedy). "stdlib" is 45 modules of CPython 3.11.7, code to show how BPE handles it.
Each corpus is split into training and validation by whole works (plays, modules), so
no validation line has a neighbour in the training text. Provenance, licences and
hashes: `corpus/README.md`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "val"]
EMBEDDED = ("shakespeare", "stdlib")
# The stdlib corpus's last modules, a tenth of its text, are its validation split.
STDLIB_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Work:
    """One document of an embedded corpus: a play, a poem or a module.

    `kind` is the First Folio's group for a play ("comedy", "history", "tragedy"),
    "romance" for Pericles (not in the Folio), "poem", or "module" for Python code.
    """

    name: str
    title: str
    kind: str
    split: Split
    text: str


def _read(filename: str) -> bytes:
    path = importlib.resources.files("buildllm").joinpath("corpus", filename)
    return gzip.decompress(path.read_bytes())


@functools.cache
def works(corpus: str = "shakespeare") -> tuple[Work, ...]:
    """Return the documents of embedded corpus `corpus`, in a fixed order.

    Raises ValueError for a name not in `EMBEDDED`.
    """
    if corpus == "shakespeare":
        records = json.loads(_read("shakespeare.json.gz"))
        fields = ("name", "title", "kind", "split", "text")
        return tuple(Work(**{k: r[k] for k in fields}) for r in records)
    if corpus == "stdlib":
        text = _read("stdlib.txt.gz").decode("utf-8")
        first, *rest = text.split("\n# file:")  # "\n".join(modules) == text
        modules = [first] + ["# file:" + part for part in rest]
        n_val, chars = 0, 0
        while chars < STDLIB_VAL_FRACTION * len(text):  # whole modules from the end
            n_val += 1
            chars += len(modules[-n_val])
        return tuple(
            Work(
                m.split()[2],
                m.split()[2],
                "module",
                "val" if i >= len(modules) - n_val else "train",
                m,
            )
            for i, m in enumerate(modules)
        )
    raise ValueError(f"unknown embedded corpus {corpus!r}; use one of {EMBEDDED}")


def documents(corpus: str = "shakespeare", split: Split | None = None) -> list[str]:
    """Return the texts of `corpus`'s works in `split` ("train", "val", None: all)."""
    return [w.text for w in works(corpus) if split is None or w.split == split]


def default_corpus(corpus: str = "shakespeare") -> str:
    """Return a whole embedded corpus as one text, its works separated by blank lines.

    "shakespeare": 5.05 million characters of English plays and poems; "stdlib":
    1.36 million characters of Python.
    """
    return "\n".join(documents(corpus))
