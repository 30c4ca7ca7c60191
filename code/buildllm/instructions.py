"""Instruction data you can check: tasks with exact answers, loaders, exact-match scores.

Taught in Chapter 10 (Following Instructions). Every example is built by code, so its
answer is known exactly and accuracy needs no judge model: four tasks grounded in the
embedded Shakespeare corpus (which play a line is from, who speaks it, the line that
follows, a word spelled backwards) and three generic ones (count words, add numbers,
uppercase a phrase). Items (lines, words, number pairs) are assigned to "train" or
"test" by a hash, so no test prompt is ever trained on, and each task's last phrasing
is held out of training. Scoring is exact match, with bootstrap intervals.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from buildllm.chat import (
    END,
    IGNORE_INDEX,
    Message,
    loss_targets,
    pad_batch,
    render_chat,
)
from buildllm.corpora import works
from buildllm.generate import generate_batch
from buildllm.model import GPT
from buildllm.tokenizer import BPETokenizer

Split = Literal["train", "test"]
TEST_FRACTION = 0.2  # of each task's items, chosen by hash
# Each task's phrasings; the last one never appears in training ("held-out phrasing").
PHRASINGS: dict[str, tuple[str, ...]] = {
    "play": ("Which play is this line from? {line}",
             "Name the play this line comes from: {line}",
             "In which play of Shakespeare's is this line spoken? {line}",
             "From what play is this line taken? {line}"),
    "speaker": ("Who speaks this line in {title}? {line}",
                "In {title}, which character says: {line}",
                "Name the speaker of this line from {title}: {line}",
                "In {title}, who says this? {line}"),
    "next_line": ("Give the next line after: {line}",
                  "What line follows this one? {line}",
                  "Continue with the next line: {line}",
                  "Which line comes after this? {line}"),
    "reverse": ("Spell the word backwards: {word}",
                "Write {word} in reverse.",
                "Reverse the letters of the word {word}.",
                "What is {word} spelled backwards?"),
    "count": ("How many words are in this text? {text}",
              "Count the words: {text}",
              "Give the number of words in: {text}",
              "How many words does this have? {text}"),
    "add": ("What is {a} plus {b}?",
            "Add {a} and {b}.",
            "Compute {a} + {b}.",
            "What do you get when you add {a} to {b}?"),
    "upper": ("Write in capital letters: {text}",
              "Uppercase this: {text}",
              "Convert to upper case: {text}",
              "Rewrite in capitals: {text}"),
}  # fmt: skip
TASKS = tuple(PHRASINGS)
SPEAKER_LABEL = re.compile(r"^([A-Z][A-Z .']{2,30})\.$")  # "LADY MACBETH." (capitals)


@dataclass(frozen=True)
class Example:
    """One instruction with its exact answer; `phrasing` indexes PHRASINGS[task]."""

    task: str
    prompt: str
    answer: str
    phrasing: int

    @property
    def held_out_phrasing(self) -> bool:
        """Whether the prompt uses the task's phrasing that training never shows."""
        return self.phrasing == len(PHRASINGS[self.task]) - 1

    def messages(self, with_answer: bool = True) -> list[Message]:
        """Return the example as a conversation: the prompt, then (optionally) the answer."""
        user = [{"role": "user", "content": self.prompt}]
        return user + [{"role": "assistant", "content": self.answer}] * with_answer


