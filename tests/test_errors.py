"""Bad input, through the command line (`main([...])` in process) and the Python API.

Reference: the contract every user error must meet. For each case: the exit code (2 for
bad usage, 1 for a failure at run time), exactly one line on stderr that names the
problem and says what to do, no traceback, and every file of the run folder, the data
folder and the tokenizer byte-identical before and after.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from buildllm.cli import main
from buildllm.train import TrainConfig, Trainer

SMALL = TrainConfig(batch_size=2, max_steps=2, eval_interval=2, eval_steps=1,
                    checkpoint_interval=1, sample_tokens=None, warmup_steps=1,
                    device="cpu")  # fmt: skip
TEXT = "".join(
    f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}\n" for i in range(300)
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files a user has: a finished run, a data folder, a tokenizer, a text file."""
    from buildllm.data import prepare
    from buildllm.tokenizer import BPETokenizer

    root = tmp_path_factory.mktemp("world")
    cache = tmp_path_factory.getbasetemp() / "buildllm-cache"  # shared with test_train
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BUILDLLM_CACHE", str(cache))
        Trainer(replace(SMALL, out_dir=str(root / "run")), progress=False).fit()
    tokenizer = BPETokenizer.train(TEXT, 300, progress=False)
    tokenizer.save(root / "tok.json")
    prepare(TEXT, tokenizer, root / "data", workers=1, progress=False)
    tokenizer.save(root / "data" / "tokenizer.json")
    (root / "notes.txt").write_text("a user's own notes\n")
    (root / "shape.json").write_text('{"d_modle": 64}')
    (root / "poem.txt").write_text("roses are red,\nviolets are blue\n" * 20)
    (root / "empty").mkdir()
    return {
        "root": root,
        "run": root / "run",
        "data": root / "data",
        "tok": root / "tok.json",
        "file": root / "notes.txt",
        "shape": root / "shape.json",
        "poem": root / "poem.txt",
        "empty": root / "empty",
        "missing": root / "missing",
    }


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> None:
    """The same cache as `world`'s: the embedded corpus's tokenizer is trained once."""
    folder = tmp_path_factory.getbasetemp() / "buildllm-cache"
    monkeypatch.setenv("BUILDLLM_CACHE", str(folder))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path: bytes), the lock file aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def run_bad(argv: list[str], capsys, root: Path) -> tuple[int, str]:
    """Run `main(argv)`; check one stderr line, no traceback, files untouched."""
    before = snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert snapshot(root) == before
    return code, lines[0]


RUN = ["--batch-size", "2", "--max-steps", "2", "--eval-interval", "2",
       "--eval-steps", "1", "--checkpoint-interval", "1", "--sample-tokens", "none",
       "--warmup-steps", "1", "--device", "cpu"]  # fmt: skip
T = ["train", *RUN, "--out-dir", "{root}/r"]  # a later --out-dir wins
S = ["sample", "--checkpoint", "{run}", "--max-new-tokens", "2", "--device", "cpu"]
E = ["eval", "--checkpoint", "{run}", "--device", "cpu"]
TOK = ["tokenize", "train", "--input", "{file}", "--vocab-size", "260", "--workers",
       "1", "--output", "{root}/new.json"]  # fmt: skip
PREP = ["data", "prepare", "--corpus", "{file}", "--out-dir", "{root}/prepared",
        "--workers", "1"]  # fmt: skip
CUDA = torch.cuda.is_available()

