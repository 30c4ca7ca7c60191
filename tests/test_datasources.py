"""What `--data` names and how a user's text becomes token files (datasources.py).

References: the files and the line chosen here by hand; a BPE tokenizer trained here on
the training files; ids encoded here document by document; GPT-2's 50,257 ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from buildllm.datasources import data_vocab_size, split_text
from buildllm.tokenizer import BPETokenizer

LINES = "".join(f"line {i:02d}: the cat sat on the mat\n" for i in range(50))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> None:
    """A cache of each test's own: tokenizers and token files are made in the test."""
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path / "cache"))


def make_text(n_lines: int, seed: int) -> str:
    """Lines of words that differ from seed to seed, for a BPE to merge."""
    return "".join(
        f"{seed} the cat {i * seed} sat on mat {i % 7}\n" for i in range(n_lines)
    )


def test_one_file_validates_from_the_first_line_break_after_nine_tenths(tmp_path):
    path = tmp_path / "my.txt"
    path.write_text(LINES, encoding="utf-8")
    # 50 lines of equal length: 90% of the text ends where line 45 (from 0) starts;
    # that line ends with the first line break after it, so line 46 starts validation
    cut = LINES.index("line 46:")

    train, val, how = split_text([path])

    assert train == [LINES[:cut]] and val == [LINES[cut:]]
    assert "last 8% of my.txt, from line 47 on" in how  # 4 of 50 lines; 1-based


def test_a_file_without_a_line_break_to_cut_at_is_refused(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("one line without its end", encoding="utf-8")
    with pytest.raises(ValueError, match="no line break"):
        split_text([path])


def test_a_folder_of_text_files_validates_on_whole_files_and_trains_bpe_on_the_rest(
    tmp_path,
):
    from buildllm.distributed import load_data

    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    names = ["a.txt", "b.txt", "more/c.txt", "more/d.txt", "z.txt"]
    for i, name in enumerate(names):
        (folder / name).write_text(make_text(200, seed=i + 1), encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file: left out\n")

    logged: list[str] = []
    train, val, tokenizer = load_data(str(folder), 300, log=logged.append)

    files = [folder / name for name in names]  # in name order; the last fifth validates
    expected = BPETokenizer.train(files[:4], 300, progress=False)
    assert tokenizer.hash == expected.hash

    def encode(paths: list[Path]) -> list[int]:
        return [t for p in paths for t in expected.encode(p.read_text()) + [299]]

    assert train.tolist() == encode(files[:4])
    assert val.tolist() == encode(files[4:])
    assert any("the last 1 of 5 files" in line and "z.txt" in line for line in logged)


def test_the_vocabulary_of_data_is_its_tokenizers_or_none_when_one_is_trained(
    tmp_path,
):
    from buildllm.data import prepare

    tokenizer = BPETokenizer.train(LINES, 280, progress=False)
    prepare(LINES, tokenizer, tmp_path / "data", workers=1, progress=False)
    (tmp_path / "my.txt").write_text(LINES, encoding="utf-8")
    tokenizer.save(tmp_path / "tok.json")

    assert data_vocab_size(str(tmp_path / "data")) == 280  # its tokenizer.json
    assert data_vocab_size(str(tmp_path / "my.txt")) is None  # a BPE is trained
    assert data_vocab_size(str(tmp_path / "my.txt"), str(tmp_path / "tok.json")) == 280
    assert data_vocab_size("shakespeare") is None
    assert data_vocab_size("shakespeare", "gpt2") == 50257
    assert data_vocab_size(str(tmp_path / "missing")) is None  # load_data says so
