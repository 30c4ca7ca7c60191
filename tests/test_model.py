"""Tests for buildllm.model against PyTorch's ops, closed forms and full forward passes.

The Hugging Face GPT-2 and Llama logit comparisons live in test_hf.py (they need the
loader).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from buildllm.attention import padding_mask
from buildllm.model import (
    GPT,
    MLP,
    PRESETS,
    GPTConfig,
    LayerNorm,
    RMSNorm,
    closed_form_num_params,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
)

SMALL = {
    "vocab_size": 97,
    "context_length": 24,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
}
VARIANTS = {
    "gpt2": {},
    "modern": dict(PRESETS["modern"], n_kv_heads=2),
    "layernorm-no-bias-untied": {"bias": False, "tie_embeddings": False},
    "rope-interleaved-gelu": {"pos": "rope", "rope_pairing": "interleaved"},
}


def _model(variant="gpt2", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **VARIANTS[variant], **overrides})).eval()


def _ids(model: GPT, B=2, T=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads=4"),
        ({"n_kv_heads": 3}, "must divide n_heads=4"),
        ({"pos": "rope", "d_model": 36, "n_heads": 12}, "odd"),
        ({"norm": "batchnorm"}, "norm='batchnorm'"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 0}, "n_layers=0"),
    ],
)
def test_inconsistent_config_raises_value_error_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **overrides})


def test_presets_build_with_overrides_and_unknown_names_fail_clearly():
    config = GPTConfig.from_preset("tiny", vocab_size=512)
    assert (config.vocab_size, config.n_layers) == (512, PRESETS["tiny"]["n_layers"])
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(TypeError):
        GPTConfig.from_preset("tiny", width=64)


def test_default_d_ff_is_4d_for_gelu_and_two_thirds_of_that_for_swiglu():
    assert GPTConfig(**SMALL).d_ff == 4 * 32
    d_ff = GPTConfig(**SMALL, mlp="swiglu").d_ff
    assert d_ff % 64 == 0 and 8 * 32 / 3 <= d_ff < 8 * 32 / 3 + 64


# ---------------------------------------------------------------- norms, activations
def test_layernorm_and_rmsnorm_equal_their_formulas_with_and_without_bias():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 4 + 2  # far from zero mean and unit variance
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as eq-layernorm
    for bias in (True, False):
        norm = LayerNorm(16, eps=1e-5, bias=bias)
        for p in norm.parameters():
            torch.nn.init.normal_(p)
        expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight
        expected = expected + norm.bias if bias else expected
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    rms = RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(rms.weight)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    torch.testing.assert_close(rms(x), expected, rtol=1e-5, atol=1e-5)


def test_gelu_mlp_uses_gpt2s_tanh_approximation():
    """The tanh form and the exact erf form of GELU differ by up to ~5e-4 here."""
    torch.manual_seed(0)
    mlp = MLP(8, 12, "gelu", bias=True)
    x = 3 * torch.randn(2, 3, 8)
    a = x @ mlp.w_up.weight.T + mlp.w_up.bias
    gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    expected = gelu @ mlp.w_down.weight.T + mlp.w_down.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_swiglu_mlp_equals_its_formula_with_torch_ops():
    torch.manual_seed(0)
    mlp = MLP(8, 12, "swiglu", bias=False)
    x = torch.randn(2, 3, 8)
    a, b = x @ mlp.w_gate.weight.T, x @ mlp.w_up.weight.T
    expected = (F.silu(a) * b) @ mlp.w_down.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- counts
def test_gpt2_124m_preset_has_gpt2_smalls_parameter_count():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # shapes only: no memory, no time
        ours = GPT(GPTConfig.from_preset("gpt2-124m"))
        hf = GPT2LMHeadModel(GPT2Config())
    n_hf = sum(p.numel() for p in hf.parameters())  # tied wte/lm_head counted once
    assert ours.num_params() == n_hf == 124_439_808
    assert closed_form_num_params(ours.config) == n_hf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_closed_form_parameter_count_matches_the_module(variant):
    model = _model(variant)
    expected = sum(p.numel() for p in model.parameters())
    assert closed_form_num_params(model.config) == model.num_params() == expected
    embeddings = model.tok_emb.weight.numel()
    if model.pos_emb is not None:
        embeddings += model.pos_emb.weight.numel()
    assert model.num_params(non_embedding=True) == expected - embeddings
    assert closed_form_num_params(model.config, non_embedding=True) == (
        expected - embeddings
    )


@pytest.mark.parametrize("preset", ["modern", "modern-tiny", "tiny"])
def test_every_preset_count_matches_its_meta_module(preset):
    config = GPTConfig.from_preset(preset)
    with torch.device("meta"):
        assert count_params(GPT(config)) == closed_form_num_params(config)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_flops_per_token_matches_torch_flop_counter_forward_and_backward(variant):
    model = _model(variant, attn_impl="manual")  # SDPA's CPU kernel is not counted
    idx = _ids(model, B=2, T=16)
    with FlopCounterMode(display=False) as counter:
        model(idx)
    n_tokens = idx.numel()
    assert counter.get_total_flops() == flops_per_token(model.config, 16) * n_tokens
    with FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    expected = flops_per_token(model.config, 16, training=True) * n_tokens
    assert counter.get_total_flops() == expected
    without = flops_per_token(model.config, 16, include_attention=False)
    c = model.config
    assert flops_per_token(c, 16) - without == 4 * c.n_layers * 16 * c.d_model


# ---------------------------------------------------------------- init
def test_init_follows_gpt2_residual_projections_scaled_by_inverse_sqrt_2l():
    """Std estimates from ≥64k draws: relative error ~0.3%, so a 5% tolerance never
    fails by chance (over 15 standard deviations)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "d_model": 256, "n_layers": 8}))
    block = model.blocks[3]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.attn.w_o.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.w_down.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.attn.w_qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.w_qkv.bias == 0) and torch.all(block.mlp.w_up.bias == 0)
    assert torch.all(block.norm1.weight == 1) and torch.all(block.norm2.bias == 0)
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m", "modern"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_per_token_equals_the_caches_storage(preset, dtype):
    config = GPTConfig.from_preset(preset)
    with torch.device("meta"):  # shapes only
        model = GPT(config)
    cache = model.to(dtype).new_kv_cache(batch_size=3, max_len=40)
    per_token = kv_cache_bytes_per_token(config, dtype.itemsize)
    assert cache.k.nbytes + cache.v.nbytes == 3 * 40 * per_token


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_kv_cache_decoding_matches_full_forward_at_every_position(variant, impl):
    model = _model(variant, attn_impl=impl)
    idx = _ids(model, B=2, T=SMALL["context_length"])
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        pieces = [model(idx[:, :5], cache)]  # prefill
        pieces += [model(idx[:, 5:9], cache)]  # a chunk after the prefix (T < S)
        pieces += [model(idx[:, t : t + 1], cache) for t in range(9, idx.shape[1])]
    assert cache.length == idx.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_changing_a_future_token_never_changes_earlier_logits(variant):
    model = _model(variant)
    idx = _ids(model, B=1, T=12)
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(b[:, :8], a[:, :8], rtol=0, atol=0)
    assert not torch.allclose(b[:, 8:], a[:, 8:])


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_padded_batch_with_a_mask_gives_each_sequences_unpadded_logits(variant):
    """Right padding hidden by the mask: real positions equal a forward without it."""
    manual, fast = _model(variant, attn_impl="manual"), _model(variant)
    fast.load_state_dict(manual.state_dict())
    lengths = [16, 11, 5]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, SMALL["vocab_size"], (n,), generator=g) for n in lengths]
    idx = torch.zeros(3, 16, dtype=torch.long)  # padding id 0 on the right
    for b, s in enumerate(seqs):
        idx[b, : len(s)] = s
    mask = padding_mask(torch.tensor(lengths), 16)  # (B, 1, 1, S)
    with torch.no_grad():
        padded_manual, padded_fast = manual(idx, mask=mask), fast(idx, mask=mask)
        torch.testing.assert_close(padded_fast, padded_manual, rtol=1e-5, atol=1e-5)
        for b, s in enumerate(seqs):
            alone = fast(s[None])  # (1, n, V)
            torch.testing.assert_close(
                padded_fast[b : b + 1, : len(s)], alone, rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_logits_with_explicit_positions_equal_those_with_the_offset(variant):
    model = _model(variant)
    idx = _ids(model, B=2, T=12)
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, positions=torch.arange(12)), full)
        cache = model.new_kv_cache(batch_size=2)
        pieces = []
        for a, b in [(0, 5), (5, 9), (9, 10), (10, 12)]:
            positions = torch.arange(a, b).expand(2, -1)  # (B, T): the cache offset
            pieces.append(model(idx[:, a:b], cache, positions=positions))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_left_padded_batch_with_positions_and_mask_gives_the_unpadded_logits(
    variant, impl
):
    """Left padding: pads hidden by the mask, each row's positions count from 0."""
    model = _model(variant, attn_impl=impl)
    lengths = [12, 9, 4]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, SMALL["vocab_size"], (n,), generator=g) for n in lengths]
    idx = torch.zeros(3, 12, dtype=torch.long)  # padding id 0 on the left
    for b, s in enumerate(seqs):
        idx[b, 12 - len(s) :] = s
    pads = 12 - torch.tensor(lengths)  # (B,)
    mask = (torch.arange(12) >= pads[:, None])[:, None, None, :]  # (B, 1, 1, S)
    positions = (torch.arange(12) - pads[:, None]).clamp(min=0)  # (B, T)
    with torch.no_grad():
        padded = model(idx, mask=mask, positions=positions)
        assert not padded.isnan().any()  # pad queries attend nothing: zeros, not NaN
        for b, s in enumerate(seqs):
            alone = model(s[None])  # (1, n, V)
            torch.testing.assert_close(
                padded[b : b + 1, 12 - len(s) :], alone, rtol=1e-5, atol=1e-5
            )


