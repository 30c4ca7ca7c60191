"""Tests for buildllm.attention against SDPA, per-position loops, Hugging Face RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from buildllm.attention import (
    KVCache,
    MultiHeadAttention,
    RoPE,
    attention,
    attention_weights,
    causal_mask,
    merge_heads,
    padding_mask,
    split_heads,
)


def _qkv(B=2, H=4, Hkv=4, T=7, S=7, Dh=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dh, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, Dh, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, Dh, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _sdpa_reference(q, k, v):
    """SDPA with an explicit bottom-right-aligned tril mask and K/V heads repeated."""
    T, S, H, Hkv = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_causal_mask_is_lower_triangular_and_offset_by_the_cached_positions():
    torch.testing.assert_close(causal_mask(5, 5), torch.ones(5, 5).tril().bool())
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(causal_mask(2, 5), expected)


@pytest.mark.parametrize("impl", ["manual", "fast"])
@pytest.mark.parametrize(
    "H, Hkv, T, S", [(4, 4, 7, 7), (4, 2, 7, 7), (4, 1, 3, 9), (4, 4, 1, 6)]
)
def test_attention_matches_sdpa_with_explicit_mask_in_forward_and_backward(
    impl, H, Hkv, T, S
):
    q, k, v = _qkv(H=H, Hkv=Hkv, T=T, S=S)
    y = attention(q, k, v, impl=impl)
    y_ref = _sdpa_reference(q, k, v)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["manual", "fast"])
@pytest.mark.parametrize("H, Hkv, T, S", [(4, 4, 7, 7), (4, 2, 3, 9), (4, 4, 1, 6)])
def test_attention_with_a_padding_mask_matches_sdpa_given_the_same_combined_mask(
    impl, H, Hkv, T, S
):
    q, k, v = _qkv(H=H, Hkv=Hkv, T=T, S=S)
    lengths = torch.tensor([S, S - 2])  # the second sequence ends in 2 padding keys
    mask = padding_mask(lengths, S)  # (B, 1, 1, S)
    y = attention(q, k, v, impl=impl, mask=mask)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    allowed = allowed & (torch.arange(S) < lengths[:, None])[:, None, None, :]
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    y_ref = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H, Hkv, T, S", [(4, 4, 7, 7), (4, 2, 3, 9), (4, 4, 1, 6)])
def test_any_boolean_mask_gives_sdpa_with_the_same_mask_on_both_paths(H, Hkv, T, S):
    """A random pattern per head, with some queries left no key (SDPA gives them 0)."""
    q, k, v = _qkv(H=H, Hkv=Hkv, T=T, S=S)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, H, T, S, generator=g) < 0.6  # (B, H, T, S), True = attend
    mask[0, 1, -1] = False  # one query with no key at all
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T) & mask
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    y_ref = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (q, k, v))
    outputs = {}
    for impl in ("manual", "fast"):
        y = outputs[impl] = attention(q, k, v, impl=impl, mask=mask)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(y.square().sum(), (q, k, v))
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["manual"], outputs["fast"], rtol=1e-5, atol=1e-6)
    assert torch.all(outputs["manual"][0, 1, -1] == 0)


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_mha_with_a_mask_and_cache_in_chunks_matches_one_masked_full_pass(impl):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, 16, n_kv_heads=2, rope=RoPE(8, 16), impl=impl)
    x = torch.randn(2, 9, 32)
    mask = torch.rand(2, 1, 9, 9) < 0.7  # (B, 1, T, S): the same pattern every head
    full = mha(x, mask=mask)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril() & mask
    x_ref = mha.w_qkv(x).split(mha.qkv_sizes, dim=-1)
    q, k, v = (split_heads(t, h) for t, h in zip(x_ref, (4, 2, 2), strict=True))
    q, k = mha.rope(q), mha.rope(k)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    y_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(full, mha.w_o(merge_heads(y_ref)), rtol=1e-5, atol=1e-5)
    cache = KVCache(1, 2, n_kv_heads=2, head_dim=8, max_len=16)
    outs = []
    for a, b in [(0, 4), (4, 5), (5, 9)]:  # prefill, one step, a chunk (T < S)
        outs.append(mha(x[:, a:b], cache, mask=mask[:, :, a:b, :b]))
        cache.advance(b - a)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_padding_mask_marks_the_first_lengths_keys_of_each_sequence():
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mask = padding_mask(torch.tensor([3, 1]), 4)
    assert mask.shape == (2, 1, 1, 4)
    torch.testing.assert_close(mask[:, 0, 0], expected)


def test_attention_weights_are_a_masked_row_softmax_of_scaled_scores():
    q, k, _ = _qkv(T=3, S=5, Dh=4)
    w = attention_weights(q, k)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / 2.0  # sqrt(4)
    allowed = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)  # queries at 2, 3, 4
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(w, expected)
    assert torch.all(w[..., ~allowed] == 0)


def test_manual_attention_equals_a_loop_over_query_positions():
    q, k, v = _qkv(T=6, S=6, Dh=5)
    y = attention(q, k, v, impl="manual")
    for t in range(6):
        w = torch.softmax(q[:, :, t : t + 1] @ k[:, :, : t + 1].mT / math.sqrt(5), -1)
        torch.testing.assert_close(y[:, :, t : t + 1], w @ v[:, :, : t + 1])


def test_manual_attention_passes_gradcheck_in_float64():
    q, k, v = _qkv(B=1, H=2, Hkv=1, T=4, S=5, Dh=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: attention(*t, impl="manual"), (q, k, v))


def test_attention_rejects_heads_that_do_not_group():
    q, k, v = _qkv(H=4, Hkv=3)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q, k, v)


def test_split_heads_matches_reshape_by_hand_and_merge_heads_undoes_it():
    x = torch.arange(2 * 3 * 8.0).view(2, 3, 8)
    heads = split_heads(x, 2)
    assert heads.shape == (2, 2, 3, 4)
    torch.testing.assert_close(heads[1, 1, 2], x[1, 2, 4:8])  # batch 1, head 1, pos 2
    torch.testing.assert_close(merge_heads(heads), x)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_fast_attention_matches_manual_attention_in_forward_and_backward(n_kv_heads):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    kwargs = {
        "d_model": 32,
        "n_heads": 4,
        "context_length": 16,
        "n_kv_heads": n_kv_heads,
    }
    manual = MultiHeadAttention(**kwargs, impl="manual")
    fast = MultiHeadAttention(**kwargs, impl="fast")
    fast.load_state_dict(manual.state_dict())

    y_manual, y_fast = manual(x), fast(x)
    torch.testing.assert_close(y_fast, y_manual, rtol=1e-5, atol=1e-6)

    (grad_manual,) = torch.autograd.grad(y_manual.square().sum(), x)
    (grad_fast,) = torch.autograd.grad(y_fast.square().sum(), x)
    torch.testing.assert_close(grad_fast, grad_manual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["manual", "fast"])
@pytest.mark.parametrize("use_rope", [False, True])
def test_changing_a_future_position_never_changes_an_earlier_output(impl, use_rope):
    torch.manual_seed(0)
    rope = RoPE(head_dim=8, context_length=16) if use_rope else None
    mha = MultiHeadAttention(32, 4, 16, rope=rope, impl=impl)
    x = torch.randn(1, 10, 32)
    x_changed = x.clone()
    x_changed[:, 6:] = torch.randn(1, 4, 32)
    y, y_changed = mha(x), mha(x_changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=0)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


def _hf_rope(x, position_ids, rope_base):
    """Rotate x (B, H, T, Dh) with Hugging Face Llama's rotary code."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = LlamaConfig(
        head_dim=x.shape[3],
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": rope_base},
    )
    cos, sin = LlamaRotaryEmbedding(cfg)(x, position_ids)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return rotated


