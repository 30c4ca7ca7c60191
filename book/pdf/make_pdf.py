"""Turn the built website into the book's PDF.

    python book/pdf/make_pdf.py _build/html _build/pdf/build-llm-from-scratch.pdf

Reads the pages of `_build/html` in the order of `_toc.yml`, keeps each page's article, makes
its ids unique and its links internal, renders TeX to SVG with MathJax under node
(`book/pdf/tex2svg.js`), wraps code lines for a hanging indent, adds a title page and a table of
contents, and prints the result with WeasyPrint and `book/pdf/print.css`. The print stylesheet,
not this script, decides how pages look. The run is skipped when its input is unchanged.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from bs4 import BeautifulSoup, NavigableString, Tag

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FONT_CSS = [
    "@fontsource/source-serif-4/400.css",
    "@fontsource/source-serif-4/400-italic.css",
    "@fontsource/source-serif-4/600.css",
    "@fontsource/source-serif-4/700.css",
    "@fontsource/source-sans-3/400.css",
    "@fontsource/source-sans-3/600.css",
    "@fontsource/source-sans-3/700.css",
    "@fontsource/iosevka/400.css",
    "@fontsource/iosevka/700.css",
]
LONG_INLINE_CODE = 24  # characters: inline code this long makes its paragraph ragged
WEB_ONLY = {"API reference"}  # parts of _toc.yml the PDF leaves out


def toc_docs(toc_file: Path) -> list[tuple[str, str]]:
    """Return (docname, part) for every printed page in `_toc.yml`, in reading order.

    The parts in `WEB_ONLY` (the API reference, generated from the docstrings) stay on
    the website: a printed book teaches the code, the site looks it up.
    """
    toc = yaml.safe_load(toc_file.read_text())
    docs = [(toc["root"], "front")]

    def walk(entries: list[dict], part: str) -> None:
        for entry in entries or []:
            if "file" in entry:
                docs.append((entry["file"], part))
            walk(entry.get("sections", []), part)

    for part in toc.get("parts", []):
        if part.get("caption") in WEB_ONLY:
            continue
        caption = part.get("caption", "").lower()
        kind = (
            "appendix"
            if "appendi" in caption
            else "back"
            if "back" in caption
            else "main"
        )
        walk(part.get("chapters", []), kind)
    walk(toc.get("chapters", []), "main")
    return docs


def doc_key(docname: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", docname.lower()).strip("-")


def load_article(html_dir: Path, docname: str) -> Tag:
    """Return the page's <article>, cleaned of website-only elements."""
    path = html_dir / f"{docname}.html"
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    article = soup.find("article", class_="bd-article")
    for sel in [
        "a.headerlink",
        "button",
        "details.above-input",
        ".only-html",
        "script",
    ]:
        for el in article.select(sel):
            el.decompose()
    for details in article.find_all(
        "details"
    ):  # solutions and other dropdowns print open
        summary = details.find("summary")
        if summary is not None:
            summary.name = "p"
            summary["class"] = ["dropdown-title"]
        details.name = "div"
    for img in article.find_all("img"):
        img["src"] = (path.parent / img["src"]).resolve().as_uri()
    return article


def relink(article: Tag, key: str, docname: str, keys: dict[str, str]) -> None:
    """Prefix every id with the page key and turn links between pages into internal ones."""
    for el in article.find_all(id=True):
        el["id"] = f"{key}--{el['id']}"
    here = (Path(docname).parent).as_posix()
    for a in article.find_all("a", href=True):
        href = a["href"]
        if re.match(r"^[a-z]+:", href):
            continue
        page, _, frag = href.partition("#")
        if page:
            target = os.path.normpath(os.path.join(here, page)).removesuffix(".html")
            if target not in keys:
                continue
            tkey = keys[target]
        else:
            tkey = key
        a["href"] = f"#{tkey}--{frag}" if frag else f"#{tkey}"


def split_lines(pre: Tag) -> list[list[tuple[list[str] | None, str]]]:
    """Split a highlighted <pre> into lines of (css classes, text) tokens."""
    lines: list[list[tuple[list[str] | None, str]]] = [[]]

    def emit(classes: list[str] | None, text: str) -> None:
        parts = text.split("\n")
        for i, part in enumerate(parts):
            if i:
                lines.append([])
            if part:
                lines[-1].append((classes, part))

    def walk(node: Tag, classes: list[str] | None) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                emit(classes, str(child))
            elif isinstance(child, Tag):
                walk(child, child.get("class") or classes)

    walk(pre, None)
    if lines and not lines[-1]:
        lines.pop()
    return lines


