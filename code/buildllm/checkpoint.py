"""Checkpoints: weights in safetensors, training state beside them, written atomically.

Taught in Chapter 6 (Training, "Checkpoints and resuming"). A checkpoint is a folder
`<out_dir>/checkpoints/step-NNNNNNN/` holding `model.safetensors` (weights + the model
config as metadata: a file anyone can load without our code) and `state.pt` (optimizer
moments, step, RNG states and data position: what an exact resume needs). The folder is
written under a temporary name and renamed, and `latest` names the newest complete one,
so a run killed at any instant leaves the previous checkpoint intact. Also the run's
metrics file, `<out_dir>/metrics.jsonl`, one JSON record per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from buildllm.checks import check_file
from buildllm.model import GPT, GPTConfig
from buildllm.runfolder import deferred_interrupt, is_disk_full, temp_dir, write_atomic

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
LATEST = "latest"
METRICS = "metrics.jsonl"


def rng_states() -> dict[str, Any]:
    """Return the global random states (dropout, initialisation) as tensors."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the random states `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: GPTConfig,
    state: dict[str, Any],
    keep: int = 2,
    write: bool = True,
) -> Path | None:
    """Write checkpoint `step` atomically and return its folder.

    Gathers the full (unsharded, CPU) model and optimizer state, which every process of
    a distributed run must join; only the one with `write=True` writes (rank 0). A tied
    `lm_head.weight` is left out of the weights because it is `tok_emb.weight`. `state`
    (RNG states, configs, ...) must hold only tensors and plain Python values, so that
    `torch.load(weights_only=True)` can read it back. Checkpoints older than the newest
    `keep` are deleted.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if not write:
        return None
    root = Path(out_dir) / CHECKPOINTS
    folder = root / f"step-{step:07d}"
    weights = {
        name: t.detach().cpu().contiguous()
        for name, t in model_state.items()
        if not (config.tie_embeddings and name == "lm_head.weight")
    }
    metadata = {"format": "buildllm", "gpt_config": json.dumps(asdict(config))}
    tmp = temp_dir(root, folder.name)  # a unique name: no two writers share it
    try:
        save_file(weights, tmp / WEIGHTS, metadata=metadata)
        state = {**state, "step": step, "optimizer": optim_state}
        state["weights_sha256"] = _sha256(tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
    except BaseException as err:  # also Ctrl-C: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            kept = latest_checkpoint(out_dir)
            raise RuntimeError(
                f"disk full while writing checkpoint {folder}; the last good checkpoint "
                f"{kept or '(none yet)'} is kept; free some space and rerun with --resume"
            ) from err
        raise
    with deferred_interrupt():  # rename, point and prune together, or not at all
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # a folder appears whole or not at all
        write_atomic(root / LATEST, folder.name)
        prune_checkpoints(out_dir, keep)
    return folder


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints of a run."""
    for old in find_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoints(out_dir: str | Path) -> list[Path]:
    """Return a run's complete checkpoint folders (weights and state), oldest first.

    Sorted by step number, so the order never depends on how names sort.
    """
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if _is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint folder of a run, or None if it has none.

    `checkpoints/latest` names it; when that file is missing, unreadable or names a
    folder that is gone, the folders themselves are scanned, so a damaged pointer never
    hides a run's checkpoints.
    """
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    with contextlib.suppress(OSError, UnicodeDecodeError):
        folder = pointer.parent / pointer.read_text().strip()
        if folder.parent == pointer.parent and _is_checkpoint(folder):
            return folder
    found = find_checkpoints(out_dir)
    return found[-1] if found else None


def _is_checkpoint(folder: Path) -> bool:
    name = folder.name.removeprefix("step-")
    complete = (folder / WEIGHTS).is_file() and (folder / STATE).is_file()
    return folder.name.startswith("step-") and name.isdigit() and complete


def load_checkpoint(
    folder: str | Path, config: GPTConfig | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint folder; return (model state dict, training state).

    Checks that the weights were written for `config` (when given) and that they are
    the file the state was saved with. Raises FileNotFoundError for a missing file and
    ValueError for a corrupt file or a checkpoint of another model configuration.
    """
    folder = Path(folder)
    saved_config = read_config(folder / WEIGHTS)
    if config is not None and saved_config != config:
        diff = {
            f.name: (getattr(saved_config, f.name), getattr(config, f.name))
            for f in fields(GPTConfig)
            if getattr(saved_config, f.name) != getattr(config, f.name)
        }
        raise ValueError(
            f"checkpoint {folder} was trained with another model config "
            f"(field: (checkpoint, now) = {diff}); use the same preset and overrides, "
            "or start a new run in another --out-dir"
        )
    if not (folder / STATE).is_file():
        raise FileNotFoundError(f"training state {folder / STATE} does not exist")
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        model_state = load_file(folder / WEIGHTS)
    except (
        SafetensorError,
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
    ) as err:
        raise ValueError(
            f"checkpoint {folder} is corrupt ({err}); move it out of the run folder to "
            "resume from the one before, or start again in another --out-dir"
        ) from err
    if state.get("weights_sha256") != _sha256(folder / WEIGHTS):
        raise ValueError(
            f"{folder / WEIGHTS} does not match the weights {STATE} was saved with; "
            "the checkpoint is corrupt or mixed from two runs: start from another one"
        )
    if saved_config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["tok_emb.weight"]
    return model_state, state


