"""`buildllm finetune classify` and `buildllm classify`: fine-tune and use a classifier.

Taught in Chapter 9 (Classification). `finetune classify` starts from a `buildllm
train` run (or GPT-2's Hugging Face folder), trains a classification head with the
chosen parameters (head, last-N blocks, all, or LoRA adapters) on the Trainer, and
prints the test metrics beside the majority-class baseline; `classify` loads the
fine-tuned run and labels texts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from buildllm.classify_run import GENRE_POOLING, GENRE_RUN
from buildllm.cli_chat import add_chat_stages
from buildllm.distributed import DEVICES
from buildllm.train import TrainConfig

GENRE_DATA = "shakespeare-genre"


def _train_choice(text: str) -> str:
    if text in ("head", "all", "lora") or re.fullmatch(r"last-[1-9]\d*", text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not head, last-N (N >= 1), all or lora"
    )


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value

    return parse


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model (classify, or sft/dpo for chat)",
        description="Fine-tune a pretrained model for a task.",
    )
    tasks = p.add_subparsers(title="tasks", metavar="TASK", required=True)
    add_chat_stages(tasks)  # sft and dpo (Chapter 10, cli_chat.py)
    c = tasks.add_parser(
        "classify",
        formatter_class=p.formatter_class,
        help="train a text classifier from a pretrained model",
        description="Replace the language-model head of a pretrained model by a\n"
        "classification head over the last token, train what --train names with the\n"
        "Trainer (checkpoints, --resume, metrics.jsonl as `buildllm train`) and print\n"
        "accuracy, macro-F1 and the majority-class baseline on the test split.\n"
        f"--data {GENRE_DATA} is Shakespeare's passages by genre (comedy, history,\n"
        "tragedy), split by play; or a .csv/.tsv/.jsonl file or URL with columns\n"
        "text and label (every 10th row validates; --test FILE for test metrics).",
        epilog="examples:\n"
        "  buildllm finetune classify --checkpoint runs/tiny --out-dir runs/genre\n"
        "  buildllm finetune classify --checkpoint runs/tiny --train lora "
        "--lora-rank 8 --out-dir runs/genre-lora\n"
        "  buildllm finetune classify --checkpoint runs/tiny --train last-1 "
        "--out-dir runs/genre-last1 --resume\n"
        "  buildllm finetune classify --checkpoint ~/gpt2 --data spam.csv "
        "--test spam-test.csv --device cuda --out-dir runs/spam\n"
        '  buildllm classify --checkpoint runs/genre --text "My liege, the French"',
    )
    c.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="the pretrained model: a `buildllm train` out_dir or "
        "checkpoint, or a Hugging Face GPT-2 folder",
    )
    c.add_argument(
        "--data",
        default=GENRE_DATA,
        metavar="NAME|FILE|URL",
        help="labelled training data",
    )
    c.add_argument("--sha256", default=None, help="expected SHA-256 of a --data URL")
    c.add_argument(
        "--test",
        default=None,
        metavar="FILE|URL",
        help="labelled test data for a --data file",
    )
    c.add_argument("--out-dir", default="runs/classify", help="where the run goes")
    c.add_argument(
        "--train",
        type=_train_choice,
        default="all",
        help="what trains: head, last-N (blocks), all, or lora",
    )
    c.add_argument(
        "--lora-rank",
        type=_positive(int),
        default=None,
        help="LoRA rank r (with --train lora)",
    )
    c.add_argument(
        "--lora-alpha",
        type=_positive(float),
        default=16.0,
        help="LoRA scale alpha: the update is (alpha / r) B A",
    )
    c.add_argument(
        "--pooling",
        choices=["last", "mean"],
        default=GENRE_POOLING,
        help="which positions' logits classify: the last real token, or their mean "
        "(the book's recipe)",
    )
    c.add_argument(
        "--class-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weigh classes inversely to their frequency",
    )
    for name in (
        "batch_size",
        "max_steps",
        "max_lr",
        "min_lr",
        "warmup_steps",
        "eval_interval",
        "checkpoint_interval",
        "seed",
    ):
        default = GENRE_RUN.get(name, getattr(TrainConfig, name))
        kind = type(default)
        c.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            type=kind
            if name in ("min_lr", "warmup_steps", "seed")
            else _positive(kind),
            help="as in buildllm train",
        )
    c.add_argument(
        "--device",
        default="auto",
        choices=list(DEVICES),
        help="auto: cuda, then mps, then cpu",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest checkpoint in --out-dir",
    )
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(handler=run_finetune_classify)


def _data(args: argparse.Namespace) -> tuple:
    """Return (train, val, test or None) text sets for --data and --test."""
    from buildllm.textsets import TextSet, genre_passages, load_labelled

    if args.data == GENRE_DATA:
        return genre_passages("train"), genre_passages("val"), genre_passages("test")
    data = load_labelled(args.data, args.sha256)

    def part(keep: bool) -> TextSet:
        rows = [i for i in range(len(data)) if (i % 10 == 9) == keep]
        return TextSet(
            [data.texts[i] for i in rows],
            [data.labels[i] for i in rows],
            data.label_names,
            [data.groups[i] for i in rows],
        )

    test = load_labelled(args.test, label_names=data.label_names) if args.test else None
    return part(False), part(True), test


def run_finetune_classify(args: argparse.Namespace) -> int:
    from buildllm.classify_run import (
        ClassifierSpec,
        evaluate_classifier,
        finetune_classifier,
        load_base,
    )
    from buildllm.distributed import resolve_device
    from buildllm.metrics import accuracy, majority_baseline

    train_set, val_set, test_set = _data(args)
    spec = ClassifierSpec(
        train_set.label_names,
        train=args.train,
        pooling=args.pooling,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        class_weights=args.class_weights,
    )
    device = resolve_device(args.device)
    base, tokenizer = load_base(args.checkpoint, device)
    config = TrainConfig(
        **{
            **GENRE_RUN,
            "out_dir": args.out_dir,
            "device": device,
            "data": args.data,
            "dtype": "auto",
            **{
                k: getattr(args, k)
                for k in (
                    "batch_size",
                    "max_steps",
                    "max_lr",
                    "min_lr",
                    "warmup_steps",
                    "eval_interval",
                    "checkpoint_interval",
                    "seed",
                )
            },
        }
    )
    model, records = finetune_classifier(
        base, tokenizer, train_set, val_set, spec, config, resume=args.resume
    )
    evaluated = [r["val_loss"] for r in records if "val_loss" in r]
    summary = {
        "out_dir": args.out_dir,
        "first_val_loss": evaluated[0] if evaluated else None,
        "val_loss": evaluated[-1] if evaluated else None,
    }
    if test_set is not None:
        result = evaluate_classifier(model, tokenizer, spec, test_set)
        majority = majority_baseline(train_set.labels, len(test_set))
        summary |= {
            "test_accuracy": result["accuracy"],
            "test_accuracy_interval": result["accuracy_interval"],
            "test_macro_f1": result["macro_f1"],
            "majority_accuracy": accuracy(test_set.labels, majority),
        }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:>22}: {shown}")
    return 0


def add_classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier",
        description="Load a run of `buildllm finetune classify` and print each text's\n"
        "most probable label and the probabilities of all labels.",
        epilog="examples:\n"
        '  buildllm classify --checkpoint runs/genre --text "Alas, poor Yorick"\n'
        '  buildllm classify --checkpoint runs/genre --text "A" --text "B" --json',
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="the out_dir of buildllm finetune classify",
    )
    p.add_argument(
        "--text", action="append", required=True, help="a text to classify (repeatable)"
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=list(DEVICES),
        help="auto: cuda, then mps, then cpu",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from buildllm.classify import encode_texts, predict_proba
    from buildllm.classify_run import load_classifier

    model, tokenizer, spec = load_classifier(args.checkpoint, args.device)
    ids = encode_texts(args.text, tokenizer, model.config.context_length)
    probs = predict_proba(model, ids, spec.pooling).tolist()
    results = [
        {
            "text": text,
            "label": spec.label_names[max(range(len(p)), key=p.__getitem__)],
            "probs": dict(zip(spec.label_names, p)),
        }
        for text, p in zip(args.text, probs)
    ]
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r["probs"].items())
            print(f"{r['label']}\t({shown})\t{r['text']}", file=sys.stdout)
    return 0