@pytest.mark.parametrize("start", [0, 5])
def test_rope_half_pairing_matches_hugging_face_llama(start):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 16)
    rope = RoPE(head_dim=16, context_length=32, rope_base=500.0, pairing="half")
    position_ids = torch.arange(start, start + 6)[None].expand(2, -1)
    expected = _hf_rope(x, position_ids, rope_base=500.0)
    torch.testing.assert_close(rope(x, start), expected, rtol=1e-5, atol=1e-5)


def test_rope_with_per_row_positions_matches_hugging_face_llama_position_ids():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, 16)
    rope = RoPE(head_dim=16, context_length=32, rope_base=500.0)
    positions = torch.stack([torch.arange(s, s + 6) for s in (0, 4, 9)])  # (B, T)
    positions[1, :2] = 0  # left padding: the pads repeat position 0
    expected = _hf_rope(x, positions, rope_base=500.0)
    torch.testing.assert_close(
        rope(x, positions=positions), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("start", [0, 7])
def test_rope_with_explicit_arange_positions_equals_the_start_offset(pairing, start):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    rope = RoPE(head_dim=8, context_length=16, pairing=pairing)
    expected = rope(x, start)
    positions = torch.arange(start, start + 5)
    torch.testing.assert_close(rope(x, positions=positions), expected, rtol=0, atol=0)
    per_row = positions.expand(2, -1)  # (B, T)
    torch.testing.assert_close(rope(x, positions=per_row), expected, rtol=0, atol=0)


def test_rope_rejects_positions_of_the_wrong_kind_shape_or_range():
    rope = RoPE(head_dim=4, context_length=6)
    x = torch.randn(2, 1, 3, 4)
    with pytest.raises(TypeError, match="torch.long"):
        rope(x, positions=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(2, 3\)"):
        rope(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match=r"\[-1\] are outside 0..5"):
        rope(x, positions=torch.tensor([-1, 0, 1]))  # would wrap to the last row
    with pytest.raises(ValueError, match=r"\[6\] are outside 0..5"):
        rope(x, positions=torch.tensor([[0, 1, 2], [4, 5, 6]]))


def test_rope_interleaved_rotates_adjacent_pairs_by_hand_computed_angles():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    y = RoPE(head_dim=4, context_length=8, rope_base=100.0, pairing="interleaved")(x)
    for p in range(4):
        for i, theta in enumerate([1.0, 100.0 ** (-2 / 4)]):
            c, s = math.cos(p * theta), math.sin(p * theta)
            a, b = x[0, 0, p, 2 * i].item(), x[0, 0, p, 2 * i + 1].item()
            assert y[0, 0, p, 2 * i].item() == pytest.approx(a * c - b * s, abs=1e-6)
            assert y[0, 0, p, 2 * i + 1].item() == pytest.approx(
                a * s + b * c, abs=1e-6
            )


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_scores_depend_only_on_the_distance_between_positions(pairing):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rope = RoPE(head_dim=8, context_length=32, pairing=pairing)
    score = (rope(q, 7) * rope(k, 3)).sum()  # distance 4
    shifted = (rope(q, 20) * rope(k, 16)).sum()  # distance 4, 13 positions later
    torch.testing.assert_close(shifted, score, rtol=1e-5, atol=1e-5)
    assert (rope(q, 3) * rope(k, 3)).sum() == pytest.approx((q * k).sum().item(), 1e-5)


def test_rope_passes_gradcheck_in_float64_and_rejects_positions_past_context():
    rope = RoPE(head_dim=4, context_length=6).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rope(t, 2), (x,))
    with pytest.raises(ValueError, match="context_length=6"):
        rope(x, start=4)
    with pytest.raises(ValueError, match="odd"):
        RoPE(head_dim=5, context_length=6)


def test_kv_cache_returns_every_stored_position_and_refuses_to_overflow():
    cache = KVCache(n_layers=2, batch_size=1, n_kv_heads=2, head_dim=3, max_len=5)
    k1, v1 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    k_all, v_all = cache.update(1, k1, v1)
    torch.testing.assert_close(k_all, k1)
    cache.advance(3)
    k2, v2 = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    k_all, v_all = cache.update(1, k2, v2)
    torch.testing.assert_close(k_all, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v_all, torch.cat([v1, v2], dim=2))
    cache.advance(2)
    with pytest.raises(ValueError, match="max_len=5"):
        cache.update(0, k2[:, :, :1], v2[:, :, :1])
    cache.reset()
    assert cache.length == 0


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_mha_with_cache_in_chunks_matches_one_full_pass(impl):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, 16, n_kv_heads=2, rope=RoPE(8, 16), impl=impl)
    x = torch.randn(2, 9, 32)
    full = mha(x)
    cache = KVCache(1, 2, n_kv_heads=2, head_dim=8, max_len=16)
    outs = []
    for a, b in [(0, 4), (4, 5), (5, 9)]:  # prefill, one step, a chunk of 4 (T < S)
        outs.append(mha(x[:, a:b], cache))
        cache.advance(b - a)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_mha_rejects_inconsistent_heads_and_unknown_impl():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(30, 4, 16)
    with pytest.raises(ValueError, match="impl"):
        MultiHeadAttention(32, 4, 16, impl="flash")


def test_a_float32_kv_cache_returns_keys_and_values_in_the_dtype_of_the_new_ones():
    cache = KVCache(1, 1, 2, 4, max_len=8)  # float32 storage
    k = torch.randn(1, 2, 3, 4).to(torch.bfloat16)  # (B, Hkv, T, Dh), as under autocast
    k_all, v_all = cache.update(0, k, -k)
    assert k_all.dtype == v_all.dtype == torch.bfloat16
    assert torch.equal(k_all, k) and torch.equal(v_all, -k)  # bf16 fits in float32
