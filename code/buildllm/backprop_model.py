"""Backpropagation by hand through the whole GPT, with the model's own weights.

Taught in Appendix A (Backpropagation by Hand), after the layers of backprop.py. Each
module of model.py gets a forward/backward pair that reads its weights and calls the
layer pairs; `gpt_backward` returns a gradient for every parameter, keyed as
`model.named_parameters()`, equal to what `loss.backward()` puts in `.grad`. Dropout is
not written out: the manual pass refuses a model that would apply it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from buildllm import backprop as bp
from buildllm.attention import MultiHeadAttention
from buildllm.checks import check_token_ids
from buildllm.model import (
    GPT,
    MLP,
    GPTConfig,
    RMSNorm,
    TransformerBlock,
)

# (parameter, gradient) pairs; a tied parameter appears once per use and is summed.
Grads = list[tuple[nn.Parameter, Tensor]]


def linear_layer_forward(layer: nn.Linear, x: Tensor) -> tuple[Tensor, tuple]:
    """Apply `layer` with backprop.linear_forward, reading its weight and bias.

    Shapes: x (..., in) -> out (..., out).
    """
    bias = None if layer.bias is None else layer.bias.detach()
    out, cache = bp.linear_forward(x, layer.weight.detach(), bias)
    return out, (layer, cache)


def linear_layer_backward(dout: Tensor, cache: tuple, grads: Grads) -> Tensor:
    """Append the gradients of `layer`'s weight (and bias) to `grads`; return dx.

    Shapes: dout (..., out) -> dx (..., in).
    """
    layer, cache = cache
    dx, dweight, dbias = bp.linear_backward(dout, cache)
    grads.append((layer.weight, dweight))
    if dbias is not None:
        grads.append((layer.bias, dbias))
    return dx


def norm_forward(norm: nn.Module, x: Tensor) -> tuple[Tensor, tuple]:
    """Apply a LayerNorm or RMSNorm of model.py by hand.

    Shapes: x (..., D) -> out (..., D).
    """
    weight = norm.weight.detach()
    if isinstance(norm, RMSNorm):
        out, cache = bp.rms_norm_forward(x, weight, norm.eps)
    else:
        bias = None if norm.bias is None else norm.bias.detach()
        out, cache = bp.layer_norm_forward(x, weight, bias, norm.eps)
    return out, (norm, cache)


def norm_backward(dout: Tensor, cache: tuple, grads: Grads) -> Tensor:
    """Append the norm's weight (and bias) gradients to `grads`; return dx.

    Shapes: dout (..., D) -> dx (..., D).
    """
    norm, cache = cache
    if isinstance(norm, RMSNorm):
        dx, dweight = bp.rms_norm_backward(dout, cache)
        dbias = None
    else:
        dx, dweight, dbias = bp.layer_norm_backward(dout, cache)
    grads.append((norm.weight, dweight))
    if dbias is not None:
        grads.append((norm.bias, dbias))
    return dx


def attention_layer_forward(
    attn: MultiHeadAttention, x: Tensor
) -> tuple[Tensor, tuple]:
    """Run MultiHeadAttention.forward (no KV cache) through the manual layers.

    Shapes: x (B, T, D) -> out (B, T, D).
    """
    qkv, cache_qkv = linear_layer_forward(attn.w_qkv, x)  # (B, T, D + 2 * Hkv * Dh)
    # Copies, not views: a kept view would keep all of qkv alive (activation_bytes).
    q, k, v = (t.contiguous() for t in qkv.split(attn.qkv_sizes, dim=-1))
    q, _ = bp.split_heads_forward(q, attn.n_heads)  # (B, H, T, Dh)
    k, _ = bp.split_heads_forward(k, attn.n_kv_heads)  # (B, Hkv, T, Dh)
    v, _ = bp.split_heads_forward(v, attn.n_kv_heads)  # (B, Hkv, T, Dh)
    cache_rope = None
    if attn.rope is not None:  # the model's own angle tables, positions 0..T-1
        T, rope = x.shape[1], attn.rope
        cos, sin = rope.cos[:T].to(x.dtype), rope.sin[:T].to(x.dtype)  # (T, Dh/2)
        q, cache_rope = bp.rope_forward(q, cos, sin, rope.pairing)  # (B, H, T, Dh)
        k, _ = bp.rope_forward(k, cos, sin, rope.pairing)  # (B, Hkv, T, Dh)
    n_rep = attn.n_heads // attn.n_kv_heads
    k, _ = bp.repeat_kv_forward(k, n_rep)  # (B, H, T, Dh)
    v, _ = bp.repeat_kv_forward(v, n_rep)  # (B, H, T, Dh)
    y, cache_attn = bp.attention_forward(q, k, v)  # (B, H, T, Dh)
    y, _ = bp.merge_heads_forward(y)  # (B, T, D)
    out, cache_o = linear_layer_forward(attn.w_o, y)  # (B, T, D)
    return out, (attn, cache_qkv, cache_rope, cache_attn, cache_o)


def attention_layer_backward(dout: Tensor, cache: tuple, grads: Grads) -> Tensor:
    """Backward of `attention_layer_forward`: append weight gradients, return dx.

    Q, K and V are slices of one product, so their gradients are concatenated in the
    same order and go back through w_qkv together. Shapes: dout (B, T, D) -> dx (B, T, D).
    """
    attn, cache_qkv, cache_rope, cache_attn, cache_o = cache
    n_rep = attn.n_heads // attn.n_kv_heads
    dy = linear_layer_backward(dout, cache_o, grads)  # (B, T, D)
    dy = bp.merge_heads_backward(dy, attn.n_heads)  # (B, H, T, Dh)
    dq, dk, dv = bp.attention_backward(dy, cache_attn)  # (B, H, T, Dh) each
    dk = bp.repeat_kv_backward(dk, n_rep)  # (B, Hkv, T, Dh)
    dv = bp.repeat_kv_backward(dv, n_rep)  # (B, Hkv, T, Dh)
    if cache_rope is not None:
        dq, dk = bp.rope_backward(dq, cache_rope), bp.rope_backward(dk, cache_rope)
    dq = bp.split_heads_backward(dq, attn.n_heads)  # (B, T, D)
    dk = bp.split_heads_backward(dk, attn.n_kv_heads)  # (B, T, Hkv * Dh)
    dv = bp.split_heads_backward(dv, attn.n_kv_heads)  # (B, T, Hkv * Dh)
    dqkv = torch.cat([dq, dk, dv], dim=-1)  # (B, T, D + 2 * Hkv * Dh), undoes split
    return linear_layer_backward(dqkv, cache_qkv, grads)  # (B, T, D)


def mlp_layer_forward(mlp: MLP, x: Tensor) -> tuple[Tensor, tuple]:
    """Run MLP.forward (GELU or SwiGLU) by hand.

    Shapes: x (B, T, D) -> out (B, T, D).
    """
    up, cache_up = linear_layer_forward(mlp.w_up, x)  # (B, T, F)
    if mlp.w_gate is None:
        h, cache_act = bp.gelu_forward(up)  # (B, T, F)
        cache_gate = None
    else:
        gate, cache_gate = linear_layer_forward(mlp.w_gate, x)  # (B, T, F)
        h, cache_act = bp.swiglu_forward(gate, up)  # (B, T, F)
    out, cache_down = linear_layer_forward(mlp.w_down, h)  # (B, T, D)
    return out, (cache_up, cache_gate, cache_act, cache_down)


def mlp_layer_backward(dout: Tensor, cache: tuple, grads: Grads) -> Tensor:
    """Backward of `mlp_layer_forward`: append weight gradients, return dx.

    Shapes: dout (B, T, D) -> dx (B, T, D).
    """
    cache_up, cache_gate, cache_act, cache_down = cache
    dh = linear_layer_backward(dout, cache_down, grads)  # (B, T, F)
    if cache_gate is None:
        return linear_layer_backward(bp.gelu_backward(dh, cache_act), cache_up, grads)
    dgate, dup = bp.swiglu_backward(dh, cache_act)  # (B, T, F) each
    dx = linear_layer_backward(dup, cache_up, grads)  # (B, T, D)
    return dx + linear_layer_backward(dgate, cache_gate, grads)


def block_forward(block: TransformerBlock, x: Tensor) -> tuple[Tensor, tuple]:
    """Run TransformerBlock.forward (eq-bp-block) by hand.

    Shapes: x (B, T, D) -> out (B, T, D).
    """
    h, cache_norm1 = norm_forward(block.norm1, x)
    a, cache_attn = attention_layer_forward(block.attn, h)
    x, _ = bp.residual_forward(x, a)
    h, cache_norm2 = norm_forward(block.norm2, x)
    m, cache_mlp = mlp_layer_forward(block.mlp, h)
    out, _ = bp.residual_forward(x, m)
    return out, (cache_norm1, cache_attn, cache_norm2, cache_mlp)


def block_backward(dout: Tensor, cache: tuple, grads: Grads) -> Tensor:
    """Backward of `block_forward`: append weight gradients, return dx.

    The residual stream forks into the skip and the branch; at each fork the two
    gradients add (eq-bp-fork-grad). Shapes: dout (B, T, D) -> dx (B, T, D).
    """
    cache_norm1, cache_attn, cache_norm2, cache_mlp = cache
    dx, dm = bp.residual_backward(dout, None)
    dh = mlp_layer_backward(dm, cache_mlp, grads)
    dx = dx + norm_backward(dh, cache_norm2, grads)  # skip + branch
    dx, da = bp.residual_backward(dx, None)
    dh = attention_layer_backward(da, cache_attn, grads)
    return dx + norm_backward(dh, cache_norm1, grads)  # skip + branch


def gpt_forward(model: GPT, idx: Tensor, targets: Tensor) -> tuple[Tensor, tuple]:
    """Return the mean cross-entropy of `model` on (idx, targets), computed by hand.

    Same computation as `cross_entropy(model(idx), targets)` with the model's weights.
    Shapes: idx, targets (B, T) int64 -> loss () scalar.
    Raises ValueError if the model would apply dropout (training mode, dropout > 0)
    or targets do not match idx, TypeError/ValueError for bad idx as GPT.forward does.
    """
    check_token_ids(idx, model.config)
    if targets.shape != idx.shape:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} but idx {tuple(idx.shape)}; "
            "pass one target id per input position"
        )
    if model.training and model.config.dropout > 0:
        raise ValueError(
            f"dropout={model.config.dropout} is active and the manual pass has no "
            "dropout; call model.eval() or build the model with dropout=0"
        )
    x, cache_tok = bp.embedding_forward(idx, model.tok_emb.weight.detach())  # (B, T, D)
    cache_pos = None
    if model.pos_emb is not None:
        pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        weight_pos = model.pos_emb.weight.detach()  # (T_max, D)
        x_pos, cache_pos = bp.embedding_forward(pos, weight_pos)  # (T, D)
        x, _ = bp.residual_forward(x, x_pos)  # (B, T, D), broadcast over the batch
    cache_blocks = []
    for block in model.blocks:
        x, cache = block_forward(block, x)  # (B, T, D)
        cache_blocks.append(cache)
    h, cache_norm = norm_forward(model.final_norm, x)  # (B, T, D)
    logits, cache_head = linear_layer_forward(model.lm_head, h)  # (B, T, V)
    loss, cache_loss = bp.cross_entropy_forward(logits, targets)
    caches = (cache_tok, cache_pos, cache_blocks, cache_norm, cache_head, cache_loss)
    return loss, (model, caches)


def gpt_backward(cache: tuple) -> dict[str, Tensor]:
    """Return dL/dparameter for every parameter, keyed as model.named_parameters().

    Walks `gpt_forward` in reverse. A tied `lm_head.weight` is `tok_emb.weight`: its two
    gradients (head and lookup) are summed under the one name "tok_emb.weight".
    Shapes: each gradient has its parameter's shape.
    """
    model, caches = cache
    cache_tok, cache_pos, cache_blocks, cache_norm, cache_head, cache_loss = caches
    grads: Grads = []
    dlogits = bp.cross_entropy_backward(1.0, cache_loss)  # (B, T, V)
    dx = linear_layer_backward(dlogits, cache_head, grads)  # (B, T, D)
    dx = norm_backward(dx, cache_norm, grads)  # (B, T, D)
    for cache_block in reversed(cache_blocks):
        dx = block_backward(dx, cache_block, grads)  # (B, T, D)
    grads.append((model.tok_emb.weight, bp.embedding_backward(dx, cache_tok)))
    if cache_pos is not None:  # broadcast over the batch in forward: sum in backward
        dpos = bp.embedding_backward(dx.sum(0), cache_pos)  # (T_max, D)
        grads.append((model.pos_emb.weight, dpos))
    return sum_by_name(model, grads)


def sum_by_name(model: nn.Module, grads: Grads) -> dict[str, Tensor]:
    """Sum the gradients of each parameter and key them by the parameter's name."""
    total: dict[int, Tensor] = {}
    for param, grad in grads:
        total[id(param)] = total[id(param)] + grad if id(param) in total else grad
    return {name: total[id(p)] for name, p in model.named_parameters()}


