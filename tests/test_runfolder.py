"""Tests for buildllm.runfolder and the run-folder paths of checkpoint.py and train.py.

References: the files themselves. A damaged `latest` pointer still finds the newest
checkpoint; a fresh run never writes over another run's files; a second trainer is
locked out; a failed or interrupted write (disk full, Ctrl-C, SIGKILL) leaves the last
good checkpoint as it was and no partial file; and a run killed at random points, then
resumed, ends with exactly the weights and losses of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from buildllm import checkpoint
from buildllm.checkpoint import (
    LATEST,
    find_checkpoints,
    latest_checkpoint,
    read_metrics,
)
from buildllm.cli import main
from buildllm.runfolder import RunLock, atomic_file, deferred_interrupt, write_atomic
from buildllm.train import TrainConfig, Trainer, train_tiny

SMALL = TrainConfig(batch_size=2, max_steps=4, eval_interval=2, eval_steps=1,
                    checkpoint_interval=1, keep_checkpoints=2, sample_tokens=None,
                    warmup_steps=1, device="cpu")  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> None:
    """The embedded corpus's tokenizer, trained once per session (as in test_train)."""
    folder = tmp_path_factory.getbasetemp() / "buildllm-cache"
    monkeypatch.setenv("BUILDLLM_CACHE", str(folder))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def leftovers(root: Path) -> list[Path]:
    """Temporary files and folders of interrupted writes."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def fit(out_dir: Path, **changes) -> Trainer:
    trainer = Trainer(replace(SMALL, out_dir=str(out_dir), **changes), progress=False)
    trainer.fit()
    return trainer


def test_pruning_keeps_exactly_the_newest_checkpoints_and_latest_names_the_last(
    tmp_path,
):
    fit(tmp_path)
    assert [p.name for p in find_checkpoints(tmp_path)] == [
        "step-0000003", "step-0000004"]  # fmt: skip
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step-0000004"


@pytest.mark.parametrize("pointer", [None, "step-0000099", "../../etc", b"\xff\xfe"])
def test_a_missing_or_stale_latest_pointer_still_finds_the_newest_checkpoint(
    tmp_path, pointer
):
    fit(tmp_path)
    latest = tmp_path / "checkpoints" / LATEST
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    assert checkpoint.load_model(tmp_path) is not None
    before = files(tmp_path)
    with pytest.raises(ValueError, match="already holds"):  # never a fresh run on top
        Trainer(replace(SMALL, out_dir=str(tmp_path)), progress=False)
    resumed = Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=5), resume=True)
    assert resumed.step == 4
    assert files(tmp_path) == before  # nothing written before fit


def test_a_fresh_run_never_writes_over_metrics_of_a_run_without_checkpoints(
    tmp_path, capsys
):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 8.3}\n' * 121)
    before = files(tmp_path)
    flags = ["--batch-size", "1", "--max-steps", "1", "--eval-steps", "1",
             "--sample-tokens", "none", "--device", "cpu"]  # fmt: skip
    assert main(["train", *flags, "--out-dir", str(tmp_path)]) == 1
    assert "already holds metrics.jsonl" in capsys.readouterr().err
    assert files(tmp_path) == before


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path):
    def logged() -> list[tuple]:
        return [
            (r["step"], r.get("loss"), r.get("val_loss"))
            for r in read_metrics(tmp_path)
        ]

    trainer = fit(tmp_path, max_steps=2, checkpoint_interval=2)
    expected = logged()
    for folder in find_checkpoints(tmp_path):  # as if killed just before the write
        shutil.rmtree(folder)
    Trainer(trainer.config, resume=True, progress=False).fit()
    assert logged() == expected


def test_a_second_trainer_is_locked_out_of_a_folder_in_use(tmp_path):
    fit(tmp_path, max_steps=1)
    holder = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RuntimeError, match="another process is training"):
            Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=2), resume=True)
    finally:
        holder.release()
    Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=2), resume=True).fit()


def test_atomic_writes_use_unique_temporary_names_and_leave_nothing_on_failure(
    tmp_path,
):
    target = tmp_path / "metrics.jsonl"
    with atomic_file(target) as a, atomic_file(target) as b:
        assert a.name != b.name  # two writers, two temporary files
        a.write(b"first\n")
        b.write(b"second\n")
    assert target.read_bytes() == b"first\n"  # the last to finish wins, whole
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"first\n" and not leftovers(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_atomic(tmp_path, "x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        write_atomic(target / "x.json", "x")


DISK_FULL = [
    ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . "
                                "PytorchStreamWriter failed writing file data/0: file "
                                "write failed")),
    ("save_file", SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                  "kind: StorageFull, message: \"No space left on "
                                  "device\" })")),
]  # fmt: skip


@pytest.mark.parametrize("writer, error", DISK_FULL, ids=["oserror", "torch", "st"])
def test_disk_full_during_a_checkpoint_keeps_the_last_good_one_and_says_so(
    tmp_path, monkeypatch, writer, error
):
    trainer = fit(tmp_path, max_steps=1)
    good = latest_checkpoint(tmp_path)
    before = files(tmp_path / "checkpoints")

    def full(*args, **kwargs):
        raise error

    target = "buildllm.checkpoint." + writer
    monkeypatch.setattr(target, full)
    trainer.step = 2
    kept = (
        f"disk full.*the last good checkpoint {re.escape(str(good))} is kept.*--resume"
    )
    with pytest.raises(RuntimeError, match=kept):
        trainer.save()
    assert files(tmp_path / "checkpoints") == before and not leftovers(tmp_path)


def test_disk_full_in_the_command_line_is_one_line_and_exit_code_one(
    tmp_path, monkeypatch, capsys
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("buildllm.checkpoint.torch.save", full)
    flags = ["--batch-size", "2", "--max-steps", "1", "--eval-steps", "1",
             "--sample-tokens", "none", "--device", "cpu"]  # fmt: skip
    assert main(["train", *flags, "--out-dir", str(tmp_path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "disk full" in err[0] and "(none yet)" in err[0]
    assert "Traceback" not in err[0]
    assert not leftovers(tmp_path)


def test_ctrl_c_inside_a_checkpoint_write_leaves_no_partial_folder(
    tmp_path, monkeypatch
):
    trainer = fit(tmp_path, max_steps=1)
    before = files(tmp_path / "checkpoints")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("buildllm.checkpoint.torch.save", interrupted)
    trainer.step = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert files(tmp_path / "checkpoints") == before and not leftovers(tmp_path)


def test_ctrl_c_while_renaming_waits_until_latest_and_pruning_are_done(
    tmp_path, monkeypatch
):
    trainer = fit(tmp_path, max_steps=2, keep_checkpoints=1)
    real = checkpoint.write_atomic

    def interrupted_then_written(*args):
        os.kill(os.getpid(), signal.SIGINT)  # arrives during the critical section
        real(*args)

    monkeypatch.setattr("buildllm.checkpoint.write_atomic", interrupted_then_written)
    trainer.step = 3
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step-0000003"]
    assert latest_checkpoint(tmp_path).name == "step-0000003"


def test_deferred_interrupt_raises_after_the_block_not_inside_it():
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("rest of the block")
    assert done == ["rest of the block"]


def test_a_torn_last_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
    fit(tmp_path, max_steps=2, checkpoint_interval=2)
    metrics = tmp_path / "metrics.jsonl"
    good = read_metrics(metrics)
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    assert read_metrics(metrics) == good
    Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=2, checkpoint_interval=2),
            resume=True, progress=False)  # fmt: skip
    assert metrics.read_text().endswith("}\n") and read_metrics(metrics) == good


def test_train_tiny_with_other_settings_keeps_the_users_own_files(tmp_path):
    kwargs = {"batch_size": 2, "max_steps": 1, "eval_interval": 1, "eval_steps": 1,
              "sample_tokens": None}  # fmt: skip
    train_tiny(tmp_path, progress=False, **kwargs)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("also mine")
    _, _, records = train_tiny(tmp_path, progress=False, **{**kwargs, "max_steps": 2})
    assert [r["step"] for r in records] == [0, 1, 2]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "data" / "corpus.txt").read_text() == "also mine"


def test_without_a_terminal_progress_is_a_plain_line_with_integer_steps(tmp_path):
    messages: list[str] = []
    config = replace(SMALL, out_dir=str(tmp_path), max_steps=2)
    Trainer(config, progress=True, log=messages.append).fit()  # pytest: no terminal
    lines = [m for m in messages if m.startswith("step ") and "tokens/s" in m]
    assert [m.split(":")[0] for m in lines] == ["step 1/2", "step 2/2"]
    assert all(m.split("loss ")[1][:5].replace(".", "").isdigit() for m in lines)


# ---------------------------------------------------------------- the fault test
FAULT_FLAGS = ["--batch-size", "2", "--max-steps", "4", "--eval-interval", "2",
               "--eval-steps", "1", "--checkpoint-interval", "1", "--sample-tokens",
               "none", "--warmup-steps", "1", "--keep-checkpoints", "2", "--device",
               "cpu"]  # fmt: skip
# Where a kill can land: a step, each file of a checkpoint write, the rename of the
# folder, the `latest` pointer, the pruning, a metrics line. (module, name) patched.
KILL_POINTS = [
    ("buildllm.train.Trainer", "train_step"),
    ("buildllm.checkpoint", "save_file"),
    ("buildllm.checkpoint.torch", "save"),
    ("buildllm.checkpoint.os", "replace"),
    ("buildllm.checkpoint", "write_atomic"),
    ("buildllm.checkpoint.shutil", "rmtree"),
    ("buildllm.train", "append_metrics"),
]
CHILD = """
import importlib, os, signal, sys
from buildllm.cli import main
module_name, name, hit, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
parts = module_name.split(".")
try:
    owner = importlib.import_module(module_name)
