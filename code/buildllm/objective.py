"""What the Trainer minimises: the language-model objective and the protocol it follows.

Taught in Chapter 6 (Training); Chapter 9 (Classification) plugs in another objective.
An objective hands the Trainer the micro-batches of each optimizer step and the loss of
one micro-batch, fixed validation batches, and its data position for checkpoints, so
one training loop (accumulation, clipping, schedule, AdamW, checkpoints, resume,
metrics) serves pretraining and fine-tuning alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from buildllm.data import get_batch
from buildllm.distributed import BatchSource, DistInfo, load_data
from buildllm.evaluate import bits_per_byte, bytes_per_token
from buildllm.model import GPTConfig
from buildllm.optim import cross_entropy
from buildllm.tokenizer import BPETokenizer

VAL_BPB_TOKENS = 1_000_000  # enough validation tokens to measure bytes per token


class Objective(Protocol):
    """What a Trainer minimises: its batches, the loss of one micro-batch, validation.

    `next()` returns this process's micro-batches of the next optimizer step (tuples of
    CPU tensors, moved to the device by the Trainer); `loss(model, batch)` returns the
    micro-batch's mean loss; `val_batches()` yields this process's share of fixed
    validation batches; `val_metrics(val_loss)` adds derived numbers to a record;
    `state_dict()`/`load_state_dict()` are the data position a checkpoint stores.
    """

    tokenizer: BPETokenizer
    tokens_per_step: int

    def next(self) -> list[tuple[Tensor, ...]]: ...
    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor: ...
    def val_batches(self) -> Iterator[tuple[Tensor, ...]]: ...
    def val_metrics(self, val_loss: float) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LMObjective:
    """Next-token prediction (Chapter 6): random windows of `data`, shifted loss.

    Training batches come from `BatchSource`; validation takes `eval_steps` windows of
    the validation tokens drawn by a generator seeded with `seed` (every world_size-th
    for this process, eval_steps rounded up to a multiple of world_size), and reports
    the validation loss also in bits per byte. `tokenizer` and `log` go to `load_data`
    (a tokenizer file for the data, what happened to a text). Raises as `load_data`
    and `BatchSource`.
    """

    def __init__(
        self,
        data: str,
        model: GPTConfig,
        batch_size: int,
        grad_accum_steps: int,
        eval_steps: int,
        seed: int,
        impl: Literal["manual", "fast"],
        dist: DistInfo,
        tokenizer: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        train_data, self.val_tokens, self.tokenizer = load_data(
            data, model.vocab_size, tokenizer, log
        )
        self.batches = BatchSource(train_data, batch_size, model.context_length,
                                   grad_accum_steps, dist, seed)  # fmt: skip
        self.batch_size, self.context_length = batch_size, model.context_length
        self.eval_steps, self.seed, self.impl, self.dist = eval_steps, seed, impl, dist
        # The validation text's bytes per token turn val_loss into bits per byte.
        self.val_bytes_per_token = bytes_per_token(
            self.val_tokens[:VAL_BPB_TOKENS], self.tokenizer
        )
        self.tokens_per_step = batch_size * grad_accum_steps * model.context_length

    def next(self) -> list[tuple[Tensor, Tensor]]:
        """Shapes: -> accum_local pairs of x, y (B, T) int64; y is x shifted by one."""
        x_all, y_all = self.batches.next()  # (A, B, T) each: this process's share
        return list(zip(x_all, y_all))

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Shapes: batch x, y (B, T) -> the mean cross-entropy, a scalar."""
        x, y = batch
        logits = model(x)  # (B, T, V)
        return cross_entropy(logits, y, impl=self.impl)  # eq-cross-entropy

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Shapes: -> x, y (B, T) int64, the same windows at every evaluation."""
        rank, world = self.dist.rank, self.dist.world_size
        generator = torch.Generator().manual_seed(self.seed)
        B, T = self.batch_size, self.context_length
        for i in range(math.ceil(self.eval_steps / world) * world):
            x, y = get_batch(self.val_tokens, B, T, generator=generator)
            if i % world == rank:
                yield x, y

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """Return the validation loss in bits per byte (`val_bpb`)."""
        return {"val_bpb": bits_per_byte(val_loss, self.val_bytes_per_token)}

    def state_dict(self) -> dict[str, Any]:
        """Return the data position (`BatchSource.state_dict`)."""
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position `state_dict()` returned."""
        self.batches.load_state_dict(state)
