"""Fine-tune, save, load and evaluate a classifier run on the Trainer.

Taught in Chapter 9 (Classification). A run starts from a pretrained model (a
`buildllm train` run or GPT-2's Hugging Face folder), swaps its head
(`classify.add_classifier_head`), chooses what trains (head, last-N blocks, all, or
LoRA adapters) and trains with the same `Trainer` as pretraining, on a
`ClassifyObjective`. Its out_dir holds the Trainer's checkpoints and metrics plus
`classifier.json` (labels, pooling, LoRA settings), so `load_classifier` rebuilds it.
`train_genre_classifier` is the book's cached run on Shakespeare's genres.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from buildllm.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_config,
    read_metrics,
)
from buildllm.classify import (
    ClassifyObjective,
    Pooling,
    add_classifier_head,
    class_weights_for,
    encode_texts,
    predict_proba,
    set_trainable,
)
from buildllm.data import get_cache_dir
from buildllm.distributed import TOKENIZER, resolve_device
from buildllm.lora import DEFAULT_TARGETS, add_lora
from buildllm.metrics import accuracy, bootstrap_interval, confusion_matrix, macro_f1
from buildllm.model import GPT
from buildllm.runfolder import remove_run_files
from buildllm.textsets import GENRES, TextSet, genre_passages
from buildllm.tokenizer import BPETokenizer
from buildllm.train import TrainConfig, Trainer, train_tiny

SPEC = "classifier.json"
SETTINGS = "settings.json"  # what train_genre_classifier's cached run was trained with
# The book's recipe: 400 steps of 16 passages, under one epoch of the about 10,000
# training passages; about a minute on two CPU cores for full fine-tuning.
GENRE_RUN = {
    "batch_size": 16,
    "max_steps": 400,
    "max_lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_steps": 20,
    "eval_interval": 200,
    "checkpoint_interval": 400,
    "eval_steps": 1,
    "sample_tokens": None,
    "weight_decay": 0.0,
    "keep_checkpoints": 1,
    "device": "cpu",
    "dtype": "float32",  # measured: bf16 autocast 2.5x slower here without native bf16
}
GENRE_POOLING: Pooling = "mean"  # measured: beats last-token pooling, tiny model


@dataclass(frozen=True)
class ClassifierSpec:
    """What turns a pretrained model into this classifier; saved as classifier.json.

    `train` is "head", "last-N", "all" or "lora" (then `lora_rank` and `lora_alpha`
    size the adapters on `lora_targets`: the blocks' Linear layers and the token
    table, which the new head leaves untied: on Chapter 9's genres its adapter makes
    most of LoRA's accuracy); `class_weights` weighs the loss inversely to the
    training classes' frequencies.
    """

    label_names: tuple[str, ...]
    train: str = "all"
    pooling: Pooling = "last"
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = (*DEFAULT_TARGETS, "tok_emb")
    class_weights: bool = True

    def __post_init__(self) -> None:
        if (self.train == "lora") != (self.lora_rank is not None):
            raise ValueError(
                f"train={self.train!r} with lora_rank={self.lora_rank}: pass "
                "--lora-rank R exactly when training LoRA adapters (--train lora)"
            )


def build_classifier(base: GPT, spec: ClassifierSpec) -> GPT:
    """Give `base` its classification head, adapters if LoRA, and choose what trains.

    The head is initialised from the global RNG: seed it for a reproducible run.
    """
    model = add_classifier_head(base, len(spec.label_names))
    if spec.lora_rank is not None:
        add_lora(model, spec.lora_rank, spec.lora_alpha, spec.lora_targets)
    set_trainable(model, spec.train)
    return model


def load_base(path: str | Path, device: str = "cpu") -> tuple[GPT, BPETokenizer]:
    """Load a pretrained model and its tokenizer: a buildllm run or a GPT-2 HF folder.

    Raises FileNotFoundError if nothing loadable is at `path`.
    """
    path = Path(path)
    if (path / "config.json").is_file() and not (path / TOKENIZER).is_file():
        from buildllm.hf import load_hf_gpt2
        from buildllm.hf_tokenizer import load_hf_tokenizer
        from buildllm.tokenizer import gpt2_tokenizer

        own = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
        tokenizer = load_hf_tokenizer(path) if own else gpt2_tokenizer()
        return load_hf_gpt2(path).to(device), tokenizer
    run = path if path.is_dir() else path.parent
    while run != run.parent and not (run / TOKENIZER).is_file():
        run = run.parent  # a checkpoint folder sits in <run>/checkpoints/
    if not (run / TOKENIZER).is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER} in {path} or above it; pass a `buildllm train` out_dir "
            "or a Hugging Face GPT-2 folder"
        )
    return load_model(path, device=device), BPETokenizer.load(run / TOKENIZER)


def finetune_classifier(
    base: GPT,
    tokenizer: BPETokenizer,
    train_set: TextSet,
    val_set: TextSet,
    spec: ClassifierSpec,
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> tuple[GPT, list[dict[str, Any]]]:
    """Fine-tune `base` (changed in place) as classifier `spec` with the Trainer.

    `config` sets the loop (batch size, steps, learning rate, out_dir, ...); its
    `model` and `data` are filled in from the base and the data. Writes
    classifier.json beside the checkpoints. Returns (model, this call's records).
    """
    torch.manual_seed(config.seed)  # the head's initial weights
    model = build_classifier(base, spec)
    T = model.config.context_length
    weights = None
    if spec.class_weights:
        weights = class_weights_for(train_set.labels, len(spec.label_names))
    objective = ClassifyObjective(
        encode_texts(train_set.texts, tokenizer, T),
        train_set.labels,
        encode_texts(val_set.texts, tokenizer, T),
        val_set.labels,
        tokenizer,
        config.batch_size,
        config.grad_accum_steps,
        config.seed,
        spec.pooling,
        weights,
    )
    config = replace(config, model=model.config)
    trainer = Trainer(
        config, resume=resume, progress=progress, objective=objective, model=model
    )
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC).write_text(json.dumps(asdict(spec), indent=1) + "\n")
    records = trainer.fit()
    return model.eval(), records


def load_classifier(
    out_dir: str | Path, device: str = "cpu"
) -> tuple[GPT, BPETokenizer, ClassifierSpec]:
    """Rebuild a fine-tuned classifier from its run folder; the model in eval mode.

    Raises FileNotFoundError if `out_dir` holds no classifier run.
    """
    out_dir = Path(out_dir)
    found = latest_checkpoint(out_dir)
    if found is None or not (out_dir / SPEC).is_file():
        raise FileNotFoundError(
            f"{out_dir} holds no fine-tuned classifier ({SPEC} and a checkpoint); "
            "train one with buildllm finetune classify --out-dir"
        )
    values = json.loads((out_dir / SPEC).read_text())
    for key in ("label_names", "lora_targets"):
        values[key] = tuple(values[key])
    spec = ClassifierSpec(**values)
    config = read_config(found / "model.safetensors")
    model = build_classifier(GPT(config), spec)  # the head's size from spec
    state, _ = load_checkpoint(found, config)
    model.load_state_dict(state)
    tokenizer = BPETokenizer.load(out_dir / TOKENIZER)
    return model.to(resolve_device(device)).eval(), tokenizer, spec


def evaluate_classifier(
    model: GPT, tokenizer: BPETokenizer, spec: ClassifierSpec, test_set: TextSet
) -> dict[str, Any]:
    """Measure accuracy, macro-F1 (each with a bootstrap 95 % interval), confusion.

    Returns those and the predictions (`preds`) and probabilities (`probs`).
    """
    n_classes = len(spec.label_names)
    ids = encode_texts(test_set.texts, tokenizer, model.config.context_length)
    probs = predict_proba(model, ids, spec.pooling)  # (N, C)
    preds = probs.argmax(-1).tolist()
    targets = test_set.labels
    f1 = lambda t, p: macro_f1(t, p, n_classes)
    return {
        "accuracy": accuracy(targets, preds),
        "accuracy_interval": bootstrap_interval(targets, preds, accuracy),
        "macro_f1": f1(targets, preds),
        "macro_f1_interval": bootstrap_interval(targets, preds, f1),
        "confusion": confusion_matrix(targets, preds, n_classes),
        "preds": preds,
        "probs": probs,
    }


def train_genre_classifier(
    train: str = "all",
    lora_rank: int | None = None,
    pooling: Pooling = GENRE_POOLING,
    out_dir: str | Path | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[GPT, BPETokenizer, ClassifierSpec, list[dict[str, Any]]]:
    """Fine-tune the book's tiny model on Shakespeare's genres, or reuse a finished run.

    As `train.train_tiny`: the run lives in `data.get_cache_dir()/genre-<train>`
    (`-r<rank>` for LoRA, `-<pooling>` if not the recipe's), is reused when finished
    with the same settings and base, trained again otherwise (deleting only the files a
    run writes), under a lock. Returns (model, tokenizer, spec, records).
    """
    base_dir = get_cache_dir() / "tiny-model"
    _, tokenizer, _ = train_tiny(base_dir, progress=progress)
    name = f"genre-{train}" + (f"-r{lora_rank}" if lora_rank else "")
    name += "" if pooling == GENRE_POOLING else f"-{pooling}"
    out_dir = Path(out_dir) if out_dir is not None else get_cache_dir() / name
    spec = ClassifierSpec(GENRES, train=train, pooling=pooling, lora_rank=lora_rank)
    base_weights = latest_checkpoint(base_dir) / "model.safetensors"
    config = TrainConfig(
        **{
            **GENRE_RUN,
            "out_dir": str(out_dir),
            "data": "shakespeare-genre",
            **overrides,
        }
    )
    wanted = {
        "spec": asdict(spec),
        "train": asdict(config),
        "base": base_weights.stat().st_mtime_ns,
    }
    stamp = out_dir / SETTINGS
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = stamp.is_file() and json.loads(stamp.read_text()) == _plain(wanted)
        if not done:
            remove_run_files(out_dir, extra=(SPEC, SETTINGS))  # not the user's files
            base = load_model(base_dir)
            finetune_classifier(
                base,
                tokenizer,
                genre_passages("train"),
                genre_passages("val"),
                spec,
                config,
                progress=progress,
            )
            stamp.write_text(json.dumps(wanted))
    model, tokenizer, spec = load_classifier(out_dir)
    return model, tokenizer, spec, read_metrics(out_dir)


def _plain(value: Any) -> Any:
    """Return `value` as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(value))
