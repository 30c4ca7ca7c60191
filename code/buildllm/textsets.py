"""Labelled text sets: Shakespeare passages by genre, and files a user brings.

Taught in Chapter 9 (Classification). `genre_passages` cuts the embedded plays into
passages labelled with the First Folio's genre of their play (comedy, history,
tragedy), split into train, validation and test *by play*, so that the names and
phrases of a test play were never seen with a label. `read_labelled` reads CSV, TSV or
JSONL files with `text` and `label` columns; `load_labelled` also takes an http(s) URL,
downloaded once into the cache and checked against a SHA-256 (`data.download_url`).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from buildllm import corpora
from buildllm.data import download_url

GENRES = ("comedy", "history", "tragedy")
SetSplit = Literal["train", "val", "test"]
SPLIT_SEED = 8  # chooses the validation and extra test plays of each genre
PASSAGE_CHARS = 320  # about 90 tokens of the tiny tokenizer: fits its context of 128
PER_PLAY = {"train": None, "val": 40, "test": 60}  # passages from each play; None: all


@dataclass(frozen=True)
class TextSet:
    """Texts with integer labels; `label_names[label]` is a label's name.

    `groups` names where each text comes from (its play), for per-group analysis.
    """

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def genre_plays(seed: int = SPLIT_SEED) -> dict[SetSplit, list[str]]:
    """Return the plays of each split: per genre 1 validation and 2 test plays.

    The test plays of a genre are the one the language model never saw (its
    validation split: Twelfth Night, Richard II, Julius Caesar) and one chosen by a
    generator seeded with `seed`, which also chooses the validation play; the rest
    train. Pericles (a romance, outside the Folio) and the poems take no part.
    """
    rng = random.Random(seed)
    plays: dict[SetSplit, list[str]] = {"train": [], "val": [], "test": []}
    for genre in GENRES:
        works = [w for w in corpora.works("shakespeare") if w.kind == genre]
        unseen = [w.name for w in works if w.split == "val"]
        seen = sorted(w.name for w in works if w.split == "train")
        val, test = rng.sample(seen, 2)
        plays["val"].append(val)
        plays["test"] += unseen + [test]
        plays["train"] += [n for n in seen if n not in (val, test)]
    return plays


def passages(text: str, passage_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut a play into passages of whole lines, each at least `passage_chars` long.

    Lines are joined until the passage reaches passage_chars; the play's first
    passage (title, cast) and a short remainder at the end are dropped.
    """
    out, lines, size = [], [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        lines.append(line)
        size += len(line) + 1
        if size >= passage_chars:
            out.append("\n".join(lines))
            lines, size = [], 0
    return out[1:]


def genre_passages(
    split: SetSplit,
    per_play: int | None = None,
    passage_chars: int = PASSAGE_CHARS,
    seed: int = SPLIT_SEED,
) -> TextSet:
    """Return `split`'s passages labelled by genre: `per_play` spread over each play.

    `per_play` defaults to the split's `PER_PLAY`: every passage of a training play
    (more text to learn from), a fixed number of each validation and test play (so
    every test play counts the same). They are taken at evenly spaced places through
    each play (all of them if it has fewer). Raises ValueError for an unknown split.
    """
    if split not in PER_PLAY:
        raise ValueError(f"split={split!r} must be one of {tuple(PER_PLAY)}")
    per_play = PER_PLAY[split] if per_play is None else per_play
    by_name = {w.name: w for w in corpora.works("shakespeare")}
    texts, labels, groups = [], [], []
    for name in genre_plays(seed)[split]:
        cut = passages(by_name[name].text, passage_chars)
        take = len(cut) if per_play is None else min(per_play, len(cut))
        step = len(cut) / take
        chosen = [cut[int(i * step)] for i in range(take)]
        texts += chosen
        labels += [GENRES.index(by_name[name].kind)] * len(chosen)
        groups += [name] * len(chosen)
    return TextSet(texts, labels, GENRES, groups)


def read_labelled(
    path: str | Path, label_names: tuple[str, ...] | None = None
) -> TextSet:
    """Read a CSV, TSV or JSONL file (by suffix) with `text` and `label` columns.

    Labels may be names or integers; names are numbered in sorted order unless
    `label_names` gives the order. Raises FileNotFoundError for a missing file and
    ValueError for another suffix, a missing column or an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [
            json.loads(line)
            for line in path.read_text("utf-8").splitlines()
            if line.strip()
        ]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(
            f"{path} has suffix {suffix!r}; use .csv, .tsv or .jsonl with columns "
            "text and label"
        )
    for i, row in enumerate(rows):
        if "text" not in row or "label" not in row:
            raise ValueError(
                f"{path} row {i + 1} has columns {sorted(row)}; it needs 'text' "
                "and 'label'"
            )
    raw = [str(row["label"]) for row in rows]
    names = label_names or tuple(sorted(set(raw), key=_label_key))
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(
            f"{path} has labels {unknown} outside label_names={names}; add them"
        )
    texts = [str(row["text"]) for row in rows]
    return TextSet(texts, [names.index(r) for r in raw], names, [path.name] * len(rows))


def _label_key(label: str) -> tuple[int, int | str]:
    """Sort integer labels numerically ("2" before "10"), then names alphabetically."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def load_labelled(
    source: str,
    sha256: str | None = None,
    label_names: tuple[str, ...] | None = None,
    progress: bool = True,
) -> TextSet:
    """Read labelled data from a local file or an http(s) URL (downloaded, cached).

    A URL is fetched once into `data.get_cache_dir()` and checked against `sha256`
    (or, without one, against the hash recorded at the first download). Raises as
    `read_labelled` and `data.download_url`.
    """
    if source.startswith(("http://", "https://")):
        path = download_url(source, sha256=sha256, progress=progress)
        return read_labelled(path, label_names)
    return read_labelled(source, label_names)
