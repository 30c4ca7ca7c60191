"""Tests for buildllm.generate: filters, sampling, cached decoding, batching, streaming.

References: hand-computed distributions, transformers' logits processors (top-k, top-p,
min-p, repetition penalty), argmax of a full forward pass, and the empirical frequencies
of many independent draws. Tiny random models keep every test well under two seconds.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from buildllm.attention import KVCache
from buildllm.checkpoint import save_checkpoint
from buildllm.cli import main
from buildllm.distributed import TOKENIZER
from buildllm.generate import (
    apply_repetition_penalty,
    generate,
    generate_batch,
    matvec_layout,
    min_p_filter,
    sample_next,
    slide_window,
    stream,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from buildllm.hf import export_hf
from buildllm.hf_tokenizer import export_tokenizer_hf
from buildllm.model import GPT, GPTConfig
from buildllm.tokenizer import BPETokenizer, gpt2_tokenizer

NEG_INF = float("-inf")
CORPUS = Path(__file__).parents[1] / "code" / "buildllm" / "corpus" / "stdlib.txt.gz"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decode on one thread: tiny models gain nothing from two, and on a busy machine
    the second thread's synchronisation makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, **overrides: object) -> GPT:
    """A tiny random GPT with weights large enough for peaked, varied distributions."""
    torch.manual_seed(seed)
    sizes = {"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 2}
    model = GPT(GPTConfig(**{**sizes, "n_heads": 4, **overrides}))
    with torch.no_grad():  # GPT-2's init gives near-uniform logits: sharpen them
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0.0, 0.5)
    return model.eval()


def greedy_by_full_forward(model: GPT, idx: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding written independently: argmax of a full forward, no cache."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx)[:, -1]  # (B, V)
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


class ScriptedModel(nn.Module):
    """Stands in for GPT: whatever the input, its next token is the next of `script`."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int) -> None:
        super().__init__()
        self.config = GPTConfig(
            vocab_size=vocab_size, context_length=64, d_model=4, n_layers=1, n_heads=1
        )
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the stand-in a device
        self.script, self.prompt_len = script, prompt_len

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(1, batch_size, 1, 1, max_len or self.config.context_length)

    def forward(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            kv_cache.advance(T)
        n_generated = start + T - self.prompt_len
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[min(n_generated, len(self.script) - 1)]] = 1.0
        return logits


# ---------------------------------------------------------------- filters


def test_top_k_filter_keeps_exactly_the_k_largest_logits_of_each_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [5.0, -1.0, 0.5, 2.0, 7.0]])
    kept = top_k_filter(logits, 2)
    expected = torch.tensor([[NEG_INF, 4.0, 3.0, NEG_INF, NEG_INF],
                             [5.0, NEG_INF, NEG_INF, NEG_INF, 7.0]])  # fmt: skip
    torch.testing.assert_close(kept, expected)
    torch.testing.assert_close(top_k_filter(logits, 99), logits)  # k > V keeps all


def test_top_k_filter_keeps_every_token_tied_with_the_kth_largest():
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.0]])
    kept = top_k_filter(logits, 1)
    torch.testing.assert_close(kept, torch.tensor([[2.0, NEG_INF, 2.0, NEG_INF]]))


def test_top_p_filter_keeps_the_smallest_set_of_likeliest_tokens_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = probs.log()[None]  # (1, 4)
    expected_sets = {0.3: {1}, 0.6: {1, 3}, 0.8: {1, 3, 2}, 0.95: {0, 1, 2, 3}}
    for top_p, expected in expected_sets.items():
        kept = top_p_filter(logits, top_p)[0].isfinite().nonzero().flatten()
        assert set(kept.tolist()) == expected, top_p
    assert top_p_filter(logits, 1.0).isfinite().all()


def test_top_p_keeps_only_the_likeliest_token_when_it_alone_holds_exactly_p():
    # 0.5, 0.25, 0.25 are exact in binary: the mass before token 2 is exactly top_p
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert top_p_filter(logits, 0.5)[0].isfinite().tolist() == [True, False, False]


