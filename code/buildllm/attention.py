"""Causal self-attention: written out and via SDPA, with RoPE, GQA and a KV cache.

Taught in Chapter 4 (Self-Attention), top to bottom. Like GPT-2, one fused projection
makes Q, K and V (one matmul instead of three); beyond GPT-2: optional rotary position
embeddings (RoPE), grouped-query attention (fewer key/value heads than query heads) and
a preallocated KV cache whose position the model, not the layer, advances.
References: Vaswani et al. 2017 (arXiv:1706.03762); Su et al. 2021 (arXiv:2104.09864);
Ainslie et al. 2023 (arXiv:2305.13245).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from buildllm.checks import check_positions

Impl = Literal["manual", "fast"]
Pairing = Literal["half", "interleaved"]


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """Return the causal mask for `T` new queries that follow `S - T` cached positions.

    Query `i` is at absolute position `S - T + i`; it may attend keys `0 .. S - T + i`.
    True means "may attend", as in `F.scaled_dot_product_attention`.

    Shapes: -> (T, S), bool.
    """
    q_pos = torch.arange(S - T, S, device=device)  # (T,)
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (T, S)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """Return the causal attention weights softmax(QKᵀ/√d_k + M), eq-attention.

    Row `i` holds how much query `i` takes from each key; masked keys get exactly 0.
    An extra boolean `mask` (True = may attend, e.g. `padding_mask`) is combined with
    the causal mask: a key must be allowed by both. A query it leaves no key at all
    gets a row of zeros, as SDPA gives, instead of the softmax's NaN.
    Shapes: q (B, H, T, Dh), k (B, H, S, Dh), mask broadcastable to (B, H, T, S)
    -> (B, H, T, S), rows summing to 1 (or 0).
    """
    T, S, Dh = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (B, H, T, S)
    allowed = causal_mask(T, S, q.device)  # (T, S), True = may attend
    if mask is not None:
        allowed = allowed & mask  # (B or 1, H or 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, T, S)
    attn_weights = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    if mask is not None:  # a row of -inf only: NaN -> 0 (e.g. a left-padding query)
        attn_weights = attn_weights.masked_fill(~allowed, 0.0)
    return attn_weights


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    impl: Impl = "manual",
    dropout_p: float = 0.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Compute causal scaled dot-product attention, eq-attention, for every head.

    "manual" writes out scores, mask, softmax and the weighted sum of values; "fast"
    calls `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs).
    With fewer key/value heads than query heads (GQA) each K/V head serves `H // Hkv`
    query heads. The T queries are the last T of the S keys (a KV cache holds S - T).
    An optional boolean `mask` (True = may attend, as SDPA's) is combined with the
    causal mask, e.g. `padding_mask` to hide padding keys; a query left with no key
    (left padding) outputs zeros on both paths.

    Shapes: q (B, H, T, Dh), k and v (B, Hkv, S, Dh), mask broadcastable to
    (B, H, T, S) -> (B, H, T, Dh).
    Raises ValueError if H is not a multiple of Hkv or T > S.
    """
    H, T = q.shape[1], q.shape[2]
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv != 0 or T > S:
        raise ValueError(
            f"cannot attend {H} query heads over {T} positions to {Hkv} key/value "
            f"heads over {S} positions; H must be a multiple of Hkv and T <= S"
        )
    if Hkv != H:  # GQA: repeat each K/V head for its group of query heads
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
        v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
    if impl == "fast" and mask is not None:  # SDPA takes one mask: combine them
        mask = causal_mask(T, S, q.device) & mask  # (B or 1, H or 1, T, S)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p
        )  # (B, H, T, Dh)
    if impl == "fast":
        # SDPA's is_causal aligns the mask top-left, right only when T == S; a cached
        # chunk (1 < T < S) needs the offset mask, and a single query needs none.
        causal = None if T in (1, S) else causal_mask(T, S, q.device)  # (T, S)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal, dropout_p=dropout_p, is_causal=1 < T == S
        )  # (B, H, T, Dh)
    attn_weights = attention_weights(q, k, mask)  # (B, H, T, S)
    if dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p)
    return attn_weights @ v  # (B, H, T, Dh), eq-attention


