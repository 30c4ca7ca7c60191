"""bf16: training under autocast tracks float32; bf16 and int8 weights decode as float32.

References: the same run in float32 (losses step by step), the float32 model's logits
and greedy tokens, and the CPU flags `weights_dtype` reads (mocked both ways). bf16
keeps 8 bits of mantissa (relative rounding 2^-9, about 0.2 %), so the losses of a run
drift apart slowly and logits differ in their third digit; the tolerances below are a
few times what was measured (in the comments beside them).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from buildllm import distributed
from buildllm.cli import main
from buildllm.generate import generate
from buildllm.quantize import Int8Linear, quantize_int8
from buildllm.train import TrainConfig, Trainer

RUN = TrainConfig(batch_size=8, max_steps=50, eval_interval=50, eval_steps=2,
                  checkpoint_interval=50, sample_tokens=None, warmup_steps=5,
                  max_lr=3e-3, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, tuple[Trainer, list]]:
    """The same 50 steps of the tiny preset in float32 and under bf16 autocast."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path_factory.mktemp(dtype)
        trainer = Trainer(replace(RUN, dtype=dtype, out_dir=str(folder)), progress=False)
        out[dtype] = (trainer, trainer.fit())
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The embedded corpus's tokenizer cached once for the module, as other tests do."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.getbasetemp() / "buildllm-cache"
        patch.setenv("BUILDLLM_CACHE", str(cache))
        yield patch


def test_a_bf16_autocast_run_tracks_the_float32_losses_for_50_steps(runs):
    fp32, bf16 = (np.array([r["loss"] for r in runs[d][1] if "loss" in r])
                  for d in ("float32", "bfloat16"))  # fmt: skip
    assert len(fp32) == len(bf16) == RUN.max_steps
    assert fp32[-1] < fp32[0] - 1.0  # it learned: the comparison means something
    # identical for the first steps, then the rounding compounds: measured at most
    # 1.7 % of the loss at a step, 0.08 on the final validation loss (about 5.5)
    assert (np.abs(bf16 - fp32) / fp32).max() < 0.04
    val = [runs[d][1][-1]["val_loss"] for d in ("float32", "bfloat16")]
    assert abs(val[1] - val[0]) < 0.2


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_bf16_and_int8_weights_decode_the_float32_models_logits_and_tokens(runs, dtype):
    trainer = runs["float32"][0]
    model = trainer.model.eval()
    low = copy.deepcopy(model)
    low = quantize_int8(low) if dtype == "int8" else low.to(torch.bfloat16)
    window = torch.as_tensor(np.asarray(trainer.objective.val_tokens[:64], np.int64))[None]
    with torch.no_grad():
        want, got = model(window), low(window).float()  # (1, T, V)
    scale = want.std().item()
    # measured: at most 0.02 of the std (bf16), 0.023 (int8)
    assert (got - want).abs().max().item() < 0.1 * scale
    prompt = window[:, :16]
    tokens = {name: generate(m, prompt, 8, temperature=0)[0, 16:].tolist()
              for name, m in (("fp32", model), (dtype, low))}  # fmt: skip
    assert tokens[dtype] == tokens["fp32"]


@pytest.mark.parametrize("native", [True, False])
def test_decoding_weights_are_bf16_on_cuda_and_float32_on_any_cpu(monkeypatch, native):
    # measured on an AMX CPU (Appendix B): bf16 weights decode slower than float32
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: native)
    assert distributed.weights_dtype("cpu", "auto") == torch.float32
    assert distributed.weights_dtype("cuda", "auto") == torch.bfloat16
    assert distributed.weights_dtype("cpu", "float32") == torch.float32
    assert distributed.weights_dtype("cpu", "bfloat16") == torch.bfloat16


def test_sample_holds_the_weights_in_the_dtype_asked_for(runs, monkeypatch, capsys):
    from buildllm import cli_sample

    seen = []
    real = cli_sample.load_cli_model

    def spy(*args):
        model = real(*args)
        seen.append((next(model.parameters()).dtype, type(model.lm_head)))
        return model

    monkeypatch.setattr(cli_sample, "load_cli_model", spy)
    run = runs["float32"][0].out_dir
    for dtype in ("bfloat16", "float32", "int8"):
        argv = ["sample", "--checkpoint", str(run), "--max-new-tokens", "3",
                "--device", "cpu", "--dtype", dtype, "--prompt", "ROMEO:"]  # fmt: skip
        assert main(argv) == 0
    assert seen == [
        (torch.bfloat16, torch.nn.Linear),
        (torch.float32, torch.nn.Linear),
        (torch.float32, Int8Linear),
    ]
    assert capsys.readouterr().out.count("ROMEO:") == 3


def test_int8_off_the_cpu_is_a_one_line_usage_error(runs, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "resolve_device", lambda device: "cuda")
    argv = ["sample", "--checkpoint", str(runs["float32"][0].out_dir), "--dtype", "int8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--dtype int8" in err and "--device cpu" in err
