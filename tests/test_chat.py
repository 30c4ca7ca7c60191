"""Tests of the chat format: special tokens, template, loss mask, vocabulary resize."""

from __future__ import annotations

import pytest
import torch

from buildllm.chat import (
    CHAT_TOKENS,
    END,
    IGNORE_INDEX,
    add_chat_tokens,
    fit_context,
    loss_targets,
    pad_batch,
    parse_chat,
    render_chat,
    resize_vocab,
)
from buildllm.model import GPT, GPTConfig
from buildllm.tokenizer import BPETokenizer

TEXT = "To be, or not to be, that is the question. What is two plus two? Four. " * 20
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And <|assistant|> to be?"},
    {"role": "assistant", "content": "Not to be."},
]


@pytest.fixture(scope="module")
def base() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=290, progress=False, workers=1)


@pytest.fixture(scope="module")
def tokenizer(base) -> BPETokenizer:
    return add_chat_tokens(base)


def test_chat_tokens_follow_the_ordinary_and_existing_special_ids(base, tokenizer):
    ids = [tokenizer.special_tokens[t] for t in CHAT_TOKENS]
    assert ids == list(range(290, 290 + len(CHAT_TOKENS)))
    assert tokenizer.eot_id == base.eot_id
    assert tokenizer.encode(TEXT) == base.encode(TEXT)
    assert add_chat_tokens(tokenizer).special_tokens == tokenizer.special_tokens


def test_conversation_round_trips_through_the_template(tokenizer):
    ids, mask = render_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    assert parse_chat(tokenizer, ids) == CONVERSATION


def test_user_text_with_a_role_token_is_encoded_as_plain_text(tokenizer):
    ids, _ = render_chat(tokenizer, CONVERSATION[3:4])
    assistant = tokenizer.special_tokens["<|assistant|>"]
    assert ids.count(assistant) == 0
    content = ids[2:-1]  # after <|endoftext|> <|user|>, before <|end|>
    assert tokenizer.decode(content) == "And <|assistant|> to be?"
    assert max(content) < len(tokenizer.vocab)  # only ordinary ids


def test_mask_covers_exactly_the_assistant_contents_and_their_turn_ends(tokenizer):
    ids, mask = render_chat(tokenizer, CONVERSATION)
    learned = [i for i, keep in zip(ids, mask) if keep]
    end = tokenizer.special_tokens[END]
    expected = []
    for message in CONVERSATION:  # built from the contents, not from the template
        if message["role"] == "assistant":
            expected += tokenizer.encode(message["content"]) + [end]
    assert learned == expected


def test_generation_prompt_ends_with_the_assistant_role_token(tokenizer):
    ids, mask = render_chat(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert ids[-1] == tokenizer.special_tokens["<|assistant|>"]
    assert not any(mask)


def test_loss_targets_keep_only_masked_next_tokens(tokenizer):
    ids, mask = render_chat(tokenizer, CONVERSATION[1:3])
    x, y = loss_targets(ids, mask)
    assert x.tolist() == ids[:-1]
    for t in range(len(x)):
        assert y[t] == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)


def test_pad_batch_pads_inputs_with_pad_id_and_targets_with_ignore_index():
    a = (torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]))
    b = (torch.tensor([5]), torch.tensor([6]))
    x, y = pad_batch([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert y.tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]


def test_template_rejects_a_tokenizer_without_chat_tokens_and_bad_roles(
    base, tokenizer
):
    with pytest.raises(ValueError, match="add_chat_tokens"):
        render_chat(base, CONVERSATION)
    with pytest.raises(ValueError, match="role 'robot'"):
        render_chat(tokenizer, [{"role": "robot", "content": "hi"}])
    with pytest.raises(TypeError, match="message 0"):
        render_chat(tokenizer, [{"role": "user", "content": 3}])


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_keeps_old_rows_and_logits_of_old_tokens(tie):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=16, d_model=32, n_layers=2,
                       n_heads=4, tie_embeddings=tie)  # fmt: skip
    model = GPT(config).eval()
    grown = resize_vocab(model, 54).eval()
    assert grown.config.vocab_size == 54
    assert (grown.lm_head.weight is grown.tok_emb.weight) == tie
    torch.testing.assert_close(grown.tok_emb.weight[:50], model.tok_emb.weight)
    mean = model.tok_emb.weight.mean(dim=0).expand(4, -1)
    torch.testing.assert_close(grown.tok_emb.weight[50:], mean)
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(grown(idx)[..., :50], model(idx))
    with pytest.raises(ValueError, match="only adds rows"):
        resize_vocab(model, 10)


def test_fit_context_drops_the_oldest_turns_and_keeps_the_system_message(tokenizer):
    full = len(render_chat(tokenizer, CONVERSATION, add_generation_prompt=True)[0])
    kept, dropped = fit_context(tokenizer, CONVERSATION, full)
    assert (kept, dropped) == (CONVERSATION, 0)
    kept, dropped = fit_context(tokenizer, CONVERSATION, full - 1)
    assert kept == [CONVERSATION[0], *CONVERSATION[2:]] and dropped == 1
    short = len(render_chat(tokenizer, [CONVERSATION[0], CONVERSATION[-1]], True)[0])
    kept, dropped = fit_context(tokenizer, CONVERSATION, short)
    assert kept == [CONVERSATION[0], CONVERSATION[-1]] and dropped == 3
    kept, _ = fit_context(tokenizer, CONVERSATION, 8)  # only part of the last turn
    assert len(kept) == 1 and CONVERSATION[-1]["content"].endswith(kept[0]["content"])
    assert len(render_chat(tokenizer, kept, add_generation_prompt=True)[0]) <= 8
