"""Instruction data you can check: tasks with exact answers, loaders, exact-match scores.

Taught in Chapter 9 (Following Instructions). Every example is built by code, so its
answer is known exactly and accuracy needs no judge model: four tasks grounded in the
embedded Shakespeare corpus (which play a line is from, who speaks it, the line that
follows, a word spelled backwards) and three generic ones (count words, add numbers,
uppercase a phrase). Items (lines, words, number pairs) are assigned to "train" or
"test" by a hash, so no test prompt is ever trained on, and each task's last phrasing
is held out of training. Also loaders for the data people bring: Alpaca-style JSON
(Taori et al. 2023) and chat JSONL, local or downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from buildllm.chat import END, Message, check_messages, render_chat
from buildllm.corpora import works
from buildllm.data import download_url
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
    outputs: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Return {task: (accuracy, low, high)}, with a 95% percentile bootstrap interval.

    The interval resamples each task's examples with replacement `n_boot` times (Efron
    1979); "all" pools the tasks.
    """
    rng = random.Random(seed)
    right: dict[str, list[bool]] = {}
    for example, output in zip(examples, outputs, strict=True):
        right.setdefault(example.task, []).append(is_correct(example, output))
    right["all"] = [r for task in list(right) for r in right[task]]
    table = {}
    for task, marks in right.items():
        n = len(marks)
        means = sorted(sum(rng.choices(marks, k=n)) / n for _ in range(n_boot))
        low, high = means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]
        table[task] = (sum(marks) / n, low, high)
    return table


def _read_records(path: Path, what: str) -> list:
    """Return the records of a JSON list (.json) or of JSON lines (.jsonl)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); check the file") from None
    if not isinstance(records, list):
        raise TypeError(f"{path} must hold a JSON list of records, like Alpaca's")
    return records


def load_alpaca(path: str | Path) -> list[list[Message]]:
    """Read Alpaca-style JSON: a list of {"instruction", "input" (optional), "output"}.

    A non-empty input follows the instruction after a blank line in the user turn.
    Raises ValueError naming the first record that lacks a field.
    """
    conversations = []
    for i, record in enumerate(_read_records(Path(path), "Alpaca")):
        if not isinstance(record, dict) or not {"instruction", "output"} <= set(record):
            raise ValueError(
                f"record {i} of {path} needs 'instruction' and 'output' (and may have "
                "'input'); it is not in Alpaca's format"
            )
        user = "\n\n".join(s for s in (record["instruction"], record.get("input")) if s)
        conversations.append([{"role": "user", "content": user},
                              {"role": "assistant", "content": record["output"]}])  # fmt: skip
    return conversations


def load_chat_jsonl(path: str | Path) -> list[list[Message]]:
    """Read chat JSONL: one {"messages": [{"role", "content"}, ...]} object per line.

    Raises ValueError naming the first line that is not such an object.
    """
    conversations = []
    for i, record in enumerate(_read_records(Path(path), "chat JSONL")):
        messages = record.get("messages") if isinstance(record, dict) else None
        try:
            if not isinstance(messages, list):
                raise TypeError("it has no 'messages' list")
            check_messages(messages)
        except (ValueError, TypeError) as err:
            raise ValueError(f"line {i + 1} of {path}: {err}") from None
        conversations.append(
            [{"role": m["role"], "content": m["content"]} for m in messages]
        )
    return conversations


LOADERS: dict[str, Callable[[str | Path], list[list[Message]]]] = {
    ".json": load_alpaca,
    ".jsonl": load_chat_jsonl,
}


def load_conversations(
    source: str | Path,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[list[Message]]:
    """Read conversations from a file or an http(s) URL (downloaded once, cached).

    ".json" files are Alpaca-style, ".jsonl" files chat JSONL. A URL goes through
    `data.download_url` (cache, sha256, resume) into `cache_dir`. Raises ValueError
    for another suffix.
    """
    text = str(source)
    if "://" in text:
        path = download_url(text, cache_dir, sha256, progress)
    else:
        path = Path(source)
    if path.suffix not in LOADERS:
        raise ValueError(
            f"{source} ends in {path.suffix!r}; use .json (Alpaca) or .jsonl (chat)"
        )
    return LOADERS[path.suffix](path)


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
