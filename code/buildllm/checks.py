"""The rules user-given numbers must follow, checked once for configs and CLI flags.

A `Range` states the allowed interval of one numeric setting (an integer >= 1, a number
in (0, 1], ...) and what `None` means for it, if anything; `OneOf` the words of a string
setting. The tables `MODEL_RULES`, `TRAIN_RULES` and `SAMPLING_RULES` hold the rule of
every setting of GPTConfig, TrainConfig and decoding: the dataclasses check their fields
with `check_fields` in `__post_init__`, and the command line builds each flag's argparse
`type` from the same `Range`, so a bad value is refused where it is typed, with the
range in the message, and never reaches a training run. NaN and
infinities are outside every range: a NaN compares false with everything and would slip
through a hand-written `x < 0` test. `check_token_ids` and `check_positions` do the
same for a model's input.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # hints only: model.py imports this module, tokenizers need no torch
    from torch import Tensor

    from buildllm.model import GPTConfig


class UsageError(ValueError):
    """A value the user typed breaks a rule: the command line exits with code 2."""


@dataclass(frozen=True)
class Range:
    """An allowed interval of an int or float setting, ends included unless `*_open`.

    `off` says what None does for the setting (e.g. "switches clipping off"); a setting
    without it must be a number.
    """

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    off: str | None = None

    @property
    def rule(self) -> str:
        """The rule in words: "an integer >= 1", "a number in (0, 1]"."""
        what = "an integer" if self.kind is int else "a number"
        low, high = (
            None if x is None else f"{int(x)}" if self.kind is int else f"{x:g}"
            for x in (self.low, self.high)
        )
        if low is not None and high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{low}, {high}{right}"
        if low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return "a finite number" if self.kind is float else what

    def explain(self, none_word: str) -> str:
        """Return the rule plus what `none_word` (None, or 'none' on the CLI) does."""
        return self.rule + (f" ({none_word} {self.off})" if self.off else "")

    def check(self, name: str, value: object) -> None:
        """Raise TypeError or ValueError, naming `name` and the rule, if `value` breaks it."""
        if value is None and self.off:
            return
        if self.kind is int and not _is_int(value):
            raise TypeError(f"{name}={value!r} must be {self.explain('None')}")
        if not _is_number(value) or not self.contains(float(value)):
            raise ValueError(f"{name}={value!r} must be {self.explain('None')}")

    def contains(self, x: float) -> bool:
        """True if the finite number `x` lies in the range."""
        if not math.isfinite(x):
            return False
        below = self.low is not None and (
            x <= self.low if self.low_open else x < self.low
        )
        above = self.high is not None and (
            x >= self.high if self.high_open else x > self.high
        )
        return not (below or above)

    def parse(self, text: str) -> int | float | None:
        """Turn a flag's text into a value in the range ('none' or 'off' for None).

        Meant as an argparse `type`: raises `argparse.ArgumentTypeError`, so argparse
        reports "argument --flag: ..." and exits with code 2.
        """
        if self.off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.contains(float(value)):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {self.explain(repr('none'))}"
            )
        return value


@dataclass(frozen=True)
class OneOf:
    """The allowed words of a string setting, such as norm="layernorm" or "rmsnorm"."""

    words: tuple[str, ...]

    def check(self, name: str, value: object) -> None:
        """Raise ValueError, naming `name` and the words, unless `value` is one."""
        if value not in self.words:
            raise ValueError(f"{name}={value!r} must be one of {', '.join(self.words)}")


def check_fields(obj: object, rules: Mapping[str, Range | OneOf]) -> None:
    """Check each attribute of `obj` named in `rules` (a config's `__post_init__`)."""
    for name, rule in rules.items():
        rule.check(name, getattr(obj, name))


_SIZE, _FRACTION = Range(int, low=1), Range(float, low=0, high=1, high_open=True)
_PROBABILITY = Range(float, low=0, high=1, low_open=True, off="switches it off")
# GPTConfig's fields (model.py).
MODEL_RULES: dict[str, Range | OneOf] = {
    **dict.fromkeys(("vocab_size", "context_length", "d_model", "n_layers", "n_heads"),
                    _SIZE),
    "n_kv_heads": Range(int, low=1, off="gives every query head its own K/V head"),
    "d_ff": Range(int, low=1, off="picks the MLP's usual width"),
    "rope_base": Range(float, low=0, low_open=True), "dropout": _FRACTION,
    "norm_eps": Range(float, low=0, low_open=True),
    "norm": OneOf(("layernorm", "rmsnorm")), "mlp": OneOf(("gelu", "swiglu")),
    "pos": OneOf(("learned", "rope")), "rope_pairing": OneOf(("half", "interleaved")),
    "attn_impl": OneOf(("manual", "fast")),
}  # fmt: skip
# TrainConfig's fields (train.py); `buildllm train` parses its flags by the same rules.
TRAIN_RULES: dict[str, Range | OneOf] = {
    **dict.fromkeys(("batch_size", "grad_accum_steps", "max_steps", "eval_interval",
                     "eval_steps", "checkpoint_interval", "keep_checkpoints"), _SIZE),
    "warmup_steps": Range(int, low=0), "seed": Range(int, low=0, high=2**64 - 1),
    "max_lr": Range(float, low=0, low_open=True), "min_lr": Range(float, low=0),
    "weight_decay": Range(float, low=0), "eps": Range(float, low=0, low_open=True),
    "beta1": _FRACTION, "beta2": _FRACTION,
    "grad_clip": Range(float, low=0, low_open=True, off="switches clipping off"),
    "sample_tokens": Range(int, low=1, off="switches samples off"),
    "peak_flops": Range(float, low=0, low_open=True, off="looks the GPU up"),
    "dtype": OneOf(("auto", "float32", "bfloat16")), "impl": OneOf(("manual", "fast")),
    "strategy": OneOf(("ddp", "fsdp")),
}  # fmt: skip
# What decoding accepts (generate.py); `buildllm sample` parses its flags by them.
SAMPLING_RULES: dict[str, Range] = {
    "max_new_tokens": Range(int, low=0),
    "temperature": Range(float, low=0),  # 0 is greedy
    "top_k": Range(int, low=1, off="switches it off"),
    "top_p": _PROBABILITY,
    "min_p": _PROBABILITY,
    "repetition_penalty": Range(float, low=0, low_open=True),  # 1 is off
}


def check_token_ids(idx: Tensor, config: GPTConfig, start: int = 0) -> None:
    """Raise TypeError or ValueError if `idx` cannot follow `start` positions.

    Ids outside 0..vocab_size-1 would index past the embedding table (the message names
    the vocabulary); the range test is skipped while torch.compile traces the model.
    """
    import torch
    from torch import Tensor

    if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int32):
        kind = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise TypeError(
            f"token ids must be a torch.long (or int32) tensor, got {kind}; "
            "convert with torch.as_tensor(ids, dtype=torch.long)"
        )
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"token ids must have shape (batch_size, T) with T >= 1, got "
            f"{tuple(idx.shape)}; add a batch dimension with idx[None], or start an "
            "empty text with the end-of-text token"
        )
    if start + idx.shape[1] > config.context_length:
        cached = f" after {start} cached positions" if start else ""
        raise ValueError(
            f"input has {idx.shape[1]} positions{cached} but context_length="
            f"{config.context_length}; keep the last context_length tokens "
            "(idx[:, -context_length:]) or build a model with a larger context_length"
        )
    V = config.vocab_size
    if not torch.compiler.is_compiling() and bool(((idx < 0) | (idx >= V)).any()):
        bad = idx[(idx < 0) | (idx >= V)][:3].tolist()
        raise ValueError(
            f"token ids {bad} are outside the model's vocabulary 0..{V - 1}; encode "
            f"with the tokenizer the model was trained with (vocab_size={V})"
        )