def wrap_code(soup: BeautifulSoup, article: Tag) -> None:
    """Give every code line its own block so long lines wrap with a hanging indent."""
    for pre in article.find_all("pre"):
        lines = split_lines(pre)
        pre.clear()
        for tokens in lines:
            text = "".join(t for _, t in tokens)
            indent = len(text) - len(text.lstrip(" "))
            line = soup.new_tag("span", attrs={"class": "line"})
            line["style"] = f"padding-left:{indent + 4}ch;text-indent:-4ch"
            to_strip = indent
            for classes, part in tokens:
                if to_strip:
                    cut = min(to_strip, len(part) - len(part.lstrip(" ")))
                    part, to_strip = part[cut:], to_strip - cut
                    if to_strip and not part:
                        continue
                if not part:
                    continue
                if classes:
                    span = soup.new_tag("span", attrs={"class": classes})
                    span.string = part
                    line.append(span)
                else:
                    line.append(NavigableString(part))
            if not tokens:
                line.append(NavigableString("\u200b"))  # keep empty lines' height
            pre.append(line)


def ragged_beside_long_code(article: Tag) -> None:
    """Set paragraphs with long inline code ragged-right.

    Inline code breaks only at its spaces, so a justified line that holds a long piece
    of it stretches its other spaces into rivers; a ragged line does not.
    """
    for code in article.select("p code.literal, li code.literal"):
        if len(code.get_text()) >= LONG_INLINE_CODE:
            block = code.find_parent(["p", "li"])
            if "ragged" not in block.get("class", []):
                block["class"] = [*block.get("class", []), "ragged"]


def font_coverage() -> dict[str, set[int]]:
    """Return the code points each @font-face family of the book covers."""
    from fontTools.ttLib import TTFont

    coverage = {}
    for role, family in [
        ("serif", "source-serif-4"),
        ("sans", "source-sans-3"),
        ("mono", "iosevka"),
    ]:
        files = (ROOT / "node_modules" / "@fontsource" / family / "files").glob(
            "*-400-normal.woff2"
        )
        coverage[role] = set().union(*(TTFont(f).getBestCmap() for f in files))
    return coverage


def wrap_uncovered(
    soup: BeautifulSoup, article: Tag, coverage: dict[str, set[int]]
) -> None:
    """Put characters the book's fonts lack (CJK, emoji, rare symbols) in a fallback span.

    WeasyPrint falls back from an @font-face family to a system font inside one text run,
    but the run's text then cannot be copied from the PDF; a span of its own keeps it whole.
    """
    for text in list(article.find_all(string=True)):
        if text.find_parent(["svg", "style", "script"]) is not None:
            continue
        if text.find_parent(["pre", "code", "kbd", "samp"]) is not None:
            role = "mono"
        elif (
            text.find_parent(["h1", "h2", "h3", "h4", "figcaption", "caption"])
            is not None
        ):
            role = "sans"
        else:
            role = "serif"
        chars = coverage[role]
        value = str(text)
        if all(ord(c) < 128 or ord(c) in chars for c in value):
            continue
        pieces = []
        for c in value:
            if ord(c) < 128 or ord(c) in chars or c == "\u200b":
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += c
                else:
                    pieces.append(c)
            else:
                span = soup.new_tag(
                    "span", attrs={"class": f"fallback fallback-{role}"}
                )
                span.string = c
                pieces.append(span)
        for piece in pieces:
            text.insert_before(
                piece if isinstance(piece, Tag) else NavigableString(piece)
            )
        text.extract()


