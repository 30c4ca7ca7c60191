"""Tests of SFT: the masked loss against a per-row reference, and a short Trainer run."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from buildllm.chat import (
    END,
    IGNORE_INDEX,
    add_chat_tokens,
    pack_batch,
    pad_batch,
    render_chat,
)
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


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_packed_conversations_get_the_logits_they_get_alone(tokenizer, pos):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=48,
                          d_model=32, n_layers=2, n_heads=4, pos=pos))  # fmt: skip
    pairs = encode_conversations(tokenizer, CONVERSATIONS * 3, 48)  # 6 of 13-21 ids
    x, y, positions, mask = pack_batch(pairs, 48, tokenizer.eot_id or 0)
    assert x.shape[1] <= 48 and x.shape[0] < len(pairs)  # fewer rows than padding
    logits = model(x, mask=mask, positions=positions)
    found = 0
    for r in range(x.shape[0]):  # every pair, found where it was packed, alone
        starts = (positions[r] == 0).nonzero().flatten().tolist()
        for a, b in itertools.pairwise([*starts, x.shape[1]]):
            if (y[r, a:b] != IGNORE_INDEX).any():
                alone = model(x[r : r + 1, a:b])[0]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=1e-5)
                found += 1
    assert found == len(pairs)
    objective = SFTObjective(tokenizer, CONVERSATIONS, CONVERSATIONS, 48, 6)
    padded = objective.loss(model, pad_batch(pairs, tokenizer.eot_id or 0))
    packed = objective.loss(model, (x, y, positions, mask))
    torch.testing.assert_close(packed, padded)


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


def test_sft_with_packing_trains_as_with_padding(tokenizer, tmp_path):
    runs = []
    for packing in (False, True):
        model = tiny_gpt(tokenizer.vocab_size)
        objective = SFTObjective(tokenizer, CONVERSATIONS * 4, CONVERSATIONS, 32,
                                 batch_size=4, packing=packing)  # fmt: skip
        config = TrainConfig(model=model.config, out_dir=str(tmp_path / str(packing)),
                             batch_size=4, max_steps=5, eval_interval=5, max_lr=1e-2,
                             warmup_steps=1, sample_tokens=None, device="cpu",
                             dtype="float32")  # fmt: skip
        records = Trainer(config, progress=False, objective=objective, model=model).fit()
        runs.append([r["loss"] for r in records if "loss" in r])
    assert len(runs[0]) == 5 and runs[1] == pytest.approx(runs[0], rel=1e-4)
