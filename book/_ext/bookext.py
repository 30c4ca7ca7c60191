"""Sphinx additions for the book: lettered appendices and author-year reference labels.

- Appendices are numbered like chapters by Sphinx, then relabelled A, B, ... so that their
  sections, figures, listings and equations read A.1, Fig. A.2, (A.3) and never share a
  counter with the preface.
- The bibliography's labels are "Author et al., Year", matching the author-year citations
  in the text ("[Vaswani et al., 2017]").
- The package's code names the equations it implements by their labels
  (`# eq-cross-entropy`); in the listings and cells of the book such a label reads as
  the equation's printed number, "Eq. (5.2)".
- The banner's and the header's links to the PDF resolve from every page, and each
  script is listed once (see `drop_repeated_scripts`).
"""

from __future__ import annotations

import re
import string

from docutils import nodes
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


class AuthorYearLabels(BaseLabelStyle):
    """Label an entry by its authors' last names and year, as the citations read."""

    def format_labels(self, sorted_entries):
        labels = list(self.author_year(sorted_entries))
        for label in labels:  # same authors and year: 2024a, 2024b, as in print
            twins = [i for i, other in enumerate(labels) if other == label]
            if len(twins) > 1 and label is labels[twins[0]]:
                for letter, i in zip(string.ascii_lowercase, twins):
                    labels[i] = f"{label}{letter}"
        yield from labels

    def author_year(self, sorted_entries):
        for entry in sorted_entries:
            persons = entry.persons.get("author") or entry.persons.get("editor") or []
            names = [" ".join(p.last_names) for p in persons]
            if not names:
                who = entry.fields.get("organization", entry.key)
            elif len(names) == 1:
                who = names[0]
            elif len(names) == 2:
                who = f"{names[0]} and {names[1]}"
            else:
                who = f"{names[0]} et al."
            yield f"{who}, {entry.fields.get('year', 'n.d.')}".replace("{", "").replace(
                "}", ""
            )


class AuthorYearStyle(UnsrtStyle):
    """unsrt's entry format, sorted by author and year, with author-year labels."""

    default_label_style = AuthorYearLabels
    default_sorting_style = SortingStyle


register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)


def letter_appendices(app, env):
    """Replace the leading chapter number of each appendix's numbers with its letter."""
    for letter, doc in zip(string.ascii_uppercase, app.config.appendix_docs):
        secnumbers = env.toc_secnumbers.get(doc, {})
        for anchor, number in secnumbers.items():
            if number:
                secnumbers[anchor] = (letter, *number[1:])
        for numbers in env.toc_fignumbers.get(doc, {}).values():
            for ident, number in numbers.items():
                if number:
                    numbers[ident] = (letter, *number[1:])
        # The sidebar and the page's contents list read the numbers off the toc nodes;
        # the tab title, the prev/next links and the search index off the title's.
        toc_refs = env.tocs[doc].findall(nodes.reference) if doc in env.tocs else ()
        titles = (env.titles.get(doc), env.longtitles.get(doc))  # often one node
        for node in (*toc_refs, *titles):
            if node is not None and node.get("secnumber"):
                node["secnumber"] = (letter, *node["secnumber"][1:])
    return []


# A label alone, "eq-gelu", or in parentheses, "(eq-gelu)": "Eq. (4.5)" or "(4.5)".
EQUATION_LABEL = re.compile(r"(\()?\b(eq-[a-z0-9]+(?:-[a-z0-9]+)*)(\))?")


def equation_number(env, label: str) -> str | None:
    """Return "5.2" for equation `label`, as the text's references print it."""
    found = env.get_domain("math").data["objects"].get(label)
    if found is None:
        return None
    numbers = env.toc_fignumbers.get(found[0], {}).get("displaymath", {})
    number = numbers.get(nodes.make_id(f"equation-{label}"))
    return ".".join(map(str, number)) if number else None


def numbered(env, match: re.Match) -> str:
    """Return the text of an `EQUATION_LABEL` match with the label as its number."""
    opening, label, closing = match.groups()
    number = equation_number(env, label)
    if number is None:
        return match.group()
    if opening and closing:
        return f"({number})"
    return f"{opening or ''}Eq. ({number}){closing or ''}"


def number_equation_labels(app, doctree, docname):
    """In every code block, replace an equation's label by its printed number."""
    for block in doctree.findall(nodes.literal_block):
        text = block.astext()
        new = EQUATION_LABEL.sub(lambda m: numbered(app.env, m), text)
        if new != text:
            if block.rawsource == text:  # else Sphinx would not highlight it
                block.rawsource = new
            block.children = [nodes.Text(new)]


# A link to a file of the site: no scheme, not from the server's root, not an anchor.
SITE_FILE = re.compile(r"(?![a-z][a-z0-9+.-]*:|/|#)")


def link_from_page(app, pagename, templatename, context, doctree):
    """Make the banner's and the header icons' links, written from the site root,
    relative to the page: they resolve from book/api/ and from search.html alike."""

    def relative(url: str) -> str:
        return context["pathto"](url, 1) if SITE_FILE.match(url) else url

    context["theme_announcement"] = re.sub(
        r'href="([^"]*)"',
        lambda m: f'href="{relative(m[1])}"',
        context.get("theme_announcement") or "",
    )
    context["theme_icon_links"] = [
        {**link, "url": relative(link["url"])}
        for link in context.get("theme_icon_links") or []
    ]


def drop_repeated_scripts(app, pagename, templatename, context, doctree):
    """Keep one copy of each script.

    Sphinx 7.4 lists an inline script that an extension adds after the builder starts
    twice (once as file None, once as ""), and sphinx-thebe's `const THEBE_JS_URL`,
    declared twice, is a SyntaxError on each page.
    """
    seen = set()
    scripts = []
    for script in context["script_files"]:
        attributes = tuple(sorted(script.attributes.items()))
        key = (script.filename or "", script.priority, attributes)
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    context["script_files"] = scripts


def setup(app):
    app.add_config_value("appendix_docs", [], "env")
    app.connect("env-get-updated", letter_appendices, priority=900)
    app.connect("doctree-resolved", number_equation_labels)
    app.connect("html-page-context", link_from_page)
    app.connect("html-page-context", drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
