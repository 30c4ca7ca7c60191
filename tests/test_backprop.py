"""Tests for buildllm.backprop: every hand-written backward against torch.autograd.

Each layer is checked twice in float64: its gradients equal autograd's on PyTorch's own
implementation of the layer (torch.nn.functional), and torch.autograd.gradcheck accepts
it (finite differences of our forward against our backward). The manual pass through the
whole model (backprop_model) must give the loss and every parameter's gradient that
`loss.backward()` gives on buildllm.model's GPT, and the same AdamW training steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from buildllm import backprop as bp
from buildllm.backprop_model import (
    activation_bytes,
    cache_bytes,
    gpt_backward,
    gpt_forward,
)
from buildllm.model import GPT, GPTConfig
from buildllm.optim import make_optimizer

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64: agreement to rounding error


def manual_op(forward: Callable, backward: Callable) -> Callable:
    """Wrap a forward/backward pair as an autograd Function so gradcheck can test it.

    `forward` takes only the differentiable tensors; `backward` returns one gradient per
    tensor (None for an input that has none).
    """

    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out, ctx.cache = forward(*inputs)
            return out.clone()  # a fresh tensor, never a view of an input

        @staticmethod
        def backward(ctx, dout):
            grads = backward(dout, ctx.cache)
            return grads if isinstance(grads, tuple) else (grads,)

    return Manual.apply


def check_layer(reference, forward, backward, *inputs):
    """Compare a manual pair with autograd on `reference`; then run gradcheck on it.

    The upstream gradient dout is random, so every output element contributes.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out_ref = reference(*leaves)
    out, cache = forward(*[t.detach() for t in inputs])
    torch.testing.assert_close(out, out_ref.detach(), **TOL)

    dout = torch.randn_like(out_ref)
    expected = torch.autograd.grad(out_ref, leaves, dout)
    got = backward(dout, cache)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    assert torch.autograd.gradcheck(manual_op(forward, backward), tuple(leaves))


@pytest.fixture(autouse=True)
def _float64_and_seed():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_backward_matches_autograd_and_gradcheck(with_bias):
    x, weight, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    if with_bias:
        check_layer(F.linear, bp.linear_forward, bp.linear_backward, x, weight, bias)
    else:
        check_layer(
            F.linear,
            bp.linear_forward,
            lambda d, c: bp.linear_backward(d, c)[:2],
            x,
            weight,
        )


