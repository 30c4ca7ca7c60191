"""Checks on the built book: run after `make pdf` (`make check-pdf`, and `.ci/run`).

The website must work offline and link the PDF; the PDF must have its outline, embedded
fonts, rendered math and resolved references, and every chapter of `_toc.yml`. The site
is also driven in headless Chromium (the system's, by Playwright), as a reader sees it.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import string
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
PDF = ROOT / "_build" / "pdf" / "build-llm-from-scratch.pdf"

pytestmark = pytest.mark.book
PHONE = {"width": 400, "height": 900}
DESKTOP = {"width": 1400, "height": 900}
TIMEOUT_MS = 120_000  # a loaded 2-core machine takes over Playwright's 30 s at times


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


# ---- the site in a browser ----------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per request would bury a failure
        pass


@pytest.fixture(scope="module")
def site():
    """The built site over HTTP on 127.0.0.1, as a web server hands it to a reader."""
    assert (HTML / "book" / "index.html").exists(), "run `make pdf` first"
    handler = partial(QuietHandler, directory=str(HTML))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: `make browser` installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        expect.set_options(timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def open_page(browser, url: str, viewport: dict):
    """A new tab at `url`, loaded, its math typeset; `page.errors` collects what the
    console reports as errors and the exceptions no script caught."""
    page = browser.new_page(viewport=viewport)
    page.errors = []

    def console(message):
        # Chromium's own probe for a site icon is not a resource of the page.
        url = message.location.get("url", "")
        if message.type == "error" and not url.endswith("/favicon.ico"):
            page.errors.append(f"{message.text} ({url})")

    page.on("console", console)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)  # returns on the load event: every resource of the page fetched
    page.evaluate("window.MathJax?.startup?.promise")
    return page


def test_phone_menus_open_the_chapters_and_the_page_contents(site, browser):
    page = open_page(browser, f"{site}/book/02-architecture.html", PHONE)
    chapters = page.locator("nav.bd-docs-nav a[href='01-tokenization.html']")
    contents = page.locator("nav.page-toc a.nav-link").first
    expect(chapters).not_to_be_in_viewport()
    expect(contents).not_to_be_in_viewport()
    page.locator(".primary-toggle:visible").click()
    expect(chapters).to_be_visible()
    expect(chapters).to_be_in_viewport(ratio=1)
    page.keyboard.press("Escape")
    expect(chapters).not_to_be_in_viewport()
    page.locator(".secondary-toggle:visible").click()
    expect(contents).to_be_visible()
    expect(contents).to_be_in_viewport(ratio=1)
    page.close()


def test_desktop_header_has_one_search_box(site, browser):
    page = open_page(browser, f"{site}/book/02-architecture.html", DESKTOP)
    boxes = [".search-button", ".search-button-field", "input[type=search]"]
    search = page.locator(", ".join(f"{box}:visible" for box in boxes))
    assert search.count() == 1, f"{search.count()} search boxes on a desktop page"
    page.close()


def appendices() -> list[tuple[str, str]]:
    """(letter, doc) of each appendix, in the order the book letters them."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return list(
        zip(string.ascii_uppercase, config["sphinx"]["config"]["appendix_docs"])
    )


def test_appendices_are_lettered_in_tab_titles_footers_and_search(site, browser):
    index = (HTML / "searchindex.js").read_text()
    index = json.loads(index[index.index("(") + 1 : index.rindex(")")])
    searched = dict(zip(index["docnames"], index["titles"]))
    docs = toc_files()
    for letter, doc in appendices():
        page = open_page(browser, f"{site}/{doc}.html", DESKTOP)
        assert page.title().startswith(f"{letter}. "), page.title()
        page.close()
        before = docs[docs.index(doc) - 1]
        page = open_page(browser, f"{site}/{before}.html", DESKTOP)
        footer = page.locator("a.right-next .prev-next-title").inner_text()
        assert footer.startswith(f"{letter}. "), f"{before}'s next link: {footer}"
        page.close()
        title = re.sub("<[^>]+>", "", searched[doc])
        assert title.startswith(f"{letter}. "), f"the search index names {title!r}"


@pytest.mark.parametrize(
    "path", ["search.html", "genindex.html", "book/api/index.html"]
)
def test_pdf_link_resolves_from_every_folder(site, browser, path):
    page = open_page(browser, f"{site}/{path}", DESKTOP)
    links = page.eval_on_selector_all(
        f"a[href$='{PDF.name}']", "as => as.map(a => a.href)"
    )
    assert links, f"{path} does not link the PDF"
    for link in links:
        response = page.request.get(link, timeout=TIMEOUT_MS)
        assert response.ok and response.headers["content-type"] == "application/pdf", (
            f"{path} links {link}: {response.status}"
        )
    page.close()


def test_published_pdf_is_world_readable():
    mode = (HTML / "book" / PDF.name).stat().st_mode
    assert mode & stat.S_IROTH, f"the served PDF has mode {stat.filemode(mode)}"