def cache_bytes(cache: object, model: nn.Module) -> int:
    """Count the bytes of floating-point activations a manual-pass `cache` keeps alive.

    Tensors sharing storage (views) count once; the model's parameters and buffers
    (angle tables) are not activations and are left out.
    """
    weights = {
        t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
    }
    seen: dict[int, int] = {}
    stack = [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, Tensor) and item.is_floating_point():
            storage = item.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def activation_bytes(
    config: GPTConfig, batch_size: int, seq_len: int, bytes_per_number: int = 4
) -> int:
    """Return the bytes of activations the manual pass keeps for backward.

    With N = B·T positions, per block: 8·N·D (two norms' x-hat and outputs, q, k, v, the
    merged heads) + 2·N (two 1/std) + B·H·T² (attention weights) + m·N·F (GELU: m = 2,
    its input and output; SwiGLU: m = 3, gate, up and product); after the blocks
    2·N·D + N (final norm) + N·V (softmax probabilities).
    """
    c, B, T = config, batch_size, seq_len
    N, D, F = B * T, c.d_model, c.d_ff
    m = 3 if c.mlp == "swiglu" else 2
    block = 8 * N * D + 2 * N + B * c.n_heads * T * T + m * N * F
    numbers = c.n_layers * block + 2 * N * D + N + N * c.vocab_size
    return numbers * bytes_per_number
