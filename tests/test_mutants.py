"""The mutation check stays runnable: each named mutant still finds its code.

Reference: the package's source text. A mutant whose `old` text no longer occurs
exactly once in its module cannot be applied, so `make mutate` would stop at it; this
test says so at `make test` time, when the code it guards is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("mutants", TESTS / "mutants.py")
mutants = sys.modules["mutants"] = importlib.util.module_from_spec(spec)  # for dataclass
spec.loader.exec_module(mutants)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_changes_exactly_one_place_and_names_existing_tests(mutant):
    source = (mutants.ROOT / "code" / "buildllm" / mutant.module).read_text()
    assert source.count(mutant.old) == 1
    assert mutant.old != mutant.new
    for test in mutant.tests:
        path, _, name = test.partition("::")  # a whole module when no ::name
        text = (mutants.ROOT / path).read_text()
        assert not name or f"def {name.split('[')[0]}(" in text
