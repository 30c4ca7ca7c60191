"""Tests for buildllm.train, .checkpoint and .distributed: the loop, resume, processes.

References: a run killed with SIGKILL and resumed must log exactly the losses of an
uninterrupted run; a 2-process (gloo) run those of a 1-process run with the same global
batch; batches equal hand-sliced windows; the first loss of a random model is ln V.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from buildllm.checkpoint import (
    STATE,
    WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_metrics,
)
from buildllm.cli import main
from buildllm.distributed import BatchSource, DistInfo
from buildllm.model import GPTConfig
from buildllm.train import TrainConfig, Trainer, train_tiny

BIN = Path(sys.executable).parent
# A few steps of the tiny preset on the embedded corpus, fast on a loaded 2-core CPU.
# float32 throughout: these tests compare runs that must agree to float32 rounding (two
# paths, two processes), which bf16 autocast ("auto" on CPUs with native bf16) would not.
FLAGS = ["--batch-size", "2", "--max-steps", "6", "--eval-interval", "3",
         "--eval-steps", "2", "--checkpoint-interval", "2", "--sample-tokens", "4",
         "--warmup-steps", "2", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
SMALL = TrainConfig(batch_size=2, max_steps=4, eval_interval=2, eval_steps=2,
                    checkpoint_interval=2, sample_tokens=None, warmup_steps=2,
                    device="cpu", dtype="float32")  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> Path:
    """Keep the embedded corpus's tokenizer in one temporary cache per test session."""
    folder = tmp_path_factory.getbasetemp() / "buildllm-cache"
    monkeypatch.setenv("BUILDLLM_CACHE", str(folder))
    return folder


def losses(out_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out_dir) if key in r]


