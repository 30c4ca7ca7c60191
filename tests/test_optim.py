"""Tests for buildllm.optim: each piece against PyTorch's own implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.optim import (
    AdamW,
    clip_grad_norm,
    cross_entropy,
    lr_at,
    make_optimizer,
    param_groups,
)


class _ToyLM(nn.Module):
    """An embedding, a norm, a biased linear layer and a tied head: every group kind."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.proj(self.norm(self.tok_emb(idx))))


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_cross_entropy_matches_torch_in_value_and_gradient(impl):
    gen = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(2, 5, 7, generator=gen) * 30
    ).requires_grad_()  # large: overflow
    targets = torch.randint(0, 7, (2, 5), generator=gen)

    loss = cross_entropy(logits, targets, impl=impl)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 7), targets.view(-1))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_cross_entropy_ignores_targets_equal_to_ignore_index(impl):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=gen).requires_grad_()
    targets = torch.randint(0, 7, (2, 6), generator=gen)
    ignored = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)

    loss = cross_entropy(logits, targets.masked_fill(ignored, -100), impl=impl)
    (grad,) = torch.autograd.grad(loss, logits)
    kept = logits.detach()[~ignored].requires_grad_()  # only the kept positions
    ref = F.cross_entropy(kept, targets[~ignored])
    (ref_grad,) = torch.autograd.grad(ref, kept)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[~ignored], ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_cross_entropy_takes_flat_logits_and_targets_as_torch_does(impl):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 7, generator=gen) * 30).requires_grad_()  # (N, V)
    targets = torch.randint(0, 7, (9,), generator=gen)
    targets[[1, 4]] = -100  # ignored, as in F.cross_entropy

    loss = cross_entropy(logits, targets, impl=impl)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without the last"):
        cross_entropy(logits, targets[:-1], impl=impl)


def test_cross_entropy_of_uniform_logits_is_log_vocab_size():
    logits = torch.zeros(3, 4, 50)
    targets = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        cross_entropy(logits, targets, impl="manual"), torch.tensor(math.log(50))
    )


def test_cross_entropy_rejects_targets_of_the_wrong_shape():
    with pytest.raises(ValueError, match="without the last"):
        cross_entropy(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_param_groups_decay_only_matrices_that_are_not_embeddings():
    model = _ToyLM()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.tok_emb.weight),  # also the tied lm_head.weight
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.proj.bias),
    }


@pytest.mark.parametrize("impl", ["manual", "fast"])
def test_adamw_matches_torch_adamw_over_twelve_steps(impl):
    torch.manual_seed(0)
    ours_model = _ToyLM()
    ref_model = _ToyLM()
    ref_model.load_state_dict(ours_model.state_dict())
    kwargs = {"lr": 3e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    ours = make_optimizer(ours_model, weight_decay=0.1, impl=impl, **kwargs)
    assert isinstance(ours, AdamW) == (impl == "manual")
    ref = torch.optim.AdamW(
        param_groups(ref_model, 0.1), foreach=False, fused=False, **kwargs
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        idx = torch.randint(0, 11, (4, 6), generator=gen)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, 3e-2, 3e-3, warmup_steps=3, max_steps=12)
            opt.zero_grad()
            cross_entropy(model(idx)[:, :-1], idx[:, 1:]).backward()
            opt.step()
    for (name, p), p_ref in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=name)
    state = ours.state[ours_model.proj.weight]
    ref_state = ref.state[ref_model.proj.weight]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-8)


def test_adamw_rejects_betas_outside_the_unit_interval():
    with pytest.raises(ValueError, match="betas"):
        AdamW([nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))


@pytest.mark.parametrize("impl", ["manual", "fast"])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])  # clipping active / inactive
def test_clip_grad_norm_matches_clip_grad_norm_(impl, max_norm):
    gen = torch.Generator().manual_seed(0)
    params = [
        nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (5,), (2, 2)]
    ]
    refs = [nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, refs):
        p.grad = torch.randn(p.shape, generator=gen)
        r.grad = p.grad.clone()

    norm = clip_grad_norm(params, max_norm, impl=impl)
    ref_norm = torch.nn.utils.clip_grad_norm_(refs, max_norm, foreach=False)

    torch.testing.assert_close(norm, ref_norm)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.grad, r.grad)


def test_lr_at_warms_up_linearly_then_follows_half_a_cosine():
    kw = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at its top
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: cos(pi/2) = 0
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_cross_entropy_keeps_float64_logits_in_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    for impl in ("manual", "fast"):
        loss = cross_entropy(logits, targets, impl=impl)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)
