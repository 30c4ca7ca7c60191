"""Where training runs and what it reads: device, precision, processes, batches.

Taught in Chapter 6 (Training, "Mixed precision") and Chapter 8 (Pretraining, "One
step on several GPUs"). `load_data` finds a run's tokens and tokenizer; `BatchSource`
hands each process its share of every step's global batch and remembers the data
position for resuming. `torchrun --nproc_per_node=N` starts N copies of the same script
and sets RANK, LOCAL_RANK and WORLD_SIZE; `init_distributed` reads them. DDP keeps a
full model per process and averages gradients; FSDP (FSDP2's `fully_shard`) splits
parameters, gradients and optimizer state over the processes.
References: Li et al. 2020 (arXiv:2006.15704, DDP); Zhao et al. 2023 (arXiv:2304.11277,
FSDP); Rajbhandari et al. 2020 (arXiv:1910.02054, ZeRO).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from buildllm import corpora, data, shards
from buildllm.data import TOKENIZER
from buildllm.datasources import (
    DATA_ALIASES,
    Log,
    check_vocab,
    data_folder,
    embedded_tokenizer,
    load_tokenizer,
    prepare_text,
    text_files,
    tokenizer_of,
)
from buildllm.tokenizer import BPETokenizer

Strategy = Literal["ddp", "fsdp"]
# Dense bf16 tensor-core peaks (vendor data sheets) for MFU; the first name found wins.
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}  # fmt: skip


DEVICES = ("auto", "cpu", "cuda", "mps")  # the --device choices of every command
DTYPES = ("auto", "float32", "bfloat16")  # the --dtype choices
DECODE_DTYPES = (*DTYPES, "int8")  # decoding's: int8 weights too (`quantize.py`)


def resolve_device(device: str = "auto") -> str:
    """Return the device to run on: `device`, or for "auto" cuda, else mps, else cpu.

    Raises ValueError for a device this machine lacks, naming the ones it has.
    """
    has = {"cuda": torch.cuda.is_available(),
           "mps": bool(getattr(torch.backends, "mps", None)
                       and torch.backends.mps.is_available()), "cpu": True}  # fmt: skip
    if device == "auto":
        return next(name for name, present in has.items() if present)
    kind = device.split(":")[0]
    if kind not in has:
        raise ValueError(f"device {device!r} is unknown; use auto, cpu, cuda or mps")
    if not has[kind]:
        present = ", ".join(name for name, ok in has.items() if ok)
        raise ValueError(
            f"--device {device}: this machine has no {kind} device (torch "
            f"{torch.__version__} sees only {present}); use --device auto or cpu"
        )
    return device


def peak_flops(device: str) -> float | None:
    """Return the device's dense bf16 peak FLOP/s from `PEAK_FLOPS`, or None if unknown.

    CPUs vary too much for a table: pass TrainConfig.peak_flops to get an MFU there.
    """
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its machine, process count."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the one process (rank 0) that logs and writes checkpoints."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, str]:
    """Join torchrun's process group; return (this process's place, its device).

    `device` as `resolve_device`. A single process joins nothing. Under torchrun NCCL
    links CUDA devices and gloo everything else (CPU, and the tests), and on CUDA each
    process takes GPU `LOCAL_RANK`.
    """
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), device
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return info, device


def cpu_flags() -> set[str]:
    """Return the CPU's feature flags as the OS reports them (empty if it does not).

    Linux lists them in /proc/cpuinfo ("flags" on x86, "Features" on Arm); macOS
    answers `sysctl hw.optional.arm.FEAT_BF16` on Apple silicon.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
        return set()
    if platform.system() == "Darwin":
        command = ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        return {"bf16"} if out.stdout.strip() == "1" else set()
    return set()


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware: AVX512-BF16, AMX or Arm BF16.

    Without it PyTorch emulates bf16 matmuls, hundreds of times slower than float32
    (measured on an AVX2-only AMD EPYC: 0.3 against 100 GFLOP/s for 2048x2048).
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device: str) -> bool:
    """Return whether `device` computes in bf16 natively: CUDA, or `cpu_has_bf16`."""
    kind = device.split(":")[0]
    return kind == "cuda" or (kind == "cpu" and cpu_has_bf16())


