"""The training loop: batches, loss, backward, clipping, AdamW, evaluation, checkpoints.

Taught in Chapter 6 (Training); Chapter 8 runs it at GPT-2 scale. One optimizer
step draws a global batch, runs forward + shifted cross-entropy + backward on
micro-batches (gradient accumulation, shared out over torchrun processes), clips the
global gradient norm, sets the scheduled learning rate and steps AdamW. Around it: bf16
autocast on CUDA, optional `torch.compile`, periodic validation and samples, JSONL
metrics, tqdm progress, atomic checkpoints and an exact resume. Follows nanoGPT's
train.py and llm.c's GPT-2 small recipe (Karpathy 2023-24); GPT-2: Radford et al. 2019.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from buildllm.checkpoint import (
    METRICS,
    append_metrics,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    read_metrics,
    restore_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
    truncate_metrics,
)
from buildllm.checks import TRAIN_RULES, check_fields
from buildllm.data import get_cache_dir
from buildllm.datasources import resolve_model
from buildllm.distributed import (
    TOKENIZER,
    Strategy,
    all_reduce_mean,
    autocast_for,
    barrier,
    gradient_sync,
    init_distributed,
    peak_flops,
    unwrap,
    wrap_model,
)
from buildllm.model import GPT, PRESETS, GPTConfig, flops_per_token
from buildllm.objective import LMObjective, Objective
from buildllm.optim import clip_grad_norm, lr_at, make_optimizer
from buildllm.runfolder import RunLock, remove_run_files
from buildllm.tokenizer import BPETokenizer

# llm.c's GPT-2 small recipe: 8 x 1024 x 64 = 524,288 tokens a step, 10B in all.
GPT2_RUN = {
    "data": "fineweb-edu", "batch_size": 8, "grad_accum_steps": 64, "max_steps": 19_073,
    "max_lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 715, "eval_interval": 250,
    "eval_steps": 20, "checkpoint_interval": 1000, "sample_tokens": 64, "compile": True,
}  # fmt: skip
# What `--preset NAME` sets besides the model (GPTConfig.from_preset(NAME)).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {}, "modern-tiny": {}, "gpt2-124m": GPT2_RUN, "modern": GPT2_RUN,
}  # fmt: skip
# Settings a resumed run may change: they affect speed, logging or where the run ends.
RESUME_MAY_DIFFER = (
    "device", "dtype", "compile", "out_dir", "max_steps", "eval_interval", "strategy",
    "checkpoint_interval", "keep_checkpoints", "sample_tokens", "peak_flops",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults train the tiny model on a CPU.

    Each forward pass takes `batch_size` sequences of the model's context_length;
    `grad_accum_steps` such micro-batches, shared out over the torchrun processes, make
    one optimizer step, so a step sees batch_size x grad_accum_steps x context_length
    tokens however many processes run. `None` switches `grad_clip`, `sample_tokens` and
    `peak_flops` off. `model` is a GPTConfig, or None or a dict of GPTConfig fields
    over the preset's model, resolved by `resolve_model`: its vocab_size, unless given,
    follows the data's tokenizer. Raises ValueError for a value outside its range.
    """

    preset: str = "tiny"  # the model (unless `model` is given) and TRAIN_PRESETS
    model: GPTConfig | dict[str, Any] | None = None  # None or a dict: `resolve_model`
    data: str = "shakespeare"  # an embedded corpus, token files, or text files
    tokenizer: str | None = None  # a file or "gpt2"; None: the data's own, or trained
    out_dir: str = "runs/tiny"
    batch_size: int = 32
    grad_accum_steps: int = 1
    max_steps: int = 600
    max_lr: float = 4e-3  # a 1M-parameter model takes larger steps than GPT-2 (6e-4)
    min_lr: float = 4e-4  # max_lr / 10 at the end of the cosine, as GPT-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3's: forgets old squared gradients faster than 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    eval_interval: int = 50
    eval_steps: int = 8  # validation batches per evaluation
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    sample_tokens: int | None = 64  # tokens generated at each evaluation
    seed: int = 1337
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 where native
    compile: bool = False
    impl: Literal["manual", "fast"] = "fast"  # of the loss, clipping and AdamW
    strategy: Strategy = "ddp"  # with several processes
    peak_flops: float | None = None  # FLOP/s of one device for MFU; None: GPU table

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"unknown preset {self.preset!r}; use one of {list(PRESETS)}"
            )
        if not isinstance(self.model, GPTConfig):  # frozen: resolve the model once
            fields = self.model or {}  # overrides, or asdict() of a checkpoint's model
            model = resolve_model(self.preset, self.data, self.tokenizer, **fields)
            object.__setattr__(self, "model", model)
        check_fields(self, TRAIN_RULES)  # ranges of the numbers, words of the choices
        if self.min_lr > self.max_lr:
            raise ValueError(
                f"min_lr={self.min_lr} must not exceed max_lr={self.max_lr}; "
                "the cosine decays from max_lr down to min_lr"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """Return preset `name`'s run (model and TRAIN_PRESETS[name]) with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {list(PRESETS)}")
        settings = {"out_dir": f"runs/{name}", **TRAIN_PRESETS.get(name, {})}
        return cls(**{**settings, **overrides, "preset": name})


class Trainer:
    """Train a GPT: build model, data and optimizer, then `fit()` step by step.

    Under torchrun every process builds the same model and draws the same global batch,
    keeping its own share of the micro-batches; only rank 0 logs and writes metrics
    (`out_dir/metrics.jsonl`) and checkpoints. `resume=True` continues the newest
    checkpoint in out_dir exactly. Messages go to `log` (default: `tqdm.write` to stderr
    if `progress`). What is minimised is the `objective` (default: `LMObjective`, next
    token prediction on `config.data`) for `model` (default: a new `GPT(config.model)`;
    fine-tuning passes a pretrained one, its frozen parameters not optimised).
    Raises ValueError or FileNotFoundError for a bad setting, data or checkpoint, and
    RuntimeError when the loss or gradient stops being finite.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        objective: Objective | None = None,
        model: nn.Module | None = None,
    ) -> None:
        c = self.config = config
        self.dist, self.device = init_distributed(c.device)
        self.progress = progress and self.dist.is_main
        if log is None and self.progress:
            log = lambda msg: tqdm.write(msg, file=sys.stderr)
        self.log = log if self.dist.is_main else None
        self.model_config = c.model
        if objective is None:
            objective = LMObjective(
                c.data,
                c.model,
                c.batch_size,
                c.grad_accum_steps,
                c.eval_steps,
                c.seed,
                c.impl,
                self.dist,
                c.tokenizer,
                self.say,
            )
        self.objective = objective
        self.tokenizer = self.objective.tokenizer
        self.tokens_per_step = self.objective.tokens_per_step
        self.flops_per_token = flops_per_token(self.model_config, training=True)
        self.peak_flops = c.peak_flops or peak_flops(self.device)
        self.autocast = autocast_for(self.device, c.dtype)
        torch.manual_seed(c.seed)  # the same initial weights on every process
        model = GPT(self.model_config) if model is None else model
        model = model.to(self.device).train()
        self.model = wrap_model(model, c.strategy, self.dist)  # FSDP swaps parameters
        self.optimizer = make_optimizer(
            model, c.max_lr, c.weight_decay, (c.beta1, c.beta2), c.eps, c.impl
        )
        self.step, self.out_dir = 0, Path(c.out_dir)
        self.lock = RunLock(self.out_dir)
        if self.dist.is_main:  # refuse to spoil another run's files; then lock
            self.lock.claim(resume, lambda: latest_checkpoint(self.out_dir) is not None)
        try:
            found = latest_checkpoint(self.out_dir)
            if found is not None:
                self.resume_from(found)
            elif self.dist.is_main:  # fresh, or resuming a run killed before step 1's
                self.restart_unsaved_run()
        except BaseException:
            self.lock.release()
            raise
        if c.compile:
            self.model = torch.compile(self.model)

    def train_step(self, step: int) -> dict[str, float]:
        """Run optimizer step `step` (from 0): accumulate gradients, clip, update.

        Returns the loss (mean over the global batch), learning rate and gradient norm.
        """
        c = self.config
        micro_batches = self.objective.next()  # this process's share of the step
        accum_local = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for micro, batch in enumerate(micro_batches):
            batch = [t.to(self.device, non_blocking=True) for t in batch]
            with gradient_sync(self.model, enabled=micro == accum_local - 1):
                with self.autocast():
                    loss = self.objective.loss(self.model, batch)  # eq-cross-entropy
                (loss / accum_local).backward()  # grads add up: the batch mean
            loss_sum += loss.detach()
        max_norm = math.inf if c.grad_clip is None else c.grad_clip
        impl = "fast" if c.strategy == "fsdp" else c.impl  # sharded gradients: torch's
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm, impl=impl).item()
        loss = all_reduce_mean(loss_sum / accum_local, self.dist).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.stop_diverged(step + 1, loss, grad_norm)  # before the update spoils it
        lr = lr_at(step, c.max_lr, c.min_lr, c.warmup_steps, c.max_steps)  # eq-cosine
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def fit(self) -> list[dict[str, Any]]:
        """Train from the current step to max_steps; return this call's metric records.

        A record holds step, loss, lr, grad_norm, tokens, tokens_per_s and mfu; at
        step 0, every eval_interval steps and at the end also val_loss and a sample.
        """
        c, records = self.config, []
        quiet = None if self.progress else True  # None: on only at a terminal
        bar = tqdm(total=c.max_steps, initial=self.step, unit="step", disable=quiet,
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        every = max(1, c.max_steps // 20)  # a plain line when no bar shows: a pipe
        plain = self.progress and bar.disable
        if self.dist.is_main:
            self.lock.acquire()
        try:
            if self.step == 0:
                records.append(self.record({"step": 0}, evaluate=True))
            for step in range(self.step + 1, c.max_steps + 1):
                start = time.perf_counter()
                metrics = self.train_step(step - 1)
                tokens_per_s = self.tokens_per_step / (time.perf_counter() - start)
                mfu = None
                if self.peak_flops:  # model FLOP/s over what the devices could do
                    world_peak = self.peak_flops * self.dist.world_size
                    mfu = self.flops_per_token * tokens_per_s / world_peak
                self.step = step
                record = {"step": step, **metrics, "tokens": step * self.tokens_per_step,
                          "tokens_per_s": tokens_per_s, "mfu": mfu}  # fmt: skip
                due = step % c.eval_interval == 0 or step == c.max_steps
                records.append(self.record(record, evaluate=due))
                bar.update(1)
                shown = f"loss {metrics['loss']:.3f}, {tokens_per_s:,.0f} tokens/s"
                bar.set_postfix_str(shown)
                if plain and (step % every == 0 or step == c.max_steps):
                    self.say(f"step {step}/{c.max_steps}: {shown}")
                if step % c.checkpoint_interval == 0 or step == c.max_steps:
                    self.save()
        finally:
            bar.close()
            self.lock.release()
        return records

    @torch.no_grad()
    def evaluate(self) -> float:
        """Return the mean validation loss over the objective's fixed batches.

        Every evaluation sees the same batches (`Objective.val_batches`), so the curve
        moves only because the model does; each process takes its share.
        """
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in self.objective.val_batches():
            batch = [t.to(self.device) for t in batch]
            with self.autocast():
                total += self.objective.loss(self.model, batch)
            count += 1
        self.model.train()
        return all_reduce_mean(total / count, self.dist).item()

    def sample(self, max_new_tokens: int, prompt: str = "") -> str:
        """Return the text the model writes after `prompt` (top-k 40, seeded by `seed`).

        An empty prompt starts from the end-of-text token, like a new document.
        """
        from buildllm.generate import decode_tokens, generate

        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id or 0]
        idx = torch.tensor([ids], device=self.device)  # (1, T)
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        model = unwrap(self.model)
        with self.autocast():
            out = generate(model, idx, max_new_tokens, top_k=40, generator=generator)
        model.train()
        return decode_tokens(self.tokenizer, out[0, len(ids) :].tolist())

    def save(self) -> Path | None:
        """Write a checkpoint of the current step; all processes join, rank 0 writes."""
        state = {
            "rng": rng_states(),
            "data": self.objective.state_dict(),  # the data position
            "train_config": asdict(self.config),
            "tokenizer_hash": self.tokenizer.hash,
        }
        folder = save_checkpoint(
            self.out_dir, self.step, unwrap(self.model), self.optimizer,
            self.model_config, state, self.config.keep_checkpoints, self.dist.is_main,
        )  # fmt: skip
        barrier(self.dist)
        return folder

    def resume_from(self, folder: Path) -> None:
        """Load weights, optimizer, RNG states and step from checkpoint `folder`."""
        state = restore_checkpoint(
            folder, unwrap(self.model), self.optimizer, self.model_config
        )
        check_resumable(state["train_config"], asdict(self.config), RESUME_MAY_DIFFER)
        if state["tokenizer_hash"] != self.tokenizer.hash:
            raise ValueError(f"{folder} used another tokenizer; resume with its --data")
        if state["step"] > self.config.max_steps:
            raise ValueError(
                f"{folder} is at step {state['step']}, past --max-steps "
                f"{self.config.max_steps}; pass --max-steps {state['step']} or more"
            )
        set_rng_states(state["rng"])
        self.objective.load_state_dict(state["data"])
        self.step = state["step"]
        if self.dist.is_main:  # a killed run logged steps after its checkpoint, and
            truncate_metrics(self.out_dir, self.step)  # may have been killed pruning
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        self.say(f"resumed from {folder} at step {self.step}")

    def restart_unsaved_run(self) -> None:
        """Start at step 0, as does a run killed before its first checkpoint (same data)."""
        saved = self.out_dir / TOKENIZER
        if saved.is_file() and BPETokenizer.load(saved).hash != self.tokenizer.hash:
            raise ValueError(
                f"{saved} is not the tokenizer of --data {self.config.data}; resume "
                "with the run's --data or choose another --out-dir"
            )
        truncate_metrics(self.out_dir, -1)  # what a killed run logged runs again
        self.tokenizer.save(saved)

    def record(self, record: dict[str, Any], evaluate: bool) -> dict[str, Any]:
        """Add val_loss and a sample to `record` if `evaluate`, log and write it."""
        if evaluate:
            record["val_loss"] = loss = self.evaluate()
            record.update(self.objective.val_metrics(loss))
            bpb = (
                f" ({record['val_bpb']:.3f} bits per byte)"
                if "val_bpb" in record
                else ""
            )
            self.say(f"step {record['step']}: validation loss {loss:.4f}{bpb}")
            if self.config.sample_tokens:
                record["sample"] = self.sample(self.config.sample_tokens)
                self.say(f"  sample: {record['sample']!r}")
        if self.dist.is_main:
            append_metrics(self.out_dir, record)
        return record

    def say(self, message: str) -> None:
        """Pass `message` to the log callback (rank 0 only)."""
        if self.log is not None:
            self.log(message)

    def stop_diverged(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise RuntimeError naming the last good checkpoint, which stays untouched."""
        found = latest_checkpoint(self.out_dir)
        kept = (
            f"the last good checkpoint, {found}, is kept" if found else "no checkpoint"
        )
        raise RuntimeError(
            f"training diverged at step {step} (loss {loss}, gradient norm "
            f"{grad_norm}); {kept}; --resume with a lower --max-lr (now "
            f"{self.config.max_lr}) or more --warmup-steps"
        )


def train_tiny(
    out_dir: str | Path | None = None, progress: bool = True, **overrides: Any
) -> tuple[GPT, BPETokenizer, list[dict[str, Any]]]:
    """Train the tiny model on Shakespeare on the CPU, or reuse a finished run.

    Returns (model in eval mode, tokenizer, metric records). `out_dir` defaults to
    `data.get_cache_dir() / "tiny-model"`, which the book's chapters share, so it
    trains once. A finished run with the same settings is loaded, an unfinished one
    resumed, one with other settings (or killed before its first checkpoint) deleted
    and trained again (only the run's own files: `runfolder.RUN_FILES`); a lock file
    makes concurrent callers wait for one trainer. Trains on every core PyTorch uses:
    on 2 cores 1.7-1.9x the speed of one thread (measured), at the price of results
    that differ in their last digits between machines with different core counts.
    """
    import fcntl  # POSIX: the book builds on Linux and macOS

    out_dir = Path(out_dir) if out_dir is not None else get_cache_dir() / "tiny-model"
    config = TrainConfig(**{"out_dir": str(out_dir), "device": "cpu", **overrides})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per folder; the others wait
        found = latest_checkpoint(out_dir)
        saved = load_checkpoint(found)[1] if found is not None else None
        stale = saved is not None and saved["train_config"] != asdict(config)
        if stale or (saved is None and (out_dir / METRICS).is_file()):
            remove_run_files(out_dir)  # its own run's files, nothing the user put there
            saved = None
        if saved is None or saved["step"] < config.max_steps:
            Trainer(config, resume=saved is not None, progress=progress).fit()
    tokenizer = BPETokenizer.load(out_dir / TOKENIZER)
    return load_model(out_dir), tokenizer, read_metrics(out_dir)
