"""The chat format: role tokens, a chat template, the assistant-only loss mask.

Taught in Chapter 10 (Following Instructions), top to bottom. A conversation is a list
of messages `{"role": "system" | "user" | "assistant", "content": str}`. Each message
becomes its role token, its content encoded as plain text and a turn-end token, after
one `<|endoftext|>` that starts the document, as in ChatML (OpenAI 2023) and nanochat.
The role tokens are special tokens appended after the ordinary ids, so no user text can
produce them, and the embedding (and a tied head) grows by their rows. Training targets
are only the assistant's tokens and its turn ends: the rest is input, never predicted.
Conversations people bring are read from Alpaca-style JSON (Taori et al. 2023) or chat
JSONL, local or downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from buildllm.data import download_url
from buildllm.model import GPT
from buildllm.tokenizer import ENDOFTEXT, BPETokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"  # closes every turn; the assistant learns to write it, and stops
CHAT_TOKENS = (*ROLE_TOKENS.values(), END)
IGNORE_INDEX = -100  # a target the loss skips (PyTorch's default ignore_index)

Message = dict[str, str]


def add_chat_tokens(tokenizer: BPETokenizer) -> BPETokenizer:
    """Return a tokenizer with the role and turn-end tokens added after its own ids.

    Ordinary tokens and existing special tokens keep their ids, so a model trained with
    `tokenizer` needs only new embedding rows (`resize_vocab`). Tokens it already has
    are kept as they are, which makes the call idempotent.
    """
    specials, next_id = dict(tokenizer.special_tokens), tokenizer.vocab_size
    for token in CHAT_TOKENS:
        if token not in specials:
            specials[token], next_id = next_id, next_id + 1
    return BPETokenizer(tokenizer.vocab, tokenizer.merges, specials, tokenizer.pattern)


def check_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError or TypeError, naming the message, for a malformed conversation."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TypeError(
                f"message {i} is {message!r}; a message is a dict with a 'role' and a "
                "string 'content'"
            )
        if message.get("role") not in ROLES:
            raise ValueError(
                f"message {i} has role {message.get('role')!r}; use one of {ROLES}"
            )


def render_chat(
    tokenizer: BPETokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Turn a conversation into token ids and the mask of the tokens to learn.

    `mask[i]` is True for the ids of assistant contents and their turn ends, the tokens
    a fine-tuned model must produce. Contents are encoded as plain text: a user who
    types `<|assistant|>` gets the ids of those characters, not the role token. With
    `add_generation_prompt` the ids end with `<|assistant|>`, where the model answers.
    Raises ValueError if the tokenizer lacks the chat tokens (see `add_chat_tokens`).
    """
    check_messages(messages)
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(
            f"the tokenizer has no {missing}; add them with add_chat_tokens(tokenizer) "
            "and grow the model with resize_vocab"
        )
    special = tokenizer.special_tokens
    ids = [special[ENDOFTEXT]] if ENDOFTEXT in special else []
    mask = [False] * len(ids)
    for message in messages:
        content = tokenizer.encode_ordinary(message["content"])
        learn = message["role"] == "assistant"
        ids += [special[ROLE_TOKENS[message["role"]]], *content, special[END]]
        mask += [False] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(special[ROLE_TOKENS["assistant"]])
        mask.append(False)
    return ids, mask


def parse_chat(tokenizer: BPETokenizer, ids: Sequence[int]) -> list[Message]:
    """Turn ids rendered by `render_chat` back into messages.

    A last turn without its turn end (an answer cut short) is kept as it stands; ids
    before the first role token (the document start) are skipped.
    """
    role_of = {tokenizer.special_tokens[t]: r for r, t in ROLE_TOKENS.items()}
    end = tokenizer.special_tokens[END]
    messages: list[Message] = []
    role, content = None, []
    for token in [*ids, end]:
        if token in role_of or token == end:
            if role is not None:
                messages.append({"role": role, "content": tokenizer.decode(content)})
            role, content = role_of.get(token), []
        elif role is not None:
            content.append(token)
    return messages


