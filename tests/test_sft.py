"""Tests of SFT: the masked loss against a per-row reference, and a short Trainer run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from buildllm.chat import END, add_chat_tokens, render_chat
from buildllm.generate import generate
from buildllm.instructions import (
    Example,
    generate_answers,
    greedy_exact_match,
    is_correct,
)
from buildllm.model import GPT, GPTConfig
from buildllm.sft import SFTObjective, encode_conversations
from buildllm.tokenizer import BPETokenizer
from buildllm.train import TrainConfig, Trainer

TEXT = "What is two plus two? Four. Say hello. Hello there, friend. " * 20
CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "Hello there, friend."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return add_chat_tokens(BPETokenizer.train(TEXT, 290, progress=False, workers=1))


def tiny_gpt(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=32, d_model=32,
                         n_layers=2, n_heads=4))  # fmt: skip


def test_sft_loss_is_the_cross_entropy_of_the_assistant_tokens_alone(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size)
    objective = SFTObjective(tokenizer, CONVERSATIONS, CONVERSATIONS, 32, batch_size=2)
    ((x, y),) = list(objective.val_batches())  # both conversations, right-padded
    loss = objective.loss(model, (x, y))
    end = tokenizer.special_tokens[END]
    losses = []
    for messages in CONVERSATIONS:  # each alone, no padding; spans from the contents
        ids = torch.tensor([render_chat(tokenizer, messages)[0]])
        logits = model(ids[:, :-1])[0]
        answer = tokenizer.encode(messages[-1]["content"]) + [end]
        start = ids.shape[1] - len(answer)  # the answer is the last len(answer) ids
        targets = ids[0, start:]
        losses.append(F.cross_entropy(logits[start - 1 :], targets, reduction="none"))
    torch.testing.assert_close(loss, torch.cat(losses).mean())


def test_encode_conversations_cuts_long_ones_and_refuses_none_to_learn(tokenizer):
    pairs = encode_conversations(tokenizer, CONVERSATIONS, 10)
    assert [len(x) for x, _ in pairs] == [10]  # the second has no answer in 11 ids
    with pytest.raises(ValueError, match="no conversation has an assistant turn"):
        encode_conversations(tokenizer, CONVERSATIONS[1:], 4)


def test_sft_on_the_trainer_teaches_the_answers(tokenizer, tmp_path):
    model = tiny_gpt(tokenizer.vocab_size)
    objective = SFTObjective(tokenizer, CONVERSATIONS, CONVERSATIONS, 32, batch_size=2)
    config = TrainConfig(model=model.config, out_dir=str(tmp_path), batch_size=2,
                         max_steps=60, eval_interval=60, max_lr=1e-2, min_lr=1e-3,
                         warmup_steps=5, sample_tokens=None, device="cpu",
                         dtype="float32")  # fmt: skip
    Trainer(config, progress=False, objective=objective, model=model).fit()
    for messages in CONVERSATIONS:
        prompt, _ = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        out = generate(model, torch.tensor([prompt]), 12, temperature=0.0)[0]
        answer = tokenizer.encode(messages[-1]["content"])
        assert out[len(prompt) : len(prompt) + len(answer)].tolist() == answer
    examples = [Example("add", "What is two plus two?", "Four.", 0),
                Example("add", "Say hello.", "Hello there, friend.", 0),
                Example("add", "What is two plus two?", "Five.", 0)]  # fmt: skip
    answers = generate_answers(model, tokenizer, examples)
    right = greedy_exact_match(model, tokenizer, examples)
    assert right == [is_correct(e, a) for e, a in zip(examples, answers)]
    assert right[0] and not right[2]
    saved = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert saved.special_tokens == tokenizer.special_tokens