def split_of(item: str) -> Split:
    """Assign an item to "train" or "test" by its sha256, the same on every machine."""
    digest = int(hashlib.sha256(item.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest % 1000 < 1000 * TEST_FRACTION else "train"


@functools.cache
def speeches() -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """Return (play title, speaker, play name, verse lines) of every speech in the plays.

    A speech is a block after a blank line whose first line is a speaker label in
    capitals ("OTHELLO."); stage directions in brackets are dropped. Plays whose labels
    are abbreviations ("Ham.") are left out, so every answer is a whole name.
    """
    found = []
    for work in works("shakespeare"):
        if work.kind == "poem":
            continue
        for block in work.text.split("\n\n"):
            first, *lines = block.strip("\n").split("\n")
            label = SPEAKER_LABEL.match(first)
            lines = [s.strip() for s in lines if s.strip() and not s.startswith("[")]
            lines = [
                s for s in lines if s.upper() != s
            ]  # no lists of names in capitals
            if label and lines:
                speaker = label.group(1).title()
                found.append((work.title, speaker, work.name, tuple(lines)))
    return tuple(found)


@functools.cache
def _lines(
    min_chars: int = 20, max_chars: int = 60
) -> tuple[tuple[str, str, str], ...]:
    """Return (title, speaker, line) of speech lines of a readable length."""
    return tuple(
        (title, speaker, line)
        for title, speaker, _, lines in speeches()
        for line in lines
        if min_chars <= len(line) <= max_chars
    )


@functools.cache
def _top_speakers(per_play: int = 3) -> frozenset[tuple[str, str]]:
    """Return the (title, speaker) pairs of each play's `per_play` busiest speakers."""
    counts: dict[tuple[str, str], int] = {}
    for title, speaker, _, _ in speeches():
        counts[title, speaker] = counts.get((title, speaker), 0) + 1
    top = []
    for title in {t for t, _ in counts}:
        ranked = sorted((-n, s) for (t, s), n in counts.items() if t == title)
        top += [(title, s) for _, s in ranked[:per_play]]
    return frozenset(top)


@functools.cache
def _words() -> tuple[str, ...]:
    """Return the distinct lower-case words of 4-7 letters in the plays, sorted."""
    text = " ".join(line for _, _, line in _lines())
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,7}\b", text))))


@functools.cache
def pool(task: str, split: Split) -> tuple[tuple[dict[str, str], str], ...]:
    """Return the (fields of the phrasing, answer) items of `task` in `split`."""
    return tuple(i for i in _items(task) if split_of(task + repr(i[0])) == split)


def _items(task: str) -> list[tuple[dict[str, str], str]]:
    """Return every (fields of the phrasing, answer) a task can ask, in a fixed order."""
    if task not in PHRASINGS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if task == "play":
        return [({"line": line}, title) for title, _, line in _lines()]
    if task == "speaker":
        top = _top_speakers()
        return [
            ({"title": t, "line": line}, s) for t, s, line in _lines() if (t, s) in top
        ]
    if task == "next_line":
        return [
            ({"line": a}, b)
            for _, _, _, lines in speeches()
            for a, b in itertools.pairwise(lines)
            if 20 <= len(a) <= 50 and 20 <= len(b) <= 50
        ]
    words = _words()
    if task == "reverse":
        return [({"word": w}, w[::-1]) for w in words]
    if task == "add":
        return [
            ({"a": str(a), "b": str(b)}, str(a + b))
            for a in range(50)
            for b in range(50)
        ]
    rng = random.Random(task)  # phrases of corpus words, the same on every machine
    phrases = [" ".join(rng.sample(words, rng.randint(2, 6))) for _ in range(5000)]
    if task == "count":
        return [({"text": p}, str(len(p.split()))) for p in phrases]
    if task == "upper":
        return [
            ({"text": " ".join(p.split()[:3])}, " ".join(p.split()[:3]).upper())
            for p in phrases
        ]
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def build_examples(
    split: Split, n_per_task: int, seed: int = 0, tasks: Sequence[str] = TASKS
) -> list[Example]:
    """Draw `n_per_task` examples of each task from `split`, reproducibly.

    "train" uses every phrasing but each task's last; "test" draws from all phrasings,
    so about a quarter of its prompts are phrased as training never was. Items are
    drawn without replacement. Raises ValueError for an unknown split or task, or for
    more examples than a task has items.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    rng = random.Random(f"{split}-{seed}")
    examples = []
    for task in tasks:
        items = pool(task, split)
        if n_per_task > len(items):
            raise ValueError(
                f"task {task!r} has {len(items)} {split} items but n_per_task="
                f"{n_per_task}; ask for at most {len(items)}"
            )
        n_phrasings = len(PHRASINGS[task]) - (split == "train")
        for fields, answer in rng.sample(items, n_per_task):
            phrasing = rng.randrange(n_phrasings)
            prompt = PHRASINGS[task][phrasing].format(**fields)
            examples.append(Example(task, prompt, answer, phrasing))
    rng.shuffle(examples)
    return examples


def is_correct(example: Example, output: str) -> bool:
    """Exact match: the output, stripped of surrounding whitespace, is the answer."""
    return output.strip() == example.answer


def accuracy_by_task(
    examples: Sequence[Example],
    right: Sequence[bool],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Return {task: (accuracy, low, high)}, with a 95% percentile bootstrap interval.

    `right[i]` says whether example i was answered exactly. The interval resamples each
    task's examples with replacement `n_boot` times (Efron 1979); "all" pools the tasks.
    """
    rng = random.Random(seed)
    marks: dict[str, list[bool]] = {}
    for example, ok in zip(examples, right, strict=True):
        marks.setdefault(example.task, []).append(bool(ok))
    marks["all"] = [ok for task in list(marks) for ok in marks[task]]
    table = {}
    for task, oks in marks.items():
        n = len(oks)
        means = sorted(sum(rng.choices(oks, k=n)) / n for _ in range(n_boot))
        low, high = means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]
        table[task] = (sum(oks) / n, low, high)
    return table


def generate_answers(
    model: GPT,
    tokenizer: BPETokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 24,
) -> list[str]:
    """Return the model's greedy answer to each example's prompt, up to its turn end.

    Each prompt is rendered by the chat template with the generation prompt; decoding
    stops at `<|end|>`. Prompts of equal length decode as one batch.
    """
    prompts = [
        render_chat(
            tokenizer, e.messages(with_answer=False), add_generation_prompt=True
        )[0]
        for e in examples
    ]
    end = tokenizer.special_tokens[END]
    new = generate_batch(
        model, prompts, max_new_tokens, temperature=0.0, stop_tokens={end}
    )
    return [tokenizer.decode(ids) for ids in new]


@torch.no_grad()
def greedy_exact_match(
    model: GPT,
    tokenizer: BPETokenizer,
    examples: Sequence[Example],
    batch_size: int = 64,
) -> list[bool]:
    """Return, for each example, whether greedy decoding writes its answer exactly.

    Greedy decoding writes the answer's tokens and then `<|end|>` exactly when, fed
    the answer, the model's most likely next token is the answer's at every answer
    position (and `<|end|>` after it): one forward pass checks this, where decoding
    needs one per token. This scores the answer's own tokenization, so it can only be
    stricter than comparing decoded text.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = [loss_targets(*render_chat(tokenizer, e.messages())) for e in examples]
    right = []
    for start in range(0, len(pairs), batch_size):
        x, y = pad_batch(pairs[start : start + batch_size], tokenizer.eot_id or 0)
        x, y = x.to(device), y.to(device)  # (B, T) each
        best = model(x).argmax(dim=-1)  # (B, T): the greedy choice at every position
        learned = y != IGNORE_INDEX  # (B, T): the answer and its <|end|>
        right += ((best == y) | ~learned).all(dim=-1).tolist()
    model.train(was_training)
    return right
