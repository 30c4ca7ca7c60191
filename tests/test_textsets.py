"""Tests for buildllm.textsets: the genre set split by play, file readers, download.

References: the corpus's own `Work.kind` and `Work.split`, Python's csv and json
modules writing the files, a local HTTP server on 127.0.0.1 (no network).
"""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from buildllm import corpora
from buildllm.textsets import (
    GENRES,
    genre_passages,
    genre_plays,
    load_labelled,
    passages,
    read_labelled,
)

ROWS = [("a merry jest", "comedy"), ("the king is dead", "history"),
        ('"quoted", with comma', "tragedy")]  # fmt: skip


def test_plays_are_split_by_play_with_the_language_models_unseen_plays_in_test():
    plays = genre_plays()
    kinds = {w.name: w for w in corpora.works("shakespeare")}
    names = [n for split in plays.values() for n in split]
    assert len(names) == len(set(names))  # no play in two splits
    assert {n for n, w in kinds.items() if w.kind in GENRES} == set(names)
    unseen = {n for n, w in kinds.items() if w.split == "val" and w.kind in GENRES}
    assert unseen <= set(plays["test"])
    for split, count in (("val", 1), ("test", 2)):
        for genre in GENRES:
            assert sum(kinds[n].kind == genre for n in plays[split]) == count


def test_genre_passages_are_labelled_by_their_plays_kind_and_come_from_it():
    test = genre_passages("test", per_play=5)
    by_name = {w.name: w for w in corpora.works("shakespeare")}
    assert len(test) == 5 * len(genre_plays()["test"])
    for text, label, play in zip(test.texts, test.labels, test.groups):
        assert GENRES[label] == by_name[play].kind
        play_lines = set(by_name[play].text.splitlines())
        assert all(line in play_lines for line in text.splitlines())


def test_passages_are_whole_lines_of_at_least_the_asked_length():
    text = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(200))
    cut = passages(text, 50)
    assert all(len(p) + 1 >= 50 for p in cut)  # + 1: the last line's newline
    lines = text.splitlines()
    joined = "\n".join(cut).splitlines()
    assert joined == lines[lines.index(joined[0]) : lines.index(joined[-1]) + 1]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_read_labelled_reads_files_that_csv_and_json_wrote(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                for t, y in ROWS))  # fmt: skip
    else:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["label", "text"])
            writer.writerows((y, t) for t, y in ROWS)
    data = read_labelled(path)
    assert data.texts == [t for t, _ in ROWS]
    assert [data.label_names[y] for y in data.labels] == [y for _, y in ROWS]


def test_read_labelled_names_the_missing_column_and_the_wrong_suffix(tmp_path):
    (tmp_path / "a.csv").write_text("text,genre\nhello,comedy\n")
    with pytest.raises(ValueError, match="needs 'text' and 'label'"):
        read_labelled(tmp_path / "a.csv")
    (tmp_path / "a.xlsx").write_text("")
    with pytest.raises(ValueError, match="use .csv, .tsv or .jsonl"):
        read_labelled(tmp_path / "a.xlsx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_labelled(tmp_path / "missing.csv")


def test_a_labelled_url_is_downloaded_once_checked_and_cached(
    http_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path))
    body = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    http_server.files["/genre.jsonl"] = body.encode()
    digest = hashlib.sha256(body.encode()).hexdigest()
    url = http_server.url("/genre.jsonl")
    data = load_labelled(url, sha256=digest, progress=False)
    again = load_labelled(url, sha256=digest, progress=False)
    assert data.texts == again.texts == [t for t, _ in ROWS]
    assert len(http_server.requests) == 1  # the second read came from the cache
    (tmp_path / "genre.jsonl").unlink()
    with pytest.raises(ValueError, match="sha256"):
        load_labelled(url, sha256="0" * 64, progress=False)


def test_the_training_split_holds_every_passage_of_its_plays_and_no_other():
    train = genre_passages("train")
    by_name = {w.name: w for w in corpora.works("shakespeare")}
    expected = [p for n in genre_plays()["train"] for p in passages(by_name[n].text)]
    assert train.texts == expected