def test_min_p_filter_keeps_tokens_at_least_min_p_times_the_likeliest():
    probs = torch.tensor([0.05, 0.5, 0.2, 0.25])
    kept = min_p_filter(probs.log()[None], 0.45)[0].isfinite()  # threshold 0.225
    assert kept.tolist() == [False, True, False, True]


def test_filters_match_transformers_logits_processors_on_random_logits():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 100, generator=g) * 3  # (B, V)
    idx = torch.randint(0, 100, (8, 12), generator=g)  # (B, T)
    cases = [
        (top_k_filter(logits, 7), transformers.TopKLogitsWarper(7)),
        (top_p_filter(logits, 0.9), transformers.TopPLogitsWarper(0.9)),
        (min_p_filter(logits, 0.05), transformers.MinPLogitsWarper(0.05)),
        (
            apply_repetition_penalty(logits, idx, 1.3),
            transformers.RepetitionPenaltyLogitsProcessor(1.3),
        ),
    ]
    for ours, processor in cases:
        theirs = processor(idx, logits.clone())
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_lowers_positive_and_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    idx = torch.tensor([[0, 1, 1]])  # tokens 0 and 1 were seen, token 1 twice
    out = apply_repetition_penalty(logits, idx, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 0.0},
    ],
)
def test_sample_next_rejects_out_of_range_settings_with_a_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sample_next(torch.zeros(1, 5), **kwargs)


# ---------------------------------------------------------------- sampling


def test_sampled_frequencies_match_the_filtered_softmax():
    """200,000 rows of one distribution, one draw each: each frequency is within 0.01 of
    its probability. Hoeffding: P(|f - p| > 0.01) <= 2 exp(-2 n 0.01²) = 8e-18 per token,
    so the false-failure probability is below 1e-16 (and the seed fixes it anyway)."""
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().expand(200_000, -1)  # (N, V)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=0.5, top_k=3, generator=g)  # (N,)
    tempered = torch.tensor(
        [0.0, 0.4**2, 0.0, 0.3**2, 0.15**2]
    )  # top-3, then p^(1/0.5)
    expected = tempered / tempered.sum()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, expected, rtol=0.0, atol=0.01)