def check_positions(
    positions: Tensor, batch_size: int, T: int, context_length: int
) -> None:
    """Raise TypeError or ValueError unless `positions` can place T tokens of B rows.

    Explicit positions are integers of shape (T,) (all rows alike) or (B, T), each in
    0..context_length-1: a negative one would silently index the tables from the end.
    The range test is skipped while torch.compile traces the model.
    """
    import torch
    from torch import Tensor

    integer = (torch.long, torch.int32)
    if not isinstance(positions, Tensor) or positions.dtype not in integer:
        kind = getattr(positions, "dtype", type(positions).__name__)
        raise TypeError(
            f"positions must be a torch.long (or int32) tensor, got {kind}; "
            "build them with torch.arange(start, start + T)"
        )
    if tuple(positions.shape) not in ((T,), (batch_size, T)):
        raise ValueError(
            f"positions have shape {tuple(positions.shape)} but the input has "
            f"{batch_size} rows of {T} tokens; pass shape ({T},) or ({batch_size}, {T})"
        )
    out = (positions < 0) | (positions >= context_length)
    if not torch.compiler.is_compiling() and bool(out.any()):
        raise ValueError(
            f"positions {positions[out][:3].tolist()} are outside 0.."
            f"{context_length - 1}; positions count from 0 and stay below "
            f"context_length={context_length}"
        )


def check_file(path: str | Path, what: str) -> Path:
    """Return `path` if it is a file; else raise FileNotFoundError naming `what`.

    A folder where a file belongs gets its own message: "does not exist" would mislead.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} {path} is a folder, not a file; pass a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # int, numpy and torch integers; not 10.5
    except TypeError:
        return False
    return True


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
