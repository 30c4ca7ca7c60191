"""The embedded corpora: present, unchanged (hashes from corpus/README.md), split by work."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest

from buildllm import corpora

CORPUS_DIR = Path(corpora.__file__).parent / "corpus"
README = (CORPUS_DIR / "README.md").read_text()


def recorded_hash(after: str) -> str:
    """The sha256 the README records after the phrase `after`."""
    return re.search(re.escape(after) + r"\s*([0-9a-f]{64})", README).group(1)


def test_shakespeare_file_has_the_hash_its_readme_records():
    raw = gzip.decompress((CORPUS_DIR / "shakespeare.json.gz").read_bytes())
    expected = recorded_hash("sha256 of the uncompressed JSON:")
    assert hashlib.sha256(raw).hexdigest() == expected


def test_stdlib_corpus_joins_back_to_the_shipped_text():
    expected = recorded_hash("sha256 of the uncompressed text:")
    text = corpora.default_corpus("stdlib")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == expected
    assert [w.name for w in corpora.works("stdlib")] == (
        (CORPUS_DIR / "SOURCES.txt").read_text().split()
    )


def test_shakespeare_holds_every_play_of_the_first_folio_with_its_group():
    works = {w.name: w for w in corpora.works()}
    kinds = [w.kind for w in works.values()]
    # The First Folio: 14 comedies, 10 histories, 12 tragedies (with Troilus and
    # Cymbeline as it groups them); Pericles is not in it; five poems.
    assert (kinds.count("comedy"), kinds.count("history")) == (14, 10)
    assert (kinds.count("tragedy"), kinds.count("romance")) == (12, 1)
    assert kinds.count("poem") == 5
    assert works["hamlet"].title == "Hamlet" and works["hamlet"].kind == "tragedy"
    assert works["tempest"].kind == "comedy" and works["henry_v"].kind == "history"
    assert "To be, or not to be" in works["hamlet"].text
    assert sum(len(w.text) for w in works.values()) > 5_000_000
    assert all(w.text.isascii() and "\r" not in w.text for w in works.values())
    assert all("\n\n\n" not in w.text and " \n" not in w.text for w in works.values())


@pytest.mark.parametrize("name", corpora.EMBEDDED)
def test_splits_are_whole_works_disjoint_and_about_a_tenth(name):
    works = corpora.works(name)
    train = corpora.documents(name, "train")
    val = corpora.documents(name, "val")
    assert len(train) + len(val) == len(works) and train and val
    assert not set(train) & set(val)
    share = sum(map(len, val)) / sum(len(w.text) for w in works)
    assert 0.08 <= share <= 0.12
    # No validation line of ten words or more also appears in the training text.
    seen = {line for doc in train for line in doc.splitlines()}
    long_val = {
        line for doc in val for line in doc.splitlines() if len(line.split()) >= 10
    }
    assert len(long_val & seen) <= 0.01 * len(long_val)


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="shakespeare"):
        corpora.works("poems")
