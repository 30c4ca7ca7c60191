"""Tests for buildllm.profiling: module timers and a profiled training step.

The timed work is `time.sleep` in a module's forward and in a custom backward, so the
expected seconds are known; bounds are one-sided (sleep never returns early) or
generous, never a tight timing guard.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from buildllm.profiling import ModuleTimer, profile_step

FORWARD_S, BACKWARD_S = 0.03, 0.05


class SlowBackward(torch.autograd.Function):
    """The identity, whose backward sleeps BACKWARD_S."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        time.sleep(BACKWARD_S)
        return grad


class Slow(nn.Module):
    """A linear layer that sleeps FORWARD_S forward and BACKWARD_S backward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(FORWARD_S)
        return SlowBackward.apply(self.linear(x))


class Toy(nn.Module):
    """Embedding -> slow -> fast -> head, with a 10-token vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.slow, self.fast = nn.Embedding(10, 8), Slow(), nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.fast(self.slow(self.emb(idx))))


def test_module_timer_counts_forward_and_backward_of_each_group_and_removes_hooks():
    model = Toy()
    idx = torch.randint(0, 10, (2, 5))
    with ModuleTimer({"slow": [model.slow], "fast": [model.fast]}) as timer:
        model(idx).sum().backward()
        seconds = dict(timer.seconds)
        timer.reset()
        assert timer.seconds == {"slow": 0.0, "fast": 0.0}
    assert seconds["slow"] >= FORWARD_S + BACKWARD_S
    assert seconds["fast"] < FORWARD_S  # not charged with the slow module's sleeps
    model(idx).sum().backward()  # hooks removed: nothing is added any more
    assert timer.seconds == {"slow": 0.0, "fast": 0.0}


def test_profile_step_parts_add_up_to_the_step_and_the_optimizer_moves_weights():
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    batch = (torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (2, 5)))

    def next_batch() -> tuple[Tensor, Tensor]:
        time.sleep(0.02)
        return batch

    before = model.head.weight.detach().clone()
    with ModuleTimer({"slow": [model.slow]}) as timer:
        start = time.perf_counter()
        parts = profile_step(model, optimizer, next_batch, timer)
        total = time.perf_counter() - start
    assert list(parts) == ["data", "slow", "rest", "optimizer"]
    assert parts["data"] >= 0.02 and parts["slow"] >= FORWARD_S + BACKWARD_S
    assert parts["rest"] >= 0 and parts["optimizer"] > 0
    assert sum(parts.values()) <= total  # the parts tile the step, nothing twice
    assert sum(parts.values()) > 0.9 * total
    assert not torch.equal(model.head.weight, before)
    assert model.head.weight.grad is None  # zero_grad(set_to_none=True) ran