def autocast_for(
    device: str, dtype: Literal["auto", "float32", "bfloat16"] = "auto"
) -> Callable[[], contextlib.AbstractContextManager]:
    """Return a factory of the autocast context for `device` and `dtype`.

    "auto" means bf16 where it is native (`native_bf16`): matmuls in bf16, reductions
    such as softmax and the loss in float32, and the weights and optimizer state stay
    float32; bf16 keeps float32's exponent range, so no loss scaling is needed.
    Elsewhere "auto" is float32. On CUDA it also lets float32 matmuls use TF32 tensor
    cores (Ampere and later): 10 mantissa bits instead of 23.
    """
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    enabled = dtype == "bfloat16" or (dtype == "auto" and native_bf16(device))
    return lambda: torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


def weights_dtype(
    device: str, dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
) -> torch.dtype:
    """Return the dtype to load a model's weights in for decoding on `device`.

    Decoding one token reads every weight once, so bf16 weights halve the bytes read.
    "auto" is bf16 on CUDA and float32 on a CPU, even one with native bf16: there
    PyTorch's bf16 matrix-vector products were measured slower than float32 ones
    (Appendix B: 124M cached decoding 0.6-0.9x as fast on an AMX Xeon, torch 2.13).
    "int8" loads float32, which `quantize.quantize_int8` then rounds to int8.
    Training keeps float32 weights and uses `autocast_for` instead.
    """
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.startswith("cuda"))
    return torch.bfloat16 if use_bf16 else torch.float32


def load_data(
    name: str, vocab_size: int, tokenizer: str | None = None, log: Log | None = None
) -> tuple[np.ndarray | list[Path], np.ndarray, BPETokenizer]:
    """Return (training tokens or shard paths, validation tokens, tokenizer).

    `name` is an embedded corpus ("shakespeare", also called "embedded", or "stdlib":
    its training and validation works, each followed by end-of-text, and a BPE
    tokenizer of `vocab_size` trained on the training works; all cached), a folder
    holding train.bin and val.bin, a folder of shards (`shards.prepare_dataset`), the
    name of a dataset in `shards.DATASETS` ("fineweb-edu" for fineweb-edu-10B)
    prepared into `data.get_cache_dir()/NAME`, or a text file or folder of .txt files
    (`datasources.prepare_text`, which `log` tells how it split the text). A folder's
    tokenizer is its tokenizer.json, else GPT-2's. `tokenizer` (a file, or "gpt2")
    replaces the embedded corpora's and the text's BPE, and must be a folder's own.
    Raises FileNotFoundError for missing data, ValueError for a too-small vocabulary
    or another tokenizer than the data's.
    """
    name = DATA_ALIASES.get(name, name)
    given = None if tokenizer is None else load_tokenizer(tokenizer)
    if name in corpora.EMBEDDED:
        found = given or embedded_tokenizer(vocab_size, name)
        splits = []
        for split in ("train", "val"):
            path = data.get_cache_dir() / f"{name}-{found.hash[:16]}-{split}.bin"
            if not path.is_file():
                docs = corpora.documents(name, split)
                ids = data.encode_corpus(docs, found, workers=1)
                data.write_tokens(path, ids, found.vocab_size, found.hash)
            splits.append(data.load_tokens(path))
        check_vocab(found, vocab_size, name)
        return splits[0], splits[1], found
    folder = data_folder(name)
    if text_files(folder) is not None:
        folder = prepare_text(folder, vocab_size, given, log)
    found = tokenizer_of(folder)
    if given is not None and given.hash != found.hash:
        raise ValueError(
            f"--tokenizer {tokenizer} is not the tokenizer of --data {name} (its "
            f"{TOKENIZER}, else GPT-2's), so its ids would mean other text; drop "
            "--tokenizer, or tokenize the text with it (buildllm data prepare)"
        )
    check_vocab(found, vocab_size, name)
    if (folder / "train.bin").is_file():
        train, val = folder / "train.bin", folder / "val.bin"
    else:
        train, val = (
            shards.find_shards(folder, "train"),
            shards.find_shards(folder, "val")[0],
        )
    written_with = data.read_header(val)["tokenizer_hash"]
    if written_with not in (None, found.hash):
        raise ValueError(
            f"{val} was written with another tokenizer than {folder}'s (its "
            "tokenizer.json, else GPT-2's); save the one that wrote it as "
            "tokenizer.json in that folder"
        )
    train = data.load_tokens(train) if isinstance(train, Path) else train
    return train, data.load_tokens(val), found