except ModuleNotFoundError:  # a class or an attribute of a module
    owner = getattr(importlib.import_module(".".join(parts[:-1])), parts[-1])
real, calls = getattr(owner, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == hit:
        os.kill(os.getpid(), getattr(signal, sig))
    return real(*args, **kwargs)
setattr(owner, name, dying)
sys.exit(main(["train", *sys.argv[5:]]))
"""


@pytest.mark.slow
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL and SIGINT at 10 points drawn (seeded) from steps and checkpoint writes.

    After each kill, `--resume` finishes the run; its losses, validation losses and
    final weights equal the uninterrupted run's bit for bit, and no temporary file
    or extra checkpoint remains.
    """
    full = tmp_path / "full"
    assert main(["train", *FAULT_FLAGS, "--out-dir", str(full)]) == 0
    reference = [{k: r.get(k) for k in ("step", "loss", "val_loss")}
                 for r in read_metrics(full)]  # fmt: skip
    draw = random.Random(15)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for trial in range(10):
        (module, name), sig = draw.choice(KILL_POINTS), ("SIGKILL", "SIGINT")[trial % 2]
        hit = draw.randint(1, 4)
        run = tmp_path / f"killed-{trial}"
        child = subprocess.run(
            [sys.executable, "-c", CHILD, module, name, str(hit), sig, *FAULT_FLAGS,
             "--out-dir", str(run)],
            env=env, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        where = f"trial {trial}: {sig} at call {hit} of {module}.{name}"
        assert child.returncode in (0, -9, 130), where + child.stderr.decode()[-2000:]
        if sig == "SIGINT":
            assert not leftovers(run), where  # cleaned up at once, not on resume
        if child.returncode != 0:
            resume = main(["train", *FAULT_FLAGS, "--out-dir", str(run), "--resume"])
            assert resume == 0, where
        got = [{k: r.get(k) for k in ("step", "loss", "val_loss")}
               for r in read_metrics(run)]  # fmt: skip
        assert got == reference, where
        pairs = zip(checkpoint.load_model(run).parameters(),
                    checkpoint.load_model(full).parameters())  # fmt: skip
        assert all(torch.equal(a, b) for a, b in pairs), where
        assert not leftovers(run), where
        assert [p.name for p in find_checkpoints(run)] == [
            "step-0000003", "step-0000004"], where  # fmt: skip
