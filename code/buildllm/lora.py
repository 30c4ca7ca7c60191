"""Low-rank adapters (LoRA): train a small update B·A beside each frozen weight.

Taught in Chapter 8 (Classification). A LoRA layer computes W x + (alpha/r)·B A x
(eq-lora) with the pretrained W frozen, A (r, in) and B (out, r) trainable and B = 0 at
the start, so the adapted model begins exactly equal to the base. After training the
update folds into W (`merge_lora`) at no cost at inference, or stays apart so that one
base serves many tasks, each a small adapter file (`save_adapters`).
Reference: Hu et al. 2021 (arXiv:2106.09685).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# The Linear layers of a block (attention and MLP), by their names in model.py.
DEFAULT_TARGETS = ("w_qkv", "w_o", "w_up", "w_gate", "w_down")


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a trainable rank-`rank` update scaled by alpha / rank.

    `lora_a` starts like an nn.Linear weight (Kaiming uniform), `lora_b` at zero, so
    the layer first computes exactly `base(x)`. While merged, the update lives inside
    `base.weight` and forward is the base Linear alone.
    Shapes: x (..., in) -> (..., out); lora_a (r, in), lora_b (out, r).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be at least 1")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (..., in) -> (..., out), eq-lora."""
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        return y + (x @ self.lora_a.T) @ self.lora_b.T * self.scaling  # (..., out)

    def delta_weight(self) -> Tensor:
        """Return the update (alpha/r)·B A that `merge` adds to the weight.

        Shapes: -> (out, in), of rank at most `rank`.
        """
        return self.lora_b @ self.lora_a * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `base.weight` (no extra work per forward)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `base.weight`, undoing `merge`."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Freeze `model` and wrap each Linear named in `targets` in a `LoRALinear`.

    Afterwards only the adapters train (unfreeze a new head yourself). Returns the
    names of the wrapped layers. Raises ValueError if no Linear matches `targets`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha).to(child.weight.device)
                setattr(module, child_name, lora)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(
            f"no nn.Linear named one of targets={tuple(targets)} in the model; "
            f"use names of its layers, e.g. {DEFAULT_TARGETS}"
        )
    return wrapped


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Return the model's LoRA layers in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter's update into its weight (`LoRALinear.merge`)."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter's update back out of its weight."""
    for layer in lora_layers(model):
        layer.unmerge()


def count_lora_params(model: nn.Module) -> int:
    """Count the adapter parameters: r·(in + out) per wrapped Linear."""
    return sum(m.lora_a.numel() + m.lora_b.numel() for m in lora_layers(model))


def adapter_state_dict(
    model: nn.Module, extra: Sequence[str] = ()
) -> dict[str, Tensor]:
    """Return the adapters' tensors (and those of the parameters named in `extra`)."""
    return {
        name: t.detach().cpu().contiguous()
        for name, t in model.state_dict().items()
        if name.endswith((".lora_a", ".lora_b")) or name in extra
    }


def save_adapters(
    model: nn.Module, path: str | Path, extra: Sequence[str] = ()
) -> Path:
    """Write only the adapters (plus `extra` parameters, e.g. a head) as safetensors.

    The file is a few percent of the model; the base weights come from the base model.
    Raises ValueError if the model has no adapters or one is merged.
    """
    layers = lora_layers(model)
    if not layers or any(layer.merged for layer in layers):
        raise ValueError(
            "save_adapters needs unmerged LoRA layers; call add_lora first, or "
            "unmerge_lora before saving"
        )
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(adapter_state_dict(model, extra), tmp)
    tmp.replace(path)  # atomic: never half a file
    return path


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load adapters `save_adapters` wrote into a model wrapped alike by `add_lora`.

    Raises FileNotFoundError for a missing file and ValueError if its tensors do not
    match the model's adapters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    tensors = load_file(path)
    own = model.state_dict()
    missing = [
        k for k in own if k.endswith((".lora_a", ".lora_b")) and k not in tensors
    ]
    unknown = [k for k in tensors if k not in own]
    resized = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unknown or resized:
        raise ValueError(
            f"{path} does not fit this model (missing {missing[:3]}, unknown "
            f"{unknown[:3]}, other shape {resized[:3]}); wrap the same base with "
            "the same add_lora settings (rank, targets)"
        )
    model.load_state_dict(tensors, strict=False)
