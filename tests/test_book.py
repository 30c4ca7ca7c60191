"""Checks on the built book: run after `make pdf` (`make check-pdf`, and `.ci/run`).

The website must work offline and link the PDF; the PDF must have its outline, embedded
fonts, rendered math and resolved references, and every chapter of `_toc.yml`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
PDF = ROOT / "_build" / "pdf" / "build-llm-from-scratch.pdf"

pytestmark = pytest.mark.book


def toc_files() -> list[str]:
    """The pages of `_toc.yml` that the PDF prints: all but the API reference part."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        if part.get("caption") == "API reference":  # website only
            continue
        files += [c["file"] for c in part.get("chapters", [])]
    files += [c["file"] for c in toc.get("chapters", [])]
    return files


@pytest.fixture(scope="module")
def pdf():
    pypdf = pytest.importorskip("pypdf")
    assert PDF.exists(), f"{PDF} is missing: run `make pdf` first"
    return pypdf.PdfReader(str(PDF))


@pytest.fixture(scope="module")
def pdf_text(pdf) -> str:
    return "\n".join(page.extract_text() or "" for page in pdf.pages)


def test_pdf_has_an_outline_with_every_chapter(pdf):
    titles = [item.title for item in pdf.outline if not isinstance(item, list)]
    assert "Contents" in titles
    # Title page + contents + one bookmark per page of the book.
    assert len(titles) >= len(toc_files()) + 1, titles


def test_pdf_has_every_chapter_title(pdf_text):
    for doc in toc_files():
        source = (ROOT / f"{doc}.md").read_text()
        title = re.search(r"^# (.+)$", source, re.MULTILINE).group(1).strip()
        words = " ".join(title.split()[:3])
        assert words in pdf_text.replace("\n", " "), (
            f"chapter {doc!r} ({title!r}) is not in the PDF"
        )


def test_pdf_leaves_out_the_api_reference(pdf):
    titles = [item.title for item in pdf.outline if not isinstance(item, list)]
    assert not [t for t in titles if "buildllm." in t or "API reference" in t], titles


def test_pdf_fonts_are_embedded(pdf):
    for number, page in enumerate(pdf.pages, 1):
        fonts = page.get("/Resources", {}).get("/Font", {})
        for ref in fonts.values():
            font = ref.get_object()
            descriptors = [font.get("/FontDescriptor")]
            for desc in font.get("/DescendantFonts", []):
                descriptors.append(desc.get_object().get("/FontDescriptor"))
            embedded = any(
                d is not None
                and any(
                    k in d.get_object()
                    for k in ("/FontFile", "/FontFile2", "/FontFile3")
                )
                for d in descriptors
            )
            assert embedded, (
                f"page {number}: font {font.get('/BaseFont')} is not embedded"
            )


def test_pdf_has_no_raw_tex_or_unresolved_references(pdf_text):
    for pattern in [
        r"\\frac",
        r"\\begin\{",
        r"\$\$",
        r"\\\(",
        r"\?\?",
        r"\bundefined\b",
        "Traceback",
    ]:
        match = re.search(pattern, pdf_text)
        assert match is None, (
            f"{pattern!r} in the PDF: …{pdf_text[max(0, match.start() - 60) : match.end() + 60]}…"
        )


def test_pdf_front_matter_is_roman_and_chapters_start_at_page_one(pdf):
    # The contents page carries a roman folio; the first chapter's first page says 1.
    texts = [page.extract_text() or "" for page in pdf.pages]
    contents = next(i for i, t in enumerate(texts) if t.lstrip().startswith("Contents"))
    assert re.search(r"\b(i|ii|iii|iv|v)\s*$", texts[contents].strip()), texts[
        contents
    ][-80:]
    first_chapter = next(
        i for i, t in enumerate(texts) if re.match(r"\s*CHAPTER 1\b", t)
    )
    assert re.search(r"\b1\s*$", texts[first_chapter].strip()), texts[first_chapter][
        -80:
    ]


def test_website_exists_links_the_pdf_and_works_offline():
    index = HTML / "book" / "index.html"
    assert index.exists(), f"{index} is missing: run `make pdf` first"
    assert (index.parent / PDF.name).exists(), (
        "the PDF is not copied beside the pages that link it"
    )
    page = index.read_text()
    assert PDF.name in page, "the website does not link the PDF"
    for doc in toc_files():
        html = (HTML / f"{doc}.html").read_text()
        assert "cdn.jsdelivr.net" not in html and "cdnjs" not in html, (
            f"{doc} loads from a CDN"
        )
    assert (HTML / "_static" / "mathjax" / "tex-svg.js").exists(), (
        "MathJax is not vendored"
    )
    assert (HTML / "searchindex.js").exists(), "the search index is missing"


def test_api_reference_lists_every_public_class_function_and_method(public_api):
    """Each module's page holds an entry (its anchor id) for every public object."""
    index = HTML / "book" / "api" / "index.html"
    assert index.exists(), f"{index} is missing: run `make pdf` first"
    missing = []
    for module, names in public_api.items():
        page = HTML / "book" / "api" / f"{module.removeprefix('buildllm.')}.html"
        html = page.read_text() if page.exists() else ""
        missing += [f"{module}.{n}" for n in names if f'id="{module}.{n}"' not in html]
        if f'href="{page.name}"' not in index.read_text():
            missing.append(f"{module} (no link from the API reference index)")
    assert not missing, f"not in the API reference: {missing}"


def test_pdf_prints_the_solutions_in_their_appendix_and_each_exercise_its_page(pdf):
    pages = [page.extract_text() or "" for page in pdf.pages]
    folio = [t.strip().splitlines()[-1].strip() if t.strip() else "" for t in pages]
    start = next(i for i, t in enumerate(pages) if re.search(r"APPENDIX C\s+Solutions", t))
    before = "\n".join(pages[:start])
    assert "Solution to Exercise" not in before  # none left beside its exercise
    solved = [  # the printed page of each solution, in book order
        folio[i]
        for i in range(start, len(pages))
        for _ in re.finditer(r"Solution to Exercise [0-9A-Z]+\.\d+", pages[i])
    ]
    sources = (ROOT / "book").glob("*.md")
    in_sources = sum(path.read_text().count("{solution-start}") for path in sources)
    assert len(solved) == in_sources > 0
    # each exercise says where its solution is printed, in the same order
    assert re.findall(r"Solution on page (\d+)", before) == solved
