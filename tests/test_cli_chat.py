"""Tests of `buildllm chat` (in a pseudo-terminal and for scripts) and `finetune`.

The reference for a reply is `generate` on the rendered conversation, greedy, cut at
the turn end: what the command prints must be exactly that text.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from buildllm.chat import END, add_chat_tokens, render_chat, resize_vocab
from buildllm.checkpoint import save_checkpoint
from buildllm.cli import main
from buildllm.generate import generate
from buildllm.model import GPT, GPTConfig
from buildllm.tokenizer import ENDOFTEXT, BPETokenizer

TEXT = "What is two plus two? Four. Count the words: to be or not. Hello. " * 30


def save_run(folder: Path, model: GPT, tokenizer: BPETokenizer) -> Path:
    """Write `model` and `tokenizer` as a `buildllm train` run folder."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(folder, 1, model, optimizer, model.config, {})
    tokenizer.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny "pretrained" run and the same model with chat tokens (random weights)."""
    root = tmp_path_factory.mktemp("runs")
    base_tok = BPETokenizer.train(TEXT, 290, [ENDOFTEXT], progress=False, workers=1)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=290, context_length=64, d_model=32, n_layers=2,
                       n_heads=4)  # fmt: skip
    base = GPT(config)
    chat_tok = add_chat_tokens(base_tok)
    chat = resize_vocab(base, chat_tok.vocab_size)
    return save_run(root / "base", base, base_tok), save_run(
        root / "chat", chat, chat_tok
    )


def reference_reply(run: Path, messages: list[dict], max_new_tokens: int = 12) -> str:
    from buildllm.checkpoint import load_model

    model = load_model(run)
    tokenizer = BPETokenizer.load(run / "tokenizer.json")
    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0.0)
    new = out[0, len(ids) :].tolist()
    stops = {tokenizer.special_tokens[END], tokenizer.eot_id}
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut])


def read_until(fd: int, expected: str, timeout: float = 60) -> str:
    """Read the terminal until `expected` appears; fail after `timeout` seconds."""
    seen, deadline = b"", time.monotonic() + timeout
    while expected.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no {expected!r} in the terminal; it shows {seen.decode()!r}")
        seen += os.read(fd, 4096)
    return seen.decode().replace("\r\n", "\n")


@pytest.mark.slow
def test_chat_in_a_terminal_streams_two_turns_resets_and_quits_on_ctrl_d(runs):
    _, run = runs
    master, slave = pty.openpty()
    code = "from buildllm.cli import main; raise SystemExit(main())"
    args = ["chat", "--checkpoint", str(run), "--max-new-tokens", "12"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=slave,
                            stdout=slave, stderr=slave, env=os.environ.copy())  # fmt: skip
    os.close(slave)
    try:
        read_until(master, "you> ")
        first = [{"role": "user", "content": "What is two plus two?"}]
        os.write(master, b"What is two plus two?\n")
        shown = read_until(master, "you> ")
        reply = reference_reply(run, first)
        assert f"bot> {reply}\n" in shown
        second = [*first, {"role": "assistant", "content": reply},
                  {"role": "user", "content": "Hello."}]  # fmt: skip
        os.write(master, b"Hello.\n")
        assert f"bot> {reference_reply(run, second)}\n" in read_until(master, "you> ")
        os.write(master, b"/reset\n")
        assert "(conversation reset)" in read_until(master, "you> ")
        os.write(master, b"Hello.\n")  # after /reset, answered as a first turn
        fresh = [{"role": "user", "content": "Hello."}]
        assert f"bot> {reference_reply(run, fresh)}\n" in read_until(master, "you> ")
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)


def test_chat_answers_messages_for_scripts_and_runs_commands(runs, capsys):
    _, run = runs
    argv = ["chat", "--checkpoint", str(run), "--max-new-tokens", "12", "--message",
            "Hello.", "--message", "/temperature x", "--message", "/system Be brief.",
            "--message", "Hello.", "--message", "/quit", "--message", "never sent"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    system = [{"role": "system", "content": "Be brief."}]
    user = [{"role": "user", "content": "Hello."}]
    assert (
        out == f"{reference_reply(run, user)}\n{reference_reply(run, system + user)}\n"
    )
    assert "/temperature needs a number >= 0" in err
    assert "(system message set; reset)" in err


def test_chat_drops_the_oldest_turns_to_fit_the_context_and_says_so(runs, capsys):
    _, run = runs
    long = "to be or not " * 12  # about 24 tokens a turn in a 64-token context
    argv = ["chat", "--checkpoint", str(run), "--max-new-tokens", "8"]
    assert main([*argv, "--message", long, "--message", long, "--message", long]) == 0
    assert "dropped the" in capsys.readouterr().err


def test_chat_refuses_a_model_without_chat_tokens(runs, capsys):
    base, _ = runs
    assert main(["chat", "--checkpoint", str(base), "--message", "hi"]) == 1
    assert "finetune sft" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_sft_then_dpo_through_the_command_line(runs, tmp_path, capsys):
    base, _ = runs
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    common = ["--examples-per-task", "2", "--max-steps", "2", "--batch-size", "4",
              "--json"]  # fmt: skip
    assert main(["finetune", "sft", "--checkpoint", str(base), "--out-dir", str(sft),
                 *common]) == 0  # fmt: skip
    assert main(["finetune", "dpo", "--checkpoint", str(sft), "--out-dir", str(dpo),
                 *common]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    results = [json.loads(line) for line in out]
    assert [r["stage"] for r in results] == ["sft", "dpo"]
    assert [r["steps"] for r in results] == [2, 2]
    tokenizer = BPETokenizer.load(dpo / "tokenizer.json")
    assert set(add_chat_tokens(tokenizer).special_tokens) == set(
        tokenizer.special_tokens
    )
    messages = [{"role": "user", "content": "Hello."}]
    assert main(["chat", "--checkpoint", str(dpo), "--max-new-tokens", "6",
                 "--message", "Hello."]) == 0  # fmt: skip
    assert capsys.readouterr().out == reference_reply(dpo, messages, 6) + "\n"


@pytest.mark.slow
def test_finetune_sft_starts_from_a_hugging_face_gpt2_folder(tmp_path, capsys):
    """The GPU path of Chapter 10 (GPT-2 124M from a local folder), on a random GPT-2."""
    transformers = pytest.importorskip("transformers")
    from buildllm.checkpoint import load_model, read_metrics
    from buildllm.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )
    hf.save_pretrained(tmp_path / "gpt2")
    sft = tmp_path / "sft"
    argv = ["finetune", "sft", "--checkpoint", str(tmp_path / "gpt2"), "--out-dir",
            str(sft), "--examples-per-task", "4", "--max-steps", "8", "--batch-size",
            "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    evaluated = [r["val_loss"] for r in read_metrics(sft) if "val_loss" in r]
    assert evaluated[-1] < evaluated[0]
    tokenizer = BPETokenizer.load(sft / "tokenizer.json")
    gpt2 = gpt2_tokenizer()
    chat_ids = sorted(add_chat_tokens(gpt2).special_tokens.values())
    assert sorted(tokenizer.special_tokens.values()) == chat_ids  # after GPT-2's ids
    assert tokenizer.encode_ordinary(TEXT[:80]) == gpt2.encode_ordinary(TEXT[:80])
    model = load_model(sft)
    assert model.config.vocab_size >= chat_ids[-1] + 1
    assert model.config.context_length == hf.config.n_positions
    messages = [{"role": "user", "content": "Hello."}]
    assert main(["chat", "--checkpoint", str(sft), "--max-new-tokens", "6",
                 "--message", "Hello."]) == 0  # fmt: skip
    assert capsys.readouterr().out == reference_reply(sft, messages, 6) + "\n"


def test_finetune_rejects_bad_sizes_in_one_line(runs, tmp_path, capsys):
    base, _ = runs
    argv = ["finetune", "sft", "--checkpoint", str(base), "--out-dir", str(tmp_path),
            "--batch-size", "0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--batch-size" in err and len(err.strip().splitlines()) == 1
