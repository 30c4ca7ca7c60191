"""A run folder that no crash, interrupt or second run can spoil.

A training run owns the files it writes into its `out_dir`: `RUN_FILES` (checkpoints/,
metrics.jsonl, tokenizer.json). This module holds what keeps them safe: `RunLock` lets
one trainer at a time write there; `write_atomic` and `temp_dir` write under a unique
temporary name and rename, so a reader never sees half a file and two writers never
share a temporary file; `deferred_interrupt` lets a few renames that belong together
finish before Ctrl-C stops the program; `check_out_dir` stops a fresh run from writing
over another run's files or a data folder; `remove_run_files` deletes a run's
own files and nothing else in the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

RUN_FILES = ("checkpoints", "metrics.jsonl", "tokenizer.json")
DATA_FILES = ("train.bin", "val.bin", "manifest.json")  # what marks a data folder
LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder, held from `acquire()` until `release()`.

    Uses `flock` on `out_dir/.lock`, which the operating system drops when the process
    dies, so a killed run never leaves a stale lock. Raises RuntimeError at once if
    another process holds it. On systems without `fcntl` (Windows) it locks nothing.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.file = None

    def acquire(self) -> RunLock:
        """Take the lock (a no-op if this object holds it); return self."""
        if self.file is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a")  # noqa: SIM115 - held open while the lock lasts
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise RuntimeError(
                f"another process is training into {self.path.parent} (it holds "
                f"{self.path}); wait for it to finish or choose another --out-dir"
            ) from None
        self.file = file
        return self

    def claim(self, resume: bool, has_checkpoint: Callable[[], bool]) -> None:
        """Lock the folder for a run, refusing what would spoil another run's files.

        `resume` needs a checkpoint there (`has_checkpoint()`); a fresh run needs a
        folder without a run's or data's files (`check_out_dir`). Checked before
        locking (a refused run creates nothing) and again under the lock (another run
        may have started meanwhile). Temporary folders a killed run left are deleted.
        """
        check_out_dir(self.path.parent, resume, has_checkpoint)
        self.acquire()
        try:
            check_out_dir(self.path.parent, resume, has_checkpoint)
        except BaseException:
            self.release()
            raise
        remove_temp_files(self.path.parent)

    def release(self) -> None:
        """Let other processes take the lock (closing the file drops the flock)."""
        if self.file is not None:
            self.file.close()
            self.file = None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a uniquely named temporary file beside `path`; rename it to `path` at the end.

    The file appears whole or not at all, and concurrent writers never share a
    temporary file. If the block raises (disk full, Ctrl-C), the temporary file is
    removed and `path` keeps what it held. Raises IsADirectoryError or
    NotADirectoryError, naming the path, if `path` is a folder or its folder is not one.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write {path}: it is a folder; give a file path"
        )
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise NotADirectoryError(
            f"cannot write {path}: its folder {path.parent} {what}; choose a path in "
            "an existing folder"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` with `atomic_file`."""
    with atomic_file(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def temp_dir(parent: Path, name: str) -> Path:
    """Create and return a new, uniquely named hidden folder `parent/.name.*.tmp`."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))


def remove_temp_files(out_dir: Path) -> None:
    """Delete what killed writers left in a run folder (call it holding the lock).

    Only the hidden temporary names `atomic_file` and `temp_dir` give the run's own
    files (`.metrics.jsonl.*.tmp`, `checkpoints/.step-*.tmp`, ...); nothing else.
    """
    names = (*RUN_FILES, "latest", "step-")
    for folder in (out_dir, out_dir / RUN_FILES[0]):
        for tmp in folder.glob(".*.tmp"):
            if not tmp.name[1:].startswith(names):
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    For a few fast steps that must happen together, such as renaming a finished
    checkpoint, pointing `latest` at it and pruning old ones. Only the main thread can
    handle signals; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def run_files(out_dir: str | Path) -> list[str]:
    """Return the names of `RUN_FILES` and `DATA_FILES` present in `out_dir`."""
    out_dir = Path(out_dir)
    return [name for name in RUN_FILES + DATA_FILES if (out_dir / name).exists()]


def check_out_dir(
    out_dir: str | Path, resume: bool, has_checkpoint: Callable[[], bool]
) -> None:
    """Raise unless a run may write into `out_dir`: resume or start fresh there.

    `resume` needs a checkpoint (`has_checkpoint()`), or the metrics of a run killed
    before its first checkpoint (it starts again from step 0). A fresh run writes
    metrics.jsonl, tokenizer.json and checkpoints/ from scratch, so any of them already
    there belongs to something else: a run (stopped before its first checkpoint, or
    with a damaged `latest`) or a data folder. Raises FileNotFoundError or ValueError.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file; choose a folder")
    found = run_files(out_dir)
    if any(name in DATA_FILES for name in found):
        raise ValueError(
            f"--out-dir {out_dir} is a data folder (it holds {', '.join(found)}); "
            "choose another --out-dir for the run and pass this one as --data"
        )
    if resume and not has_checkpoint() and "metrics.jsonl" not in found:
        raise FileNotFoundError(
            f"--out-dir {out_dir} holds no checkpoint to --resume (no "
            "checkpoints/step-N folder); drop --resume to start a run there"
        )
    if found and not resume:
        raise ValueError(
            f"--out-dir {out_dir} already holds {', '.join(found)} of another run; "
            "pass --resume to continue it, or choose another --out-dir"
        )


def remove_run_files(out_dir: str | Path, extra: Sequence[str] = ()) -> None:
    """Delete the files a run writes (`RUN_FILES` and `extra`), nothing else there."""
    for name in (*RUN_FILES, *extra):
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def is_disk_full(err: BaseException) -> bool:
    """True if `err` says the disk is full, however the writing library worded it.

    Python: OSError with errno ENOSPC; safetensors: "No space left on device" inside a
    SafetensorError; torch.save: "file write failed" from its zip writer.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "StorageFull", "file write failed"))