class BatchSource:
    """Hand this process its micro-batches of every optimizer step's global batch.

    From a token array, every process draws the same global batch of batch_size x
    grad_accum_steps random windows (`data.get_batch`, one generator seeded alike) and
    keeps its grad_accum_steps / world_size micro-batches, so the batches, and hence the
    losses, do not depend on the number of processes. From shards, `ShardLoader` reads
    consecutive windows, each process its own block. `state_dict()` is the data position
    a checkpoint stores. Raises ValueError if the processes cannot share equally.
    """

    def __init__(
        self,
        source: np.ndarray | Sequence[Path],
        batch_size: int,
        context_length: int,
        grad_accum_steps: int,
        info: DistInfo,
        seed: int,
    ) -> None:
        if grad_accum_steps % info.world_size:
            raise ValueError(
                f"grad_accum_steps={grad_accum_steps} must be a multiple of the "
                f"{info.world_size} processes, so that each takes an equal share"
            )
        self.batch_size, self.context_length = batch_size, context_length
        self.grad_accum_steps, self.info = grad_accum_steps, info
        self.accum_local = grad_accum_steps // info.world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens, self.loader = source, None
        if not isinstance(source, np.ndarray):  # shard paths
            self.loader = shards.ShardLoader(
                source, batch_size, context_length, info.rank, info.world_size
            )

    def next(self) -> tuple[Tensor, Tensor]:
        """Return this process's inputs and targets for the next optimizer step.

        Shapes: -> x, y (accum_local, B, T) int64 on the CPU; y is x shifted by one.
        """
        if self.loader is not None:  # shards: each process reads its own block
            pairs = [self.loader.next_batch() for _ in range(self.accum_local)]
            x, y = (torch.stack(t) for t in zip(*pairs))  # (accum_local, B, T)
            return x, y
        A, B, T = self.grad_accum_steps, self.batch_size, self.context_length
        x, y = data.get_batch(self.tokens, A * B, T, generator=self.generator)
        first = self.info.rank * self.accum_local  # this process's first micro-batch
        share = slice(first, first + self.accum_local)
        return x.view(A, B, T)[share], y.view(A, B, T)[share]  # (accum_local, B, T)

    def state_dict(self) -> dict[str, Any]:
        """Return the data position: the generator's state and the shard position."""
        shard = self.loader.state_dict() if self.loader is not None else None
        return {"generator": self.generator.get_state(), "shard": shard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position `state_dict()` returned."""
        self.generator.set_state(state["generator"])
        if self.loader is not None:
            self.loader.load_state_dict(state["shard"])


def wrap_model(model: nn.Module, strategy: Strategy, info: DistInfo) -> nn.Module:
    """Return `model` ready for data-parallel training with `strategy`.

    With one process nothing is wrapped. "ddp" registers hooks that average gradients
    over the processes during backward; "fsdp" shards each transformer block (and then
    the rest) so that a process holds 1/world_size of the weights between uses.
    Raises ValueError for an unknown strategy.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r} must be 'ddp' or 'fsdp'")
    if info.world_size == 1:
        return model
    if strategy == "ddp":
        on_cuda = next(model.parameters()).is_cuda
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if on_cuda else None
        )
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)  # gathered just before the block runs, freed after
    fully_shard(model)  # embeddings, final norm and head
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps whose gradients only accumulate.

    DDP and FSDP would otherwise communicate after every micro-step; only the last one
    before the optimizer step needs the averaged gradient.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    yield


def all_reduce_mean(x: Tensor, info: DistInfo) -> Tensor:
    """Return the mean of `x` over all processes (`x` itself for one process)."""
    if info.world_size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world_size


def barrier(info: DistInfo) -> None:
    """Wait until every process reaches this point (a no-op for one process)."""
    if info.world_size > 1:
        dist.barrier()


def destroy_distributed(info: DistInfo) -> None:
    """Leave the process group, if this process joined one."""
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the plain model inside `torch.compile` and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)  # compiled: the module it wraps
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model
