"""The GPT: configuration, presets, norms, MLP, transformer block, model and its counts.

Taught in Chapter 3 (the architecture) and Chapter 5 (the transformer block). One
`GPTConfig` covers GPT-2 (LayerNorm, GELU, learned positions, biases, tied head) and a
modern style (RMSNorm, SwiGLU, RoPE, no biases, untied head, grouped-query attention).
Norms and activations call PyTorch's fused kernels (one op each, which matters when
decoding one token at a time); Appendix A writes them out and derives their gradients.
References: Radford et al. 2019 (GPT-2); Zhang & Sennrich 2019 (arXiv:1910.07467,
RMSNorm); Shazeer 2020 (arXiv:2002.05202, SwiGLU); Chowdhery et al. 2022 (PaLM, FLOPs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from buildllm.attention import (
    Impl,
    KVCache,
    MultiHeadAttention,
    Pairing,
    RoPE,
    make_dropout,
)
from buildllm.checks import (
    MODEL_RULES,
    check_fields,
    check_positions,
    check_token_ids,
)

# SwiGLU's hidden width 8d/3 rounded up to a multiple of 64, which GPU matmuls like.
SWIGLU_MULTIPLE = 64

_TINY = {"vocab_size": 4096, "context_length": 128, "d_model": 128, "n_layers": 4}
_MODERN = {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False}
_MODERN["tie_embeddings"] = False
PRESETS: dict[str, dict[str, Any]] = {
    # What the book trains on 2 CPU cores in a few minutes.
    "tiny": {**_TINY, "n_heads": 4},
    # GPT-2 small: the defaults of GPTConfig.
    "gpt2-124m": {},
    "modern": {**_MODERN, "n_kv_heads": 4},
    "modern-tiny": {**_TINY, **_MODERN, "n_heads": 4, "n_kv_heads": 2},
}


@dataclass(frozen=True)
class GPTConfig:
    """Every hyperparameter of the model; defaults are GPT-2 small (124M).

    `d_ff=None` becomes 4·d_model for GELU and 8·d_model/3 (rounded up to a multiple of
    64, keeping the parameter count of a 4·d_model GELU MLP) for SwiGLU; the resolved
    value is stored, so `dataclasses.replace(config, d_model=...)` keeps the old d_ff.
    Raises ValueError for an inconsistent combination, naming the fix.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: one K/V head per query head (no GQA)
    d_ff: int | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    pos: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    rope_pairing: Pairing = "half"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0  # GPT-2 used 0.1; off for pretraining on lots of data
    norm_eps: float = 1e-5
    attn_impl: Impl = "fast"

    def __post_init__(self) -> None:
        check_fields(self, MODEL_RULES)  # integers >= 1, dropout in [0, 1), ...
        if self.d_model % self.n_heads != 0:
            nearest = max(h for h in range(1, self.n_heads) if self.d_model % h == 0)
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}, "
                f"so heads cannot split it evenly; use n_heads={nearest} "
                f"or a d_model that is a multiple of {self.n_heads}"
            )
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if n_kv < 1 or self.n_heads % n_kv != 0:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}, so "
                "each key/value head serves a whole group of query heads"
            )
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates pairs but head_dim={self.head_dim} is odd; "
                "choose d_model / n_heads even"
            )
        if self.d_ff is None:
            d_ff, m = 4 * self.d_model, SWIGLU_MULTIPLE
            if self.mlp == "swiglu":  # 2/3 of 4d, so 3 matrices cost what 2 did
                d_ff = m * math.ceil(8 * self.d_model / (3 * m))
            object.__setattr__(self, "d_ff", d_ff)  # frozen: resolve the default once

    @property
    def head_dim(self) -> int:
        """Width of one attention head, d_k = d_model / n_heads."""
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """Build preset `name` with `overrides`; ValueError for an unknown name."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


class LayerNorm(nn.Module):
    """Normalise each position to zero mean and unit variance, then scale and shift.

    y = (x - mean) / sqrt(var + eps) * weight + bias (eq-layernorm) over the last dim,
    with the biased variance. `F.layer_norm` computes it in one pass, accumulating in
    float32 for bf16 inputs; Appendix A writes it out op by op (`backprop.py`).
    Shapes: x (..., D) -> (..., D).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Normalise every position. Shapes: x (..., D) -> (..., D)."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Scale each position to unit root-mean-square, then by a learned gain.

    y = x / sqrt(mean(x²) + eps) * weight (eq-rmsnorm): LayerNorm without centring or
    shift, computed by `F.rms_norm`. Shapes: x (..., D) -> (..., D).
    """

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise every position. Shapes: x (..., D) -> (..., D)."""
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MLP(nn.Module):
    """The position-wise feed-forward network: GELU MLP or SwiGLU.

    "gelu": w_down(gelu(w_up x)) (eq-mlp) with GPT-2's tanh approximation of GELU
    (eq-gelu, Hugging Face's "gelu_new"); "swiglu": w_down(silu(w_gate x) * w_up x)
    (eq-swiglu), three matrices instead of two. Shapes: x (B, T, D) -> (B, T, D).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.w_up = nn.Linear(d_model, d_ff, bias=bias)
        self.w_gate = nn.Linear(d_model, d_ff, bias=bias) if mlp == "swiglu" else None
        self.w_down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = make_dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Transform every position on its own. Shapes: x (B, T, D) -> (B, T, D)."""
        if self.w_gate is None:
            h = F.gelu(self.w_up(x), approximate="tanh")  # (B, T, F), eq-gelu
        else:
            h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, F), eq-swiglu
        return self.dropout(self.w_down(h))  # (B, T, D)