def render_math(soup: BeautifulSoup, articles: list[Tag]) -> None:
    """Replace every TeX formula with the SVG MathJax renders for it (one node process)."""
    nodes, items = [], []
    for article in articles:
        for el in article.select("span.math, div.math"):
            display = el.name == "div"
            eqno = el.find("span", class_="eqno")
            if eqno is not None:
                eqno.extract()
            tex = el.get_text().strip()
            for left, right in [
                (r"\(", r"\)"),
                (r"\[", r"\]"),
                ("$$", "$$"),
                ("$", "$"),
            ]:
                if tex.startswith(left) and tex.endswith(right):
                    tex = tex[len(left) : len(tex) - len(right)]
                    break
            nodes.append((el, display, eqno))
            items.append({"tex": tex, "display": display})
    if not items:
        return
    result = subprocess.run(
        ["node", str(HERE / "tex2svg.js")],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"make_pdf: MathJax failed:\n{result.stderr}")
    for (el, display, eqno), svg in zip(nodes, json.loads(result.stdout)):
        el.clear()
        el["class"] = ["math-display" if display else "math-inline"]
        el.append(BeautifulSoup(svg, "html.parser"))
        if eqno is not None:
            el.append(eqno)


def title_page(soup: BeautifulSoup, config: dict) -> Tag:
    page = soup.new_tag("section", attrs={"class": "title-page"})
    for cls, text in [
        ("book-title", config.get("title", "")),
        ("book-subtitle", "A GPT you write, test and train yourself, line by line"),
        ("book-author", config.get("author", "")),
    ]:
        p = soup.new_tag("p", attrs={"class": cls})
        p.string = text
        page.append(p)
    return page


def build_stamp() -> str:
    """Say which sources this PDF was built from: the commit, marked when edited."""
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        edited = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True,
        ).stdout.strip()
    except OSError:  # no git: a copy of the sources without history
        commit = edited = ""
    if not commit:
        return "built from sources outside git"
    return f"built from commit {commit}" + (" with local changes" if edited else "")


def copyright_page(soup: BeautifulSoup, config: dict) -> Tag:
    """The back of the title page: copyright, licence, version and where the code is."""
    meta, today = importlib.metadata.metadata("buildllm"), datetime.date.today()
    page = soup.new_tag("section", attrs={"class": "copyright-page"})
    for text in [
        f"{config.get('title', '')}, version {meta['Version']}, "
        f"{build_stamp()} on {today.day} {today:%B %Y}.",
        f"© {config.get('copyright', '')} {config.get('author', '')}. The text and the "
        f"code are released under the {meta['License-Expression']} licence.",
        "Every listing is code of the Python package buildllm, in the folder "
        "code/buildllm of the book’s repository: pip install -e . in a clone installs "
        "it, make test runs its tests and make pdf rebuilds this book from it, website "
        "and PDF, running every chapter’s code again.",
        "Typeset with WeasyPrint in Source Serif 4, Source Sans 3 and Iosevka; "
        "formulas drawn by MathJax.",
    ]:
        p = soup.new_tag("p")
        p.string = text
        page.append(p)
    return page


def toc_page(soup: BeautifulSoup, chapters: list[tuple[str, Tag, str]]) -> Tag:
    """Build the table of contents: chapters and their sections with page numbers."""
    nav = soup.new_tag("nav", attrs={"class": "toc"})
    heading = soup.new_tag("h1", attrs={"class": "toc-title"})
    heading.string = "Contents"
    nav.append(heading)
    ul = soup.new_tag("ul")
    for key, article, part in chapters:
        h1 = article.find("h1")
        top = soup.new_tag("li", attrs={"class": f"toc-chapter toc-{part}"})
        link = soup.new_tag("a", href=f"#{key}")
        link.string = h1.get_text(" ", strip=True)
        top.append(link)
        sub = soup.new_tag("ul")
        for h2 in article.find_all("h2"):
            # Point at the heading, not its section: a heading pushed to the next
            # page leaves the section's start, and its page number, behind.
            h2["id"] = h2.get("id") or f"{h2.find_parent('section')['id']}-title"
            li = soup.new_tag("li", attrs={"class": "toc-section"})
            a = soup.new_tag("a", href=f"#{h2['id']}")
            a.string = h2.get_text(" ", strip=True)
            li.append(a)
            sub.append(li)
        if sub.contents:
            top.append(sub)
        ul.append(top)
    nav.append(ul)
    return nav


