"""Tests for buildllm.hf against transformers' GPT-2 and Llama (random weights)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from buildllm.hf import (
    config_from_hf,
    config_to_hf,
    export_hf,
    gpt2_state_dict_from_hf,
    infer_config,
    llama_config_to_hf,
    llama_state_dict_from_hf,
    load_hf_gpt2,
)
from buildllm.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

SMALL = GPTConfig(vocab_size=101, context_length=32, d_model=64, n_layers=2, n_heads=4)
SMALL_HF = config_to_hf(SMALL)  # the same sizes in GPT2Config's names


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (biases and norm gains too) a random value, so a swapped,
    untransposed or dropped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p == 1).float())


@pytest.fixture(scope="module")
def hf_gpt2():
    """A randomly initialised GPT2LMHeadModel built from a small GPT2Config."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL_HF))
    _randomize(model)
    return model.eval()


def _ids(vocab_size=101, B=2, T=32, seed=1):
    return torch.randint(
        0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("attn_impl", ["manual", "fast"])
def test_loaded_hf_gpt2_gives_the_same_logits_and_loss(hf_gpt2, attn_impl):
    config = dataclasses.replace(SMALL, attn_impl=attn_impl)
    ours = load_hf_gpt2(hf_gpt2.state_dict(), config=config)
    idx = _ids()
    with torch.no_grad():
        expected = hf_gpt2(idx, labels=idx)
        logits = ours(idx)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(loss, expected.loss, rtol=0, atol=1e-5)


def test_loader_reads_a_save_pretrained_folder_with_its_config(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    assert (ours.config.d_model, ours.config.n_heads, ours.config.n_layers) == (
        64,
        4,
        2,
    )
    assert not ours.training
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_gpt2(idx).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_loader_reads_files_laid_out_like_gpt2s_published_checkpoint(
    hf_gpt2, tmp_path, filename
):
    """GPT-2's files have no "transformer." prefix, no lm_head and mask buffers."""
    sd = {
        k.removeprefix("transformer."): v.clone()
        for k, v in hf_gpt2.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(SMALL.n_layers):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    published_config = {**SMALL_HF, "n_ctx": 32}
    del published_config["tie_word_embeddings"], published_config["n_inner"]
    (tmp_path / "config.json").write_text(json.dumps(published_config))
    idx = _ids()
    with torch.no_grad():
        expected = hf_gpt2(idx).logits
        for source, config in [(tmp_path, None), (path, SMALL)]:  # folder, file
            ours = load_hf_gpt2(source, config=config)
            torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_exported_folder_loads_in_transformers_with_identical_logits(
    tmp_path, tie_embeddings
):
    config = dataclasses.replace(SMALL, vocab_size=97, tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    ours = GPT(config)
    _randomize(ours, seed=3)
    ours.eval()
    export_hf(ours, tmp_path / "out", eot_id=96)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.eos_token_id == 96
    idx = _ids(vocab_size=97)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), rtol=0, atol=1e-5)
    back = load_hf_gpt2(tmp_path / "out")
    for (name, p), q in zip(ours.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_export_refuses_what_gpt2_cannot_hold(tmp_path):
    modern = GPT(GPTConfig.from_preset("modern-tiny", vocab_size=64, n_layers=1))
    with pytest.raises(ValueError, match="norm='rmsnorm'"):
        export_hf(modern, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_loader_errors_name_the_path_or_the_bad_keys(tmp_path, hf_gpt2):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_gpt2(tmp_path / "nowhere")
    sd = dict(hf_gpt2.state_dict())
    key = "transformer.ln_f.weight"
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="missing"):
        gpt2_state_dict_from_hf(sd)
    with pytest.raises(ValueError, match="unexpected"):
        gpt2_state_dict_from_hf({**hf_gpt2.state_dict(), "model.norm.weight": sd[key]})
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf({**SMALL_HF, "activation_function": "relu"})


def test_config_translation_round_trips():
    assert config_from_hf(config_to_hf(SMALL)) == SMALL


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_modern_preset_matches_hugging_face_llama_logits_and_cached_decoding(
    tie_embeddings,
):
    """RMSNorm, SwiGLU, RoPE ("half" pairing) and GQA against LlamaForCausalLM."""
    config = GPTConfig.from_preset(
        "modern-tiny", vocab_size=101, context_length=32, n_layers=2
    )
    config = dataclasses.replace(config, tie_embeddings=tie_embeddings, rope_base=500.0)
    llama_config = transformers.LlamaConfig(**llama_config_to_hf(config))
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(llama_config)
    _randomize(theirs)
    theirs.eval()
    ours = GPT(config).eval()
    ours.load_state_dict(llama_state_dict_from_hf(theirs.state_dict()), strict=False)
    idx = _ids()
    with torch.no_grad():
        expected = theirs(idx).logits
        torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)
        cache = ours.new_kv_cache(batch_size=2)
        steps = [ours(idx[:, :7], cache)] + [
            ours(idx[:, t : t + 1], cache) for t in range(7, 32)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_config_inferred_from_a_state_dict_is_the_one_that_built_it(tie):
    config = GPTConfig(vocab_size=100, context_length=32, d_model=128, n_layers=3,
                       n_heads=2, tie_embeddings=tie)  # fmt: skip
    state = GPT(config).state_dict()
    if tie:  # a tied head is tok_emb.weight; GPT-2's files store it once
        del state["lm_head.weight"]
    assert infer_config(state) == config
