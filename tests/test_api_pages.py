"""Checks on the sources of the API reference (book/api/), without building the book.

Every public module of `buildllm` has a page that documents it with `automodule`, the
website's table of contents reaches every page, and every docstring those pages render
is valid reStructuredText (docutils is the reference: what it warns about fails the
book's -W build); test_book.py then checks, on the built site, that each page lists
every public class, function and method.
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


def test_every_public_docstring_is_valid_restructuredtext(public_api):
    """What the API pages render, parsed by docutils as autodoc feeds it to Sphinx.

    With `default_role: literal` (as `_config.yml` sets), any warning here (a stray
    `*`, an unexpected indent, `|name|` read as a substitution) fails the book's -W
    build; this finds it without building the book.
    """
    import importlib
    import inspect
    import io

    from docutils.core import publish_doctree

    problems = []
    for module_name, names in public_api.items():
        module = importlib.import_module(module_name)
        for name in ["", *names]:
            obj = module
            for attr in filter(None, name.split(".")):
                obj = inspect.getattr_static(obj, attr)
            doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
            if obj is not module and doc == inspect.getdoc(type(obj)):
                continue  # no docstring of its own: autodoc shows none
            stream = io.StringIO()
            publish_doctree(
                ".. default-role:: literal\n\n" + (doc or ""),
                settings_overrides={"warning_stream": stream, "report_level": 2},
            )
            if stream.getvalue():
                where = f"{module_name}.{name}".rstrip(".")
                problems.append(f"{where}: {stream.getvalue().strip()}")
    assert not problems, "\n".join(problems)
