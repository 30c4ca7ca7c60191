"""Tests for buildllm.evaluate: validation loss and HellaSwag scores by hand arithmetic.

The model is a bigram stub whose next-token probabilities are written out by hand, so
every expected log-likelihood, loss and accuracy is a sum of `math.log` terms.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from buildllm import evaluate
from buildllm.evaluate import (
    evaluate_hellaswag,
    evaluate_loss,
    load_hellaswag,
    perplexity,
    render_example,
    score_endings,
)

WORDS = ["<pad>", "the", "cat", "dog", "sat", "ran", "away", "quickly", "slept",
         "jumped", "barked"]  # fmt: skip
ID = {word: i for i, word in enumerate(WORDS)}

# P(next word | previous word), by hand; the rest of a row's mass is spread evenly.
NEXT = {
    "cat": {"sat": 0.4, "ran": 0.3, "slept": 0.1, "jumped": 0.1},
    "ran": {"away": 0.9},
    "away": {"quickly": 0.9},
    "dog": {"barked": 0.5, "sat": 0.2, "slept": 0.2, "ran": 0.05},
}


def next_prob(prev: str, word: str) -> float:
    """Return the stub's P(word | prev), from the hand-written table."""
    row = NEXT.get(prev, {})
    if word in row:
        return row[word]
    return (1.0 - sum(row.values())) / (len(WORDS) - len(row))


class WordTokenizer:
    """Split on spaces; one id per word of WORDS."""

    def encode(self, text: str) -> list[int]:
        return [ID[word] for word in text.split()]


class BigramStub(nn.Module):
    """A model whose logits at each position are log P(next | current token)."""

    def __init__(self) -> None:
        super().__init__()
        table = [[math.log(next_prob(prev, w)) for w in WORDS] for prev in WORDS]
        self.register_buffer("table", torch.tensor(table, dtype=torch.float64))

    def forward(self, idx: Tensor) -> Tensor:
        return self.table[idx]  # (B, T, V)


EXAMPLES = [
    {  # the sum prefers the short "sat"; the mean per token the true long ending
        "ctx": "the cat",
        "endings": ["sat", "ran away quickly", "slept", "jumped"],
        "label": 1,
    },
    {"ctx": "the dog", "endings": ["barked", "sat", "slept", "ran"], "label": 0},
]


def test_render_example_appends_each_ending_to_the_context_and_masks_only_the_ending():
    tokens, mask, label = render_example(EXAMPLES[0], WordTokenizer())

    t, c = ID["the"], ID["cat"]
    expected = [
        [t, c, ID["sat"], 0, 0],
        [t, c, ID["ran"], ID["away"], ID["quickly"]],
        [t, c, ID["slept"], 0, 0],
        [t, c, ID["jumped"], 0, 0],
    ]
    assert tokens.tolist() == expected
    assert mask.tolist() == [
        [False, False, True, False, False],
        [False, False, True, True, True],
        [False, False, True, False, False],
        [False, False, True, False, False],
    ]
    assert label == 1


def test_render_example_drops_the_oldest_context_tokens_beyond_context_length():
    tokens, mask, _ = render_example(EXAMPLES[0], WordTokenizer(), context_length=4)

    assert tokens[1].tolist() == [ID["cat"], ID["ran"], ID["away"], ID["quickly"]]
    assert mask[1].tolist() == [False, True, True, True]


def test_score_endings_gives_the_hand_computed_sum_and_mean_log_likelihood():
    tokens, mask, _ = render_example(EXAMPLES[0], WordTokenizer())
    total, mean = score_endings(BigramStub(), tokens, mask)

    long_ending = math.log(0.3) + math.log(0.9) + math.log(0.9)
    expected_total = torch.tensor(
        [math.log(0.4), long_ending, math.log(0.1), math.log(0.1)], dtype=torch.float64
    )
    expected_mean = expected_total / torch.tensor(
        [1.0, 3.0, 1.0, 1.0], dtype=torch.float64
    )
    # the scorer computes in float32 whatever the logits' dtype: float32 tolerance
    torch.testing.assert_close(total.double(), expected_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)


def test_evaluate_hellaswag_accuracy_matches_the_hand_count():
    """Example 1: sum picks "sat" (log 0.4 = -0.92 > -1.41), mean picks the label
    (-0.47 > -0.92); example 2: both pick "barked". So acc = 1/2 and acc_norm = 2/2."""
    result = evaluate_hellaswag(BigramStub(), WordTokenizer(), EXAMPLES, progress=False)

    assert result == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_load_hellaswag_reads_the_official_jsonl_fields(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    lines = [
        json.dumps({**ex, "ind": i, "activity_label": "x"})
        for i, ex in enumerate(EXAMPLES)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    examples = load_hellaswag(path)

    assert [ex["ctx"] for ex in examples] == ["the cat", "the dog"]
    assert [ex["label"] for ex in examples] == [1, 0]
    assert examples[1]["endings"] == EXAMPLES[1]["endings"]


def test_load_hellaswag_names_the_line_missing_a_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "a", "label": 0}) + "\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"bad\.jsonl:1 lacks .*endings"):
        load_hellaswag(path)


def test_load_hellaswag_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HellaSwag file"):
        load_hellaswag(tmp_path / "absent.jsonl")


