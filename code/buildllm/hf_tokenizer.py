"""Hugging Face tokenizer files for a `BPETokenizer`: export, and load GPT-2's back.

Taught in Chapter 7 (Generation, "Hugging Face interop"), beside `hf.py`'s weights.
`export_tokenizer_hf` writes GPT-2's `vocab.json` + `merges.txt` (bytes spelled with
`bytes_to_unicode`) and a `tokenizer.json` carrying the pre-tokenization regex, so
`transformers.AutoTokenizer` and `tokenizers.Tokenizer.from_file` encode id for id as
`BPETokenizer.encode`; `to_tiktoken` covers tiktoken. Reference: Radford et al. 2019.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from buildllm.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, gpt2_tokenizer
from buildllm.vocab_io import bytes_to_unicode


def export_tokenizer_hf(tokenizer: BPETokenizer, folder: str | os.PathLike) -> Path:
    """Write `tokenizer` as the files `transformers.AutoTokenizer` loads; return folder.

    `vocab.json` and `merges.txt` are GPT-2's formats, bytes spelled by
    `bytes_to_unicode` and merges ordered by the rank of the token they form (the rank
    `encode` uses), so GPT-2's own vocabulary writes back GPT-2's files. `tokenizer.json`
    adds the pre-tokenization regex (any pattern, not only GPT-2's) for the `tokenizers`
    library; `tokenizer_config.json` names `<|endoftext|>` as bos/eos/unk when present.
    """
    spell = bytes_to_unicode()
    text = ["".join(spell[b] for b in token) for token in tokenizer.vocab]
    vocab = {t: i for i, t in enumerate(text)} | tokenizer.special_tokens
    formed = {
        (a, b): tokenizer.vocab[a] + tokenizer.vocab[b] for a, b in tokenizer.merges
    }
    merges = sorted(tokenizer.merges, key=lambda ab: tokenizer.merge_rank(formed[ab]))
    pairs = [[text[a], text[b]] for a, b in merges]
    specials = [
        {"id": i, "content": s, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for s, i in tokenizer.special_tokens.items()
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    split = {"type": "Split", "pattern": {"Regex": tokenizer.pattern},
             "behavior": "Isolated", "invert": False}  # fmt: skip
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split, byte_level | {"use_regex": False}]},
        "post_processor": None, "decoder": byte_level | {"use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }  # fmt: skip
    eot = None if tokenizer.eot_id is None else ENDOFTEXT
    # transformers' GPT2Tokenizer rebuilds GPT-2's regex; the generic class reads ours.
    gpt2 = tokenizer.pattern == GPT2_PATTERN
    config = {"tokenizer_class": "GPT2Tokenizer" if gpt2 else "PreTrainedTokenizerFast",
              "model_max_length": int(1e30),
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}  # fmt: skip
    if eot is not None:
        config |= {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs),
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }
    return _write_files(Path(folder), files)


def load_hf_tokenizer(source: str | os.PathLike) -> BPETokenizer:
    """Return the tokenizer of a Hugging Face GPT-2 folder (or of a weights file's folder).

    Reads the folder's `vocab.json` and `merges.txt` (GPT-2's formats) and the regex of
    its `tokenizer.json` if it names one; a folder without them gets GPT-2's tokenizer
    (`gpt2_tokenizer`), which published GPT-2 weights use.
    Raises FileNotFoundError for a missing path, ValueError for inconsistent files.
    """
    folder = Path(source)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    folder = folder if folder.is_dir() else folder.parent
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_json.is_file() and merges_txt.is_file()):
        return gpt2_tokenizer()
    tokenizer = BPETokenizer.from_gpt2_files(vocab_json, merges_txt)
    if (folder / "tokenizer.json").is_file():
        steps = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        steps = (steps.get("pre_tokenizer") or {}).get("pretokenizers", [])
        regexes = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split"]
        if regexes:
            tokenizer = BPETokenizer(
                tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens, regexes[0]
            )
    return tokenizer


def _write_files(folder: Path, files: dict[str, str]) -> Path:
    """Write text files into `folder`, each to a temporary name and then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, folder / name)
    return folder
