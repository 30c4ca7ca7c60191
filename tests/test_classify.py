"""Tests for buildllm.classify, .classify_run and cli_finetune on small random models.

References: hand-indexed logits, an unpadded forward of each text alone, scikit-learn's
balanced class weights, an uninterrupted fine-tuning run (for resume), and a random
GPT-2 in Hugging Face's format (the GPU path of Chapter 9, run on the CPU here).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from buildllm.classify import (
    add_classifier_head,
    class_weights_for,
    classify_logits,
    collate,
    count_trainable,
    pool,
    set_trainable,
)
from buildllm.classify_run import (
    GENRE_RUN,
    ClassifierSpec,
    finetune_classifier,
    load_classifier,
)
from buildllm.cli import main
from buildllm.lora import count_lora_params
from buildllm.model import GPT, GPTConfig
from buildllm.textsets import TextSet
from buildllm.tokenizer import BPETokenizer
from buildllm.train import TrainConfig

SMALL = GPTConfig(vocab_size=300, context_length=32, d_model=32, n_layers=2, n_heads=4)
WORDS = {0: "the king his crown and the realm", 1: "sweet love a wedding and a song"}


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(SMALL)


def _texts(n: int = 24) -> TextSet:
    texts = [f"{WORDS[i % 2]} {'!' * (i % 5)}" for i in range(n)]
    labels = [i % 2 for i in range(n)]
    return TextSet(texts, labels, ("history", "comedy"), ["x"] * n)


def test_pool_takes_the_last_real_position_or_the_mean_of_the_real_ones():
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 2])
    last = pool(logits, lengths, "last")
    torch.testing.assert_close(last, torch.stack([logits[0, 4], logits[1, 1]]))
    mean = pool(logits, lengths, "mean")
    expected = torch.stack([logits[0].mean(0), logits[1, :2].mean(0)])
    torch.testing.assert_close(mean, expected)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_padded_batch_classifies_each_text_as_it_would_alone(pooling):
    model = add_classifier_head(_model(), 3).eval()
    ids = [[5, 9, 14, 2, 7, 1], [3, 8], [4, 4, 4, 4]]
    idx, lengths = collate(ids, pad_id=0)
    assert idx.shape == (3, 6) and lengths.tolist() == [6, 2, 4]
    with torch.no_grad():
        batch = classify_logits(model, idx, lengths, pooling)
        for b, x in enumerate(ids):
            logits = model(torch.tensor([x]))  # (1, T, C), no padding at all
            alone = logits[0, -1] if pooling == "last" else logits[0].mean(0)
            torch.testing.assert_close(batch[b], alone, rtol=1e-5, atol=1e-5)


def test_what_trains_is_the_head_the_last_blocks_everything_or_the_adapters():
    d, C = SMALL.d_model, 2
    head = d * C + C
    model = add_classifier_head(_model(), C)
    set_trainable(model, "head")
    assert count_trainable(model) == head
    set_trainable(model, "last-1")
    block = sum(p.numel() for p in model.blocks[-1].parameters())
    assert count_trainable(model) == head + block + 2 * d  # + final norm
    set_trainable(model, "all")
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())
    lora = ClassifierSpec(("a", "b"), train="lora", lora_rank=4)
    from buildllm.classify_run import build_classifier

    adapted = build_classifier(_model(), lora)
    assert count_trainable(adapted) == head + count_lora_params(adapted)
    with pytest.raises(ValueError, match="last-N with N in 1..2"):
        set_trainable(model, "last-3")


def test_class_weights_equal_scikit_learns_balanced_weights():
    labels = [0, 0, 0, 1, 2, 2]
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    torch.testing.assert_close(
        class_weights_for(labels, 3), torch.tensor(expected, dtype=torch.float32)
    )
    with pytest.raises(ValueError, match="every class needs"):
        class_weights_for([0, 0], 2)


def _run(tmp_path, name, max_steps, resume=False, train="all", rank=None):
    tokenizer = BPETokenizer.train([WORDS[0], WORDS[1]], 280, progress=False)
    spec = ClassifierSpec(("history", "comedy"), train=train, lora_rank=rank)
    config = TrainConfig(**{**GENRE_RUN, "out_dir": str(tmp_path / name),
                            "batch_size": 4, "max_steps": max_steps,
                            "eval_interval": 2, "checkpoint_interval": 3,
                            "warmup_steps": 1, "max_lr": 1e-2, "min_lr": 1e-3,
                            "keep_checkpoints": 2})  # fmt: skip
    config = replace(config, max_steps=max_steps)
    texts = _texts()
    return finetune_classifier(_model(), tokenizer, texts, texts, spec, config,
                               resume=resume, progress=False)  # fmt: skip


@pytest.mark.parametrize("train, rank", [("all", None), ("lora", 4)])
def test_a_resumed_fine_tuning_run_logs_exactly_the_uninterrupted_losses(
    tmp_path, train, rank
):
    _, whole = _run(tmp_path, "whole", 6, train=train, rank=rank)
    _run(tmp_path, "part", 6, train=train, rank=rank)
    # as if killed after step 3's checkpoint: drop step 6's, point latest at step 3
    checkpoints = tmp_path / "part" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000006")
    (checkpoints / "latest").write_text("step-0000003")
    _, rest = _run(tmp_path, "part", 6, resume=True, train=train, rank=rank)
    assert [r["loss"] for r in rest] == [r["loss"] for r in whole[4:]]
    assert whole[-1]["val_loss"] < whole[0]["val_loss"]
    _, _, spec = load_classifier(tmp_path / "part")
    assert spec.train == train and spec.lora_rank == rank


def test_cli_fine_tunes_a_random_hugging_face_gpt2_and_classifies(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # the random model's weights, whatever ran before this test
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )
    hf.save_pretrained(tmp_path / "gpt2-random")
    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((t, y) for t, y in zip(_texts(40).texts, _texts(40).labels))
    out = tmp_path / "run"
    argv = ["finetune", "classify", "--checkpoint", str(tmp_path / "gpt2-random"),
            "--data", str(data), "--test", str(data), "--out-dir", str(out),
            "--batch-size", "4", "--max-steps", "16", "--max-lr", "3e-3",
            "--warmup-steps", "2", "--eval-interval", "8", "--device", "cpu",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["val_loss"] < summary["first_val_loss"]
    assert 0.0 <= summary["majority_accuracy"] <= 1.0
    text = WORDS[0]
    assert main(["classify", "--checkpoint", str(out), "--text", text, "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["label"] in ("0", "1")
    assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_cli_rejects_bad_flags_with_exit_2_and_a_missing_run_with_exit_1(
    tmp_path, capsys
):
    base = ["finetune", "classify", "--checkpoint", str(tmp_path)]
    assert main([*base, "--train", "last-0"]) == 2
    assert "last-N" in capsys.readouterr().err
    assert main([*base, "--lora-rank", "0"]) == 2
    assert main(["classify", "--checkpoint", str(tmp_path), "--text", "x"]) == 1
    assert "holds no fine-tuned classifier" in capsys.readouterr().err
    assert main([*base, "--train", "lora"]) == 1
    assert "--lora-rank R" in capsys.readouterr().err