def restore_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: GPTConfig,
) -> dict[str, Any]:
    """Load a checkpoint's weights and optimizer state into `model` and `optimizer`.

    Works for a plain, DDP-unwrapped or FSDP-sharded model (each process reads the
    files). The optimizer's param_groups come back exactly as saved, types included.
    Returns the training state (step, RNG states, configs). Raises as `load_checkpoint`.
    """
    model_state, state = load_checkpoint(folder, config)
    saved_groups = state["optimizer"]["param_groups"]
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    # set_state_dict flattens the state to share out its tensors and rebuilds every
    # nested value as a list (betas (0.9, 0.95) -> [0.9, 0.95]); the hyperparameters
    # are plain values each process read whole, so set them as saved. Groups match by
    # position, as set_state_dict matches them.
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved.items() if key != "params"})
    return state


def check_resumable(
    saved: dict[str, Any], current: dict[str, Any], may_differ: tuple[str, ...] = ()
) -> None:
    """Raise ValueError if a run saved with settings `saved` cannot go on as `current`.

    Both are `asdict(TrainConfig)`; the settings named in `may_differ` may change.
    """
    diff = [
        f"--{name.replace('_', '-')} {saved.get(name)} (now {value})"
        for name, value in current.items()
        if name not in may_differ and saved.get(name) != value
    ]  # in the terms of `buildllm train`'s flags, one per TrainConfig field
    if diff:
        raise ValueError(
            f"the checkpoint's run used {', '.join(diff)}; resume with the same "
            "settings or start a new --out-dir"
        )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a metrics.jsonl file (or of a run's out_dir).

    A last line without its newline is a record torn by a kill mid-write: it is
    skipped (`truncate_metrics` then drops it from the file). Raises FileNotFoundError
    for a missing file and ValueError, naming file and line, for any other bad line.
    """
    path = Path(path)
    path = path / METRICS if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: torn by a kill
                break
            raise ValueError(
                f"{path} line {number} is not a JSON record ({err}); delete that line "
                "to read the rest"
            ) from None
    return records


def append_metrics(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line to `out_dir/metrics.jsonl`."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out_dir: str | Path, step: int) -> None:
    """Drop records after `step`: a killed run logs steps after its last checkpoint."""
    path = Path(out_dir) / METRICS
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_config(weights: str | Path) -> GPTConfig:
    """Return the `GPTConfig` stored in a buildllm safetensors file's metadata.

    Raises FileNotFoundError if the file is missing and ValueError if it is corrupt,
    not a buildllm file, or names config fields this version does not know.
    """
    weights = check_file(weights, "weights file")
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({err})"
        ) from err
    if metadata.get("format") != "buildllm" or "gpt_config" not in metadata:
        raise ValueError(
            f"{weights} has no buildllm model config in its metadata; load Hugging "
            "Face GPT-2 files with buildllm.hf.load_hf_gpt2 instead"
        )
    try:
        values = json.loads(metadata["gpt_config"])
        unknown = sorted(set(values) - {f.name for f in fields(GPTConfig)})
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(
            f"{weights} holds a damaged model config in its metadata ({err}); "
            "load an intact checkpoint"
        ) from None
    if unknown:
        raise ValueError(
            f"{weights} was saved with GPTConfig fields {unknown} that this version of "
            "buildllm does not know; upgrade buildllm"
        )
    return GPTConfig(**values)


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """Build the GPT saved at `path`: a run's out_dir, a checkpoint folder or weights.

    The model comes back in eval mode. Raises FileNotFoundError if nothing is there.
    """
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS).is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoint (no {CHECKPOINTS}/step-N folder with "
                f"{WEIGHTS} and {STATE}); pass a run folder, a checkpoint or its weights"
            )
        path = found
    weights = path / WEIGHTS if path.is_dir() else path
    config = read_config(weights)
    state = load_file(weights, device=device)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model = GPT(config).to(device)
    model.load_state_dict(state)
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plot_metrics(records: list[dict[str, Any]], ax: Any = None) -> Any:
    """Draw training and validation loss against the step; return the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.2), layout="constrained")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="training loss (one batch)")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
