"""A counting language model: the next token's probability from how often it
followed the `order - 1` tokens before it in the training text.

Taught in Chapter 1 (What a Language Model Is). `NGramModel.fit` counts every run of
`order` consecutive tokens of a training sequence in one pass of `torch.unique`;
`probs` turns the counts that follow one context into a distribution over the next
token, with add-k smoothing so that a continuation never seen keeps a little
probability; `loss` is the mean negative log-probability of each actual next token,
in nats; `sample` draws text. Order 1 is the unigram model (no context), order 2 the
bigram model. The GPT of the later chapters replaces this table, which can only look
up contexts it has seen, with a function that generalises to contexts it has not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Runs of tokens are stored as one int64 code each: the run read as a base-V number.
MAX_CODE = 2**63 - 1


def _as_ids(
    ids: Sequence[int] | torch.Tensor, vocab_size: int, name: str
) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten()
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} holds an id outside 0..{vocab_size - 1} (vocab_size)")
    return ids


def run_codes(ids: torch.Tensor, order: int, vocab_size: int) -> torch.Tensor:
    """Return the code of each run of `order` consecutive ids, read as a base-V number.

    Entry t codes ids[t : t + order], so there are len(ids) - order + 1 codes; the code
    of a run is its context's code times V plus its last id.
    """
    windows = ids.unfold(0, order, 1)  # (n - order + 1, order), a view
    places = vocab_size ** torch.arange(order - 1, -1, -1, dtype=torch.int64)
    return windows @ places


def _lookup(
    keys: torch.Tensor, counts: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Return counts[i] where keys[i] == code, 0 where a code is not among `keys`."""
    idx = torch.searchsorted(keys, codes).clamp(max=len(keys) - 1)
    return torch.where(keys[idx] == codes, counts[idx], 0)


@dataclass(frozen=True)
class NGramModel:
    """Counts of the runs of `order` tokens seen in training, and how they are smoothed.

    `runs` holds the sorted codes of the distinct runs (see `run_codes`) and
    `run_counts` how often each occurred; `contexts` and `context_counts` the same
    for their first `order - 1` tokens. `smoothing` is the k of add-k smoothing:
    every continuation of a context counts k more times than it was seen.
    """

    order: int
    vocab_size: int
    smoothing: float
    runs: torch.Tensor
    run_counts: torch.Tensor
    contexts: torch.Tensor
    context_counts: torch.Tensor

    @classmethod
    def fit(
        cls,
        ids: Sequence[int] | torch.Tensor,
        order: int = 2,
        vocab_size: int = 256,
        smoothing: float = 1.0,
    ) -> NGramModel:
        """Count every run of `order` consecutive tokens of `ids` (ints < vocab_size).

        Raises ValueError when order < 1, smoothing < 0, an id is out of range, `ids` is
        shorter than `order`, or vocab_size ** order does not fit a 64-bit code.
        """
        if order < 1:
            raise ValueError(f"order must be at least 1 (2: bigram), got {order}")
        if not smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0 (1.0: add-one), got {smoothing}")
        if vocab_size < 1 or vocab_size**order > MAX_CODE:
            raise ValueError(
                f"vocab_size ** order must fit in 64 bits; {vocab_size} ** {order} "
                f"does not: lower order to {int(math.log(MAX_CODE, vocab_size))}"
            )
        ids = _as_ids(ids, vocab_size, "ids")
        if len(ids) < order:
            raise ValueError(f"ids holds {len(ids)} tokens, fewer than order={order}")
        codes = run_codes(ids, order, vocab_size)
        runs, run_counts = torch.unique(codes, return_counts=True)  # sorted
        # A run's context is its code divided by V; the runs are sorted, so their
        # contexts are too, and equal contexts sit side by side.
        contexts, inverse = torch.unique_consecutive(
            runs // vocab_size, return_inverse=True
        )
        context_counts = torch.zeros(len(contexts), dtype=torch.int64)
        context_counts.index_add_(0, inverse, run_counts)
        return cls(
            order, vocab_size, smoothing, runs, run_counts, contexts, context_counts
        )

    def _prob(self, codes: torch.Tensor) -> torch.Tensor:
        """Probability of each run's last token given the tokens before it, float64."""
        k, V = self.smoothing, self.vocab_size
        seen = _lookup(self.runs, self.run_counts, codes).double()
        total = _lookup(self.contexts, self.context_counts, codes // V).double()
        # A context never seen, unsmoothed, says nothing: uniform rather than 0 / 0.
        return torch.where(total + k * V > 0, (seen + k) / (total + k * V), 1 / V)

    def probs(self, context: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
        """Return the distribution of the token after `context`: (V,) float64.

        Only the last order - 1 ids of `context` matter; it must hold at least that
        many.
        """
        context = _as_ids(context, self.vocab_size, "context")
        context = context[len(context) - self.order + 1 :]
        if len(context) != self.order - 1:
            raise ValueError(
                f"context must hold at least order - 1 = {self.order - 1} ids"
            )
        prefix = torch.cat([context, torch.zeros(1, dtype=torch.int64)])
        code = run_codes(prefix, self.order, self.vocab_size)  # context, token 0
        return self._prob(code + torch.arange(self.vocab_size))

    def loss(self, ids: Sequence[int] | torch.Tensor) -> float:
        """Return the mean of -ln p(token | the order - 1 before it) over `ids` (nats).

        The first order - 1 tokens have no full context and are not predicted; a token
        the model gives probability 0 (possible only with smoothing 0) makes the loss
        infinite.
        """
        ids = _as_ids(ids, self.vocab_size, "ids")
        if len(ids) < self.order:
            raise ValueError(
                f"ids holds {len(ids)} tokens, fewer than order={self.order}"
            )
        p = self._prob(run_codes(ids, self.order, self.vocab_size))
        return -torch.log(p).mean().item()

    def sample(
        self,
        context: Sequence[int],
        n: int,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Return `context` and `n` tokens, each drawn from `probs` of those before."""
        out = list(context)
        for _ in range(n):
            p = self.probs(out[len(out) - self.order + 1 :])
            out.append(torch.multinomial(p, 1, generator=generator).item())
        return out
