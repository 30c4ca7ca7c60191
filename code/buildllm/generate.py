"""Decoding: from next-token logits to text, greedy to nucleus sampling, KV-cached.

Taught in Chapter 7 (Generation), top to bottom: the logit filters (temperature, top-k,
top-p, min-p, repetition penalty), one sampling step, the decoding loop with and without
the KV cache, batched and streamed generation, and text streaming that decodes UTF-8
split across tokens; `matvec_layout` (Appendix B) stores the weights for fast one-token
steps on a CPU. Past the context the input window slides by half a context in both
paths, so cached and uncached decoding give the same tokens everywhere.
References: Holtzman et al. 2019 (arXiv:1904.09751, top-p); Keskar et al. 2019
(arXiv:1909.05858, repetition penalty); Nguyen et al. 2024 (arXiv:2407.01082, min-p).
"""

from __future__ import annotations

import codecs
import math
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from buildllm.checks import SAMPLING_RULES
from buildllm.model import GPT

if TYPE_CHECKING:
    from buildllm.tokenizer import BPETokenizer


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Keep the `top_k` largest logits of each row and set the others to -inf.

    Tokens tied with the k-th largest logit are kept too, so no arbitrary choice is made
    among equals. Shapes: logits (B, V) -> (B, V). Raises ValueError if top_k < 1.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1; use None to switch it off")
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1), k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))  # (B, V)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability adds up to `top_p`.

    Nucleus sampling (eq-top-p): a token survives if the tokens more likely than it hold
    less than `top_p` of the mass, so the most likely token always survives.
    Shapes: logits (B, V) -> (B, V). Raises ValueError unless 0 < top_p <= 1.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; use None to switch it off")
    if top_p == 1.0:  # everything; the cumulative sum could round below 1 and drop some
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits.float(), dim=-1)  # (B, V), decreasing
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V), mass of likelier tokens
    drop_sorted = mass_before >= top_p  # (B, V), in sorted order
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V), back in vocab order
    return logits.masked_fill(drop, float("-inf"))  # (B, V)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens less likely than `min_p` times the most likely token of their row.

    p_i >= min_p · p_max is log-linear, logit_i >= max logit + ln(min_p), so no softmax
    is needed. Shapes: logits (B, V) -> (B, V). Raises ValueError unless 0 < min_p <= 1.
    """
    if not 0.0 < min_p <= 1.0:
        raise ValueError(f"min_p={min_p} must be in (0, 1]; use None to switch it off")
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))  # (B, V)


def apply_repetition_penalty(logits: Tensor, idx: Tensor, penalty: float) -> Tensor:
    """Make every token that already occurs in `idx` less likely (CTRL's penalty).

    A seen token's logit is divided by `penalty` when positive and multiplied by it when
    negative, so `penalty > 1` always lowers it; 1 changes nothing.

    Shapes: logits (B, V), idx (B, T) -> (B, V).
    """
    seen = torch.gather(logits, -1, idx)  # (B, T), logits of the tokens already there
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)  # (B, T)
    return logits.scatter(-1, idx, seen)  # (B, V)


def sample_next(
    logits: Tensor,
    idx: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token of every row from its logits.

    The repetition penalty lowers the tokens of `idx`; then `temperature=0` is greedy
    (argmax), and otherwise the logits are divided by the temperature (eq-temperature),
    filtered by top-k, top-p and min-p (None is off), and a token is drawn from their
    softmax with `generator` (seed it to reproduce a run).
    Shapes: logits (B, V), idx (B, T) the tokens so far -> (B,) int64.
    Raises ValueError for a negative temperature.
    """
    if repetition_penalty != 1.0 and idx is not None:
        logits = apply_repetition_penalty(logits, idx, repetition_penalty)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V), eq-temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def slide_window(start: int, seq_len: int, context_length: int) -> int:
    """Return where the model's input window starts once the sequence has `seq_len` tokens.

    The window is `tokens[start:seq_len]`. While it fits the context it stays put; when it
    would hold more than `context_length` tokens it jumps to keep the newest half context,
    so a cached decoder re-encodes half a context once every half context of tokens.
    """
    if seq_len - start <= context_length:
        return start
    return seq_len - max(1, context_length // 2)


@torch.no_grad()
def matvec_layout(model: nn.Module) -> nn.Module:
    """Store every Linear weight with out >= in transposed in memory, for CPU decoding.

    Decoding one token multiplies each weight matrix by one vector, so its time is the
    time to read the matrices. nn.Linear keeps W as (out, in), rows contiguous; on the
    CPU of our benchmarks (MKL on AMD EPYC) the matrix-vector product reads a matrix
    whose longer side is contiguous up to twice as fast (Appendix B). Each such
    weight is copied to (in, out) storage and kept as a transposed view: the values,
    shapes, parameters and a tied head stay the same, only the strides change. A no-op
    off the CPU. Returns `model`, changed in place; meant for a model you decode with.
    """
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            continue
        weight = module.weight  # (out, in)
        if weight.shape[0] >= weight.shape[1] and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()  # (out, in), column-major
    return model


@torch.inference_mode()
def decode(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    **sampling: Any,
) -> Iterator[Tensor]:
    """Yield the next token of every row, one decoding step at a time.

    With `use_cache` the window is encoded once and each step feeds only the newest token
    (eq-kv-cache); without, every step encodes the whole window again. `sampling` goes to
    `sample_next`. Shapes: idx (B, T) -> yields (B,) int64, `max_new_tokens` times.
    """
    batch_size, seq_len = idx.shape
    context_length = model.config.context_length
    tokens = torch.cat([idx, idx.new_empty(batch_size, max_new_tokens)], 1)  # (B, T+N)
    start = max(0, seq_len - context_length)  # the model sees tokens[:, start:seq_len]
    cache_len = min(context_length, seq_len - start + max_new_tokens)
    cache = model.new_kv_cache(batch_size, cache_len) if use_cache else None
    logits = model(tokens[:, start:seq_len], kv_cache=cache)[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        next_token = sample_next(logits, tokens[:, :seq_len], **sampling)  # (B,)
        tokens[:, seq_len] = next_token
        seq_len += 1
        yield next_token
        if step == max_new_tokens - 1:
            break
        new_start = slide_window(start, seq_len, context_length)
        if cache is not None and new_start == start:  # only the newest token is new
            logits = model(tokens[:, seq_len - 1 : seq_len], kv_cache=cache)[:, -1]
            continue
        start = new_start  # no cache, or the window slid: encode the whole window
        if cache is not None:
            cache.reset()
        logits = model(tokens[:, start:seq_len], kv_cache=cache)[:, -1]  # (B, V)


def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Collection[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue every row of `idx` by up to `max_new_tokens` tokens.

    Decoding stops early once every row has produced one of `stop_tokens`; a row that
    stopped repeats its stop token until the others finish. The model is put in eval
    mode for the call. See `sample_next` for the sampling arguments.
    Shapes: idx (B, T) -> (B, T + N), N <= max_new_tokens.
    Raises ValueError for an empty prompt or bad sampling arguments.
    """
    check_decoding(model, idx, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty)  # fmt: skip
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
    new_tokens: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        steps = decode(
            model, idx, max_new_tokens, use_cache, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, generator=generator,
        )  # fmt: skip
        for next_token in steps:
            if len(stop) and new_tokens:
                next_token = torch.where(done, new_tokens[-1], next_token)  # (B,)
            new_tokens.append(next_token)
            if len(stop):
                done |= torch.isin(next_token, stop)
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    if not new_tokens:
        return idx
    return torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1)  # (B, T + N)


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    **kwargs: Any,
) -> list[list[int]]:
    """Continue prompts of different lengths; return each prompt's new tokens.

    Prompts of equal length decode together as one batch; each length is its own batch,
    which is exact (no padding reaches the model) at the price of one batch per length.
    A completion ends before its first stop token. `kwargs` go to `generate`; with a
    generator the draws depend on the batching, so seed per call to reproduce a run.
    """
    stop_tokens = set(kwargs.get("stop_tokens", ()))
    device = next(model.parameters()).device
    completions: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in by_length.items():
        idx = torch.tensor([list(prompts[i]) for i in rows], device=device)  # (b, T)
        out = generate(model, idx, max_new_tokens, **kwargs)[:, length:]  # (b, N)
        for i, new in zip(rows, out.tolist()):
            cut = next((j for j, t in enumerate(new) if t in stop_tokens), len(new))
            completions[i] = new[:cut]
    return completions


def stream(
    model: GPT,
    prompt: Sequence[int] | Tensor,
    max_new_tokens: int,
    stop_tokens: Collection[int] = (),
    **kwargs: Any,
) -> Iterator[int]:
    """Yield the tokens that continue one prompt as soon as each is sampled.

    Stops after `max_new_tokens` tokens or after yielding a token of `stop_tokens`.
    `kwargs` are those of `generate` (sampling, `use_cache`, `generator`).
    Shapes: prompt (T,) or (1, T) ids.
    """
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt, dtype=torch.long, device=device)
    idx = idx.reshape(1, -1)  # (1, T)
    sampling = {k: v for k, v in kwargs.items() if k in SAMPLING_RULES}
    check_decoding(model, idx, max_new_tokens=max_new_tokens, **sampling)
    was_training = model.training
    model.eval()
    try:
        for next_token in decode(model, idx, max_new_tokens, **kwargs):
            token = int(next_token[0])
            yield token
            if token in stop_tokens:
                return
    finally:
        model.train(was_training)


def stream_text(
    model: GPT,
    tokenizer: BPETokenizer,
    prompt: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    stop_tokens: Collection[int] | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the text that continues `prompt` as it is generated, piece by piece.

    Token bytes go through an incremental UTF-8 decoder, so a character split across
    tokens appears whole once its last byte arrives (invalid bytes become U+FFFD). Text
    ends before the first of the `stop` strings; text that could begin one is held back
    until it is ruled out. `stop_tokens` default to the tokenizer's end-of-text token and
    are not printed. `kwargs` are those of `generate`.
    """
    if stop_tokens is None:
        stop_tokens = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    ids = tokenizer.encode(prompt, allowed_special="all") or eot  # "" starts a text
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, longest = "", 0, max((len(s) for s in stop), default=0)
    for token in stream(model, ids, max_new_tokens, stop_tokens, **kwargs):
        final = token in stop_tokens  # flush the decoder; never print the stop token
        text += utf8.decode(b"" if final else token_bytes(tokenizer, token), final)
        hits = [i for s in stop if (i := text.find(s, max(0, emitted - longest))) >= 0]
        if hits:
            yield text[emitted : min(hits)]
            return
        safe = len(text) - held_back(text, stop)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text += utf8.decode(b"", final=True)
    if len(text) > emitted:
        yield text[emitted:]


def held_back(text: str, stop: Sequence[str]) -> int:
    """Return how many trailing characters of `text` could be the start of a stop string."""
    for n in range(min(len(text), max((len(s) - 1 for s in stop), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


def token_bytes(tokenizer: BPETokenizer, token: int) -> bytes:
    """Return the bytes of one token (a piece of UTF-8, possibly not a whole character).

    Ordinary tokens are `tokenizer.vocab[token]`; a special token is its own text. A
    model may have more ids than its tokenizer (a 4096-id model trained on data of a
    smaller vocabulary): an id the tokenizer lacks shows as U+FFFD.
    """
    if 0 <= token < len(tokenizer.vocab):
        return tokenizer.vocab[token]
    if token >= tokenizer.vocab_size:
        return "\ufffd".encode()
    return tokenizer.decode([token]).encode("utf-8")


def decode_tokens(tokenizer: BPETokenizer, ids: Sequence[int]) -> str:
    """Return the text of generated `ids`, as `token_bytes` shows each of them."""
    return b"".join(token_bytes(tokenizer, i) for i in ids).decode(errors="replace")


def check_decoding(model: GPT, idx: Tensor, **settings: float | None) -> None:
    """Raise ValueError, naming the fix, for arguments no decoding step could accept.

    `settings` are `max_new_tokens` and the sampling arguments, checked by
    `SAMPLING_RULES`. A prompt longer than the context is not an error: decoding keeps
    its last context_length tokens, and this warns that the model will not see the rest.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"the prompt has shape {tuple(idx.shape)} but decoding needs (batch_size, T) "
            "with T >= 1; start an empty prompt with the end-of-text token"
        )
    for name, value in settings.items():
        SAMPLING_RULES[name].check(name, value)
    context_length = model.config.context_length
    if idx.shape[1] > context_length:
        warnings.warn(
            f"the prompt has {idx.shape[1]} tokens but context_length={context_length}; "
            f"the model sees only its last {context_length}",
            stacklevel=3,
        )
