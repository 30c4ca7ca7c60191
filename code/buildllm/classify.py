"""A classifier from a pretrained GPT: a new head, pooling, what trains, the objective.

Taught in Chapter 9 (Classification). The language-model head (d_model -> vocabulary)
is replaced by a classification head (d_model -> classes), so the model gives class
logits at every position; under causal attention only the last real token has seen the
whole text, so its logits are the prediction ("last"; "mean" averages all real
positions). Batches of texts of different lengths are padded on the right and the
padding hidden by an attention mask. `ClassifyObjective` plugs this loss into the
Trainer. As Raschka's Chapter 6 (2024), on genre instead of spam.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from buildllm.attention import padding_mask
from buildllm.distributed import DistInfo
from buildllm.model import GPT
from buildllm.tokenizer import BPETokenizer

Pooling = Literal["last", "mean"]


def add_classifier_head(model: GPT, n_classes: int) -> GPT:
    """Replace `model.lm_head` by a fresh Linear(d_model, n_classes) with a bias.

    The head starts small (normal, std 0.02, as GPT-2's init) and untied from the token
    embeddings, which the config then records (`tie_embeddings=False`).
    Shapes: afterwards model(idx) (B, T) -> class logits (B, T, n_classes).
    """
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes} must be at least 2")
    weight = model.tok_emb.weight
    head = nn.Linear(model.config.d_model, n_classes, device=weight.device)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return model


def pool(logits: Tensor, lengths: Tensor, pooling: Pooling = "last") -> Tensor:
    """Return one row of class logits per text from the logits of every position.

    "last" takes position lengths[b] - 1, the last real token, the only one that
    attends to the whole text; "mean" averages the real positions (equal to the head
    applied to the mean hidden state, since the head is linear).
    Shapes: logits (B, T, C), lengths (B,) -> (B, C).
    """
    if pooling == "last":
        rows = torch.arange(logits.shape[0], device=logits.device)  # (B,)
        return logits[rows, lengths - 1]  # (B, C)
    if pooling == "mean":
        real = padding_mask(lengths, logits.shape[1])[:, 0, 0, :, None]  # (B, T, 1)
        return (logits * real).sum(1) / lengths[:, None].to(logits.dtype)  # (B, C)
    raise ValueError(f"pooling={pooling!r} must be 'last' or 'mean'")


def set_trainable(model: GPT, train: str) -> None:
    """Choose what fine-tuning updates: "head", "last-N" (blocks), "all" or "lora".

    "last-N" trains the last N blocks, the final norm and the head; "lora" keeps
    the adapters `lora.add_lora` made trainable and adds the head. Everything else is
    frozen (requires_grad=False), so the optimizer never sees it.
    Raises ValueError for another value or an N outside 1..n_layers.
    """
    match = re.fullmatch(r"last-(\d+)", train)
    n_layers = len(model.blocks)
    if train not in ("head", "all", "lora") and not (
        match and 1 <= int(match[1]) <= n_layers
    ):
        raise ValueError(
            f"train={train!r} must be head, all, lora or last-N with N in 1..{n_layers}"
        )
    if train == "all":
        model.requires_grad_(True)
        return
    if train != "lora":
        model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    if match:
        for block in model.blocks[n_layers - int(match[1]) :]:
            block.requires_grad_(True)
        model.final_norm.requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    """Count the parameters fine-tuning updates (requires_grad), a shared one once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def encode_texts(
    texts: Sequence[str], tokenizer: BPETokenizer, context_length: int
) -> list[list[int]]:
    """Return each text's token ids, cut to its first `context_length` tokens."""
    return [tokenizer.encode(t)[:context_length] or [0] for t in texts]


def collate(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Pad token id lists on the right into one batch; return (idx, lengths).

    Shapes: -> idx (B, T) int64 with T the longest list, lengths (B,) int64.
    """
    lengths = torch.tensor([len(x) for x in ids])  # (B,)
    idx = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for b, x in enumerate(ids):
        idx[b, : len(x)] = torch.tensor(x)
    return idx, lengths


def classify_logits(
    model: GPT, idx: Tensor, lengths: Tensor, pooling: Pooling
) -> Tensor:
    """Return the class logits of a padded batch: masked forward, then `pool`.

    Shapes: idx (B, T), lengths (B,) -> (B, C).
    """
    mask = padding_mask(lengths, idx.shape[1])  # (B, 1, 1, T), False on padding
    return pool(model(idx, mask=mask), lengths, pooling)  # (B, C)


@torch.no_grad()
def predict_proba(
    model: GPT,
    ids: Sequence[Sequence[int]],
    pooling: Pooling = "last",
    batch_size: int = 64,
) -> Tensor:
    """Return every text's class probabilities, in eval mode, batch by batch.

    Shapes: ids N lists of token ids -> (N, C), rows summing to 1.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        idx, lengths = collate(ids[start : start + batch_size])
        logits = classify_logits(model, idx.to(device), lengths.to(device), pooling)
        out.append(torch.softmax(logits.float(), dim=-1).cpu())  # (b, C)
    model.train(was_training)
    return torch.cat(out)


class ClassifyObjective:
    """The Trainer's objective for classification: weighted cross-entropy on `pool`.

    Each optimizer step takes the next batch_size x grad_accum_steps training texts of
    a shuffled order (reshuffled every epoch by a generator seeded with `seed`), this
    process its share of the micro-batches; validation is the whole validation set
    in fixed batches. `class_weights` (C,) weigh each class's examples in the loss,
    e.g. inversely to its frequency for an imbalanced set.
    Shapes: a batch is idx (B, T), lengths (B,), labels (B,).
    """

    def __init__(
        self,
        train_ids: Sequence[Sequence[int]],
        train_labels: Sequence[int],
        val_ids: Sequence[Sequence[int]],
        val_labels: Sequence[int],
        tokenizer: BPETokenizer,
        batch_size: int,
        grad_accum_steps: int = 1,
        seed: int = 1337,
        pooling: Pooling = "last",
        class_weights: Tensor | None = None,
        dist: DistInfo | None = None,
    ) -> None:
        self.dist = dist or DistInfo()
        if grad_accum_steps % self.dist.world_size:
            raise ValueError(
                f"grad_accum_steps={grad_accum_steps} must be a multiple of the "
                f"{self.dist.world_size} processes, so that each takes an equal share"
            )
        if len(train_ids) < batch_size * grad_accum_steps:
            raise ValueError(
                f"{len(train_ids)} training texts are fewer than one step's "
                f"batch_size x grad_accum_steps = {batch_size * grad_accum_steps}; "
                "lower --batch-size"
            )
        self.train_ids, self.train_labels = list(train_ids), torch.tensor(train_labels)
        self.val_ids, self.val_labels = list(val_ids), torch.tensor(val_labels)
        self.tokenizer, self.pooling, self.class_weights = (
            tokenizer,
            pooling,
            class_weights,
        )
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(self.train_ids), generator=self.generator)
        self.position = 0
        mean_len = sum(map(len, self.train_ids)) / len(self.train_ids)
        self.tokens_per_step = int(batch_size * grad_accum_steps * mean_len)

    def _take(self, n: int) -> Tensor:
        """Return the next `n` indices of the shuffled order, reshuffling at its end."""
        if self.position + n > len(self.order):
            self.order = torch.randperm(len(self.train_ids), generator=self.generator)
            self.position = 0
        taken = self.order[self.position : self.position + n]
        self.position += n
        return taken

    def _batch(
        self, ids: Sequence[Sequence[int]], labels: Tensor
    ) -> tuple[Tensor, ...]:
        idx, lengths = collate(ids)
        return idx, lengths, labels

    def next(self) -> list[tuple[Tensor, ...]]:
        """Shapes: -> accum_local triples idx (B, T), lengths (B,), labels (B,)."""
        B, A, world = self.batch_size, self.grad_accum_steps, self.dist.world_size
        taken = self._take(B * A).view(A, B)  # (A, B) indices of the global batch
        share = A // world
        mine = taken[self.dist.rank * share : (self.dist.rank + 1) * share]
        return [
            self._batch([self.train_ids[i] for i in row], self.train_labels[row])
            for row in mine
        ]

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Shapes: batch idx (B, T), lengths (B,), labels (B,) -> mean loss, scalar."""
        idx, lengths, labels = batch
        logits = classify_logits(model, idx, lengths, self.pooling)  # (B, C)
        weight = (
            None if self.class_weights is None else self.class_weights.to(idx.device)
        )
        return F.cross_entropy(logits.float(), labels, weight=weight)

    def val_batches(self) -> Iterator[tuple[Tensor, ...]]:
        """Shapes: -> idx (B, T), lengths (B,), labels (B,): the validation set in order."""
        rank, world = self.dist.rank, self.dist.world_size
        for i, start in enumerate(range(0, len(self.val_ids), self.batch_size)):
            if i % world == rank:
                stop = start + self.batch_size
                yield self._batch(self.val_ids[start:stop], self.val_labels[start:stop])

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """Nothing beyond the loss; accuracy is measured on the test split afterwards."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the data position: generator state, current order and position."""
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position `state_dict()` returned."""
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


def class_weights_for(labels: Sequence[int], n_classes: int) -> Tensor:
    """Return weights N / (C · count_c): each class weighs as much in the loss in all.

    Shapes: -> (C,) float32. Raises ValueError if a class has no example.
    """
    counts = torch.bincount(torch.tensor(labels), minlength=n_classes).float()  # (C,)
    if (counts == 0).any():
        raise ValueError(
            f"class counts {counts.int().tolist()}: every class needs at least one "
            "training example for class weights"
        )
    return counts.sum() / (n_classes * counts)
