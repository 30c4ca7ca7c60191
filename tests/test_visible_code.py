"""The code a reader sees in a chapter runs on its own, typed in order.

A chapter's hidden cells (tag `remove-cell`) hold the build's bookkeeping: `glue` for
the numbers in the prose, figure settings. A reader who types the visible cells must
not need them, so every name a visible cell reads must be bound by that cell or an
earlier visible one (or be a builtin), no visible cell calls `glue`, and no hidden cell
sets or draws from the random state, which would change what the visible cells after
it compute. Checked statically with `ast`, without running the chapter;
`test_book.py` runs the quick chapters' visible cells and compares what they print.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.md"))
IPYTHON_NAMES = {"display", "get_ipython"}  # what a Jupyter kernel provides
# Calls that set or draw from torch's global random state.
RANDOM_STATE = {"manual_seed", "seed", "rand", "randn", "randint", "randperm",
                "multinomial"}


def code_cells(path: Path) -> list[tuple[bool, str]]:
    """Return (visible, source) of each code cell of a MyST chapter, in order."""
    from myst_nb.core.read import read_myst_markdown_notebook

    notebook = read_myst_markdown_notebook(path.read_text(encoding="utf-8"))
    cells = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            lines = cell.source.splitlines()
            python = [s for s in lines if not s.lstrip().startswith(("%", "!"))]
            hidden = "remove-cell" in cell.metadata.get("tags", [])
            cells.append((not hidden, "\n".join(python)))
    return cells


def bound_names(tree: ast.AST) -> set[str]:
    """Names a cell binds anywhere: assignments, imports, defs, arguments, handlers."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def read_names(tree: ast.AST) -> set[str]:
    """Names a cell reads."""
    return {
        n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def unbound_reads(path: Path) -> list[str]:
    """Return 'cell K: names' for each visible cell reading what no visible cell bound."""
    known = set(dir(builtins)) | IPYTHON_NAMES
    problems = []
    visible_cells = [src for visible, src in code_cells(path) if visible]
    for k, source in enumerate(visible_cells, 1):
        tree = ast.parse(source)
        missing = read_names(tree) - bound_names(tree) - known
        if missing:
            first = source.strip().splitlines()[0][:50]
            problems.append(f"visible cell {k} ({first!r}): {sorted(missing)}")
        known |= bound_names(tree)
    return problems


def test_the_checker_finds_a_name_bound_only_in_a_hidden_cell(tmp_path):
    chapter = tmp_path / "chapter.md"
    chapter.write_text(
        "# T\n\n```{code-cell} ipython3\n:tags: [remove-cell]\nimport torch\n```\n\n"
        "```{code-cell} ipython3\nx = torch.ones(2)\nglue('x', x)\n"
        "def f(a):\n    return [a * i for i in range(3)]\n```\n",
        encoding="utf-8",
    )
    (problem,) = unbound_reads(chapter)
    assert "['glue', 'torch']" in problem


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_visible_cells_need_nothing_from_hidden_ones(path):
    assert unbound_reads(path) == []


def random_state_calls(path: Path) -> list[str]:
    """Return 'hidden cell K: calls' for each hidden cell touching the random state."""
    problems = []
    hidden_cells = [src for visible, src in code_cells(path) if not visible]
    for k, source in enumerate(hidden_cells, 1):
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
        }
        if calls & RANDOM_STATE:
            problems.append(f"hidden cell {k}: {sorted(calls & RANDOM_STATE)}")
    return problems


def test_the_checker_finds_a_seed_in_a_hidden_cell(tmp_path):
    chapter = tmp_path / "chapter.md"
    chapter.write_text(
        "# T\n\n```{code-cell} ipython3\n:tags: [remove-cell]\n"
        "import torch; torch.manual_seed(0)\n```\n",
        encoding="utf-8",
    )
    assert random_state_calls(chapter) == ["hidden cell 1: ['manual_seed']"]


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_hidden_cells_leave_the_random_state_alone(path):
    assert random_state_calls(path) == []
