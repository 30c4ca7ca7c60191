"""Supervised fine-tuning: conversations in, the Trainer's objective out.

Taught in Chapter 10 (Following Instructions). SFT is pretraining's loss on other data:
each conversation is rendered by the chat template, the targets outside the assistant's
turns are IGNORE_INDEX, and a micro-batch packs its conversations into rows of the
context length, each attending only to itself (`chat.pack_batch`), or pads them on the
right to the longest (exact without a mask: causal attention never looks right).
The Trainer's loop, clipping, schedule and checkpoints run unchanged (Ouyang et al.
2022, arXiv:2203.02155, step 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from buildllm.chat import Message, loss_targets, pack_batch, pad_batch, render_chat
from buildllm.distributed import DistInfo
from buildllm.optim import cross_entropy
from buildllm.tokenizer import BPETokenizer


def encode_conversations(
    tokenizer: BPETokenizer, conversations: Sequence[Sequence[Message]], max_len: int
) -> list[tuple[Tensor, Tensor]]:
    """Render each conversation and return its (x, y) pair, at most `max_len` long.

    Longer conversations keep their first `max_len` + 1 tokens; one with nothing left to
    learn is dropped. Raises ValueError if no conversation has an assistant token.
    Shapes: -> pairs of x (T,), y (T,) int64, T <= max_len.
    """
    pairs = []
    for messages in conversations:
        ids, mask = render_chat(tokenizer, messages)
        if any(mask[1 : max_len + 1]):
            pairs.append(loss_targets(ids[: max_len + 1], mask[: max_len + 1]))
    if not pairs:
        raise ValueError(
            "no conversation has an assistant turn within the context; SFT learns "
            "only the assistant's tokens, so give it conversations with answers"
        )
    return pairs


class SFTObjective:
    """The Trainer's objective for supervised fine-tuning on chat conversations.

    Each optimizer step draws batch_size x grad_accum_steps conversations at random
    (with a generator seeded by `seed`), the same on every process, which keeps its
    share of the micro-batches; validation runs over `val` in fixed, padded batches.
    The loss is the mean cross-entropy over the assistant tokens of a micro-batch;
    `packing` (the default) packs a micro-batch into full rows, which changes only the
    speed.
    """

    def __init__(
        self,
        tokenizer: BPETokenizer,
        train: Sequence[Sequence[Message]],
        val: Sequence[Sequence[Message]],
        context_length: int,
        batch_size: int,
        grad_accum_steps: int = 1,
        seed: int = 1337,
        impl: Literal["manual", "fast"] = "fast",
        dist: DistInfo | None = None,
        packing: bool = True,
    ) -> None:
        self.tokenizer, self.impl, self.dist = tokenizer, impl, dist or DistInfo()
        self.context_length, self.packing = context_length, packing
        if grad_accum_steps % self.dist.world_size:
            raise ValueError(
                f"grad_accum_steps={grad_accum_steps} must be a multiple of the "
                f"{self.dist.world_size} processes, so that each takes an equal share"
            )
        self.pad_id = tokenizer.eot_id or 0  # any id: padded positions are not learned
        self.train = encode_conversations(tokenizer, train, context_length)
        self.val = encode_conversations(tokenizer, val, context_length)
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.generator = torch.Generator().manual_seed(seed)
        mean_len = sum(len(x) for x, _ in self.train) / len(self.train)
        self.tokens_per_step = math.ceil(batch_size * grad_accum_steps * mean_len)

    def next(self) -> list[tuple[Tensor, ...]]:
        """Return this process's micro-batches, packed or (without `packing`) padded.

        Packed (`pack_batch`): x, y, positions (R, T) and mask (R, 1, T, T), the
        conversations in rows of at most context_length; padded (`pad_batch`): x, y
        (B, T), right-padded. The same tokens and the same loss; packing computes
        fewer padded positions.
        """
        A, B = self.grad_accum_steps, self.batch_size
        rows = torch.randint(len(self.train), (A, B), generator=self.generator)
        share = A // self.dist.world_size
        mine = rows[self.dist.rank * share : (self.dist.rank + 1) * share]
        drawn = [[self.train[i] for i in r] for r in mine.tolist()]
        if self.packing:
            return [pack_batch(d, self.context_length, self.pad_id) for d in drawn]
        return [pad_batch(d, self.pad_id) for d in drawn]

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Shapes: batch x, y (B, T) [, positions, mask] -> mean over assistant tokens."""
        x, y, *packed = batch
        positions, mask = packed or (None, None)
        logits = model(x, mask=mask, positions=positions)  # (B, T, V)
        return cross_entropy(logits, y, impl=self.impl)  # ignores IGNORE_INDEX

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Shapes: -> x, y (B, T); the validation conversations in order, every time."""
        rank, world, B = self.dist.rank, self.dist.world_size, self.batch_size
        for k, start in enumerate(range(0, len(self.val), B)):
            if k % world == rank:
                yield pad_batch(self.val[start : start + B], self.pad_id)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """SFT reports its validation loss as it stands."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the data position: the state of the sampling generator."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position `state_dict()` returned."""
        self.generator.set_state(state["generator"])