def padding_mask(lengths: Tensor, S: int) -> Tensor:
    """Return the mask that lets every query attend only the first `lengths[b]` keys.

    For a batch of sequences padded on the right to `S` positions: True marks a real
    token (may attend), False padding. Pass it as `mask` to `attention` or `GPT`.

    Shapes: lengths (B,) integer -> (B, 1, 1, S), bool (broadcast over heads, queries).
    """
    keys = torch.arange(S, device=lengths.device)  # (S,)
    return (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


def make_dropout(p: float) -> nn.Module:
    """Return `nn.Dropout(p)`, or for p = 0 an `nn.Identity`, which costs less per call.

    Decoding calls the model's dropout modules at every step, in eval mode too.
    """
    return nn.Dropout(p) if p > 0 else nn.Identity()


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """Split the last dimension into `n_heads` heads and move heads before positions.

    Shapes: x (B, T, n_heads * Dh) -> (B, n_heads, T, Dh).
    """
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: Tensor) -> Tensor:
    """Undo `split_heads`: concatenate the heads of every position.

    Shapes: x (B, H, T, Dh) -> (B, T, H * Dh).
    """
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


class RoPE(nn.Module):
    """Rotary position embedding: turn pairs of q/k features by angles set by position.

    Pair `i` of a head turns by angle `p * rope_base ** (-2i / Dh)` at position `p`, so
    q·k depends only on the distance between positions (eq-rope). `pairing="half"` pairs
    feature `i` with `i + Dh/2` (GPT-NeoX, Hugging Face Llama: two contiguous slices,
    cheap and compatible with their checkpoints); `"interleaved"` pairs `2i` with `2i+1`
    (the paper and Meta's original Llama). The two are the same rotation applied to
    permuted features, so a model trained with one is wrong read with the other.
    """

    def __init__(
        self,
        head_dim: int,
        context_length: int,
        rope_base: float = 10000.0,
        pairing: Pairing = "half",
    ) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates feature pairs but head_dim={head_dim} is odd; "
                "choose d_model and n_heads so that d_model / n_heads is even"
            )
        if pairing not in ("half", "interleaved"):
            raise ValueError(f"pairing={pairing!r} must be 'half' or 'interleaved'")
        self.pairing = pairing
        self.context_length = context_length
        inv_freq = rope_base ** (-torch.arange(0, head_dim, 2).double() / head_dim)
        angles = torch.outer(
            torch.arange(context_length).double(), inv_freq
        )  # (Tmax, Dh/2)
        # Not persistent: derived from the config, so not part of checkpoints.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(
        self, x: Tensor, start: int = 0, positions: Tensor | None = None
    ) -> Tensor:
        """Rotate the features of positions `start .. start + T - 1`, or of `positions`.

        `positions` (integer, (T,) or (B, T)) names each token's position instead, e.g.
        for a left-padded batch whose rows start at different positions.
        Shapes: x (B, H, T, Dh) -> (B, H, T, Dh).
        Raises ValueError if a position is negative or runs past context_length.
        """
        B, T = x.shape[0], x.shape[-2]
        if positions is None and start + T > self.context_length:
            raise ValueError(
                f"RoPE asked for positions {start}..{start + T - 1} but its tables "
                f"stop at context_length={self.context_length}; build a longer context"
            )
        if positions is not None:
            check_positions(positions, B, T, self.context_length)
        rows = slice(start, start + T) if positions is None else positions
        cos = self.cos[rows].to(x.dtype)  # (T, Dh/2) or, per batch row, (B, T, Dh/2)
        sin = self.sin[rows].to(x.dtype)  # (T, Dh/2) or (B, T, Dh/2)
        if cos.dim() == 3:  # one set of positions per row: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh/2)
        if self.pairing == "half":
            x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, Dh/2) each
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return rotated.flatten(-2)  # (B, H, T, Dh), pairs back in place


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    `update(layer_idx, k, v)` writes the new positions at `length` and returns all
    stored so far; it does not move `length`. The model calls `advance(T)` once after
    its last block, so all layers of one forward see the same `length`.

    Shapes: storage (n_layers, B, Hkv, max_len, Dh).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k`, `v` at positions `length .. length + T - 1`; return all positions.

        Shapes: k, v (B, Hkv, T, Dh) -> k_all, v_all (B, Hkv, length + T, Dh), k.dtype.
        Raises ValueError if the cache would overflow max_len.
        """
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.length} positions and max_len={self.max_len}, "
                f"so {T} more do not fit; crop the sequence or call reset()"
            )
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]  # (B, Hkv, max_len, Dh)
        k_layer[:, :, self.length : end] = k
        v_layer[:, :, self.length : end] = v
        k_all, v_all = k_layer[:, :, :end], v_layer[:, :, :end]  # (B, Hkv, S, Dh)
        if k_all.dtype != k.dtype:  # e.g. a float32 cache under bf16 autocast
            k_all, v_all = k_all.to(k.dtype), v_all.to(v.dtype)
        return k_all, v_all

    def advance(self, T: int) -> None:
        """Move `length` past the `T` positions every layer has just stored."""
        self.length += T

    def reset(self) -> None:
        """Forget every stored position (the storage is reused, not freed)."""
        self.length = 0


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE, GQA and KV cache.

    Two projections (nn.Linear, weights (out, in)): `w_qkv` stacks W_Q, W_K and W_V,
    so one matmul makes queries (`n_heads` heads), keys and values (`n_kv_heads`
    heads each, default `n_heads`: plain multi-head attention); `w_o` mixes the heads.
    `impl` selects the written-out `attention` ("manual") or SDPA ("fast").
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        context_length: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rope: RoPE | None = None,
        impl: Impl = "fast",
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads != 0 or n_heads % n_kv_heads != 0:
            raise ValueError(
                f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
                "d_model must be a multiple of n_heads, and n_heads of n_kv_heads"
            )
        if impl not in ("manual", "fast"):
            raise ValueError(f"impl={impl!r} must be 'manual' or 'fast'")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.context_length = context_length
        self.dropout = dropout
        self.impl: Impl = impl
        self.layer_idx = layer_idx
        d_kv = n_kv_heads * self.head_dim
        self.qkv_sizes = [d_model, d_kv, d_kv]  # the widths of Q, K and V in w_qkv
        self.w_qkv = nn.Linear(d_model, d_model + 2 * d_kv, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = make_dropout(dropout)
        self.rope = rope

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Let every position gather information from itself and earlier positions.

        Shapes: x (B, T, D) -> (B, T, D). With a cache, the T new positions follow the
        kv_cache.length positions already stored and attend to all of them. `mask`
        (True = may attend, broadcastable to (B, H, T, S)) also hides keys, such as
        padding; `positions` ((T,) or (B, T)) overrides the positions RoPE rotates by.
        """
        q, k, v = self.w_qkv(x).split(self.qkv_sizes, dim=-1)  # (B, T, D), (B, T, Dkv)
        q = split_heads(q, self.n_heads)  # (B, H, T, Dh)
        k = split_heads(k, self.n_kv_heads)  # (B, Hkv, T, Dh)
        v = split_heads(v, self.n_kv_heads)  # (B, Hkv, T, Dh)
        start = 0 if kv_cache is None else kv_cache.length
        if self.rope is not None:  # positions start..start+T-1, or `positions`
            q, k = self.rope(q, start, positions), self.rope(k, start, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, Dh), S = start+T
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, self.impl, p, mask)  # (B, H, T, Dh)
        return self.resid_dropout(self.w_o(merge_heads(y)))  # (B, T, D)
