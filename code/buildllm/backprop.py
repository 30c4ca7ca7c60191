"""Backpropagation by hand: the derivative of every layer of the GPT, written out.

Taught in Appendix A (Backpropagation by Hand), top to bottom. Each layer is a pair:
`xxx_forward(...) -> (out, cache)` computes the output and keeps what the derivative
needs; `xxx_backward(dout, cache)` turns dout = dL/dout into the gradient of every input
and weight (`dx` is dL/dx, shaped like `x`). backprop_model.py chains the pairs through
the whole GPT; tests/test_backprop.py checks each pair against autograd and gradcheck.
References: Rumelhart, Hinton & Williams 1986 (doi:10.1038/323533a0); Ba et al. 2016
(arXiv:1607.06450); Zhang & Sennrich 2019 (arXiv:1910.07467); Shazeer 2020
(arXiv:2002.05202); Su et al. 2021 (arXiv:2104.09864).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from buildllm.attention import Pairing

GELU_COEF = 0.044715  # GPT-2's tanh approximation of GELU (Hendrycks & Gimpel 2016)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, tuple]:
    """Apply out = x W^T + b as nn.Linear does, and keep x for the backward pass.

    Shapes: x (..., in), weight (out, in), bias (out,) or None -> out (..., out).
    """
    out = x @ weight.T  # (..., out)
    if bias is not None:
        out = out + bias
    return out, (x, weight, bias is not None)


def linear_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return dx, dweight and dbias of a linear layer (eq-bp-linear-grad).

    Every leading position of x is one row of a single matrix product, so the weight and
    bias gradients sum over all of them; dbias is None when the layer has no bias.
    Shapes: dout (..., out) -> dx (..., in), dweight (out, in), dbias (out,) or None.
    """
    x, weight, has_bias = cache
    dx = dout @ weight  # (..., in)
    dout_2d = dout.reshape(-1, dout.shape[-1])  # (N, out), N = all leading positions
    x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
    dweight = dout_2d.T @ x_2d  # (out, in)
    dbias = dout_2d.sum(0) if has_bias else None  # (out,)
    return dx, dweight, dbias


def embedding_forward(idx: Tensor, weight: Tensor) -> tuple[Tensor, tuple]:
    """Look up one row of `weight` per id, as nn.Embedding does.

    Shapes: idx (...) int64, weight (V, D) -> out (..., D).
    """
    out = weight[idx]  # (..., D)
    return out, (idx, weight.shape[0])


def embedding_backward(dout: Tensor, cache: tuple) -> Tensor:
    """Return dweight of an embedding lookup by scatter-adding dout into the used rows.

    A row looked up n times receives the sum of its n gradients (eq-bp-embedding-grad);
    rows no id selected get zero. The ids themselves have no gradient.
    Shapes: dout (..., D) -> dweight (V, D).
    """
    idx, vocab_size = cache
    dout_2d = dout.reshape(-1, dout.shape[-1])  # (N, D)
    dweight = dout.new_zeros(vocab_size, dout.shape[-1])  # (V, D)
    dweight.index_add_(0, idx.reshape(-1), dout_2d)  # repeated ids accumulate
    return dweight


def layer_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5
) -> tuple[Tensor, tuple]:
    """Normalise each row to zero mean and unit variance, then scale and shift.

    Matches nn.LayerNorm: the biased variance, eps inside the square root.
    Shapes: x (..., D), weight (D,), bias (D,) or None -> out (..., D).
    """
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    var = (x - mean).square().mean(-1, keepdim=True)  # (..., 1)
    rstd = torch.rsqrt(var + eps)  # (..., 1)
    xhat = (x - mean) * rstd  # eq-bp-layernorm
    out = xhat * weight if bias is None else xhat * weight + bias
    return out, (xhat, rstd, weight, bias is not None)


