"""Tests for buildllm.cli: the commands no other test module runs, and the error path.

References: torch's own view of the machine (`info`), the data module's table of
corpora (`data list`), and the contract of one-line errors with exit codes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import platform

import torch

from buildllm import cli
from buildllm.cli import describe_error, main
from buildllm.data import CORPORA, Corpus


def test_info_reports_the_versions_and_the_device_torch_sees(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert info["device"] == ("cuda" if torch.cuda.is_available() else info["device"])
    assert len(info["cuda_devices"]) == torch.cuda.device_count()


def test_data_list_shows_every_corpus_of_the_table(capsys):
    assert main(["data", "list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(CORPORA)
    assert main(["data", "list"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown and c.url in shown for name, c in CORPORA.items())


def test_os_errors_are_described_in_words_with_the_path():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/x.bin")
    assert (
        describe_error(full)
        == "disk full writing /data/x.bin; free some space and run it again"
    )
    under = NotADirectoryError(errno.ENOTDIR, "Not a directory", "a.txt/b")
    assert "a.txt/b" in describe_error(under) and "not a folder" in describe_error(
        under
    )
    ours = FileNotFoundError("token file x.bin does not exist")
    assert describe_error(ours) == "token file x.bin does not exist"


def test_a_handler_that_raises_an_os_error_exits_with_one_and_one_line(
    capsys, monkeypatch
):
    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")

    monkeypatch.setattr(cli, "run_info", denied)
    parser_main = main(["info"])
    err = capsys.readouterr().err.strip().splitlines()
    assert parser_main == 1 and len(err) == 1
    assert (
        err[0]
        == "buildllm: error: no permission to use /root/x; choose a path you may write to"
    )


def test_data_download_caches_a_corpus_and_keeps_a_part_file_that_is_already_whole(
    http_server, tmp_path, capsys, monkeypatch
):
    body = b"to be, or not to be\n" * 100
    http_server.files["/c.txt"] = body
    digest = hashlib.sha256(body).hexdigest()
    corpus = Corpus("test", http_server.url("/c.txt"), digest, "c.txt", "a test corpus")
    monkeypatch.setitem(CORPORA, "test", corpus)
    argv = ["data", "download", "test", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "c.txt").read_bytes() == body
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.txt")
    (tmp_path / "c.txt").rename(tmp_path / "c.txt.part")  # killed after the last byte
    assert main(argv) == 0  # the server answers 416: nothing left, the part is whole
    assert http_server.requests[-1] == ("/c.txt", f"bytes={len(body)}-")
    assert (tmp_path / "c.txt").read_bytes() == body
