"""Tests for buildllm.objective: the Trainer with a plugged-in objective and model.

References: a plain PyTorch loop (torch.optim.AdamW, torch's gradient clipping) over
the same micro-batches; hand-drawn windows for the language-model objective.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from buildllm.data import get_batch
from buildllm.distributed import DistInfo
from buildllm.model import GPTConfig
from buildllm.objective import LMObjective
from buildllm.tokenizer import BPETokenizer
from buildllm.train import TrainConfig, Trainer

LR = 0.05
CONFIG = TrainConfig(
    batch_size=4,
    grad_accum_steps=2,
    max_steps=6,
    eval_interval=3,
    eval_steps=2,
    checkpoint_interval=3,
    sample_tokens=None,
    warmup_steps=0,
    max_lr=LR,
    min_lr=LR,
    device="cpu",
    dtype="float32",
    weight_decay=0.1,
    # the weights file's metadata; an nn.Linear has no tied head
    model=GPTConfig.from_preset("tiny", tie_embeddings=False),
)


class Regression:
    """A least-squares objective over fixed random data, two micro-batches a step."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 5, generator=g)
        self.y = self.x @ torch.randn(5, 1, generator=g) + 0.1
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.tokenizer = BPETokenizer.train(["to be or not to be"], 260, progress=False)
        self.tokens_per_step = 8

    def next(self):
        idx = torch.randint(0, 64, (2, 4), generator=self.generator)
        return [(self.x[i], self.y[i]) for i in idx]

    def loss(self, model, batch):
        x, y = batch
        return (model(x) - y).square().mean()

    def val_batches(self):
        yield self.x[:32], self.y[:32]
        yield self.x[32:], self.y[32:]

    def val_metrics(self, val_loss):
        return {}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def _linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(5, 1)


def test_trainer_with_a_plugged_in_objective_equals_a_plain_pytorch_loop(tmp_path):
    config = replace(CONFIG, out_dir=str(tmp_path))
    records = Trainer(
        config, progress=False, objective=Regression(), model=_linear()
    ).fit()

    model, objective = _linear(), Regression()
    decay, no_decay = [model.weight], [model.bias]  # matrices decay, biases do not
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    expected = []
    for _ in range(CONFIG.max_steps):
        batches = objective.next()
        losses = []
        for x, y in batches:
            loss = (model(x) - y).square().mean()
            (loss / len(batches)).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(sum(losses) / len(losses))
    got = [r["loss"] for r in records[1:]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))
    with torch.no_grad():
        val = (model(objective.x) - objective.y).square().mean().item()
    assert abs(records[-1]["val_loss"] - val) < 1e-6


def test_a_resumed_run_of_a_plugged_in_objective_equals_the_uninterrupted_run(
    tmp_path,
):
    whole = replace(CONFIG, out_dir=str(tmp_path / "whole"))
    want = Trainer(whole, progress=False, objective=Regression(), model=_linear()).fit()
    part = replace(CONFIG, out_dir=str(tmp_path / "part"), max_steps=3)
    Trainer(part, progress=False, objective=Regression(), model=_linear()).fit()
    rest = Trainer(
        replace(part, max_steps=6),
        resume=True,
        progress=False,
        objective=Regression(),
        model=_linear(),
    ).fit()
    assert [r["loss"] for r in rest] == [r["loss"] for r in want[4:]]


def test_lm_objective_hands_out_the_windows_get_batch_draws(tmp_path):
    model = GPTConfig.from_preset("tiny")
    dist = DistInfo()
    objective = LMObjective("shakespeare", model, 2, 3, 2, 7, "fast", dist)
    pairs = objective.next()
    x, y = get_batch(
        objective.batches.tokens,
        6,
        model.context_length,
        generator=torch.Generator().manual_seed(7),
    )
    assert len(pairs) == 3
    for i, (xi, yi) in enumerate(pairs):
        torch.testing.assert_close(xi, x[2 * i : 2 * i + 2], rtol=0, atol=0)
        torch.testing.assert_close(yi, y[2 * i : 2 * i + 2], rtol=0, atol=0)