def solutions_appendix(
    soup: BeautifulSoup, chapters: list[tuple[str, Tag, str]]
) -> Tag:
    """Move every exercise's solution into one article, "Solutions", grouped by chapter.

    A printed exercise then reads without its answer on the same page; each exercise
    gains a line pointing at its solution's page, and each solution's title already
    links back to its exercise. The website keeps them in dropdowns in place.
    """
    article = soup.new_tag("div")
    heading = soup.new_tag("h1")
    heading.string = "Solutions"
    article.append(heading)
    for key, chapter, _ in chapters:
        solutions = chapter.select("div.solution")
        if not solutions:
            continue
        number = chapter.find("h1").find("span", class_="section-number")
        label = number.get_text(strip=True).rstrip(".") if number else ""
        kind = "Appendix" if label.isalpha() else "Chapter"
        h2 = soup.new_tag("h2", id=f"solutions--{key}")
        h2.string = f"Exercises of {kind} {label}"
        article.append(h2)
        for solution in solutions:
            back = solution.select_one("p.admonition-title a[href^='#']")
            exercise = back and chapter.find(id=back["href"][1:])
            if exercise is not None and solution.get("id"):
                pointer = soup.new_tag("p", attrs={"class": "solution-pointer"})
                link = soup.new_tag("a", href=f"#{solution['id']}")
                link.string = "Solution on page "
                pointer.append(link)
                exercise.append(pointer)
            article.append(solution.extract())
    return article


def assemble(html_dir: Path, toc_file: Path, config: dict) -> str:
    docs = toc_docs(toc_file)
    keys = {doc: doc_key(doc) for doc, _ in docs}
    soup = BeautifulSoup(
        "<!DOCTYPE html><html lang='en'><head></head><body></body></html>",
        "html.parser",
    )
    head = soup.head
    head.append(soup.new_tag("meta", charset="utf-8"))
    title = soup.new_tag("title")
    title.string = config.get("title", "")
    head.append(title)
    for css in FONT_CSS:
        head.append(
            soup.new_tag(
                "link", rel="stylesheet", href=(ROOT / "node_modules" / css).as_uri()
            )
        )
    pygments = html_dir / "_static" / "pygments.css"
    for sheet in [pygments, HERE / "print.css"]:
        head.append(
            soup.new_tag("link", rel="stylesheet", href=sheet.resolve().as_uri())
        )
    chapters = []
    coverage = font_coverage()
    for doc, part in docs:
        article = load_article(html_dir, doc)
        relink(article, keys[doc], doc, keys)
        wrap_code(soup, article)
        ragged_beside_long_code(article)
        wrap_uncovered(soup, article, coverage)
        chapters.append((keys[doc], article, part))
    render_math(soup, [a for _, a, _ in chapters])
    solutions = solutions_appendix(soup, chapters)
    last_appendix = max(i for i, (_, _, part) in enumerate(chapters) if part != "back")
    chapters.insert(last_appendix + 1, ("solutions", solutions, "appendix"))
    soup.html["data-theme"] = "light"  # pygments colours apply under the light theme
    body = soup.body
    body.append(title_page(soup, config))
    body.append(copyright_page(soup, config))
    body.append(toc_page(soup, chapters))
    # One wrapper for all numbered chapters: a single page group, so arabic numbering
    # restarts at 1 once, on the first page of chapter 1.
    mainmatter = soup.new_tag("div", attrs={"class": "mainmatter"})
    for key, article, part in chapters:
        chapter = soup.new_tag("section", attrs={"class": f"chapter {part}", "id": key})
        chapter.extend(list(article.children))
        (body if part == "front" else mainmatter).append(chapter)
    body.append(mainmatter)
    return str(soup)


def main(argv: list[str]) -> int:
    html_dir, pdf_path = Path(argv[0]), Path(argv[1])
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    html = assemble(html_dir, ROOT / "_toc.yml", config)
    stamp = hashlib.sha256(
        (html + (HERE / "print.css").read_text()).encode()
    ).hexdigest()
    stamp_file = pdf_path.with_suffix(".sha256")
    if pdf_path.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        print(f"make_pdf: {pdf_path} is up to date")
        return 0
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    (pdf_path.parent / "book.html").write_text(html, encoding="utf-8")

    from weasyprint import HTML

    with tempfile.NamedTemporaryFile(
        dir=pdf_path.parent, suffix=".pdf", delete=False
    ) as tmp:
        HTML(string=html, base_url=str(html_dir.resolve())).write_pdf(tmp.name)
    # The temporary file is created 0600; the PDF is published: a web server running as
    # another user must be able to read it.
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, pdf_path)  # atomic: a failed run never leaves half a PDF
    stamp_file.write_text(stamp)
    print(f"make_pdf: wrote {pdf_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
