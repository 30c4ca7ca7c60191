"""Tests for buildllm.lora: LoRA adapters on a small random GPT.

References: the base model's own logits (an adapter starts at B = 0), the adapted
model's logits (merged weights), torch.linalg.matrix_rank, autograd's .grad.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.lora import (
    DEFAULT_TARGETS,
    LoRAEmbedding,
    LoRALinear,
    add_lora,
    count_lora_params,
    load_adapters,
    merge_lora,
    save_adapters,
    unmerge_lora,
)
from buildllm.model import GPT, GPTConfig

SMALL = GPTConfig(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=4)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(SMALL).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def _perturb(model: nn.Module) -> None:
    """Give every adapter a nonzero B, as training would."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_at_init_the_adapted_model_equals_the_base_model_exactly():
    base, adapted = _model(), _model()
    add_lora(adapted, rank=4)
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(adapted(idx), base(idx), rtol=0, atol=0)


def test_merged_weights_give_the_adapted_models_logits_and_unmerge_restores_them():
    model = _model()
    add_lora(model, rank=4, alpha=8.0)
    _perturb(model)
    idx = _ids()
    original = model.blocks[0].attn.w_qkv.base.weight.clone()
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        merged = model(idx)
        # the merged weight equals W + (alpha / r) B A, computed here by hand
        layer = model.blocks[0].attn.w_qkv
        by_hand = original + 8.0 / 4 * layer.lora_b @ layer.lora_a
        torch.testing.assert_close(layer.base.weight, by_hand, rtol=1e-6, atol=1e-6)
        unmerge_lora(model)
        unmerged = model(idx)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.equal(adapted, _model()(idx))  # B != 0 changed the model


def test_only_lora_parameters_get_gradients_when_the_base_is_frozen():
    model = _model().train()
    wrapped = add_lora(model, rank=2)
    assert len(wrapped) == 2 * 4  # w_qkv, w_o, w_up, w_down in each of 2 blocks
    _perturb(model)
    model(_ids()).square().mean().backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_a", "lora_b"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_a_rank_r_update_has_rank_at_most_r_and_r_times_in_plus_out_parameters(rank):
    layer = LoRALinear(nn.Linear(24, 40), rank=rank, alpha=16.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    delta = layer.delta_weight()
    assert delta.shape == (40, 24)
    assert torch.linalg.matrix_rank(delta) <= rank
    model = nn.Sequential(layer)
    assert count_lora_params(model) == rank * (24 + 40)


def test_saved_adapters_hold_only_lora_tensors_and_load_into_a_fresh_wrap(tmp_path):
    model = _model()
    add_lora(model, rank=4)
    _perturb(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    from safetensors.torch import load_file

    names = set(load_file(path))
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    fresh = _model()
    add_lora(fresh, rank=4)
    load_adapters(fresh, path)
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)
    other = _model()
    add_lora(other, rank=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapters(other, path)


def test_an_embedding_adapter_is_a_rank_r_update_of_the_one_hot_linear_map():
    torch.manual_seed(3)
    table = nn.Embedding(50, 8)
    layer = LoRAEmbedding(table, rank=3, alpha=6.0)
    idx = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        torch.testing.assert_close(layer(idx), table(idx), rtol=0, atol=0)  # A = 0
        layer.lora_a.normal_()
        # reference: a lookup is one_hot(idx) @ table, with table^T updated by (a/r) B A
        updated = table.weight + (6.0 / 3 * layer.lora_b @ layer.lora_a).T  # (V, D)
        by_hand = F.one_hot(idx, 50).float() @ updated
        torch.testing.assert_close(layer(idx), by_hand, rtol=1e-5, atol=1e-5)
        assert torch.linalg.matrix_rank(layer.delta_weight()) <= 3
        layer.merge()
        torch.testing.assert_close(table.weight, updated, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(idx), by_hand, rtol=1e-5, atol=1e-5)
    assert count_lora_params(nn.Sequential(layer)) == 3 * (50 + 8)


def test_every_token_looked_up_gets_an_adapter_gradient_at_the_first_step():
    torch.manual_seed(4)
    layer = LoRAEmbedding(nn.Embedding(50, 8), rank=3, alpha=6.0)
    idx = torch.tensor([[1, 7, 7, 20]])
    layer(idx).square().sum().backward()  # loss depends on the table: A's grad is B^T g
    seen = torch.zeros(50, dtype=torch.bool)
    seen[idx.flatten()] = True
    grad_norm = layer.lora_a.grad.norm(dim=0)  # (V,) one per token column
    assert (grad_norm[seen] > 0).all() and (grad_norm[~seen] == 0).all()


def test_lora_on_untied_token_embeddings_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT(replace(SMALL, tie_embeddings=False)).eval()
    wrapped = add_lora(model, rank=2, targets=(*DEFAULT_TARGETS, "tok_emb"))
    assert "tok_emb" in wrapped and isinstance(model.tok_emb, LoRAEmbedding)
    _perturb(model)
    idx = _ids()
    model(idx).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(("lora_a", "lora_b")), name
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), adapted, rtol=1e-5, atol=1e-5)


def test_lora_refuses_token_embeddings_tied_to_the_head():
    with pytest.raises(ValueError, match="tok_emb is tied to the output head"):
        add_lora(_model(), rank=2, targets=("tok_emb",))


def test_bad_rank_and_unknown_targets_fail_with_the_fix():
    with pytest.raises(ValueError, match="rank=0 must be at least 1"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Embedding named"):
        add_lora(_model(), rank=2, targets=("q_proj",))