def test_embedding_backward_scatter_adds_repeated_ids_like_autograd():
    idx = torch.tensor([[1, 3, 1], [0, 1, 3]])  # id 1 three times, id 2 never
    weight = torch.randn(5, 4)
    check_layer(
        lambda w: F.embedding(idx, w),
        lambda w: bp.embedding_forward(idx, w),
        bp.embedding_backward,
        weight,
    )
    dweight = bp.embedding_backward(torch.ones(2, 3, 4), (idx, 5))
    torch.testing.assert_close(dweight[:, 0], torch.tensor([1.0, 3.0, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_backward_matches_autograd_and_gradcheck(with_bias):
    x, weight, bias = torch.randn(2, 3, 6) * 3 + 1, torch.randn(6), torch.randn(6)
    if with_bias:
        check_layer(
            lambda x, w, b: F.layer_norm(x, (6,), w, b, eps=1e-5),
            lambda x, w, b: bp.layer_norm_forward(x, w, b, eps=1e-5),
            bp.layer_norm_backward,
            x,
            weight,
            bias,
        )
    else:
        check_layer(
            lambda x, w: F.layer_norm(x, (6,), w, None, eps=1e-5),
            lambda x, w: bp.layer_norm_forward(x, w, None, eps=1e-5),
            lambda d, c: bp.layer_norm_backward(d, c)[:2],
            x,
            weight,
        )


def test_rms_norm_backward_matches_autograd_and_gradcheck():
    x, weight = torch.randn(2, 3, 6) * 2, torch.randn(6)
    check_layer(
        lambda x, w: F.rms_norm(x, (6,), w, eps=1e-6),
        lambda x, w: bp.rms_norm_forward(x, w, eps=1e-6),
        bp.rms_norm_backward,
        x,
        weight,
    )


def test_gelu_backward_matches_tanh_approximate_gelu_autograd_and_gradcheck():
    x = torch.linspace(-6, 6, 25).reshape(5, 5)  # both tails and the bend
    check_layer(
        lambda x: F.gelu(x, approximate="tanh"), bp.gelu_forward, bp.gelu_backward, x
    )


def test_swiglu_backward_matches_silu_times_up_autograd_and_gradcheck():
    gate, up = torch.randn(2, 3, 8) * 3, torch.randn(2, 3, 8)
    check_layer(
        lambda g, u: F.silu(g) * u, bp.swiglu_forward, bp.swiglu_backward, gate, up
    )


def test_softmax_backward_matches_autograd_and_gradcheck():
    x = torch.randn(3, 4, 7) * 4
    check_layer(
        lambda x: torch.softmax(x, -1), bp.softmax_forward, bp.softmax_backward, x
    )


def test_cross_entropy_backward_is_p_minus_y_over_n_like_autograd():
    logits, targets = torch.randn(2, 3, 7) * 3, torch.randint(0, 7, (2, 3))
    check_layer(
        lambda z: F.cross_entropy(z.reshape(-1, 7), targets.reshape(-1)),
        lambda z: bp.cross_entropy_forward(z, targets),
        bp.cross_entropy_backward,
        logits,
    )
    dlogits = bp.cross_entropy_backward(
        1.0, bp.cross_entropy_forward(logits, targets)[1]
    )
    expected = (logits.softmax(-1) - F.one_hot(targets, 7)) / 6  # (p - y) / N
    torch.testing.assert_close(dlogits, expected, **TOL)


def test_cross_entropy_forward_survives_huge_logits():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    loss, _ = bp.cross_entropy_forward(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([1])))


def test_attention_backward_matches_causal_sdpa_autograd_and_gradcheck():
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    check_layer(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        bp.attention_forward,
        bp.attention_backward,
        q,
        k,
        v,
    )


def test_attention_gradient_of_a_future_position_is_zero():
    q, k, v = (torch.randn(1, 1, 4, 3) for _ in range(3))
    out, cache = bp.attention_forward(q, k, v)
    dout = torch.zeros_like(out)
    dout[..., 1, :] = 1.0  # only position 1's output matters
    _, dk, dv = bp.attention_backward(dout, cache)
    assert torch.all(dk[..., 2:, :] == 0) and torch.all(dv[..., 2:, :] == 0)


def test_split_and_merge_heads_backward_match_autograd_and_gradcheck():
    x = torch.randn(2, 3, 8)
    check_layer(
        lambda x: x.view(2, 3, 4, 2).transpose(1, 2),
        lambda x: bp.split_heads_forward(x, 4),
        bp.split_heads_backward,
        x,
    )
    y = torch.randn(2, 4, 3, 2)
    check_layer(
        lambda y: y.transpose(1, 2).reshape(2, 3, 8),
        bp.merge_heads_forward,
        bp.merge_heads_backward,
        y,
    )


def test_repeat_kv_backward_sums_the_copies_like_autograd():
    x = torch.randn(2, 2, 3, 4)
    check_layer(
        lambda x: x.repeat_interleave(3, dim=1),
        lambda x: bp.repeat_kv_forward(x, 3),
        bp.repeat_kv_backward,
        x,
    )


def test_residual_backward_copies_dout_to_both_inputs_like_autograd():
    x, branch = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    check_layer(torch.add, bp.residual_forward, bp.residual_backward, x, branch)


def rope_angles(T: int, head_dim: int, base: float = 10000.0):
    """Independent RoPE angles: theta_i = base^(-2i/Dh), angle = t * theta_i."""
    theta = torch.tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    angles = torch.arange(T)[:, None] * theta  # (T, Dh/2)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_backward_matches_autograd_and_gradcheck(pairing):
    x = torch.randn(2, 2, 5, 6)
    cos, sin = rope_angles(5, 6)

    def reference(x):  # each feature pair as a complex number, times e^{i angle}
        if pairing == "half":
            z = torch.complex(x[..., :3], x[..., 3:]) * torch.complex(cos, sin)
            return torch.cat([z.real, z.imag], -1)
        z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.complex(cos, sin)
        return torch.stack([z.real, z.imag], -1).flatten(-2)

    check_layer(
        reference,
        lambda x: bp.rope_forward(x, cos, sin, pairing),
        bp.rope_backward,
        x,
    )


def test_rope_preserves_norms_and_dot_products_depend_on_offset_only():
    cos, sin = rope_angles(8, 4)
    q, k = torch.randn(4), torch.randn(4)
    rq, _ = bp.rope_forward(q.expand(1, 1, 8, 4), cos, sin)
    rk, _ = bp.rope_forward(k.expand(1, 1, 8, 4), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(1, 1, 8))
    torch.testing.assert_close(rq[0, 0, 5] @ rk[0, 0, 3], rq[0, 0, 4] @ rk[0, 0, 2])
    assert not math.isclose(float(rq[0, 0, 5] @ rk[0, 0, 3]), float(q @ k))


# ---------------------------------------------------------------- the whole model
MODEL_CONFIGS = {
    "tiny": ("tiny", {}),
    "modern-tiny": ("modern-tiny", {}),  # RMSNorm, SwiGLU, RoPE "half", GQA 4:2
    "interleaved-rope-layernorm": (
        "modern-tiny",
        {"rope_pairing": "interleaved", "norm": "layernorm", "n_kv_heads": None},
    ),
    "untied-no-bias-gelu": ("tiny", {"tie_embeddings": False, "bias": False}),
}


def make_model(name: str, **overrides) -> GPT:
    """A float64 model of a preset with every parameter moved off its initial value.

    Norm gains of exactly 1 and biases of exactly 0 could hide a misplaced factor, so
    every parameter gets independent noise.
    """
    preset, changes = MODEL_CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, **{**changes, **overrides}))
    model = model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(model: GPT, batch_size: int = 2, T: int = 12):
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    idx = torch.randint(0, V, (batch_size, T), generator=g)
    targets = torch.randint(0, V, (batch_size, T), generator=g)
    return idx, targets