class TransformerBlock(nn.Module):
    """One pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)) (eq-block)."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        c = config
        self.norm1 = make_norm(c)
        rope = None
        if c.pos == "rope":
            rope = RoPE(c.head_dim, c.context_length, c.rope_base, c.rope_pairing)
        self.attn = MultiHeadAttention(
            c.d_model, c.n_heads, c.context_length, c.n_kv_heads, c.bias, c.dropout,
            rope, c.attn_impl, layer_idx,
        )  # fmt: skip
        self.norm2 = make_norm(c)
        self.mlp = MLP(c.d_model, c.d_ff, c.mlp, c.bias, c.dropout)

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Shapes: x (B, T, D) -> (B, T, D); the rest as in `MultiHeadAttention`."""
        x = x + self.attn(self.norm1(x), kv_cache, mask, positions)  # residual
        return x + self.mlp(self.norm2(x))  # residual around the MLP


class GPT(nn.Module):
    """A decoder-only GPT: embeddings, `n_layers` blocks, final norm, LM head.

    `forward(idx, kv_cache=None)` always returns logits for every position; the loss is
    computed outside (optim.cross_entropy). With a cache, the positions continue at
    `kv_cache.length` and the model advances the cache once after its last block.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        learned = c.pos == "learned"
        self.pos_emb = nn.Embedding(c.context_length, c.d_model) if learned else None
        self.dropout = make_dropout(c.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c, i) for i in range(c.n_layers))
        self.final_norm = make_norm(c)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, D) matrix, two uses
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialise every parameter as GPT-2 does.

        - `tok_emb`, `pos_emb`, untied `lm_head`, every Linear weight: normal(0, std).
        - the residual projections `attn.w_o` and `mlp.w_down`: normal(0, std/√(2·L)),
          because each of the 2·L residual branches adds to the same stream (eq-init).
        - every bias: 0; norm weights 1 and biases 0 (the identity at the start).
        """
        scaled = std / math.sqrt(2 * self.config.n_layers)  # eq-init
        for name, p in self.named_parameters():  # a tied matrix comes once
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.w_o.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=scaled)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        idx: Tensor,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Return next-token logits at every position of `idx`.

        `mask` (bool, True = may attend, broadcastable to (B, H, T, S); e.g.
        `attention.padding_mask`) hides keys on top of the causal mask in every block.
        `positions` (integer, (T,) or (B, T)) gives each token's position instead of
        start .. start + T - 1, e.g. for a left-padded batch.
        Shapes: idx (B, T) integer -> logits (B, T, V).
        Raises TypeError for non-integer ids or positions, ValueError for a bad shape or
        when the positions (after the cache's) run past context_length.
        """
        start = 0 if kv_cache is None else kv_cache.length
        check_token_ids(idx, self.config, start)
        B, T = idx.shape
        if positions is not None:
            check_positions(positions, B, T, self.config.context_length)
        x = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:  # rows start .. start + T - 1, or `positions`
            rows = slice(start, start + T) if positions is None else positions
            x = x + self.pos_emb.weight[rows]  # (B, T, D); (T, D) rows broadcast
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, kv_cache, mask, positions)  # (B, T, D)
        if kv_cache is not None:
            kv_cache.advance(T)  # every layer has stored the T new positions
        return self.lm_head(self.final_norm(x))  # (B, T, V)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """Return an empty KV cache on the parameters' device and dtype.

        `max_len` defaults to (and is capped at) context_length. Under bf16 autocast
        build `KVCache(..., dtype=torch.bfloat16)` yourself: no conversions per step.
        """
        c, weight = self.config, self.tok_emb.weight
        max_len = min(max_len or c.context_length, c.context_length)
        return KVCache(
            c.n_layers, batch_size, c.n_kv_heads or c.n_heads, c.head_dim, max_len,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip

    def num_params(self, non_embedding: bool = False) -> int:
        """Count the parameters, a tied matrix once; see `closed_form_num_params`.

        `non_embedding=True` leaves out `tok_emb` and `pos_emb` (an untied `lm_head`, a
        real matmul, stays), the N of scaling laws (Kaplan et al. 2020).
        """
        embeddings = [e.weight for e in (self.tok_emb, self.pos_emb) if e is not None]
        n = count_params(self)
        return n - sum(w.numel() for w in embeddings) if non_embedding else n


def make_norm(config: GPTConfig) -> LayerNorm | RMSNorm:
    """Return the config's norm (LayerNorm has a bias only when config.bias)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.bias)


def count_params(module: nn.Module) -> int:
    """Count the parameters of `module`, each shared (tied) tensor once."""
    return sum(p.numel() for p in module.parameters())


def closed_form_num_params(config: GPTConfig, non_embedding: bool = False) -> int:
    """Count GPT's parameters from the config alone (eq-num-params).

    With D = d_model, F = d_ff, Dkv = n_kv_heads·head_dim, b = 1 if bias else 0,
    n = 2 for LayerNorm with bias else 1 (weight only), m = 3 for SwiGLU else 2::

        block = 2D² + 2·D·Dkv + b·(2D + 2Dkv)       attention
              + m·D·F + b·(F·(m - 1) + D)            MLP
              + 2·n·D                                two norms
        total = V·D + [T_max·D if learned] + L·block + n·D + [V·D if untied]
    """
    c = config
    D, F, V = c.d_model, c.d_ff, c.vocab_size
    d_kv = (c.n_kv_heads or c.n_heads) * c.head_dim
    b = int(c.bias)
    m = 3 if c.mlp == "swiglu" else 2
    n = 2 if c.norm == "layernorm" and c.bias else 1
    attn = 2 * D * D + 2 * D * d_kv + b * (2 * D + 2 * d_kv)
    mlp = m * D * F + b * (F * (m - 1) + D)
    block = attn + mlp + 2 * n * D
    head = 0 if c.tie_embeddings else V * D
    embeddings = V * D + (c.context_length * D if c.pos == "learned" else 0)
    total = embeddings + c.n_layers * block + n * D + head
    return total - embeddings if non_embedding else total


def flops_per_token(
    config: GPTConfig,
    seq_len: int | None = None,
    include_attention: bool = True,
    training: bool = False,
) -> int:
    """Count the matmul FLOPs per token of a forward pass (×3 with `training=True`).

    A (m×k)·(k×n) matmul costs 2mkn FLOPs; per token that is 2 FLOPs per weight of every
    Linear (eq-flops), plus attention's QKᵀ and AV over `seq_len` keys (default
    context_length), counted over the full T×T score matrix as the kernels compute it::

        forward = 2·N_mm + [4·L·T·D]
        N_mm = L·(2D² + 2·D·Dkv + m·D·F) + D·V      (the Linear weights, head included)

    The backward pass costs twice the forward (gradients for inputs and for weights),
    so training = 3·forward. Norms, softmax, biases and embeddings lookups are left out.
    """
    c = config
    T = c.context_length if seq_len is None else seq_len
    D, F = c.d_model, c.d_ff
    d_kv = (c.n_kv_heads or c.n_heads) * c.head_dim
    m = 3 if c.mlp == "swiglu" else 2
    n_matmul = c.n_layers * (2 * D * D + 2 * D * d_kv + m * D * F) + D * c.vocab_size
    forward = 2 * n_matmul + (4 * c.n_layers * T * D if include_attention else 0)
    return 3 * forward if training else forward


def kv_cache_bytes_per_token(config: GPTConfig, bytes_per_number: int = 4) -> int:
    """Return the bytes a KV cache holds per token of one sequence (eq-kv-memory).

    A key and a value of head_dim numbers per layer and key/value head,
    2·L·h_kv·d_k·b, with b = 4 bytes per number in float32 and 2 in bf16.
    """
    n_kv_heads = config.n_kv_heads or config.n_heads
    return 2 * config.n_layers * n_kv_heads * config.head_dim * bytes_per_number