# Per display equation: does its box need scrolling, is it set to scroll, and does its
# number cover any of it (the number's box against the visible part of the equation)?
MATH_LAYOUT = """() => [...document.querySelectorAll("div.math")].map(box => {
  const eq = box.querySelector("mjx-container"), number = box.querySelector(".eqno");
  const a = eq.getBoundingClientRect(), b = number?.getBoundingClientRect();
  return {
    id: box.id,
    overflows: eq.scrollWidth > eq.clientWidth + 1,
    scrolls: ["auto", "scroll"].includes(getComputedStyle(eq).overflowX),
    covered: !!b && b.left < a.right && a.left < b.right
      && b.top < a.bottom && a.top < b.bottom,
  };
})"""


def test_pages_fit_a_phone_and_display_math_is_whole_on_desktop(site, browser):
    """On a phone no page is wider than the screen (a wide equation scrolls in its box);
    on a desktop every equation shows whole; no equation number covers its equation."""
    math_pages = [
        doc
        for doc in toc_files()
        if 'class="math notranslate' in (HTML / f"{doc}.html").read_text()
    ]
    problems = []
    for doc in math_pages:
        for viewport in (DESKTOP, PHONE):
            page = open_page(browser, f"{site}/{doc}.html", viewport)
            width = page.evaluate("document.documentElement.scrollWidth")
            if width > viewport["width"]:
                problems.append(f"{doc} is {width} px wide at {viewport['width']} px")
            for eq in page.evaluate(MATH_LAYOUT):
                where = f"{doc}#{eq['id']} at {viewport['width']} px"
                if eq["covered"]:
                    problems.append(f"{where}: its number covers it")
                if eq["overflows"] and (viewport is DESKTOP or not eq["scrolls"]):
                    problems.append(f"{where}: cut off")
            page.close()
    assert not problems, problems


def test_pages_log_no_errors(site, browser):
    errors = {}
    for path in [f"{doc}.html" for doc in toc_files()] + ["search.html"]:
        page = open_page(browser, f"{site}/{path}", PHONE)
        if page.errors:
            errors[path] = page.errors
        page.close()
    assert not errors, errors


# Chapters quick enough to run twice: their visible cells alone, as a reader types them.
TYPED_CHAPTERS = ["index", "00-language-models", "01-tokenization", "02-architecture",
                  "03-attention", "04-transformer-block"]
DURATION = re.compile(r"\d+(\.\d+)?\s?(s|ms|seconds)\b")


def printed(cell) -> str:
    """What a cell printed to stdout, its timings masked (they differ from run to run)."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    return DURATION.sub("<duration>", text)


@pytest.mark.parametrize("chapter", TYPED_CHAPTERS)
def test_visible_cells_alone_print_what_the_book_prints(chapter):
    """Run a chapter's visible cells only, in order, and compare with the built book.

    The book's outputs come from the build's execution cache, which holds the chapter
    as last executed (the notebooks in _build/jupyter_execute lose their outputs when a
    build takes them from the cache).
    """
    from jupyter_cache import get_cache
    from myst_nb.core.read import read_myst_markdown_notebook
    from nbclient import NotebookClient

    source = (ROOT / "book" / f"{chapter}.md").read_text(encoding="utf-8")
    cache = get_cache(ROOT / "_build" / ".jupyter_cache")
    try:
        _, built = cache.merge_match_into_notebook(read_myst_markdown_notebook(source))
    except KeyError:
        pytest.fail(f"{chapter} is not in the execution cache: run `make pdf` first")
    typed = read_myst_markdown_notebook(source)
    typed.cells = [c for c in typed.cells if c.cell_type == "code"
                   and "remove-cell" not in c.metadata.get("tags", [])]
    NotebookClient(typed, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "book")}}).execute()
    book = {c.source: printed(c) for c in built.cells if c.cell_type == "code"}
    for cell in typed.cells:
        assert printed(cell) == book[cell.source], f"{chapter}: the cell\n{cell.source}"


# Figures the book states in more than one place, each found by a pattern in the PDF's
# text: all statements must agree (to the precision of the coarser one).
STATED_TWICE = {
    "GPT-2 small's parameter count": r"\b(124,\d{3},\d{3}) parameters",
    "the 124M recipe's H100-hours": r"about ([\d.]+) H100-hours",
    "GPT-2's published validation loss": r"validation loss of (?:about )?(3\.\d+)",
    "gzip's bits per byte": r"gzip[^.]{0,80}?(\d\.\d+)",
    "the unigram model's bits per byte": r"(?:unigram|each byte occurs)[^.]{0,100}?"
                                         r"(\d\.\d+) bits per byte",
}


def agree(a: str, b: str) -> bool:
    """Whether two printed numbers agree to the decimals of the coarser one."""
    decimals = min(len(x.partition(".")[2]) for x in (a, b))
    x, y = (float(v.replace(",", "")) for v in (a, b))
    return round(x, decimals) == round(y, decimals)


@pytest.mark.parametrize("fact", STATED_TWICE)
def test_figures_stated_twice_agree(pdf_text, fact):
    values = re.findall(STATED_TWICE[fact], re.sub(r"\s+", " ", pdf_text))
    assert len(values) >= 2, f"{fact}: stated {len(values)} times; update the pattern"
    assert all(agree(values[0], v) for v in values), f"{fact}: {values}"


def test_agree_compares_at_the_coarser_precision():
    assert agree("3.152", "3.15") and agree("124,439,808", "124,439,808")
    assert not agree("3.16", "3.152") and not agree("6.0", "6.1")
