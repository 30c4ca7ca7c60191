"""Tests of DPO: the loss and its gradient against autograd and the beta -> 0 limit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from buildllm.chat import (
    IGNORE_INDEX,
    add_chat_tokens,
    loss_targets,
    pad_batch,
    render_chat,
)
from buildllm.dpo import (
    DPOObjective,
    dpo_loss,
    dpo_weight,
    make_pairs,
    preference_accuracy,
    sequence_logprobs,
)
from buildllm.instructions import Example
from buildllm.model import GPT, GPTConfig
from buildllm.tokenizer import BPETokenizer
from buildllm.train import TrainConfig, Trainer

TEXT = "What is two plus two? Four. Five. Spell it backwards: owt. two " * 20


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return add_chat_tokens(BPETokenizer.train(TEXT, 290, progress=False, workers=1))


def tiny_gpt(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=32, d_model=32,
                         n_layers=2, n_heads=4))  # fmt: skip


EXAMPLES = [
    Example("add", "What is two plus two?", "Four.", 0),
    Example("add", "What is two plus three?", "Five.", 0),
    Example("reverse", "Spell it backwards: two", "owt", 0),
]


def test_dpo_gradient_matches_autograd_and_the_written_out_weight():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (
        torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(4)
    )
    pc.requires_grad_(), pr.requires_grad_()
    beta = 0.7
    loss = dpo_loss(pc, pr, rc, rr, beta)
    grad_c, grad_r = torch.autograd.grad(loss, (pc, pr))
    margin = (pc - rc) - (pr - rr)
    reference = -F.logsigmoid(beta * margin).mean()  # eq-dpo with torch's logsigmoid
    torch.testing.assert_close(loss, reference)
    weight = dpo_weight(margin.detach(), beta)  # eq-dpo-grad
    torch.testing.assert_close(grad_c, -weight / 5)
    torch.testing.assert_close(grad_r, weight / 5)


def test_dpo_tends_to_log_2_minus_half_the_margin_as_beta_goes_to_zero(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size).double()
    pairs = make_pairs(EXAMPLES, ["Five.", "Four.", "owt"])
    chosen = [loss_targets(*render_chat(tokenizer, c)) for c, _ in pairs]
    rejected = [loss_targets(*render_chat(tokenizer, r)) for _, r in pairs]
    xc, yc = pad_batch(chosen, 0)
    xr, yr = pad_batch(rejected, 0)
    ref_c, ref_r = (
        torch.randn(3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    beta = 1e-6
    params = [p for p in model.parameters()]
    loss = dpo_loss(sequence_logprobs(model, xc, yc), sequence_logprobs(model, xr, yr),
                    ref_c, ref_r, beta)  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    # Closed form at beta -> 0: loss = log 2 - beta/2 mean(margin), so the gradient
    # is -beta/2 times the gradient of mean(log pi_c - log pi_r).
    diff = (sequence_logprobs(model, xc, yc) - sequence_logprobs(model, xr, yr)).mean()
    limits = torch.autograd.grad(-beta / 2 * diff, params)
    for grad, limit in zip(grads, limits):
        torch.testing.assert_close(grad, limit, rtol=1e-4, atol=1e-12)
    assert abs(loss.item() - math.log(2)) < 1e-4


def test_sequence_logprobs_sums_the_answer_tokens_only(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size)
    ids, mask = render_chat(tokenizer, EXAMPLES[0].messages())
    x, y = loss_targets(ids, mask)
    got = sequence_logprobs(model, x[None], y[None])
    logits = model(x[None])[0]
    kept = y != IGNORE_INDEX
    reference = -F.cross_entropy(logits[kept], y[kept], reduction="sum")
    torch.testing.assert_close(got[0], reference)


def test_make_pairs_rejects_the_model_answer_when_wrong_and_another_when_right():
    pairs = make_pairs(EXAMPLES, ["Five.", " Five.", "xyz"])
    assert pairs[0][1][-1]["content"] == "Five."  # wrong: the model's own answer
    assert pairs[1][1][-1]["content"] == "Four."  # right: another add answer
    assert pairs[2][1][-1]["content"] == "xyz"
    for (chosen, rejected), example in zip(pairs, EXAMPLES):
        assert chosen == example.messages() and rejected[:-1] == chosen[:-1]


def test_dpo_on_the_trainer_starts_at_log_2_and_raises_preference_accuracy(
    tokenizer, tmp_path
):
    policy = tiny_gpt(tokenizer.vocab_size)
    reference = copy.deepcopy(policy).eval()
    pairs = make_pairs(EXAMPLES, ["Five.", "Four.", "two"])
    objective = DPOObjective(tokenizer, reference, pairs, pairs, 32, batch_size=3,
                             beta=0.5)  # fmt: skip
    config = TrainConfig(model=policy.config, out_dir=str(tmp_path), batch_size=3,
                         max_steps=30, eval_interval=30, max_lr=3e-3, min_lr=3e-3,
                         warmup_steps=0, sample_tokens=None, device="cpu",
                         dtype="float32")  # fmt: skip
    before = preference_accuracy(policy, tokenizer, pairs, 32)
    records = Trainer(config, progress=False, objective=objective, model=policy).fit()
    assert abs(records[0]["val_loss"] - math.log(2)) < 1e-5  # policy == reference
    assert records[-1]["val_loss"] < 0.5 * math.log(2)
    assert preference_accuracy(policy, tokenizer, pairs, 32) == 1.0 > before