def layer_norm_backward(
    dout: Tensor, cache: tuple
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return dx, dweight and dbias of LayerNorm (eq-bp-layernorm-grad).

    dx removes from dxhat its mean and its component along xhat: the two directions
    that normalisation erases, scaled by 1/std.
    Shapes: dout (..., D) -> dx (..., D), dweight (D,), dbias (D,) or None.
    """
    xhat, rstd, weight, has_bias = cache
    lead = tuple(range(dout.dim() - 1))  # every dimension but the features
    dweight = (dout * xhat).sum(lead)  # (D,)
    dbias = dout.sum(lead) if has_bias else None  # (D,)
    dxhat = dout * weight  # (..., D)
    dx = rstd * (
        dxhat
        - dxhat.mean(-1, keepdim=True)
        - xhat * (dxhat * xhat).mean(-1, keepdim=True)
    )  # eq-bp-layernorm-grad
    return dx, dweight, dbias


def rms_norm_forward(
    x: Tensor, weight: Tensor, eps: float = 1e-5
) -> tuple[Tensor, tuple]:
    """Divide each row by its root mean square, then scale (no centring, no shift).

    Matches F.rms_norm: eps inside the square root.
    Shapes: x (..., D), weight (D,) -> out (..., D).
    """
    rrms = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # (..., 1)
    xhat = x * rrms  # eq-bp-rmsnorm
    return xhat * weight, (xhat, rrms, weight)


def rms_norm_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor]:
    """Return dx and dweight of RMSNorm (eq-bp-rmsnorm-grad).

    LayerNorm's dx without the mean term, since nothing was centred.
    Shapes: dout (..., D) -> dx (..., D), dweight (D,).
    """
    xhat, rrms, weight = cache
    dweight = (dout * xhat).sum(tuple(range(dout.dim() - 1)))  # (D,)
    dxhat = dout * weight  # (..., D)
    dx = rrms * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))  # (..., D)
    return dx, dweight


def gelu_forward(x: Tensor) -> tuple[Tensor, tuple]:
    """Apply GELU with GPT-2's tanh approximation, F.gelu(x, approximate="tanh").

    Shapes: x (...) -> out (...).
    """
    out = 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + GELU_COEF * x**3)))
    return out, x  # eq-bp-gelu; only x is kept, the backward recomputes the tanh


def gelu_backward(dout: Tensor, cache: tuple) -> Tensor:
    """Return dx of tanh-approximated GELU (eq-bp-gelu-grad); tanh' = 1 - tanh^2.

    Shapes: dout (...) -> dx (...).
    """
    x = cache
    tanh_u = torch.tanh(SQRT_2_OVER_PI * (x + GELU_COEF * x**3))
    du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * x**2)
    dgelu_dx = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * du_dx
    return dout * dgelu_dx


def swiglu_forward(gate: Tensor, up: Tensor) -> tuple[Tensor, tuple]:
    """Gate `up` with SiLU of `gate`: silu(gate) * up, the core of a SwiGLU MLP.

    Shapes: gate (..., F), up (..., F) -> out (..., F).
    """
    out = gate * torch.sigmoid(gate) * up  # eq-bp-swiglu
    return out, (gate, up)  # the backward recomputes the sigmoid


def swiglu_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor]:
    """Return dgate and dup of silu(gate) * up (eq-bp-swiglu-grad); sigmoid' = s(1 - s).

    Shapes: dout (..., F) -> dgate (..., F), dup (..., F).
    """
    gate, up = cache
    sig = torch.sigmoid(gate)
    dup = dout * gate * sig
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    return dgate, dup


def softmax_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """Apply softmax over the last dimension; the cache is the output itself.

    Subtracting the row maximum changes nothing mathematically and avoids overflow;
    a row entry of -inf gets probability 0.
    Shapes: x (..., N) -> probs (..., N).
    """
    exp = (x - x.amax(-1, keepdim=True)).exp()  # (..., N)
    probs = exp / exp.sum(-1, keepdim=True)  # eq-bp-softmax
    return probs, probs


def softmax_backward(dout: Tensor, cache: Tensor) -> Tensor:
    """Return dx of softmax (eq-bp-softmax-grad): p * (dout - <dout, p>) row by row.

    Shapes: dout (..., N) -> dx (..., N).
    """
    probs = cache
    return probs * (dout - (dout * probs).sum(-1, keepdim=True))


def cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, tuple]:
    """Return the mean of -log softmax(logits)[target] over all positions.

    Fused with softmax: log-probabilities come straight from the logits (log-sum-exp),
    and the cache keeps the probabilities that the backward pass needs.
    Shapes: logits (..., V), targets (...) int64 -> loss () scalar.
    """
    logits_2d = logits.reshape(-1, logits.shape[-1])  # (N, V)
    targets_1d = targets.reshape(-1)  # (N,)
    shifted = logits_2d - logits_2d.amax(-1, keepdim=True)  # (N, V)
    log_probs = shifted - shifted.exp().sum(-1, keepdim=True).log()  # (N, V)
    rows = torch.arange(len(targets_1d), device=logits.device)
    loss = -log_probs[rows, targets_1d].mean()  # eq-bp-cross-entropy
    return loss, (log_probs.exp(), targets_1d, logits.shape)


def cross_entropy_backward(dloss: Tensor | float, cache: tuple) -> Tensor:
    """Return dlogits of the mean cross-entropy: (p - y) / N (eq-bp-cross-entropy-grad).

    Shapes: dloss () -> dlogits (..., V), y the one-hot targets, N the positions.
    """
    probs, targets, shape = cache
    dlogits = probs.clone()  # (N, V)
    rows = torch.arange(len(targets), device=probs.device)
    dlogits[rows, targets] -= 1.0  # p - y
    return (dlogits * (dloss / len(targets))).reshape(shape)  # (..., V)


def split_heads_forward(x: Tensor, n_heads: int) -> tuple[Tensor, int]:
    """Split the features of every position into n_heads heads of Dh features.

    The cache is n_heads, all the backward pass needs.
    Shapes: x (B, T, D) -> out (B, H, T, Dh).
    """
    B, T, D = x.shape
    out = x.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # (B, H, T, Dh)
    return out, n_heads


def split_heads_backward(dout: Tensor, cache: int) -> Tensor:
    """Undo the split on the gradient: a reshape only moves numbers, so does its dx.

    Shapes: dout (B, H, T, Dh) -> dx (B, T, D).
    """
    B, H, T, Dh = dout.shape
    return dout.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


def merge_heads_forward(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate the heads of every position: the inverse of split_heads_forward.

    Shapes: x (B, H, T, Dh) -> out (B, T, D).
    """
    return split_heads_backward(x, x.shape[1]), x.shape[1]  # (B, T, D)


def merge_heads_backward(dout: Tensor, cache: int) -> Tensor:
    """Split the gradient back into heads: the backward of a merge is a split.

    Shapes: dout (B, T, D) -> dx (B, H, T, Dh).
    """
    return split_heads_forward(dout, cache)[0]  # (B, H, T, Dh)


def repeat_kv_forward(x: Tensor, n_rep: int) -> tuple[Tensor, int]:
    """Repeat each K/V head n_rep times for grouped-query attention.

    Shapes: x (B, Hkv, T, Dh) -> out (B, Hkv * n_rep, T, Dh).
    """
    return x.repeat_interleave(n_rep, dim=1), n_rep  # (B, H, T, Dh)


def repeat_kv_backward(dout: Tensor, cache: int) -> Tensor:
    """Sum the gradients of the n_rep copies of each K/V head: a copy's dx is a sum.

    Shapes: dout (B, H, T, Dh) -> dx (B, Hkv, T, Dh).
    """
    B, H, T, Dh = dout.shape
    return dout.view(B, H // cache, cache, T, Dh).sum(2)  # (B, Hkv, T, Dh)


def attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, tuple]:
    """Apply causal scaled dot-product attention, softmax(QK^T / sqrt(d_k) + M) V.

    Position t attends to positions 0..t only (the mask M is -inf above the diagonal).
    Shapes: q, k, v (B, H, T, Dh) -> out (B, H, T, Dh).
    """
    T, head_dim = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # True: attend
    scores = scores.masked_fill(~mask, float("-inf"))
    attn_weights, _ = softmax_forward(scores)  # (B, H, T, T), zero above the diagonal
    out = attn_weights @ v  # eq-bp-attention, (B, H, T, Dh)
    return out, (q, k, v, attn_weights, scale)


def attention_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Return dq, dk and dv of causal attention (eq-bp-attention-grad).

    The mask needs no backward of its own: masked weights are exactly 0, so the softmax
    backward gives their scores zero gradient.
    Shapes: dout (B, H, T, Dh) -> dq, dk, dv (B, H, T, Dh).
    """
    q, k, v, attn_weights, scale = cache
    dv = attn_weights.transpose(-2, -1) @ dout  # (B, H, T, Dh)
    dattn_weights = dout @ v.transpose(-2, -1)  # (B, H, T, T)
    dscores = softmax_backward(dattn_weights, attn_weights)  # (B, H, T, T)
    dq = (dscores @ k) * scale  # (B, H, T, Dh)
    dk = (dscores.transpose(-2, -1) @ q) * scale  # (B, H, T, Dh)
    return dq, dk, dv


def residual_forward(x: Tensor, branch: Tensor) -> tuple[Tensor, None]:
    """Add a block's branch output to the residual stream: out = x + branch.

    Shapes: x, branch (B, T, D) -> out (B, T, D).
    """
    return x + branch, None


def residual_backward(dout: Tensor, cache: None) -> tuple[Tensor, Tensor]:
    """Return dx and dbranch of an addition: both are dout itself (eq-bp-residual-grad).

    Shapes: dout (B, T, D) -> dx, dbranch (B, T, D).
    """
    return dout, dout


def rope_forward(
    x: Tensor, cos: Tensor, sin: Tensor, pairing: Pairing = "half"
) -> tuple[Tensor, tuple]:
    """Rotate each feature pair (x1_i, x2_i) of q or k by its position's angle.

    As attention.RoPE: "half" pairs feature i with i + Dh/2, "interleaved" 2i with 2i+1.
    Shapes: x (B, H, T, Dh), cos and sin (T, Dh/2) -> out (B, H, T, Dh).
    """
    if pairing == "half":
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, Dh/2) each
    y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos  # eq-bp-rope
    if pairing == "half":
        out = torch.cat([y1, y2], dim=-1)  # (B, H, T, Dh)
    else:
        out = torch.stack([y1, y2], dim=-1).flatten(-2)  # (B, H, T, Dh), pairs in place
    return out, (cos, sin, pairing)


def rope_backward(dout: Tensor, cache: tuple) -> Tensor:
    """Return dx of RoPE: rotate dout back by the opposite angle (eq-bp-rope-grad).

    A rotation matrix is orthogonal, so its transpose, which the chain rule applies to
    the gradient, is its inverse: the same rotation with sin negated.
    Shapes: dout (B, H, T, Dh) -> dx (B, H, T, Dh).
    """
    cos, sin, pairing = cache
    dx, _ = rope_forward(dout, cos, -sin, pairing)
    return dx
