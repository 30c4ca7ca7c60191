"""Train your own model: any shape, any text, any tokenizer, through the command line.

References: a run interrupted and resumed against the uninterrupted run (bit for bit);
the model config written by hand from the flags; greedy decoding against the argmax of
full forward passes; bits per byte against `evaluate_loss` on the validation text cut
and encoded here; the text split against the files and lines chosen here; GPT-2's
tokenizer from its published files; the README's commands run as written.
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import buildllm
from buildllm.checkpoint import latest_checkpoint, load_model, read_config, read_metrics
from buildllm.cli import main
from buildllm.model import GPTConfig
from buildllm.tokenizer import BPETokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the cat sat on a mat and then it ran to see the dog who was big red or blue; "
    "a bird sang, Anna said: why? 12 apples, 7 pears"
)
RUN = shlex.split(
    "--batch-size 4 --eval-interval 2 --eval-steps 2 --checkpoint-interval 2 "
    "--sample-tokens none --warmup-steps 1 --device cpu"
)
SHAPE = shlex.split(
    "--vocab-size 300 --context-length 32 --d-model 48 --n-layers 2 --n-heads 3 "
    "--n-kv-heads 1 --d-ff 96 --norm rmsnorm --mlp swiglu --pos rope --no-bias "
    "--no-tie-embeddings"
)
EXPECTED = GPTConfig(
    vocab_size=300,
    context_length=32,
    d_model=48,
    n_layers=2,
    n_heads=3,
    n_kv_heads=1,
    d_ff=96,
    norm="rmsnorm",
    mlp="swiglu",
    pos="rope",
    bias=False,
    tie_embeddings=False,
)
SMALL = shlex.split("--d-model 32 --n-layers 1 --n-heads 2 --context-length 32")


def make_text(n_lines: int, seed: int) -> str:
    """Lines of words drawn by a seeded generator: text a BPE has pairs to merge in."""
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()
    picks = torch.randint(len(words), (n_lines, 9), generator=g).tolist()
    return "".join(" ".join(words[i] for i in row) + "\n" for row in picks)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> None:
    """A cache of this module's own: tokenizers and token files are made in the test."""
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "own"))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict[str, Path | str]:
    """A custom shape trained 4 steps on one text file through the CLI."""
    root = tmp_path_factory.mktemp("own")
    (root / "my.txt").write_text(make_text(1500, seed=0), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BUILDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "own"))
        data, out = str(root / "my.txt"), str(root / "full")
        log = run_cli(
            [
                "train",
                "--data",
                data,
                *SHAPE,
                *RUN,
                "--max-steps",
                "4",
                "--out-dir",
                out,
            ]
        )
    return {"root": root, "text": root / "my.txt", "run": root / "full", "log": log}


