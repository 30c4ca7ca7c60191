"""Checks on the sources of the API reference (book/api/), without building the book.

Every public module of `buildllm` has a page that documents it with `automodule`, and
the website's table of contents reaches every page; test_book.py then checks, on the
built site, that each page lists every public class, function and method.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "book" / "api"


def api_part_docs() -> list[str]:
    """The docnames the "API reference" part of `_toc.yml` names, globs expanded."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = [p for p in toc.get("parts", []) if p.get("caption") == "API reference"]
    assert parts, "_toc.yml has no part with caption 'API reference'"
    sources = [str(p.relative_to(ROOT).with_suffix("")) for p in API.glob("*.md")]
    docs: list[str] = []

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                docs.append(entry["file"])
            if "glob" in entry:
                docs.extend(fnmatch.filter(sources, entry["glob"]))
            walk(entry.get("sections", []))

    walk(parts[-1].get("chapters", []))
    assert toc["parts"][-1] is parts[-1], "the API reference is not the last part"
    return docs


def test_every_public_module_has_an_api_page_that_documents_it(public_api):
    pages = {p.stem: p.read_text() for p in API.glob("*.md") if p.stem != "index"}
    modules = {m.removeprefix("buildllm.") for m in public_api}
    assert sorted(modules - set(pages)) == [], "modules without a page in book/api/"
    assert sorted(set(pages) - modules) == [], "pages in book/api/ for no module"
    for name, text in pages.items():
        assert re.search(
            rf"^\.\. automodule:: buildllm\.{name}$", text, re.MULTILINE
        ), f"book/api/{name}.md does not automodule buildllm.{name}"


def test_the_api_reference_part_of_the_toc_reaches_every_api_page():
    docs = api_part_docs()
    assert docs[0] == "book/api/index", "the part opens with book/api/index"
    expected = {f"book/api/{p.stem}" for p in API.glob("*.md")}
    assert set(docs) == expected, sorted(expected ^ set(docs))
