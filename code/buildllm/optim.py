"""Loss, optimizer, gradient clipping and learning-rate schedule: what makes GPT learn.

Taught in Chapter 6 (Training), top to bottom: the next-token cross-entropy, AdamW
written out (checked step for step against `torch.optim.AdamW`), the parameter groups
that skip weight decay, global-norm clipping and linear warmup + cosine decay. Each
written-out piece has a fast twin (`impl="fast"`) that calls PyTorch's fused kernels.
References: Kingma & Ba 2014 (arXiv:1412.6980, Adam); Loshchilov & Hutter 2017
(arXiv:1711.05101, AdamW) and 2016 (arXiv:1608.03983, cosine schedule); Pascanu et
al. 2012 (arXiv:1211.5063, clipping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    impl: Literal["manual", "fast"] = "fast",
    ignore_index: int = -100,
) -> Tensor:
    """Return the mean negative log-probability the model gives each target token.

    "manual" writes out log-softmax (logits minus their log-sum-exp) and picks each
    target's entry with `gather`; "fast" calls `F.cross_entropy`. Both compute in
    float32 whatever the logits' dtype, so a bf16 forward still gets an accurate loss.
    Targets equal to `ignore_index` (PyTorch's -100) are left out of the mean: the
    prompt tokens of fine-tuning (Chapter 10); NaN if every target is ignored.

    Shapes: logits (B, T, V), targets (B, T) int64 -> scalar; or (N, V) and (N,),
    e.g. the positions a classifier or a loss mask picked out.
    Raises ValueError if the shapes do not line up.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits have shape {tuple(logits.shape)} but targets "
            f"{tuple(targets.shape)}; targets need the logits' shape without the last "
            "(vocabulary) dimension"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up
    if impl == "fast":
        return F.cross_entropy(  # F.cross_entropy wants (N, V) and (N,)
            logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index
        )
    peak = logits.amax(dim=-1, keepdim=True).detach()  # (..., 1); keeps exp() finite
    log_z = peak + (logits - peak).exp().sum(dim=-1, keepdim=True).log()  # (..., 1)
    log_probs = logits - log_z  # (..., V); eq-log-softmax
    keep = targets != ignore_index  # (...): (B, T) or (N,)
    picked = log_probs.gather(-1, targets.where(keep, 0).unsqueeze(-1))  # (..., 1)
    return -picked.squeeze(-1)[keep].mean()  # eq-cross-entropy


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay, written out (Loshchilov & Hutter, eq-adamw).

    Keeps the moments under torch's names (`exp_avg`, `exp_avg_sq`, `step`) and follows
    `torch.optim.AdamW`'s order of operations, so both give the same parameters step
    for step; `make_optimizer(impl="fast")` returns torch's fused or foreach version.
    Raises ValueError for a negative learning rate or betas outside [0, 1).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr} is negative; use a learning rate >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} must both lie in [0, 1), e.g. (0.9, 0.95)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """Update every parameter that has a gradient by one AdamW step."""
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                param.mul_(1 - lr * weight_decay)  # decoupled: not part of the gradient
                exp_avg.lerp_(grad, 1 - beta1)  # m_t = beta1 m + (1 - beta1) g
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
                bias_correction1 = 1 - beta1**step  # m_t / (1 - beta1^t) is unbiased
                bias_correction2 = 1 - beta2**step
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the parameters into a group with weight decay and one without.

    Only matrices that multiply activations (attention and MLP weights, an untied
    `lm_head`) are decayed. Norm gains and biases are 1-D: shrinking them towards zero
    changes what a layer can express, not its complexity. Embedding rows are looked up,
    not multiplied, and rare tokens would be pulled to zero between their rare updates.
    A tied `lm_head.weight` *is* `tok_emb.weight`, so it is not decayed either.
    """
    embeddings = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():  # each shared (tied) parameter once
        if not param.requires_grad:
            continue
        if param.dim() >= 2 and id(param) not in embeddings:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    impl: Literal["manual", "fast"] = "fast",
) -> torch.optim.Optimizer:
    """Return AdamW over `param_groups(model, weight_decay)`.

    "manual" is this module's `AdamW`; "fast" is `torch.optim.AdamW` with `fused=True`
    on CUDA (one kernel for all parameters) and the multi-tensor `foreach` path
    elsewhere.
    Raises ValueError for an unknown `impl`.
    """
    groups = param_groups(model, weight_decay)
    if impl == "manual":
        return AdamW(groups, lr=lr, betas=betas, eps=eps)
    if impl != "fast":
        raise ValueError(f"impl={impl!r} is not one of 'manual', 'fast'")
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=on_cuda, foreach=not on_cuda
    )


def clip_grad_norm(
    params: Iterable[nn.Parameter],
    max_norm: float = 1.0,
    impl: Literal["manual", "fast"] = "fast",
) -> Tensor:
    """Scale all gradients together so their global L2 norm is at most `max_norm`.

    The global norm treats every gradient as one long vector (eq-clip); scaling them all
    by one factor keeps the update's direction and bounds its size. Returns the norm
    *before* clipping (a useful health signal). "fast" calls
    `torch.nn.utils.clip_grad_norm_`, which also handles sharded (FSDP) gradients.

    Shapes: returns a scalar tensor.
    """
    params = [p for p in params if p.grad is not None]
    if impl == "fast":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.tensor(0.0)
    norms = torch.stack([p.grad.detach().float().norm() for p in params])  # (n_params,)
    total_norm = norms.norm()  # sqrt of the sum of squared norms
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)  # 1e-6 as torch: no 0-div
    for p in params:
        p.grad.detach().mul_(scale.to(p.grad.dtype))
    return total_norm


def lr_at(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int
) -> float:
    """Return the learning rate for optimizer step `step` (counted from 0).

    Linear warmup from max_lr / warmup_steps to max_lr over the first `warmup_steps`
    steps (Adam's moment estimates are noisy at first), then half a cosine from max_lr
    down to min_lr at `max_steps` (eq-cosine), and min_lr after that.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