def test_evaluate_loss_of_uniform_logits_is_log_vocab_size_and_perplexity_vocab_size():
    class Uniform(nn.Module):
        def forward(self, idx: Tensor) -> Tensor:
            return torch.zeros(*idx.shape, 7)  # (B, T, V)

    tokens = np.arange(33, dtype=np.uint16) % 7
    loss = evaluate_loss(
        Uniform(), tokens, context_length=4, batch_size=3, progress=False
    )

    assert loss == pytest.approx(math.log(7), abs=1e-6)
    assert perplexity(loss) == pytest.approx(7.0, rel=1e-6)


def test_evaluate_loss_predicts_every_token_once_with_the_bigram_stub():
    rng = np.random.default_rng(0)
    words = rng.choice(
        len(WORDS), size=1 + 5 * 4
    )  # five full windows of four predictions
    expected = -sum(
        math.log(next_prob(WORDS[a], WORDS[b])) for a, b in itertools.pairwise(words)
    ) / (len(words) - 1)

    loss = evaluate_loss(
        BigramStub(), words, context_length=4, batch_size=2, progress=False
    )

    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluate_loss_max_batches_scores_only_the_first_windows():
    words = np.array([ID["ran"], ID["away"], ID["quickly"]] + [ID["the"]] * 10)
    expected = -(math.log(0.9) + math.log(0.9)) / 2  # window one: ran->away->quickly

    loss = evaluate_loss(
        BigramStub(),
        words,
        context_length=2,
        batch_size=1,
        max_batches=1,
        progress=False,
    )

    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluate_loss_without_a_full_window_raises_value_error():
    with pytest.raises(ValueError, match="no window"):
        evaluate_loss(BigramStub(), np.array([1, 2]), context_length=4, progress=False)


def test_load_hellaswag_downloads_the_official_file_when_no_path_is_given(
    tmp_path, monkeypatch
):
    root = tmp_path / "www"
    root.mkdir()
    lines = "".join(json.dumps(ex) + "\n" for ex in EXAMPLES)
    (root / "hellaswag_val.jsonl").write_text(lines, encoding="utf-8")
    handler = partial(SimpleHTTPRequestHandler, directory=root)
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    monkeypatch.setitem(evaluate.HELLASWAG_URLS, "val", url)
    try:
        examples = load_hellaswag(cache_dir=tmp_path / "cache", progress=False)
    finally:
        server.shutdown()
        server.server_close()

    assert [ex["endings"] for ex in examples] == [ex["endings"] for ex in EXAMPLES]
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_text() == lines


# ---------------------------------------------------------------- buildllm eval


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved run of a small random GPT with GPT-2's vocabulary; return its out_dir."""
    from buildllm.checkpoint import save_checkpoint
    from buildllm.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=50257, d_model=32, n_layers=1)
    out_dir = tmp_path_factory.mktemp("run")
    model = GPT(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(out_dir, 1, model, optimizer, config, {"step": 1})
    return out_dir


def test_eval_command_scores_hellaswag_like_the_library(checkpoint, tmp_path, capsys):
    from buildllm.checkpoint import load_model
    from buildllm.cli import main
    from buildllm.tokenizer import gpt2_tokenizer

    examples = [{"ctx": "The cat sat on", "endings": ["the mat.", "a dog", "x", "the"],
                 "label": 0}] * 3  # fmt: skip
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples), encoding="utf-8")
    args = ["eval", "--checkpoint", str(checkpoint), "--hellaswag-path", str(path)]

    code = main([*args, "--device", "cpu", "--json"])

    expected = evaluate_hellaswag(load_model(checkpoint), gpt2_tokenizer(), examples,
                                  progress=False)  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"task": "hellaswag", **expected}


def test_eval_command_reports_validation_loss_and_perplexity_of_a_shards_folder(
    checkpoint, tmp_path, capsys
):
    from buildllm.checkpoint import load_model
    from buildllm.cli import main
    from buildllm.data import write_tokens

    tokens = np.random.default_rng(0).integers(
        0, 50257, size=3 * 128 + 1, dtype=np.uint16
    )
    write_tokens(tmp_path / "web_val_000000.bin", tokens)

    code = main(["eval", "--checkpoint", str(checkpoint), "--task", "val",
                 "--data", str(tmp_path), "--device", "cpu", "--json"])  # fmt: skip

    loss = evaluate_loss(load_model(checkpoint), tokens, 128, progress=False)
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_eval_command_without_data_for_val_fails_with_one_line(checkpoint, capsys):
    from buildllm.cli import main

    code = main(["eval", "--checkpoint", str(checkpoint), "--task", "val"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [
        "buildllm: error: --task val needs --data: a shards folder or a token file"
    ]


def test_eval_command_scores_hugging_face_gpt2_files(checkpoint, tmp_path, capsys):
    from buildllm.checkpoint import load_model
    from buildllm.cli import main
    from buildllm.hf import export_hf
    from buildllm.tokenizer import gpt2_tokenizer

    model = load_model(checkpoint)
    folder = export_hf(model, tmp_path / "gpt2")
    path = tmp_path / "hellaswag.jsonl"
    example = {"ctx": "A dog", "endings": ["runs.", "is a dog", "x y", "z"], "label": 1}
    path.write_text(json.dumps(example) + "\n", encoding="utf-8")

    code = main(["eval", "--hf", str(folder), "--hellaswag-path", str(path),
                 "--device", "cpu", "--json"])  # fmt: skip

    expected = evaluate_hellaswag(model, gpt2_tokenizer(), [example], progress=False)
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"task": "hellaswag", **expected}
