"""Tests of the instruction data: answers re-derived independently, splits, loaders."""

from __future__ import annotations

import json
import math
import re

import pytest

from buildllm.chat import load_alpaca, load_chat_jsonl, load_conversations
from buildllm.corpora import works
from buildllm.instructions import (
    PHRASINGS,
    TASKS,
    Example,
    accuracy_by_task,
    build_examples,
)

N = 12  # examples per task and split: enough to see every phrasing


@pytest.fixture(scope="module")
def train():
    return build_examples("train", N, seed=1)


@pytest.fixture(scope="module")
def test():
    return build_examples("test", N, seed=1)


def fields_of(example: Example) -> dict[str, str]:
    """Recover the phrasing's fields from the prompt with a regex of the phrasing."""
    pattern = re.escape(PHRASINGS[example.task][example.phrasing])
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", pattern) + "$"
    return re.match(pattern, example.prompt).groupdict()


def test_every_answer_is_right_by_an_independent_derivation(train, test):
    titles = {w.title: w.text for w in works("shakespeare")}
    for example in train + test:
        f, answer = fields_of(example), example.answer
        if example.task == "reverse":
            assert answer == "".join(reversed(f["word"]))
        elif example.task == "add":
            assert int(answer) == int(f["a"]) + int(f["b"])
        elif example.task == "count":
            assert int(answer) == len(re.findall(r"\S+", f["text"]))
        elif example.task == "upper":
            assert answer == f["text"].upper() and answer != f["text"]
        elif example.task == "play":
            assert f["line"] in titles[answer]
        elif example.task == "next_line":
            assert any(f"{f['line']}\n{answer}" in t for t in titles.values())
        elif example.task == "speaker":
            text = titles[f["title"]]
            before = text[: text.index(f["line"])]
            label = re.findall(r"\n\n([A-Z][A-Z .']+)\.\n", before)[-1]
            assert label.title() == answer


def test_build_examples_is_reproducible_and_balanced(train):
    assert build_examples("train", N, seed=1) == train
    assert build_examples("train", N, seed=2) != train
    for task in TASKS:
        assert sum(e.task == task for e in train) == N


def test_no_test_prompt_is_in_training_and_training_never_uses_the_last_phrasing():
    train = build_examples("train", 300, seed=0)
    test = build_examples("test", 100, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert not any(e.held_out_phrasing for e in train)
    assert any(e.held_out_phrasing for e in test)


def test_build_examples_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split='dev'"):
        build_examples("dev", 1)
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        build_examples("train", 1, tasks=["poetry"])
    with pytest.raises(ValueError, match="at most"):
        build_examples("test", 10**6, tasks=["add"])


def test_accuracy_by_task_matches_the_binomial_interval():
    examples = [Example("add", "What is 1 plus 1?", "2", 0)] * 400
    right = [True] * 100 + [False] * 300  # accuracy 0.25
    acc, low, high = accuracy_by_task(examples, right, n_boot=2000)["add"]
    assert acc == 0.25
    half = 1.96 * math.sqrt(0.25 * 0.75 / 400)  # normal approximation: 0.042
    assert abs((high - low) / 2 - half) < 0.01
    assert low < acc < high
    assert accuracy_by_task(examples[:3], [True] * 3)["all"] == (1.0, 1.0, 1.0)


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello."},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]  # fmt: skip


def test_loaders_read_alpaca_json_and_chat_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in CHAT) + "\n")
    assert load_alpaca(tmp_path / "a.json") == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
         {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hello."},
         {"role": "assistant", "content": "Hello."}],
    ]  # fmt: skip
    assert load_chat_jsonl(tmp_path / "c.jsonl") == [CHAT[0]["messages"]]


def test_loaders_name_the_bad_record(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(
        ValueError, match="record 0 .* needs 'instruction' and 'output'"
    ):
        load_alpaca(tmp_path / "a.json")
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "bot", "content": ""}]}')
    with pytest.raises(ValueError, match="line 1 .* role 'bot'"):
        load_chat_jsonl(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_alpaca(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="use .json"):
        load_conversations(tmp_path / "data.csv")


def test_conversations_download_from_a_local_server_once(http_server, tmp_path):
    body = "\n".join(json.dumps(r) for r in CHAT).encode()
    http_server.files["/chat.jsonl"] = body
    http_server.faults["/chat.jsonl"] = ["truncate", "ok"]  # resumes the .part
    url = http_server.url("/chat.jsonl")
    got = load_conversations(url, cache_dir=tmp_path, progress=False)
    assert got == [CHAT[0]["messages"]]
    assert load_conversations(url, cache_dir=tmp_path, progress=False) == got
    assert len(http_server.requests) == 2  # the truncated try and its resume
