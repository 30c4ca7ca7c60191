"""Low-rank adapters (LoRA): train a small update B·A beside each frozen weight.

Taught in Chapter 9 (Classification). A LoRA layer computes W x + (alpha/r)·B A x
(eq-lora) with the pretrained W frozen, A (r, in) and B (out, r) trainable and B = 0 at
the start, so the adapted model begins exactly equal to the base. After training the
update folds into W (`merge_lora`) at no cost at inference, or stays apart so that one
base serves many tasks, each a small adapter file (`save_adapters`).
Reference: Hu et al. 2021 (arXiv:2106.09685).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# The Linear layers of a block (attention and MLP), by their names in model.py; add
# "tok_emb" to adapt the token embeddings too (`LoRAEmbedding`).
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
        self._setup(base, rank, alpha, base.in_features, base.out_features)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init

    def _setup(
        self, base: nn.Module, rank: int, alpha: float, d_in: int, d_out: int
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be at least 1")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
        self.merged = False

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (with the update while merged), as the base has."""
        return self.base.weight

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


class LoRAEmbedding(LoRALinear):
    """An `nn.Embedding` plus a rank-`rank` update: the token table's own adapter.

    A lookup is a Linear applied to a one-hot vector of the vocabulary's size, so
    the update is the same (alpha/r)·B A with in = vocabulary, out = d_model; looking
    token v up reads column v of A. The table stores one row per token, so the update
    it holds when merged is (B A)^T.
    Shapes: idx (...) int -> (..., D); lora_a (r, V), lora_b (D, r).
    """

    def __init__(self, base: nn.Embedding, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self._setup(base, rank, alpha, base.num_embeddings, base.embedding_dim)
        # Reversed from LoRALinear, as in the LoRA authors' loralib: a token's column
        # of A starts at zero and B random, so B A = 0 still and each token looked up
        # gets a gradient at once; with B = 0 it would wait for B to grow, and trains
        # measurably worse. B's columns start at the size of the table's entries.
        nn.init.zeros_(self.lora_a)
        nn.init.normal_(self.lora_b, std=float(base.weight.detach().std()))

    def forward(self, idx: Tensor) -> Tensor:
        """Shapes: idx (...) -> (..., D)."""
        y = self.base(idx)  # (..., D)
        if self.merged:
            return y
        a_x = F.embedding(idx, self.lora_a.T)  # (..., r): the columns of A
        return y + a_x @ self.lora_b.T * self.scaling  # (..., D)

    def delta_weight(self) -> Tensor:
        """Return the update of the table, (alpha/r)·(B A)^T. Shapes: -> (V, D)."""
        return super().delta_weight().T  # (V, D)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Freeze `model` and wrap each layer named in `targets` in an adapter.

    An `nn.Linear` becomes a `LoRALinear`, an `nn.Embedding` (e.g. "tok_emb") a
    `LoRAEmbedding`. Afterwards only the adapters train (unfreeze a new head
    yourself). Returns the names of the wrapped layers. Raises ValueError if no layer
    matches `targets`, or for an embedding tied to the output head, whose merged
    update would also change the head.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in targets:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Embedding):
                if shared[id(child.weight)] > 1:
                    raise ValueError(
                        f"{full} is tied to the output head: LoRA on it would change "
                        "the head too; untie them first (classify.add_classifier_head "
                        "does) or leave it out of targets"
                    )
                lora: LoRALinear = LoRAEmbedding(child, rank, alpha)
            elif isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
            else:
                continue
            setattr(module, child_name, lora.to(child.weight.device))
            wrapped.append(full)
    if not wrapped:
        raise ValueError(
            f"no nn.Linear or nn.Embedding named one of targets={tuple(targets)} in "
            f"the model; use names of its layers, e.g. {DEFAULT_TARGETS}"
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
    """Count the adapter parameters: r·(in + out) per wrapped layer."""
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
