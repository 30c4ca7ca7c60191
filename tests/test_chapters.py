"""The code a reader sees is the code a reader can type: checks on the chapter sources.

A chapter's hidden cells (`remove-cell`) hold the build's bookkeeping, `glue(...)` of
the numbers the prose prints. A reader who types the visible cells in order must get the
same results, so a hidden cell may not define a name a visible cell uses, nor set the
random state; and no visible cell may glue. `test_book.py` runs the visible cells of the
quick chapters and compares what they print with the built book.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
from myst_nb.core.read import read_myst_markdown_notebook

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("*.md"))
# What IPython itself provides to every cell.
IPYTHON_NAMES = {"display", "get_ipython"}
# Calls that set or draw from the global random state: a hidden one changes what the
# visible cells after it compute.
RANDOM_STATE = {"manual_seed", "seed", "rand", "randn", "randint", "multinomial"}


def code_cells(path: Path) -> list[tuple[bool, str, ast.Module]]:
    """Return (hidden, source, syntax tree) of each code cell of a chapter, in order."""
    notebook = read_myst_markdown_notebook(path.read_text(encoding="utf-8"))
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        # IPython magics (%xmode) are not Python; the reader types them as they are.
        lines = [line for line in cell.source.splitlines() if not line.startswith("%")]
        hidden = "remove-cell" in cell.metadata.get("tags", [])
        cells.append((hidden, cell.source, ast.parse("\n".join(lines))))
    return cells


def bound_names(tree: ast.Module) -> set[str]:
    """Every name a cell binds: assignments, imports, definitions, arguments, loops."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def loaded_names(tree: ast.Module) -> set[str]:
    return {
        n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def called(tree: ast.Module) -> set[str]:
    """The names of the functions and methods a cell calls."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_visible_cells_use_no_name_that_only_a_hidden_cell_defines(path):
    known = set(dir(builtins)) | IPYTHON_NAMES
    for hidden, source, tree in code_cells(path):
        if hidden:
            continue
        missing = loaded_names(tree) - bound_names(tree) - known
        where = f"{path.name}: {sorted(missing)} undefined for a reader in\n{source}"
        assert not missing, where
        known |= bound_names(tree)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_hidden_cells_leave_the_random_state_alone(path):
    for hidden, source, tree in code_cells(path):
        if hidden:
            where = f"{path.name}: hidden cell\n{source}"
            assert not called(tree) & RANDOM_STATE, where


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_visible_cells_do_not_glue(path):
    for hidden, source, tree in code_cells(path):
        if not hidden:
            where = f"{path.name}:\n{source}"
            assert "glue" not in called(tree) | loaded_names(tree), where


def test_the_checks_see_a_hidden_definition_and_a_hidden_seed(tmp_path):
    chapter = tmp_path / "chapter.md"
    chapter.write_text(
        "# A chapter\n\n```{code-cell} ipython3\n:tags: [remove-cell]\n"
        "import torch; torch.manual_seed(0)\nn = 3\n```\n\n"
        "```{code-cell} ipython3\nprint(torch.randn(n))\n```\n"
    )
    (hidden, _, first), (_, _, second) = code_cells(chapter)
    assert hidden and called(first) & RANDOM_STATE == {"manual_seed"}
    undefined = loaded_names(second) - bound_names(second) - set(dir(builtins))
    assert undefined == {"torch", "n"}