def test_temperature_near_zero_samples_the_argmax():
    """At temperature 1e-6 a logit gap > 1e-4 leaves each other token a probability
    below e^-100, so the false-failure probability is below 64 · 49 · e^-100 < 1e-39."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3  # gaps: checked below
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    draws = sample_next(logits, temperature=1e-6, generator=g)
    assert torch.equal(draws, logits.argmax(-1))


def test_sampled_generation_is_reproducible_from_the_seed():
    """Two seeds giving the same 30 tokens would take 30 agreeing draws from
    distributions over 64 tokens; the seeds are fixed, so the outcome is too."""
    model, idx = make_model(), torch.tensor([[3, 1, 4]])
    runs = [
        generate(model, idx, 30, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("attn_impl", ["manual", "fast"])
def test_greedy_generation_equals_argmax_of_a_full_forward_at_every_step(attn_impl):
    model = make_model(attn_impl=attn_impl)
    idx = torch.tensor([[5, 9, 2], [7, 7, 1]])
    out = generate(model, idx, 12, temperature=0.0)  # 3 + 12 <= context_length 16
    assert torch.equal(out, greedy_by_full_forward(model, idx, 12))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GPT-2 style: learned positions, LayerNorm, tied head
        {
            "pos": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "n_kv_heads": 2,
            "bias": False,
            "tie_embeddings": False,
        },  # modern style, GQA
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_generation_give_identical_tokens(overrides, temperature):
    """30 new tokens after 5 with context_length 16 also cross two window slides."""
    model = make_model(**overrides)
    idx = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    outs = [
        generate(
            model, idx, 30, temperature=temperature, top_k=20, use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
        )
        for use_cache in (True, False)
    ]  # fmt: skip
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_matvec_layout_changes_strides_only_not_values_logits_or_tokens(tie_embeddings):
    model = make_model(tie_embeddings=tie_embeddings, mlp="swiglu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(idx)
    tokens = generate(model, idx, 20, temperature=0.0)
    assert matvec_layout(matvec_layout(model)) is model  # a second call changes nothing
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(model.parameters()) == params  # same Parameter objects, still tied
    assert (model.lm_head.weight is model.tok_emb.weight) == tie_embeddings
    for name in ["lm_head", "blocks.0.attn.w_qkv", "blocks.0.mlp.w_up"]:
        weight = model.get_submodule(name).weight  # (out, in), out >= in
        assert weight.t().is_contiguous() and not weight.is_contiguous(), name
    assert model.blocks[0].mlp.w_down.weight.is_contiguous()  # out < in: untouched
    with torch.no_grad():  # the same products, maybe summed in another order
        torch.testing.assert_close(model(idx), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, idx, 20, temperature=0.0), tokens)


def test_window_slides_by_half_a_context_when_the_context_is_full():
    assert [slide_window(0, n, 16) for n in (15, 16, 17)] == [0, 0, 9]
    assert slide_window(9, 25, 16) == 9 and slide_window(9, 26, 16) == 18


def test_a_prompt_longer_than_the_context_warns_and_keeps_its_last_tokens():
    model = make_model()
    idx = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="context_length=16"):
        out = generate(model, idx, 1, temperature=0.0)
    expected = greedy_by_full_forward(model, idx[:, -16:], 1)[:, -1]
    assert torch.equal(out[:, -1], expected)


def test_stop_tokens_end_each_row_and_finished_rows_repeat_their_stop_token():
    script = [5, 6, 9, 7, 8]
    model = ScriptedModel(script, prompt_len=2, vocab_size=16)
    out = generate(model, torch.tensor([[1, 2]]), 10, temperature=0.0, stop_tokens={9})
    assert out.tolist() == [[1, 2, 5, 6, 9]]
    assert list(stream(model, [1, 2], 10, stop_tokens={9}, temperature=0.0)) == [
        5,
        6,
        9,
    ]
    assert list(stream(model, [1, 2], 2, temperature=0.0)) == [5, 6]


class RowScriptedModel(ScriptedModel):
    """A stand-in whose row b writes `scripts[b]`, whatever the input."""

    def __init__(self, scripts: list[list[int]], prompt_len: int, vocab_size: int):
        super().__init__(scripts[0], prompt_len, vocab_size)
        self.scripts = scripts

    def forward(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            kv_cache.advance(T)
        n = start + T - self.prompt_len
        logits = torch.zeros(B, T, self.config.vocab_size)
        for row in range(B):
            logits[row, -1, self.scripts[row][min(n, len(self.scripts[row]) - 1)]] = 1
        return logits


def test_a_finished_row_repeats_its_stop_token_and_batches_cut_completions_there():
    model = RowScriptedModel([[5, 9, 6, 7], [5, 6, 7, 9]], prompt_len=2, vocab_size=16)
    prompts = torch.tensor([[1, 2], [3, 4]])
    out = generate(model, prompts, 10, temperature=0.0, stop_tokens={9})
    assert out.tolist() == [[1, 2, 5, 9, 9, 9], [3, 4, 5, 6, 7, 9]]
    completions = generate_batch(model, prompts.tolist(), 10, temperature=0.0,
                                 stop_tokens=[9])  # fmt: skip
    assert completions == [[5], [5, 6, 7]]  # each ends before its stop token


def test_batched_prompts_of_different_lengths_match_decoding_each_alone():
    model = make_model()
    prompts = [[1, 2, 3], [4], [5, 6, 7], [8, 9]]
    completions = generate_batch(model, prompts, 6, temperature=0.0)
    for prompt, completion in zip(prompts, completions):
        alone = greedy_by_full_forward(model, torch.tensor([prompt]), 6)
        assert completion == alone[0, len(prompt) :].tolist()


def test_generate_restores_the_training_mode_and_rejects_an_empty_prompt():
    model = make_model().train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training
    with pytest.raises(ValueError, match="T >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)


def test_max_new_tokens_zero_returns_the_prompt():
    idx = torch.tensor([[1, 2]])
    assert torch.equal(generate(make_model(), idx, 0), idx)


# ---------------------------------------------------------------- text streaming


def scripted(tokenizer, pieces: list[bytes], prompt: str) -> ScriptedModel:
    """A stand-in model that writes `pieces`, one token each, after `prompt`."""
    script = [tokenizer.vocab.index(piece) for piece in pieces] + [tokenizer.eot_id]
    n_prompt = len(tokenizer.encode(prompt))
    return ScriptedModel(script, n_prompt, tokenizer.vocab_size)


def test_stream_text_prints_a_character_split_across_tokens_once_whole():
    tokenizer = gpt2_tokenizer()
    pieces = [
        b"ca",
        b"f",
        b"\xc3",
        b"\xa9",
        b" ",
        b"\xf0",
        b"\x9f",
        b"\xa4",
        b"\x96",
        b"!",
    ]
    model = scripted(tokenizer, pieces, "A")
    out = list(stream_text(model, tokenizer, "A", 20, temperature=0.0))
    assert "".join(out) == "café 🤖!"  # and the end-of-text token is not printed
    assert not any("\ufffd" in piece for piece in out)
    assert out[:4] == ["ca", "f", "é", " "]  # each piece as soon as it is whole


def test_stream_text_stops_before_a_stop_string_split_across_tokens():
    tokenizer = gpt2_tokenizer()
    pieces = [b"Hello", b" wor", b"ld", b" and", b" more"]
    model = scripted(tokenizer, pieces, "A")
    out = list(stream_text(model, tokenizer, "A", 20, stop=["world"], temperature=0))
    assert "".join(out) == "Hello "
    unstopped = stream_text(model, tokenizer, "A", 20, stop=["worm"], temperature=0)
    assert "".join(unstopped) == "Hello world and more"


# ---------------------------------------------------------------- buildllm sample


@pytest.fixture(scope="module")
def small_tokenizer() -> BPETokenizer:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return BPETokenizer.train(f.read(30_000), 300, progress=False, workers=1)


def test_cli_sample_from_an_exported_hf_folder_matches_transformers_greedy(
    tmp_path, capsys, small_tokenizer
):
    transformers = pytest.importorskip("transformers")
    model = make_model(vocab_size=small_tokenizer.vocab_size, context_length=32)
    export_hf(model, tmp_path, eot_id=small_tokenizer.eot_id)
    export_tokenizer_hf(small_tokenizer, tmp_path)
    argv = ["sample", "--hf-checkpoint", str(tmp_path), "--prompt", "def read(",
            "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    idx = torch.tensor([hf_tokenizer.encode("def read(")])
    out = hf_model.generate(idx, max_new_tokens=12, do_sample=False)[0, idx.shape[1] :]
    expected = hf_tokenizer.decode(out, skip_special_tokens=True)
    assert printed == "def read(" + expected + "\n"


def test_cli_sample_names_a_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert main(["sample", "--checkpoint", str(tmp_path / "model.safetensors")]) == 1
    assert "no buildllm model config" in capsys.readouterr().err


def test_cli_sample_rejects_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    export_hf(make_model(vocab_size=64), tmp_path)
    assert (
        main(["sample", "--hf-checkpoint", str(tmp_path), "--tokenizer", "gpt2"]) == 1
    )
    assert "50257 ids but the model only 64" in capsys.readouterr().err


def test_cli_sample_from_a_training_checkpoint_matches_greedy_by_full_forward(
    tmp_path, capsys, small_tokenizer
):
    model = make_model(vocab_size=small_tokenizer.vocab_size, context_length=32)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, optimizer, model.config, state={})
    small_tokenizer.save(tmp_path / TOKENIZER)  # where `buildllm train` keeps it
    argv = ["sample", "--checkpoint", str(tmp_path), "--prompt", "import os",
            "--max-new-tokens", "10", "--temperature", "0"]  # fmt: skip
    assert main(argv) == 0

    idx = torch.tensor([small_tokenizer.encode("import os")])
    new = greedy_by_full_forward(model, idx, 10)[0, idx.shape[1] :].tolist()
    if small_tokenizer.eot_id in new:  # the end-of-text token ends the sample
        new = new[: new.index(small_tokenizer.eot_id)]
    expected = "import os" + small_tokenizer.decode(new) + "\n"
    assert capsys.readouterr().out == expected