def run_cli(argv: list[str]) -> str:
    """Run `main(argv)` in process, expecting success; return what it wrote to stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return err.getvalue()


@pytest.mark.slow
def test_a_custom_shape_on_a_text_file_resumes_exactly_as_the_uninterrupted_run(
    text_run,
):
    assert read_config(latest_checkpoint(text_run["run"]) / "model.safetensors") == (
        EXPECTED
    )
    assert "validation split: the last 10% of my.txt" in text_run["log"]
    split = text_run["root"] / "split"
    train = ["train", "--data", str(text_run["text"]), *SHAPE, *RUN]
    run_cli([*train, "--max-steps", "2", "--out-dir", str(split)])
    run_cli([*train, "--max-steps", "4", "--resume", "--out-dir", str(split)])

    def losses(run: Path) -> list[tuple[int, float, float | None]]:
        return [
            (r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run)
        ]

    assert losses(split) == losses(text_run["run"])
    assert len(losses(split)) == 5


def test_sample_of_a_custom_shape_is_greedy_argmax_of_full_forward_passes(
    text_run, capsys
):
    run = text_run["run"]
    capsys.readouterr()
    flags = shlex.split("--temperature 0 --max-new-tokens 6 --device cpu --json")
    code = main(["sample", "--checkpoint", str(run), "--prompt", "the cat", *flags])
    completion = json.loads(capsys.readouterr().out)["completions"][0]

    model = load_model(run)
    tokenizer = BPETokenizer.load(run / "tokenizer.json")
    ids = tokenizer.encode("the cat")
    new = []
    with torch.no_grad():
        for _ in range(6):
            next_id = model(torch.tensor([ids + new]))[0, -1].argmax().item()
            if next_id == tokenizer.eot_id:
                break
            new.append(next_id)
    assert code == 0
    assert completion == tokenizer.decode(new)


def test_eval_of_a_run_gives_the_bits_per_byte_of_its_validation_text(text_run, capsys):
    from buildllm.evaluate import evaluate_loss

    capsys.readouterr()
    assert main(["eval", str(text_run["run"]), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    text = text_run["text"].read_text(encoding="utf-8")
    val_text = text[text.index("\n", int(0.9 * len(text))) + 1 :]  # a line boundary
    tokenizer = BPETokenizer.load(text_run["run"] / "tokenizer.json")
    ids = tokenizer.encode(val_text) + [tokenizer.eot_id]  # a document, then its end
    loss = evaluate_loss(load_model(text_run["run"]), ids, 32, progress=False)
    bits = loss / math.log(2) / (len(val_text.encode("utf-8")) / len(ids))
    assert result["task"] == "val"
    assert result["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(bits, rel=1e-6)


def test_eval_of_an_embedded_corpus_run_scores_its_validation_works(tmp_path, capsys):
    from buildllm import corpora
    from buildllm.evaluate import evaluate_loss

    run = tmp_path / "run"
    flags = ["--data", "stdlib", "--vocab-size", "300", *SMALL, *RUN]
    run_cli(["train", *flags, "--max-steps", "1", "--out-dir", str(run)])
    capsys.readouterr()
    argv = ["eval", str(run), "--max-batches", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)

    tokenizer = BPETokenizer.load(run / "tokenizer.json")
    encoding = tokenizer.to_tiktoken()  # the same ids as encode, much faster
    works = corpora.documents("stdlib", "val")
    ids = [t for work in works for t in encoding.encode(work) + [tokenizer.eot_id]]
    loss = evaluate_loss(load_model(run), ids, 32, 8, 2, progress=False)
    assert result["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert tokenizer.vocab_size == 300 == load_model(run).config.vocab_size


@pytest.mark.slow
def test_data_prepare_then_train_follows_the_data_tokenizer_and_exports(tmp_path):
    from buildllm.hf import export_hf, load_hf_gpt2
    from buildllm.tokenizer import gpt2_tokenizer

    (tmp_path / "my.txt").write_text(make_text(400, seed=1), encoding="utf-8")
    data, run = tmp_path / "data", tmp_path / "run"
    corpus = str(tmp_path / "my.txt")
    run_cli(["data", "prepare", "--corpus", corpus, "--out-dir", str(data)])
    gpt2 = gpt2_tokenizer()
    assert BPETokenizer.load(data / "tokenizer.json").hash == gpt2.hash
    flags = ["--data", str(data), *SMALL, *RUN, "--max-steps", "1"]
    run_cli(["train", *flags, "--out-dir", str(run)])

    model = load_model(run)
    assert model.config == GPTConfig.from_preset(
        "tiny", vocab_size=50257, d_model=32, n_layers=1, n_heads=2, context_length=32
    )
    assert BPETokenizer.load(run / "tokenizer.json").hash == gpt2.hash
    exported = load_hf_gpt2(export_hf(model, tmp_path / "hf")).eval()
    idx = torch.tensor([gpt2.encode("the cat sat on the mat")])
    torch.testing.assert_close(exported(idx), model(idx), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def other_tokenizer(text_run) -> Path:
    """A tokenizer of the same size as the run's but trained on other text."""
    path = text_run["root"] / "other.json"
    BPETokenizer.train(make_text(300, seed=9).upper(), 300, progress=False).save(path)
    return path