# (name, argv, exit code, words the message must hold: the problem and the fix)
CASES = [
    # ---- train: flags checked as they are read (exit 2), with the range
    (
        "grad clip negative",
        [*T, "--grad-clip", "-1"],
        2,
        ["--grad-clip", "> 0", "none"],
    ),
    ("grad clip zero", [*T, "--grad-clip", "0"], 2, ["--grad-clip", "> 0"]),
    ("grad clip nan", [*T, "--grad-clip", "nan"], 2, ["--grad-clip", "> 0"]),
    ("weight decay nan", [*T, "--weight-decay", "nan"], 2, ["--weight-decay", ">= 0"]),
    ("peak flops negative", [*T, "--peak-flops", "-1"], 2, ["--peak-flops", "> 0"]),
    ("batch size zero", [*T, "--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    ("max steps negative", [*T, "--max-steps", "-5"], 2, ["--max-steps", ">= 1"]),
    ("max lr zero", [*T, "--max-lr", "0"], 2, ["--max-lr", "> 0"]),
    ("beta2 one", [*T, "--beta2", "1"], 2, ["--beta2", "[0, 1)"]),
    ("eps infinite", [*T, "--eps", "inf"], 2, ["--eps", "> 0"]),
    ("warmup negative", [*T, "--warmup-steps", "-1"], 2, ["--warmup-steps", ">= 0"]),
    ("keep zero", [*T, "--keep-checkpoints", "0"], 2, ["--keep-checkpoints", ">= 1"]),
    (
        "sample tokens zero",
        [*T, "--sample-tokens", "0"],
        2,
        ["--sample-tokens", "none"],
    ),
    ("seed negative", [*T, "--seed", "-1"], 2, ["--seed", "[0, 18446744073709551615]"]),
    ("batch size text", [*T, "--batch-size", "two"], 2, ["--batch-size", "integer"]),
    (
        "batch size fraction",
        [*T, "--batch-size", "2.5"],
        2,
        ["--batch-size", "integer"],
    ),
    (
        "min lr above max",
        [*T, "--min-lr", "1", "--max-lr", "0.1"],
        2,
        ["--min-lr 1.0", "--max-lr 0.1"],
    ),
    ("unknown preset", [*T, "--preset", "huge"], 2, ["--preset", "tiny"]),
    ("unknown device", [*T, "--device", "tpu"], 2, ["--device", "cpu"]),
    ("unknown flag", [*T, "--no-such-flag"], 2, ["--no-such-flag", "--help"]),
    # ---- train: the run folder is someone else's, or there is nothing to resume
    (
        "fresh run over a run",
        [*T, "--out-dir", "{run}"],
        1,
        ["already holds", "--resume"],
    ),
    (
        "out dir is a data folder",
        [*T, "--out-dir", "{data}"],
        1,
        ["data folder", "another --out-dir"],
    ),
    (
        "resume a data folder",
        [*T, "--resume", "--out-dir", "{data}"],
        1,
        ["data folder"],
    ),
    (
        "resume nothing",
        [*T, "--resume", "--out-dir", "{empty}"],
        1,
        ["no checkpoint", "drop --resume"],
    ),
    (
        "resume other settings",
        [*T, "--batch-size", "3", "--resume", "--out-dir", "{run}"],
        1,
        ["--batch-size 2 (now 3)", "same settings"],
    ),
    (
        "resume past max steps",
        [*T, "--max-steps", "1", "--resume", "--out-dir", "{run}"],
        1,
        ["step 2", "--max-steps 2 or more"],
    ),
    ("out dir is a file", [*T, "--out-dir", "{file}"], 1, ["is a file", "folder"]),
    (
        "out dir under a file",
        [*T, "--out-dir", "{file}/run"],
        1,
        ["is a file", "folder"],
    ),
    (
        "missing data",
        [*T, "--data", "{missing}", "--out-dir", "{root}/r"],
        1,
        ["does not exist", "--data shakespeare"],
    ),
    # ---- train: the model's shape, checked as GPTConfig checks it (exit 2)
    (
        "d model not divisible by heads",
        [*T, "--d-model", "50", "--n-heads", "3"],
        2,
        ["--d-model 50", "--n-heads 3", "use --n-heads 2"],
    ),
    (
        "kv heads not dividing heads",
        [*T, "--n-heads", "4", "--n-kv-heads", "3"],
        2,
        ["--n-kv-heads 3", "--n-heads 4"],
    ),
    (
        "rope with odd head dim",
        [*T, "--d-model", "12", "--n-heads", "4", "--pos", "rope"],
        2,
        ["head_dim=3", "even"],
    ),
    ("dropout one", [*T, "--dropout", "1"], 2, ["--dropout", "[0, 1)"]),
    ("unknown norm", [*T, "--norm", "batchnorm"], 2, ["--norm", "rmsnorm"]),
    ("d ff zero", [*T, "--d-ff", "0"], 2, ["--d-ff", ">= 1", "none"]),
    (
        "model config not json",
        [*T, "--model-config", "{file}"],
        1,
        ["--model-config", "not JSON"],
    ),
    (
        "model config unknown field",
        [*T, "--model-config", "{shape}"],
        1,
        ["d_modle", "GPTConfig lacks", "d_model"],
    ),
    (
        "vocab smaller than the data's",
        [*T, "--data", "{data}", "--vocab-size", "100"],
        1,
        ["--vocab-size 100", "300 tokens", "leave vocab_size unset"],
    ),
    (
        "text too small for the vocabulary",
        [*T, "--data", "{poem}", "--vocab-size", "4096"],
        1,
        ["--vocab-size 4096 cannot be reached", "larger corpus"],
    ),
    (
        "text without a line to split at",
        [*T, "--data", "{file}"],
        1,
        ["no line break", "a folder of several files"],
    ),
    # ---- sample
    ("temperature negative", [*S, "--temperature", "-1"], 2, ["--temperature", ">= 0"]),
    ("top k zero", [*S, "--top-k", "0"], 2, ["--top-k", ">= 1", "none"]),
    ("top p zero", [*S, "--top-p", "0"], 2, ["--top-p", "(0, 1]"]),
    ("top p above one", [*S, "--top-p", "1.5"], 2, ["--top-p", "(0, 1]"]),
    ("min p nan", [*S, "--min-p", "nan"], 2, ["--min-p", "(0, 1]"]),
    (
        "repetition penalty nan",
        [*S, "--repetition-penalty", "nan"],
        2,
        ["--repetition-penalty", "> 0"],
    ),
    (
        "repetition penalty zero",
        [*S, "--repetition-penalty", "0"],
        2,
        ["--repetition-penalty", "> 0"],
    ),
    (
        "max new tokens negative",
        [*S, "--max-new-tokens", "-1"],
        2,
        ["--max-new-tokens", ">= 0"],
    ),
    ("empty stop text", [*S, "--stop", ""], 2, ["--stop", "non-empty"]),
    ("no model", ["sample", "--prompt", "x"], 2, ["--checkpoint", "required"]),
    (
        "missing checkpoint",
        ["sample", "--checkpoint", "{missing}"],
        1,
        ["{missing}", "does not exist"],
    ),
    (
        "checkpoint folder empty",
        ["sample", "--checkpoint", "{empty}"],
        1,
        ["no checkpoint", "pass a run folder"],
    ),
    (
        "checkpoint is a text file",
        ["sample", "--checkpoint", "{file}"],
        1,
        ["not a readable safetensors"],
    ),
    ("tokenizer is a folder", [*S, "--tokenizer", "{empty}"], 1, ["is a folder"]),
    (
        "tokenizer larger than the model",
        [*S, "--tokenizer", "gpt2"],
        1,
        ["50257", "4096", "--tokenizer FILE"],
    ),
    # ---- eval
    ("limit negative", [*E, "--limit", "-1"], 2, ["--limit", ">= 1"]),
    ("limit zero", [*E, "--limit", "0"], 2, ["--limit", ">= 1"]),
    ("eval batch size zero", [*E, "--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    ("max batches zero", [*E, "--max-batches", "0"], 2, ["--max-batches", ">= 1"]),
    ("unknown task", [*E, "--task", "mmlu"], 2, ["--task", "hellaswag"]),
    ("val without data", [*E, "--task", "val"], 1, ["--task val needs --data"]),
    (
        "val of another tokenizer",
        [*E, "--task", "val", "--data", "{data}/val.bin"],
        1,
        ["another tokenizer", "--data"],
    ),
    (
        "val data missing",
        [*E, "--task", "val", "--data", "{missing}.bin"],
        1,
        ["does not exist"],
    ),
    # ---- tokenize
    ("pattern not a regex", [*TOK, "--pattern", "(["], 2, ["--pattern", "valid regex"]),
    (
        "pattern drops spaces",
        [*TOK, "--pattern", r"\w+"],
        2,
        ["--pattern", "every character", "gpt2"],
    ),
    ("pattern empty", [*TOK, "--pattern", ""], 2, ["--pattern", "every character"]),
    ("pattern with a group", [*TOK, "--pattern", r"(\S+)|\s+"], 2, ["(?:"]),
    (
        "vocab size too small",
        [*TOK, "--vocab-size", "10"],
        2,
        ["--vocab-size", ">= 257"],
    ),
    ("workers zero", [*TOK, "--workers", "0"], 2, ["--workers", ">= 1"]),
    (
        "corpus missing",
        [*TOK, "--input", "{missing}"],
        1,
        ["{missing}", "does not exist"],
    ),
    ("corpus is a folder", [*TOK, "--input", "{empty}"], 1, ["is a folder"]),
    (
        "output under a file",
        [*TOK, "--output", "{file}/tok.json"],
        1,
        ["is a file", "folder"],
    ),
    ("output is a folder", [*TOK, "--output", "{empty}"], 1, ["is a folder", "file"]),
    (
        "encode special text",
        ["tokenize", "encode", "--tokenizer", "{tok}", "--text", "<|endoftext|>"],
        1,
        ["--allowed-special all"],
    ),
    (
        "encode with a missing tokenizer",
        ["tokenize", "encode", "--tokenizer", "{missing}", "--text", "x"],
        1,
        ["does not exist"],
    ),
    (
        "encode a folder",
        ["tokenize", "encode", "--tokenizer", "{tok}", "--input", "{empty}"],
        1,
        ["is a folder"],
    ),
    (
        "tokenizer not json",
        ["tokenize", "encode", "--tokenizer", "{file}", "--text", "x"],
        1,
        ["not a buildllm tokenizer file"],
    ),
    # ---- data
    (
        "val fraction one",
        [*PREP, "--val-fraction", "1"],
        2,
        ["--val-fraction", "[0, 1)"],
    ),
    ("val fraction nan", [*PREP, "--val-fraction", "nan"], 2, ["--val-fraction"]),
    ("prepare workers zero", [*PREP, "--workers", "0"], 2, ["--workers", ">= 1"]),
    ("max tokens zero", [*PREP, "--max-tokens", "0"], 2, ["--max-tokens", ">= 1"]),
    (
        "prepare without out dir",
        ["data", "prepare", "--corpus", "{file}"],
        1,
        ["--out-dir"],
    ),
    (
        "prepare a missing corpus",
        [*PREP[:2], "--corpus", "{missing}", "--out-dir", "{root}/p"],
        1,
        ["--corpus", "neither"],
    ),
    ("prepare into a file", [*PREP[:4], "--out-dir", "{file}"], 1, ["is a file"]),
    (
        "download an unknown corpus",
        ["data", "download", "nope"],
        1,
        ["unknown corpus", "choose one of"],
    ),
    # ---- plot
    ("plot a missing run", ["plot", "{missing}"], 1, ["does not exist"]),
]
if not CUDA:
    CASES += [
        ("train on cuda without one", [*T, "--device", "cuda", "--out-dir", "{root}/c"],
         1, ["no cuda device", "--device auto or cpu"]),
        ("sample on cuda without one", [*S[:-1], "cuda"], 1, ["no cuda device"]),
        ("eval on cuda without one", [*E[:-1], "cuda", "--task", "val", "--data",
                                      "{data}/val.bin"], 1, ["no cuda device"]),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "argv, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_command_exits_with_one_line_naming_the_fix_and_keeps_every_file(
    world, capsys, argv, code, words
):
    argv = [a.format(**world) for a in argv]
    exit_code, line = run_bad(argv, capsys, world["root"])
    assert exit_code == code, line
    assert line.startswith("buildllm"), line
    for word in words:
        assert word.format(**world) in line, line
    assert not (world["root"] / "r").exists()  # a refused run created no folder


def test_there_are_at_least_sixty_bad_inputs():
    assert len(CASES) + len(API_CASES) >= 60


# ---------------------------------------------------------------- the API
def _tiny_model():
    from buildllm.model import GPT, GPTConfig

    return GPT(GPTConfig.from_preset("tiny", d_model=32, n_layers=1))


def _generate(**kwargs):
    from buildllm.generate import generate

    return generate(_tiny_model(), torch.tensor([[1, 2]]), 2, **kwargs)


def _gpt_config(**kwargs):
    from buildllm.model import GPTConfig

    return GPTConfig(**kwargs)


def _forward(ids):
    return _tiny_model()(torch.tensor(ids, dtype=torch.long))


def _tokenizer(pattern):
    from buildllm.tokenizer import BPETokenizer

    return BPETokenizer.train(TEXT, 260, pattern=pattern, progress=False)


API_CASES = [
    ("vocab size a fraction", lambda: _gpt_config(vocab_size=10.5), TypeError,
     "vocab_size=10.5 must be an integer"),
    ("vocab size a bool", lambda: _gpt_config(vocab_size=True), TypeError, "integer"),
    ("dropout nan", lambda: _gpt_config(dropout=math.nan), ValueError, "[0, 1)"),
    ("norm eps zero", lambda: _gpt_config(norm_eps=0.0), ValueError, "norm_eps"),
    ("kv heads zero", lambda: _gpt_config(n_kv_heads=0), ValueError, "n_kv_heads"),
    ("grad clip negative", lambda: TrainConfig(grad_clip=-1.0), ValueError, "> 0"),
    ("weight decay nan", lambda: TrainConfig(weight_decay=math.nan), ValueError,
     "weight_decay=nan"),
    ("peak flops negative", lambda: TrainConfig(peak_flops=-1.0), ValueError, "> 0"),
    ("steps a float", lambda: TrainConfig(max_steps=10.0), TypeError, "integer"),
    ("ids past the vocabulary", lambda: _forward([[1, 4096]]), ValueError,
     "vocabulary 0..4095"),
    ("negative ids", lambda: _forward([[-1, 2]]), ValueError, "0..4095"),
    ("no positions", lambda: _forward([[]]), ValueError, "T >= 1"),
    ("repetition penalty nan", lambda: _generate(repetition_penalty=math.nan),
     ValueError, "repetition_penalty"),
    ("top k zero", lambda: _generate(top_k=0), ValueError, "top_k"),
    ("temperature nan", lambda: _generate(temperature=math.nan), ValueError,
     "temperature"),
    ("pattern drops text", lambda: _tokenizer(r"\w+"), ValueError, "every character"),
    ("pattern empty", lambda: _tokenizer(""), ValueError, "every character"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, kind, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_a_bad_argument_to_the_api_raises_naming_the_rule(call, kind, words):
    with pytest.raises(kind) as info:
        call()
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_training_takes_a_string_as_text_even_if_it_names_a_file_and_a_path_as_file(
    world,
):
    from buildllm.tokenizer import BPETokenizer

    name = str(world["file"])  # an existing file: still the text of its name
    from_name = BPETokenizer.train(name, 259, progress=False)
    assert all(token.decode() in name for token in from_name.vocab[256:])
    from_path = BPETokenizer.train(world["file"], 260, progress=False)
    from_text = BPETokenizer.train(world["file"].read_text(), 260, progress=False)
    assert from_path.hash == from_text.hash
    with pytest.raises(ValueError, match=r"a str is text: pass pathlib\.Path"):
        BPETokenizer.train(name, 1000, progress=False)  # too little text in a name
    with pytest.raises(TypeError, match=r"got bytes; decode bytes to str"):
        BPETokenizer.train(world["file"].read_bytes(), 260, progress=False)
    with pytest.raises(TypeError, match=r"got int"):
        BPETokenizer.train(["text", 3], 260, progress=False)


def test_a_checkpoint_with_damaged_metadata_is_named_in_the_error(tmp_path, world):
    from safetensors.torch import save_file

    from buildllm.checkpoint import read_config

    bad = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, bad, metadata={"format": "buildllm",
                                                    "gpt_config": "{not json"})  # fmt: skip
    with pytest.raises(ValueError, match=f"{bad}.*damaged model config"):
        read_config(bad)


def test_eval_refuses_ids_past_the_model_vocabulary(world, tmp_path, capsys):
    from buildllm.data import write_tokens

    path = tmp_path / "big.bin"
    write_tokens(path, np.array([1, 2, 50000] * 200, dtype=np.uint16), vocab_size=50257)
    code, line = run_bad([*[a.format(**world) for a in E], "--task", "val", "--data",
                          str(path)], capsys, world["root"])  # fmt: skip
    assert code == 1 and "50257-token vocabulary" in line and "vocab_size=4096" in line


def test_metrics_with_a_bad_middle_line_name_the_file_and_line(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo\n{"step": 2}\n')
    code, line = run_bad(["plot", str(tmp_path)], capsys, tmp_path)
    assert code == 1 and f"{metrics} line 2" in line and "delete that line" in line


def test_sampling_a_model_with_more_ids_than_its_tokenizer_shows_them_as_replacements(
    world, tmp_path
):
    from buildllm.generate import decode_tokens
    from buildllm.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.load(world["tok"])  # 300 ids
    text = decode_tokens(tokenizer, [ord("h"), ord("i"), 299, 4000, ord("!")])
    assert text == "hi<|endoftext|>\ufffd!"


def test_json_summary_of_a_resumed_finished_run_reports_its_losses(world, capsys):
    argv = [*T, "--resume", "--out-dir", str(world["run"]), "--json"]
    before = snapshot(world["run"])
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["loss"] is not None
    assert summary["val_loss"] is not None
    assert snapshot(world["run"]) == before


def test_a_copy_of_the_run_folder_stays_byte_identical_when_refused(world, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(world["run"], copy)
    before = snapshot(copy)
    with pytest.raises(ValueError, match="already holds"):
        Trainer(replace(SMALL, out_dir=str(copy)), progress=False)
    assert snapshot(copy) == before


def test_a_model_with_more_ids_than_its_data_tokenizer_trains_and_samples(
    world, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", *RUN, "--data", str(world["data"]), "--sample-tokens", "8",
            "--vocab-size", "4096", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0  # the 4096-id model samples ids the 300-id tokenizer lacks
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "Traceback" not in capsys.readouterr().err


def test_the_long_prompt_warning_is_one_line_without_a_source_path(world, capsys):
    argv = [a.format(**world) for a in S] + ["--prompt", "x " * 300]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [warning[0]] and warning[0].startswith("buildllm: warning: ")
    assert ".py" not in err and "context_length=128" in warning[0]


def test_encode_from_a_terminal_says_it_reads_stdin(world, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("hello\n"))
    assert main(["tokenize", "encode", "--tokenizer", str(world["tok"])]) == 0
    captured = capsys.readouterr()
    assert "reading the text from stdin" in captured.err and "Ctrl-D" in captured.err
    assert captured.out.split()  # and it encoded what came