def autograd_loss(model: GPT, idx, targets):
    """The reference: PyTorch's cross-entropy on the model's own forward."""
    logits = model(idx)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_manual_model_gradients_equal_loss_backward_for_every_parameter(name):
    model = make_model(name)
    idx, targets = batch(model)
    loss, cache = gpt_forward(model, idx, targets)
    grads = gpt_backward(cache)

    expected_loss = autograd_loss(model, idx, targets)
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
    assert list(grads) == [n for n, _ in model.named_parameters()]
    for name_, param in model.named_parameters():
        torch.testing.assert_close(grads[name_], param.grad, **TOL, msg=name_)


def test_tied_head_gets_one_summed_gradient_under_tok_emb():
    model = make_model("tiny")
    assert model.lm_head.weight is model.tok_emb.weight
    idx, targets = batch(model)
    grads = gpt_backward(gpt_forward(model, idx, targets)[1])
    assert "tok_emb.weight" in grads and "lm_head.weight" not in grads
    autograd_loss(model, idx, targets).backward()
    unused = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unused[idx.flatten()] = False  # rows the lookup never touched: head gradient only
    assert grads["tok_emb.weight"][unused].abs().sum() > 0
    torch.testing.assert_close(
        grads["tok_emb.weight"], model.tok_emb.weight.grad, **TOL
    )


def test_manual_pass_refuses_active_dropout():
    model = make_model("tiny", dropout=0.1)
    idx, targets = batch(model)
    with pytest.raises(ValueError, match="dropout=0.1"):
        gpt_forward(model, idx, targets)
    model.eval()  # dropout off: allowed
    loss, _ = gpt_forward(model, idx, targets)
    torch.testing.assert_close(loss, autograd_loss(model, idx, targets).detach(), **TOL)


@pytest.mark.parametrize("name", ["tiny", "modern-tiny"])
def test_manual_training_steps_equal_autograd_training_steps_with_adamw(name):
    manual = make_model(name)
    reference = copy.deepcopy(manual)
    opt_manual = make_optimizer(manual, lr=1e-2, weight_decay=0.1, impl="manual")
    opt_reference = make_optimizer(reference, lr=1e-2, weight_decay=0.1, impl="manual")
    start = [p.detach().clone() for p in manual.parameters()]
    for step in range(3):
        idx, targets = batch(manual, T=10 + step)
        grads = gpt_backward(gpt_forward(manual, idx, targets)[1])
        for name_, param in manual.named_parameters():
            param.grad = grads[name_]
        opt_manual.step()

        opt_reference.zero_grad()
        autograd_loss(reference, idx, targets).backward()
        opt_reference.step()
    for (name_, p), p_ref, p0 in zip(
        manual.named_parameters(), reference.parameters(), start
    ):
        assert not torch.equal(p, p0), name_  # the steps moved every parameter
        torch.testing.assert_close(p, p_ref, **TOL, msg=name_)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_activation_bytes_formula_counts_what_the_manual_pass_keeps(name):
    model = make_model(name)
    idx, targets = batch(model, batch_size=3, T=7)
    _, cache = gpt_forward(model, idx, targets)
    expected = cache_bytes(cache, model)
    assert activation_bytes(model.config, 3, 7, bytes_per_number=8) == expected


def test_manual_pass_rejects_mismatched_targets_and_float_ids_like_the_model():
    model = make_model("tiny")
    idx, targets = batch(model)
    with pytest.raises(ValueError, match="targets have shape"):
        gpt_forward(model, idx, targets[:, :-1])
    with pytest.raises(TypeError, match="torch.long"):
        gpt_forward(model, idx.double(), targets)