REFUSED = {
    "train": (
        "train --data {data} --tokenizer {other} --max-steps 1 --out-dir {root}/refused",
        "--tokenizer {other} is not the tokenizer of --data {data}",
    ),
    "eval": (
        "eval {run} --tokenizer {other} --device cpu",
        "--tokenizer {other} is not the tokenizer {run} was trained with",
    ),
    "sample": (
        "sample --checkpoint {run} --tokenizer {other} --device cpu",
        "--tokenizer {other} is not the tokenizer {run} was trained with",
    ),
}


@pytest.mark.parametrize("command", list(REFUSED))
def test_a_tokenizer_that_is_not_the_data_or_run_tokenizer_is_refused_in_one_line(
    text_run, other_tokenizer, tmp_path, capsys, command
):
    from buildllm.data import prepare

    data = tmp_path / "data"  # token files of the run's own tokenizer
    own = BPETokenizer.load(text_run["run"] / "tokenizer.json")
    prepare(text_run["text"], own, data, workers=1, progress=False)
    paths = {"data": data, "other": other_tokenizer, **text_run}
    before = {p: p.read_bytes() for p in text_run["root"].rglob("*") if p.is_file()}
    capsys.readouterr()

    argv, message = REFUSED[command]
    extra = RUN if command == "train" else []
    code = main([a.format(**paths) for a in shlex.split(argv)] + extra)

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert message.format(**paths) in lines[0]
    after = {p: p.read_bytes() for p in text_run["root"].rglob("*") if p.is_file()}
    assert after == before and not (text_run["root"] / "refused").exists()


def test_data_prepare_keeps_a_folder_holding_another_tokenizer(text_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    kept = text_run["run"] / "tokenizer.json"
    (data / "tokenizer.json").write_bytes(kept.read_bytes())
    corpus = str(text_run["text"])
    assert main(["data", "prepare", "--corpus", corpus, "--out-dir", str(data)]) == 1
    assert [p.name for p in data.iterdir()] == ["tokenizer.json"]
    assert (data / "tokenizer.json").read_bytes() == kept.read_bytes()


def readme_blocks(language: str) -> list[str]:
    """The README's `language` code blocks in its section "Reusing the package"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reusing the package", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.slow
def test_the_readme_trains_samples_and_evaluates_your_own_text_as_written(
    tmp_path, monkeypatch
):
    from buildllm import corpora

    # two plays: text enough for the README's 1,024-token BPE
    text = "\n".join(corpora.documents("shakespeare", "train")[:2])
    (tmp_path / "my_text.txt").write_text(text, encoding="utf-8")
    bin_dir = tmp_path / "bin"  # `buildllm` runs the package under test
    bin_dir.mkdir()
    (bin_dir / "buildllm").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m buildllm "$@"\n'
    )
    (bin_dir / "buildllm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BUILDLLM_CACHE", str(tmp_path / "cache"))
    package_root = Path(buildllm.__file__).parents[1]  # the package under test
    monkeypatch.setenv("PYTHONPATH", str(package_root))
    monkeypatch.chdir(tmp_path)
    (shell,) = [b for b in readme_blocks("bash") if "--data my_text.txt" in b]
    python = readme_blocks("python")
    assert any("GPTConfig(" in b for b in python)
    assert all(len(b.strip().splitlines()) <= 15 for b in python)

    out = subprocess.run(
        ["bash", "-e", "-c", shell], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"bits_per_byte: \d", out.stdout), out.stdout
    (chat,) = [b for b in readme_blocks("bash") if "buildllm chat" in b]
    out = subprocess.run(
        ["bash", "-e", "-c", chat], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sft: 10 steps" in out.stdout and out.stdout.endswith("\n"), out.stdout
    for i, block in enumerate(python):  # here: no second start of Python and torch
        (tmp_path / f"readme_{i}.py").write_text(block, encoding="utf-8")
        runpy.run_path(str(tmp_path / f"readme_{i}.py"), run_name="__main__")
    custom = load_model(tmp_path / "runs" / "custom").config
    assert (custom.pos, custom.mlp, custom.n_kv_heads) == ("rope", "swiglu", 2)
