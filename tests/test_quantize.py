"""Int8 weight-only quantization against float32 torch on the dequantized weights.

References: the float32 weight itself (each int8 weight within half a step of it), and
`F.linear` in float32 on the dequantized weight with the input rounded to bf16 as the
layer rounds it (both of the layer's paths, the int8 kernel for a few rows and the
bf16 matmul for many). The trained model's logits and greedy tokens against float32
are in test_bf16.py, beside bf16's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.model import GPT
from buildllm.quantize import KERNEL_ROWS, Int8Linear, quantize_int8


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(96, 200)
    with torch.no_grad():
        layer.weight[3] *= 40  # rows of very different sizes: one scale per row
        layer.weight[7] = 0.0  # an all-zero row must not divide by zero
    return layer


def test_each_weight_is_within_half_a_step_of_its_float32_value(linear):
    q = Int8Linear(linear.weight, linear.bias)
    w, scale = linear.weight.detach(), q.scale.float()[:, None]  # (out, in), (out, 1)
    assert q.weight_int8.dtype == torch.int8
    assert ((q.dequantized() - w).abs() <= scale / 2 * (1 + 1e-6)).all()
    # the range is used: each nonzero row's largest weight maps to +-127
    peak = q.weight_int8.abs().amax(1)
    assert peak[7] == 0 and (peak[torch.arange(200) != 7] == 127).all()


@pytest.mark.parametrize("rows", [1, KERNEL_ROWS, 3 * KERNEL_ROWS + 1])
def test_int8_linear_computes_the_dequantized_linear(linear, rows):
    q = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, rows, 96)  # (B, T, in): the kernel sees B*T rows
    want = F.linear(x.bfloat16().float(), q.dequantized(), linear.bias)
    got = q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # bf16 products summed in the kernel, the result rounded to bf16 (2^-9 relative)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_quantize_int8_swaps_every_linear_and_the_tied_head(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    table = model.tok_emb.weight.detach().clone()
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    head = model.lm_head.dequantized()  # the tied head: rounded from the token table
    step = model.lm_head.scale.float()[:, None]  # (V, 1)
    assert ((head - table).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(model.tok_emb.weight, table)  # lookups stay float32


def test_quantize_int8_refuses_a_model_off_the_cpu(tiny_config):
    model = GPT(tiny_config).to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(model)