def loss_targets(ids: Sequence[int], mask: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """Return inputs and next-token targets, IGNORE_INDEX where nothing is learned.

    Position t predicts ids[t + 1], so the target there is kept only if mask[t + 1].
    Shapes: ids and mask of length T + 1 -> x (T,), y (T,) int64.
    """
    tokens = torch.tensor(ids, dtype=torch.long)  # (T + 1,)
    keep = torch.tensor(mask[1:], dtype=torch.bool)  # (T,)
    y = tokens[1:].masked_fill(~keep, IGNORE_INDEX)  # (T,)
    return tokens[:-1], y


def pad_batch(
    examples: Sequence[tuple[Tensor, Tensor]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Stack (x, y) pairs of different lengths, padding on the right.

    Padding after a sequence changes nothing before it in a causal model, so no
    attention mask is needed; its targets are IGNORE_INDEX, so it adds no loss.
    Shapes: pairs of (T_i,) -> x (B, T), y (B, T) with T = max T_i.
    """
    T = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (xi, yi) in enumerate(examples):
        x[row, : len(xi)], y[row, : len(yi)] = xi, yi
    return x, y


def pack_batch(
    examples: Sequence[tuple[Tensor, Tensor]], context_length: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack (x, y) pairs into as few rows of at most `context_length` tokens as fit.

    Rows are filled first-fit, longest pair first. Each pair attends only to its own
    tokens (the returned mask) and its positions start at 0, so its logits are exactly
    those it gets alone or in `pad_batch`: packing only saves the padded positions.
    Shapes: pairs of (T_i,), T_i <= context_length -> x, y, positions (R, T) and
    mask (R, 1, T, T) bool (True = may attend; pass it to GPT with the positions).
    """
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        row = next((r for r, left in enumerate(free) if left >= n), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(context_length)
        rows[row].append(i)
        free[row] -= n
    T = context_length - min(free)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    positions = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    pair = torch.full((len(rows), T), -1)  # (R, T): which pair a token is; -1 padding
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            xi, yi = examples[i]
            span = slice(at, at + len(xi))
            x[r, span], y[r, span], pair[r, span] = xi, yi, i
            positions[r, span] = torch.arange(len(xi))
            at += len(xi)
    mask = pair[:, None, :, None] == pair[:, None, None, :]  # (R, 1, T, T)
    return x, y, positions, mask


@torch.no_grad()
def resize_vocab(model: GPT, vocab_size: int) -> GPT:
    """Return a copy of `model` with room for `vocab_size` tokens, old rows unchanged.

    New rows of the token embedding (and of an untied head) start at the mean of the
    old rows: a new token's logit then starts at the average logit instead of
    dominating the softmax (Hewitt 2021, "Initializing new word embeddings"). A tied
    head stays tied. Raises ValueError if `vocab_size` would drop tokens.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the model's {old}; resizing only "
            f"adds rows, so pass vocab_size >= {old}"
        )
    device = model.tok_emb.weight.device
    grown = GPT(replace(model.config, vocab_size=vocab_size)).to(device)
    state = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):
        rows = state[name]  # (V_old, D)
        mean = rows.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
        state[name] = torch.cat([rows, mean])  # (V, D)
    grown.load_state_dict(state)
    return grown.train(model.training)


def fit_context(
    tokenizer: BPETokenizer, messages: Sequence[Message], max_tokens: int
) -> tuple[list[Message], int]:
    """Drop the oldest turns until the rendered conversation fits in `max_tokens`.

    A leading system message is kept while it leaves room for the newest message, which
    is always kept, cut to its last tokens if even it alone is too long. Returns (kept
    messages, messages dropped).
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system) :], 0

    def over(kept: list[Message]) -> int:
        ids = render_chat(tokenizer, kept, add_generation_prompt=True)[0]
        return len(ids) - max_tokens

    while len(turns) > 1 and over(system + turns) > 0:
        turns, dropped = turns[1:], dropped + 1
    empty = [{**turns[-1], "content": ""}] if turns else []
    if system and over(system + empty) > 0:  # the system message leaves no room
        system, dropped = [], dropped + 1
    if turns and over(system + turns) > 0:
        ids = tokenizer.encode_ordinary(turns[-1]["content"])
        cut = ids[over(system + turns) :]
        turns[-1] = {**turns[-1], "content": tokenizer.decode(cut)}
    return system + turns, dropped


def _read_records(path: Path, what: str) -> list:
    """Return the records of a JSON list (.json) or of JSON lines (.jsonl)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); check the file") from None
    if not isinstance(records, list):
        raise TypeError(f"{path} must hold a JSON list of records, like Alpaca's")
    return records


def load_alpaca(path: str | Path) -> list[list[Message]]:
    """Read Alpaca-style JSON: a list of {"instruction", "input" (optional), "output"}.

    A non-empty input follows the instruction after a blank line in the user turn.
    Raises ValueError naming the first record that lacks a field.
    """
    conversations = []
    for i, record in enumerate(_read_records(Path(path), "Alpaca")):
        if not isinstance(record, dict) or not {"instruction", "output"} <= set(record):
            raise ValueError(
                f"record {i} of {path} needs 'instruction' and 'output' (and may have "
                "'input'); it is not in Alpaca's format"
            )
        user = "\n\n".join(s for s in (record["instruction"], record.get("input")) if s)
        conversations.append([{"role": "user", "content": user},
                              {"role": "assistant", "content": record["output"]}])  # fmt: skip
    return conversations


def load_chat_jsonl(path: str | Path) -> list[list[Message]]:
    """Read chat JSONL: one {"messages": [{"role", "content"}, ...]} object per line.

    Raises ValueError naming the first line that is not such an object.
    """
    conversations = []
    for i, record in enumerate(_read_records(Path(path), "chat JSONL")):
        messages = record.get("messages") if isinstance(record, dict) else None
        try:
            if not isinstance(messages, list):
                raise TypeError("it has no 'messages' list")
            check_messages(messages)
        except (ValueError, TypeError) as err:
            raise ValueError(f"line {i + 1} of {path}: {err}") from None
        conversations.append(
            [{"role": m["role"], "content": m["content"]} for m in messages]
        )
    return conversations


LOADERS: dict[str, Callable[[str | Path], list[list[Message]]]] = {
    ".json": load_alpaca,
    ".jsonl": load_chat_jsonl,
}


def load_conversations(
    source: str | Path,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[list[Message]]:
    """Read conversations from a file or an http(s) URL (downloaded once, cached).

    ".json" files are Alpaca-style, ".jsonl" files chat JSONL. A URL goes through
    `data.download_url` (cache, sha256, resume) into `cache_dir`. Raises ValueError
    for another suffix.
    """
    text = str(source)
    if "://" in text:
        path = download_url(text, cache_dir, sha256, progress)
    else:
        path = Path(source)
    if path.suffix not in LOADERS:
        raise ValueError(
            f"{source} ends in {path.suffix!r}; use .json (Alpaca) or .jsonl (chat)"
        )
    return LOADERS[path.suffix](path)