def test_train_config_rejects_bad_values_with_the_rule():
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(max_lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero")


def test_batch_source_windows_are_hand_sliced_and_shared_out_over_processes():
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 1000  # every window distinct
    whole = BatchSource(tokens, 3, 8, grad_accum_steps=4, info=DistInfo(), seed=5)
    x, y = whole.next()
    assert x.shape == y.shape == (4, 3, 8)
    starts = torch.randint(1000 - 8, (12,), generator=torch.Generator().manual_seed(5))
    for row, s in zip(x.reshape(12, 8), starts.tolist()):
        assert row.tolist() == tokens[s : s + 8].tolist()
    assert torch.equal(y[..., :-1], x[..., 1:])  # targets: inputs shifted by one
    parts = [
        BatchSource(tokens, 3, 8, 4, DistInfo(rank=r, world_size=2), seed=5).next()
        for r in range(2)
    ]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_batch_source_rejects_accumulation_that_processes_cannot_share():
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        BatchSource(np.arange(100), 2, 4, 3, DistInfo(rank=0, world_size=2), seed=0)


def test_random_model_starts_near_ln_vocab_size_and_the_loss_falls(tmp_path):
    config = replace(SMALL, out_dir=str(tmp_path), max_steps=8, eval_interval=8)
    records = Trainer(config, progress=False).fit()
    first_val = records[0]["val_loss"]
    # init std 0.02 gives logits near 0, so nearly uniform: ln V (eq-random-loss)
    assert abs(first_val - math.log(4096)) < 0.1
    assert records[-1]["val_loss"] < first_val - 0.5
    assert [r["step"] for r in records] == list(range(9))


def test_manual_and_fast_loss_clipping_and_adamw_train_alike(tmp_path):
    runs = {}
    for impl in ("manual", "fast"):
        config = replace(SMALL, out_dir=str(tmp_path / impl), impl=impl, grad_clip=0.5)
        runs[impl] = [r["loss"] for r in Trainer(config, progress=False).fit()[1:]]
    torch.testing.assert_close(runs["manual"], runs["fast"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_run_killed_with_sigkill_and_resumed_logs_exactly_the_uninterrupted_losses(
    tmp_path,
):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", *FLAGS, "--out-dir", str(full)]) == 0
    # Checkpoints follow steps 2, 4 and 6. The child dies entering step 6 (index 5), so
    # it has logged step 5 after its last checkpoint: resuming must redo step 5.
    kill_at = 5
    script = (
        "import os, signal, sys\n"
        "from buildllm import train\n"
        "from buildllm.cli import main\n"
        "step = train.Trainer.train_step\n"
        "def dying(self, i):\n"
        f"    if i == {kill_at}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, i)\n"
        "train.Trainer.train_step = dying\n"
        f"sys.exit(main({['train', *FLAGS, '--out-dir', str(killed)]!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, check=False
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert latest_checkpoint(killed).name == "step-0000004"

    assert main(["train", *FLAGS, "--out-dir", str(killed), "--resume"]) == 0

    assert losses(killed) == losses(full)  # bit for bit
    assert losses(killed, "val_loss") == losses(full, "val_loss")
    assert [r["step"] for r in read_metrics(killed)] == list(range(7))
    for a, b in zip(load_model(killed).parameters(), load_model(full).parameters()):
        assert torch.equal(a, b)


def test_resume_restores_the_random_state_so_dropout_masks_match_the_full_run(
    tmp_path, monkeypatch
):
    # dropout on (the config's model, resolved when SMALL was built, carries it) and
    # samples at evaluations: both draw random numbers after the restore
    config = replace(SMALL, model=replace(SMALL.model, dropout=0.1), max_steps=4,
                     sample_tokens=4)  # fmt: skip
    trainer = Trainer(replace(config, out_dir=str(tmp_path / "full")), progress=False)
    assert any(isinstance(m, torch.nn.Dropout) for m in trainer.model.modules())
    full = trainer.fit()
    killed = replace(config, out_dir=str(tmp_path / "killed"))
    step = Trainer.train_step

    def dying(self, i):
        if i == 2:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(killed, progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", step)
    resumed = Trainer(killed, resume=True, progress=False).fit()

    def strip(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert strip(resumed) == strip(full[3:])


def test_a_fresh_run_refuses_an_out_dir_that_holds_a_run(tmp_path, capsys):
    assert main(["train", *FLAGS, "--max-steps", "2", "--out-dir", str(tmp_path)]) == 0
    assert main(["train", *FLAGS, "--max-steps", "2", "--out-dir", str(tmp_path)]) == 1
    assert "pass --resume" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_another_model(tmp_path):
    Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=2), progress=False).fit()
    with pytest.raises(ValueError, match="--batch-size 2 \\(now 3\\)"):
        Trainer(replace(SMALL, out_dir=str(tmp_path), batch_size=3), resume=True)
    with pytest.raises(ValueError, match="another model config"):
        load_checkpoint(
            latest_checkpoint(tmp_path), GPTConfig.from_preset("modern-tiny")
        )


def typed(value: object) -> object:
    """`value` with the type of every nested value spelled out: 1 and 1.0 differ."""
    if isinstance(value, dict):
        return {key: typed(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value), [typed(v) for v in value]
    return type(value), value


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_restore_gives_back_the_saved_param_groups_exactly_types_included(
    tmp_path, impl
):
    from buildllm.checkpoint import restore_checkpoint, save_checkpoint
    from buildllm.model import GPT
    from buildllm.optim import make_optimizer

    config = GPTConfig.from_preset("tiny", n_layers=1, vocab_size=64, d_model=32)
    model = GPT(config)
    optimizer = make_optimizer(model, lr=3e-3, betas=(0.9, 0.95), impl=impl)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx).square().mean().backward()
    optimizer.step()
    optimizer.param_groups[0]["lr"] = 1.25e-3  # as the schedule leaves it
    saved = [
        typed({k: v for k, v in group.items() if k != "params"})
        for group in optimizer.param_groups
    ]
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    folder = save_checkpoint(tmp_path, 1, model, optimizer, config, {})

    fresh = GPT(config)
    fresh_optimizer = make_optimizer(fresh, lr=1.0, betas=(0.5, 0.5), impl=impl)
    restore_checkpoint(folder, fresh, fresh_optimizer, config)

    restored = [
        typed({k: v for k, v in group.items() if k != "params"})
        for group in fresh_optimizer.param_groups
    ]
    assert restored == saved
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    for p, moment in zip(fresh.parameters(), saved_moments, strict=True):
        torch.testing.assert_close(fresh_optimizer.state[p]["exp_avg"], moment)


def test_corrupt_checkpoint_files_fail_with_a_clear_error(tmp_path):
    Trainer(replace(SMALL, out_dir=str(tmp_path), max_steps=2), progress=False).fit()
    folder = latest_checkpoint(tmp_path)
    state = (folder / STATE).read_bytes()
    (folder / STATE).write_bytes(state[: len(state) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(folder)
    (folder / STATE).write_bytes(state)
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-8:] = b"\xff" * 8  # a flipped weight: the sha256 no longer matches
    (folder / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(folder)
    (folder / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(folder)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(
    tmp_path, monkeypatch
):
    trainer = Trainer(
        replace(SMALL, out_dir=str(tmp_path), max_steps=4), progress=False
    )
    trainer.train_step(0)
    trainer.step = 1
    before = trainer.save()
    trainer.train_step(1)
    trainer.step = 2

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("buildllm.checkpoint.torch.save", crash)
    with pytest.raises(OSError):
        trainer.save()
    assert latest_checkpoint(tmp_path) == before
    _, state = load_checkpoint(before)
    assert state["step"] == 1


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(
        replace(SMALL, out_dir=str(tmp_path), max_steps=4), progress=False
    )
    trainer.train_step(0)
    trainer.step = 1
    good = trainer.save()
    with torch.no_grad():
        trainer.model.blocks[0].mlp.w_up.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=f"diverged at step 2.*{good}"):
        trainer.train_step(1)
    assert latest_checkpoint(tmp_path) == good
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path).parameters())


def test_train_tiny_reuses_a_finished_run(tmp_path):
    kwargs = {"batch_size": 2, "max_steps": 2, "eval_interval": 2, "eval_steps": 1}
    model, tokenizer, records = train_tiny(tmp_path, **kwargs)
    stamp = (latest_checkpoint(tmp_path) / WEIGHTS).stat().st_mtime_ns
    again, tokenizer2, records2 = train_tiny(tmp_path, **kwargs)
    assert (latest_checkpoint(tmp_path) / WEIGHTS).stat().st_mtime_ns == stamp
    assert records2 == records and tokenizer2.hash == tokenizer.hash
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert tokenizer.vocab_size == model.config.vocab_size == 4096


def test_cli_train_prints_a_summary_and_plot_draws_the_curves(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", *FLAGS, "--max-steps", "2", "--out-dir", str(out), "--json"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["val_loss"] == losses(out, "val_loss")[-1]
    assert main(["plot", str(out)]) == 0
    assert (out / "loss.svg").read_text().lstrip().startswith("<?xml")
    assert main(["train", "--batch-size", "0"]) == 2
    assert "--batch-size: '0' is not an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--no-such-flag"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_under_torchrun_log_the_losses_of_one_process(tmp_path, strategy):
    # 4 micro-batches: each process runs 2, so gradients accumulate without a sync first
    flags = [*FLAGS, "--grad-accum-steps", "4", "--strategy", strategy]
    assert main(["train", *flags, "--out-dir", str(tmp_path / "one")]) == 0
    two = tmp_path / "two"
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        str(BIN / "buildllm"),
        "train",
        *flags,
        "--out-dir",
        str(two),
    ]
    run = subprocess.run(command, capture_output=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    # the same batches; only the order of float additions differs (gradient all-reduce)
    one = tmp_path / "one"
    for key in ("loss", "val_loss"):
        torch.testing.assert_close(
            losses(two, key), losses(one, key), rtol=1e-5, atol=1e-5
        )
    # The norm before clipping, which clipping cannot hide: FSDP's reduce-scatter sums in
    # another order (2e-5 measured); a wrong accumulation or sync is off by 10% or more.
    torch.testing.assert_close(
        losses(two, "grad_norm"), losses(one, "grad_norm"), rtol=1e-4, atol=0
    )


def test_load_data_reads_token_files_shards_and_the_folder_tokenizer(tmp_path):
    from buildllm.data import write_tokens
    from buildllm.distributed import load_data
    from buildllm.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.train(
        "def f(x):\n    return x + 1\n" * 50, 270, progress=False
    )
    tokenizer.save(tmp_path / "tokenizer.json")
    ids = np.arange(600, dtype=np.uint16) % 270
    write_tokens(tmp_path / "train.bin", ids[:500], 270)
    write_tokens(tmp_path / "val.bin", ids[500:], 270)
    train, val, found = load_data(str(tmp_path), vocab_size=4096)
    assert train.tolist() == ids[:500].tolist() and val.tolist() == ids[500:].tolist()
    assert found.hash == tokenizer.hash
    with pytest.raises(ValueError, match="only vocab_size=256"):
        load_data(str(tmp_path), vocab_size=256)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "missing"), vocab_size=4096)
    write_tokens(tmp_path / "val.bin", ids[500:], 270, tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_data(str(tmp_path), vocab_size=4096)

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    for name in ("web_val_000000", "web_train_000001", "web_train_000002"):
        write_tokens(shards / f"{name}.bin", ids, 270)
    paths, val, _ = load_data(str(shards), vocab_size=4096)
    assert [p.name for p in paths] == ["web_train_000001.bin", "web_train_000002.bin"]
    assert val.tolist() == ids.tolist()


def test_batch_source_over_shards_gives_each_process_consecutive_windows(tmp_path):
    from buildllm.data import write_tokens

    ids = np.arange(2000, dtype=np.uint16)
    write_tokens(tmp_path / "web_train_000000.bin", ids, 4096)
    paths = [tmp_path / "web_train_000000.bin"]
    x, y = BatchSource(paths, 2, 8, grad_accum_steps=2, info=DistInfo(), seed=0).next()
    assert x.reshape(-1).tolist() == ids[:32].tolist()  # 2 micro-batches x 2 x 8
    assert torch.equal(y[..., :-1], x[..., 1:]) and y[-1, -1, -1] == 32
    parts = [
        BatchSource(paths, 2, 8, 2, DistInfo(rank=r, world_size=2), seed=0).next()[0]
        for r in range(2)
    ]
    assert sorted(torch.cat(parts).reshape(-1).tolist()) == ids[:32].tolist()


def test_embedded_data_is_the_training_and_validation_works_with_end_of_text():
    from buildllm import corpora
    from buildllm.distributed import load_data

    train, val, tokenizer = load_data("shakespeare", vocab_size=512)
    assert tokenizer.vocab_size == 512
    val_docs = corpora.documents("shakespeare", "val")
    # tiktoken's GPT-2 pattern with our merges is an independent encoder of the works
    enc = tokenizer.to_tiktoken()
    expected = [
        i for d in val_docs for i in enc.encode_ordinary(d) + [tokenizer.eot_id]
    ]
    assert val.tolist() == expected
    assert int((np.asarray(train) == tokenizer.eot_id).sum()) == len(
        corpora.documents("shakespeare", "train")
    )
    assert load_data("embedded", vocab_size=512)[2].hash == tokenizer.hash


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # Arm
        ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),  # AVX2 only
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512bw\n", False),  # no BF16
    ],
)
def test_auto_dtype_uses_bf16_autocast_exactly_on_cpus_with_native_bf16(
    tmp_path, monkeypatch, cpuinfo, expected
):
    from buildllm import distributed

    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    real_path = distributed.Path
    monkeypatch.setattr(
        distributed, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p)
    )
    assert distributed.cpu_has_bf16() is expected
    with distributed.autocast_for("cpu", "auto")():
        y = torch.randn(4, 4) @ torch.randn(4, 4)
    assert y.dtype == (torch.bfloat16 if expected else torch.float32)
    with distributed.autocast_for("cpu", "float32")():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_a_short_shakespeare_run_lowers_the_loss_and_reports_bits_per_byte(tmp_path):
    from buildllm.evaluate import bits_per_byte, bytes_per_token

    config = replace(
        SMALL,
        out_dir=str(tmp_path),
        batch_size=8,
        max_steps=30,
        eval_interval=30,
        max_lr=3e-3,
    )
    trainer = Trainer(config, progress=False)
    records = trainer.fit()
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 1.0
    # bytes per token counted from the decoded text, independently of the tokenizer
    val = np.asarray(trainer.objective.val_tokens)
    text = trainer.tokenizer.decode(val[val != trainer.tokenizer.eot_id].tolist())
    per_token = len(text.encode("utf-8")) / len(val)
    assert bytes_per_token(val, trainer.tokenizer) == pytest.approx(per_token)
    expected = records[-1]["val_loss"] / math.log(2) / per_token
    assert records[-1]["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
