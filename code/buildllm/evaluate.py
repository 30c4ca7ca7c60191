"""Measure a trained GPT: validation loss, perplexity, bits per byte, HellaSwag.

Taught in Chapter 8 (Pretraining GPT-2 small). Validation loss is the mean next-token
cross-entropy over consecutive windows of held-out tokens; perplexity is its
exponential; bits per byte divides it by ln 2 and by the bytes of text per token, a
measure that compares across tokenizers (Chapter 6). HellaSwag (Zellers et al. 2019, arXiv:1905.07830) is scored as a
completion task, as llm.c and nanoGPT do: each of the four endings gets the
log-likelihood of its own tokens after the context, and the ending with the highest
*mean* token log-likelihood wins (`acc_norm`; `acc` uses the sum). The model is any
module mapping (B, T) ids to (B, T, V) logits, so a hand-made stub checks the arithmetic
in the tests.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

# The official files of Zellers et al.; the test split has no labels to score against.
_HELLASWAG = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
HELLASWAG_URLS = {
    split: f"{_HELLASWAG}/hellaswag_{split}.jsonl" for split in ("train", "val")
}
N_ENDINGS = 4


class Encoder(Protocol):
    """Anything with `encode(text) -> list[int]`: a `BPETokenizer` or a test stub."""

    def encode(self, text: str) -> list[int]: ...


class Tokenizer(Protocol):
    """Anything with a byte vocabulary and special tokens: a `BPETokenizer`."""

    vocab: list[bytes]
    special_tokens: dict[str, int]


def evaluate_loss(
    model: nn.Module,
    tokens: np.ndarray | Tensor,
    context_length: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """Return the mean cross-entropy (nats per token) of `model` on held-out `tokens`.

    The tokens are cut into consecutive windows of `context_length + 1` that overlap by
    one token, so every token after the first is predicted exactly once with as much
    context as its window allows; no randomness, so two runs give the same number. A
    tail shorter than a full window is dropped. `max_batches` stops early (None: all).

    Shapes: tokens (N,) integer ids -> float.
    Raises ValueError if `tokens` holds no full window.
    """
    n_windows = (len(tokens) - 1) // context_length
    if n_windows < 1:
        raise ValueError(
            f"{len(tokens)} tokens hold no window of context_length + 1 = "
            f"{context_length + 1}; pass more tokens or a smaller context_length"
        )
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
        n_windows = min(n_windows, n_batches * batch_size)
    # Copy only the windows used: a memory-mapped shard is never read whole.
    used = np.asarray(tokens[: n_windows * context_length + 1]).astype(np.int64)
    tokens = torch.from_numpy(used)  # (N,)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in tqdm(range(n_batches), desc="val loss", unit="batch", file=sys.stderr,
                      disable=None if progress else True):  # fmt: skip
            starts = range(b * batch_size, min((b + 1) * batch_size, n_windows))
            rows = [
                tokens[s * context_length : (s + 1) * context_length + 1]
                for s in starts
            ]
            batch = torch.stack(rows).to(device)  # (B, T + 1)
            logits = model(batch[:, :-1]).float()  # (B, T, V)
            targets = batch[:, 1:]  # (B, T)
            loss = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum"
            )
            total += loss.item()
            count += targets.numel()
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    """Return exp(loss): the number of equally likely tokens the loss is worth."""
    return math.exp(loss)


def bytes_per_token(tokens: np.ndarray | Tensor, tokenizer: Tokenizer) -> float:
    """Return the mean UTF-8 bytes of text per token of `tokens` (specials count 0).

    Shapes: tokens (N,) integer ids -> float.
    """
    lengths = np.array(
        [len(t) for t in tokenizer.vocab] + [0] * len(tokenizer.special_tokens)
    )
    ids = np.asarray(tokens).astype(np.int64)
    return float(lengths[ids].sum()) / max(len(ids), 1)


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Convert a loss in nats per token into bits per byte of text (eq-bits-per-byte).

    bits/byte = loss / ln 2 / (bytes per token): the same text scores the same whatever
    its tokenizer, so a character-level model and a BPE model compare directly.
    """
    return loss / math.log(2) / bytes_per_token