def test_fast_and_manual_models_agree_in_forward_and_backward():
    manual, fast = _model("modern", attn_impl="manual"), _model("modern")
    fast.load_state_dict(manual.state_dict())
    idx = _ids(manual)
    y_manual, y_fast = manual(idx), fast(idx)
    torch.testing.assert_close(y_fast, y_manual, rtol=1e-5, atol=1e-5)
    y_manual.square().mean().backward()
    y_fast.square().mean().backward()
    for (name, p), q in zip(manual.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_token_ids_and_too_long_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(TypeError, match="torch.long"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"idx\[None\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..23"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([23, 24]))
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, 20, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="after 20 cached positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_dropout_is_active_in_training_and_off_in_eval():
    model = _model(dropout=0.5)
    idx = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(idx), model(idx))
    model_no_dropout = _model().train()
    with torch.no_grad():
        a, b = model_no_dropout(idx), model_no_dropout(idx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_autocast_gives_bf16_logits_close_to_float32():
    model = _model("modern")
    idx = _ids(model)
    with torch.no_grad():
        reference = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits of size ~1 agree to a few 1e-2.
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_model_compiles_into_one_graph_and_gives_the_same_logits():
    model = _model("modern")
    idx = _ids(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_the_documented_names():
    keys = set(_model("modern").state_dict())
    names = ["tok_emb", "blocks.1.attn.w_qkv", "blocks.0.mlp.w_gate", "blocks.0.norm1"]
    for name in [*names, "final_norm", "lm_head"]:
        assert f"{name}.weight" in keys
    assert not any("rope" in key for key in keys)  # tables are rebuilt, not stored
    assert dataclasses.asdict(_model().config)["d_ff"] == 4 * SMALL["d_model"]


@pytest.mark.slow
def test_model_compiles_with_inductor_and_trains_under_bf16_autocast():
    """The default torch.compile backend (inductor: compiles native code; 1-3 min)."""
    model = _model("modern").train()
    idx = _ids(model)
    compiled = torch.compile(model)
    logits = compiled(idx)
    torch.testing.assert_close(logits, model(idx), rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(idx).dtype == torch.bfloat16
