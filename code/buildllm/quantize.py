"""Int8 weight-only quantization: CPU decoding reads a quarter of float32's bytes.

Taught in Appendix B (Performance). Decoding one token multiplies every weight matrix
by one vector, so its time is the time to read the matrices. `Int8Linear` stores a
Linear's weight as int8 with one scale per output row (symmetric: the row's largest
magnitude maps to 127), a quarter of float32's bytes, and multiplies bf16 activations
by it with PyTorch's CPU kernel `torch._weight_int8pack_mm`; activations stay float32
between layers. The price is rounding: each weight moves by at most half its row's
scale, so logits differ from float32's in their second or third digit.
`quantize_int8` swaps every nn.Linear of a model (a tied head too) for one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Measured (torch 2.13, AMX Xeon): the int8 kernel beats float32 up to about 8 rows
# (decoding a batch) and loses beyond; longer inputs (a prompt) multiply by the
# weight dequantized to bf16 instead, which is faster than float32 there.
KERNEL_ROWS = 8


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with a bf16 scale per output row, for decoding.

    Built from a Linear's `weight` (out, in) and `bias`; inference only (no gradients
    reach int8). Shapes: x (..., in) float -> (..., out), x's dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        # The scale is rounded to bf16 first, so dividing by it is what is stored: a
        # row's largest weight lands within 127 * (1 + 2^-8) of zero, rounding to 127.
        scale = (w.abs().amax(1) / 127).clamp(min=1e-30).to(torch.bfloat16)  # (out,)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def dequantized(self) -> Tensor:
        """Return the weight the layer multiplies by, int8 * scale. Shapes: (out, in)."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (..., in) -> (..., out)."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        if rows.shape[0] <= KERNEL_ROWS:
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        else:
            y = (rows @ self.weight_int8.T.to(torch.bfloat16)) * self.scale  # (N, out)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` for an `Int8Linear`, in place; returns `model`.

    A head tied to the token table gets its own int8 copy (the table stays float32
    for lookups). For decoding on a CPU; raises ValueError for a model elsewhere
    (the kernel is CPU-only: use bf16 weights on a GPU).
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"int8 weights decode on a CPU only, the model is on {device}; use "
            "bfloat16 weights there"
        )
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return model