def load_hellaswag(
    path: str | Path | None = None,
    split: str = "val",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Read HellaSwag examples from the official JSONL; download it if `path` is None.

    Each example keeps the official fields; scoring uses `ctx` (the context, `ctx_a`
    plus `ctx_b`), `endings` (four strings) and `label` (the index of the true ending).
    Raises FileNotFoundError for a missing path, ValueError for an unknown split or a
    line without those fields.
    """
    if path is None:
        if split not in HELLASWAG_URLS:
            raise ValueError(
                f"split={split!r} is not a labelled HellaSwag split; use one of "
                f"{sorted(HELLASWAG_URLS)}"
            )
        from buildllm.data import download_url

        url = HELLASWAG_URLS[split]
        path = download_url(url, cache_dir=cache_dir, progress=progress)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no HellaSwag file at {path}; pass the official hellaswag_{split}.jsonl "
            "or leave the path out to download it"
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_check_example(json.loads(line), f"{path}:{line_no}"))
    return examples


def render_example(
    example: dict, tokenizer: Encoder, context_length: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Turn one example into four token rows (context + ending) and an ending mask.

    Each ending is encoded with a leading space, as it would follow the context in
    running text. Rows are right-padded with id 0 (masked out, never scored). If a row
    is longer than `context_length`, its oldest context tokens are dropped, not the
    ending.

    Shapes: -> tokens (4, T) int64, mask (4, T) bool (True on ending tokens), label int.
    """
    example = _check_example(example, "example")
    ctx = tokenizer.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        row = ctx + end
        if context_length is not None:
            row = row[-context_length:]
        rows.append(row)
        masks.append([False] * (len(row) - len(end)) + [True] * len(end))
    T = max(len(row) for row in rows)
    tokens = torch.zeros(N_ENDINGS, T, dtype=torch.long)  # (4, T)
    mask = torch.zeros(N_ENDINGS, T, dtype=torch.bool)  # (4, T)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = torch.tensor(row_mask)
    return tokens, mask, int(example["label"])


def score_endings(
    model: nn.Module, tokens: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Return each row's summed and mean log-likelihood of its masked (ending) tokens.

    Position t's logits predict token t + 1, so the scores shift the mask by one: the
    first ending token is scored from the last context position. The sum favours short
    endings (fewer negative terms); the mean per token removes that bias (eq-acc-norm).

    Shapes: tokens (R, T), mask (R, T) -> sum (R,), mean (R,).
    """
    logits = model(tokens).float()  # (R, T, V)
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)  # (R, T-1, V)
    picked = log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (R, T-1)
    scored = mask[:, 1:].to(picked.dtype)  # (R, T-1)
    total = (picked * scored).sum(dim=1)  # (R,)
    return total, total / scored.sum(dim=1)  # (R,), (R,)


def evaluate_hellaswag(
    model: nn.Module,
    tokenizer: Encoder,
    examples: Sequence[dict],
    device: str | torch.device = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score `model` on HellaSwag examples; return acc, acc_norm and n.

    `acc_norm` (the number published by llm.c and nanoGPT: GPT-2 124M gets about 0.29)
    picks the ending with the highest mean token log-likelihood; `acc` the highest sum;
    chance is 0.25. The context is truncated to the model's `config.context_length` when
    the model has one. `limit` scores only the first examples (None: all).
    """
    examples = list(examples)[:limit]
    if not examples:
        raise ValueError("no HellaSwag examples to score; pass at least one example")
    config = getattr(model, "config", None)
    context_length = getattr(config, "context_length", None)
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    bar = tqdm(examples, desc="hellaswag", unit="ex", file=sys.stderr,
               disable=None if progress else True)  # fmt: skip
    with torch.no_grad():
        for i, example in enumerate(bar, start=1):
            tokens, mask, label = render_example(example, tokenizer, context_length)
            total, mean = score_endings(model, tokens.to(device), mask.to(device))
            correct += int(total.argmax().item() == label)
            correct_norm += int(mean.argmax().item() == label)
            bar.set_postfix(acc_norm=f"{correct_norm / i:.4f}")
    model.train(was_training)
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def _check_example(example: dict, where: str) -> dict:
    """Return `example` if it has ctx, four endings and a label 0-3; else raise."""
    missing = [key for key in ("ctx", "endings", "label") if key not in example]
    if missing:
        raise ValueError(
            f"{where} lacks the HellaSwag field(s) {missing}; each line needs ctx, "
            "endings (four strings) and label (0-3), as in the official JSONL"
        )
    if len(example["endings"]) != N_ENDINGS or int(example["label"]) not in range(
        N_ENDINGS
    ):
        raise ValueError(
            f"{where} has {len(example['endings'])} endings and label "
            f"{example['label']!r}; HellaSwag needs four endings and a label 0-3"
        )
    return example
