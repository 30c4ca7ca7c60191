"""Direct preference optimisation: learn from pairs of a better and a worse answer.

Taught in Chapter 10 (Following Instructions). DPO (Rafailov et al. 2023,
arXiv:2305.18290) fits the policy to preferences without a reward model: the reward
of an answer is beta times its log-probability ratio to a frozen reference model (the
SFT model), and the loss is the logistic loss of the chosen answer's reward beating the
rejected one's (eq-dpo). The pairs here are exact: chosen is the verified answer,
rejected the SFT model's wrong answer or, where it was right, another example's answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from buildllm.chat import IGNORE_INDEX, Message, pad_batch, render_chat
from buildllm.distributed import DistInfo
from buildllm.instructions import Example, is_correct
from buildllm.sft import encode_conversations
from buildllm.tokenizer import BPETokenizer

Pair = tuple[list[Message], list[Message]]  # (chosen, rejected) conversations


def sequence_logprobs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Return each row's summed log-probability of its targets, IGNORE_INDEX skipped.

    This is log pi(answer | prompt): the prompt's positions carry IGNORE_INDEX.
    Shapes: x, y (B, T) -> (B,) float32.
    """
    logits = model(x).float()  # (B, T, V)
    keep = y != IGNORE_INDEX  # (B, T)
    log_probs = logits.log_softmax(dim=-1)  # (B, T, V)
    picked = log_probs.gather(-1, y.where(keep, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * keep).sum(dim=-1)  # (B,)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Return the mean DPO loss, -log sigmoid(beta * margin), over a batch of pairs.

    The margin is how much more the policy than the reference prefers the chosen
    answer: (log pi_c - log ref_c) - (log pi_r - log ref_r) (eq-dpo). At beta -> 0
    the loss tends to log 2 - beta * margin / 2. Shapes: four (B,) -> scalar.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    return -F.logsigmoid(beta * margin).mean()  # eq-dpo


def dpo_weight(margin: Tensor, beta: float) -> Tensor:
    """Return each pair's weight in the DPO gradient, beta * sigmoid(-beta * margin).

    The gradient of one pair's loss is -weight x (grad log pi_c - grad log pi_r)
    (eq-dpo-grad): large for pairs the policy still ranks wrongly, near 0 once the
    margin is well past 1/beta. Shapes: margin (B,) -> (B,).
    """
    return beta * torch.sigmoid(-beta * margin)  # eq-dpo-grad


def make_pairs(
    examples: Sequence[Example], outputs: Sequence[str], seed: int = 0
) -> list[Pair]:
    """Pair each example's verified answer (chosen) with a wrong one (rejected).

    The rejected answer is the model's own output where it was wrong, else the answer
    of another example of the same task, drawn with `seed`.
    """
    rng = random.Random(seed)
    answers: dict[str, list[str]] = {}
    for example in examples:
        answers.setdefault(example.task, []).append(example.answer)
    pairs = []
    for example, output in zip(examples, outputs, strict=True):
        wrong = output.strip()
        if is_correct(example, output) or not wrong:
            others = [a for a in answers[example.task] if a != example.answer]
            wrong = rng.choice(others) if others else example.answer[::-1] + "?"
        prompt = example.messages(with_answer=False)
        pairs.append(
            (example.messages(), prompt + [{"role": "assistant", "content": wrong}])
        )
    return pairs


def fitting_pairs(
    tokenizer: BPETokenizer, pairs: Sequence[Pair], max_len: int
) -> list[Pair]:
    """Keep the pairs whose two conversations both fit in `max_len` + 1 tokens."""
    return [
        pair
        for pair in pairs
        if all(len(render_chat(tokenizer, m)[0]) <= max_len + 1 for m in pair)
    ]


@torch.no_grad()
def pair_logprobs(
    model: nn.Module,
    encoded: Sequence[tuple[Tensor, Tensor]],
    pad_id: int,
    batch_size: int = 32,
) -> Tensor:
    """Return `sequence_logprobs` of every encoded conversation, in batches, no grad.

    Shapes: N pairs of (T_i,) -> (N,) float32.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(encoded), batch_size):
        x, y = pad_batch(encoded[start : start + batch_size], pad_id)
        out.append(sequence_logprobs(model, x.to(device), y.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out)


class DPOObjective:
    """The Trainer's objective for DPO on (chosen, rejected) conversation pairs.

    The frozen `reference` model's log-probabilities of every pair are computed once,
    in float32, at construction. A micro-batch holds batch_size pairs: chosen rows then
    rejected rows in one padded batch, with their reference log-probabilities, so one
    forward pass of the policy scores both.
    """

    def __init__(
        self,
        tokenizer: BPETokenizer,
        reference: nn.Module,
        train: Sequence[Pair],
        val: Sequence[Pair],
        context_length: int,
        batch_size: int,
        beta: float = 0.1,
        grad_accum_steps: int = 1,
        seed: int = 1337,
        dist: DistInfo | None = None,
    ) -> None:
        if beta <= 0:
            raise ValueError(f"beta={beta} must be > 0; DPO's usual values are 0.1-0.5")
        self.tokenizer, self.beta, self.dist = tokenizer, beta, dist or DistInfo()
        self.pad_id = tokenizer.eot_id or 0
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.train = self._encode(train, reference, context_length)
        self.val = self._encode(val, reference, context_length)
        self.generator = torch.Generator().manual_seed(seed)
        mean_len = sum(len(c[0]) + len(r[0]) for c, r, _ in self.train) / len(
            self.train
        )
        self.tokens_per_step = int(batch_size * grad_accum_steps * mean_len)

    def _encode(
        self, pairs: Sequence[Pair], reference: nn.Module, max_len: int
    ) -> list:
        """Return (chosen x/y, rejected x/y, reference log-probs (2,)) for each pair.

        Pairs whose chosen or rejected conversation is longer than `max_len` + 1 tokens
        are left out: a cut answer would compare the two on unequal terms.
        """
        tok = self.tokenizer
        pairs = [
            p
            for p in pairs
            if all(len(render_chat(tok, m)[0]) <= max_len + 1 for m in p)
        ]
        if not pairs:
            raise ValueError(
                f"no pair fits in context_length={max_len}; shorten the prompts"
            )
        chosen = encode_conversations(tok, [c for c, _ in pairs], max_len)
        rejected = encode_conversations(tok, [r for _, r in pairs], max_len)
        ref = pair_logprobs(reference, chosen + rejected, self.pad_id)  # (2N,)
        n = len(pairs)
        return [(chosen[i], rejected[i], ref[[i, n + i]]) for i in range(n)]

    def _batch(self, items: Sequence) -> tuple[Tensor, Tensor, Tensor]:
        """Shapes: -> x, y (2B, T), chosen rows first; reference log-probs (2B,)."""
        x, y = pad_batch(
            [c for c, _, _ in items] + [r for _, r, _ in items], self.pad_id
        )
        ref = torch.cat([torch.stack([p[2][0] for p in items]),
                         torch.stack([p[2][1] for p in items])])  # fmt: skip
        return x, y, ref

    def next(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Return this process's micro-batches of the next step (see `_batch`)."""
        A, B = self.grad_accum_steps, self.batch_size
        rows = torch.randint(len(self.train), (A, B), generator=self.generator)
        share = A // self.dist.world_size
        mine = rows[self.dist.rank * share : (self.dist.rank + 1) * share]
        return [self._batch([self.train[i] for i in r]) for r in mine.tolist()]

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Shapes: batch x, y (2B, T), ref (2B,) -> the mean DPO loss (eq-dpo)."""
        x, y, ref = batch
        logp = sequence_logprobs(model, x, y)  # (2B,)
        B = len(logp) // 2
        return dpo_loss(logp[:B], logp[B:], ref[:B], ref[B:], self.beta)

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield the validation pairs in fixed batches, this process's share."""
        rank, world, B = self.dist.rank, self.dist.world_size, self.batch_size
        for k, start in enumerate(range(0, len(self.val), B)):
            if k % world == rank:
                yield self._batch(self.val[start : start + B])

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """DPO reports its validation loss as it stands (log 2 at the start)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the data position: the state of the sampling generator."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position `state_dict()` returned."""
        self.generator.set_state(state["generator"])


def preference_accuracy(
    model: nn.Module,
    tokenizer: BPETokenizer,
    pairs: Sequence[Pair],
    context_length: int,
) -> float:
    """Return the fraction of pairs whose chosen answer the model finds more likely.

    Compares log pi(chosen | prompt) with log pi(rejected | prompt), no reference,
    over the pairs that fit in `context_length` + 1 tokens.
    """
    pad_id = tokenizer.eot_id or 0
    pairs = fitting_pairs(tokenizer, pairs, context_length)
    chosen = encode_conversations(tokenizer, [c for c, _ in pairs], context_length)
    rejected = encode_conversations(tokenizer, [r for _, r in pairs], context_length)
    logp = pair_logprobs(model, chosen + rejected, pad_id)  # (2N,)
    n = len(chosen)
    return (logp[:n] > logp[n:]).float().mean().item()
